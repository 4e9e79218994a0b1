"""VJPs of the com.microsoft ops that onnxruntime's transformer optimizer writes, and of ONNX's
RotaryEmbedding (opset 23). Keys are ``domain.op_type`` (``graph/kinds.op_key``).

- the normalizations (``NORMS``): ``SkipLayerNormalization`` (``s = x + skip + bias``, then a
  LayerNorm of ``s`` over the last axis), ``SkipSimplifiedLayerNormalization`` (``s``, then an RMS
  norm ``s / √(mean s² + ε) ⊙ γ``) and ``SimplifiedLayerNormalization`` (an RMS norm over the axes from
  ``axis``, in the standard domain, where onnxruntime runs it though ONNX defines no such op); the
  fourth output of the Skip forms, where present, is ``s`` itself;
- ``FastGelu`` (``Gelu(x + bias)``, tanh form), ``BiasGelu`` (``Gelu(a + b)``, erf form) and
  ``com.microsoft.Gelu`` (erf form);
- ``FusedMatMul``: ``alpha · op(A) @ op(B)``, ``op`` transposing the last two axes (``transA``/``transB``);
- ``RotaryEmbedding`` (com.microsoft and ONNX 23): a rotation of each pair of features by a
  position's angle, ``Rᵀ = R(−θ)``: its VJP is the op itself with ``sin`` negated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..graph.kinds import LINEAR, NONLINEAR, NORMALIZING
from .emit import Tape
from .vjp import VjpContext, _reduce_where_one, _swap_last, _weight_operand, linear_params, vjp

MS = "com.microsoft"


@dataclass(frozen=True)
class NormForm:
    """Where a normalization's operands are: the summed inputs (``s`` = their sum plus the bias),
    γ, β and the bias (input indices, None where the op has none), the output holding ``s``, and
    whether it centres (LayerNorm) or not (RMS norm)."""

    summed: tuple[int, ...]
    gamma: int
    beta: int | None
    bias: int | None
    sum_output: int | None
    centered: bool


#: op key -> its form; every normalization here is over the last axis but Simplified's (``axis``)
NORMS: dict[str, NormForm] = {
    f"{MS}.SkipLayerNormalization": NormForm((0, 1), 2, 3, 4, 3, centered=True),
    f"{MS}.SkipSimplifiedLayerNormalization": NormForm((0, 1), 2, None, 3, 3, centered=False),
    "SimplifiedLayerNormalization": NormForm((0,), 1, None, None, None, centered=False),
}


def _input(ctx: VjpContext, index: int | None) -> str | None:
    inputs = ctx.node.inputs
    return inputs[index] if index is not None and index < len(inputs) and inputs[index] else None


def norm_axes(ctx: VjpContext) -> list[int]:
    """The normalized axes: the last (the Skip ops), from ``axis`` on (SimplifiedLayerNormalization)."""
    rank = ctx.graph.rank(ctx.node.inputs[0])
    if rank is None:
        raise ctx.fail("the input's rank is unknown")
    form = NORMS[ctx.node.op_type]
    if any(ctx.active[i] for i in range(len(ctx.node.inputs)) if i not in form.summed):
        raise ctx.fail("γ, β or the bias is computed from the input; only constant ones are supported")
    axis = ctx.node.attr("axis", -1) if len(form.summed) == 1 else -1
    return list(range(axis % rank, rank))


def norm_sum(ctx: VjpContext) -> str:
    """``s``: the fourth output where the op has it (asked of the forward), else ``x`` (Simplified)."""
    form = NORMS[ctx.node.op_type]
    if form.sum_output is None:
        return ctx.node.inputs[0]
    return ctx.request_output(ctx.node, form.sum_output)


def norm_stats(ctx: VjpContext, s: str, axes: list[int]) -> tuple[str | None, str]:
    """(μ or None for an RMS norm, 1/σ) of ``s`` over ``axes``, computed again from ``s``."""
    t, form = ctx.tape, NORMS[ctx.node.op_type]
    eps = t.scalar(ctx.node.attr("epsilon", 1e-5 if form.centered else 1e-6))
    mean = t.reduce("ReduceMean", s, axes) if form.centered else None
    centered = t.op("Sub", s, mean) if mean is not None else s
    variance = t.reduce("ReduceMean", t.op("Mul", centered, centered), axes)
    return mean, t.op("Reciprocal", t.op("Sqrt", t.op("Add", variance, eps)))


def spread_sum(ctx: VjpContext, g_sum: str | None) -> list[str | None]:
    """The cotangent of ``s`` to every summed input (each summed down to its own shape)."""
    t = ctx.tape
    out: list[str | None] = [None] * len(ctx.node.inputs)
    for i in NORMS[ctx.node.op_type].summed:
        if ctx.active[i] and g_sum is not None:
            x = ctx.node.inputs[i]
            out[i] = t.reshape_like(_reduce_where_one(t, g_sum, x), x)
    return out


def _norm_vjp(ctx, g):
    """``x̂ = (s − μ)/σ`` (``s/σ`` for an RMS norm), ``y = x̂ ⊙ γ + β``:
    ``a(s) = (ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)) / σ`` with ``ĝ = g ⊙ γ`` (no ``mean(ĝ)`` for an RMS
    norm), plus the cotangent of the fourth output ``s``; ``a`` of each summed input is ``a(s)``."""
    form = NORMS[ctx.node.op_type]
    if any(g[i] is not None for i in (1, 2) if i < len(g) and i != form.sum_output):
        raise ctx.fail("its mean or inverse standard deviation output feeds the explained output; "
                       "only the normalized output (and the sum) are supported")
    t = ctx.tape
    axes = norm_axes(ctx)
    s = norm_sum(ctx)
    terms = []
    if g[0] is not None:
        mean, inv_std = norm_stats(ctx, s, axes)
        normalized = t.op("Mul", t.op("Sub", s, mean) if mean is not None else s, inv_std)
        gh = t.op("Mul", g[0], ctx.node.inputs[form.gamma])
        mean_gx = t.reduce("ReduceMean", t.op("Mul", gh, normalized), axes)
        centered = t.op("Sub", gh, t.op("Mul", normalized, mean_gx))
        if mean is not None:
            centered = t.op("Sub", centered, t.reduce("ReduceMean", gh, axes))
        terms.append(t.op("Mul", centered, inv_std))
    if form.sum_output is not None and form.sum_output < len(g) and g[form.sum_output] is not None:
        terms.append(g[form.sum_output])
    return spread_sum(ctx, t.sum(terms) if terms else None)


for _key in NORMS:
    vjp(_key, kind=NORMALIZING)(_norm_vjp)


# --------------------------------------------------------------------------------------------------
# Gelu with a bias


def gelu_derivative(t: Tape, z: str, tanh: bool) -> str:
    """``Gelu'(z)``: ``Φ(z) + z·φ(z)`` (erf form), or the derivative of the tanh approximation."""
    if tanh:
        k = math.sqrt(2.0 / math.pi)
        z2 = t.op("Mul", z, z)
        cubic = t.op("Mul", t.scalar(0.044715), t.op("Mul", z2, z))
        th = t.op("Tanh", t.op("Mul", t.scalar(k), t.op("Add", z, cubic)))
        dinner = t.op("Mul", t.scalar(k), t.op("Add", t.scalar(1.0), t.op("Mul", t.scalar(3 * 0.044715), z2)))
        sech2 = t.op("Sub", t.scalar(1.0), t.op("Mul", th, th))
        return t.op("Add", t.op("Mul", t.scalar(0.5), t.op("Add", t.scalar(1.0), th)),
                    t.op("Mul", t.op("Mul", t.scalar(0.5), z), t.op("Mul", sech2, dinner)))
    erf = t.op("Erf", t.op("Mul", z, t.scalar(1 / math.sqrt(2))))
    cdf = t.op("Mul", t.scalar(0.5), t.op("Add", t.scalar(1.0), erf))
    gauss = t.op("Exp", t.op("Mul", t.scalar(-0.5), t.op("Mul", z, z)))
    pdf = t.op("Mul", t.scalar(1 / math.sqrt(2 * math.pi)), gauss)
    return t.op("Add", cdf, t.op("Mul", z, pdf))


#: op key -> (tanh form?), the Gelus of ``x + bias`` (the bias an optional second input)
GELUS = {f"{MS}.FastGelu": True, f"{MS}.BiasGelu": False, f"{MS}.Gelu": False}


def _biased_gelu(ctx, g):
    """``y = Gelu(x + b)``: ``a(x) = a(b) = g ⊙ Gelu'(x + b)`` (``b`` summed to its shape)."""
    t = ctx.tape
    bias = _input(ctx, 1)
    z = t.op("Add", ctx.x, bias) if bias else ctx.x
    d = t.op("Mul", g[0], gelu_derivative(t, z, GELUS[ctx.node.op_type]))
    out: list[str | None] = [d if ctx.active[0] else None] + [None] * (len(ctx.node.inputs) - 1)
    if bias and ctx.active[1]:
        out[1] = t.reshape_like(_reduce_where_one(t, d, bias), bias)
    return out


for _key in GELUS:
    vjp(_key, kind=NONLINEAR, first_input_only=True)(_biased_gelu)


# --------------------------------------------------------------------------------------------------
# FusedMatMul


@vjp(f"{MS}.FusedMatMul", kind=LINEAR, bilinear=True)
def _fused_matmul(ctx, g):
    """``Y = α · A′ @ B′`` (``A′`` = A with its last two axes swapped where ``transA``):
    ``a(A′) = α · g @ B′ᵀ``, ``a(B′) = α · A′ᵀ @ g``, each summed over the axes it was broadcast
    along and swapped back."""
    t, graph, node = ctx.tape, ctx.graph, ctx.node
    if node.attr("transBatchA", 0) or node.attr("transBatchB", 0):
        raise ctx.fail("transBatchA/transBatchB are not supported; optimize without the MatMul/Transpose "
                       "fusion (keep the Transpose)")
    ranks = [graph.rank(x) for x in node.inputs[:2]]
    if any(r is None or r < 2 for r in ranks):
        raise ctx.fail(f"operands of rank {ranks}; only operands of rank >= 2 are supported")
    flags = [node.attr("transA", 0), node.attr("transB", 0)]
    primed = [_swap_last(t, x, r) if f else x for x, r, f in zip(node.inputs[:2], ranks, flags)]
    gs = t.op("Mul", g[0], t.scalar(node.attr("alpha", 1.0)))
    out: list[str | None] = [None, None]
    products = [lambda: t.op("MatMul", gs, _swap_last(t, primed[1], ranks[1])),
                lambda: t.op("MatMul", _swap_last(t, primed[0], ranks[0]), gs)]
    for i in (0, 1):
        if ctx.active[i]:
            d = t.reshape_like(_reduce_where_one(t, products[i](), primed[i]), primed[i])
            out[i] = _swap_last(t, d, ranks[i]) if flags[i] else d
    return out


@linear_params(f"{MS}.FusedMatMul")
def _fused_matmul_params(ctx):
    return _weight_operand(ctx), None


# --------------------------------------------------------------------------------------------------
# RotaryEmbedding

#: op key -> index of its sin cache
ROTARIES = {f"{MS}.RotaryEmbedding": 3, "RotaryEmbedding": 2}


def _rotary(ctx, g):
    """``y = R(θ) x`` per pair of features, ``R(θ)ᵀ = R(−θ)``: the op again on ``g`` with ``−sin``."""
    sin = ROTARIES[ctx.node.op_type]
    if any(ctx.active[1:]):
        raise ctx.fail("its cos/sin caches or position ids are computed from the input; only constant "
                       "or integer ones are supported")
    t = ctx.tape
    inputs = list(ctx.node.inputs)
    inputs[0], inputs[sin] = g[0], t.op("Neg", inputs[sin])
    return [t.copy_node(ctx.node, inputs)] + [None] * (len(inputs) - 1)


for _key in ROTARIES:
    vjp(_key, kind=LINEAR)(_rotary)
