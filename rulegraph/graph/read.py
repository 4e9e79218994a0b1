"""ONNX -> Graph: nodes in topological order, constants, shapes, dtypes and op kinds.

Reading a model:

0. refuse what cannot be read (``model_check``: explainers, unknown ops and opsets, tensors nothing
   provides, bad external data), naming the file and the node or tensor; sort the nodes
   topologically (exports occur unsorted; onnxruntime runs them) and give inputs declared without a
   shape their rank;
1. refuse ops outside the default ONNX domain that the op table does not know, and the ops of
   onnxruntime's tools that rulegraph does not explain (``domains.py``), naming the node; a node
   of another domain is keyed ``domain.op_type`` (``kinds.op_key``); a Gelu with a bias
   (``BiasGelu``, ``FastGelu``) is read as the Add and the Gelu it computes;
2. upgrade opsets below ``MIN_OPSET`` (the backward needs ScatterElements with ``reduction="add"``,
   opset 16);
3. name unnamed nodes; treat initializers, Constant nodes and graph inputs that have an
   initializer (old exports such as mnist-8) as constants, and fold every node whose inputs are all
   constants (a Reshape of a weight, shape arithmetic on static shapes), then the entries of
   ``Shape`` of an activation that are static (all but the batch) and what is computed from them
   (``static_shapes``: Swin's window padding);
4. infer shapes and dtypes;
5. mark *active* tensors: floats computed from a float graph input or from an embedding lookup
   (a *token source*, below). Only active tensors carry an associated number; integer tensors
   (shapes, token ids) and constants never do;
6. fuse multi-node patterns (GELU, SiLU, HardSwish, LayerNorm written out by an exporter) into one
   node each, so that a rule binds to the op whichever exporter wrote it (``fuse.py``). The model
   proto is unchanged: the forward still runs the original nodes, only ``nodes`` shows one.

Between 3 and 4, recurrent nodes (LSTM, GRU, RNN) are unrolled into their per-step primitives
(``recurrent.py``): the model proto holds the primitives too, the outputs keep their names.

Token sources: a Gather (axis 0) whose data is a float constant (an embedding table) and whose
indices are an integer graph input (token ids), directly or through ops that keep every value
(``TOKEN_ROUTES``: Reshape, Squeeze, Cast, ...; a Transpose, XLNet's ids read time-major, whose order
the attribution undoes; a Slice that keeps every id, XLM's ``input_ids[:, -length:]``), is where the relevance pass finishes for that
input: its output is active, and the attribution of the ids is the number per token, summed over
the embedding axes (``Graph.sources``; ``compile/build.py``). Lookups whose indices are constant or are
computed from shapes (position ids from Range) are no sources: they get nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError, node_ref
from .domains import check_ops, split_biases, with_stand_ins
from .kinds import OpKinds, op_key
from .legacy_resize import restore_legacy_resize
from .model_check import byte_size, check_structure, check_valid, declare_missing_ranks
from .recurrent import Unrolled, expand_recurrent
from .slots import inactive_reads
from . import large
from .static_shapes import partial_values, unused_shape_nodes

MIN_OPSET = 17
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})
#: Ops that must never be folded even when their inputs are constant.
NOT_FOLDABLE = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                          "Multinomial", "Bernoulli"})
#: Ops whose integer output carries their float input's number: a QuantizeLinear, read with the
#: DequantizeLinear after it as one straight-through node (``fuse.py``, the qdq pattern)
QUANTIZERS = frozenset({"QuantizeLinear"})
#: Ops between token ids and their embedding lookup that keep every value (a Transpose reorders them;
#: the per-token attribution is transposed back, ``compile/build.py``).
TOKEN_ROUTES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Transpose"})


@dataclass
class Node:
    """One ONNX node, with its attributes as Python values and its op kind."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    attribute_protos: list[onnx.AttributeProto]
    domain: str = ""
    kind: str | None = None
    index: int = 0
    #: a fused node (fuse.py): the original nodes it stands for, in topological order; its
    #: inputs are the pattern's activation input (then constant inputs), its output the pattern's
    members: list[Node] = field(default_factory=list)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def __str__(self) -> str:
        return node_ref(self.name, self.op_type)


@dataclass
class Graph:
    """A model read for explanation. ``nodes`` holds only the nodes left after constant folding."""

    model: onnx.ModelProto
    opset: int
    nodes: list[Node]
    constants: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, int]
    shapes: dict[str, list[int | str | None] | None]
    active: set[str]
    nx: nx.DiGraph = field(repr=False)
    producer: dict[str, Node] = field(default_factory=dict)
    consumers: dict[str, list[Node]] = field(default_factory=dict)
    #: token sources: embedding lookup output -> the integer graph input holding its token ids
    sources: dict[str, str] = field(default_factory=dict)
    #: recurrent node name -> its per-step state tensors after unrolling (``recurrent.Unrolled``)
    recurrent: dict = field(default_factory=dict)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def is_const(self, tensor: str) -> bool:
        return tensor in self.constants

    def rank(self, tensor: str) -> int | None:
        shape = self.shapes.get(tensor)
        return None if shape is None else len(shape)

    def static_shape(self, tensor: str) -> tuple[int, ...] | None:
        if tensor in self.constants:
            return tuple(self.constants[tensor].shape)
        shape = self.shapes.get(tensor)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return tuple(shape)

    def dim(self, tensor: str, axis: int) -> int | str | None:
        if tensor in self.constants:
            return self.constants[tensor].shape[axis]
        shape = self.shapes.get(tensor)
        return None if shape is None else shape[axis]

    def is_float(self, tensor: str) -> bool:
        return self.dtypes.get(tensor) in FLOAT_TYPES

    def float_inputs(self) -> list[str]:
        return [i for i in self.inputs if self.is_float(i)]


def load_proto(proto: onnx.ModelProto, precision: str, ranks: dict[str, int] | None,
               op_kinds: OpKinds) -> Graph:
    check_structure(proto)
    check_ops(proto, op_kinds)
    _check_subgraphs(proto)
    for node in proto.graph.node:  # 'ai.onnx' is the default domain's other name (onnxruntime reads both)
        if node.domain == "ai.onnx":
            node.domain = ""
    _name_nodes(proto)
    split_biases(proto)
    sort_nodes(proto)
    check_valid(proto)
    if precision == "fp32":
        _upcast_half(proto)
    proto = _upgrade(proto)
    _name_nodes(proto)
    declare_missing_ranks(proto, ranks)
    constants = _collect_constants(proto)
    nodes_proto = _fold_constants(proto, constants)
    proto = _rebuild(proto, nodes_proto, constants)
    unrolled: dict[str, Unrolled] = {}
    if expand_recurrent(proto, constants, unrolled):
        proto = _rebuild(proto, list(proto.graph.node), constants)
    _name_batch(proto)
    proto = _fold_static_shapes(proto, constants)
    graph = _build(proto, constants, op_kinds)
    graph.recurrent = unrolled
    return graph


def _fold_static_shapes(proto: onnx.ModelProto, constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Fold shape arithmetic on static dimensions (``static_shapes``) and what it computes, until
    nothing more folds."""
    while True:
        found, tracked = partial_values(proto, constants)
        if not found:
            return proto
        constants.update(found)
        proto = _rebuild(proto, [n for n in proto.graph.node if not all(o in found for o in n.output if o)],
                         constants)
        proto = _rebuild(proto, unused_shape_nodes(proto, tracked), constants)
        proto = _rebuild(proto, _fold_constants(proto, constants), constants)


def sort_nodes(proto: onnx.ModelProto) -> None:
    """Put the graph's nodes in topological order: each node right after the last of its producers
    that came late, an already sorted graph unchanged. ONNX requires that order, yet onnxruntime
    runs graphs without it, so exports do occur unsorted."""
    nodes = list(proto.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    order: list[int] = []
    for root in range(len(nodes)):
        stack = [(root, iter(nodes[root].input))]
        while stack and state[root] != 2:
            i, inputs = stack[-1]
            state[i] = 1
            for t in inputs:
                j = producer.get(t)
                if j is None or state[j] == 2:
                    continue
                if state[j] == 1:
                    where = node_ref(nodes[j].name, nodes[j].op_type)
                    raise ModelError(f"the model graph has a cycle: {where} needs tensor '{t}', which "
                                     "depends on its own output")
                stack.append((j, iter(nodes[j].input)))
                break
            else:
                stack.pop()
                state[i] = 2
                order.append(i)
    if order != list(range(len(nodes))):
        del proto.graph.node[:]
        proto.graph.node.extend(nodes[i] for i in order)


def read_model(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        if large.to_hold(copy):
            large.hold_big(copy)
        return copy
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read the ONNX model: {exc}") from exc
    _load_external_data(proto, path)
    if large.to_hold(proto):
        large.hold_big(proto)
    return proto


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Read tensors stored beside the model, refusing any location outside the model's folder
    (symbolic links included) and offsets or lengths that do not fit the file or the tensor."""
    folder = path.resolve().parent
    every = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute
                                             if a.type == onnx.AttributeProto.TENSOR]
    tensors = [t for t in every if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in tensors:
        _check_external(tensor, folder, path)
    if tensors and large.to_hold(proto):   # the big weights straight into arrays, held once
        large.read_held(proto, folder)
        tensors = [t for t in every if t.data_location == onnx.TensorProto.EXTERNAL and not large.is_held(t)]
        try:
            for tensor in tensors:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
        except Exception as exc:  # noqa: BLE001 (whatever onnx's reader says, in the user's terms)
            raise ModelError(f"{path}: cannot read the external data: {exc}") from exc
    elif tensors:
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
        except Exception as exc:  # noqa: BLE001 (whatever onnx's reader says, in the user's terms)
            raise ModelError(f"{path}: cannot read the external data: {exc}") from exc


def _check_external(tensor: onnx.TensorProto, folder: Path, path: Path) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    where = f"{path}: tensor '{tensor.name}'"
    if "\0" in location:
        raise ModelError(f"{where} keeps its data at a location with a NUL character ({location!r}); "
                         "re-save the model with its external data")
    target = (folder / location).resolve()
    if not location or Path(location).is_absolute() or folder not in target.parents:
        raise ModelError(f"{where} keeps its data at '{location}', outside the model's folder {folder}; "
                         "rulegraph reads external data only from that folder")
    if not target.is_file():
        raise ModelError(f"{where} keeps its data in '{location}', which is missing from {folder}")
    numbers = {}
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is not None and not (text.isascii() and text.isdigit()):
            raise ModelError(f"{where}: its external-data {key} '{text}' is not a byte count")
        numbers[key] = None if text is None else int(text)
    size = target.stat().st_size
    offset = numbers["offset"] or 0
    length = numbers["length"]
    if offset > size or (length is not None and offset + length > size):
        span = f"offset {offset}" + ("" if length is None else f" and length {length}")
        raise ModelError(f"{where}: its external-data {span} reach past the end of '{location}' "
                         f"({size} bytes); the file or the model is damaged")
    expected = byte_size(tensor)
    stored = size - offset if length is None else length
    if expected is not None and stored != expected:
        raise ModelError(f"{where}: '{location}' holds {stored} bytes for it from offset {offset}, but its "
                         f"shape {list(tensor.dims)} needs {expected}; the file or the model is damaged")


HALF_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _upcast_half(proto: onnx.ModelProto) -> None:
    """fp16/bf16 -> float32 everywhere a type is written: weights, graph inputs and outputs,
    value infos, Cast targets, ConstantOfShape values and Constant tensors. Exact: every half
    value is a float32 value."""
    graph = proto.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type in HALF_TYPES:
            graph.initializer[i].CopyFrom(large.initializer(large.value(init).astype(np.float32), init.name,
                                                            large.is_held(init)))
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type in HALF_TYPES:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i in HALF_TYPES:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF_TYPES:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32),
                                                        attr.t.name))


def opset_of(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ModelError("the model imports no default ONNX opset")


def _check_subgraphs(proto: onnx.ModelProto) -> None:
    for node in proto.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ModelError(f"{node_ref(node.name, node.op_type)} has a subgraph (control flow); "
                             "rulegraph explains straight-line graphs: export with the branch resolved and loops "
                             "unrolled (torch: torch.onnx.export(..., dynamo=True) traces them into plain "
                             "ops)")


def _upgrade(proto: onnx.ModelProto) -> onnx.ModelProto:
    version = opset_of(proto)
    if version >= MIN_OPSET:
        return proto
    try:
        upgraded = onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:
        raise ModelError(f"cannot upgrade the model from opset {version} to {MIN_OPSET} (needed by "
                         f"the backward pass): {exc}") from exc
    restore_legacy_resize(proto, upgraded, version)
    return upgraded


def _name_nodes(proto: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _collect_constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    constants = {init.name: large.value(init) for init in proto.graph.initializer}
    return constants


def _evaluate_nodes(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], opset: int,
                    domains: tuple = ()) -> dict:
    """Run nodes on constant inputs, all at once: onnxruntime when it is installed, else (or when
    it refuses) the ONNX reference evaluator. Returns every output by name."""
    produced = {o for n in nodes for o in n.output if o}
    feeds = {i: constants[i] for n in nodes for i in n.input if i and i not in produced}
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in feeds.items()]
    names = [o for n in nodes for o in n.output if o]
    graph = helper.make_graph(nodes, "fold", inputs, [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
                                                      for o in names])
    opsets = [helper.make_opsetid("", opset)] + [e for e in domains if e.domain not in ("", "ai.onnx")]
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=max(8, helper.find_min_ir_version_for(opsets, ignore_unknown=True)))
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        import onnxruntime  # imported here: reading a model must not need onnxruntime

        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        values = session.run(names, feeds)
    except Exception:  # noqa: BLE001 (no onnxruntime, or no kernel for a dtype: use the reference)
        from onnx.reference import ReferenceEvaluator

        values = ReferenceEvaluator(model).run(names, feeds)
    return {name: np.asarray(value) for name, value in zip(names, values)}


def _evaluate(node: onnx.NodeProto, constants: dict[str, np.ndarray], opset: int,
              domains: tuple = ()) -> list[np.ndarray]:
    """Run one node on constant inputs."""
    values = _evaluate_nodes([node], constants, opset, domains)
    return [values[o] for o in node.output if o]


def _fold_constants(proto: onnx.ModelProto, constants: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """Evaluate every node whose inputs are all constant (in one run); returns the nodes that remain."""
    opset = opset_of(proto)
    known = set(constants)
    foldable, remaining = [], []
    for node in proto.graph.node:
        if node.op_type not in NOT_FOLDABLE and all(not name or name in known for name in node.input):
            foldable.append(node)
            known.update(o for o in node.output if o)
        else:
            remaining.append(node)
    if not foldable:
        return remaining
    try:
        constants.update(_evaluate_nodes(foldable, constants, opset, tuple(proto.opset_import)))
    except Exception:  # noqa: BLE001 (find the node that fails, to name it)
        for node in foldable:
            try:
                constants.update(zip([o for o in node.output if o],
                                     _evaluate(node, constants, opset, tuple(proto.opset_import))))
            except Exception as exc:
                raise ModelError(f"{node_ref(node.name, node.op_type)}: cannot evaluate it on its constant "
                                 f"inputs: {exc}") from exc
    return remaining


def _rebuild(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], constants) -> onnx.ModelProto:
    """The model with folded nodes removed and every constant an initializer (used ones only)."""
    used = {name for node in nodes for name in node.input} | {o.name for o in proto.graph.output}
    graph = proto.graph
    inputs = [i for i in graph.input if i.name not in constants]
    held = large.to_hold(proto)   # big constants stay arrays, the model holds stubs (graph/large.py)
    initializers = [large.initializer(v, name, held) for name, v in constants.items() if name in used]
    new_graph = helper.make_graph(nodes, graph.name or "model", inputs, list(graph.output), initializers)
    # the lowest IR version that holds these opsets: runtimes lag behind the onnx package's newest IR
    ir_version = max(8, helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True))
    model = helper.make_model(new_graph, opset_imports=list(proto.opset_import), ir_version=ir_version)
    return model


#: the symbol of the dynamic batch dimension when no input names one
BATCH_SYMBOL = "N"


def _name_batch(proto: onnx.ModelProto) -> None:
    """One symbol for the dynamic batch dimension of every input (exporters write ``-1``, ``0``,
    nothing, or a symbol each), so that shape inference shows which tensors carry the batch; the
    outputs' declared dims that are not fixed are left to inference (exporters name them apart),
    except an output's first dim declared with an input's batch symbol: the exporter traced the
    batch there (through ops inference cannot follow, such as torch's ``as_strided`` pooling).
    A fixed first dimension (``1``) is kept: the model accepts only that batch."""
    dynamic = []
    for vi in proto.graph.input:
        shape = vi.type.tensor_type.shape if vi.type.tensor_type.HasField("shape") else None
        if shape is not None and len(shape.dim) and not (shape.dim[0].HasField("dim_value")
                                                         and shape.dim[0].dim_value > 0):
            dynamic.append(shape.dim[0])
    symbols = [d.dim_param for d in dynamic if d.dim_param and d.dim_param != "?"]
    symbol = symbols[0] if symbols else BATCH_SYMBOL
    for dim in dynamic:
        dim.Clear()
        dim.dim_param = symbol
    for vi in proto.graph.output:
        if vi.type.tensor_type.HasField("shape"):
            for i, dim in enumerate(vi.type.tensor_type.shape.dim):
                batch = i == 0 and dynamic and dim.HasField("dim_param") and dim.dim_param in symbols
                if not (dim.HasField("dim_value") and dim.dim_value > 0):
                    dim.Clear()
                if batch:
                    dim.dim_param = symbol


def _shape_of(type_proto) -> list[int | str | None] | None:
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


#: op types onnx infers no output shape for, whose output has the shape of their first input
SHAPE_OF_FIRST_INPUT = frozenset({"GroupNormalization"})


def _infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference, with the output of each ``SHAPE_OF_FIRST_INPUT`` node declared as its
    input's shape once that is known (and inference run again past it)."""
    inferred = large.infer_shapes(proto, strict_mode=False, data_prop=True)
    pending = [n for n in proto.graph.node
               if n.op_type in SHAPE_OF_FIRST_INPUT and n.domain in ("", "ai.onnx")]
    declared: list[onnx.ValueInfoProto] = []
    while pending:
        g = inferred.graph
        known = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)
                 if vi.type.tensor_type.HasField("shape")}
        ready = [n for n in pending if n.input[0] in known and n.output[0] not in known]
        if not ready:
            break
        for n in ready:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(known[n.input[0]])
            vi.name = n.output[0]
            declared.append(vi)
        pending = [n for n in pending if n not in ready]
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        copy.graph.value_info.extend(declared)
        inferred = large.infer_shapes(copy, strict_mode=False, data_prop=True)
    return inferred


def _build(proto: onnx.ModelProto, constants: dict[str, np.ndarray], op_kinds: OpKinds) -> Graph:
    try:
        inferred = _infer_shapes(with_stand_ins(proto))
    except Exception as exc:
        raise ModelError(f"shape inference failed on the model: {exc}") from exc
    dtypes: dict[str, int] = {}
    shapes: dict[str, list | None] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dtypes[vi.name] = vi.type.tensor_type.elem_type
        shapes[vi.name] = _shape_of(vi.type)
    for name, value in constants.items():
        dtypes[name] = helper.np_dtype_to_tensor_dtype(value.dtype)
        shapes[name] = list(value.shape)

    nodes: list[Node] = []
    for i, p in enumerate(proto.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in p.attribute}
        nodes.append(Node(p.name, op_key(p.op_type, p.domain), list(p.input), list(p.output), attrs,
                          list(p.attribute), p.domain, index=i))

    dag, producer, consumers = link(nodes)
    if not nx.is_directed_acyclic_graph(dag):
        raise ModelError("the model graph has a cycle")
    order = list(nx.lexicographical_topological_sort(dag, key=lambda name: dag.nodes[name]["node"].index))
    nodes = [dag.nodes[name]["node"] for name in order]
    for i, n in enumerate(nodes):
        n.index = i

    inputs = [i.name for i in proto.graph.input if i.name not in constants]
    graph = Graph(proto, opset_of(proto), nodes, constants, inputs, [o.name for o in proto.graph.output],
                  dtypes, shapes, set(), dag, producer, consumers)
    _mark_active(graph, op_kinds)
    return graph


def link(nodes: list[Node]) -> tuple[nx.DiGraph, dict[str, Node], dict[str, list[Node]]]:
    """(the DAG of ``nodes``, tensor -> producing node, tensor -> consuming nodes)."""
    dag = nx.DiGraph()
    producer = {o: n for n in nodes for o in n.outputs if o}
    consumers: dict[str, list[Node]] = {}
    for n in nodes:
        dag.add_node(n.name, node=n)
        for t in n.inputs:
            if not t:
                continue
            consumers.setdefault(t, []).append(n)
            if t in producer:
                dag.add_edge(producer[t].name, n.name, tensor=t)
    return dag, producer, consumers


def _mark_active(graph: Graph, op_kinds: OpKinds) -> None:
    """Active tensors: float outputs of nodes with an active input, starting at the float inputs
    and at the outputs of token sources (module docstring)."""
    active = set(graph.float_inputs())
    graph.sources = {}
    slots: dict = {}
    for n in graph.nodes:
        flags = [t in active for t in n.inputs]
        if any(flags):
            # a read of an active tensor's constant slots only (a class token) is a constant (slots.py)
            if not inactive_reads(graph, n, active, slots):
                active.update(o for o in n.outputs if o and (
                    graph.is_float(o) or (o not in graph.dtypes and n.op_type in op_kinds)
                    or n.op_type in QUANTIZERS))
        elif (ids := token_ids(graph, n)) is not None:
            graph.sources[n.outputs[0]] = ids
            active.add(n.outputs[0])
        n.kind = op_kinds.of(n.op_type, flags, n.attrs)
    graph.active = active


def token_ids(graph: Graph, node: Node) -> str | None:
    """The integer graph input whose values are the indices of ``node``, if ``node`` is an embedding
    lookup: a Gather on axis 0 of a float constant table; else None."""
    if node.op_type != "Gather" or node.attr("axis", 0) != 0 or len(node.inputs) < 2:
        return None
    table = graph.constants.get(node.inputs[0])
    if table is None or table.dtype.kind != "f" or table.ndim < 2:
        return None
    tensor = node.inputs[1]
    while tensor not in graph.inputs:
        producer = graph.producer.get(tensor)
        if producer is None or not producer.inputs or (producer.op_type not in TOKEN_ROUTES
                                                       and not whole_slice(graph, producer)):
            return None
        tensor = producer.inputs[0]
    return None if graph.is_float(tensor) else tensor


def whole_slice(graph: Graph, node: Node) -> bool:
    """Is ``node`` a Slice that keeps every element in order (XLM's ``input_ids[:, -length:]`` on ids
    of that length): constant starts, ends, axes and steps 1 covering each sliced axis of a
    statically known size?"""
    if node.op_type != "Slice" or len(node.inputs) < 3:
        return False
    starts, ends, axes, steps = (graph.constants.get(t) if t else None
                                 for t in (node.inputs[1:] + ["", "", ""])[:4])
    shape = graph.shapes.get(node.inputs[0])
    if starts is None or ends is None or shape is None:
        return False
    axes = range(len(starts)) if axes is None else [int(a) % len(shape) for a in axes]
    if steps is not None and np.any(steps != 1):
        return False
    for axis, start, end in zip(axes, starts, ends):
        size = shape[axis]
        if not isinstance(size, int):
            return False
        start, end = int(start) + size * (start < 0), int(end) + size * (end < 0)
        if max(start, 0) != 0 or min(end, size) != size:
            return False
    return True
