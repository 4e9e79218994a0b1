"""The newer VJP rows inside exported networks: a small causal self-attention block (GPT-2's mask as
``masked_fill``, a Where), RMS normalisation (Pow, Sqrt, Reciprocal or Div), CumSum, Sin, Mish, Exp,
Log, a norm (ReduceL2 or Sqrt of a sum of squares), Min, ReduceMin over a Tile, and DepthToSpace
(PixelShuffle), exported by both torch exporters. Oracle: torch autograd of ``<logits, seed>``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from rulegraph import Explainer

torch = pytest.importorskip("torch", reason="needs the [crosscheck] extra (torch)")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_models as tm
from torch import nn

T, D = 5, 8


class CausalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)
        self.register_buffer("causal", torch.tril(torch.ones(T, T, dtype=torch.bool)))

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(1, 2) / D ** 0.5
        h = torch.softmax(scores.masked_fill(~self.causal, -1e4), dim=-1) @ self.v(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        h = torch.cumsum(torch.sin(h), dim=1) + nn.functional.mish(h)
        h = h + torch.log(torch.exp(0.5 * h) + 1.0) - torch.minimum(h, 0.3 * h.flip(1))
        pooled = h.mean(1) + h.norm(dim=1) + h.repeat(1, 2, 1).amin(1)
        return self.out(pooled)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 8, 3, padding=1), nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        h = nn.functional.pixel_shuffle(torch.tanh(self.conv(x)), 2)
        h = nn.functional.pixel_unshuffle(h * h.sum((2, 3), keepdim=True).abs().sqrt(), 2)
        return self.head(nn.functional.pixel_shuffle(h, 2).flatten(1))


NETS = {"causal_block": (CausalBlock, (T, D)), "shuffle": (ShuffleNet, (2, 4, 4))}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("net", list(NETS))
def test_gradient_matches_autograd(tmp_path, net, dynamo):
    build, shape = NETS[net]
    model = tm.seeded(build).eval()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, *shape, generator=generator)
    seed = torch.randn(4, 3, generator=generator)
    path = tm.export_onnx(model, x, tmp_path / "m.onnx", dynamo=dynamo)
    xg = x.clone().requires_grad_(True)
    (model(xg) * seed).sum().backward()
    got = Explainer(path, "gradient").explain(x.numpy(), target=seed.numpy()).saliency
    (value,) = got.values()
    want = xg.grad.numpy()
    np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
