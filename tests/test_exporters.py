"""The same network exported by torch.onnx.export with dynamo=False (TorchScript, opset 17) and
dynamo=True (torch.export, opset 18) gets the same attribution, whatever the exporter wrote
(Gemm vs MatMul + Add, Flatten vs Reshape, folded or kept BatchNorm, functional ops)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from rulegraph import Explainer

torch = pytest.importorskip("torch", reason="crosscheck needs the [crosscheck] extra (torch)")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
import torch_models as tm
from architectures import load_torch

NETS = {  # name -> (build, input shape without the batch axis; None: the digit samples)
    "digits_cnn": (lambda: load_torch("digits_cnn"), None),
    "digits_resnet": (lambda: load_torch("digits_resnet"), None),
    "functional": (lambda: tm.seeded(tm.FunctionalNet), (2, 12, 12)),
    "pool": (lambda: tm.seeded(tm.PoolNet), (3, 12, 12)),
    "activations": (lambda: tm.seeded(tm.ActNet), None),
}
RULES = ["gradient", "gradient-x-input", "lrp-epsilon", "lrp-gamma", "deeplift-rescale"]
# Pinned, not hidden: LRP-γ on the digits ResNet is ill-conditioned (near-zero denominators make
# Σ|R| many times the logit, with bias shares of opposite sign; README "Rule files"), so the
# float32 rounding that differs between a BatchNorm folded by one exporter and kept by the other
# shows at 1e-3. The test asserts the amplification that explains it.
ILL_CONDITIONED = {("digits_resnet", "lrp-gamma"): 3e-3}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = {}
    x = torch.from_numpy(np.load(Path(__file__).resolve().parent.parent / "models" / "digits_sample.npz")["x"])
    generator = torch.Generator().manual_seed(0)
    for name, (build, shape) in NETS.items():
        model = build()
        folder = tmp_path_factory.mktemp(name)
        example = x if shape is None else torch.randn(4, *shape, generator=generator)
        out[name] = (example.numpy(), [tm.export_onnx(model, example, folder / f"{d}.onnx", dynamo=d)
                                       for d in (False, True)])
    return out


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("net", list(NETS))
def test_both_exporters_give_the_same_attribution(exports, net, rules):
    x, (torchscript, dynamo) = exports[net]
    try:
        a = Explainer(torchscript, rules).explain(x, target="argmax")
    except Exception as exc:  # noqa: BLE001 (a rule file may not fit this net; then neither export may)
        with pytest.raises(type(exc)):
            Explainer(dynamo, rules).explain(x, target="argmax")
        pytest.skip(f"{rules} does not apply to {net}: {str(exc).splitlines()[0][:100]}")
    b = Explainer(dynamo, rules).explain(x, target="argmax")
    np.testing.assert_array_equal(a.target, b.target)
    scale = np.abs(a.map).reshape(len(x), -1).max(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
    tolerance = ILL_CONDITIONED.get((net, rules), 1e-4)
    assert (np.abs(a.map - b.map) / scale).max() < tolerance
    if (net, rules) in ILL_CONDITIONED:
        assert np.abs(a.map).reshape(len(x), -1).sum(axis=1).max() > 5 * np.abs(a.start_value).max()
