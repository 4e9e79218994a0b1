"""Constant slots: the positions along one axis of an active tensor that hold numbers computed
without the inputs.

A class token is a parameter concatenated in front of the patch tokens, ``Concat(cls, patches)``
along the token axis; a position embedding added to the result keeps the class token's slot
input-free. A model that reads that slot back (TimeSformer's embeddings take
``embeddings[:batch, 0]`` of a ``[batch · frames, tokens, D]`` tensor: the first rows' class
token, the same constant for every sample) reads a constant, although the tensor it reads from is
active. Taken for active, the relevance of every sample's class token would flow into the first
rows, which belong to other samples, and the per-sample sums would not add up.

``inactive_reads`` follows such slots through the ops that keep positions along the axis
(elementwise ops with an inactive operand, Slices and Gathers on other axes) and names the Slice
and Gather outputs that read only constant slots: ``read._mark_active`` leaves them inactive, so
what they add downstream is a bias, as any constant's.
"""

from __future__ import annotations

from .static_shapes import partial_entries

# Graph and Node (read.py) appear in annotations only: read.py imports this module

#: elementwise ops that keep each position where their other operands are inactive
KEEP_POSITIONS = frozenset({"Add", "Sub", "Mul", "Div", "Identity", "Dropout", "Cast"})


def _static(graph: Graph, tensor: str, axis: int, slots: dict) -> int | None:
    """The size of ``tensor`` along ``axis`` where it is known: inferred, or for an Expand of a constant
    (a class token ``expand(n, -1, -1)``, its target shape computed at run time) from the constant's
    size and the target's known entries."""
    size = graph.dim(tensor, axis) if graph.rank(tensor) is not None else None
    if isinstance(size, int) and size > 0:
        return size
    node = graph.producer.get(tensor)
    rank = graph.rank(tensor)
    if node is None or node.op_type != "Expand" or node.inputs[0] not in graph.constants or rank is None:
        return None
    source = graph.constants[node.inputs[0]]
    at = axis - (rank - source.ndim)
    if at >= 0 and source.shape[at] != 1:
        return int(source.shape[at])
    if None not in slots:   # the known entries of shape arithmetic, computed once per model
        slots[None] = partial_entries(graph.model, graph.constants)
    target = slots[None].get(node.inputs[1])
    if target is None or target.values.shape != (rank,) or not target.known[axis]:
        return None
    return int(target.values[axis]) if target.values[axis] >= 1 else None


def _concat(graph: Graph, node: Node, active: set[str], slots: dict) -> tuple | None:
    """(axis, the positions that come from inactive operands, the axis' size or None where unknown) of
    a Concat, or None. Sizes after the last inactive operand may be unknown (the patch tokens behind a
    class token)."""
    rank = graph.rank(node.outputs[0])
    if rank is None:
        return None
    axis = node.attr("axis", 0) % rank
    positions: set[int] = set()
    at: int | None = 0
    for tensor in node.inputs:
        size = _static(graph, tensor, axis, slots)
        if tensor not in active:
            if at is None or size is None:
                return None
            positions.update(range(at, at + size))
        at = None if at is None or size is None else at + size
    if not positions or at is not None and len(positions) == at:
        return None
    return axis, frozenset(positions), at


def axis_after_gather(graph: Graph, node: Node, axis: int) -> int | None:
    """Where ``axis`` of a Gather's data is in its output, for a Gather on another axis by constant
    indices (the indices' axes replace the gathered one); None when it gathers on ``axis`` itself."""
    gather_axis = node.attr("axis", 0) % graph.rank(node.inputs[0])
    indices = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if indices is None or gather_axis == axis:
        return None
    return axis + indices.ndim - 1 if gather_axis < axis else axis


def inactive_reads(graph: Graph, node: Node, active: set[str], slots: dict) -> bool:
    """Record ``node``'s output slots in ``slots`` (tensor -> (axis, positions, size of the axis));
    True when its output reads constant slots only (a Slice or Gather of them), so it is not active."""
    out = node.outputs[0] if node.outputs else None
    if not out:
        return False
    if node.op_type == "Concat":
        found = _concat(graph, node, active, slots)
        if found:
            slots[out] = found
        return False
    carried = [slots[t] for t in node.inputs[:1] if t in slots]
    if not carried:
        return False
    axis, positions, size = carried[0]
    if node.op_type in KEEP_POSITIONS:
        if all(t not in active for t in node.inputs[1:]) and graph.rank(out) == graph.rank(node.inputs[0]):
            slots[out] = carried[0]
        return False
    if node.op_type == "Gather":
        indices = graph.constants.get(node.inputs[1])
        rank = graph.rank(node.inputs[0])
        if indices is None or rank is None:
            return False
        if node.attr("axis", 0) % rank == axis:
            flat = [int(i) for i in indices.reshape(-1)]
            if size is None and min(flat, default=0) < 0:
                return False
            return all((i % size if size else i) in positions for i in flat)
        after = axis_after_gather(graph, node, axis)
        if after is not None:
            slots[out] = (after, positions, size)
        return False
    if node.op_type == "Slice":
        return _slice(graph, node, carried[0], slots)
    return False


def _slice(graph: Graph, node: Node, slot: tuple[int, frozenset[int], int], slots: dict) -> bool:
    """A Slice on other axes keeps the slots (its amounts may be run-time values: TimeSformer's
    ``[:batch]``); on the slot axis, its output is constant when it keeps constant slots only."""
    axis, positions, size = slot
    rank = graph.rank(node.inputs[0])
    given = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    axes = graph.constants.get(given) if given else None
    count = graph.dim(node.inputs[1], 0) if graph.rank(node.inputs[1]) == 1 else None
    if rank is None or (given and axes is None) or (not given and not isinstance(count, int)):
        return False
    axes = list(range(count)) if axes is None else [int(a) % rank for a in axes]
    if axis not in axes:
        slots[node.outputs[0]] = slot
        return False
    starts, ends = (graph.constants.get(t) for t in node.inputs[1:3])
    steps = graph.constants.get(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    k = axes.index(axis)
    step = 1 if steps is None else int(steps[k])
    if starts is None or ends is None or step == 0:
        return False
    start, end = int(starts[k]), int(ends[k])
    if size is None:   # a slot axis of unknown size: only a forward slice from the front is known
        if step < 0 or start < 0 or end < 0 or end > max(positions) + 1:
            return False
        size = end
    kept = range(*slice(start, end, step).indices(size))
    return len(kept) > 0 and all(i in positions for i in kept)
