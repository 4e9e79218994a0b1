"""Ops outside the standard ONNX domain, and quantized ops, that a model may hold.

A node of another domain is read when the op table knows its key (``kinds.op_key``:
``com.microsoft.SkipLayerNormalization``); any other is refused, naming the node. ``REFUSED`` names
the ops that onnxruntime's own tools write and rulegraph does not explain, each with the option of
that tool that avoids it:

- the transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model``) fuses a whole
  attention block into ``Attention`` / ``MultiHeadAttention`` and the embeddings into
  ``EmbedLayerNormalization``: their backward would have to be written again for each mask format,
  while the unfused attention is explained op by op;
- the quantizer (``onnxruntime.quantization``) in ``QuantFormat.QOperator`` writes integer ops
  (``QLinearConv``, ``QLinearMatMul``, ...): the path becomes integer and carries no number, whereas
  ``QuantFormat.QDQ`` keeps float ops between QuantizeLinear/DequantizeLinear pairs, explained in
  float straight-through.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..errors import ModelError, node_ref
from . import large
from .kinds import OpKinds, op_key

MS = "com.microsoft"

_OPTIMIZER = ("onnxruntime's transformer optimizer writes it; optimize with "
              "`FusionOptions(model_type)` and `options.{option} = False` "
              "(optimize_model(..., optimization_options=options)), which keeps the op {keeps}")
_QOPERATOR = ("it is an integer op of a QOperator-format quantized model, whose path carries no float "
              "number; quantize with `quant_format=QuantFormat.QDQ` (onnxruntime.quantization), whose "
              "QuantizeLinear/DequantizeLinear pairs rulegraph explains in float, straight-through")


def _optimizer(option: str, keeps: str) -> str:
    return _OPTIMIZER.format(option=option, keeps=keeps)


#: op key -> why it is refused and what avoids it
REFUSED: dict[str, str] = {
    f"{MS}.Attention": _optimizer("enable_attention", "by op (MatMul, Softmax, ...)"),
    f"{MS}.MultiHeadAttention": _optimizer("enable_attention", "by op (MatMul, Softmax, ...)"),
    f"{MS}.PackedAttention": _optimizer("enable_attention", "by op (MatMul, Softmax, ...)"),
    f"{MS}.PackedMultiHeadAttention": _optimizer("enable_attention", "by op (MatMul, Softmax, ...)"),
    f"{MS}.GroupQueryAttention": _optimizer("enable_attention", "by op (MatMul, Softmax, ...)"),
    f"{MS}.EmbedLayerNormalization": _optimizer("enable_embed_layer_norm",
                                                "as Gather, Add and LayerNormalization"),
    f"{MS}.BiasAdd": _optimizer("enable_bias_add", "as Add"),
    f"{MS}.BiasSplitGelu": _optimizer("enable_bias_splitgelu", "as Add, Split and Gelu"),
    f"{MS}.SkipGroupNorm": _optimizer("enable_skip_group_norm", "as Add and GroupNorm"),
    f"{MS}.GroupNorm": _optimizer("enable_group_norm", "as InstanceNormalization, Mul and Add"),
    f"{MS}.NhwcConv": _optimizer("enable_nhwc_conv", "as Conv"),
    **{key: _QOPERATOR for key in (
        "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
        *(f"{MS}.{op}" for op in (
            "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
            "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean",
            "QLinearWhere", "QGemm", "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul",
            "DynamicQuantizeMatMul", "MatMulIntegerToFloat")))},
    f"{MS}.QuickGelu": _optimizer("enable_gelu", "as x·Sigmoid(1.702·x)"),
}


def check_ops(proto: onnx.ModelProto, op_kinds: OpKinds) -> None:
    """Refuse a node the op table does not know when it is outside the standard domain or in
    ``REFUSED`` (an unknown standard op is refused later, where the rules bind), naming it; every op
    of ``REFUSED`` the model has is named at once, with what avoids it."""
    refused: dict[str, list[str]] = {}
    for i, node in enumerate(proto.graph.node):
        key = op_key(node.op_type, node.domain)
        if key in REFUSED:
            domain = f" (domain '{node.domain}')" if node.domain else ""
            refused.setdefault(key, []).append(f"{node_ref(node.name or f'#{i}', node.op_type)}{domain}")
    if refused:
        by_reason: dict[str, list[str]] = {}
        for key, nodes in refused.items():
            more = f" (and {len(nodes) - 1} more)" if len(nodes) > 1 else ""
            by_reason.setdefault(REFUSED[key], []).append(nodes[0] + more)
        raise ModelError("; ".join(f"{', '.join(nodes)} {'is' if len(nodes) == 1 else 'are'} not supported: "
                                   f"{why}" for why, nodes in by_reason.items()))
    for i, node in enumerate(proto.graph.node):
        key = op_key(node.op_type, node.domain)
        where = node_ref(node.name or f"#{i}", node.op_type)
        if key not in op_kinds and node.domain not in ("", "ai.onnx"):
            known = sorted(k for k in op_kinds.table if k.startswith(f"{node.domain}."))
            also = f" (it knows {', '.join(known)})" if known else ""
            raise ModelError(f"{where} is in domain '{node.domain}', whose op '{node.op_type}' rulegraph "
                             f"does not explain{also}; re-export without custom ops")


# shapes ------------------------------------------------------------------------------------------


def _like_first(node: onnx.NodeProto, outputs: tuple[int, ...]) -> list[onnx.NodeProto]:
    return [helper.make_node("Identity", [node.input[0]], [node.output[i]])
            for i in outputs if i < len(node.output) and node.output[i]]


def _fused_matmul(node: onnx.NodeProto, rank_of) -> list[onnx.NodeProto] | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    operands = []
    for x, flag in zip(node.input[:2], ("transA", "transB")):
        if attrs.get(flag, 0):
            rank = rank_of(x)
            if rank is None:
                return None
            perm = list(range(rank))
            perm[-2:] = perm[-1], perm[-2]
            swapped = helper.make_node("Transpose", [x], [f"{node.output[0]}/{flag}"], perm=perm)
            operands.append((x, [swapped]))
        else:
            operands.append((x, []))
    nodes = [n for _, made in operands for n in made]
    names = [made[0].output[0] if made else x for x, made in operands]
    return nodes + [helper.make_node("MatMul", names, [node.output[0]])]


#: op key -> the standard nodes that compute its outputs' types and shapes (not its values), for
#: ONNX shape inference, which knows no com.microsoft op; None where the shape cannot be told
STAND_INS = {
    f"{MS}.SkipLayerNormalization": lambda node, rank_of: _like_first(node, (0, 3)),
    f"{MS}.SkipSimplifiedLayerNormalization": lambda node, rank_of: _like_first(node, (0, 3)),
    "SimplifiedLayerNormalization": lambda node, rank_of: _like_first(node, (0,)),
    f"{MS}.FastGelu": lambda node, rank_of: _like_first(node, (0,)),
    f"{MS}.BiasGelu": lambda node, rank_of: _like_first(node, (0,)),
    f"{MS}.Gelu": lambda node, rank_of: _like_first(node, (0,)),
    f"{MS}.RotaryEmbedding": lambda node, rank_of: _like_first(node, (0,)),
    f"{MS}.FusedMatMul": _fused_matmul,
}


def with_stand_ins(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every node of ``STAND_INS`` replaced by its stand-in, for shape inference
    only (the proto itself unchanged); ``proto`` itself when it has none."""
    if not any(op_key(node.op_type, node.domain) in STAND_INS for node in proto.graph.node):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    nodes: list[onnx.NodeProto] = []

    def rank_of(tensor: str) -> int | None:  # inferred over the nodes so far (a transposed operand)
        inferred = large.infer_shapes(_partial(copy, nodes))
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info):
            if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
                return len(vi.type.tensor_type.shape.dim)
        return next((len(i.dims) for i in g.initializer if i.name == tensor), None)

    for node in copy.graph.node:
        make = STAND_INS.get(op_key(node.op_type, node.domain))
        made = make(node, rank_of) if make else None
        nodes.extend([node] if made is None else made)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def _partial(proto: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "partial", list(proto.graph.input), [], list(proto.graph.initializer))
    return helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)


# biased Gelus ------------------------------------------------------------------------------------

#: op key -> the op it is without its bias: ``BiasGelu(x, b)`` is ``Gelu(x + b)``, ``FastGelu(x, b)``
#: is ``FastGelu(x + b)``
BIASED = {f"{MS}.BiasGelu": "Gelu", f"{MS}.FastGelu": "FastGelu"}


def split_biases(proto: onnx.ModelProto) -> None:
    """Read a Gelu with a bias as the Add and the Gelu it computes (``BIASED``), in place: the Add is a
    linear node whose bias the rules see as any other's (blamed, or in the ε-rule's denominator),
    as in the model before onnxruntime's optimizer fused it. Exact: onnxruntime's kernel adds the
    bias in float, then applies the Gelu."""
    taken = {t for n in proto.graph.node for t in list(n.input) + list(n.output)}
    taken |= {n.name for n in proto.graph.node}
    nodes = []
    for node in proto.graph.node:
        op = BIASED.get(op_key(node.op_type, node.domain))
        if op is None or len(node.input) < 2 or not node.input[1]:
            nodes.append(node)
            continue
        summed = name = f"{node.output[0]}/biased"
        while summed in taken:
            summed = name = f"{summed}_"
        taken.add(summed)
        add_name = f"{node.name}/bias" if node.name else ""
        nodes.append(helper.make_node("Add", list(node.input[:2]), [summed], name=add_name))
        gelu = helper.make_node(op, [summed], list(node.output), name=node.name, domain=node.domain)
        gelu.attribute.extend(node.attribute)
        nodes.append(gelu)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
