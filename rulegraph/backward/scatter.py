"""ScatterND and ScatterElements on activations: their VJPs and their kinds.

``y = Scatter(data, indices, updates)``. Without a reduction each written element of ``y`` is one
element of ``updates`` and every other one an element of ``data``: a route. With ``reduction = add``,
``y = data + S(updates)`` (``S`` adds each update into its place): linear. The indices are integers
(never active; constant or computed at run time alike).

- ``data``: ``g`` (add), or ``g`` where no update was written (none);
- ``updates``: ``g`` gathered at the indices (GatherND / GatherElements); without a reduction an
  update that another one overwrote gets nothing: the node re-run on the updates' numbers says which
  one the runtime kept.

``mul``, ``max`` and ``min`` reductions are refused by name.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..graph.kinds import LINEAR, ROUTE
from .vjp import VjpContext, linear_bias, positions, vjp

#: op type -> (attribute, its default, {value: kind}): the ops whose kind depends on an attribute
KIND_BY_ATTRIBUTE = {op: ("reduction", "none", {"none": ROUTE, "add": LINEAR})
                     for op in ("ScatterND", "ScatterElements")}

_SUPPORTED = ("none", "add")


def _reduction(ctx: VjpContext) -> str:
    value = ctx.node.attr("reduction", "none")
    value = value.decode() if isinstance(value, bytes) else value
    if value not in _SUPPORTED:
        raise ctx.fail(f"{ctx.node.op_type} with reduction '{value}' is not supported (only 'none' and "
                       "'add' are: their gradients are selections); scatter with 'add' or without a "
                       "reduction")
    return value


def _gather(ctx: VjpContext, x: str) -> str:
    """The elements of ``x`` at the node's indices, shaped like its updates."""
    t, indices = ctx.tape, ctx.node.inputs[1]
    if ctx.node.op_type == "ScatterND":
        return t.op("GatherND", x, indices)
    return t.op("GatherElements", x, indices, axis=ctx.node.attr("axis", 0))


def _filled(t, like: str, value: float) -> str:
    fill = numpy_helper.from_array(np.full(1, value, dtype=t.float_dtype), "value")
    return t.op("ConstantOfShape", t.shape(like), value=fill)


@vjp("ScatterND", "ScatterElements", kind=ROUTE)
def _scatter(ctx, g):
    """``a(data) = g`` (add) or ``g ⊙ [not written]`` (none); ``a(updates) = gather(g)``, without a
    reduction only where that update is the one the runtime kept."""
    t = ctx.tape
    data, indices, updates = ctx.node.inputs[:3]
    reduction = _reduction(ctx)
    if ctx.active[1]:
        raise ctx.fail(f"the {ctx.node.op_type} indices must be integers, not activations")
    out: list[str | None] = [None, None, None]
    if ctx.active[0]:
        if reduction == "add":
            out[0] = g[0]
        else:
            kept = t.copy_node(ctx.node, [_filled(t, data, 1.0), indices, _filled(t, updates, 0.0)])
            out[0] = t.op("Mul", g[0], kept)
    if ctx.active[2]:
        taken = _gather(ctx, g[0])
        if reduction == "add":
            out[2] = taken
        else:
            number = t.op("Add", t.op("Cast", positions(t, updates), to=t.float_type), t.scalar(1.0))
            written = t.copy_node(ctx.node, [_filled(t, data, 0.0), indices, number])
            won = t.op("Equal", _gather(ctx, written), number)
            out[2] = t.op("Where", won, taken, t.scalar(0.0))
    return out


@linear_bias("ScatterND", "ScatterElements")
def _scatter_bias(ctx):
    """With ``reduction = add``: the operand that is not an activation, ``data`` or ``S(updates)``."""
    if not ctx.active[0]:
        return ctx.node.inputs[0]
    if not ctx.active[2]:
        t = ctx.tape
        return t.copy_node(ctx.node, [_filled(t, ctx.node.inputs[0], 0.0)] + ctx.node.inputs[1:3])
    return None
