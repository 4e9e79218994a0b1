"""Amplification (rulegraph/amplification.py): Σ|attribution| / |start value| end to end and the
per-node factor Σ|view given to the inputs| / Σ|view of the outputs|, measured by ``check`` from one
run and warned about by ``explain``. Oracles: a float64 numpy replica of LRP-0 on a two-layer ReLU
network, and closed forms on one linear layer."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from oracles import make_model

from rulegraph import Explainer
from rulegraph.check import check
from rulegraph.cli import main
from rulegraph.errors import RulegraphWarning
from rulegraph.run.amplification import DEFAULT_MAX_AMPLIFICATION

F = TensorProto.FLOAT


def two_layer(w1: np.ndarray, w2: np.ndarray):
    """x [N, a] -> MatMul w1 -> Relu -> MatMul w2 -> y [N, c], no biases."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="layer1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="layer2")]
    consts = {"w1": w1.astype(np.float32), "w2": w2.astype(np.float32)}
    return make_model(nodes, {"x": ["N", w1.shape[0]]}, consts, elem=F)


def safe(a, b):
    """a / b, 0 where b = 0 (LRP-0 loses nothing there: a is 0 too)."""
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def lrp0_replica(x, w1, w2):
    """float64 LRP-0 from the arg-max logit: (Σ|R_x|, Σ|R_r|, |y_t|) per row."""
    x, w1, w2 = (np.asarray(v, dtype=np.float64) for v in (x, w1, w2))
    r = np.maximum(x @ w1, 0)
    y = r @ w2
    t = y.argmax(axis=1)
    rows = np.arange(len(x))
    ry = np.zeros_like(y)
    ry[rows, t] = y[rows, t]
    rr = r * (safe(ry, y) @ w2.T)                   # layer2: R_r = r ⊙ W2 (R_y / z), 0 where z = 0
    rx = x * (safe(rr, x @ w1) @ w1.T)              # the Relu passes R unchanged
    return np.abs(rx).sum(axis=1), np.abs(rr).sum(axis=1), np.abs(y[rows, t])


RNG = np.random.default_rng(7)
CASES = {
    # name: (x, w1, w2)
    "mild": (RNG.uniform(0.1, 1, (3, 4)), np.abs(RNG.normal(size=(4, 5))), RNG.normal(size=(5, 3))),
    # the two hidden units carry +1000 and -999 towards the logit: it is 1 by cancellation
    "cancelling": (np.array([[1.0, 1.0], [1.0, 0.5]]), np.eye(2), np.array([[1000.0, 0.1], [-999.0, 0.1]])),
    "mixed signs": (RNG.normal(size=(4, 6)), RNG.normal(size=(6, 6)) * 3, RNG.normal(size=(6, 4))),
}


@pytest.mark.parametrize("name", CASES)
def test_measured_amplification_matches_the_replica(name):
    x, w1, w2 = CASES[name]
    sum_x, sum_r, start = lrp0_replica(x, w1, w2)
    assert np.all(start > 1e-3)  # every row explains a logit that is not 0
    report = check(two_layer(w1, w2), "lrp-0", x=x.astype(np.float32), max_amplification=1e12)
    nodes = {n.node: n.amplification for n in report.nodes}
    np.testing.assert_allclose(report.amplification, np.max(sum_x / start), rtol=1e-4)
    np.testing.assert_allclose(nodes["layer2"], np.max(sum_r / start), rtol=1e-4)
    np.testing.assert_allclose(nodes["relu"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(nodes["layer1"], np.max(safe(sum_x, sum_r)), rtol=1e-4)


def one_linear(w):
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="lin")], {"x": ["N", len(w)]},
                      {"w": np.asarray(w, dtype=np.float32)}, elem=F)


# y = 1000 x1 − 999 x2 at x = (1, 1): y = 1; LRP-0 and gradient × input give (1000, −999): A = 1999
CANCELLING = one_linear([[1000.0], [-999.0]])
X1 = np.ones((1, 2), dtype=np.float32)
A_CANCELLING = 1999.0


@pytest.mark.parametrize("limit, passes", [(A_CANCELLING * 1.01, True), (A_CANCELLING * 0.99, False),
                                           (DEFAULT_MAX_AMPLIFICATION, False)])
def test_check_fails_above_the_limit_and_names_the_node(limit, passes):
    report = check(CANCELLING, "lrp-0", x=X1, max_amplification=limit)
    props = {name: (ok, detail) for name, ok, detail in report.properties()}
    ok, detail = props["amplification: end to end"]
    assert ok is passes and report.ok is passes
    np.testing.assert_allclose(report.amplification, A_CANCELLING, rtol=1e-5)
    assert "node 'lin' (MatMul, normalized(eps = 0))" in detail
    doc = json.loads(report.to_json())
    assert doc["max_amplification"] == limit and doc["end_to_end"]["amplification"] == report.amplification
    assert [n["amplification"] for n in doc["nodes"]] == [report.amplification]


def test_worst_node_first():
    x, w1, w2 = CASES["cancelling"]
    report = check(two_layer(w1, w2), "lrp-0", x=x.astype(np.float32))
    sum_x, sum_r, start = lrp0_replica(x, w1, w2)
    gains = {"layer2": np.max(sum_r / start), "layer1": np.max(sum_x / sum_r)}
    expected = sorted((g for g in gains if gains[g] > 1), key=lambda g: -gains[g])
    assert [n.node for n in report.amplifying_nodes()] == expected
    assert not report.ok and "grows most at node 'layer2'" in report.to_text()


@pytest.mark.parametrize("rules, limit, warns", [
    ("lrp-0", DEFAULT_MAX_AMPLIFICATION, True),
    ("gradient-x-input", DEFAULT_MAX_AMPLIFICATION, True),
    ("lrp-0", 2500.0, False),
    ("lrp-0", None, False),
])
def test_explain_warns_in_one_line_naming_the_value(rules, limit, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Explainer(CANCELLING, rules).explain(X1, max_amplification=limit)
    mine = [w for w in caught if issubclass(w.category, RulegraphWarning)]
    assert len(mine) == (1 if warns else 0)
    np.testing.assert_allclose(np.abs(result.map).sum() / abs(result.start_value[0]), A_CANCELLING, rtol=1e-5)
    if warns:
        text = str(mine[0].message)
        assert "\n" not in text and f"= {A_CANCELLING:.4g} in row 0 (limit 100)" in text


def test_explain_does_not_warn_on_a_map_without_cancellation():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RulegraphWarning)
        Explainer(one_linear([[2.0], [3.0]]), "lrp-0").explain(X1)


def test_loops_do_not_warn():
    """A loop's passes run on points that are not the user's input: no amplification warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RulegraphWarning)
        Explainer(CANCELLING, "gradient").explain(X1, loop="smoothgrad", samples=4)


@pytest.mark.parametrize("limit, code", [("3000", 0), ("100", 1)])
def test_cli_max_amplification(tmp_path, capsys, limit, code):
    model, x = tmp_path / "m.onnx", tmp_path / "x.npy"
    model.write_bytes(CANCELLING.SerializeToString())
    np.save(x, X1)
    args = ["check", str(model), "--rules", "lrp-0", "--input", str(x), "--max-amplification", limit]
    assert main(args) == code
    assert f"(limit {limit})" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# the real CIFAR ResNet20 (tests/data/README.md): a map that conserves by cancellation

RESNET20 = Path(__file__).resolve().parent / "data" / "resnet20_cifar10.onnx"


def _cifar_like(n: int = 4) -> np.ndarray:
    """Blocky images with pixels in 0..1, normalized as the model expects (ImageNet mean/std)."""
    img = np.random.default_rng(0).uniform(size=(n, 3, 8, 8)).repeat(4, 2).repeat(4, 3)
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    return ((img - mean) / std).astype(np.float32)


def test_gamma_on_resnet20_conserves_by_cancellation_and_check_fails():
    """LRP-γ on every convolution: the second convolution of each block feeds the residual Add
    before any Relu, so its outputs have both signs; where the Add hands a negative output a
    share, γ's denominator passes through 0. On these 4 inputs (measured): Σ|attribution| is 1.5e5
    times the logit, the sum misses it by 6 % (float32 cancellation), and the three nodes that grow
    most (×43, ×26, ×20) are convolutions that feed an Add."""
    report = check(RESNET20, "lrp-gamma", x=_cifar_like())
    props = {name: ok for name, ok, _ in report.properties()}
    assert props["amplification: end to end"] is False and report.amplification > 1e3
    worst = report.amplifying_nodes(3)
    nodes = onnx.load(str(RESNET20)).graph.node
    feeds_add = {i for n in nodes if n.op_type == "Add" for i in n.input}
    graph_nodes = {n.name: n for n in nodes}
    assert all(n.op_type == "Conv" and graph_nodes[n.node].output[0] in feeds_add for n in worst), worst


def test_composite_on_resnet20_is_sound():
    """The bundled composite (Zennit's EpsilonPlusFlat: z⁺ convolutions) on the same inputs:
    conservation within the default tolerance and no amplification (measured: relative delta
    7e-6, Σ|attribution| / |logit| 0.71; the biases take the rest)."""
    report = check(RESNET20, "lrp-composite", x=_cifar_like())
    assert report.ok, report.to_text()
    assert report.amplification < 1 and report.measured < 1e-4
