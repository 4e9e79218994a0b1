"""rulegraph's evaluation metrics against Quantus 0.6 (the ``crosscheck`` extra), one row per metric.

A small seeded torch CNN (1×16×16 input, 10 classes) is exported to ONNX; rulegraph's LRP-ε
attributions of it are given to both as ``a_batch`` (and, where Quantus explains again, its
``explain_func`` runs the same rulegraph explainer), and the per-sample numbers agree to 1e-5.

Randomness is matched rather than avoided: ROAD's imputation noise and the faithfulness
correlation's subsets come from numpy's legacy global generator in Quantus, seeded here with
``np.random.seed(s)``; rulegraph draws the same sequence from ``RandomState(s)`` in the same order.
MPRT randomizes layers with torch's ``reset_parameters``, which an ONNX copy cannot replay; the
same randomized networks (Quantus's own layer generator, each exported) are given to rulegraph's
``sanity.mprt``, so the row checks the cascade's similarity (|map|, normalisation, Spearman with
ties, layer order), not the random weights.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="the Quantus comparison needs torch (crosscheck extra)")
# Quantus imports Zennit where it is installed, and Zennit imports torchvision, which has no wheel for
# this torch: Zennit first, through the stand-in the Zennit cross-check uses (benchmarks/zennit_shim.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
try:
    from zennit_shim import load_zennit

    load_zennit()
except ImportError:
    pass
quantus = pytest.importorskip("quantus",
                              reason="the Quantus comparison needs quantus==0.6.0 (crosscheck extra)")

from rulegraph import Explainer  # noqa: E402
from rulegraph.run import perturbation as pert  # noqa: E402
from rulegraph.run import sanity  # noqa: E402

TOL = 1e-5
N = 6


def _network():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10)).eval()


def _onnx(net) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(1, 1, 16, 16),), buffer, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=17, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _explain(model: onnx.ModelProto, x, classes) -> np.ndarray:
    return Explainer(model, "lrp-epsilon").explain(x, target=np.asarray(classes), max_amplification=None).map


@pytest.fixture(scope="module")
def case():
    net = _network()
    model = _onnx(net)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (N, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        predicted = net(torch.from_numpy(x)).argmax(1).numpy()
    y = (predicted + np.arange(N) // 2) % 10  # rows 0-1 the predicted class, the others another one
    a = _explain(model, x, y)
    scorer = pert.Scorer(lambda xs: Explainer(model, "lrp-epsilon").forward(xs)["logits"])
    return {"net": net, "model": model, "x": x, "y": y, "a": a, "scorer": scorer}


def _quantus(metric, c, **kw):
    return metric(model=c["net"], x_batch=c["x"], y_batch=c["y"], a_batch=c["a"], channel_first=True, **kw)


def _pixel_flipping(c, step):
    ours = pert.pixel_flipping(c["scorer"], c["x"], c["a"], c["y"], features_in_step=step)
    theirs = np.array(_quantus(quantus.PixelFlipping(features_in_step=step, disable_warnings=True), c))
    return ours, theirs


def _region(c, patch, order, regions):
    ours = pert.region_perturbation(c["scorer"], c["x"], c["a"], c["y"], patch, order, regions)
    metric = quantus.RegionPerturbation(patch_size=patch, order=order, regions_evaluation=regions,
                                        disable_warnings=True)
    theirs = np.array(_quantus(metric, c))
    return ours, theirs


def _road(c, noise):
    percentages = list(range(1, 100, 7))
    ours = pert.road(c["scorer"], c["x"], c["a"], c["y"], percentages, noise, seed=11).mean(axis=0)
    np.random.seed(11)
    found = _quantus(quantus.ROAD(percentages=percentages, noise=noise, disable_warnings=True), c)
    return ours, np.array([found[p] for p in percentages])


def _correlation(c):
    ours = pert.faithfulness_correlation(c["scorer"], c["x"], c["a"], c["y"], runs=20, subset=32, seed=5)
    np.random.seed(5)
    metric = quantus.FaithfulnessCorrelation(nr_runs=20, subset_size=32, return_aggregate=False,
                                             disable_warnings=True)
    return ours, np.array(_quantus(metric, c, softmax=True))


def _random_logit(c):
    model = c["model"]
    ours = sanity.random_logit(lambda xs, cs: _explain(model, xs, cs), c["x"], c["a"], c["y"], 10, seed=42)

    def explain_func(model, inputs, targets, **kw):
        return _explain(c["model"], np.asarray(inputs), targets)

    metric = quantus.RandomLogit(num_classes=10, seed=42, disable_warnings=True)
    return ours, np.array(_quantus(metric, c, explain_func=explain_func))


def _mprt(c):
    from quantus.helpers.model.pytorch_model import PyTorchModel

    layers = [(name, _onnx(net)) for name, net in
              PyTorchModel(c["net"], channel_first=True).get_random_layer_generator("top_down", seed=42)]
    ours = sanity.mprt(lambda m, xs, cs: _explain(m, xs, cs), [("original", c["model"]), *layers],
                       c["x"], c["a"], c["y"])

    def explain_func(model, inputs, targets, **kw):
        return _explain(_onnx(model), np.asarray(inputs), targets)

    found = _quantus(quantus.MPRT(seed=42, disable_warnings=True), c, explain_func=explain_func)
    assert list(found) == [name for name, _ in ours]
    return np.array([v for _, v in ours]), np.array([found[k] for k in found])


ROWS = {
    "PixelFlipping step 1": lambda c: _pixel_flipping(c, 1),
    "PixelFlipping step 8": lambda c: _pixel_flipping(c, 8),
    "RegionPerturbation morf patch 4": lambda c: _region(c, 4, "morf", 10),
    "RegionPerturbation lerf patch 4": lambda c: _region(c, 4, "lerf", 16),
    "RegionPerturbation morf patch 7 (uneven padding)": lambda c: _region(c, 7, "morf", 9),
    "ROAD noise 0.01": lambda c: _road(c, 0.01),
    "ROAD noise 0.2": lambda c: _road(c, 0.2),
    "FaithfulnessCorrelation": _correlation,
    "RandomLogit": _random_logit,
    "MPRT": _mprt,
}


@pytest.mark.parametrize("row", ROWS)
def test_matches_quantus(row, case):
    ours, theirs = ROWS[row](case)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
