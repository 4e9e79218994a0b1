"""Guided backprop (Springenberg et al. 2015)."""

from __future__ import annotations

from ..graph.kinds import NONLINEAR
from .table import rule


@rule("guided", {NONLINEAR})
def guided(ctx) -> list[str | None]:
    """Guided backprop (Springenberg et al. 2015), Relu only: ``a(x) = 1[x > 0] · relu(a(y))``: the
    gradient, with negative numbers stopped on the way back as in the deconvnet."""
    if ctx.node.op_type != "Relu":
        raise ctx.fail("rule 'guided' (guided backprop) is defined for Relu only; bind another "
                       f"nonlinear rule to {ctx.node.op_type} nodes (e.g. `{ctx.node.op_type} -> gradient`)")
    grads = ctx.vjp([ctx.tape.op("Relu", ctx.a_out[0])])
    return grads
