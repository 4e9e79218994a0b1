"""Elementwise ops beyond ``vjp.py``'s: the inverse trigonometric and the hyperbolic functions, Tan,
Swish, the piecewise constant roundings (Ceil, Floor, Round, Sign), Mod on floats and CastLike.

Their derivatives are written with ops that CUDA has kernels for (Exp, Sqrt, Sigmoid, Round and
the arithmetic): onnxruntime's CUDA provider has no Tan, Asin, ..., Atanh and no Swish, so the
forward node of those stays on the CPU while its backward does not.

A rounding is constant between its jumps: its derivative is 0 almost everywhere (at a jump it has
none; autograd's convention, 0, is taken there too). Mod ``y = a − b·k`` with the integer
``k = trunc(a/b)`` (``fmod = 1``) or ``⌊a/b⌋`` (``fmod = 0``, floats from opset 28) likewise has
``∂y/∂a = 1`` and ``∂y/∂b = −k`` between its jumps; ``k`` is read off the forward as
``round((a − y)/b)``, the forward's own choice at a jump.
"""

from __future__ import annotations

from ..graph.kinds import NONLINEAR, ROUTE
from .vjp import _zeros_for, unbroadcast, vjp


def _times(ctx, g, slope: str) -> list:
    return [ctx.tape.op("Mul", g[0], slope)]


def _over(ctx, g, denominator: str) -> list:
    return [ctx.tape.op("Div", g[0], denominator)]


def _one_minus_x2(ctx) -> str:
    t = ctx.tape
    return t.op("Sub", t.scalar(1.0), t.op("Mul", ctx.x, ctx.x))


@vjp("Tan", kind=NONLINEAR)
def _tan(ctx, g):
    """``d tan x = 1 + tan² x = 1 + y²``."""
    t = ctx.tape
    return _times(ctx, g, t.op("Add", t.scalar(1.0), t.op("Mul", ctx.y, ctx.y)))


@vjp("Asin", kind=NONLINEAR)
def _asin(ctx, g):
    """``d asin x = 1/√(1 − x²)`` (``|x| < 1``)."""
    return _over(ctx, g, ctx.tape.op("Sqrt", _one_minus_x2(ctx)))


@vjp("Acos", kind=NONLINEAR)
def _acos(ctx, g):
    """``d acos x = −1/√(1 − x²)`` (``|x| < 1``)."""
    t = ctx.tape
    return _over(ctx, g, t.op("Neg", t.op("Sqrt", _one_minus_x2(ctx))))


@vjp("Atan", kind=NONLINEAR)
def _atan(ctx, g):
    """``d atan x = 1/(1 + x²)``."""
    t = ctx.tape
    return _over(ctx, g, t.op("Add", t.scalar(1.0), t.op("Mul", ctx.x, ctx.x)))


@vjp("Sinh", kind=NONLINEAR)
def _sinh(ctx, g):
    """``d sinh x = cosh x = √(1 + sinh² x) = √(1 + y²)``."""
    t = ctx.tape
    return _times(ctx, g, t.op("Sqrt", t.op("Add", t.scalar(1.0), t.op("Mul", ctx.y, ctx.y))))


@vjp("Cosh", kind=NONLINEAR)
def _cosh(ctx, g):
    """``d cosh x = sinh x = (eˣ − e⁻ˣ)/2`` (not ``±√(y² − 1)``, which cancels near 0)."""
    t = ctx.tape
    difference = t.op("Sub", t.op("Exp", ctx.x), t.op("Exp", t.op("Neg", ctx.x)))
    return _times(ctx, g, t.op("Mul", difference, t.scalar(0.5)))


@vjp("Asinh", kind=NONLINEAR)
def _asinh(ctx, g):
    """``d asinh x = 1/√(x² + 1)``."""
    t = ctx.tape
    return _over(ctx, g, t.op("Sqrt", t.op("Add", t.op("Mul", ctx.x, ctx.x), t.scalar(1.0))))


@vjp("Acosh", kind=NONLINEAR)
def _acosh(ctx, g):
    """``d acosh x = 1/√(x² − 1)`` (``x > 1``)."""
    t = ctx.tape
    return _over(ctx, g, t.op("Sqrt", t.op("Sub", t.op("Mul", ctx.x, ctx.x), t.scalar(1.0))))


@vjp("Atanh", kind=NONLINEAR)
def _atanh(ctx, g):
    """``d atanh x = 1/(1 − x²)`` (``|x| < 1``)."""
    return _over(ctx, g, _one_minus_x2(ctx))


@vjp("Swish", kind=NONLINEAR)
def _swish(ctx, g):
    """``y = x·σ(αx)`` (opset 24): ``y' = σ(αx) + αx·σ(αx)(1 − σ(αx)) = s + α·y·(1 − s)``, ``s = σ(αx)``."""
    t = ctx.tape
    alpha = ctx.node.attr("alpha", 1.0)
    s = t.op("Sigmoid", ctx.x if alpha == 1.0 else t.op("Mul", ctx.x, t.scalar(alpha)))
    tail = t.op("Mul", t.op("Mul", ctx.y, t.op("Sub", t.scalar(1.0), s)), t.scalar(alpha))
    return _times(ctx, g, t.op("Add", s, tail))


@vjp("Ceil", "Floor", "Round", "Sign", kind=NONLINEAR)
def _piecewise_constant(ctx, g):
    """Constant between jumps: ``y' = 0`` (module docstring)."""
    return [_zeros_for(ctx, ctx.x)]


@vjp("Mod", kind=NONLINEAR, first_input_only=True)
def _mod(ctx, g):
    """``y = a − b·k`` on floats, ``k`` an integer (module docstring): ``∂a = g``, ``∂b = −g·k`` with
    ``k = round((a − y)/b)``, each summed over its broadcast axes. An activation divisor makes the node
    normalizing (nonlinear rules read ``y = f(a)``), as Pow's exponent does."""
    t = ctx.tape
    a, b = ctx.node.inputs
    grads = [unbroadcast(ctx, g[0], ctx.y, a) if ctx.active[0] else None, None]
    if ctx.active[1]:
        k = t.op("Round", t.op("Div", t.op("Sub", a, ctx.y), b))
        grads[1] = unbroadcast(ctx, t.op("Neg", t.op("Mul", g[0], k)), ctx.y, b)
    return grads


@vjp("CastLike", kind=ROUTE)
def _cast_like(ctx, g):
    """A float-to-float CastLike (``y = Cast(x, to = type of like)``): ``g`` cast to the pass's float
    type, as Cast's; ``like`` gives only its type, never a number."""
    return [ctx.tape.op("Cast", g[0], to=ctx.tape.float_type) if ctx.active[0] else None, None]
