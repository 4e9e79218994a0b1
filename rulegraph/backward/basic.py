"""The first rules (docs/rules.md, the rules): gradient, normalized (LRP-ε), ignore, slope, repeat,
radial (max), and
start (where the pass begins)."""

from __future__ import annotations

from ..graph.kinds import LINEAR, MAX, NONLINEAR, ROUTE
from .table import (
    ALL_KINDS,
    APPROXIMATE,
    EXACT,
    LEAKS_BIAS,
    Param,
    _classes,
    _exact_if_homogeneous,
    _stabilizer,
    rule,
)


def _gradient_has_bias(ctx) -> bool:
    """The gradient blames a linear op's bias and a route op's operands that are not activations."""
    if ctx.kind == LINEAR:
        return ctx.linear_bias() is not None
    return ctx.kind == ROUTE and bool(ctx.parts_of_constants())


@rule("gradient", ALL_KINDS, has_bias=_gradient_has_bias,
      conservation=_classes(
          relevance={MAX: EXACT, ROUTE: EXACT},
          importance={LINEAR: LEAKS_BIAS, MAX: EXACT, ROUTE: EXACT, NONLINEAR: _exact_if_homogeneous},
          difference={LINEAR: EXACT, ROUTE: EXACT}))
def gradient(ctx) -> list[str | None]:
    """``a(x) = VJP_x(a(y))``; a bias b of a linear op takes ``b ⊙ a(y)`` (docs/rules.md, the rules), except
    under the difference quantity, where it cancels.

    A route op with an operand that is not an activation (Concat with a constant or expanded class
    token) passes that operand's part ``g`` of ``a(y)`` to it as to a bias: its share is the
    operand's view (``g``, or ``c ⊙ g`` under importance).
    """
    grads = ctx.vjp(ctx.a_out)
    # under the difference quantity a bias cancels in y − y': it has no share
    if ctx.kind == LINEAR and ctx.quantity != "difference" and (bias := ctx.linear_bias()) is not None:
        ctx.report_bias(ctx.tape.op("Mul", bias, ctx.a_out[0]))
    if ctx.kind == ROUTE and ctx.quantity != "difference":
        for operand, part in ctx.parts_of_constants():
            ctx.report_bias(part if ctx.quantity == "relevance" else ctx.tape.op("Mul", operand, part))
    return grads


@rule("normalized", {LINEAR}, params=[Param("eps", 1e-6, _stabilizer, "the stabilizer epsilon")],
      conservation=_classes(relevance={LINEAR: APPROXIMATE}), bias_in_denominator=True)
def normalized(ctx) -> list[str | None]:
    """LRP-ε (Bach et al. 2015; Samek et al. 2016, eq. 6): ``a(x) = x ⊙ Lᵀ(a(y) / blip(d))``.

    ``d = z + b`` (the output, bias included) unless the bias policy is ``ignore``, where ``d = z``;
    ``blip(d) = d + ε·sign(d)`` with ``sign(0) = +1``; where ``blip(d) = 0`` (ε = 0) the share is 0.
    A bias takes ``b ⊙ a(y) / blip(d)``.
    """
    t = ctx.tape
    y = ctx.node.outputs[0]
    bias = ctx.linear_bias()
    d = y
    if bias is not None and ctx.bias_policy == "ignore":
        d = t.op("Sub", y, bias)
    eps = ctx.params["eps"]
    # |blip(d)| >= ε > 0 never vanishes; only ε = 0 needs the zero guard
    s = t.op("Div", ctx.a_out[0], t.blip(d, eps)) if eps > 0 else t.safe_div(ctx.a_out[0], d)
    grads = ctx.vjp([s] + [None] * (len(ctx.node.outputs) - 1))
    out = [None if g is None else t.op("Mul", x, g) for x, g in zip(ctx.node.inputs, grads)]
    if bias is not None and ctx.bias_policy != "ignore":
        ctx.report_bias(t.op("Mul", bias, s))
    return out


@rule("ignore", {NONLINEAR}, conservation=_classes(relevance={NONLINEAR: EXACT}))
def ignore(ctx) -> list[str | None]:
    """``a(x) = a(y)``: the nonlinearity passes its number through unchanged."""
    return [ctx.a_out[0] if i == 0 else None for i in range(len(ctx.node.inputs))]


def _has_value_at_zero(ctx) -> bool:
    """slope blames ``f(0)`` where it is not 0."""
    return ctx.value_at_zero() is not None


@rule("slope", {NONLINEAR}, conservation=_classes(importance={NONLINEAR: EXACT}), has_bias=_has_value_at_zero)
def slope(ctx) -> list[str | None]:
    """``a(x) = a(y) ⊙ (f(x) − f(0)) / x``, with ``f'(0)`` where ``x = 0``; ``f(0)`` is a bias.

    The bias takes ``f(0) ⊙ a(y)``. For Relu, slope equals the gradient.
    """
    t = ctx.tape
    x, y, a = ctx.node.inputs[0], ctx.node.outputs[0], ctx.a_out[0]
    f0 = ctx.value_at_zero()
    rise = y if f0 is None else t.op("Sub", y, f0)
    at_zero = t.op("Equal", x, t.scalar(0.0))
    safe_x = t.op("Where", at_zero, t.scalar(1.0), x)
    secant = t.op("Mul", a, t.op("Div", rise, safe_x))
    derivative = ctx.vjp([a])[0]
    if f0 is not None:
        ctx.report_bias(t.op("Mul", f0, a))
    return [t.op("Where", at_zero, derivative, secant)] + [None] * (len(ctx.node.inputs) - 1)


@rule("repeat", {NONLINEAR})
def repeat(ctx) -> list[str | None]:
    """``a(x) = f(a(y))`` (the deconvnet rule for Relu; Zeiler and Fergus 2014)."""
    return [ctx.apply_node_to(ctx.a_out[0])] + [None] * (len(ctx.node.inputs) - 1)


@rule("radial", {MAX}, conservation=_classes(relevance={MAX: EXACT}))
def radial(ctx) -> list[str | None]:
    """Radial max: ``a(a_i) = α_i a(b)``, ``α_i = relu(a_i) / Σ_j relu(a_j)`` over the window.

    **Decision** (docs/rules.md, the rules): a window with no positive value falls back to the gradient rule
    (all of ``a(b)`` to the arg-max).
    """
    t = ctx.tape
    a = ctx.a_out[0]
    # a constant operand of Max takes part in the window; its share is a bias share
    positive = [t.op("Relu", x) if act or ctx.const(i) is not None else None
                for i, (x, act) in enumerate(zip(ctx.node.inputs, ctx.active))]
    window_sum = ctx.window_sum(positive)
    has_positive = t.op("Greater", window_sum, t.scalar(0.0))
    zero = t.scalar(0.0)
    share = t.op("Where", has_positive, t.safe_div(a, window_sum), zero)
    rest = t.op("Where", has_positive, zero, a)
    spread = ctx.window_sum_vjp(share)
    fallback = ctx.vjp([rest])
    for p, act in zip(positive, ctx.active):
        if p is not None and not act:
            ctx.report_bias(t.op("Mul", p, share))
    return [t.op("Add", t.op("Mul", p, s), g) if act else None
            for p, s, g, act in zip(positive, spread, fallback, ctx.active)]


@rule("start", ALL_KINDS, starts_pass=True)
def start(ctx) -> list[str | None]:
    """Start the pass at this node's input: explain the logits, not the probabilities."""
    raise AssertionError("the compiler handles 'start' nodes itself")
