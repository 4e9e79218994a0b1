"""Defects found on the transformers rows of the architecture table (benchmarks/architectures.py),
each reproduced on the smallest torch model that shows it, exported by both torch exporters
(``dynamo=False``: TorchScript, opset 17; ``dynamo=True``: torch.export, opset 18), batch 2.

1. A mixture-of-experts router (Mixtral; Qwen2-MoE with ``norm_topk_prob``): softmax over the
   experts, the top k (``TopK``, unknown to rulegraph before) renormalized by their sum, weighing
   the chosen experts' outputs. The gradient file equals autograd; under ``lrp-transformer`` the
   routing weights are held constant as attention weights are (CP-LRP), so the model is linear in
   its input and LRP at ε = 0 is Gradient × Input of that linear model (the weights detached in
   torch), the biases taking the rest. Before, the renormalizing ``Div`` was refused ("a quotient
   a/b is not linear in its divisor b"): its numerator was seen as a Softmax output, its divisor
   (a sum of the same weights) not.
2. Norms of activations (SwinV2's cosine attention ``q / ‖q‖`` by ``F.normalize``, ConvNeXtV2's global
   response normalization ``x ⊙ ‖x‖ / mean ‖x‖``): ``ReduceL2`` had no rule in ``lrp-transformer``
   (CoverageError). Now the normalizing factor is held constant (``uniform(norm_constant = 1)``, the
   norm itself ``block``), as LayerNorm's σ is: the gradient file equals autograd, lrp-transformer
   conserves, and at ε = 0 it is Gradient × Input of the model with the attention weights and the
   norms detached.
3. Softmax written out by hand: attention weights ``exp(s − max) / Σ exp(s − max)`` and RWKV's WKV
   recurrence (running maximum, numerator and denominator of exponentials). Under
   ``lrp-transformer`` the products of exponentials and values split half and half, and the half
   sent into the exponentials ran into their arguments ``k − max``, which are 0 at the maximum:
   RWKV's row lost five times the logit at ε = 0. Now an operand computed from Exp outputs is held
   constant (``uniform(exp_constant = 1)``), as a Softmax's output is: the model is linear in its
   values, lrp-transformer conserves, and at ε = 0 it is Gradient × Input of the model with the
   exponentials detached.
4. Token ids read time-major (XLNet: ``ids.transpose(0, 1)`` before the lookup): the Transpose
   between the ids and the embedding lookup now keeps it a token source, its order undone on the
   per-token attribution, which equals autograd's gradient × input per token. Likewise a Slice that
   keeps every id (XLM's ``input_ids[:, -length:]``).
5. A class token read back from a constant slot (TimeSformer's embeddings: ``Concat(cls, patches)``
   plus a position embedding over ``[batch · frames, tokens, D]``, then ``embeddings[:batch, 0]``,
   the first rows' class token, the same constant for every sample). Taken for active, every
   sample's class-token relevance flowed into the first rows, which belong to other samples: the
   per-sample sums missed by 1.7 of the logit. Now a Slice or Gather that reads only constant
   slots of an active tensor is a constant (``graph/slots.py``); in the TorchScript export the class
   token's Expand shape is computed at run time, its size read from the shape's known entries.
6. Per-node sums (``rulegraph check``, ``node_sums``) across a fused qkv (timm's ViT, TimeSformer:
   ``[N, T, 3, H, D] -> [3, N, H, T, D]``) where the export's inferred shapes lost the batch symbol:
   the sums were taken over rows of the q/k/v axis and showed gaps of 0.6 of the logit at nodes
   that conserve; likewise after a bidirectional LSTM's ``[T, N, 2, H] -> [T, N, 2H]`` (Sequencer2D).
   The batch axis is now followed from the inputs through Transpose, Gather, Squeeze, Unsqueeze,
   Split and the Reshapes that keep the axes up to it (``targets.batch_axes``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import rulegraph
from rulegraph.run import rulefiles as dsl

torch = pytest.importorskip("torch", reason="the defects are reproduced on torch models ([crosscheck] extra)")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
nn = torch.nn
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_models as tm  # noqa: E402

EXPORTERS = {"torchscript": False, "dynamo": True}
TARGET = [0, 2]

#: lrp-transformer with every ε at 0: LRP-0, exact up to float32 rounding
LRP_TRANSFORMER_EPS0 = ('rulegraph 1\ninclude "lrp-transformer"\nlinear -> normalized(eps = 0)\n'
                        "bilinear -> uniform(eps = 0, softmax_constant = 1, gate_constant = 1, "
                        "norm_constant = 1, exp_constant = 1)\n")


def _exported(cls, folder: Path):
    """(the seeded model, an input [2, 5, 6], its export by each exporter)."""
    net = tm.seeded(cls)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    return net, x, {name: tm.export_onnx(net, x, folder / f"{name}.onnx", dynamo)
                    for name, dynamo in EXPORTERS.items()}


class Router(nn.Module):
    """Tokens [N, T, 6] -> hidden 8 -> a dense bank of 4 experts (one Linear, [N, T, 4, 8]); the
    router's softmax over the experts, its top 2 divided by their sum, weigh the two chosen experts
    (GatherElements by the top-k indices); mean over tokens, 3 classes. ``held``: the routing
    weights detached (the model LRP explains)."""

    def __init__(self, held: bool = False):
        super().__init__()
        self.held = held
        self.embed, self.gate = nn.Linear(6, 8), nn.Linear(8, 4, bias=False)
        self.experts, self.head = nn.Linear(8, 4 * 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        weights, chosen = torch.softmax(self.gate(h), -1).topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.held:
            weights = weights.detach()
        experts = self.experts(h).unflatten(-1, (4, 8))
        picked = experts.gather(2, chosen[..., None].expand(-1, -1, -1, 8))
        return self.head((weights[..., None] * picked).sum(2).mean(1))


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    return _exported(Router, tmp_path_factory.mktemp("router"))


def _input_gradient(net, x) -> np.ndarray:
    xg = x.clone().requires_grad_(True)
    net(xg)[[0, 1], TARGET].sum().backward()
    return xg.grad.numpy()




class CosineGRN(nn.Module):
    """Tokens [N, T, 6] -> hidden 8 -> SwinV2's cosine attention (``F.normalize`` of q and k, a
    constant logit scale) as a residual -> ConvNeXtV2's GRN over the tokens (``vector_norm``, divided
    by its mean over channels; ``γ ⊙ (h ⊙ n) + β + h``) -> mean over tokens, 3 classes. ``held``: the
    attention weights and the GRN factor ``n`` detached (the model LRP explains)."""

    def __init__(self, held: bool = False):
        super().__init__()
        self.held = held
        self.embed, self.qkv, self.head = nn.Linear(6, 8), nn.Linear(8, 24), nn.Linear(8, 3)
        self.gamma, self.beta = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        scores = nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(k, dim=-1).transpose(1, 2)
        weights = torch.softmax(scores * 10.0, -1)
        h = h + (weights.detach() if self.held else weights) @ v
        norm = torch.linalg.vector_norm(h, dim=1, keepdim=True)
        n = norm / (norm.mean(-1, keepdim=True) + 1e-6)
        h = self.gamma * (h * (n.detach() if self.held else n)) + self.beta + h
        return self.head(h.mean(1))


@pytest.fixture(scope="module")
def cosine_grn(tmp_path_factory):
    return _exported(CosineGRN, tmp_path_factory.mktemp("cosine_grn"))


class HandSoftmax(nn.Module):
    """Tokens [N, T, 6] -> hidden 8 -> attention with its softmax written out (``exp(s − max)``
    divided by its sum) as a residual -> RWKV's WKV over time (transformers' ``RwkvSelfAttention``
    CPU path: running maximum ``m``, numerator and denominator states of ``exp`` weights, output
    ``num / den``) -> mean over tokens, 3 classes. ``held``: every exponential detached."""

    def __init__(self, held: bool = False):
        super().__init__()
        self.held = held
        self.embed, self.qkv, self.kv, self.head = nn.Linear(6, 8), nn.Linear(8, 24), nn.Linear(8, 16), nn.Linear(8, 3)
        self.decay, self.first = nn.Parameter(-torch.rand(8)), nn.Parameter(torch.randn(8))

    def exp(self, x):
        return torch.exp(x).detach() if self.held else torch.exp(x)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        scores = q @ k.transpose(1, 2)
        e = self.exp(scores - scores.amax(-1, keepdim=True))
        h = h + (e / e.sum(-1, keepdim=True)) @ v
        key, value = self.kv(h).chunk(2, -1)
        num = den = torch.zeros_like(key[:, 0])
        m = torch.full_like(key[:, 0], -1e38)
        out = []
        for t in range(key.shape[1]):
            kt, vt = key[:, t], value[:, t]
            mo = torch.maximum(m, kt + self.first)
            e1, e2 = self.exp(m - mo), self.exp(kt + self.first - mo)
            out.append((e1 * num + e2 * vt) / (e1 * den + e2))
            ms = torch.maximum(m + self.decay, kt)
            e1, e2 = self.exp(m + self.decay - ms), self.exp(kt - ms)
            num, den, m = e1 * num + e2 * vt, e1 * den + e2, ms
        return self.head(torch.stack(out, 1).mean(1))


@pytest.fixture(scope="module")
def hand_softmax(tmp_path_factory):
    return _exported(HandSoftmax, tmp_path_factory.mktemp("hand_softmax"))


class FramesWithClassToken(nn.Module):
    """Frames [N, F, 6] -> tokens [N·F, 2, 8] (a Linear) -> a class token concatenated in front, a
    position embedding added -> the class token read back as ``[:N, 0]`` (TimeSformer) beside the
    patch tokens regrouped per sample [N, F·2, 8] -> Linear -> mean -> 3 classes."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.cls, self.pos = nn.Parameter(torch.randn(1, 1, 8)), nn.Parameter(torch.randn(1, 3, 8))

    def forward(self, x):
        n, f = x.shape[:2]
        tokens = self.embed(x.reshape(n * f, 2, 3))                                   # [N·F, 2, 8]
        emb = torch.cat((self.cls.expand(n * f, -1, -1), tokens), dim=1) + self.pos   # [N·F, 3, 8]
        cls = emb[:n, 0].unsqueeze(1)                                                 # [N, 1, 8]
        h = torch.cat((cls, emb[:, 1:].reshape(n, f * 2, 8)), dim=1)
        return self.head(torch.relu(self.mix(h)).mean(1))


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_a_class_token_read_from_a_constant_slot_is_a_constant(tmp_path, exporter):
    """LRP-0 conserves per sample (before: 0.3 of the logit moved between samples), the Gather of the
    class token is no active node, and the gradient is autograd's. The TorchScript export computes
    the class token's Expand shape at run time (``Where(Equal(shape, -1), 1, shape)``): its size
    along the tokens is read from the shape's known entries."""
    net = tm.seeded(FramesWithClassToken).eval()
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    path = tm.export_onnx(net, x, tmp_path / "frames.onnx", EXPORTERS[exporter])
    explainer = rulegraph.Explainer(path, "lrp-0")
    result = explainer.explain(x.numpy(), target=TARGET)
    assert np.abs(result.relative_delta).max() < 1e-5
    gathers = [n for n in explainer.graph.nodes if n.op_type == "Gather" and n.inputs[0] in explainer.graph.active]
    assert not any(n.outputs[0] in explainer.graph.active for n in gathers)
    saliency = rulegraph.Explainer(path, "gradient").explain(x.numpy(), target=TARGET).saliency["input"]
    expected = _input_gradient(net, x)
    assert np.abs(saliency - expected).max() <= 1e-5 * np.abs(expected).max()


class TimeMajorTokens(nn.Module):
    """Token ids [N, T] read time-major as XLNet reads them (``ids.transpose(0, 1)``, then the
    lookup: [T, N, 8]), a position-dependent mix over time, 3 classes. Before, the lookup was not
    a token source (the Transpose between ids and lookup) and the model had no float input to
    explain ("output 'logits' does not depend on a float input")."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(50, 8), nn.Linear(7, 1), nn.Linear(8, 3)

    def forward(self, ids):
        h = torch.tanh(self.embed(ids.transpose(0, 1)))              # [T, N, 8]
        return self.head(self.mix(h.permute(1, 2, 0)).squeeze(-1))   # [N, 8, T] -> [N, 8] -> [N, 3]


class SlicedTokens(nn.Module):
    """Token ids cut to their own length before the lookup, as XLM does (``ids[:, -length:]``; the
    TorchScript export keeps the Slice, its starts from ``Shape``), a mix over time, 3 classes.
    Before, the Slice between ids and lookup hid the token source ("output 'logits' does not depend
    on a float input")."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(50, 8), nn.Linear(7, 1), nn.Linear(8, 3)

    def forward(self, ids):
        h = torch.tanh(self.embed(ids[:, -ids.shape[1]:]))                         # [N, T, 8]
        return self.head(self.mix(h.transpose(1, 2)).squeeze(-1))


#: (model, how its embeddings' gradient × input per token is laid out as [N, T])
TOKEN_MODELS = {"time-major": (TimeMajorTokens, lambda per_token: per_token.transpose(0, 1)),
                "sliced": (SlicedTokens, lambda per_token: per_token)}


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("model", list(TOKEN_MODELS))
def test_token_ids_read_through_a_route_gradient_x_input_equals_autograd(tmp_path, model, exporter):
    cls, layout = TOKEN_MODELS[model]
    net = tm.seeded(cls).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    path = tm.export_onnx(net, ids, tmp_path / "tokens.onnx", EXPORTERS[exporter])
    result = rulegraph.Explainer(path, "gradient").explain(ids.numpy(), target=TARGET)
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["emb"] = output

    net.embed.register_forward_hook(keep)
    net(ids)[[0, 1], TARGET].sum().backward()
    emb = captured["emb"]
    expected = layout((emb * emb.grad).sum(-1)).detach().numpy()    # [N, T], per token
    assert result.attribution["input"].shape == tuple(ids.shape)
    assert np.abs(result.attribution["input"] - expected).max() <= 1e-5 * np.abs(expected).max()


#: (fixture, the module class built with its held parts detached): the MoE router's top-k weights,
#: the cosine attention's and GRN's norms, the exponentials of a hand-written softmax and of RWKV's WKV
HELD_CASES = [("router", lambda: Router(held=True)), ("cosine_grn", lambda: CosineGRN(held=True)),
              ("hand_softmax", lambda: HandSoftmax(held=True))]
CASE_IDS = [name for name, _ in HELD_CASES]


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize(("case", "held_net"), HELD_CASES, ids=CASE_IDS)
def test_gradient_equals_autograd(case, held_net, exporter, request):
    net, x, paths = request.getfixturevalue(case)
    result = rulegraph.Explainer(paths[exporter], "gradient").explain(x.numpy(), target=TARGET)
    expected = _input_gradient(net, x)
    assert np.abs(result.saliency["input"] - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize(("case", "held_net"), HELD_CASES, ids=CASE_IDS)
def test_lrp_transformer_conserves(case, held_net, exporter, request):
    _, x, paths = request.getfixturevalue(case)
    result = rulegraph.Explainer(paths[exporter], "lrp-transformer").explain(x.numpy(), target=TARGET)
    assert np.isfinite(result.map).all()
    assert np.abs(result.relative_delta).max() < 1e-3


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize(("case", "held_net"), HELD_CASES, ids=CASE_IDS)
def test_lrp0_is_gradient_x_input_with_the_held_parts_detached(case, held_net, exporter, request):
    net, x, paths = request.getfixturevalue(case)
    held = held_net()
    held.load_state_dict(net.state_dict())
    expected = x.numpy() * _input_gradient(held.eval(), x)
    rules = dsl.parse(LRP_TRANSFORMER_EPS0, source="lrp-transformer-eps0.rules")
    result = rulegraph.Explainer(paths[exporter], rules).explain(x.numpy(), target=TARGET)
    assert np.abs(result.attribution["input"] - expected).max() <= 1e-4 * np.abs(expected).max()


class FusedQKV(nn.Module):
    """Tokens [N, 5, 6] -> hidden 8 -> one Linear for q, k, v, reshaped to [N, T, 3, 2, 4] and permuted
    to [3, N, 2, T, 4] (timm's attention), softmax(q kᵀ) v -> back to [N, T, 8] -> mean -> 3 classes."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Linear(6, 8), nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        n, t = h.shape[:2]
        q, k, v = self.qkv(h).reshape(n, t, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        out = (torch.softmax(q @ k.transpose(-2, -1), -1) @ v).transpose(1, 2).reshape(n, t, 8)
        return self.head((h + out).mean(1))


class BiLSTMTokens(nn.Module):
    """Tokens [N, 5, 6] -> Linear -> each token as a sequence of 2 steps ``[N·5, 2, 6]`` (Sequencer2D's
    rows: the batch folded with a run-time reshape) -> a bidirectional LSTM (time-major ``[T, N·5, 2,
    H]`` in ONNX, reshaped to ``[T, N·5, 2H]``) -> back to [N, 5, 16] -> mean -> 3 classes."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(6, 12), nn.Linear(16, 3)
        self.rnn = nn.LSTM(6, 4, batch_first=True, bidirectional=True)

    def forward(self, x):
        n = x.shape[0]
        steps = self.embed(x).reshape(n * 5, 2, 6)
        return self.head(self.rnn(steps)[0].reshape(n, 5, 16).mean(1))


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("model", [FusedQKV, BiLSTMTokens], ids=["fused qkv", "bidirectional LSTM"])
def test_per_node_sums_follow_the_batch_through_a_fused_qkv(tmp_path, model, exporter):
    """At ε = 0 every node conserves per sample: the per-node gaps are float rounding."""
    net = tm.seeded(model).eval()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    path = tm.export_onnx(net, x, tmp_path / "qkv.onnx", EXPORTERS[exporter])
    rules = dsl.parse(LRP_TRANSFORMER_EPS0, source="lrp-transformer-eps0.rules")
    result = rulegraph.Explainer(path, rules).explain(x.numpy(), target=TARGET, node_sums=True)
    scale = np.abs(result.start_value).max()
    gaps = {node: float(np.abs(o - i - (0 if b is None else b)).max())
            for node, (i, o, b) in result.node_sums.items() if i is not None and o is not None}
    assert max(gaps.values()) < 1e-5 * scale, max(gaps.items(), key=lambda kv: kv[1])
