"""What a run explains: the start tensor's batch and class axes, and the target forms.

The start tensor ``y`` is seen batched, ``[N, ...]`` (a model whose start has no batch axis is
explained as one sample, ``y`` seen as ``[1, ...]``). It has a class axis ``k`` and position axes
(every axis but the batch and ``k``). A target gives, per row, a class ``c`` (or ``c`` minus a
second class ``b``) and weights ``w`` over the positions; the seed is

    s = onehot_k(c) ⊙ w        (contrastive: (onehot_k(c) − onehot_k(b)) ⊙ w)

and under ``start output`` the pass starts from ``y ⊙ s`` (so the start value is ``Σ w ⊙ y_c``).
``argmax`` picks the class maximizing ``Σ_positions w ⊙ y``: at one position, that position's arg-max.

The class axis is never guessed silently: the axis of a final Softmax/LogSoftmax (over route ops),
else rank 2 ``[N, C]`` -> 1, rank 4 ``[N, C, H, W]`` -> 1, rank 3 ``[N, T, C]`` -> 2, else the
``class_axis`` the user gives; otherwise an error asking for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import RulegraphError
from ..graph.kinds import ROUTE
from ..graph.read import Graph
from ..graph.slots import axis_after_gather

#: ops that keep a tensor's values in row-major order: a batch folded by them stays the outermost factor
FLAT_ROUTES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
#: the default class axis by rank of the batched start tensor
RANK_CLASS_AXIS = {2: 1, 3: 2, 4: 1}
NORMALIZERS = frozenset({"Softmax", "LogSoftmax"})
POSITION_NAMES = {1: ("t",), 2: ("y", "x"), 3: ("z", "y", "x")}
FORMS = ("at=<position>", "region=<slices>", "mask=<array>", "all_positions=True")


class TargetError(RulegraphError):
    """A target that does not fit the start tensor (class out of range, wrong shape, unknown form)."""


@dataclass(frozen=True, eq=False)
class Target:
    """What to explain: ``cls`` (``"argmax"``, a class, or one class per row; ``-1`` = arg-max);
    for a start tensor with position axes one position form: ``at`` (an index per position axis),
    ``region`` (a slice per position axis), ``mask`` (weights shaped like the position axes, or
    ``[N, ...]`` with them), ``all_positions``; ``versus``: a second class whose logit is subtracted."""

    cls: str | int | Sequence[int] | np.ndarray = "argmax"
    at: int | Sequence[int] | None = None
    region: slice | Sequence[slice] | None = None
    mask: np.ndarray | None = None
    all_positions: bool = False
    versus: int | Sequence[int] | np.ndarray | None = None


@dataclass(frozen=True)
class StartSpec:
    """The start tensor as a target sees it: ``shape`` (the graph's, ints or symbols), whether
    axis 0 is the batch, the class axis (in the tensor's own axes) and why that axis."""

    tensor: str
    shape: tuple
    batched: bool
    class_axis: int | None
    class_axis_source: str   # why that axis; when it is None, the error asking for it

    def require_class_axis(self) -> StartSpec:
        """Self, or the error asking for ``class_axis`` (a class target needs one; a seed array does not)."""
        if self.class_axis is None:
            raise TargetError(self.class_axis_source)
        return self

    @property
    def vshape(self) -> tuple:
        """The shape with a batch axis (a leading 1 when the tensor has none)."""
        return self.shape if self.batched else (1, *self.shape)

    @property
    def vclass(self) -> int:
        return self.require_class_axis().class_axis + (0 if self.batched else 1)

    @property
    def position_axes(self) -> list[int]:
        """Axes of the batched shape that are neither the batch nor the class axis."""
        return [a for a in range(1, len(self.vshape)) if a != self.vclass]

    @property
    def classes(self) -> int | None:
        dim = self.vshape[self.vclass]
        return dim if isinstance(dim, int) and dim > 0 else None

    def shape_text(self) -> str:
        return _shape_text(self.shape)

    def where(self) -> str:
        """``tensor 'logits' [N, T, 6625] (class axis 2)``: for messages and the CLI summary."""
        axis = "" if self.class_axis is None else f" (class axis {self.class_axis})"
        return f"tensor '{self.tensor}' {self.shape_text()}{axis}"


# --------------------------------------------------------------------------------------------------
# the batch and class axes of the start tensor


def batch_dim(graph: Graph) -> int | str | None:
    """The first input's first dimension (the batch symbol, or a fixed size); None without inputs."""
    for name in graph.inputs:
        if graph.rank(name):
            return graph.dim(name, 0)
    return None


def batch_axes(graph: Graph) -> dict[str, int]:
    """Where each active tensor carries the batch axis, followed from the inputs (axis 0) through the
    ops that move axes: Transpose (a fused qkv ``[N, T, 3, H, D] -> [3, N, H, T, D]``), Gather of one
    index, Squeeze and Unsqueeze; a Reshape or Flatten keeps it first (folded outermost), or where the
    axes up to it are kept (a bidirectional LSTM's ``[T, N, 2, H] -> [T, N, 2H]``). Other
    ops keep it where their output has their input's rank, and axis 0 always. A tensor missing here
    has no axis known (it is taken as batch-first)."""
    axes = {t: 0 for t in graph.inputs if graph.rank(t)}
    axes.update({t: 0 for t in graph.sources})
    for node in graph.nodes:
        source = next((t for t in node.inputs if t in axes), None)
        if source is None:
            continue
        b, rank = axes[source], graph.rank(source)
        out = node.outputs[0] if node.outputs else None
        if not out or rank is None:
            continue
        moved = _moved_axis(graph, node, b, rank)
        if moved is not None:   # every output: a Split's parts keep the axis where they are not cut on it
            axes.update({o: moved for o in node.outputs if o})
    return axes


def _moved_axis(graph: Graph, node, b: int, rank: int) -> int | None:
    op = node.op_type
    if op == "Transpose":
        perm = node.attr("perm") or list(range(rank))[::-1]
        return list(perm).index(b)
    if op == "Gather":
        return axis_after_gather(graph, node, b)
    if op in ("Squeeze", "Unsqueeze"):
        given = node.attr("axes")
        if given is None and len(node.inputs) > 1 and node.inputs[1] in graph.constants:
            given = graph.constants[node.inputs[1]].reshape(-1).tolist()
        if not given:
            return None
        if op == "Unsqueeze":   # the axes index the output
            for a in sorted(int(a) % (rank + len(given)) for a in given):
                b += a <= b
            return b
        removed = [int(a) % rank for a in given]
        return None if b in removed else b - sum(a < b for a in removed)
    if op in ("Split", "Concat") and node.attr("axis", 0) % rank == b:
        return None
    if b == 0:
        return 0
    if op in ("Reshape", "Flatten"):   # kept where the axes up to the batch are kept (trailing axes merged)
        before, after = graph.shapes.get(node.inputs[0]), graph.shapes.get(node.outputs[0])
        kept = before and after and len(after) > b and all(
            x is not None and x == y for x, y in zip(before[:b + 1], after[:b + 1]))
        return b if kept else None
    return b if graph.rank(node.outputs[0]) == rank else None


#: ops that move or mix the batch axis when they act on axis 0
AXIS_OPS = frozenset({"Concat", "Gather", "Split", "Slice", "Softmax", "LogSoftmax", "Flatten", "CumSum"})


#: where an op takes its axes as an input (from opset 13 for ReduceSum, 18 for the other reductions)
AXES_INPUT = {"Slice": 3}


def _axes(graph: Graph, node) -> list[int] | None:
    """A reduction's or a Slice's axes, non-negative: the attribute, or the constant axes input;
    None when they are not known (absent: every axis; or computed at run time)."""
    axes = node.attr("axes")
    position = AXES_INPUT.get(node.op_type, 1)
    if axes is None and len(node.inputs) > position and node.inputs[position] in graph.constants:
        axes = graph.constants[node.inputs[position]].reshape(-1).tolist()
    rank = graph.rank(node.inputs[0])
    if axes is None or len(axes) == 0 or (rank is None and any(a < 0 for a in axes)):
        return None
    return [int(a) % rank if rank else int(a) for a in axes]


def _moves_batch(graph: Graph, node) -> bool:
    """Whether ``node`` may take the batch out of the outermost place of its output (a Transpose
    moving axis 0, a reduction or a Slice over axis 0, an op along axis 0)."""
    if node.op_type == "Transpose":
        perm = node.attr("perm")
        return perm is None or perm[0] != 0
    if node.op_type.startswith("Reduce") or node.op_type == "Slice":
        axes = _axes(graph, node)
        return axes is None or 0 in axes
    if node.op_type in AXIS_OPS and node.op_type != "Flatten":
        rank = graph.rank(node.inputs[0])
        return node.attr("axis", 0) % (rank or 1) == 0 if rank else node.attr("axis", 0) == 0
    return node.op_type == "Flatten" and node.attr("axis", 1) == 0


def batch_state(graph: Graph, tensor: str) -> str:
    """``axis``: axis 0 is the batch; ``folded``: axis 0 is unknown but comes from a batched tensor
    over ops that keep the batch outermost (its rows may be N or N·T); ``lost``: a dynamic batch
    that an op moved or removed; ``none``: no batch axis (one sample)."""
    batch = batch_dim(graph)
    if batch is None or not graph.rank(tensor):
        return "none" if not isinstance(batch, str) else "lost"
    dim = graph.dim(tensor, 0)
    if dim == batch:
        return "axis"
    if not isinstance(batch, str) and dim is not None:  # a fixed batch; an unknown dim is followed back
        return "none"
    while True:
        if dim == batch:
            return "folded"
        node = graph.producer.get(tensor)
        if isinstance(dim, int) or node is None or _moves_batch(graph, node):
            return "lost"
        active = [t for t in node.inputs if t in graph.active and graph.rank(t)]
        if not active:  # shape inference gave up on the way: the rows are checked after the run
            return "folded"
        tensor = active[0]
        dim = graph.dim(tensor, 0)


def is_batched(graph: Graph, tensor: str) -> bool:
    """Whether axis 0 of ``tensor`` carries the inputs' batch (possibly folded with other axes)."""
    return batch_state(graph, tensor) in ("axis", "folded")


def _folds(graph: Graph, out: str, src: str) -> bool:
    """Whether ``out`` is ``src`` with leading non-batch axes merged into axis 0: its trailing dims
    are a strict suffix of ``src``'s (Flatten(axis=2) of [N, T, C] -> [N·T, C])."""
    a, b = graph.shapes.get(out), graph.shapes.get(src)
    if not isinstance(batch_dim(graph), str) or a is None or b is None or len(a) >= len(b):
        return False
    if batch_state(graph, src) != "axis" or batch_state(graph, out) == "axis":
        return False
    tail = a[1:]
    return all(x is not None and x == y for x, y in zip(tail, b[len(b) - len(tail):]))


def relocate(graph: Graph, start: str) -> str:
    """The start moved back over Reshape/Flatten/... to before a fold of the batch into axis 0
    (route ops are exact: the seed there is the same seed); ``start`` itself when it has no fold."""
    tensor = start
    while True:
        node = graph.producer.get(tensor)
        active = [t for t in node.inputs if t in graph.active] if node is not None else []
        if node is None or node.op_type not in FLAT_ROUTES or len(active) != 1:
            return tensor
        if not _folds(graph, tensor, active[0]):
            return tensor
        tensor = active[0]


def fold_of(graph: Graph, tensor: str) -> str | None:
    """The tensor where a Reshape/Flatten folded the batch with other axes into axis 0, on the way
    from the batched tensors to ``tensor`` (whose first axis is then N·T, not N); None if none."""
    batch = batch_dim(graph)
    while graph.rank(tensor) and graph.dim(tensor, 0) != batch:
        node = graph.producer.get(tensor)
        active = [t for t in node.inputs if t in graph.active and graph.rank(t)] if node is not None else []
        if not active:
            return None
        if node.op_type in FLAT_ROUTES and _folds(graph, tensor, active[0]):
            return tensor
        tensor = active[0]
    return None


def check_batch(graph: Graph, start: str) -> None:
    """Refuse a start tensor that lost a dynamic batch axis (a Transpose moved it inward, a
    reduction over it) or carries it folded with another axis, naming the tensor."""
    batch = batch_dim(graph)
    folded = fold_of(graph, start) if batch_state(graph, start) == "folded" else None
    if folded is not None:
        raise TargetError(f"the start tensor '{start}' {_shape_text(graph.shapes.get(start))} carries the batch "
                          f"'{batch}' folded with other axes (since '{folded}' "
                          f"{_shape_text(graph.shapes.get(folded))}), so a target cannot tell its rows apart; "
                          f"pass start= a tensor before '{folded}' whose first axis is the batch")
    if batch_state(graph, start) == "lost":
        raise TargetError(f"tensor '{start}' {_shape_text(graph.shapes.get(start))} has lost the batch axis "
                          f"'{batch}' of the model's inputs (an op moved it or summed over it); explain per "
                          "sample by passing start= a tensor before it whose first axis is the batch")


def _shape_text(shape) -> str:
    """``[N, ?, 6625]``: dims shape inference made up (``unk__3``) or does not know read ``?``."""
    if shape is None:
        return "[unknown shape]"
    return "[" + ", ".join("?" if d is None or str(d).startswith("unk__") else str(d) for d in shape) + "]"


def _normalizer_axis(graph: Graph, output: str, found: str, start: str) -> int | None:
    """The class axis in ``start``'s axes when ``output`` comes from a Softmax/LogSoftmax over route
    ops and ``found`` (``start`` before ``relocate``) is that normalizer's input, output or a route
    tensor between; else None. The axis is carried by its place from the end (the class axis is
    the last one a fold leaves alone)."""
    chain = [output]
    node = graph.producer.get(output)
    while node is not None and node.op_type not in NORMALIZERS:
        active = [t for t in node.inputs if t in graph.active]
        if node.kind != ROUTE or len(active) != 1:
            return None
        chain.append(active[0])
        node = graph.producer.get(active[0])
    if node is None or found not in chain + [node.inputs[0]]:
        return None
    rank = graph.rank(node.inputs[0])
    if rank is None:
        return None
    axis = node.attr("axis", -1 if graph.opset >= 13 else 1)
    from_end = rank - (axis % rank)
    dims, start_shape = graph.shapes[node.inputs[0]], graph.shapes.get(start) or []
    if len(start_shape) < from_end or start_shape[-from_end:] != dims[-from_end:]:
        return None
    return len(start_shape) - from_end


def start_spec(graph: Graph, start: str, output: str | None, class_axis: int | None,
               original: str | None = None) -> StartSpec:
    """The start tensor's batch and class axes; ``original``: the start before ``relocate``."""
    shape = graph.shapes.get(start)
    check_batch(graph, start)
    if shape is None:
        return StartSpec(start, (), True, None, f"the shape of the start tensor '{start}' is unknown, so its "
                         "class axis is; name a start tensor with a known rank (start=...) or give a seed array")
    batched = is_batched(graph, start)
    rank = len(shape)
    if class_axis is not None:
        lowest = 1 if batched else 0
        if isinstance(class_axis, bool) or not isinstance(class_axis, (int, np.integer)) \
                or not -rank <= class_axis < rank or class_axis % max(rank, 1) < lowest:
            raise TargetError(f"class_axis {class_axis!r} does not fit the start tensor '{start}' "
                              f"{_shape_text(shape)}: use an axis in {lowest}..{rank - 1}"
                              + (" (axis 0 is the batch)" if batched else ""))
        return StartSpec(start, tuple(shape), batched, int(class_axis) % rank, "class_axis=")
    normalizer = _normalizer_axis(graph, output or graph.outputs[0], original or start, start)
    if normalizer is not None and (normalizer > 0 or not batched):
        return StartSpec(start, tuple(shape), batched, normalizer, "the final Softmax")
    vrank = rank + (0 if batched else 1)
    if vrank in RANK_CLASS_AXIS:
        axis = RANK_CLASS_AXIS[vrank] - (0 if batched else 1)
        return StartSpec(start, tuple(shape), batched, axis, f"rank {vrank}")
    return StartSpec(start, tuple(shape), batched, None,
                     f"which axis of the start tensor '{start}' {_shape_text(shape)} holds the classes? the model "
                     f"does not end in a Softmax and rank {rank} has no default; pass class_axis= (CLI: --class-axis)")


# --------------------------------------------------------------------------------------------------
# targets given by the user -> feeds of the compiled explainer


@dataclass
class Resolved:
    """A target made concrete for ``n`` rows: ``classes`` [n] (-1: arg-max, decided in the graph),
    ``weights`` [n, *positions] or None, ``versus`` [n] or None, and its description."""

    classes: np.ndarray
    weights: np.ndarray | None
    versus: np.ndarray | None
    where: str


def as_target(target) -> Target:
    """A plain class, class list, ``"argmax"`` or a Target as a Target."""
    return target if isinstance(target, Target) else Target(cls=target)


def class_indices(value, n: int, spec: StartSpec, what: str = "target", argmax_code: bool = True) -> np.ndarray:
    """One class per row from an int, a sequence of ints or an int array; ``-1`` = arg-max."""
    if isinstance(value, str):
        if value == "argmax" and argmax_code:
            return np.full(n, -1, dtype=np.int64)
        raise TargetError(f"{what} must be a class index, one per row, 'argmax' or a seed array, got {value!r}")
    items = np.asarray(value, dtype=object).reshape(-1)
    bad = [v for v in items if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))]
    if bad or items.size == 0:
        raise TargetError(f"{what} must be integer class indices for {spec.where()}; got {bad[0] if bad else value!r}"
                          f" ({type(bad[0]).__name__ if bad else 'empty'}); convert it explicitly")
    classes = np.array([int(v) for v in items], dtype=np.int64)
    if classes.size == 1:
        classes = np.full(n, classes[0], dtype=np.int64)
    if classes.size != n:
        raise TargetError(f"got {classes.size} {what} classes for a batch of {n}")
    check_classes(classes, spec, spec.classes, what, argmax_code)
    return classes


def check_classes(classes: np.ndarray, spec: StartSpec, count: int | None, what: str = "target",
                  argmax_code: bool = True) -> None:
    """Every class in ``0..count-1`` (``-1`` allowed as the arg-max code)."""
    low = -1 if argmax_code else 0
    wrong = classes[(classes < low) | ((classes >= count) if count is not None else False)]
    if wrong.size:
        valid = f"0..{count - 1}" if count is not None else "0..C-1"
        raise TargetError(f"{what} class {int(wrong[0])} is out of range for {spec.where()}: valid classes "
                          f"are {valid}" + (" (or -1 / 'argmax')" if argmax_code else ""))


def resolve(target: Target, spec: StartSpec, n: int, start_shape) -> Resolved:
    """Check ``target`` against the start tensor; ``start_shape()`` gives the actual batched shape
    (a forward run) when a position form needs dims the graph does not know."""
    spec.require_class_axis()
    classes = class_indices(target.cls, n, spec)
    versus = None
    if target.versus is not None:
        versus = class_indices(target.versus, n, spec, "versus", argmax_code=False)
    forms = {"at": target.at is not None, "region": target.region is not None, "mask": target.mask is not None,
             "all_positions": bool(target.all_positions)}
    given = [k for k, v in forms.items() if v]
    axes = spec.position_axes
    if len(given) > 1:
        raise TargetError(f"give one position form, not {' and '.join(given)}")
    if not axes:
        if given:
            raise TargetError(f"{given[0]} needs position axes, but {spec.where()} has only the batch and "
                              "class axes; give the class alone")
        return Resolved(classes, None, versus, "")
    if not given:
        raise TargetError(f"{spec.where()} has position axes {axes_text(spec)}: a class alone is ambiguous; "
                          f"say where with one of {', '.join(FORMS)} (CLI: --at, --region, --mask, --all-positions)")
    dims = [spec.vshape[a] for a in axes]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        actual = start_shape()
        dims = [actual[a] for a in axes]
    weights = np.zeros([n, *dims], dtype=np.float64)
    if target.at is not None:
        at = _index_tuple(target.at, len(dims), spec, "at")
        for i, d in zip(at, dims):
            if not 0 <= i < d:
                raise TargetError(f"at={target.at!r} is outside {spec.where()}: positions {dims_text(dims, spec)}")
        weights[(slice(None), *at)] = 1.0
        names = POSITION_NAMES.get(len(at))
        where = (f"at {names[0]}={at[0]}" if len(at) == 1 else
                 f"at ({', '.join(names)})=({', '.join(map(str, at))})" if names else f"at {at}")
    elif target.region is not None:
        region = target.region if isinstance(target.region, (tuple, list)) else (target.region,)
        if len(region) != len(dims) or not all(isinstance(s, slice) for s in region):
            raise TargetError(f"region needs one slice per position axis {axes_text(spec)} of {spec.where()}, "
                              f"got {target.region!r}")
        for s, d in zip(region, dims):
            lo, hi = 0 if s.start is None else s.start, d if s.stop is None else s.stop
            if s.step not in (None, 1) or not 0 <= lo < hi <= d:
                raise TargetError(f"region {region_text(region)} is outside or empty in {spec.where()}: "
                                  f"positions {dims_text(dims, spec)}")
        weights[(slice(None), *region)] = 1.0
        where = f"over region [{region_text(region)}]"
    elif target.mask is not None:
        mask = np.asarray(target.mask)
        if mask.dtype.kind not in "biuf" or not np.all(np.isfinite(mask)):
            raise TargetError(f"the mask must hold finite numbers, got dtype {mask.dtype}")
        if tuple(mask.shape) not in (tuple(dims), (n, *dims)):
            raise TargetError(f"the mask's shape {list(mask.shape)} does not fit {spec.where()}: expected "
                              f"{dims} (the position axes) or {[n, *dims]} (per row)")
        weights[...] = mask
        where = "over a mask"
    else:
        weights[...] = 1.0
        where = "over all positions"
    return Resolved(classes, weights, versus, where)


def _index_tuple(value, count: int, spec: StartSpec, what: str) -> tuple[int, ...]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(items) != count or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
                                  for v in items):
        raise TargetError(f"{what} needs {count} integer index(es), one per position axis {axes_text(spec)} "
                          f"of {spec.where()}; got {value!r}")
    return tuple(int(v) for v in items)


def axes_text(spec: StartSpec) -> str:
    return "(" + ", ".join(str(a - (0 if spec.batched else 1)) for a in spec.position_axes) + ")"


def dims_text(dims, spec: StartSpec) -> str:
    return " x ".join(str(d) for d in dims) + f" along axes {axes_text(spec)}"


def region_text(region) -> str:
    return ", ".join(f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}" for s in region)


def contrast_seed(spec: StartSpec, resolved: Resolved, start: np.ndarray | None, dtype) -> np.ndarray:
    """The seed array of a contrastive target, shaped like the start tensor: ``(onehot(c) −
    onehot(b)) ⊙ w``; arg-max classes are decided on the batched start values ``start``."""
    classes = resolved.classes.copy()
    if np.any(classes < 0):
        scores = start_scores(spec, start, resolved.weights)
        classes = np.where(classes < 0, scores.argmax(axis=1), classes)
        resolved.classes = classes
    vshape = start.shape
    n, count = vshape[0], vshape[spec.vclass]
    check_classes(classes, spec, count, argmax_code=False)
    check_classes(resolved.versus, spec, count, "versus", argmax_code=False)
    onehot = np.zeros((n, count))
    onehot[np.arange(n), classes] += 1.0
    onehot[np.arange(n), resolved.versus] -= 1.0
    seed = _along_class(onehot, spec, len(vshape))
    if resolved.weights is not None:
        seed = seed * np.expand_dims(resolved.weights, spec.vclass)
    seed = np.broadcast_to(seed, vshape)
    return np.ascontiguousarray((seed if spec.batched else seed[0]).astype(dtype))


def _along_class(values: np.ndarray, spec: StartSpec, rank: int) -> np.ndarray:
    """[n, C] -> [n, 1.., C at the class axis, 1..]."""
    shape = [values.shape[0]] + [1] * (rank - 1)
    shape[spec.vclass] = values.shape[1]
    return values.reshape(shape)


def start_scores(spec: StartSpec, start: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """``Σ_positions w ⊙ y`` per row and class, [n, C], from the batched start values."""
    y = start.astype(np.float64)
    if weights is not None:
        y = y * np.expand_dims(weights, spec.vclass)
    y = np.moveaxis(y, spec.vclass, 1)
    return y.reshape(y.shape[0], y.shape[1], -1).sum(axis=2)


def check_seed(seed: np.ndarray, spec: StartSpec, n: int) -> None:
    """A float seed array shaped like the start tensor (its known dims, the batch ``n``)."""
    expected = list(spec.shape)
    if spec.batched:
        expected[0] = n
    fits = seed.ndim == len(expected) and all(d is None or isinstance(d, str) or d == s
                                              for d, s in zip(expected, seed.shape))
    if not fits:
        raise TargetError(f"the seed array's shape {list(seed.shape)} does not fit the start tensor "
                          f"'{spec.tensor}' {spec.shape_text()}: expected {_shape_text(expected)}")
    if not np.all(np.isfinite(seed)):
        raise TargetError(f"the seed array for '{spec.tensor}' holds NaN or infinite values")
