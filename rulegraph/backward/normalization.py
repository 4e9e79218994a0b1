"""InstanceNormalization, GroupNormalization (opset 18 and 21), RMSNormalization (opset 23), LRN,
LpNormalization and MeanVarianceNormalization:
their VJPs and kind (normalizing, as LayerNormalization), and the form the ``layernorm_linear`` rule
reads (``norm_form``).

Instance, Group and RMS normalization are one map seen through a reshape (the *view*):

    v = view(x),  σ = √(mean_A((v − μ)²) + ε)  (μ = mean_A(v); RMS: μ = 0),  y = unview(v̂) ⊙ γ + β,

``v̂ = (v − μ)/σ``, over the view's axes ``A``. Instance: the view is x, ``A`` the spatial axes;
Group: ``[N, G, C/G, rest]``, ``A = (2, 3)``; RMS: x, ``A`` the axes from ``axis`` on. The VJP (γ, β
constant), with ``ĝ = view(g ⊙ γ)``:

    a(x) = unview((ĝ − mean_A(ĝ) − v̂ ⊙ mean_A(ĝ ⊙ v̂)) / σ)   (RMS: without ``mean_A(ĝ)``).

GroupNormalization-18 scales and shifts per group (``γ, β`` of size G), 21 per channel. LRN is a
channel-window normalization, ``y = x ⊙ d^(−β)``, ``d = k + α/n · S(x²)``, ``S`` the sum over the
window of ``n`` channels around each (``⌊(n−1)/2⌋`` before, ``⌈(n−1)/2⌉`` after):
``a(x) = g ⊙ d^(−β) − 2β α/n · x ⊙ Sᵀ(g ⊙ x ⊙ d^(−β−1))``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..graph.kinds import NORMALIZING
from .emit import Tape
from .vjp import INT64_MAX, VjpContext, vjp


@dataclass(frozen=True)
class NormForm:
    """A normalization seen through its view: ``view`` (a shape tensor to Reshape x to, or None),
    the normalized ``axes`` of the view, whether it is ``centered``, ``scale`` and ``bias`` as tensors
    that broadcast in the view (None where absent), and ``epsilon``."""

    view: str | None
    axes: list[int]
    centered: bool
    scale: str | None
    bias: str | None
    epsilon: float
    #: ε added to the root, ``σ = √var + ε`` (MeanVarianceNormalization), not under it
    outside: bool = False

    def to_view(self, t: Tape, x: str) -> str:
        return x if self.view is None else t.op("Reshape", x, self.view)

    def back(self, t: Tape, v: str, x: str) -> str:
        return v if self.view is None else t.reshape_like(v, x)

    def stats(self, t: Tape, v: str) -> tuple[str, str]:
        """(v̂, 1/σ) of the view ``v``."""
        centered = t.op("Sub", v, t.reduce("ReduceMean", v, self.axes)) if self.centered else v
        variance = t.reduce("ReduceMean", t.op("Mul", centered, centered), self.axes)
        if self.outside:
            inv_std = t.op("Reciprocal", t.op("Add", t.op("Sqrt", variance), t.scalar(self.epsilon)))
        else:
            inv_std = t.op("Reciprocal", t.op("Sqrt", t.op("Add", variance, t.scalar(self.epsilon))))
        return t.op("Mul", centered, inv_std), inv_std


def _operand(ctx: VjpContext, i: int) -> str | None:
    inputs = ctx.node.inputs
    return inputs[i] if i < len(inputs) and inputs[i] else None


def _shaped(t: Tape, tensor: str | None, shape: list[int]) -> str | None:
    return None if tensor is None else t.op("Reshape", tensor, t.ints(shape))


def _rank(ctx: VjpContext) -> int:
    rank = ctx.graph.rank(ctx.x)
    if rank is None:
        raise ctx.fail("the input's rank is unknown")
    return rank


def norm_form(ctx: VjpContext) -> NormForm:
    """The view, axes, scale and bias of an Instance, Group, RMS or mean-variance normalization node
    (the last for ``layernorm_linear``: its VJP is its own, ε being outside the root)."""
    if any(ctx.active[1:]):
        raise ctx.fail(f"{ctx.node.op_type} with a scale or bias computed from the input is not supported; "
                       "rulegraph needs them constant")
    t, op, rank = ctx.tape, ctx.node.op_type, _rank(ctx)
    if op == "MeanVarianceNormalization":
        axes = sorted(int(a) % rank for a in ctx.node.attr("axes", [0, 2, 3]))
        return NormForm(None, axes, True, None, None, 1e-9, outside=True)
    epsilon = ctx.node.attr("epsilon", 1e-5)
    scale, bias = _operand(ctx, 1), _operand(ctx, 2)
    if op == "InstanceNormalization":
        channel = [-1] + [1] * (rank - 2)
        return NormForm(None, list(range(2, rank)), True, _shaped(t, scale, channel),
                        _shaped(t, bias, channel), epsilon)
    if op == "GroupNormalization":
        groups = ctx.node.attr("num_groups")
        per_channel = t.op("Div", t.shape(ctx.x, start=1, end=2), t.ints([groups]))
        view = t.op("Concat", t.shape(ctx.x, start=0, end=1), t.ints([groups]), per_channel, t.ints([-1]),
                    axis=0)
        per_group = ctx.tape.opset < 21
        shape = [groups, 1, 1] if per_group else [groups, -1, 1]
        return NormForm(view, [2, 3], True, _shaped(t, scale, shape), _shaped(t, bias, shape), epsilon)
    axis = ctx.node.attr("axis", -1) % rank
    return NormForm(None, list(range(axis, rank)), False, scale, None, epsilon)


@vjp("InstanceNormalization", "GroupNormalization", "RMSNormalization", kind=NORMALIZING)
def _normalization(ctx, g):
    """``a(x) = unview((ĝ − mean(ĝ) − v̂ ⊙ mean(ĝ ⊙ v̂)) / σ)``, ``ĝ = view(g) ⊙ γ`` (module docstring)."""
    t = ctx.tape
    form = norm_form(ctx)
    normalized, inv_std = form.stats(t, form.to_view(t, ctx.x))
    gh = form.to_view(t, g[0])
    if form.scale is not None:
        gh = t.op("Mul", gh, form.scale)
    mean_gx = t.reduce("ReduceMean", t.op("Mul", gh, normalized), form.axes)
    inner = t.op("Sub", gh, t.op("Mul", normalized, mean_gx))
    if form.centered:
        inner = t.op("Sub", inner, t.reduce("ReduceMean", gh, form.axes))
    return [form.back(t, t.op("Mul", inner, inv_std), ctx.x)] + [None] * (len(ctx.node.inputs) - 1)


def lp_norm(ctx: VjpContext) -> str:
    """``‖x‖_p`` over the LpNormalization's ``axis``, keeping it (p = 1 or 2)."""
    p = ctx.node.attr("p", 2)
    if p not in (1, 2):
        raise ctx.fail(f"LpNormalization with p = {p} is not defined (ONNX allows p = 1 or 2)")
    return ctx.tape.reduce("ReduceL1" if p == 1 else "ReduceL2", ctx.x, [ctx.node.attr("axis", -1)])


@vjp("LpNormalization", kind=NORMALIZING)
def _lp_normalization(ctx, g):
    """``y = x / ‖x‖_p`` over ``axis`` (no ε, as the op): ``a(x) = (g − s ⊙ Σ_axis(g ⊙ y)) / ‖x‖_p``
    with ``s = y`` for p = 2 and ``s = sign(x)`` for p = 1. A fused F.normalize (``graph/fuse.py``)
    differentiates through its members instead."""
    t = ctx.tape
    n, axis = lp_norm(ctx), ctx.node.attr("axis", -1)
    s = ctx.y if ctx.node.attr("p", 2) == 2 else t.op("Sign", ctx.x)
    dot = t.reduce_sum(t.op("Mul", g[0], ctx.y), [axis], keepdims=True)
    return [t.op("Div", t.op("Sub", g[0], t.op("Mul", s, dot)), n)]


def _channel_window(ctx: VjpContext, v: str, before: int, after: int) -> str:
    """``Σ_{k=−before}^{after} v[:, c + k]`` for each channel c (zeros past the ends)."""
    t, rank, size = ctx.tape, _rank(ctx), before + after + 1
    pads = [0, before] + [0] * (rank - 2) + [0, after] + [0] * (rank - 2)
    padded = t.op("Pad", v, t.ints(pads)) if before or after else v
    terms = []
    for k in range(size):
        end = k - (size - 1)
        terms.append(t.op("Slice", padded, t.ints([k]), t.ints([end if end else INT64_MAX]), t.ints([1])))
    return t.sum(terms) if len(terms) > 1 else terms[0]


@vjp("LRN", kind=NORMALIZING)
def _lrn(ctx, g):
    """``a(x) = g ⊙ d^(−β) − 2β α/n · x ⊙ Sᵀ(g ⊙ x ⊙ d^(−β−1))`` (module docstring)."""
    t, x = ctx.tape, ctx.x
    node = ctx.node
    size, alpha, beta = node.attr("size"), node.attr("alpha", 1e-4), node.attr("beta", 0.75)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    window = _channel_window(ctx, t.op("Mul", x, x), before, after)
    d = t.op("Add", t.scalar(node.attr("bias", 1.0)), t.op("Mul", window, t.scalar(alpha / size)))
    factor = t.op("Pow", d, t.scalar(-beta))
    through = t.op("Div", t.op("Mul", t.op("Mul", g[0], x), factor), d)
    back = _channel_window(ctx, through, after, before)
    correction = t.op("Mul", t.op("Mul", x, back), t.scalar(2.0 * beta * alpha / size))
    return [t.op("Sub", t.op("Mul", g[0], factor), correction)]


@vjp("MeanVarianceNormalization", kind=NORMALIZING)
def _mean_variance_normalization(ctx, g):
    """``y = c / s`` over ``axes`` (default 0, 2, 3), ``c = x − μ``, ``s = σ + ε``, ``σ = √mean(c²)``,
    ``ε = 10⁻⁹`` added outside the root (the op's function body): with ``dσ = mean(c ⊙ dx)/σ``,
    ``a(x) = (g − mean(g) − y ⊙ mean(g ⊙ c)/σ) / s``."""
    t, x = ctx.tape, ctx.x
    axes = [int(a) for a in ctx.node.attr("axes", [0, 2, 3])]
    centered = t.op("Sub", x, t.reduce("ReduceMean", x, axes))
    sigma = t.op("Sqrt", t.reduce("ReduceMean", t.op("Mul", centered, centered), axes))
    spread = t.op("Div", t.reduce("ReduceMean", t.op("Mul", g[0], centered), axes), sigma)
    inner = t.op("Sub", t.op("Sub", g[0], t.reduce("ReduceMean", g[0], axes)), t.op("Mul", ctx.y, spread))
    return [t.op("Div", inner, t.op("Add", sigma, t.scalar(1e-9)))]
