"""Each rule against a closed-form numpy replica on a one-node model, in float64 (docs/rules.md, the rules).

The rules run with ``start one`` and a random seed array, so ``a(y)`` is arbitrary; the compiled
explainer runs on onnx's reference evaluator (float64 throughout).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import blip, one_node, seeded_pass

from rulegraph.backward import ops as G
from rulegraph.compile.build import compile_explainer
from rulegraph.errors import Location
from rulegraph.lang.ruleset import Binding, RuleCall, RuleSet, Selector

LOC = Location("test.rules", 1, 1)
RNG = np.random.default_rng(0)
D = TensorProto.DOUBLE


def ruleset(rule: str, params=None, kind: str = "linear", quantity="relevance", bias="blame") -> RuleSet:
    return RuleSet((Binding(Selector("kind", kind), RuleCall(rule, params or {}), LOC),),
                   quantity=quantity, bias=bias, start="one")


W = RNG.normal(size=(5, 4))
B = RNG.normal(size=5)
X = RNG.normal(size=(3, 4))
GEMM = one_node("Gemm", ["x", "W", "B"], {"x": [3, 4]}, {"W": W, "B": B}, transB=1)
S_GEMM = RNG.normal(size=(3, 5))


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("bias", ["absorb", "blame", "total", "ignore"])
def test_normalized_gemm(eps, bias):
    """LRP-ε on a dense layer: ``R_i = x_i Σ_j w_ji s_j``, ``s = a(y) / blip(d)``."""
    z = X @ W.T
    d = z if bias == "ignore" else z + B
    s = S_GEMM / blip(d, eps)
    out = seeded_pass(GEMM, ruleset("normalized", {"eps": eps}, bias=bias), X, S_GEMM)
    np.testing.assert_allclose(out["R"], X * (s @ W), rtol=1e-10, atol=1e-12)
    share = (B * s).sum(axis=1)
    if bias == "blame":
        np.testing.assert_allclose(out["bias"]["the_Gemm"], share, rtol=1e-10)
    if bias in ("blame", "total"):
        np.testing.assert_allclose(out["bias_total"], share, rtol=1e-10)
    else:
        assert out["bias_total"] is None and not out["bias"]


def test_normalized_sign_of_zero_is_positive():
    """``blip(0) = +ε``: a zero pre-activation divides by +ε, not −ε."""
    w = np.array([[1.0, -1.0]])
    model = one_node("MatMul", ["x", "W"], {"x": [1, 2]}, {"W": w.T})
    x = np.array([[2.0, 2.0]])  # z = 0 exactly
    seed = np.array([[1.0]])
    out = seeded_pass(model, ruleset("normalized", {"eps": 0.1}), x, seed)
    np.testing.assert_allclose(out["R"], x * ((seed / 0.1) @ w), rtol=1e-12)


def test_normalized_sum_of_activations_splits_in_proportion():
    """For ``y = x1 + x2`` the rule splits ``a(y)`` in proportion ``x_k / blip(y)``."""
    node = helper.make_node("Add", ["x", "x2"], ["y"], name="add")
    sq = helper.make_node("Mul", ["x", "x"], ["x2"], name="square")
    graph = helper.make_graph([sq, node], "g", [helper.make_tensor_value_info("x", D, [2, 3])],
                              [helper.make_tensor_value_info("y", D, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = RNG.normal(size=(2, 3))
    seed = RNG.normal(size=(2, 3))
    rules = RuleSet((Binding(Selector("op", "Add"), RuleCall("normalized", {"eps": 0.0}), LOC),
                     Binding(Selector("kind", "bilinear"), RuleCall("gradient"), LOC)),
                    quantity="relevance", bias="blame", start="one")
    out = seeded_pass(model, rules, x, seed)
    y = x + x * x
    share_x, share_x2 = x * seed / y, x * x * seed / y
    np.testing.assert_allclose(out["R"], share_x + 2 * x * share_x2, rtol=1e-10)


SIG = one_node("Sigmoid", ["x"], {"x": [2, 5]})
XS = np.array([[-2.0, -0.5, 0.0, 0.7, 3.0], [1.5, -1.0, 0.0, 2.0, -3.0]])
SEED5 = RNG.normal(size=(2, 5))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_ignore_passes_through():
    out = seeded_pass(SIG, ruleset("ignore", kind="nonlinear"), XS, SEED5)
    np.testing.assert_allclose(out["R"], SEED5, rtol=1e-12)


def test_slope_sigmoid_blames_f0():
    """slope: ``a(x) = a(y)(f(x) − f(0))/x``, ``f'(0)`` at 0; ``f(0) = ½`` takes ``½ a(y)``."""
    out = seeded_pass(SIG, ruleset("slope", kind="nonlinear", quantity="importance"), XS, SEED5)
    safe = np.where(XS == 0, 1.0, XS)
    expected = np.where(XS == 0, 0.25, (sigmoid(XS) - 0.5) / safe) * SEED5
    np.testing.assert_allclose(out["R"], XS * expected, rtol=1e-12)
    np.testing.assert_allclose(out["bias"]["the_Sigmoid"], (0.5 * SEED5).sum(axis=1), rtol=1e-12)


@pytest.mark.parametrize("rule", ["slope", "gradient"])
def test_relu_slope_equals_gradient(rule):
    model = one_node("Relu", ["x"], {"x": [2, 5]})
    out = seeded_pass(model, ruleset(rule, kind="nonlinear", quantity="importance"), XS, SEED5)
    np.testing.assert_allclose(out["R"], XS * (XS > 0) * SEED5, rtol=1e-12)
    assert not out["bias"]


def test_repeat_relu_is_deconvnet():
    model = one_node("Relu", ["x"], {"x": [2, 5]})
    out = seeded_pass(model, ruleset("repeat", kind="nonlinear"), XS, SEED5)
    np.testing.assert_allclose(out["R"], np.maximum(SEED5, 0), rtol=1e-12)


def test_gradient_bias_share_is_b_times_a():
    """Under gradient a bias takes ``b ⊙ a(y)``; importance view: attribution ``x ⊙ Wᵀa``."""
    out = seeded_pass(GEMM, ruleset("gradient", quantity="importance"), X, S_GEMM)
    np.testing.assert_allclose(out["R"], X * (S_GEMM @ W), rtol=1e-12)
    np.testing.assert_allclose(out["bias"]["the_Gemm"], (B * S_GEMM).sum(axis=1), rtol=1e-12)


def radial_maxpool_replica(x, seed, k, s):
    """Numpy replica of radial max on a 2-D MaxPool (no padding)."""
    n, c = x.shape[:2]
    out = np.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for i in range(seed.shape[2]):
                for j in range(seed.shape[3]):
                    win = x[b, ch, i * s:i * s + k, j * s:j * s + k]
                    pos = np.maximum(win, 0)
                    if pos.sum() > 0:
                        share = pos / pos.sum()
                    else:  # decision: no positive value -> all to the (first) arg-max
                        share = np.zeros_like(win)
                        share.flat[np.argmax(win)] = 1.0
                    out[b, ch, i * s:i * s + k, j * s:j * s + k] += share * seed[b, ch, i, j]
    return out


@pytest.mark.parametrize("k,s", [(2, 2), (3, 1), (3, 2)])
def test_radial_maxpool(k, s):
    """In float32 on onnxruntime: it has no float64 AveragePool, and onnx's reference evaluator
    returns MaxPool indices without the batch/channel offset for overlapping windows."""
    x = RNG.normal(size=(2, 2, 7, 7))
    x[0, 0, :3, :3] = -np.abs(x[0, 0, :3, :3]) - 0.1  # a window with no positive value
    o = (7 - k) // s + 1
    model = one_node("MaxPool", ["x"], {"x": [2, 2, 7, 7]}, kernel_shape=[k, k], strides=[s, s],
                     elem=TensorProto.FLOAT)
    seed = RNG.normal(size=(2, 2, o, o))
    out = seeded_pass(model, ruleset("radial", kind="max"), x.astype(np.float32), seed.astype(np.float32),
                      "ort")
    np.testing.assert_allclose(out["R"], radial_maxpool_replica(x, seed, k, s), rtol=1e-5, atol=1e-6)


def test_radial_max_of_operands():
    """``max(x, 2x−1)`` elementwise: shares ∝ relu of each operand."""
    lin = helper.make_node("Sub", ["x2", "one"], ["b"], name="sub")
    dbl = helper.make_node("Add", ["x", "x"], ["x2"], name="double")
    mx = helper.make_node("Max", ["x", "b"], ["y"], name="max")
    graph = helper.make_graph([dbl, lin, mx], "g", [helper.make_tensor_value_info("x", D, [2, 4])],
                              [helper.make_tensor_value_info("y", D, [2, 4])],
                              [numpy_helper.from_array(np.array(1.0), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[0.5, 2.0, -1.0, 0.2], [3.0, -0.2, 0.9, 1.5]])
    seed = RNG.normal(size=(2, 4))
    rules = RuleSet((Binding(Selector("kind", "max"), RuleCall("radial"), LOC),
                     Binding(Selector("kind", "linear"), RuleCall("gradient"), LOC)),
                    quantity="relevance", bias="absorb", start="one")
    out = seeded_pass(model, rules, x, seed)
    a, b = np.maximum(x, 0), np.maximum(2 * x - 1, 0)
    total = a + b
    first = np.where(x >= 2 * x - 1, 1.0, 0.0)  # fallback where no operand is positive
    alpha_a = np.where(total > 0, a / np.where(total > 0, total, 1), first)
    alpha_b = np.where(total > 0, b / np.where(total > 0, total, 1), 1 - first)
    np.testing.assert_allclose(out["R"], alpha_a * seed + 2 * alpha_b * seed, rtol=1e-10)


def test_rule_on_wrong_kind_is_a_coverage_error():
    from rulegraph.errors import CoverageError

    with pytest.raises(CoverageError, match=r"node 'the_Sigmoid' \(Sigmoid\) is nonlinear.*accepts linear"):
        compile_explainer(G.load(SIG), RuleSet((Binding(Selector("op", "Sigmoid"),
                                                        RuleCall("normalized", {"eps": 0.0}), LOC),)))


def test_missing_rule_names_node_and_candidates():
    from rulegraph.errors import CoverageError

    with pytest.raises(CoverageError) as info:
        compile_explainer(G.load(SIG), ruleset("gradient", kind="linear"))
    message = str(info.value)
    assert "node 'the_Sigmoid' (Sigmoid), kind nonlinear, has no rule" in message
    assert "`Sigmoid -> ignore`" in message and "slope" in message


def test_radial_max_with_a_constant_operand_blames_it():
    """``max(x, 1)``: the constant is in the window; its share is reported as a bias share."""
    model = one_node("Max", ["x", "c"], {"x": [1, 2]}, {"c": np.array(1.0)})
    out = seeded_pass(model, ruleset("radial", kind="max"), np.array([[0.5, 3.0]]), np.array([[1.0, 1.0]]))
    np.testing.assert_allclose(out["R"], [[0.5 / 1.5, 3.0 / 4.0]], rtol=1e-12)
    np.testing.assert_allclose(out["bias"]["the_Max"], [1.0 / 1.5 + 1.0 / 4.0], rtol=1e-12)
