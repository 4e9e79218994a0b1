"""CumProd (opset 26): ``y_i = Π_{k∈S(i)} x_k`` along ``axis``, ``S(i)`` the elements up to ``i``
(``exclusive``: before ``i``; ``reverse``: from the other end). Normalizing, as ReduceProd.

Its VJP ``∂x_j = Σ_{i: j∈S(i)} g_i Π_{k∈S(i), k≠j} x_k`` is exact with zeros. Let ``z`` be the first
zero of ``x`` in the scan's direction:

* ``x_j ≠ 0``: ``∂x_j = r_j / x_j`` with ``r = Σ_{i: j∈S(i)} g_i y_i``, a cumulative sum the other
  way (every term whose product holds the zero ``x_z`` is 0 on both sides; past ``z``, ``r_j = 0``);
* ``j = z``: ``∂x_z = Σ_{i: z∈S(i)} g_i y'_i`` with ``y'`` the cumulative product of ``x`` with
  ``x_z`` set to 1 (a second zero still gives 0);
* a later zero: 0.

CUDA has no CumProd kernel: ``y'`` is ``exp(Σ log|x'|)`` times the sign ``(−1)^(number of
negatives)``, both cumulative sums (a second zero is ``log 0 = −∞`` and gives 0).
"""

from __future__ import annotations

from ..graph.kinds import NORMALIZING
from .vjp import vjp


@vjp("CumProd", kind=NORMALIZING)
def _cumprod(ctx, g):
    """``∂x = Where(x ≠ 0, r/x, 1[j = z]·Σ g y')`` (module docstring)."""
    if ctx.active[1]:
        raise ctx.fail("CumProd's axis must be an integer, not an activation")
    t, x, axis = ctx.tape, ctx.x, ctx.node.inputs[1]
    exclusive, reverse = ctx.node.attr("exclusive", 0), ctx.node.attr("reverse", 0)

    def scan(v: str) -> str:   # Σ_{k∈S(i)} v_k
        return t.op("CumSum", v, axis, exclusive=exclusive, reverse=reverse)

    def back(v: str) -> str:   # Σ_{i: j∈S(i)} v_i
        return t.op("CumSum", v, axis, exclusive=exclusive, reverse=0 if reverse else 1)

    zero, one = t.scalar(0.0), t.scalar(1.0)
    is_zero = t.op("Equal", x, zero)
    plain = t.op("Div", back(t.op("Mul", g[0], ctx.y)), t.op("Where", is_zero, one, x))
    zeros_so_far = t.op("CumSum", t.indicator(is_zero), axis, reverse=reverse)
    first = t.op("And", is_zero, t.op("Equal", zeros_so_far, one))
    lifted = t.op("Where", first, one, x)
    magnitude = t.op("Exp", scan(t.op("Log", t.op("Abs", lifted))))
    negatives = scan(t.indicator(t.op("Less", lifted, zero)))
    sign = t.op("Sub", one, t.op("Mul", t.op("Mod", negatives, t.scalar(2.0), fmod=1), t.scalar(2.0)))
    at_first = back(t.op("Mul", g[0], t.op("Mul", magnitude, sign)))
    return [t.op("Where", is_zero, t.op("Where", first, at_first, zero), plain), None]
