"""Any tensor of a model over a dataset, a batch at a time: what the unit and representation views read.

The tensor is read as ``explain`` reads a start tensor: ``Explainer(model, "gradient", start=T)``
and its ``forward``, the model alone with ``T`` added as a graph output (no relevance pass is
compiled). Samples come from ``dataset.open_source`` (folders, globs, .npy/.npz, parquet, any
iterable) and are stacked into batches chosen to a memory budget (``shards.sizes``), so a view that
reduces each batch as it comes holds one batch in memory whatever the dataset's size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from ..compile.layers import resolve_tensor
from .dataset import open_source
from .shards import DEFAULT_MEMORY_BUDGET, _peek, _stack, progress_bar, sizes


@dataclass
class Batch:
    """One batch: sample ids, the position of its first sample in the dataset, the model's first
    input [B, ...], the tensor's values [B, ...] and the model's first output [B, ...]."""

    ids: list[str]
    offset: int
    x: np.ndarray
    values: np.ndarray
    output: np.ndarray


class LayerReader:
    """The model with the tensor ``layer`` (a tensor or node name) readable over a dataset."""

    def __init__(self, model, layer: str, preprocess=None, providers=None, threads: int = 0):
        from .explainer import Explainer

        if isinstance(model, Explainer):
            model = model._model
        self.explainer = Explainer(model, "gradient", providers, preprocess=preprocess, threads=threads)
        self.layer = resolve_tensor(self.explainer.graph, layer)
        self.explainer.start = self.layer  # nothing is compiled or cached before this
        self.graph = self.explainer.graph

    def stream(self, data, batch_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
               progress: bool | None = None, preprocess=None, scale: float = 1.0,
               column: str | None = None) -> Iterator[Batch]:
        """The batches of ``data`` in dataset order."""
        e = self.explainer
        source = open_source(data, e, preprocess, scale, e.allow_nonfinite, column)
        first, items = _peek(source.items)
        if first is None:
            from ..errors import RulegraphError

            raise RulegraphError(f"{source.where}: the dataset is empty")
        batch_size, _ = sizes(e, first.load(), batch_size, None, memory_budget)
        rank = self.graph.rank(self.graph.inputs[0])
        output = self.graph.outputs[0]
        bar = progress_bar(source.count, progress)
        offset = 0
        try:
            while True:
                chunk = list(itertools.islice(items, batch_size))
                if not chunk:
                    break
                x = _stack(chunk, [item.load() for item in chunk], rank)
                values = e.forward(x)
                first_input = x[self.graph.inputs[0]] if isinstance(x, Mapping) else x
                yield Batch([item.id for item in chunk], offset, np.asarray(first_input),
                            values[self.layer], values[output])
                offset += len(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()


__all__ = ["Batch", "LayerReader"]
