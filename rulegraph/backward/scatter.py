"""ScatterND and ScatterElements on activations: their VJPs and their kinds.

``y = Scatter(data, indices, updates)``. Without a reduction each written element of ``y`` is one
element of ``updates`` and every other one an element of ``data``: a route. With ``reduction = add``,
``y = data + S(updates)`` (``S`` adds each update into its place): linear. With ``mul``, each written
element is ``y_k = data_k · Π u_i`` over the updates ``i`` written to ``k`` (a product, normalizing as
ReduceProd is); with ``max`` (``min``) it is the largest (smallest) of ``data_k`` and those updates
(kind max). The indices are integers (never active; constant or computed at run time alike).

- ``data``: ``g`` (add); ``g`` where no update was written (none); ``g ⊙ Π u`` (mul); ``g`` where
  ``data`` is the winner (max, min);
- ``updates``: ``g`` gathered at the indices (GatherND / GatherElements); without a reduction an
  update that another one overwrote gets nothing: the node re-run on the updates' numbers says which
  one the runtime kept; with ``mul`` it is times the product of the other factors of its place
  (``data_k`` and the other updates there), counted without division where a factor is 0; with
  ``max``/``min`` only the winner of its place gets ``g``.

Ties of ``max``/``min`` are pinned, so that each ``g_k`` goes to exactly one operand: ``data`` wins a
tie, then the first update in row-major order of ``updates``.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..graph.kinds import LINEAR, MAX, NORMALIZING, ROUTE
from .vjp import VjpContext, linear_bias, positions, vjp

#: op type -> (attribute, its default, {value: kind}): the ops whose kind depends on an attribute
KIND_BY_ATTRIBUTE = {op: ("reduction", "none", {"none": ROUTE, "add": LINEAR, "mul": NORMALIZING,
                                                 "max": MAX, "min": MAX})
                     for op in ("ScatterND", "ScatterElements")}


def _reduction(ctx: VjpContext) -> str:
    value = ctx.node.attr("reduction", "none")
    value = value.decode() if isinstance(value, bytes) else value
    if value not in KIND_BY_ATTRIBUTE[ctx.node.op_type][2]:
        raise ctx.fail(f"{ctx.node.op_type} with reduction '{value}' is not an ONNX reduction (none, add, "
                       "mul, max, min)")
    return value


def _gather(ctx: VjpContext, x: str) -> str:
    """The elements of ``x`` at the node's indices, shaped like its updates."""
    t, indices = ctx.tape, ctx.node.inputs[1]
    if ctx.node.op_type == "ScatterND":
        return t.op("GatherND", x, indices)
    return t.op("GatherElements", x, indices, axis=ctx.node.attr("axis", 0))


def _scatter(ctx: VjpContext, data: str, updates: str, reduction: str) -> str:
    """The node's scatter with its indices (and axis) on other operands and ``reduction``."""
    attrs = {"reduction": reduction}
    if ctx.node.op_type == "ScatterElements":
        attrs["axis"] = ctx.node.attr("axis", 0)
    return ctx.tape.op(ctx.node.op_type, data, ctx.node.inputs[1], updates, **attrs)


def _filled(t, like: str, value: float) -> str:
    fill = numpy_helper.from_array(np.full(1, value, dtype=t.float_dtype), "value")
    return t.op("ConstantOfShape", t.shape(like), value=fill)


def _route(ctx: VjpContext, g: str, reduction: str) -> tuple[str | None, str | None]:
    """none and add: ``g`` (add) or ``g ⊙ [not written]`` to data; the gathered ``g`` to the updates,
    without a reduction only where that update is the one the runtime kept."""
    t = ctx.tape
    data, indices, updates = ctx.node.inputs[:3]
    d_data = d_updates = None
    if ctx.active[0]:
        if reduction == "add":
            d_data = g
        else:
            kept = t.copy_node(ctx.node, [_filled(t, data, 1.0), indices, _filled(t, updates, 0.0)])
            d_data = t.op("Mul", g, kept)
    if ctx.active[2]:
        taken = _gather(ctx, g)
        if reduction == "add":
            d_updates = taken
        else:
            number = t.op("Add", t.op("Cast", positions(t, updates), to=t.float_type), t.scalar(1.0))
            written = t.copy_node(ctx.node, [_filled(t, data, 0.0), indices, number])
            won = t.op("Equal", _gather(ctx, written), number)
            d_updates = t.op("Where", won, taken, t.scalar(0.0))
    return d_data, d_updates


def _product(ctx: VjpContext, g: str) -> tuple[str | None, str | None]:
    """mul: ``a(data) = g ⊙ S_mul(1, u)``; ``a(u_i) = g_k ⊙ Π(others at k)``: with ``P_k`` the product
    of the nonzero factors at ``k`` (data included) and ``Z_k`` the count of zero ones, the others'
    product is ``P_k / u_i`` where ``Z_k = 0``, ``P_k`` where ``u_i = 0`` and ``Z_k = 1``, else 0."""
    t = ctx.tape
    data, updates = ctx.node.inputs[0], ctx.node.inputs[2]
    zero = t.scalar(0.0)
    d_data = d_updates = None
    if ctx.active[0]:
        d_data = t.op("Mul", g, _scatter(ctx, _filled(t, data, 1.0), updates, "mul"))
    if ctx.active[2]:
        def nonzero_and_count(x):
            is_zero = t.op("Equal", x, zero)
            return t.op("Where", is_zero, t.scalar(1.0), x), t.op("Cast", is_zero, to=t.float_type)

        u_nz, u_zeros = nonzero_and_count(updates)
        data_nz, data_zeros = nonzero_and_count(data)
        product = _gather(ctx, _scatter(ctx, data_nz, u_nz, "mul"))
        zeros = _gather(ctx, _scatter(ctx, data_zeros, u_zeros, "add"))
        u_is_zero = t.op("Equal", updates, zero)
        alone = t.op("Where", t.op("Equal", zeros, zero), t.op("Div", product, u_nz), zero)
        lone_zero = t.op("Where", t.op("Equal", zeros, t.scalar(1.0)), product, zero)
        others = t.op("Where", u_is_zero, lone_zero, alone)
        d_updates = t.op("Mul", _gather(ctx, g), others)
    return d_data, d_updates


def _winner(ctx: VjpContext, g: str) -> tuple[str | None, str | None]:
    """max, min: ``g_k`` to the operand equal to ``y_k``, data first, then the first such update
    (the smallest flat position among the updates of ``k`` equal to ``y_k``)."""
    t = ctx.tape
    data, updates = ctx.node.inputs[0], ctx.node.inputs[2]
    y = ctx.y
    data_wins = t.op("Equal", data, y)
    d_data = t.op("Where", data_wins, g, t.scalar(0.0)) if ctx.active[0] else None
    d_updates = None
    if ctx.active[2]:
        number = t.op("Add", t.op("Cast", positions(t, updates), to=t.float_type), t.scalar(1.0))
        at_y = t.op("Equal", updates, _gather(ctx, y))
        past = t.op("Add", t.op("Cast", t.op("ReduceProd", t.shape(updates), keepdims=0), to=t.float_type),
                    t.scalar(1.0))
        candidates = t.op("Where", at_y, number, past)
        first = _scatter(ctx, _filled(t, data, float("inf")), candidates, "min")
        taken = t.op("And", t.op("Equal", _gather(ctx, first), number), t.op("Not", _gather(ctx, data_wins)))
        d_updates = t.op("Where", taken, _gather(ctx, g), t.scalar(0.0))
    return d_data, d_updates


#: reduction -> the VJP of (data, updates)
BACK = {"none": lambda ctx, g: _route(ctx, g, "none"), "add": lambda ctx, g: _route(ctx, g, "add"),
        "mul": _product, "max": _winner, "min": _winner}


@vjp("ScatterND", "ScatterElements", kind=ROUTE)
def _scatter_vjp(ctx, g):
    """The VJP of the node's reduction (``BACK``; the module docstring)."""
    reduction = _reduction(ctx)
    if ctx.active[1]:
        raise ctx.fail(f"the {ctx.node.op_type} indices must be integers, not activations")
    d_data, d_updates = BACK[reduction](ctx, g[0])
    return [d_data, None, d_updates]


@linear_bias("ScatterND", "ScatterElements")
def _scatter_bias(ctx):
    """With ``reduction = add``: the operand that is not an activation, ``data`` or ``S(updates)``."""
    if not ctx.active[0]:
        return ctx.node.inputs[0]
    if not ctx.active[2]:
        t = ctx.tape
        return t.copy_node(ctx.node, [_filled(t, ctx.node.inputs[0], 0.0)] + ctx.node.inputs[1:3])
    return None
