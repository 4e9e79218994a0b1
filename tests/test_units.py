"""Dataset examples for units (run/units.py) and receptive fields (run/receptive.py): the top k against a
brute-force sort of every activation, the same answer for every batch size and source, receptive fields
against the closed form and against the support of impulse responses, errors naming the bad layer/unit."""

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rulegraph
from rulegraph.errors import ModelError, RulegraphWarning
from rulegraph.run.receptive import receptive_field
from rulegraph.run.units import UnitsError, top_examples

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = str(MODELS / "digits_cnn.onnx")
MLP = str(MODELS / "digits_mlp.onnx")
RESNET = str(MODELS / "digits_resnet.onnx")


def digits(n: int) -> np.ndarray:
    """``n`` real digits [n, 1, 8, 8] in [0, 1], with sample 3 repeated at 10 and 20 (ties) where n allows."""
    datasets = pytest.importorskip("sklearn.datasets",
                                   reason="the digits come with scikit-learn (crosscheck extra)")
    x = (datasets.load_digits().images[:n] / 16).astype(np.float32)[:, None]
    for i in (10, 20):
        if i < n:
            x[i] = x[3]
    return x


def activations(model: str, tensor: str, x: np.ndarray, name: str = "input") -> np.ndarray:
    """The tensor over all of ``x`` in one plain onnxruntime run (the model with it as an output)."""
    proto = onnx.load(model)
    if tensor not in {o.name for o in proto.graph.output}:
        proto.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([tensor], {name: x})[0]


def brute_force(a: np.ndarray, axis: int, k: int):
    """(values, indices, flat positions) [U, k] by sorting every sample of every unit in Python."""
    moved = np.moveaxis(a, axis, 1)
    flat = moved.reshape(moved.shape[0], moved.shape[1], -1).astype(np.float64)
    values, indices, positions = [], [], []
    for u in range(flat.shape[1]):
        rows = sorted(range(len(flat)), key=lambda i: (-flat[i, u].max(), i))[:k]
        values.append([flat[i, u].max() for i in rows])
        indices.append(rows)
        positions.append([int(np.argmax(flat[i, u])) for i in rows])
    return np.array(values), np.array(indices), np.array(positions)


CASES = [  # model, tensor, unit axis
    (CNN, "/features/features.2/Relu_output_0", 1),
    (CNN, "/features/features.6/Relu_output_0", 1),
    (MLP, "/net/net.2/Relu_output_0", 1),
    (RESNET, "/block3/relu_1/Relu_output_0", 1),
]


@pytest.mark.parametrize("model,tensor,axis", CASES)
def test_top_k_equals_brute_force(model, tensor, axis):
    x = digits(60)
    a = activations(model, tensor, x)
    values, indices, flat = brute_force(a, axis, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RulegraphWarning)
        found = top_examples(model, tensor, list(x), k=5, batch_size=7)
    # a dense layer has no receptive field to crop at: said once; a conv layer's is computed: silent
    assert [str(w.message).split(";")[0] for w in caught] == (
        [f"the receptive field of '{tensor}' is not computable: tensor '{tensor}' ['N', {a.shape[1]}] has no "
         f"spatial axes like the input 'input' ['N', 1, 8, 8]"] if a.ndim == 2 else [])
    np.testing.assert_array_equal(found.indices, indices)
    np.testing.assert_array_equal(found.values, values)
    shape = [n for i, n in enumerate(a.shape) if i not in (0, axis)]
    expected = np.stack(np.unravel_index(flat, shape), axis=-1) if shape else np.zeros((*flat.shape, 0))
    np.testing.assert_array_equal(found.positions, expected)
    assert found.ids == [[str(i) for i in row] for row in indices.tolist()]
    assert found.samples == 60


def test_ties_are_ordered_by_dataset_position():
    """Samples 3, 10 and 20 are one image: in every unit's full ranking they are adjacent, in that order."""
    x = digits(60)
    found = top_examples(CNN, "/features/features.2/Relu_output_0", list(x), k=60, batch_size=9)
    for row in found.indices.tolist():
        places = [row.index(i) for i in (3, 10, 20)]
        assert places == sorted(places) and places[2] - places[0] == 2


@pytest.mark.parametrize("batch", [1, 7, 60])
def test_batch_size_does_not_change_the_answer(batch):
    x = digits(60)
    tensor = "/features/features.6/Relu_output_0"
    reference = top_examples(CNN, tensor, list(x), k=4, batch_size=60)
    found = top_examples(CNN, tensor, list(x), k=4, batch_size=batch)
    for name in ("values", "indices", "positions", "boxes"):
        np.testing.assert_array_equal(getattr(found, name), getattr(reference, name))
    for a, b in zip(found.crops, reference.crops):
        for c, d in zip(a, b):
            np.testing.assert_array_equal(c, d)


def test_sources_give_the_same_answer(tmp_path):
    """A .npy file, a folder of .npy files and an iterable are one dataset (ids aside)."""
    x = digits(30)
    np.save(tmp_path / "all.npy", x)
    (tmp_path / "parts").mkdir()
    for i in range(3):
        np.save(tmp_path / "parts" / f"{i}.npy", x[10 * i:10 * i + 10])
    tensor = "/features/features.2/Relu_output_0"
    reference = top_examples(CNN, tensor, list(x), k=3)
    for data in (tmp_path / "all.npy", str(tmp_path / "parts")):
        found = top_examples(CNN, tensor, data, k=3, batch_size=4)
        np.testing.assert_array_equal(found.indices, reference.indices)
        np.testing.assert_array_equal(found.values, reference.values)
    assert top_examples(CNN, tensor, tmp_path / "all.npy", k=1).ids[0][0].startswith("all.npy:")


def test_crops_are_the_input_at_the_receptive_field():
    x = digits(40)
    tensor = "/features/features.6/Relu_output_0"   # conv3, pool2, conv3: size 8, jump 2, start -3
    found = top_examples(CNN, tensor, list(x), k=3)
    for u in range(len(found.units)):
        for r in range(3):
            y, xx = found.positions[u, r]
            y0, y1 = max(0, -3 + 2 * y), min(8, -3 + 2 * y + 8)
            x0, x1 = max(0, -3 + 2 * xx), min(8, -3 + 2 * xx + 8)
            assert found.boxes[u, r].tolist() == [[y0, y1], [x0, x1]]
            np.testing.assert_array_equal(found.crops[u][r], x[found.indices[u, r]][:, y0:y1, x0:x1])


def test_dense_layer_shows_whole_inputs_and_says_so():
    x = digits(20)
    with pytest.warns(RulegraphWarning, match="receptive field .* not computable.*whole inputs are shown"):
        found = top_examples(MLP, "/net/net.4/Relu_output_0", list(x), k=2, units=[0, 5])
    assert found.boxes is None and found.units == [0, 5]
    np.testing.assert_array_equal(found.crops[1][0], x[found.indices[1, 0]])


def test_fewer_samples_than_k():
    found = top_examples(CNN, "/features/features.2/Relu_output_0", list(digits(3)), k=9, units=[2])
    assert found.values.shape == (1, 3) and sorted(found.indices[0].tolist()) == [0, 1, 2]


def test_json_summary_names_every_example():
    found = top_examples(CNN, "/features/features.6/Relu_output_0", list(digits(12)), k=2, units=[1])
    doc = found.to_json()
    assert doc["receptive_field"] == "size 8x8, jump 2x2, start -3,-3"
    example = doc["units"][0]["examples"][0]
    assert example["index"] == found.indices[0, 0] and example["value"] == found.values[0, 0]


@pytest.mark.parametrize("call,error,match", [
    (dict(layer="nope"), ModelError, "no tensor or node 'nope'"),
    (dict(units=[16]), UnitsError, "unit 16 is not one of the 16 units .*0..15"),
    (dict(units=[]), UnitsError, r"unit \(none\)"),
    (dict(k=0), UnitsError, "k must be a positive integer"),
    (dict(unit_axis=4), UnitsError, "unit_axis 4 does not fit"),
    (dict(data=[]), rulegraph.RulegraphError, "the dataset is empty"),
])
def test_errors(call, error, match):
    options = dict(layer="/features/features.6/Relu_output_0", data=list(digits(5)), k=2)
    options.update(call)
    with pytest.raises(error, match=match):
        top_examples(CNN, options.pop("layer"), options.pop("data"), **options)


# ---- receptive fields -----------------------------------------------------------------------------

def stack_model(layers, size: int = 23, branch=None) -> onnx.ModelProto:
    """x [N, 1, size, size] through ``layers`` (op, kernel, stride, pads, dilation; pads an int, a
    (begin, end) pair or "SAME_UPPER"); convs with positive weights and no bias, so an impulse reaches
    exactly the outputs whose field holds it. ``branch``: a second stack from the input added to the first
    (a union of two fields)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def chain(layers, prefix):
        prev = "x"
        for i, (op, k, s, p, d) in enumerate(layers):
            out = f"{prefix}{i}"
            attrs = dict(kernel_shape=[k, k], strides=[s, s])
            if p == "SAME_UPPER":
                attrs["auto_pad"] = "SAME_UPPER"
            else:
                begin, end = (p, p) if isinstance(p, int) else p
                attrs["pads"] = [begin, begin, end, end]
            if op == "Conv":
                w = rng.uniform(0.5, 1, (1, 1, k, k)).astype(np.float32)
                inits.append(numpy_helper.from_array(w, f"w{out}"))
                nodes.append(helper.make_node("Conv", [prev, f"w{out}"], [out], dilations=[d, d], **attrs))
            else:
                nodes.append(helper.make_node(op, [prev], [out], **attrs))
            prev = out
        return prev

    last = chain(layers, "t")
    if branch is not None:
        nodes.append(helper.make_node("Add", [last, chain(branch, "b")], ["sum"]))
        last = "sum"
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             ["N", 1, size, size])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def closed_form(layers):
    """(size, jump, start) of a plain stack: r = 1 + Σ d(k−1)Πt, j = Πt, s = −Σ pΠt."""
    r, j, s = 1, 1, 0
    for _, k, t, p, d in layers:
        r, s, j = r + d * (k - 1) * j, s - p * j, j * t
    return r, j, s


STACKS = [
    [("Conv", 3, 1, 1, 1)],
    [("Conv", 3, 2, 1, 1), ("Conv", 3, 2, 1, 1)],
    [("Conv", 5, 1, 2, 1), ("MaxPool", 2, 2, 0, 1), ("Conv", 3, 1, 0, 1)],
    [("Conv", 3, 1, 2, 2), ("Conv", 3, 1, 4, 4)],                     # dilated
    [("Conv", 7, 2, 3, 1), ("MaxPool", 3, 2, 1, 1), ("Conv", 3, 1, 1, 1), ("AveragePool", 2, 2, 0, 1)],
    [("Conv", 4, 3, 0, 2), ("Conv", 2, 1, 1, 1)],
]


@pytest.mark.parametrize("layers", STACKS)
def test_receptive_field_closed_form_and_impulses(layers):
    model = stack_model(layers)
    graph = rulegraph.load(model)
    field = receptive_field(graph, graph.outputs[0])
    r, j, s = closed_form(layers)
    assert [(a.size, a.jump, a.start) for a in field.axes] == [(r, j, s)] * 2
    _check_against_impulses(model, field)


def test_receptive_field_same_padding():
    """auto_pad SAME_UPPER: the leading pad is ⌊total/2⌋ from the shapes."""
    model = stack_model([("Conv", 4, 2, "SAME_UPPER", 1), ("Conv", 3, 1, "SAME_UPPER", 1)], size=20)
    graph = rulegraph.load(model)
    field = receptive_field(graph, graph.outputs[0])
    # first conv: in 20, out 10, total pad (10-1)*2 + 4 - 20 = 2, leading 1; second: total 2, leading 1
    assert [(a.size, a.jump, a.start) for a in field.axes] == [(8, 2, -3)] * 2
    _check_against_impulses(model, field, size=20)


def test_receptive_field_union_of_a_residual_branch():
    """Fields [0, 2] + 2i and [-2, 0] + 2i (pads on one side only): their union [-2, 2] + 2i."""
    model = stack_model([("Conv", 3, 2, (0, 2), 1)], branch=[("Conv", 3, 2, (2, 0), 1)])
    graph = rulegraph.load(model)
    field = receptive_field(graph, graph.outputs[0])
    assert [(a.size, a.jump, a.start) for a in field.axes] == [(5, 2, -2)] * 2
    _check_against_impulses(model, field)


def _check_against_impulses(model, field, size: int = 23):
    """Every input impulse an output position sees lies in its field's box, and where that box is inside
    the input, the impulses' bounding box is the box (dilation leaves holes inside it, not at its edges)."""
    impulses = np.eye(size * size, dtype=np.float32).reshape(size * size, 1, size, size)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": impulses})[0][:, 0]                       # [pixels, h, w]
    for y in range(out.shape[1]):
        for x in range(out.shape[2]):
            hit = np.nonzero(out[:, y, x].reshape(size, size))
            box = ((hit[0].min(), hit[0].max() + 1), (hit[1].min(), hit[1].max() + 1))
            expected = field.box((y, x), (size, size))
            unclipped = tuple((a.start + i * a.jump, a.start + i * a.jump + a.size)
                              for a, i in zip(field.axes, (y, x)))
            if expected == unclipped:
                assert box == expected, (y, x)
            else:
                assert all(b >= e0 and f <= e1 for (b, f), (e0, e1) in zip(box, expected)), (y, x)


@pytest.mark.parametrize("model,tensor,text", [
    (CNN, "/features/features.7/MaxPool_output_0", "size 10x10, jump 4x4, start -3,-3"),
    (RESNET, "/block3/relu_1/Relu_output_0", "size 17x17, jump 2x2, start -8,-8"),
    (RESNET, "/pool/GlobalAveragePool_output_0", "the whole input"),
    (MLP, "/net/net.2/Relu_output_0", "not computable: tensor '/net/net.2/Relu_output_0'"),
])
def test_receptive_field_of_bundled_models(model, tensor, text):
    assert receptive_field(rulegraph.load(model), tensor).text().startswith(text)


def sequence_model(path: Path) -> str:
    """x [N, 6, 4] -> MatMul [4, 5] -> Tanh: h [N, 6, 5], a feature per last-axis entry."""
    w = np.random.default_rng(1).normal(0, 1, (4, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Tanh", ["m"], ["h"])]
    graph = helper.make_graph(nodes, "seq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 6, 5])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_features_of_a_sequence_tensor_are_its_last_axis(tmp_path):
    """[N, T, D]: unit = feature d, score = its max over T (position t), against the brute force."""
    model = sequence_model(tmp_path / "seq.onnx")
    x = np.random.default_rng(2).normal(0, 1, (30, 6, 4)).astype(np.float32)
    values, indices, flat = brute_force(activations(model, "h", x, "x"), 2, 4)
    with pytest.warns(RulegraphWarning, match="'MatMul_0' .MatMul. is not a convolution, pool or"):
        found = top_examples(model, "h", list(x), k=4, batch_size=4)
    assert found.unit_axis == 2 and found.units == list(range(5))
    np.testing.assert_array_equal(found.indices, indices)
    np.testing.assert_array_equal(found.values, values)
    np.testing.assert_array_equal(found.positions[..., 0], flat)


def test_units_off_the_channel_axis_have_no_crop(tmp_path):
    """A position-wise tensor of a [N, T, D] input has a field for axes 2.., but its units are axis 2."""
    w = np.ones((1,), np.float32)
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["h"])], "seq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 6, 4])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(0, 1, (5, 6, 4)).astype(np.float32)
    with pytest.warns(RulegraphWarning, match="units are on axis 2 of 'h'"):
        found = top_examples(str(tmp_path / "m.onnx"), "h", list(x), k=2)
    assert found.boxes is None
    np.testing.assert_array_equal(found.crops[0][0], x[found.indices[0, 0]])
