"""Representation maps: a tensor over a dataset embedded in 2-D (t-SNE or PCA), and the units of a
dense layer laid out on a grid and averaged per class.

``represent``: each sample's tensor, flattened, is one point; ``pca`` projects the centred points on
the first two right singular vectors of their matrix (numpy SVD; each component's sign chosen so its
largest-magnitude entry is positive, so the answer does not depend on the LAPACK build); ``tsne`` is
openTSNE's (the ``views`` extra) with a fixed ``random_state``. Points are coloured by a label per
sample or by the model's prediction (arg-max of its first output over axis 1).

``unit_grid``: the mean of each unit per class, accumulated batch by batch (a sum and a count per
class: memory does not grow with the dataset). The layout orders the units by the first principal
component of their per-class mean profiles, so units that respond to the same classes sit together,
and fills the nearest rectangle (``grid_shape``) row by row, every other row reversed (a snake), so
neighbours in the order stay neighbours on the grid. A 1-D ordering was chosen over a SOM because it
has no training schedule, no seed and no neighbourhood width to tune, and it is the same on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import RulegraphError
from .layerdata import LayerReader
from .shards import DEFAULT_MEMORY_BUDGET

METHODS = ("tsne", "pca")
COLOURINGS = ("label", "prediction")


class RepresentationError(RulegraphError):
    """Bad labels, method or data for a representation map or unit grid."""


@dataclass
class Representation:
    """``embedding`` [n, 2]; ``labels`` [n] (the given labels, or None); ``predictions`` [n] (None where
    the model's first output is not [N, C]); ``ids`` the samples; ``layer``, ``method``."""

    embedding: np.ndarray
    labels: np.ndarray | None
    predictions: np.ndarray | None
    ids: list[str]
    layer: str
    method: str

    def colours(self, by: str = "label") -> np.ndarray:
        """The class per point: the labels (``label``) or the predictions (``prediction``)."""
        if by not in COLOURINGS:
            raise RepresentationError(f"colour by '{by}'? use one of {', '.join(COLOURINGS)}")
        chosen = self.labels if by == "label" else self.predictions
        if chosen is None:
            raise RepresentationError(
                "no labels were given: colour by prediction, or pass labels" if by == "label"
                else "the model's first output is not [N, C]: no predictions to colour by")
        return chosen


def pca(points: np.ndarray, components: int = 2) -> np.ndarray:
    """The centred points projected on their first ``components`` principal axes (module docstring)."""
    x = np.asarray(points, dtype=np.float64)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:components]
    signs = np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    out = centred @ axes.T
    if out.shape[1] < components:  # fewer samples or features than components: zeros for the rest
        out = np.pad(out, ((0, 0), (0, components - out.shape[1])))
    return out


def tsne(points: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """openTSNE's 2-D embedding (PCA initialization, ``random_state=seed``, one thread so it repeats)."""
    try:
        from openTSNE import TSNE
    except ImportError:
        raise RepresentationError('t-SNE needs openTSNE: pip install "rulegraph-onnx[views]" '
                                  '(or method="pca")') from None
    n = len(points)
    if n < 4:
        raise RepresentationError(f"t-SNE needs at least 4 samples; the dataset has {n}")
    perplexity = min(float(perplexity), (n - 1) / 3)
    embedding = TSNE(n_components=2, perplexity=perplexity, random_state=seed, n_jobs=1, verbose=False)
    return np.asarray(embedding.fit(np.asarray(points, dtype=np.float64)))


EMBEDDINGS = {"pca": lambda x, seed, perplexity: pca(x), "tsne": tsne}


def _labels(labels, count: int | None, where: str) -> np.ndarray | None:
    if labels is None:
        return None
    out = np.asarray(labels)
    if out.ndim != 1 or out.dtype.kind not in "iu":
        raise RepresentationError(f"{where}: labels are integers, one per sample; got {out.dtype} "
                                  f"{list(out.shape)}")
    if count is not None and len(out) != count:
        raise RepresentationError(f"{where}: {len(out)} labels for {count} samples; give one label per "
                                  f"sample")
    return out.astype(np.int64)


def _predictions(output: np.ndarray) -> np.ndarray | None:
    return np.argmax(output, axis=1).astype(np.int64) if output.ndim == 2 else None


def represent(model, layer: str, data, labels=None, method: str = "tsne", seed: int = 0,
              perplexity: float = 30.0, batch_size: int | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool | None = None, preprocess=None,
              scale: float = 1.0, column: str | None = None, providers=None) -> Representation:
    """The 2-D map of tensor ``layer`` over ``data`` (a folder, glob, .npy/.npz/.parquet path or an
    iterable of arrays) by ``method`` (``tsne`` or ``pca``); ``labels``: one integer per sample."""
    if method not in METHODS:
        raise RepresentationError(f"unknown method '{method}'; methods: {', '.join(METHODS)}")
    reader = LayerReader(model, layer, preprocess, providers)
    points, outputs, ids = [], [], []
    for batch in reader.stream(data, batch_size, memory_budget, progress, preprocess, scale, column):
        points.append(np.asarray(batch.values, dtype=np.float32).reshape(len(batch.values), -1))
        outputs.append(_predictions(np.asarray(batch.output)))
        ids.extend(batch.ids)
    x = np.concatenate(points)
    given = _labels(labels, len(x), f"the map of '{reader.layer}'")
    predictions = None if outputs[0] is None else np.concatenate(outputs)
    embedding = EMBEDDINGS[method](x, seed, perplexity)
    return Representation(embedding, given, predictions, ids, reader.layer, method)


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) for ``count`` cells: among rows from ⌈√(count/2)⌉ to ⌊√count⌋ (at most twice as
    wide as high), the fewest empty cells, then the squarest."""
    high = max(1, math.isqrt(count))
    low = min(high, max(1, math.ceil(math.sqrt(count / 2))))
    rows = min(range(low, high + 1), key=lambda r: (r * math.ceil(count / r) - count, -r))
    return rows, math.ceil(count / rows)


def snake(order: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """[rows, columns] of unit indices (−1 for an empty cell): ``order`` row by row, odd rows reversed."""
    cells = np.full(rows * columns, -1, dtype=np.int64)
    cells[:len(order)] = order
    grid = cells.reshape(rows, columns)
    grid[1::2] = grid[1::2, ::-1]
    return grid


@dataclass
class UnitGrid:
    """``means`` [K, U] the mean of each unit per class; ``classes`` [K]; ``counts`` [K] samples per
    class; ``cells`` [rows, columns] the unit at each cell (−1: empty); ``layer``; ``by``: label or
    prediction."""

    means: np.ndarray
    classes: np.ndarray
    counts: np.ndarray
    cells: np.ndarray
    layer: str
    by: str

    def maps(self) -> np.ndarray:
        """[K, rows, columns]: each class's means on the grid (NaN in empty cells)."""
        padded = np.concatenate([self.means, np.full((len(self.means), 1), np.nan)], axis=1)
        return padded[:, self.cells]


def layout(means: np.ndarray) -> np.ndarray:
    """[rows, columns] unit indices: units ordered by the first principal component of their per-class
    mean profiles (``means`` [K, U]), ties by index, snaked onto ``grid_shape`` (module docstring)."""
    profiles = means.T                                   # [U, K]
    key = pca(profiles, 1)[:, 0] if len(profiles) > 1 else np.zeros(len(profiles))
    order = np.lexsort((np.arange(len(key)), key))
    return snake(order, *grid_shape(len(order)))


def unit_grid(model, layer: str, data, labels=None, batch_size: int | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool | None = None, preprocess=None,
              scale: float = 1.0, column: str | None = None, providers=None) -> UnitGrid:
    """The units of a dense layer ``[N, U]`` on a grid, averaged per class (``labels``: one integer
    per sample; default: the model's predictions), streamed over ``data`` (module docstring)."""
    reader = LayerReader(model, layer, preprocess, providers)
    shape = reader.graph.shapes.get(reader.layer)
    if shape is not None and len(shape) != 2:
        raise RepresentationError(f"the unit grid lays out the units of a dense layer [N, U]; "
                                  f"'{reader.layer}' is {shape} (give a tensor of rank 2, e.g. after "
                                  f"Flatten/Gemm)")
    given = _labels(labels, None, f"the unit grid of '{reader.layer}'")
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    seen = 0
    for batch in reader.stream(data, batch_size, memory_budget, progress, preprocess, scale, column):
        values = np.asarray(batch.values, dtype=np.float64)
        if given is not None:
            if batch.offset + len(values) > len(given):
                raise RepresentationError(f"the unit grid of '{reader.layer}': {len(given)} labels for more "
                                          f"samples; give one label per sample")
            classes = given[batch.offset:batch.offset + len(values)]
        else:
            classes = _predictions(np.asarray(batch.output))
            if classes is None:
                raise RepresentationError("the model's first output is not [N, C]: give labels")
        for c in np.unique(classes).tolist():
            rows = values[classes == c]
            sums[c] = sums.get(c, 0.0) + rows.sum(axis=0)
            counts[c] = counts.get(c, 0) + len(rows)
        seen += len(values)
    if given is not None and seen != len(given):
        raise RepresentationError(f"the unit grid of '{reader.layer}': {len(given)} labels for {seen} "
                                  f"samples; give one label per sample")
    classes = np.array(sorted(sums), dtype=np.int64)
    means = np.stack([sums[c] / counts[c] for c in classes.tolist()])
    return UnitGrid(means, classes, np.array([counts[c] for c in classes.tolist()]), layout(means),
                    reader.layer, "label" if given is not None else "prediction")


__all__ = ["Representation", "RepresentationError", "UnitGrid", "grid_shape", "pca", "represent", "snake",
           "tsne", "unit_grid"]
