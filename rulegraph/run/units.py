"""Dataset examples for units: the k inputs of a dataset that most activate each unit of a tensor.

A unit is a channel of a 4-D (or higher) tensor ``[N, C, ...]``, a feature of a 2-D ``[N, F]`` or
3-D ``[N, T, D]`` one (the last axis). A sample's score for a unit is the unit's largest value over
the other axes (the first position in C order where it is reached is recorded). The top k are
ordered by score, larger first, ties by dataset position, smaller first.

The reduction is associative: each batch's scores are merged with the running top k of every unit
(the k + B candidates of a unit sorted by (−score, position), the first k kept), so the result does
not depend on the batch size and memory holds one batch plus ``U·k`` entries whatever the dataset's
size. Each entry keeps the input's crop at the receptive field of the recorded position
(``receptive.py``), or the whole input where the field cannot be computed from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RulegraphError
from .layerdata import LayerReader
from .receptive import Field, receptive_field
from .shards import DEFAULT_MEMORY_BUDGET


class UnitsError(RulegraphError):
    """A bad unit, k or layer for ``top_examples``."""


@dataclass
class UnitExamples:
    """``values`` [U, k] the scores, ``indices`` [U, k] dataset positions, ``ids`` the samples' names,
    ``positions`` [U, k, P] where the max was (P: the tensor's axes besides batch and unit), ``boxes``
    [U, k, S, 2] the crops' (begin, end) per input spatial axis, ``crops`` [U][k] the input crops
    [C, ...] (whole inputs where ``field`` is not computable), ``units`` the unit indices, ``layer``,
    ``unit_axis``, ``field`` (``receptive.Field``) and ``samples``: the dataset's size."""

    layer: str
    units: list[int]
    unit_axis: int
    values: np.ndarray
    indices: np.ndarray
    ids: list[list[str]]
    positions: np.ndarray
    boxes: np.ndarray | None
    crops: list[list[np.ndarray]]
    field: Field
    samples: int

    def to_json(self) -> dict:
        """A JSON-ready summary: the layer, the field and per unit its examples."""
        return {"layer": self.layer, "unit_axis": self.unit_axis, "samples": self.samples,
                "receptive_field": self.field.text(),
                "units": [{"unit": u, "examples": [
                    {"rank": r, "id": self.ids[i][r], "index": int(self.indices[i, r]),
                     "value": float(self.values[i, r]), "position": self.positions[i, r].tolist(),
                     **({"box": self.boxes[i, r].tolist()} if self.boxes is not None else {})}
                    for r in range(self.values.shape[1])]} for i, u in enumerate(self.units)]}


def default_unit_axis(rank: int) -> int:
    """1 for [N, C, ...] and [N, F]; the last axis for [N, T, D]."""
    return 2 if rank == 3 else 1


def scores(values: np.ndarray, unit_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(score [B, U], flat position [B, U]): each unit's max over the non-batch, non-unit axes."""
    moved = np.moveaxis(np.asarray(values), unit_axis, 1)
    flat = moved.reshape(moved.shape[0], moved.shape[1], -1)
    where = np.argmax(flat, axis=2)
    return np.take_along_axis(flat, where[..., None], axis=2)[..., 0].astype(np.float64), where


Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]


def merge(running: Candidates, batch: Candidates, k: int) -> Candidates:
    """The top k of two candidate sets (score, index, position), each [U, m]: by score descending,
    then index ascending."""
    value = np.concatenate([running[0], batch[0]], axis=1)
    index = np.concatenate([running[1], batch[1]], axis=1)
    position = np.concatenate([running[2], batch[2]], axis=1)
    order = np.lexsort((index, -value), axis=-1)[:, :k]
    return (np.take_along_axis(value, order, 1), np.take_along_axis(index, order, 1),
            np.take_along_axis(position, order, 1))


def _crop(x: np.ndarray, box) -> np.ndarray:
    """The input sample [C, ...spatial] cut to ``box``; a copy, so the batch is not held through it."""
    return np.array(x[(slice(None), *(slice(b, e) for b, e in box))])


def top_examples(model, layer: str, data, k: int = 9, units=None, unit_axis: int | None = None,
                 batch_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 progress: bool | None = None, preprocess=None, scale: float = 1.0, column: str | None = None,
                 providers=None) -> UnitExamples:
    """The top-``k`` samples of ``data`` (a folder, glob, .npy/.npz/.parquet path or an iterable of
    arrays, as ``Explainer.explain_dataset``) for each of ``units`` (default all) of tensor ``layer``
    (module docstring), streamed in batches (``batch_size``, else to ``memory_budget``)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UnitsError(f"k must be a positive integer (examples per unit); got {k!r}")
    reader = LayerReader(model, layer, preprocess, providers)
    graph, tensor = reader.graph, reader.layer
    shape = graph.shapes.get(tensor)
    rank = len(shape) if shape is not None else None
    if rank is not None and rank < 2:
        raise UnitsError(f"tensor '{tensor}' {shape} has no unit axis: give a tensor [N, C, ...], [N, F] or "
                         f"[N, T, D]")
    field = receptive_field(graph, tensor)
    state, crops, chosen, count, axis, ids = None, None, None, 0, unit_axis, {}
    x_rank = graph.rank(graph.inputs[0])
    for batch in reader.stream(data, batch_size, memory_budget, progress, preprocess, scale, column):
        values = np.asarray(batch.values)
        if chosen is None:
            axis, chosen = _check_units(tensor, values.shape, unit_axis, units)
            if axis != 1 and field.axes is not None:  # the field is of axes 2.. of an [N, C, ...] tensor
                field = Field(reason=f"the units are on axis {axis} of '{tensor}' {list(values.shape)}, "
                                     f"so its other axes are not the input's spatial axes")
            empty = np.empty((len(chosen), 0))
            state = (empty, empty.astype(np.int64), empty.astype(np.int64))
            crops = [{} for _ in chosen]
        score, where = scores(values, axis)
        n = len(values)
        index = np.broadcast_to(batch.offset + np.arange(n)[:, None], score.shape)
        new = (score[:, chosen].T, np.ascontiguousarray(index[:, chosen].T), where[:, chosen].T)
        state = merge(state, new, k)
        kept = set()
        for u in range(len(chosen)):
            previous = crops[u]
            crops[u] = {}
            for i, p in zip(state[1][u].tolist(), state[2][u].tolist()):
                kept.add(i)
                if i >= batch.offset:
                    position = np.unravel_index(p, _position_shape(values.shape, axis))
                    sample = batch.x[i - batch.offset]
                    box = field.box(position, sample.shape[1:]) if x_rank == sample.ndim + 1 else ()
                    crops[u][i] = _crop(sample, box) if box else np.array(sample)
                else:
                    crops[u][i] = previous[i]
        ids = {i: name for i, name in ids.items() if i in kept}
        ids.update({batch.offset + j: name for j, name in enumerate(batch.ids) if batch.offset + j in kept})
        count += n
        position_shape = _position_shape(values.shape, axis)
    value, index, flat = state
    positions = np.stack(np.unravel_index(flat, position_shape), axis=-1) if position_shape else \
        np.zeros((*flat.shape, 0), np.int64)
    sample_shape = batch.x.shape[1:]
    boxes = None
    if x_rank is not None and len(sample_shape) >= 2 and (field.axes is not None or field.whole):
        boxes = np.array([[field.box(p, sample_shape[1:]) for p in unit] for unit in positions.tolist()],
                         dtype=np.int64).reshape(*value.shape, len(sample_shape) - 1, 2)
    elif field.axes is None and not field.whole:
        import warnings

        from ..errors import RulegraphWarning

        warnings.warn(f"the receptive field of '{tensor}' is {field.text()}; the whole inputs are shown",
                      RulegraphWarning, stacklevel=2)
    return UnitExamples(tensor, chosen, axis, value, index,
                        [[ids[i] for i in row] for row in index.tolist()], positions.astype(np.int64), boxes,
                        [[c[i] for i in row] for c, row in zip(crops, index.tolist())], field, count)


def _position_shape(shape, axis: int) -> tuple[int, ...]:
    return tuple(n for a, n in enumerate(shape) if a not in (0, axis))


def _check_units(tensor: str, shape, unit_axis, units) -> tuple[int, list[int]]:
    rank = len(shape)
    axis = default_unit_axis(rank) if unit_axis is None else int(unit_axis)
    if not 0 < axis < rank:
        raise UnitsError(f"unit_axis {unit_axis} does not fit tensor '{tensor}' {list(shape)}: give an axis "
                         f"1..{rank - 1}")
    count = shape[axis]
    chosen = list(range(count)) if units is None else [int(u) for u in units]
    wrong = [u for u in chosen if not 0 <= u < count]
    if wrong or not chosen:
        raise UnitsError(f"unit {wrong[0] if wrong else '(none)'} is not one of the {count} units of tensor "
                         f"'{tensor}' {list(shape)} (axis {axis}); give units 0..{count - 1}")
    return axis, chosen


__all__ = ["UnitExamples", "UnitsError", "merge", "scores", "top_examples"]
