"""The receptive field of a tensor's positions in the model's first input, read from the graph.

Per spatial axis a field is ``(size r, jump j, start s)``: position ``i`` of the tensor sees input
positions ``s + i·j .. s + i·j + r − 1`` (before clipping to the input). The input itself is
``(1, 1, 0)``. A Conv or pool with kernel ``k``, stride ``t``, leading pad ``p`` and dilation ``d``
maps ``(r, j, s)`` to ``(r + (d(k − 1)) j, j t, s − p j)``; a position-wise op (activation,
normalization per channel, elementwise arithmetic) keeps it, and several inputs (a residual Add, a
Concat over channels) take the union of their fields (one jump required). Global pooling sees the
whole input. Anything else (Flatten, Gemm, Reshape, Resize, ConvTranspose, ...) stops the walk:
the field is then not computable from the graph and ``Field.reason`` names the node.

Closed form for a plain stack: ``r = 1 + Σ_l d_l (k_l − 1) Π_{m<l} t_m``, ``j = Π t_l``,
``s = −Σ_l p_l Π_{m<l} t_m``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..graph.read import Graph, Node

#: ops whose output position (n, c, y, x) reads only position (y, x) of each spatial input
POSITIONWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "Tanh", "Softplus",
    "Softsign", "HardSwish", "Gelu", "FastGelu", "BiasGelu", "SiLU", "Silu", "Swish", "Mish", "Clip", "Abs",
    "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Pow", "Erf", "ThresholdedRelu", "Shrink", "Sign", "Floor",
    "Ceil", "Round", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Where", "Identity", "Dropout",
    "Cast", "BatchNormalization", "LRN", "QuantizeLinear", "DequantizeLinear"})
POOLS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
GLOBAL = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


@dataclass(frozen=True)
class Axis:
    size: int
    jump: int
    start: int


@dataclass(frozen=True)
class Field:
    """The field of a tensor: ``axes`` per spatial axis, or ``whole`` (every position sees the whole
    input), or neither with ``reason`` (not computable from the graph)."""

    axes: tuple[Axis, ...] | None = None
    whole: bool = False
    reason: str = ""

    def box(self, position, shape) -> tuple[tuple[int, int], ...]:
        """(begin, end) per spatial axis of the input of size ``shape`` (clipped) for ``position``."""
        if self.whole or self.axes is None:
            return tuple((0, n) for n in shape)
        return tuple((max(0, a.start + i * a.jump), min(n, a.start + i * a.jump + a.size))
                     for a, i, n in zip(self.axes, position, shape))

    def text(self) -> str:
        if self.axes is not None:
            return ("size " + "x".join(str(a.size) for a in self.axes) + ", jump "
                    + "x".join(str(a.jump) for a in self.axes) + ", start "
                    + ",".join(str(a.start) for a in self.axes))
        return "the whole input" if self.whole else f"not computable: {self.reason}"


def _ints(node: Node, name: str, default, count: int) -> list[int]:
    value = node.attr(name)
    return [int(v) for v in value] if value is not None else [default] * count


def _leading_pads(node: Node, graph: Graph, kernel: list[int], strides, dilations) -> list[int] | None:
    """The pads before each spatial axis: ``pads`` or what ``auto_pad`` implies from the shapes."""
    count = len(kernel)
    auto = node.attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", None):
        return _ints(node, "pads", 0, 2 * count)[:count]
    if auto == "VALID":
        return [0] * count
    source, out = graph.shapes.get(node.inputs[0]), graph.shapes.get(node.outputs[0])
    if not source or not out or not all(isinstance(d, int) for d in [*source[2:], *out[2:]]):
        return None
    pads = []
    for n, m, k, t, d in zip(source[2:], out[2:], kernel, strides, dilations):
        total = max((m - 1) * t + d * (k - 1) + 1 - n, 0)
        pads.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
    return pads


def _window(node: Node, graph: Graph, field: Field) -> Field:
    """A Conv or pool applied to ``field``."""
    count = len(field.axes)
    kernel = node.attr("kernel_shape")
    if kernel is None and node.op_type == "Conv" and node.inputs[1] in graph.constants:
        kernel = list(graph.constants[node.inputs[1]].shape[2:])
    if kernel is None or len(kernel) != count:
        return Field(reason=f"{node} has no kernel_shape for its {count} spatial axes")
    kernel = [int(k) for k in kernel]
    strides = _ints(node, "strides", 1, count)
    dilations = _ints(node, "dilations", 1, count)
    pads = _leading_pads(node, graph, kernel, strides, dilations)
    if pads is None:
        return Field(reason=f"{node} pads by auto_pad on shapes shape inference did not fix")
    return Field(tuple(Axis(a.size + d * (k - 1) * a.jump, a.jump * t, a.start - p * a.jump)
                       for a, k, t, d, p in zip(field.axes, kernel, strides, dilations, pads)))


def _union(fields: list[Field], node: Node) -> Field:
    if any(f.whole for f in fields):
        return Field(whole=True)
    jumps = {tuple(a.jump for a in f.axes) for f in fields}
    if len(jumps) > 1:
        return Field(reason=f"{node} joins inputs with different strides ({sorted(jumps)})")
    axes = []
    for parts in zip(*(f.axes for f in fields)):
        start = min(a.start for a in parts)
        end = max(a.start + a.size for a in parts)
        axes.append(Axis(end - start, parts[0].jump, start))
    return Field(tuple(axes))


def _channel_concat(node: Node, rank: int) -> bool:
    return node.op_type == "Concat" and node.attr("axis") in (1, 1 - rank)


def receptive_field(graph: Graph, tensor: str) -> Field:
    """The field of ``tensor``'s spatial positions (axes 2.. of an [N, C, ...] tensor) in the model's
    first input (module docstring)."""
    source = graph.inputs[0]
    rank = graph.rank(source)
    if rank is None or rank < 3:
        return Field(reason=f"the input '{source}' {graph.shapes.get(source)} has no spatial axes")
    if graph.rank(tensor) != rank and tensor != source:
        return Field(reason=f"tensor '{tensor}' {graph.shapes.get(tensor)} has no spatial axes like the "
                            f"input '{source}' {graph.shapes.get(source)}")
    fields = {source: Field(tuple(Axis(1, 1, 0) for _ in range(rank - 2)))}
    for node in graph.nodes:
        spatial = [fields[i] for i in node.inputs if i in fields]
        if not spatial:
            continue
        bad = next((f for f in spatial if f.axes is None and not f.whole), None)
        if bad is not None:
            out = bad
        elif node.op_type in GLOBAL:
            out = Field(whole=True)
        elif node.op_type in POOLS:
            out = Field(whole=True) if spatial[0].whole else _window(node, graph, spatial[0])
        elif node.op_type in POSITIONWISE or _channel_concat(node, rank):
            out = _union(spatial, node)
        else:
            out = Field(reason=f"{node} is not a convolution, pool or position-wise op")
        for o in node.outputs:
            if graph.rank(o) == rank or out.whole:
                fields[o] = out
            else:
                fields[o] = Field(reason=f"{node} changes the number of axes to {graph.shapes.get(o)}")
    if tensor not in fields:
        return Field(reason=f"'{tensor}' is not computed from the input '{source}'")
    return fields[tensor]


__all__ = ["Axis", "Field", "receptive_field"]
