"""The ReLU-ratio rewrite of the assembled explainer (``rulegraph/compile/simplify.py``).

``(Σₖ f ⊙ cₖ) / blip(z, ε)`` with ``f = z`` or ``f = Relu(z)`` becomes ``(Σₖ cₖ) ⊙ |f| / (|f| + ε)``:
the same value, so each row has an oracle that does not know about the rewrite.

1. **Replica**: LRP-ε with a large ε on an MLP with a residual block (both forms: the ReLU
   inputs, the residual branch and the output), pre-activations exactly 0 and negative included,
   against the closed-form numpy replica in float64.
2. **Unrewritten pass**: on the bundled ResNets under the bundled LRP files, the attribution, the
   bias total and every node's conservation sums equal those of the same explainer with the rewrite
   switched off (float32 rounding apart), and the rewrite fired where the pattern is.
3. **Independent of the outputs**: a relevance also read elsewhere (``at=`` a ReLU output) keeps its
   value, and the map is the same number for number with or without it (``test_latent.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import helper
from oracles import blip, make_model, seeded_pass

from rulegraph import Explainer
from rulegraph.compile import simplify

ROOT = Path(__file__).resolve().parent.parent
EPS = 0.25
RULES = f"""rulegraph 1
quantity relevance
bias blame
linear -> normalized(eps = {EPS})
nonlinear -> ignore
"""


def _mlp():
    """x[4,5] -> Gemm -> Relu -> (Gemm -> Add h1) -> Relu -> Gemm -> y[4,3]; b1 has zeros, so the
    zero row of x gives pre-activations exactly 0."""
    rng = np.random.default_rng(3)
    w1, w2, w3 = rng.normal(size=(6, 5)), rng.normal(size=(6, 6)), rng.normal(size=(3, 6))
    b1 = np.array([0.0, 0.3, -0.4, 0.0, 0.2, 0.0])
    b2, b3 = rng.normal(size=6) * 0.1, rng.normal(size=3) * 0.1
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], transB=1),
             helper.make_node("Relu", ["z1"], ["h1"]),
             helper.make_node("Gemm", ["h1", "w2", "b2"], ["u"], transB=1),
             helper.make_node("Add", ["u", "h1"], ["z2"]),
             helper.make_node("Relu", ["z2"], ["h2"]),
             helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], transB=1)]
    model = make_model(nodes, {"x": [4, 5]}, {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3})
    return model, (w1, b1, w2, b2, w3, b3)


def _replica(x, seed, weights):
    """LRP-ε (bias blame) in float64: ``R_in = in ⊙ Wᵀ(R / blip(z))``, the Add's two inputs
    ``R_k = in_k ⊙ R / blip(Σ)``, the ReLU passing relevance on."""
    w1, b1, w2, b2, w3, b3 = weights
    z1 = x @ w1.T + b1
    h1 = np.maximum(z1, 0)
    u = h1 @ w2.T + b2
    z2 = u + h1
    h2 = np.maximum(z2, 0)
    y = h2 @ w3.T + b3
    r_h2 = h2 * ((seed * y / blip(y, EPS)) @ w3)
    s2 = r_h2 / blip(z2, EPS)
    r_u, r_h1_skip = u * s2, h1 * s2
    r_h1 = h1 * ((r_u / blip(u, EPS)) @ w2) + r_h1_skip
    return x * ((r_h1 / blip(z1, EPS)) @ w1)


def test_replica_with_zero_and_negative_preactivations():
    model, weights = _mlp()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 5))
    x[0] = 0.0
    seed = rng.normal(size=(4, 3))
    z1 = x @ weights[0].T + weights[1]
    assert (z1 == 0).sum() >= 3 and (z1 < 0).sum() >= 3   # both sides of the ReLU, and its kink, occur
    got = seeded_pass(model, RULES, x, seed)["R"]
    want = _replica(x, seed, weights)
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()


def test_rewrite_fires_on_the_mlp():
    """Every ε quotient of the MLP is rewritten: no stabilizer is left (its compare), and the ReLUs'
    inputs are read by the ReLU alone."""
    from oracles import compile_seed  # noqa: F401 (the seed-mode compile used by seeded_pass)
    from rulegraph.backward import ops as G
    from rulegraph.compile.build import compile_explainer
    from rulegraph.run import rulefiles as dsl

    model, _ = _mlp()
    compiled = compile_explainer(G.load(model), dsl.parse(RULES, source="t.rules"), seed_mode=True)
    readers = {name: [n.op_type for n in compiled.model.graph.node if name in n.input] for name in ("z1", "z2")}
    assert readers == {"z1": ["Relu"], "z2": ["Relu"]}
    assert not [n for n in compiled.model.graph.node if n.op_type == "GreaterOrEqual"]


MODELS = {"digits_resnet": ROOT / "models" / "digits_resnet.onnx",
          "resnet20": ROOT / "tests" / "data" / "resnet20_cifar10.onnx"}


def _inputs(path: Path) -> np.ndarray:
    if "digits" in path.name:
        return np.load(ROOT / "models" / "digits_sample.npz")["x"][:3]
    return np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)


def _without_rewrite(monkeypatch):
    monkeypatch.setattr(simplify, "epsilon_ratios", lambda graph, tape: 0)


@pytest.mark.parametrize("rules, fires", [("lrp-epsilon", True), ("lrp-composite", True),
                                          ("gradient", False)])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_same_numbers_as_the_unrewritten_pass(model, rules, fires, monkeypatch):
    path = MODELS[model]
    x = _inputs(path)
    rewritten = Explainer(path, rules)
    got = rewritten.explain(x, target=1, node_sums=True)
    lean = len(Explainer(path, rules).compiled().model.graph.node)
    _without_rewrite(monkeypatch)
    plain = Explainer(path, rules)
    want = plain.explain(x, target=1, node_sums=True)
    full = len(Explainer(path, rules).compiled().model.graph.node)
    assert (lean < full) == fires
    for name, a in want.attribution.items():
        assert np.abs(got.attribution[name] - a).max() <= 1e-6 * np.abs(a).max()
    scale = np.abs(want.start_value).max()
    assert np.abs(got.relative_delta - want.relative_delta).max() <= 1e-5
    assert got.node_sums.keys() == want.node_sums.keys()
    for node, sums in want.node_sums.items():   # (given to the inputs, the outputs', the bias shares')
        for k, value in enumerate(sums):
            if value is None:
                assert got.node_sums[node][k] is None
            else:
                assert np.abs(got.node_sums[node][k] - value).max() <= 1e-5 * scale, (node, k)


def test_a_relevance_read_elsewhere_keeps_its_value(monkeypatch):
    """``at=`` a ReLU output inside a residual block: its number is an output, so the terms that
    make it stay for it; the value is the unrewritten one."""
    path = MODELS["digits_resnet"]
    x = _inputs(path)
    explainer = Explainer(path, "lrp-epsilon")
    relu = next(n.outputs[0] for n in explainer.graph.nodes if n.op_type == "Relu")
    got = explainer.explain(x, target=1, at=[relu])
    _without_rewrite(monkeypatch)
    want = Explainer(path, "lrp-epsilon").explain(x, target=1, at=[relu])
    a = want.at_numbers[relu]
    assert np.abs(got.at_numbers[relu] - a).max() <= 1e-6 * np.abs(a).max()


def _pooled_cnn():
    """x[2,2,8,8] -> Conv -> Relu -> MaxPool(3, stride 2, pad 1: overlapping windows) -> Conv ->
    Relu -> MaxPool(2) -> Flatten -> Gemm -> y[2,3]; zero biases and a zero image give windows of
    tied zeros."""
    rng = np.random.default_rng(11)
    w1, w2, w3 = rng.normal(size=(3, 2, 3, 3)), rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(3, 16))
    b1, b2, b3 = np.array([0.0, 0.2, -0.3]), np.zeros(4), rng.normal(size=3) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["z1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["z1"], ["a1"]),
             helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["z2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["z2"], ["a2"]),
             helper.make_node("MaxPool", ["a2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p2"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1)]
    return make_model(nodes, {"x": [2, 2, 8, 8]}, {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3})


def test_pooled_relu_denominators(monkeypatch):
    """A ReLU before a MaxPool: the relevance at its input is MaxPool's scatter, which vanishes where
    the ReLU's output does, so only the denominator changes; float64, ties of zeros included, the
    same numbers as the unrewritten pass, and no stabilizer left on either ReLU's input."""
    from rulegraph.backward import ops as G
    from rulegraph.compile.build import compile_explainer
    from rulegraph.run import rulefiles as dsl

    model = _pooled_cnn()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 2, 8, 8))
    x[1] = 0.0
    seed = rng.normal(size=(2, 3))
    rules = RULES + "max -> gradient\nroute -> gradient\n"
    compiled = compile_explainer(G.load(model), dsl.parse(rules, source="t.rules"), seed_mode=True)
    stabilized = [n.input[0] for n in compiled.model.graph.node if n.op_type == "GreaterOrEqual"]
    assert "z1" not in stabilized and "z2" not in stabilized
    got = seeded_pass(model, rules, x, seed)
    _without_rewrite(monkeypatch)
    want = seeded_pass(model, rules, x, seed)
    assert np.abs(got["R"] - want["R"]).max() <= 1e-12 * np.abs(want["R"]).max()
    assert np.abs(got["bias_total"] - want["bias_total"]).max() <= 1e-12 * np.abs(want["bias_total"]).max()
