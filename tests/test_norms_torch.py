"""Normalizations, Einsum and Attention-23 inside exported networks: a GroupNorm + InstanceNorm CNN and
an RMSNorm + scaled-dot-product-attention (causal, grouped-query) + Einsum block, exported by torch's
exporters at the opsets where they write these ops (the TorchScript exporter writes GroupNorm as a
reshaped InstanceNormalization and cannot export RMSNorm; torch.export at opset 18 decomposes
RMSNorm and attention, at opset 23 writes RMSNormalization, GroupNormalization and Attention), and
XCiT's cross-covariance attention, whose F.normalize both exporters write as ReduceL2, Clip, Expand,
Div (read as one LpNormalization, its 1/‖x‖ held constant under ``lrp-transformer``).

Oracles: torch autograd of ``<logits, seed>`` for the gradient; the LRP files' conservation
(attribution plus blamed biases equal to the explained logit, to 1e-3) and ``rulegraph check``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from rulegraph import Explainer
from rulegraph.check import check

torch = pytest.importorskip("torch", reason="needs the [crosscheck] extra (torch)")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

T, D = 5, 8


class GroupNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.c2, self.inorm = nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():   # an affine part that is not the identity
            for p in (self.gn.weight, self.inorm.weight):
                p.uniform_(0.5, 1.5)
            for p in (self.gn.bias, self.inorm.bias):
                p.normal_(0.0, 0.3)

    def forward(self, x):
        h = torch.relu(self.gn(self.c1(x)))
        return self.fc(torch.relu(self.inorm(self.c2(h))).mean((2, 3)))


class RMSAttentionBlock(nn.Module):
    """RMSNorm, causal grouped-query attention (4 query heads, 2 key-value heads), an Einsum head mix."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D)
        # one Linear per head, stacked: no Reshape of a size computed at run time
        self.q = nn.ModuleList(nn.Linear(D, 2) for _ in range(4))
        self.k = nn.ModuleList(nn.Linear(D, 2) for _ in range(2))
        self.v = nn.ModuleList(nn.Linear(D, 2) for _ in range(2))
        self.mix = nn.Parameter(torch.randn(4, 2, D) * 0.5)
        self.out = nn.Linear(D, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (torch.stack([head(h) for head in heads], dim=1) for heads in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)   # [b, 4, T, 2]
        mixed = torch.einsum("bhte,hef->btf", a, self.mix)
        return self.out((x + mixed).mean(1))


class CrossCovarianceAttention(nn.Module):
    """XCiT's (and EdgeNeXt's) cross-covariance attention in small: queries and keys L2-normalized
    over the tokens (``F.normalize``, which torch writes as ReduceL2, Clip, Expand, Div), a
    channel-by-channel attention map, a Linear head."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, 3)
        self.temperature = nn.Parameter(torch.full((1, 1), 2.0))

    def forward(self, x):
        q, k, v = self.qkv(x).transpose(1, 2).chunk(3, dim=1)          # [b, D, T] each
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attention = ((q @ k.transpose(1, 2)) * self.temperature).softmax(-1)   # [b, D, D]
        h = x + self.proj((attention @ v).transpose(1, 2))
        return self.out(h.mean(1))


#: net -> (class, input shape, LRP file, [(exporter, opset)])
NETS = {
    "groupnorm_cnn": (GroupNormCNN, (3, 6, 6), "lrp-epsilon",
                      [("torchscript", 17), ("dynamo", 18), ("dynamo", 23)]),
    "rms_attention": (RMSAttentionBlock, (T, D), "lrp-transformer", [("dynamo", 18), ("dynamo", 23)]),
    "xca": (CrossCovarianceAttention, (T, D), "lrp-transformer", [("torchscript", 17), ("dynamo", 18)]),
}
CASES = [pytest.param(net, exporter, opset, id=f"{net}-{exporter}-{opset}")
         for net, (_, _, _, ways) in NETS.items() for exporter, opset in ways]


def export(model: nn.Module, x, path, exporter: str, opset: int):
    kwargs: dict = {"input_names": ["input"], "output_names": ["logits"], "dynamo": exporter == "dynamo",
                    "opset_version": opset}
    if exporter == "dynamo":
        kwargs.update(external_data=False, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("N", min=1, max=64)},))
    else:
        kwargs.update(dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(model.eval(), (x,), str(path), **kwargs)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    made = {}

    def get(net, exporter, opset):
        if (net, exporter, opset) not in made:
            build, shape, rules, _ = NETS[net]
            torch.manual_seed(0)
            model = build().eval()
            x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
            path = tmp_path_factory.mktemp(net) / f"{exporter}{opset}.onnx"
            made[(net, exporter, opset)] = (model, x, export(model, x, path, exporter, opset), rules)
        return made[(net, exporter, opset)]

    return get


#: the op types each export is expected to contain (what the test is about)
EXPECTED_OPS = {
    ("groupnorm_cnn", "torchscript", 17): {"InstanceNormalization"},
    ("groupnorm_cnn", "dynamo", 18): {"InstanceNormalization"},
    ("groupnorm_cnn", "dynamo", 23): {"GroupNormalization", "InstanceNormalization"},
    ("rms_attention", "dynamo", 18): {"Einsum"},
    ("rms_attention", "dynamo", 23): {"RMSNormalization", "Attention", "Einsum"},
    ("xca", "torchscript", 17): {"ReduceL2"},
    ("xca", "dynamo", 18): {"ReduceL2"},
}


@pytest.mark.parametrize("net, exporter, opset", CASES)
def test_gradient_matches_autograd(exported, net, exporter, opset):
    import onnx

    model, x, path, _ = exported(net, exporter, opset)
    assert EXPECTED_OPS[(net, exporter, opset)] <= {n.op_type for n in onnx.load(str(path)).graph.node}
    seed = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    xg = x.clone().requires_grad_(True)
    (model(xg) * seed).sum().backward()
    (got,) = Explainer(path, "gradient").explain(x.numpy(), target=seed.numpy()).saliency.values()
    want = xg.grad.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("net, exporter, opset", CASES)
def test_lrp_file_conserves(exported, net, exporter, opset):
    model, x, path, rules = exported(net, exporter, opset)
    report = check(path, rules, x=x.numpy())
    assert report.ok, report.to_text()
    result = Explainer(path, rules).explain(x.numpy(), target=[0, 1, 2, 0])
    assert np.all(np.isfinite(result.map))
    assert np.abs(result.relative_delta).max() < 1e-3
