"""LpPool and GlobalLpPool: the p-norm of each window, ``y = (Σ_window |x|^p)^(1/p)`` (zero padding
adds nothing), normalizing as the p-norm reductions ReduceL1 and ReduceL2 are.

With ``S`` the window sum of the node (a depthwise convolution with ones: ``vjp._sum_pool``) and
``Sᵀ`` its transpose, ``∂y/∂x = sign(x)|x|^(p−1) y^(1−p)`` per window, so

    a(x) = sign(x) |x|^(p−1) ⊙ Sᵀ(g ⊙ y^(1−p)),

which is ``sign(x) ⊙ Sᵀ(g)`` for p = 1 and ``x ⊙ Sᵀ(g / y)`` for p = 2. GlobalLpPool's window is
the whole spatial extent: ``Sᵀ`` broadcasts.
"""

from __future__ import annotations

from ..graph.kinds import NORMALIZING
from .vjp import VjpContext, _sum_pool_transpose, vjp


def _p(ctx: VjpContext) -> float:
    p = ctx.node.attr("p", 2)
    if not p > 0:
        raise ctx.fail(f"LpPool with p = {p} is not a norm; ONNX's p is a positive integer")
    return float(p)


def _factors(ctx: VjpContext, g: str, p: float) -> tuple[str, str]:
    """``(sign(x)|x|^(p−1), g ⊙ y^(1−p))``."""
    t, x, y = ctx.tape, ctx.x, ctx.y
    if p == 1.0:
        return t.op("Sign", x), g
    if p == 2.0:
        return x, t.op("Div", g, y)
    power = t.op("Mul", t.op("Sign", x), t.op("Pow", t.op("Abs", x), t.scalar(p - 1.0)))
    return power, t.op("Mul", g, t.op("Pow", y, t.scalar(1.0 - p)))


@vjp("LpPool", kind=NORMALIZING)
def _lp_pool(ctx, g):
    """``a(x) = sign(x)|x|^(p−1) ⊙ Sᵀ(g ⊙ y^(1−p))`` (module docstring); strides, pads, auto_pad,
    dilations and ceil_mode as for AveragePool's window."""
    p = _p(ctx)
    power, scaled = _factors(ctx, g[0], p)
    return [ctx.tape.op("Mul", power, _sum_pool_transpose(ctx, scaled, 1.0))]


@vjp("GlobalLpPool", kind=NORMALIZING)
def _global_lp_pool(ctx, g):
    """``a(x) = sign(x)|x|^(p−1) ⊙ g y^(1−p)``, ``g y^(1−p)`` of shape ``[N, C, 1, …]`` broadcast."""
    power, scaled = _factors(ctx, g[0], _p(ctx))
    return [ctx.tape.op("Mul", power, scaled)]
