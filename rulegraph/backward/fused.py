"""The backward of a fused node (``graph/fuse.py`` finds them): the members read again.

- ``vjp_of``: a fused node's VJP is its members' VJPs chained in reverse: the gradient of exactly
  what the forward computes, reading the members' forward tensors. Members that are no op of their
  own would have their VJPs in ``MEMBER_VJPS`` (every member now has a row in the VJP table);
- ``evaluate``: the members run on given inputs (``f(0)`` for the slope rule);
- ``emit_copy``: the members emitted again on other inputs (the repeat rule, the baseline pass).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto, helper

from ..graph.kinds import NONLINEAR
from ..graph.read import Graph, Node
from .emit import Tape
from .reverse import checked, walk_back
from .vjp import VJPS, VjpContext, fused_kind, registrar

#: VJPs of ops that rulegraph differentiates only as members of a fused node (they have no kind)
MEMBER_VJPS: dict[str, Callable[[VjpContext, list], list]] = {}


member_vjp = registrar(MEMBER_VJPS)

#: SiLU (Swish) is not an ONNX op: it names the pattern ``x·Sigmoid(x)``, so that a rule file can bind it
fused_kind("SiLU", NONLINEAR)


#: fused op types whose own VJP, reading the fused node's output, is the gradient of what the members
#: compute, where the members' chain is not: the NaN-guarded Softmax (``Where(IsNaN(s), 0, s)``), whose
#: chain multiplies by the raw Softmax ``s`` (NaN on fully masked rows, where the guarded output is 0
#: and the gradient is 0, as torch's ``_safe_softmax`` gives)
OWN_VJP = frozenset({"Softmax"})


def vjp_of(node: Node) -> Callable[[VjpContext, list], list] | None:
    """The VJP emitter of ``node``: the VJP table's entry, or for a fused node its members' chain
    (its own op's entry for ``OWN_VJP``)."""
    if node.members and node.op_type not in OWN_VJP:
        return _fused_vjp
    return VJPS.get(node.op_type)


def apply_vjp(ctx: VjpContext, g: list[str | None]) -> list[str | None]:
    """The VJP of ``ctx.node`` (plain or fused) applied to ``g``; None for inactive inputs."""
    fn = vjp_of(ctx.node)
    if fn is None:
        raise ctx.fail(f"no VJP for op type {ctx.node.op_type}; supported: {', '.join(sorted(VJPS))}")
    result = checked(f"VJP of {ctx.node.op_type}", ctx.node, fn(ctx, g))
    return [r if active else None for r, active in zip(result, ctx.active)]


def _fused_vjp(ctx: VjpContext, g: list[str | None]) -> list[str | None]:
    """The members' VJPs in reverse order (``reverse.walk_back``); a tensor that feeds several members
    (``x`` in ``x·Sigmoid(x)``) sums their cotangents."""
    tape, graph = ctx.tape, ctx.graph

    def member_step(member: Node, g_member: list[str | None]) -> list[str | None]:
        fn = VJPS.get(member.op_type) or MEMBER_VJPS.get(member.op_type)
        if fn is None:
            raise ctx.fail(f"no VJP for {member}, a member of this fused {ctx.node.op_type}")
        active = [t in graph.active for t in member.inputs]
        return checked(f"VJP of {member.op_type}", member,
                       fn(VjpContext(member, graph, tape, active, ctx.request_output), g_member))

    seeds = {o: [gi] for o, gi in zip(ctx.node.outputs, g) if gi is not None}
    cotangents = walk_back(tape, ctx.node.members, seeds, graph.active, member_step)
    return [tape.sum(cotangents[t]) if a and t in cotangents else None for t, a in zip(ctx.node.inputs, ctx.active)]


def evaluate(graph: Graph, node: Node, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``node`` (a fused node: its members in order) on ``feeds`` and the graph's constants with
    the ONNX reference evaluator; returns its outputs."""
    from onnx.reference import ReferenceEvaluator

    protos = []
    for m in node.members or [node]:
        proto = helper.make_node(m.op_type, m.inputs, m.outputs, name=m.name, domain=m.domain)
        proto.attribute.extend(m.attribute_protos)
        protos.append(proto)
    produced = {o for p in protos for o in p.output}
    needed = list(dict.fromkeys(i for p in protos for i in p.input if i and i not in produced))
    values = {name: feeds[name] if name in feeds else graph.constants[name] for name in needed}
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in values.items()]
    outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.outputs if o]
    model = helper.make_model(helper.make_graph(protos, "evaluate", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", graph.opset)])
    return ReferenceEvaluator(model).run(None, values)


def emit_copy(tape: Tape, node: Node, inputs: list[str | None]) -> list[str]:
    """``node`` emitted again on ``inputs`` (a fused node: its members, wired alike); its outputs."""
    if not node.members:
        out = tape.copy_node(node, inputs, outputs=len(node.outputs))
        return [out] if isinstance(out, str) else out
    names = {t: i for t, i in zip(node.inputs, inputs) if t}
    for m in node.members:
        out = tape.copy_node(m, [names.get(i, i) for i in m.inputs], outputs=len(m.outputs))
        names.update(zip(m.outputs, [out] if isinstance(out, str) else out))
    return [names[o] for o in node.outputs]
