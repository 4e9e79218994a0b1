"""Which nodes of a model would leave the GPU: onnxruntime's CUDA kernel registry as data.

onnxruntime runs a node on the CUDA execution provider only if a CUDA kernel is registered for
its op type and domain, at the model's opset for that domain, and for the element type of its
type constraint; any other node runs on the CPU, with copies across the device boundary before
and after it. ``rulegraph/data/onnxruntime-cuda-kernels.csv`` is the CUDA section of onnxruntime's
generated kernel table (``docs/OperatorKernels.md``; its origin line is in ``rulegraph/data/README.md``):
one row per opset range with the types of the op's ``T`` constraint, or of its first constraint
in alphabetical order where the op has no ``T`` (the order the table lists them in).

A node is checked on the tensor bound to that constraint: its first input (else output) whose
formal parameter has the constraint's type string, with the element type from onnx's shape
inference. Only float tensors are checked: integer shape arithmetic (``Shape``, ``Gather`` of
shapes) is placed on the CPU by onnxruntime on purpose, since it is read there.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import defs

from ..graph import large

DATA = Path(__file__).resolve().parent.parent / "data" / "onnxruntime-cuda-kernels.csv"
FLOAT_TYPES = frozenset({"float", "double", "float16", "bfloat16"})
DEFAULT_DOMAIN = "ai.onnx"


@dataclass(frozen=True)
class Fallback:
    """A node that has no CUDA kernel for its opset and element type."""

    node: str
    op_type: str
    domain: str
    opset: int
    dtype: str
    reason: str

    def line(self) -> str:
        return f"node '{self.node}' ({self.op_type}, opset {self.opset}, {self.dtype}): {self.reason}"


@functools.lru_cache(maxsize=1)
def registry() -> dict[tuple[str, str], list[tuple[int, int, frozenset[str]]]]:
    """(domain, op) -> [(since, until, types)], ``until`` inclusive (a large number when current)."""
    table: dict[tuple[str, str], list[tuple[int, int, frozenset[str]]]] = {}
    with DATA.open(newline="") as f:
        for row in csv.DictReader(f):
            until = int(row["until"]) if row["until"] else 10**6
            table.setdefault((row["domain"], row["op"]), []).append(
                (int(row["since"]), until, frozenset(row["types"].split(";"))))
    return table


def kernel_types(domain: str, op: str, opset: int) -> frozenset[str] | None:
    """The element types CUDA has a kernel for at ``opset``; None when it has none at all."""
    for since, until, types in registry().get((domain, op), []):
        if since <= opset <= until:
            return types
    return None


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_string(elem_type).split(".")[-1].lower()


def _constraint_tensor(node: onnx.NodeProto, domain: str, opset: int) -> str | None:
    """The node's tensor bound to the constraint the registry lists (module docstring)."""
    try:
        schema = defs.get_schema(node.op_type, opset, "" if domain == DEFAULT_DOMAIN else domain)
    except defs.SchemaError:
        return node.input[0] if node.input else (node.output[0] if node.output else None)
    names = [c.type_param_str for c in schema.type_constraints]
    if not names:
        return None
    constraint = "T" if "T" in names else sorted(names)[0]
    for formals, actuals in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for i, formal in enumerate(formals):
            if formal.type_str == constraint and i < len(actuals) and actuals[i]:
                return actuals[i]
    return None


def _types_by_name(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = large.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 (inference is best effort; declared types remain)
        inferred = model
    graph = inferred.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _nodes(sub)


def cuda_fallbacks(model: onnx.ModelProto) -> list[Fallback]:
    """Every node of ``model`` on a float tensor that CUDA has no kernel for (subgraphs included)."""
    opsets = {(imp.domain or DEFAULT_DOMAIN): imp.version for imp in model.opset_import}
    types = _types_by_name(model)
    out = []
    for node in _nodes(model.graph):
        domain = node.domain or DEFAULT_DOMAIN
        opset = opsets.get(domain, 1)
        tensor = _constraint_tensor(node, domain, opset)
        elem = types.get(tensor) if tensor else None
        dtype = _dtype_name(elem) if elem else "?"
        if dtype not in FLOAT_TYPES:
            continue
        supported = kernel_types(domain, node.op_type, opset)
        if supported is None:
            reason = "CUDA has no kernel for this op at this opset"
        elif dtype not in supported:
            reason = f"CUDA's kernel takes {', '.join(sorted(supported & FLOAT_TYPES)) or 'no float type'}"
        else:
            continue
        out.append(Fallback(node.name or node.output[0], node.op_type, domain, opset, dtype, reason))
    return out
