"""Representation maps and the unit grid (run/representation.py): the digits MLP's hidden layer in a t-SNE
map that a kNN classifier reads at >= 90 % on held-out digits, PCA against a closed-form replica,
determinism, colouring by label and prediction, per-class unit means against numpy, the grid layout."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rulegraph.run import representation as rep
from rulegraph.run.representation import RepresentationError, grid_shape, represent, snake, unit_grid

MODELS = Path(__file__).resolve().parent.parent / "models"
MLP = str(MODELS / "digits_mlp.onnx")
CNN = str(MODELS / "digits_cnn.onnx")
HIDDEN = "/net/net.4/Relu_output_0"
FIRST = "/net/net.2/Relu_output_0"


@pytest.fixture(scope="module")
def digits():
    """All 1797 digits [N, 1, 8, 8] in [0, 1], labels, and the models' 80/20 split (held-out = test)."""
    datasets = pytest.importorskip("sklearn.datasets",
                                   reason="the digits come with scikit-learn (crosscheck extra)")
    from sklearn.model_selection import train_test_split

    data = datasets.load_digits()
    x = (data.images / 16).astype(np.float32)[:, None]
    train, test = train_test_split(np.arange(len(x)), test_size=0.2, random_state=0)
    return x, data.target.astype(np.int64), train, test


def run(model: str, tensors: list[str], x: np.ndarray) -> list[np.ndarray]:
    proto = onnx.load(model)
    for t in tensors:
        if t not in {o.name for o in proto.graph.output}:
            proto.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(tensors, {"input": x})


def test_tsne_map_of_the_hidden_layer_separates_held_out_digits(digits):
    """The issue's check: kNN on the train points' 2-D coordinates scores >= 90 % on the held-out ones."""
    pytest.importorskip("openTSNE", reason="t-SNE comes with the views extra")
    neighbors = pytest.importorskip("sklearn.neighbors")
    x, y, train, test = digits
    found = represent(MLP, HIDDEN, list(x), labels=y, method="tsne", seed=0)
    assert found.embedding.shape == (len(x), 2)
    knn = neighbors.KNeighborsClassifier(n_neighbors=5).fit(found.embedding[train], y[train])
    assert knn.score(found.embedding[test], y[test]) >= 0.90


def closed_form_pca(points: np.ndarray) -> np.ndarray:
    """Projection on the two leading eigenvectors of the covariance matrix (eigh), each signed so its
    largest-magnitude entry is positive."""
    points = points.astype(np.float64)
    centred = points - points.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    axes = vectors[:, np.argsort(values)[::-1][:2]].T
    axes *= np.sign(axes[np.arange(2), np.argmax(np.abs(axes), axis=1)])[:, None]
    return centred @ axes.T


@pytest.mark.parametrize("tensor", [FIRST, HIDDEN, "logits"])
def test_pca_equals_the_closed_form(digits, tensor):
    x, y, _, _ = digits
    points = run(MLP, [tensor], x[:300])[0]
    found = represent(MLP, tensor, list(x[:300]), method="pca", batch_size=64)
    np.testing.assert_allclose(found.embedding, closed_form_pca(points), rtol=1e-6, atol=1e-6)


def test_pca_of_a_4d_tensor_flattens_each_sample(digits):
    x = digits[0][:100]
    tensor = "/features/features.6/Relu_output_0"
    points = run(CNN, [tensor], x)[0].reshape(100, -1)
    found = represent(CNN, tensor, list(x), method="pca")
    np.testing.assert_allclose(found.embedding, closed_form_pca(points), rtol=1e-6, atol=1e-6)


def test_tsne_is_deterministic_with_a_seed(digits):
    pytest.importorskip("openTSNE", reason="t-SNE comes with the views extra")
    x = digits[0][:200]
    a = represent(MLP, HIDDEN, list(x), seed=3).embedding
    b = represent(MLP, HIDDEN, list(x), seed=3, batch_size=17).embedding
    c = represent(MLP, HIDDEN, list(x), seed=4).embedding
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_colouring_by_label_and_by_prediction(digits):
    x, y, _, _ = digits
    found = represent(MLP, HIDDEN, list(x[:120]), labels=y[:120], method="pca")
    logits = run(MLP, ["logits"], x[:120])[0]
    np.testing.assert_array_equal(found.colours("prediction"), np.argmax(logits, axis=1))
    np.testing.assert_array_equal(found.colours("label"), y[:120])
    unlabelled = represent(MLP, HIDDEN, list(x[:10]), method="pca")
    with pytest.raises(RepresentationError, match="no labels were given"):
        unlabelled.colours("label")
    with pytest.raises(RepresentationError, match="colour by 'size'"):
        found.colours("size")


@pytest.mark.parametrize("call,match", [
    (dict(labels=np.arange(9)), "9 labels for 10 samples"),
    (dict(labels=np.zeros(10)), "labels are integers"),
    (dict(method="umap"), "unknown method 'umap'; methods: tsne, pca"),
])
def test_represent_errors(digits, call, match):
    with pytest.raises(RepresentationError, match=match):
        represent(MLP, HIDDEN, list(digits[0][:10]), **{"method": "pca", **call})


def test_unit_grid_means_per_class_and_layout(digits):
    x, y, _, _ = digits
    values = run(MLP, [FIRST], x[:500])[0].astype(np.float64)
    reference = unit_grid(MLP, FIRST, list(x[:500]), labels=y[:500], batch_size=500)
    for batch in (1, 37):
        found = unit_grid(MLP, FIRST, list(x[:500]), labels=y[:500], batch_size=batch)
        np.testing.assert_allclose(found.means, reference.means, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(found.cells, reference.cells)
    expected = np.stack([values[y[:500] == c].mean(axis=0) for c in range(10)])
    np.testing.assert_allclose(reference.means, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(reference.counts, np.bincount(y[:500]))
    assert reference.cells.shape == (8, 8) and sorted(reference.cells.ravel().tolist()) == list(range(64))
    # the order is the first principal component of the class-mean profiles, snaked onto the grid
    key = closed_form_pca(expected.T)[:, 0]
    order = snake(np.argsort(key, kind="stable"), 8, 8)
    np.testing.assert_array_equal(reference.cells, order)
    maps = reference.maps()
    np.testing.assert_allclose(maps[3][reference.cells == 5], expected[3, 5])


def test_unit_grid_by_prediction_and_errors(digits):
    x = digits[0][:60]
    found = unit_grid(MLP, HIDDEN, list(x))
    predictions = np.argmax(run(MLP, ["logits"], x)[0], axis=1)
    np.testing.assert_array_equal(found.classes, np.unique(predictions))
    assert found.by == "prediction" and found.cells.shape == (4, 8)
    with pytest.raises(RepresentationError, match="dense layer .N, U.; '/features/features.6/Relu_output_0'"):
        unit_grid(CNN, "/features/features.6/Relu_output_0", list(x))
    with pytest.raises(RepresentationError, match="59 labels for more samples"):
        unit_grid(MLP, HIDDEN, list(x), labels=np.zeros(59, np.int64), batch_size=10)
    with pytest.raises(RepresentationError, match="61 labels for 60 samples"):
        unit_grid(MLP, HIDDEN, list(x), labels=np.zeros(61, np.int64))


@pytest.mark.parametrize("count,shape", [(1, (1, 1)), (2, (1, 2)), (5, (2, 3)), (10, (3, 4)), (31, (4, 8)),
                                         (32, (4, 8)), (64, (8, 8)), (100, (10, 10)), (512, (16, 32))])
def test_grid_shape(count, shape):
    rows, columns = grid_shape(count)
    assert (rows, columns) == shape and rows * columns >= count and columns <= max(2 * rows, count)


def test_snake_keeps_neighbours_adjacent():
    grid = snake(np.arange(7), 2, 4)
    assert grid.tolist() == [[0, 1, 2, 3], [-1, 6, 5, 4]]


def test_tsne_needs_a_few_samples():
    pytest.importorskip("openTSNE", reason="t-SNE comes with the views extra")
    with pytest.raises(RepresentationError, match="at least 4 samples; the dataset has 3"):
        rep.tsne(np.zeros((3, 5)))
