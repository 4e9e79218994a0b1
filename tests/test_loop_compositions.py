"""Loops around every quantity's pass, each row against a float64 numpy replica on a tiny MLP
(``x → Gemm → Relu → Gemm → y``): integrated gradients around importance passes, SmoothGrad around
importance, relevance (SmoothLRP) and difference passes, and the refusals of integrated gradients
where it has no meaning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import blip

from rulegraph import Explainer, RulegraphError
from rulegraph.run.loops import IG_REFUSED, noise_sigma, quadrature, smoothgrad_noise

RNG = np.random.default_rng(7)
W1, B1 = RNG.normal(size=(3, 5)), RNG.normal(size=5) * 0.3
W2, B2 = RNG.normal(size=(5, 2)), RNG.normal(size=2) * 0.3
X = RNG.normal(size=(4, 3)).astype(np.float32)
TARGETS = np.array([0, 1, 1, 0])
EPS = 1e-6


def tiny_mlp() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), n)
             for n, v in (("W1", W1), ("B1", B1), ("W2", W2), ("B2", B2))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["z1"], name="fc1"),
             helper.make_node("Relu", ["z1"], ["h"], name="relu"),
             helper.make_node("Gemm", ["h", "W2", "B2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# float64 replicas of one pass: (attribution [N,3], bias total [N] or None, start value [N]) --------


def _forward(x):
    z1 = x @ W1 + B1
    return z1, np.maximum(z1, 0), np.maximum(z1, 0) @ W2 + B2


def gradient(x, t, xb=None):
    """Saliency ∂y_t/∂x; gradient × input, the bias shares b ⊙ a (blame), start y_t."""
    z1, h, y = _forward(x)
    a_h = W2[:, t].T
    a_x = (a_h * (z1 > 0)) @ W1.T
    bias = (B1 * a_h * (z1 > 0)).sum(axis=1) + B2[t]
    return x * a_x, a_x, bias, y[np.arange(len(x)), t]


def guided(x, t, xb=None):
    """Guided backprop: Relu passes 1[z > 0] · relu(a(h)); bias absorbed."""
    z1, _, y = _forward(x)
    a_x = (np.maximum(W2[:, t].T, 0) * (z1 > 0)) @ W1.T
    return x * a_x, a_x, None, y[np.arange(len(x)), t]


def lrp_epsilon(x, t, xb=None):
    """LRP-ε (Gemm: d = z + b, bias blamed), Relu ignored; start y_t."""
    z1, h, y = _forward(x)
    rows = np.arange(len(x))
    s2 = np.zeros_like(y)
    s2[rows, t] = y[rows, t] / blip(y[rows, t], EPS)
    r_h = h * (s2 @ W2.T)
    s1 = r_h / blip(z1, EPS)
    return x * (s1 @ W1.T), None, (B2 * s2).sum(axis=1) + (B1 * s1).sum(axis=1), y[rows, t]


def deeplift(x, t, xb):
    """DeepLIFT Rescale against ``xb``: C = (x − x') ⊙ m(x); start y_t − y'_t."""
    z1, h, y = _forward(x)
    z1b, hb, yb = _forward(np.broadcast_to(xb, x.shape))
    dz = z1 - z1b
    slope = np.where(np.abs(dz) < 1e-6, (z1 > 0).astype(float), (h - hb) / np.where(dz == 0, 1, dz))
    m_x = (W2[:, t].T * slope) @ W1.T
    rows = np.arange(len(x))
    return (x - xb) * m_x, m_x, None, y[rows, t] - yb[rows, t]


# integrated gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("rules,replica", [("gradient", gradient), ("gradient-x-input", gradient),
                                           ("guided-backprop", guided)])
@pytest.mark.parametrize("method", ["riemann_middle", "riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("baseline", ["zeros", "mean"])
def test_integrated_gradients_around_importance(rules, replica, method, baseline):
    result = Explainer(tiny_mlp(), rules).explain(X, target=TARGETS, loop="integrated_gradients", steps=16,
                                                  method=method, baseline=baseline)
    x = X.astype(np.float64)
    xb = np.zeros_like(x) if baseline == "zeros" else np.broadcast_to(X.mean(axis=0), X.shape).astype(float)
    alphas, weights = quadrature(method, 16)
    rate = sum(w * replica(xb + a * (x - xb), TARGETS)[1] for a, w in zip(alphas, weights))
    np.testing.assert_allclose(result.map, (x - xb) * rate, rtol=1e-5, atol=1e-5 * np.abs(rate).max())
    np.testing.assert_allclose(result.saliency["x"], rate, rtol=1e-5, atol=1e-6)
    # start value f(x) − f(x'); delta is what the quadrature misses of it
    expected_start = replica(x, TARGETS)[3] - replica(xb, TARGETS)[3]
    np.testing.assert_allclose(result.start_value, expected_start, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.delta, ((x - xb) * rate).sum(axis=1) - expected_start, atol=1e-4)


@pytest.mark.parametrize("rules,quantity", [("lrp-epsilon", "relevance"), ("lrp-zplus", "relevance"),
                                            ("deeplift-rescale", "difference")])
def test_integrated_gradients_refused_where_it_has_no_meaning(rules, quantity):
    with pytest.raises(RulegraphError) as info:
        Explainer(tiny_mlp(), rules).explain(X, target=TARGETS, loop="integrated_gradients")
    assert str(info.value) == (f"rules/{rules}.rules: loop integrated_gradients around quantity {quantity}: "
                               f"{IG_REFUSED[quantity]}")
    assert "smoothgrad" in str(info.value) and "integrated-gradients" in str(info.value)


# SmoothGrad ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rules,replica,baseline", [
    ("gradient", gradient, None), ("gradient-x-input", gradient, None), ("guided-backprop", guided, None),
    ("lrp-epsilon", lrp_epsilon, None), ("deeplift-rescale", deeplift, None),
    ("deeplift-rescale", deeplift, "mean")])
def test_smoothgrad_around_every_quantity(rules, replica, baseline):
    explainer = Explainer(tiny_mlp(), rules)
    samples, noise, seed = 6, 0.3, 3
    result = explainer.explain(X, target=TARGETS, loop="smoothgrad", samples=samples, noise=noise, seed=seed,
                               baseline=baseline)
    draws = smoothgrad_noise({"x": X}, ["x"], samples, seed)["x"]
    sigma = noise_sigma(X, noise)
    copies = [(X + (draws[s] * sigma).astype(np.float32)).astype(np.float64) for s in range(samples)]
    xb = 0.0 if baseline is None else X.mean(axis=0).astype(np.float64)
    per_copy = [replica(c, TARGETS, xb) for c in copies]
    mean_map = np.mean([p[0] for p in per_copy], axis=0)
    scale = np.abs(mean_map).max()
    np.testing.assert_allclose(result.map, mean_map, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(result.start_value, np.mean([p[3] for p in per_copy], axis=0), rtol=1e-5,
                               atol=1e-5)
    if per_copy[0][2] is not None and explainer.ruleset.bias == "blame":
        np.testing.assert_allclose(result.bias_total, np.mean([p[2] for p in per_copy], axis=0), rtol=1e-4,
                                   atol=1e-5)
    if rules in ("lrp-epsilon", "deeplift-rescale", "gradient-x-input"):  # conserving passes, conserving mean
        assert np.abs(result.delta).max() < 1e-4 * np.abs(result.start_value).max()


@pytest.mark.parametrize("rules", ["gradient", "lrp-epsilon", "deeplift-rescale"])
def test_smoothgrad_without_noise_is_the_plain_pass(rules):
    explainer = Explainer(tiny_mlp(), rules)
    plain = explainer.explain(X, target=TARGETS)
    smooth = explainer.explain(X, target=TARGETS, loop="smoothgrad", samples=3, noise=0.0)
    np.testing.assert_allclose(smooth.map, plain.map, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(smooth.delta, plain.delta, atol=1e-6)
    assert smooth.bias_shares.keys() == plain.bias_shares.keys()


def test_smoothgrad_around_deeplift_takes_the_baseline_of_the_real_input():
    xb = np.full(3, 0.25, dtype=np.float32)
    result = Explainer(tiny_mlp(), "deeplift-rescale").explain(X, target=TARGETS, loop="smoothgrad",
                                                              samples=2, noise=0.0, baseline=xb)
    expected = deeplift(X.astype(np.float64), TARGETS, xb.astype(np.float64))
    np.testing.assert_allclose(result.map, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.start_value, expected[3], rtol=1e-5, atol=1e-6)


# occlusion: forward only -------------------------------------------------------------------------


def test_occlusion_is_the_same_whatever_the_rule_file():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cnn, x = root / "models" / "digits_cnn.onnx", np.load(root / "models" / "digits_sample.npz")["x"][:3]
    maps = [Explainer(cnn, rules).explain(x, target=[0, 1, 2], loop="occlusion", patch=4, stride=4).map
            for rules in ("gradient", "lrp-epsilon", "deeplift-rescale")]
    np.testing.assert_array_equal(maps[0], maps[1])
    np.testing.assert_array_equal(maps[0], maps[2])


@pytest.mark.parametrize("loop,params", [("integrated_gradients", {"steps": 8}),
                                         ("smoothgrad", {"samples": 4, "noise": 0.5})])
@pytest.mark.parametrize("target", [-1, "argmax"])
def test_negative_target_is_the_argmax_of_the_real_input(loop, params, target):
    explainer = Explainer(tiny_mlp(), "gradient")
    argmax = _forward(X.astype(np.float64))[2].argmax(axis=1)
    by_sign = explainer.explain(X, target=target, loop=loop, **params)
    by_class = explainer.explain(X, target=argmax, loop=loop, **params)
    np.testing.assert_array_equal(by_sign.target, argmax)
    np.testing.assert_array_equal(by_sign.map, by_class.map)


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients:UserWarning",
                            "ignore:Setting backward hooks on ReLU activations:UserWarning")
def test_smoothgrad_around_lrp_is_the_mean_of_captums_lrp_maps(captum_attr, torch, tm):
    """SmoothLRP on the digits CNN: the mean, over the same noisy copies, of Captum's LRP-ε maps
    (Captum's ``LRP`` with ``EpsilonRule`` and the gradient max-pool rule: the configuration
    ``test_crosscheck.test_lrp_epsilon_matches_captum`` shows equal to ``lrp-epsilon``)."""
    import sys
    from pathlib import Path

    from test_crosscheck import DIGIT_TARGETS, LRP_RTOL, _captum_lrp, row_errors

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "models"))
    from architectures import load_torch

    x = np.load(root / "models" / "digits_sample.npz")["x"].astype(np.float32)
    samples, noise, seed = 4, 0.1, 2
    ours = Explainer(root / "models" / "digits_cnn.onnx", "lrp-epsilon").explain(
        x, target=DIGIT_TARGETS, loop="smoothgrad", samples=samples, noise=noise, seed=seed).map
    draws = smoothgrad_noise({"input": x}, ["input"], samples, seed)["input"]
    copies = x[None] + (draws * noise_sigma(x, noise)).astype(np.float32)
    model = load_torch("digits_cnn")
    maps = [_captum_lrp(captum_attr, torch, tm, model, c, 1e-6, maxpool="gradient") for c in copies]
    theirs = np.mean(maps, axis=0)
    assert row_errors(ours, theirs).max() <= LRP_RTOL
