"""What a model must be for rulegraph to read it, checked before anything else runs on it.

Each check names the node or tensor at fault and what would fix it (``ModelError``): names that
are not UTF-8 text (a damaged file), an explainer rulegraph compiled (refused: explain the
original model), opsets and IR versions newer than the installed onnx package, op types no ONNX
opset defines, tensors that nothing provides (a dropped initializer), tensors written twice
(``check_structure``); then, once the nodes are sorted, ``onnx.checker`` for the rest
(``check_valid``). Inputs declared without a
shape get their rank from their consumers (a Conv's weight, a pool's kernel, Gemm) or from the
arrays of the first run (``ranks``), as symbolic dims ``<input>_dim<k>``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ModelError, did_you_mean, node_ref
from . import large

#: the inputs a compiled explainer takes (``compile/build.py``): a model that has one is an explainer
TARGET = "rulegraph/target"
SEED = "rulegraph/seed"

#: metadata key of a compiled explainer: the original model's outputs, a JSON list
EXPLAINER_KEY = "rulegraph.explainer_of"

_DEFAULT_DOMAINS = ("", "ai.onnx")
#: op types that onnxruntime runs in the standard domain though no ONNX opset defines them (its
#: transformer optimizer writes them there): read as any op; the op table decides (``domains.py``)
ONNXRUNTIME_STANDARD_OPS = frozenset({"SimplifiedLayerNormalization"})
#: the domain such a node is given for ``onnx.checker`` only, which would refuse it in the standard one
_CHECKED_AS = "ai.onnxruntime.standard"


def check_structure(proto: onnx.ModelProto) -> None:
    """Refuse what rulegraph cannot read, naming the node or tensor (module docstring)."""
    _check_text(proto)
    _refuse_explainer(proto)
    _check_versions(proto)
    _check_op_types(proto)
    _check_tensors(proto)
    _check_data_sizes(proto)


def check_valid(proto: onnx.ModelProto) -> None:
    """``onnx.checker`` (no shape inference) on a model whose nodes are sorted, in the user's terms.
    A large model (``large.is_large``) is checked without its weights' values: the checker cannot
    take a protobuf over 2 GiB."""
    proto = checkable(large.without_weights(proto))
    # the checker wants a shape on every declared type; onnxruntime (and ONNX itself) allows none:
    # declare an empty one for the check only (full_check=False compares no shapes)
    g = proto.graph
    shapeless = [vi.type.tensor_type for vi in list(g.input) + list(g.output) + list(g.value_info)
                 if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape")]
    for tensor_type in shapeless:
        tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(without_deprecated(proto), full_check=False)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelError(f"not a valid ONNX model: {_first_lines(str(exc))}") from exc
    finally:
        for tensor_type in shapeless:
            tensor_type.ClearField("shape")


#: ops the checker calls deprecated at these opsets that onnxruntime still runs and rulegraph
#: differentiates: GroupNormalization-18 (scale and bias per group; opset 21 made them per channel)
_RUNS_DEPRECATED = {"GroupNormalization": range(18, 21)}


def without_deprecated(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto``, or a copy for the checker whose ``_RUNS_DEPRECATED`` nodes are a Sum of the same
    tensors (the checker, which infers no shapes here, has nothing else to say about them)."""
    version = next((e.version for e in proto.opset_import if e.domain in _DEFAULT_DOMAINS), 0)
    hits = [i for i, n in enumerate(proto.graph.node)
            if n.domain in _DEFAULT_DOMAINS and version in _RUNS_DEPRECATED.get(n.op_type, ())]
    if not hits:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for i in hits:
        node = copy.graph.node[i]
        node.op_type = "Sum"
        node.ClearField("attribute")
    return copy


def checkable(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` as ``onnx.checker`` can check it: a copy whose ``ONNXRUNTIME_STANDARD_OPS`` nodes are
    in a domain of their own (the checker knows no such op in the standard domain), and without the
    deprecated ops onnxruntime still runs (``without_deprecated``); ``proto`` itself when it has none."""
    proto = without_deprecated(proto)
    nodes = proto.graph.node
    if not any(n.domain in _DEFAULT_DOMAINS and n.op_type in ONNXRUNTIME_STANDARD_OPS for n in nodes):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in copy.graph.node:
        if node.domain in _DEFAULT_DOMAINS and node.op_type in ONNXRUNTIME_STANDARD_OPS:
            node.domain = _CHECKED_AS
    copy.opset_import.append(helper.make_opsetid(_CHECKED_AS, 1))
    return copy


def _first_lines(text: str, n: int = 4) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[:n])


def _refuse_explainer(proto: onnx.ModelProto) -> None:
    meta = {p.key: p.value for p in proto.metadata_props}
    inputs = [i.name for i in proto.graph.input]
    marks = [i for i in inputs if i in (TARGET, SEED)]  # an explainer takes one or the other
    if EXPLAINER_KEY not in meta and not marks:
        return
    try:
        originals = json.loads(meta.get(EXPLAINER_KEY, "null"))
    except ValueError:
        originals = None
    if not isinstance(originals, list):
        originals = [o.name for o in proto.graph.output if not o.name.startswith(("rulegraph/", "rg"))]
    raise ModelError(
        "this model is already a rulegraph explainer (it takes "
        f"{', '.join(repr(m) for m in marks) or 'the inputs rulegraph adds'}); its first outputs "
        f"{', '.join(repr(o) for o in originals)} are the original model's: explain the original model "
        "instead, or run this file as it is with onnxruntime")


def _check_text(proto: onnx.ModelProto) -> None:
    """Names are UTF-8 text; protobuf hands back the bytes of one that is not (a damaged file)."""
    g = proto.graph

    def refuse(what: str, value: bytes) -> None:
        raise ModelError(f"{what} {value!r} is not UTF-8 text: the file is damaged (re-export it)")

    for entry in proto.opset_import:
        if isinstance(entry.domain, bytes):
            refuse("an opset domain", entry.domain)
    for i, node in enumerate(g.node):
        fields = [("name", node.name), ("op type", node.op_type), ("domain", node.domain)]
        fields += [("input", t) for t in node.input] + [("output", t) for t in node.output]
        fields += [("attribute", a.name) for a in node.attribute]
        label = node.name if isinstance(node.name, str) and node.name else f"#{i}"
        for what, value in fields:
            if isinstance(value, bytes):
                refuse(f"node '{label}': its {what}", value)
    for kind, entries in (("graph input", g.input), ("graph output", g.output),
                          ("initializer", g.initializer), ("value info", g.value_info)):
        for entry in entries:
            if isinstance(entry.name, bytes):
                refuse(f"the name of a {kind}, tensor", entry.name)


def _check_versions(proto: onnx.ModelProto) -> None:
    known = onnx.defs.onnx_opset_version()
    for entry in proto.opset_import:
        if entry.domain in _DEFAULT_DOMAINS and entry.version > known:
            raise ModelError(f"the model imports ONNX opset {entry.version}, newer than the installed onnx "
                             f"package knows ({known}, onnx {onnx.__version__}): upgrade onnx, or export "
                             f"the model at opset {known} or lower")
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelError(f"the model has IR version {proto.ir_version}, newer than the installed onnx "
                         f"package reads ({onnx.IR_VERSION}, onnx {onnx.__version__}): upgrade onnx")


def _check_op_types(proto: onnx.ModelProto) -> None:
    for i, node in enumerate(proto.graph.node):
        if node.domain in _DEFAULT_DOMAINS and not onnx.defs.has(node.op_type) \
                and node.op_type not in ONNXRUNTIME_STANDARD_OPS:
            names = [s.name for s in onnx.defs.get_all_schemas() if s.domain in _DEFAULT_DOMAINS]
            raise ModelError(f"{node_ref(node.name or f'#{i}', node.op_type)}: no ONNX opset defines op type "
                             f"'{node.op_type}'{did_you_mean(node.op_type, names)}")


def _check_tensors(proto: onnx.ModelProto) -> None:
    """Every tensor a node reads is provided once: by a node, an initializer or a graph input."""
    g = proto.graph
    provided = ({i.name for i in g.input} | {i.name for i in g.initializer}
                | {i.values.name for i in g.sparse_initializer})
    for i, node in enumerate(g.node):
        for t in node.output:
            if not t:
                continue
            if t in provided:
                raise ModelError(f"{node_ref(node.name or f'#{i}', node.op_type)} writes tensor '{t}', which "
                                 "another node, an initializer or a graph input already provides")
            provided.add(t)
    for i, node in enumerate(g.node):
        for t in node.input:
            if t and t not in provided:
                raise ModelError(f"{node_ref(node.name or f'#{i}', node.op_type)} reads tensor '{t}', which "
                                 "no node, initializer or graph input provides (a missing initializer?)")
    for out in g.output:
        if out.name not in provided:
            raise ModelError(f"graph output '{out.name}' is computed by no node, initializer or input")


#: element types narrower than a byte: their raw size is not dims × itemsize
SUB_BYTE_TYPES = frozenset(getattr(TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2",
                                                                   "UINT2") if hasattr(TensorProto, name))


def byte_size(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a tensor's raw data, or None for types without a fixed byte width (strings, 4-bit)."""
    if tensor.data_type in SUB_BYTE_TYPES or tensor.data_type == TensorProto.STRING:
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # noqa: BLE001 (an unknown type: no size check; the checker names it)
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


#: the typed field holding one entry per element, for types stored that way (complex: two; sub-byte: packed)
ONE_PER_ELEMENT = ("float_data", "double_data", "int64_data", "uint64_data", "int32_data")


def _check_data_sizes(proto: onnx.ModelProto) -> None:
    """Every initializer and Constant tensor holds as many values as its shape says."""
    g = proto.graph
    tensors = [(t, "initializer") for t in g.initializer]
    tensors += [(a.t, f"the tensor of {node_ref(n.name or f'#{i}', n.op_type)}") for i, n in enumerate(g.node)
                for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for tensor, what in tensors:
        if tensor.data_location == TensorProto.EXTERNAL or tensor.data_type in SUB_BYTE_TYPES:
            continue
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if tensor.HasField("raw_data"):
            expected, held = byte_size(tensor), len(tensor.raw_data)
            unit = "bytes"
        else:
            field = next((f for f in ONE_PER_ELEMENT if len(getattr(tensor, f))), None)
            if field is None or tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
                continue
            expected, held, unit = count, len(getattr(tensor, field)), "values"
        if expected is not None and held != expected:
            raise ModelError(f"{what} '{tensor.name}' holds {held} {unit}, but its shape {list(tensor.dims)} "
                             f"needs {expected}: the file is damaged (re-export it)")


# ranks of inputs declared without a shape ---------------------------------------------------------


def _weight_rank(proto: onnx.ModelProto, node: onnx.NodeProto) -> int | None:
    weights = {i.name: i for i in proto.graph.initializer}
    if len(node.input) > 1 and node.input[1] in weights:
        return len(weights[node.input[1]].dims)
    return None


def _kernel_rank(proto: onnx.ModelProto, node: onnx.NodeProto) -> int | None:
    kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
    return None if kernel is None else len(kernel) + 2


#: op type -> the rank its first input must have, read from the node (None: not known)
RANK_OF_FIRST_INPUT = {
    "Conv": _weight_rank,
    "ConvTranspose": _weight_rank,
    "MaxPool": _kernel_rank,
    "AveragePool": _kernel_rank,
    "LpPool": _kernel_rank,
    "Gemm": lambda proto, node: 2,
}


def declare_missing_ranks(proto: onnx.ModelProto, ranks: dict[str, int] | None = None) -> None:
    """Give every graph input declared without a shape a rank: from ``ranks`` (the first run's
    arrays), else from a consumer that fixes it; symbolic dims ``<input>_dim<k>``."""
    ranks = dict(ranks or {})
    initializers = {i.name for i in proto.graph.initializer}
    for vi in proto.graph.input:
        tensor_type = vi.type.tensor_type
        if vi.name in initializers or not vi.type.HasField("tensor_type") or tensor_type.HasField("shape"):
            continue
        rank = ranks.get(vi.name)
        for node in proto.graph.node:
            if rank is not None:
                break
            if node.input and node.input[0] == vi.name and node.op_type in RANK_OF_FIRST_INPUT:
                rank = RANK_OF_FIRST_INPUT[node.op_type](proto, node)
        if rank is None:
            continue
        tensor_type.shape.SetInParent()
        for k in range(rank):
            tensor_type.shape.dim.add().dim_param = f"{vi.name}_dim{k}"


def missing_ranks(proto: onnx.ModelProto) -> list[str]:
    """Graph inputs (not initializers) that still have no declared shape."""
    initializers = {i.name for i in proto.graph.initializer}
    return [vi.name for vi in proto.graph.input if vi.name not in initializers
            and vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape")]


def explainer_metadata(original_outputs: list[str]) -> onnx.StringStringEntryProto:
    """The metadata entry that marks a compiled explainer (read by ``check_structure``)."""
    return onnx.StringStringEntryProto(key=EXPLAINER_KEY, value=json.dumps(original_outputs))

