"""Compare to a baseline: the ``baseline_difference`` rule (DeepLIFT Rescale; Shrikumar et al. 2017)
for the ``difference`` quantity, whose view of a tensor is ``(t − t') ⊙ a(t)``.

The compiled explainer runs the forward pass on the input ``x`` and on the baseline ``x'`` in the
same model (``ctx.baseline(t)`` is ``t'``), so every rule below sees both sides.

- linear and route ops: the gradient; the bias cancels in ``y − y'``, so it gets nothing;
- nonlinear ``y = f(x)``: ``a(x) = a(y) ⊙ (f(x) − f(x')) / (x − x')``, with ``f'(x)`` where
  ``|x − x'| < tol``;
- max ops, parameter ``max``: ``softness`` (the limit of ``k·log Σ exp(a_i/k)`` as ``k → 0``: all of
  ``b − b'`` goes to the arg-max of whichever side has the larger max; equal maxima fall back to the
  gradient) or ``relu`` (``max(p, q) = q + relu(p − q)``, folded left over the operands or the
  window's cells in row-major order; the result depends on that order for more than two);
- products of two activations ``y = a ⊙ b`` (Mul, MatMul; a squeeze-excitation gate): the two
  factors' Shapley split ``Δy = Δa ⊙ ½(b + b') + ½(a + a') ⊙ Δb`` (exact for any bilinear map), so
  each factor gets the VJP with the other factor at its mean ``½(t + t')``. **Decision**: Captum's
  DeepLift has no rule there (the plain gradient, which does not sum to ``Δy``).

Both max variants, the product rule and the rescale rule conserve ``Σ (t − t') ⊙ a(t)`` exactly,
so the attribution sums to ``y − y'`` (summation-to-delta), except where equal maxima fall back
to the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..graph.kinds import BILINEAR, LINEAR, MAX, NONLINEAR, ROUTE
from .table import EXACT, Param, rule
from .vjp import VJPS, VjpContext, _spatial_attrs, first_max_masks, positions, unbroadcast

MAX_VARIANTS: dict[str, dict[str, Callable]] = {"softness": {}, "relu": {}}


def max_variant(variant: str, *op_types: str):
    def register(fn):
        for op in op_types:
            MAX_VARIANTS[variant][op] = fn
        return fn

    return register


def _tolerance(v: float) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


@rule("baseline_difference", {LINEAR, ROUTE, NONLINEAR, MAX, BILINEAR},
      params=[Param("tol", 1e-6, _tolerance, "below this |x − x'| the gradient is used"),
              Param("max", "softness", choices=tuple(MAX_VARIANTS), doc="the max variant")],
      conservation={("difference", kind): EXACT for kind in (LINEAR, ROUTE, NONLINEAR, MAX, BILINEAR)})
def baseline_difference(ctx) -> list[str | None]:
    """DeepLIFT Rescale (Shrikumar et al. 2017): multipliers ``Δy/Δx`` against the baseline."""
    if ctx.kind in (LINEAR, ROUTE):
        return ctx.vjp(ctx.a_out)
    if ctx.kind == BILINEAR:
        return _product(ctx)
    if ctx.kind == NONLINEAR:
        return [_rescale(ctx, ctx.x, ctx.baseline(ctx.x), ctx.y, ctx.baseline(ctx.y), ctx.a_out[0],
                         lambda: ctx.vjp(ctx.a_out)[0])] + [None] * (len(ctx.node.inputs) - 1)
    variant = ctx.params["max"]
    emitter = MAX_VARIANTS[variant].get(ctx.node.op_type)
    if emitter is None:
        raise ctx.fail(f"baseline_difference(max = \"{variant}\") supports "
                       f"{', '.join(sorted(MAX_VARIANTS[variant]))}")
    return emitter(ctx)


def _rescale(ctx, x: str, xb: str, y: str, yb: str, a: str, derivative: Callable[[], str]) -> str:
    """``a ⊙ (y − y')/(x − x')``, and ``derivative()`` where ``|x − x'| < tol``."""
    t = ctx.tape
    dx = t.op("Sub", x, xb)
    close = t.op("Less", t.op("Abs", dx), t.scalar(ctx.params["tol"]))
    safe = t.op("Where", close, t.scalar(1.0), dx)
    secant = t.op("Mul", a, t.op("Div", t.op("Sub", y, yb), safe))
    return t.op("Where", close, derivative(), secant)


PRODUCTS = ("Mul", "MatMul")  # bilinear maps: the Shapley split is exact


def _product(ctx) -> list[str | None]:
    """``a(a) = VJP_a(a(y))`` at ``b = ½(b + b')`` and vice versa, for ``y = a ⊙ b`` or ``a·b``."""
    if ctx.node.op_type not in PRODUCTS:
        raise ctx.fail(f"baseline_difference splits products of two activations ({', '.join(PRODUCTS)}); "
                       f"{ctx.node.op_type} of two activations is not bilinear: bind it to another rule")
    t, graph = ctx.tape, ctx.graph
    means = [t.op("Mul", t.op("Add", x, ctx.baseline(x)), t.scalar(0.5)) for x in ctx.node.inputs[:2]]
    shapes = {m: graph.shapes.get(x) for m, x in zip(means, ctx.node.inputs)}
    node = replace(ctx.node, inputs=means + list(ctx.node.inputs[2:]))
    at_means = VjpContext(node, replace(graph, shapes={**graph.shapes, **shapes}), t, ctx.active,
                          ctx.request_output)
    shares = VJPS[ctx.node.op_type](at_means, ctx.a_out)
    # the VJP sums each share down to its operand's shape: that of the mean, the operand's own
    return [s if act else None for s, act in zip(shares, ctx.active)]


# softness: all of b − b' to the arg-max of the side with the larger max ---------------------------


@max_variant("softness", "MaxPool")
def _softness_maxpool(ctx) -> list[str | None]:
    t = ctx.tape
    x, y, a = ctx.x, ctx.y, ctx.a_out[0]
    xb, yb = ctx.baseline(x), ctx.baseline(y)
    indices = ctx.request_output(ctx.node, 1)
    indices_b = t.copy_node(ctx.node, [xb], outputs=2)[1]
    chosen = t.op("Reshape", t.op("Where", t.op("Less", y, yb), indices_b, indices), t.ints([-1]))
    flat = t.ints([-1])
    x_at = t.op("GatherElements", t.op("Reshape", x, flat), chosen, axis=0)
    xb_at = t.op("GatherElements", t.op("Reshape", xb, flat), chosen, axis=0)
    dy = t.op("Reshape", t.op("Sub", y, yb), flat)
    tie = t.op("Equal", dy, t.scalar(0.0))
    multiplier = t.op("Where", tie, t.scalar(1.0), t.safe_div(dy, t.op("Sub", x_at, xb_at)))
    values = t.op("Mul", multiplier, t.op("Reshape", a, flat))
    zeros = t.op("Reshape", t.zeros_like(x), flat)
    return [t.reshape_like(t.op("ScatterElements", zeros, chosen, values, axis=0, reduction="add"), x)]


@max_variant("softness", "Max")
def _softness_max(ctx) -> list[str | None]:
    t = ctx.tape
    y, a = ctx.y, ctx.a_out[0]
    yb = ctx.baseline(y)
    xs = [t.op("Expand", x, t.shape(y)) for x in ctx.node.inputs]
    xbs = [t.op("Expand", ctx.baseline(x) if act else x, t.shape(y)) for x, act in zip(ctx.node.inputs, ctx.active)]
    use_b = t.op("Less", y, yb)
    masks = [t.op("Where", use_b, mb, m) for m, mb in zip(first_max_masks(t, xs, y), first_max_masks(t, xbs, yb))]
    dx_chosen = t.sum([t.op("Where", m, t.op("Sub", x, xb), t.scalar(0.0)) for m, x, xb in zip(masks, xs, xbs)])
    dy = t.op("Sub", y, yb)
    multiplier = t.op("Where", t.op("Equal", dy, t.scalar(0.0)), t.scalar(1.0), t.safe_div(dy, dx_chosen))
    share = t.op("Mul", multiplier, a)
    return [unbroadcast(ctx, t.op("Where", m, share, t.scalar(0.0)), y, x) if act else None
            for m, x, act in zip(masks, ctx.node.inputs, ctx.active)]


# relu: max(p, q) = q + relu(p − q), folded left ---------------------------------------------------


def _fold(ctx, operands: list[str], baselines: list[str], a: str) -> list[str]:
    """Numbers for each operand of ``max(o_1, ..., o_n)`` written as ``b_k = b_{k−1} + relu(o_k −
    b_{k−1})``, with the Rescale rule on each relu and the gradient on each sum."""
    t = ctx.tape
    b, bb = operands[0], baselines[0]
    multipliers = []
    for o, ob in zip(operands[1:], baselines[1:]):
        d, db = t.op("Sub", o, b), t.op("Sub", ob, bb)
        r, rb = t.op("Relu", d), t.op("Relu", db)
        m = _rescale(ctx, d, db, r, rb, t.scalar(1.0),
                     lambda d=d: t.op("Cast", t.op("Greater", d, t.scalar(0.0)), to=t.float_type))
        multipliers.append(m)
        b, bb = t.op("Add", b, r), t.op("Add", bb, rb)
    shares = []
    for m in reversed(multipliers):
        shares.append(t.op("Mul", m, a))
        a = t.op("Mul", t.op("Sub", t.scalar(1.0), m), a)
    return [a] + list(reversed(shares))


@max_variant("relu", "Max")
def _relu_max(ctx) -> list[str | None]:
    t = ctx.tape
    xs = [t.op("Expand", x, t.shape(ctx.y)) for x in ctx.node.inputs]
    xbs = [t.op("Expand", ctx.baseline(x) if act else x, t.shape(ctx.y)) for x, act in zip(ctx.node.inputs, ctx.active)]
    shares = _fold(ctx, xs, xbs, ctx.a_out[0])
    return [unbroadcast(ctx, s, ctx.y, x) if act else None for s, x, act in zip(shares, ctx.node.inputs, ctx.active)]


@max_variant("relu", "MaxPool")
def _relu_maxpool(ctx) -> list[str | None]:
    """The window's cells in row-major order, each a strided Slice of the padded input. Padding
    takes a value below every real one (not −∞, which would turn the fold's differences into nan,
    nor a huge finite number, whose sum with a real value rounds the real value away)."""
    t = ctx.tape
    node, x = ctx.node, ctx.x
    if node.attr("ceil_mode", 0):
        raise ctx.fail("baseline_difference(max = \"relu\") does not support ceil_mode MaxPool")
    kernel = list(node.attr("kernel_shape"))
    n = len(kernel)
    strides, dilations, pb, pe = _spatial_attrs(ctx, kernel)

    if any(pb + pe):  # pad just below both sides' values: the fold's relu never picks a pad cell
        low = t.op("Sub", t.op("Min", t.op("ReduceMin", x, keepdims=0),
                                t.op("ReduceMin", ctx.baseline(x), keepdims=0)), t.scalar(1.0))

    def padded(tensor: str) -> str:
        if not any(pb + pe):
            return tensor
        return t.op("Pad", tensor, t.ints([0, 0] + pb + [0, 0] + pe), low)

    xp, xbp = padded(x), padded(ctx.baseline(x))
    cell_positions = positions(t, xp)
    out_size = t.shape(ctx.y, start=2)
    span = t.op("Add", t.op("Mul", t.op("Sub", out_size, t.ints([1])), t.ints(strides)), t.ints([1]))
    offsets = [np.unravel_index(i, kernel) for i in range(int(np.prod(kernel)))]
    cells, cells_b, picked = [], [], []
    for offset in offsets:
        start = [int(o) * d for o, d in zip(offset, dilations)]
        args = (t.ints(start), t.op("Add", span, t.ints(start)), t.ints(range(2, 2 + n)), t.ints(strides))
        cells.append(t.op("Slice", xp, *args))
        cells_b.append(t.op("Slice", xbp, *args))
        picked.append(t.op("Slice", cell_positions, *args))
    shares = _fold(ctx, cells, cells_b, ctx.a_out[0])
    flat = t.ints([-1])
    index = t.op("Concat", *[t.op("Reshape", p, flat) for p in picked], axis=0)
    values = t.op("Concat", *[t.op("Reshape", s, flat) for s in shares], axis=0)
    zeros = t.op("Reshape", t.zeros_like(xp), flat)
    spread = t.reshape_like(t.op("ScatterElements", zeros, index, values, axis=0, reduction="add"), xp)
    if any(pb + pe):
        ends = t.op("Add", t.shape(x, start=2), t.ints(pb))
        spread = t.op("Slice", spread, t.ints(pb), ends, t.ints(range(2, 2 + n)))
    return [spread]
