"""Loops around a pass: integrated gradients, SmoothGrad, occlusion. Each is one batched runtime
call (counted); IG and occlusion agree with Captum on the models/ CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rulegraph import Explainer, RulegraphError
from rulegraph.run.loops import quadrature

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"
X = np.load(ROOT / "models" / "digits_sample.npz")["x"]
TARGETS = list(range(8))


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
                                    "gausslegendre"])
def test_quadrature_integrates_polynomials(method):
    alphas, weights = quadrature(method, 64)
    assert weights.sum() == pytest.approx(1.0)
    assert (weights * alphas).sum() == pytest.approx(0.5, abs=1e-2 if method in ("riemann_left", "riemann_right") else 1e-6)


def test_integrated_gradients_is_one_batched_pass_and_one_forward(ort_runs):
    """The path's points in one relevance pass; x and x' (completeness) through the forward alone."""
    explainer = Explainer(CNN, "gradient")
    explainer.forward(X)   # the forward session exists before counting
    ort_runs.clear()
    result = explainer.explain(X, target=TARGETS, loop="integrated_gradients", steps=64)
    assert len(ort_runs) == 2
    assert result.map.shape == X.shape
    # completeness: Σ attribution → f(x) − f(x') as the quadrature converges
    assert np.abs(result.delta).max() < 1e-2 * np.abs(result.start_value).max()


def test_smoothgrad_and_occlusion_are_one_call_each(ort_runs):
    explainer = Explainer(CNN, "gradient")
    explainer.explain(X, target=TARGETS, loop="smoothgrad", samples=16)
    explainer.explain(X, target=TARGETS, loop="occlusion", patch=2)
    assert len(ort_runs) == 2


def test_smoothgrad_without_noise_is_the_plain_pass():
    explainer = Explainer(CNN, "gradient")
    plain = explainer.explain(X, target=TARGETS)
    smooth = explainer.explain(X, target=TARGETS, loop="smoothgrad", samples=3, noise=0.0)
    np.testing.assert_allclose(smooth.saliency["input"], plain.saliency["input"], rtol=1e-6)
    noisy = [explainer.explain(X, target=TARGETS, loop="smoothgrad", samples=4, seed=s).map for s in (0, 0, 1)]
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert not np.allclose(noisy[0], noisy[2])


def test_bad_loop_parameters():
    with pytest.raises(RulegraphError, match="unknown loop 'integrated_gradient'"):
        Explainer(CNN, "gradient").explain(X, loop="integrated_gradient")
    with pytest.raises(RulegraphError, match="must be a whole number >= 1"):
        Explainer(CNN, "gradient").explain(X, loop="integrated_gradients", steps=0)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
                                    "gausslegendre"])
def test_integrated_gradients_matches_captum(method):
    torch = pytest.importorskip("torch", reason="crosscheck needs the [crosscheck] extra (torch)")
    captum = pytest.importorskip("captum.attr", reason="crosscheck needs the [crosscheck] extra (captum)")
    import sys

    sys.path.insert(0, str(ROOT / "models"))
    from architectures import load_torch

    steps = 32
    ours = Explainer(CNN, "gradient").explain(X, target=TARGETS, loop="integrated_gradients", steps=steps,
                                              method=method).map
    model = load_torch("digits_cnn").double()
    theirs = captum.IntegratedGradients(model).attribute(torch.from_numpy(X).double(), target=torch.arange(8),
                                                         n_steps=steps, method=method).numpy()
    if method == "riemann_trapezoid":  # Captum weights its trapezoid by 1/n, not 1/(n−1)
        ours = ours * (steps - 1) / steps
    scale = np.abs(theirs).max(axis=(1, 2, 3), keepdims=True)
    assert (np.abs(ours - theirs) / scale).max() < 1e-4


@pytest.mark.parametrize("patch,stride", [(2, 1), (3, 2), (4, 3)])
def test_occlusion_matches_captum(patch, stride):
    torch = pytest.importorskip("torch", reason="crosscheck needs the [crosscheck] extra (torch)")
    captum = pytest.importorskip("captum.attr", reason="crosscheck needs the [crosscheck] extra (captum)")
    import sys

    sys.path.insert(0, str(ROOT / "models"))
    from architectures import load_torch

    ours = Explainer(CNN, "gradient").explain(X, target=TARGETS, loop="occlusion", patch=patch, stride=stride).map
    theirs = captum.Occlusion(load_torch("digits_cnn").double()).attribute(
        torch.from_numpy(X).double(), target=torch.arange(8), sliding_window_shapes=(1, patch, patch),
        strides=(1, stride, stride)).numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4


def test_rule_file_loop_header(tmp_path):
    from rulegraph import RuleSyntaxError
    from rulegraph.run import rulefiles as dsl

    ig = dsl.load("integrated-gradients")
    assert ig.loop.name == "integrated_gradients" and ig.loop.params == {"steps": 50.0, "method": "gausslegendre"}
    assert ig.baseline == "zeros"
    assert dsl.load("smoothgrad").loop.params["samples"] == 25
    with pytest.raises(RuleSyntaxError) as info:
        dsl.parse("rulegraph 1\nloop integrated_gradient(steps = 0)\n", source="l.rules")
    assert "l.rules:2:6: unknown loop 'integrated_gradient' (did you mean 'integrated_gradients'?)" in str(info.value)
    with pytest.raises(RuleSyntaxError, match="must be a whole number >= 1"):
        dsl.parse("rulegraph 1\nloop integrated_gradients(steps = 0)\n", source="l.rules")
    with pytest.raises(RuleSyntaxError, match='must be "riemann_left" or'):
        dsl.parse('rulegraph 1\nloop integrated_gradients(method = "simpson")\n', source="l.rules")


def test_bundled_loop_files_run_end_to_end():
    ig = Explainer(CNN, "integrated-gradients").explain(X, target=TARGETS)
    plain_ig = Explainer(CNN, "gradient").explain(X, target=TARGETS, loop="integrated_gradients", steps=50)
    np.testing.assert_allclose(ig.map, plain_ig.map, rtol=1e-5, atol=1e-7)
    sg = Explainer(CNN, "smoothgrad").explain(X, target=TARGETS)
    assert sg.saliency["input"].shape == X.shape


@pytest.mark.parametrize("loop, params", [("integrated_gradients", {"steps": 4}), ("smoothgrad", {"samples": 2}),
                                          ("occlusion", {"patch": 4, "stride": 4})])
def test_a_loop_says_what_it_explained(loop, params, capsys):
    """A loop's Result names the start tensor and class axis as the plain pass does, so the CLI
    summary reads ``class 3 of tensor 'logits' [N, 10] (class axis 1)``, not ``class 3 of :``."""
    from rulegraph.cli import summary

    explainer = Explainer(CNN, "gradient")
    plain = explainer.explain(X[:2], target=[3, 5])
    looped = explainer.explain(X[:2], target=[3, 5], loop=loop, **params)
    assert (looped.explained, looped.class_axis) == (plain.explained, plain.class_axis)
    assert summary(looped).splitlines()[0].startswith("row 0: class 3 of tensor 'logits' [N, 10] (class axis 1): ")


@pytest.mark.parametrize("target, message", [
    (3.7, r"target must be integer class indices for tensor 'logits' \[N, 10\] \(class axis 1\); got 3.7"),
    (True, r"got True \(bool\)"),
    (15, r"target class 15 is out of range for tensor 'logits' \[N, 10\]"),
])
def test_a_loop_checks_its_target_as_a_plain_pass_does(target, message):
    """A float or bool class is never rounded into a class, and an out-of-range class is refused
    before any loop point runs."""
    with pytest.raises(RulegraphError, match=message):
        Explainer(CNN, "gradient").explain(X[:2], target=target, loop="smoothgrad", samples=2)
