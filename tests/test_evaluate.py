"""Evaluation metrics (``run/perturbation.py``, ``run/sanity.py``, ``run/evaluate.py``).

Oracles: a linear model ``s = W·x + b`` (scores without softmax), whose perturbation curves are
closed-form sums over the features left in place; numpy loops written step by step; scipy and
scikit-image where installed; exact error messages."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph.errors import RulegraphError
from rulegraph.run import perturbation as pert
from rulegraph.run import sanity
from rulegraph.run.evaluate import FAMILIES, METRICS, Settings, evaluate

RNG = np.random.default_rng(0)
C, H, W, K = 1, 5, 6, 4
WEIGHTS = RNG.normal(size=(K, C * H * W))
BIAS = RNG.normal(size=K)
X = RNG.uniform(0, 1, (3, C, H, W)).astype(np.float32)
A = RNG.normal(size=X.shape).astype(np.float32)
CLASSES = np.array([0, 2, 3])


def linear(xs):
    return xs.reshape(len(xs), -1).astype(np.float64) @ WEIGHTS.T + BIAS


def scorer(budget=pert.DEFAULT_BUDGET):
    return pert.Scorer(linear, softmax=False, budget=budget)


def score_kept(x, keep, base, c):
    """The linear score with the features where ``keep`` is False at ``base``."""
    flat = np.where(keep, x.reshape(-1), base)
    return float(WEIGHTS[c] @ flat + BIAS[c])


def _pixel_replica(order, step):
    out = []
    for x, a, c in zip(X, A, CLASSES):
        ranked = np.argsort(-a.reshape(-1) if order == "morf" else a.reshape(-1))
        row = []
        for k in range(1, len(ranked) // step + 1):
            keep = np.ones(x.size, bool)
            keep[ranked[: k * step]] = False
            row.append(score_kept(x, keep, x.min(), c))
        out.append(row)
    return np.array(out)


def _region_replica(patch, order, regions):
    """Blocks of the image padded to a multiple of ``patch`` (split evenly, the larger part after)."""
    out = []
    for x, a, c in zip(X, A, CLASSES):
        top, left = (-H % patch) // 2, (-W % patch) // 2
        blocks = []
        for r in range(-top, H, patch):
            for q in range(-left, W, patch):
                cells = [(i, j) for i in range(max(r, 0), min(r + patch, H))
                         for j in range(max(q, 0), min(q + patch, W))]
                blocks.append((sum(float(a[0, i, j]) for i, j in cells), cells))
        sums = np.array([s for s, _ in blocks], dtype=np.float32)
        ranked = np.argsort(-sums if order == "morf" else sums)
        keep = np.ones((H, W), bool)
        full = score_kept(x, keep.reshape(-1), x.min(), c)
        row = []
        for k in ranked[:regions]:
            for i, j in blocks[k][1]:
                keep[i, j] = False
            row.append(full - score_kept(x, keep.reshape(-1), x.min(), c))
        out.append(row)
    return np.array(out)


def _deletion_replica(insert):
    out = []
    for x, a, c in zip(X, A, CLASSES):
        ranked = np.argsort(-a.reshape(-1))
        cuts = np.round(np.linspace(0, x.size, x.size + 1)).astype(int)
        row = []
        for cut in cuts:
            hit = np.zeros(x.size, bool)
            hit[ranked[:cut]] = True
            row.append(score_kept(x, hit if insert else ~hit, x.min(), c))
        out.append(row)
    return np.array(out)


CURVES = {
    "pixel flipping morf step 1": (lambda s: pert.pixel_flipping(s, X, A, CLASSES),
                                   lambda: _pixel_replica("morf", 1)),
    "pixel flipping lerf step 5": (lambda s: pert.pixel_flipping(s, X, A, CLASSES, 5, "lerf"),
                                   lambda: _pixel_replica("lerf", 5)),
    "region morf patch 2": (lambda s: pert.region_perturbation(s, X, A, CLASSES, 2, "morf", 100),
                            lambda: _region_replica(2, "morf", 100)),
    "region lerf patch 4 (padded 1+2, 1+1), 3 regions": (
        lambda s: pert.region_perturbation(s, X, A, CLASSES, 4, "lerf", 3),
        lambda: _region_replica(4, "lerf", 3)),
    "deletion": (lambda s: pert.deletion_insertion(s, X, A, CLASSES, 1000)["deletion"],
                 lambda: _deletion_replica(False)),
    "insertion": (lambda s: pert.deletion_insertion(s, X, A, CLASSES, 1000)["insertion"],
                  lambda: _deletion_replica(True)),
}


@pytest.mark.parametrize("row", CURVES)
def test_curves_match_the_closed_form_of_a_linear_model(row):
    ours, replica = CURVES[row]
    np.testing.assert_allclose(ours(scorer()), replica(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row", CURVES)
def test_one_row_per_run_gives_the_batched_answer(row):
    """A budget of one input row runs the model once per (sample, step); the curves are the same,
    and the default budget runs each curve in one batch (float64 matrix products of other row
    counts round differently in the last bits)."""
    ours, _ = CURVES[row]
    single, batched = scorer(budget=1), scorer()
    np.testing.assert_allclose(ours(single), ours(batched), rtol=1e-12, atol=1e-12)
    assert single.runs > 2 * len(X) and batched.runs == (2 if row in ("deletion", "insertion") else 1)


def test_faithfulness_correlation_is_one_for_the_exact_contributions():
    """For s = W·x + b the drop when a subset goes to the baseline is Σ_S w (x − base): the map
    w ⊙ (x − base) correlates exactly."""
    flat = X.reshape(len(X), -1).astype(np.float64)
    exact = (WEIGHTS[CLASSES] * (flat - flat.min(axis=1, keepdims=True))).reshape(X.shape)
    found = pert.faithfulness_correlation(scorer(), X, exact, CLASSES, runs=30, subset=7, seed=1)
    np.testing.assert_allclose(found, 1.0, atol=1e-9)


def test_faithfulness_correlation_replica():
    """Subsets from RandomState(seed).choice, run by run and sample by sample, N uniform draws after
    each run; Pearson correlation of the attribution sums with the drops."""
    rng = np.random.RandomState(4)
    flat, a = X.reshape(len(X), -1), A.reshape(len(X), -1).astype(np.float64)
    sums, drops = np.zeros((len(X), 6)), np.zeros((len(X), 6))
    for r in range(6):
        for i in range(len(X)):
            chosen = rng.choice(flat.shape[1], 5, replace=False)
            keep = np.ones(flat.shape[1], bool)
            keep[chosen] = False
            sums[i, r] = a[i, chosen].sum()
            drops[i, r] = score_kept(X[i], np.ones_like(keep), 0, CLASSES[i]) - score_kept(
                X[i], keep, flat[i].min(), CLASSES[i])
        rng.uniform(size=len(X))
    expected = [np.corrcoef(s, d)[0, 1] for s, d in zip(sums, drops)]
    found = pert.faithfulness_correlation(scorer(), X, A, CLASSES, runs=6, subset=5, seed=4)
    np.testing.assert_allclose(found, expected, rtol=1e-9)


AREAS = {
    "aopc: Σ drops / (K + 1)": (lambda: pert.aopc(np.array([[1.0, 2.0, 3.0]])), [6.0 / 4]),
    "auc: trapezoid over [0, 1]": (lambda: pert.auc(np.array([[1.0, 0.0, 1.0]])), [0.5]),
    "auc of a constant": (lambda: pert.auc(np.array([[0.25] * 7])), [0.25]),
}


@pytest.mark.parametrize("row", AREAS)
def test_areas(row):
    found, expected = AREAS[row]
    np.testing.assert_allclose(found(), expected)


def test_road_imputes_a_pixel_as_the_weighted_mean_of_its_neighbours():
    image = RNG.uniform(size=(2, 4, 5))
    pixel = 1 * 5 + 2
    weights = {(dr, dc): w for (dr, dc), w in pert.ROAD_NEIGHBOURS.items()}
    expected = sum(w * image[:, 1 + dr, 2 + dc] for (dr, dc), w in weights.items())
    found = pert._imputed(image, np.array([pixel]), 0.0, np.random.RandomState(0))
    np.testing.assert_allclose(found[:, 1, 2], expected, rtol=1e-12)
    untouched = np.ones(image.shape, bool)
    untouched[:, 1, 2] = False
    np.testing.assert_array_equal(found[untouched], image[untouched])


def test_road_imputation_solves_neighbouring_pixels_jointly():
    """Two unknown neighbours u, v: each is its known neighbours' weighted sum plus w·(the other),
    over the weights of its neighbours inside the image (a corner pixel has 3)."""
    image = RNG.uniform(size=(1, 3, 3))
    found = pert._imputed(image, np.array([0, 1]), 0.0, np.random.RandomState(0))[0]
    u, v = found[0, 0], found[0, 1]
    nb = {(0, 0): [((0, 1), 1 / 6), ((1, 0), 1 / 6), ((1, 1), 1 / 12)],
          (0, 1): [((0, 0), 1 / 6), ((0, 2), 1 / 6), ((1, 0), 1 / 12), ((1, 1), 1 / 6), ((1, 2), 1 / 12)]}
    for (r, c), value in (((0, 0), u), ((0, 1), v)):
        grid = found.copy()
        total = sum(w for _, w in nb[(r, c)])
        assert value * total == pytest.approx(sum(w * grid[p] for p, w in nb[(r, c)]), rel=1e-12)


@pytest.mark.parametrize("channels", [1, 3])
def test_road_dense_and_sparse_solutions_agree(channels, monkeypatch):
    """Systems up to ``DENSE_MAX`` pixels are solved by numpy, larger ones by scipy's spsolve (as
    Quantus does); both give the same imputation and draw the same noise."""
    pytest.importorskip("scipy.sparse", reason="scipy is the sparse solver")
    image = RNG.uniform(size=(channels, 9, 7))
    pixels = RNG.permutation(63)[:40]
    dense = pert._imputed(image, pixels, 0.1, np.random.RandomState(2))
    monkeypatch.setattr(pert, "DENSE_MAX", 0)
    np.testing.assert_allclose(pert._imputed(image, pixels, 0.1, np.random.RandomState(2)), dense, rtol=1e-10)


def test_road_without_noise_keeps_the_class_of_a_constant_image():
    """A constant image imputes to itself: the linear model's arg-max does not move."""
    x = np.full((2, 1, H, W), 0.5, np.float32)
    classes = linear(x).argmax(axis=1)
    found = pert.road(scorer(), x, A[:2], classes, (10, 50, 90), noise=0.0)
    np.testing.assert_array_equal(found, np.ones((2, 3)))


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats", reason="scipy is the reference for Spearman")
    a = RNG.integers(0, 4, (3, 40)).astype(float)
    b = RNG.normal(size=(3, 40))
    expected = [stats.spearmanr(x, y)[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(sanity.spearman(a, b), expected, rtol=1e-12)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the reference for SSIM")
    a, b = RNG.normal(size=(3, 50)), RNG.normal(size=(3, 50))
    b[0] = a[0]
    expected = [metrics.structural_similarity(x, y,
                                              data_range=float(max(x.max(), y.max()) - min(x.min(), y.min())))
                for x, y in zip(a, b)]
    np.testing.assert_allclose(sanity.ssim(a, b), expected, rtol=1e-10)
    assert sanity.ssim(a[:1], a[:1])[0] == pytest.approx(1.0)


def test_off_classes_are_other_classes_in_range():
    classes = np.arange(10).repeat(30)
    off = sanity.off_classes(classes, 10, seed=3)
    assert np.all(off != classes) and off.min() == 0 and off.max() == 9


def _linear_onnx() -> onnx.ModelProto:
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["hidden"], transB=1, name="first"),
             helper.make_node("Relu", ["hidden"], ["act"]),
             helper.make_node("Gemm", ["act", "w2", "b2"], ["logits"], transB=1, name="second")]
    inits = [numpy_helper.from_array(RNG.normal(size=(8, C * H * W)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.normal(size=8).astype(np.float32), "b"),
             numpy_helper.from_array(RNG.normal(size=(K, 8)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(K, np.float32), "b2")]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C, H, W])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_randomization_cascades_from_the_top_in_a_copy():
    model = _linear_onnx()
    before = model.SerializeToString()
    steps = list(sanity.randomized(model, seed=1))
    assert [name for name, _ in steps] == ["second", "first"]
    assert model.SerializeToString() == before
    values = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for _, m in steps]
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not np.array_equal(values[0]["w2"], original["w2"])
    assert np.array_equal(values[0]["w"], original["w"])
    assert np.array_equal(values[1]["w2"], values[0]["w2"])
    assert not np.array_equal(values[1]["w"], original["w"])


def test_evaluate_end_to_end_table_json_csv(tmp_path):
    model = _linear_onnx()
    ev = evaluate(model, ["gradient"], X, metrics=["region", "pixel", "mprt"],
                  settings=Settings(patch_size=2, regions=10))
    assert ev.methods == ["gradient", "random"]
    assert set(ev.metrics) == {k for k, m in METRICS.items() if m.family in ("region", "pixel", "mprt")}
    data = json.loads(ev.to_json())
    assert data["methods"]["gradient"]["abpc"]["values"] == ev.scores["gradient"]["abpc"].tolist()
    assert len(ev.to_csv().splitlines()) == 1 + 2 * len(ev.metrics) * len(X)
    assert ev.text().splitlines()[0].split()[:2] == ["method", "aopc_morf"]
    assert [name for name, _ in ev.layers["gradient"]] == ["original", "second", "first"]
    assert ev.layers["gradient"][0][1] == pytest.approx(np.ones(len(X)))


def test_digits_cnn_attributions_beat_random():
    """The acceptance of issue 11 on the bundled sample: AOPC(MoRF) of LRP-ε clearly above random."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "models"
    x = np.load(root / "digits_sample.npz")["x"]
    ev = evaluate(root / "digits_cnn.onnx", ["lrp-epsilon"], x, metrics=["region"],
                  settings=Settings(patch_size=1, regions=16))
    assert ev.mean("lrp-epsilon", "aopc_morf")[0] > 2 * ev.mean("random", "aopc_morf")[0]
    assert ev.ranking("aopc_morf")[0] == "lrp-epsilon"


ERRORS = {
    "unknown family": (lambda: evaluate(_linear_onnx(), ["gradient"], X, metrics=["pixels"]),
                       "unknown metric family 'pixels'; choose from " + ", ".join(FAMILIES)),
    "attribution shape": (lambda: pert.pixel_flipping(scorer(), X, A[:, :, :2], CLASSES),
                          "the attribution [3, 1, 2, 6] does not fit the input [3, 1, 5, 6]"),
    "attribution rows": (lambda: pert.pixel_flipping(scorer(), X, A[:2], CLASSES),
                         "the attribution has 2 rows for 3 inputs"),
    "region needs images": (lambda: pert.region_perturbation(scorer(), X[:, 0], A[:, 0], CLASSES),
                            "region perturbation needs image inputs [N, C, H, W]; the input is [3, 5, 6]"),
    "step does not divide": (lambda: pert.pixel_flipping(scorer(), X, A, CLASSES, features_in_step=7),
                             "features_in_step 7 does not divide the input's 30 features"),
    "bad order": (lambda: pert.pixel_flipping(scorer(), X, A, CLASSES, order="mrf"),
                  "order 'mrf' is not one of morf, lerf"),
    "bad baseline": (lambda: pert.pixel_flipping(scorer(), X, A, CLASSES, baseline="mean"),
                     "baseline 'mean' is not one of black, white or a number"),
    "input dtype": (lambda: evaluate(_linear_onnx(), ["gradient"], X.astype(np.int64)),
                    "evaluation needs a float input batch [N, ...] for 'input'; got int64 [3, 1, 5, 6]"),
    "class out of range": (lambda: evaluate(_linear_onnx(), ["gradient"], X, target=[0, 1, 9]),
                           "target classes [0, 1, 9] are not all in 0..3"),
    "output not [rows, classes]": (
        lambda: pert.Scorer(lambda xs: np.zeros((len(xs), 2, 2))).outputs(3, lambda s, e: X[s:e]),
        "evaluation scores a class per row: the model's output is [3, 2, 2] for 3 rows"),
}


@pytest.mark.parametrize("row", ERRORS)
def test_errors_name_the_problem(row):
    call, message = ERRORS[row]
    with pytest.raises(RulegraphError) as info:
        call()
    assert message in str(info.value)
