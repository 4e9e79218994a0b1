"""Shape arithmetic on static dimensions, folded to constants when a model is read.

Exporters that trace a model (torch's TorchScript exporter) write a module's size arithmetic as ops:
Swin's window padding is ``Pad(x, pads)`` with ``pads`` computed from ``Shape(activation)``,
``Gather``, ``Mod``, ``Sub``, ``Concat``, ... The activation's shape is static but for the batch,
so every number the padding reads is a constant; only the batch dimension is not.

Each integer tensor on such a path is tracked as a *partial value*: its entries, and which of them
are known. ``Shape`` of a tensor whose inferred shape has fixed dims knows those entries; ops that
select or move entries (Gather and Slice by constant indices, Concat, Unsqueeze, Squeeze, Reshape
to a constant shape, Identity, Cast) carry what is known. An output whose entries are all known is
a constant: the reader folds it and whatever is computed from it (``read._fold_constants``), infers
shapes again and repeats until nothing more is known. The batch dimension (a symbol, or unknown)
is never taken for a constant; a fixed first dimension (an export for batch 1) is one, as the
model then accepts only that batch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from . import large

#: ops whose output entries are entries of their first input (selected or moved, never computed), and
#: the comparison and choice torch's TorchScript export writes for ``expand(n, -1, -1)``'s shape
#: (``Where(Equal(shape, -1), 1, shape)``): an entry is known where the entries it is made of are
CARRIERS = frozenset({"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast",
                      "Equal", "Where"})


class Partial:
    """An integer tensor's entries (``values``) and which are known (``known``, same shape)."""

    def __init__(self, values: np.ndarray, known: np.ndarray) -> None:
        self.values, self.known = values, known

    @classmethod
    def constant(cls, value: np.ndarray) -> Partial:
        value = np.asarray(value)
        return cls(value, np.ones(value.shape, dtype=bool))

    def apply(self, f) -> Partial:
        """The same entry-moving function applied to the values and to the mask."""
        return Partial(f(self.values), f(self.known))


def _dims(type_proto: onnx.TypeProto) -> list[int | None] | None:
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tensor.shape.dim]


def _shape(node: onnx.NodeProto, dims: list[int | None]) -> Partial:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = len(dims)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    chosen = dims[slice(start, end)]
    return Partial(np.array([d or 0 for d in chosen], dtype=np.int64),
                   np.array([d is not None for d in chosen], dtype=bool))


def _ints(constants: dict[str, np.ndarray], node: onnx.NodeProto, position: int, attr: str):
    """An integer list given as the input at ``position`` (a constant) or, in older opsets, as the
    attribute ``attr``; None when absent, False when computed at run time."""
    if position < len(node.input) and node.input[position]:
        value = constants.get(node.input[position])
        return False if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
    for a in node.attribute:
        if a.name == attr:
            return [int(v) for v in helper.get_attribute_value(a)]
    return None


def _carry(node: onnx.NodeProto, parts: list[Partial | None], constants) -> Partial | None:
    """The partial value of a carrier's output, or None when it cannot be followed."""
    first = parts[0]
    if first is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "Identity":
        return first
    if op == "Equal":
        other = parts[1]
        return None if other is None else Partial(first.values == other.values, first.known & other.known)
    if op == "Where":
        x, y = parts[1], parts[2]
        if x is None or y is None:
            return None
        chosen = np.where(first.values, x.known, y.known)
        return Partial(np.where(first.values, x.values, y.values), first.known & chosen)
    if op == "Cast":
        dtype = helper.tensor_dtype_to_np_dtype(attrs["to"])
        return Partial(first.values.astype(dtype), first.known) if dtype.kind in "iuf" else None
    if op == "Concat":
        if any(p is None for p in parts) or any(p.values.ndim != 1 for p in parts):
            return None
        dtype = np.result_type(*[p.values.dtype for p in parts])
        return Partial(np.concatenate([p.values.astype(dtype) for p in parts]),
                       np.concatenate([p.known for p in parts]))
    if op == "Gather":
        indices = constants.get(node.input[1])
        if indices is None or attrs.get("axis", 0) not in (0, -first.values.ndim):
            return None
        return first.apply(lambda a: np.take(a, indices.astype(np.int64), axis=0))
    if op == "Slice":
        starts, ends = _ints(constants, node, 1, "starts"), _ints(constants, node, 2, "ends")
        axes, steps = _ints(constants, node, 3, "axes"), _ints(constants, node, 4, "steps")
        if False in (starts, ends, axes, steps) or first.values.ndim != 1 or len(starts) != 1:
            return None
        if axes not in (None, [0], [-1]):
            return None
        step = steps[0] if steps else 1
        return first.apply(lambda a: a[starts[0]:ends[0]:step] if step else a)
    if op == "Unsqueeze":
        axes = _ints(constants, node, 1, "axes")
        if not axes:
            return None
        rank = first.values.ndim + len(axes)
        return first.apply(lambda a: np.expand_dims(a, tuple(sorted(x % rank for x in axes))))
    if op == "Squeeze":
        axes = _ints(constants, node, 1, "axes")
        if axes is False:
            return None
        return first.apply(lambda a: np.squeeze(a, None if not axes else tuple(axes)))
    if op == "Reshape":
        shape = constants.get(node.input[1])
        if shape is None or 0 in shape.tolist() and not attrs.get("allowzero", 0):
            return None
        return first.apply(lambda a: a.reshape(shape.astype(np.int64)))
    return None


def unused_shape_nodes(proto: onnx.ModelProto, tracked: set[str]) -> list[onnx.NodeProto]:
    """The nodes left after dropping, repeatedly, Shape and carrier nodes on ``tracked`` (integer shape
    values) whose outputs nothing reads any more (a ``Shape`` whose known entries were folded)."""
    nodes = list(proto.graph.node)
    while True:
        read = {i for n in nodes for i in n.input} | {o.name for o in proto.graph.output}
        kept = [n for n in nodes if not all(o in tracked and o not in read for o in n.output if o)]
        if len(kept) == len(nodes):
            return nodes
        nodes = kept


#: ops whose outputs' inferred shapes onnx and onnxruntime may disagree on: SplitToSequence with
#: ``keepdims = 0`` and a ``split`` input (onnx keeps the axis, as its spec says; onnxruntime drops
#: it for splits of size 1: Longformer's global-attention indices), and the control flow ops
UNTRUSTED_SHAPES = frozenset({"SplitToSequence", "SequenceAt", "SequenceConstruct", "SequenceInsert",
                              "SequenceErase", "ConcatFromSequence", "Loop", "Scan", "If"})


def _untrusted(proto: onnx.ModelProto) -> set[str]:
    """The tensors computed from an output of ``UNTRUSTED_SHAPES``: their inferred shapes are not
    folded into constants (a wrong rank there would be baked into the model)."""
    untrusted: set[str] = set()
    for node in proto.graph.node:
        if node.op_type in UNTRUSTED_SHAPES or any(i in untrusted for i in node.input):
            untrusted.update(o for o in node.output if o)
    return untrusted


def _unknown(shape: list[int | None] | None) -> Partial | None:
    """A short integer vector of static length computed at run time (``N · frames`` beside constant
    entries in a Concat): every entry unknown."""
    if shape is None or len(shape) != 1 or shape[0] is None or shape[0] > 8:
        return None
    return Partial(np.zeros(shape[0], dtype=np.int64), np.zeros(shape[0], dtype=bool))


def _short_concat(node: onnx.NodeProto, constants: dict[str, np.ndarray], dims: dict) -> bool:
    """A Concat of short integer vectors, some constant, the others of static length (a shape
    ``[N · frames, -1, -1]`` for Expand): its constant entries are known."""
    if node.op_type != "Concat" or not any(i in constants for i in node.input):
        return False
    return all(constants[i].ndim == 1 and constants[i].size <= 8 if i in constants
               else _unknown(dims.get(i)) is not None for i in node.input)


def partial_values(proto: onnx.ModelProto, constants: dict[str, np.ndarray]) -> tuple[dict, set[str]]:
    """(outputs of Shape and carrier nodes whose entries are all known, from the inferred shapes of the
    model's tensors, by name; every tensor tracked as a partial value). The nodes that compute the
    first can be dropped from the model."""
    try:
        inferred = large.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 (the reader's own inference names the failure)
        return {}, set()
    parts = partial_entries(proto, constants, inferred)
    found = {name: part.values for name, part in parts.items() if part.known.all()}
    return found, set(parts)


def partial_entries(proto: onnx.ModelProto, constants: dict[str, np.ndarray],
                    inferred: onnx.ModelProto | None = None) -> dict[str, Partial]:
    """Every integer tensor on shape arithmetic whose entries are partly known, by name (module
    docstring): the outputs of Shape and of the carriers reading them."""
    if inferred is None:
        try:
            inferred = large.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 (the reader's own inference names the failure)
            return {}
    graph = inferred.graph
    untrusted = _untrusted(proto)
    dims = {vi.name: _dims(vi.type) for vi in list(graph.input) + list(graph.value_info) + list(graph.output)
            if vi.name not in untrusted}
    dims.update({name: list(value.shape) for name, value in constants.items()})
    parts: dict[str, Partial] = {}
    for node in proto.graph.node:
        if node.op_type == "Shape" and len(node.input) == 1:
            shape = dims.get(node.input[0])
            part = None if shape is None else _shape(node, shape)
        elif node.op_type in CARRIERS and (any(i in parts for i in node.input)
                                           or _short_concat(node, constants, dims)):
            inputs = [parts.get(i) or (Partial.constant(constants[i]) if i in constants
                                       else _unknown(dims.get(i))) for i in node.input]
            try:
                part = _carry(node, inputs, constants)
            except (ValueError, IndexError, TypeError):  # entries the op refuses: onnxruntime will say so
                part = None
        else:
            continue
        if part is not None:
            parts[node.output[0]] = part
    return parts
