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

from ..graph.kinds import DEFAULT_DOMAINS, NONLINEAR, ROUTE, onnx_op_type
from ..graph.read import Graph, Node
from .emit import Tape
from .reverse import checked, walk_back
from .vjp import VJPS, VjpContext, fused_kind, registrar

#: VJPs of ops that rulegraph differentiates only as members of a fused node (they have no kind)
MEMBER_VJPS: dict[str, Callable[[VjpContext, list], list]] = {}


member_vjp = registrar(MEMBER_VJPS)

#: SiLU (Swish) is not an ONNX op: it names the pattern ``x·Sigmoid(x)``, so that a rule file can bind it
fused_kind("SiLU", NONLINEAR)
#: QuantizeLinear → DequantizeLinear of an activation, read in float (``graph/fuse.py``, qdq)
fused_kind("QuantizeDequantize", ROUTE)


def _straight_through(ctx: VjpContext, g: list[str | None]) -> list[str | None]:
    """The straight-through estimator (Bengio et al. 2013), clipped as torch's fake quantization is:
    the rounding's derivative, 0 almost everywhere, is taken as 1 where ``x`` lies in the range the
    integer type represents (``round(x/s) + z`` in ``[q_min, q_max]``, i.e. ``x`` within half a step
    of ``[DQ(q_min), DQ(q_max)]``), and 0 outside it (saturated, as below a ReLU the quantizer
    absorbed): ``a(x) = a(y)`` inside the range, 0 outside."""
    t = ctx.tape
    quantize, dequantize = ctx.node.members
    q = quantize.outputs[0]
    dtype = helper.tensor_dtype_to_np_dtype(ctx.graph.dtypes[q])
    info = np.iinfo(dtype)
    x = ctx.node.inputs[0]
    bounds = []
    for value in (info.min, info.max):
        filled = t.op("Expand", t.const(np.array(value, dtype=dtype), hint="qbound"), t.shape(q))
        bounds.append(t.copy_node(dequantize, [filled] + dequantize.inputs[1:]))
    # half a step beyond either bound still rounds into the range: s/2 = (hi − lo) / (2 (q_max − q_min))
    half = t.op("Mul", t.op("Sub", bounds[1], bounds[0]), t.scalar(0.5 / (float(info.max) - float(info.min))))
    inside = t.op("And", t.op("GreaterOrEqual", x, t.op("Sub", bounds[0], half)),
                  t.op("LessOrEqual", x, t.op("Add", bounds[1], half)))
    return [t.gate(inside, g[0])]


#: fused op types whose VJP is not their members' chain
FUSED_VJPS: dict[str, Callable[[VjpContext, list], list]] = {"QuantizeDequantize": _straight_through}


#: fused op types whose own VJP, reading the fused node's output, is the gradient of what the members
#: compute, where the members' chain is not: the NaN-guarded Softmax (``Where(IsNaN(s), 0, s)``), whose
#: chain multiplies by the raw Softmax ``s`` (NaN on fully masked rows, where the guarded output is 0
#: and the gradient is 0, as torch's ``_safe_softmax`` gives)
OWN_VJP = frozenset({"Softmax"})


def vjp_of(node: Node) -> Callable[[VjpContext, list], list] | None:
    """The VJP emitter of ``node``: the VJP table's entry, or for a fused node its members' chain
    (its own op's entry for ``OWN_VJP``; ``FUSED_VJPS`` for a fused-only op)."""
    if node.members and node.op_type not in OWN_VJP:
        return FUSED_VJPS.get(node.op_type, _fused_vjp)
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
        proto = helper.make_node(onnx_op_type(m.op_type, m.domain), m.inputs, m.outputs, name=m.name,
                                 domain=m.domain)
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
    if any(p.domain not in DEFAULT_DOMAINS for p in protos):  # the reference has no com.microsoft ops
        import onnxruntime

        model.opset_import.extend(e for e in graph.model.opset_import if e.domain not in DEFAULT_DOMAINS)
        model.ir_version = graph.model.ir_version
        for out in model.graph.output:  # onnxruntime wants the outputs' types
            out.type.tensor_type.elem_type = graph.dtypes.get(out.name, TensorProto.FLOAT)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, values)
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
