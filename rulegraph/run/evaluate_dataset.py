"""``evaluate_dataset(model, rules, data)``: ``evaluate`` over a dataset, streamed in batches.

The samples (``dataset.open_source``: a folder, glob, ``.npy``/``.npz``, parquet, or any iterable of
arrays) are read one at a time and evaluated ``batch_size`` at a time with explainers compiled once;
what is kept between batches is each sample's metric values (and MPRT step values) and class, so
memory does not grow with the dataset beyond those numbers. Batch k's values are those of
``evaluate`` on that batch's array: metrics without random draws (region, pixel, deletion) equal
the whole array's evaluation row by row; those with draws (the random reference, ROAD's noise,
faithfulness correlation, random logit) draw per batch from the same seed, as ``evaluate`` of the
batch does. The perturbation curves are not kept (they grow with the dataset): ``curves`` is empty.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx

from ..errors import RulegraphError
from .dataset import open_source
from .evaluate import Evaluation, Settings, evaluate_batch, explainers_for
from .shards import _stack, progress_bar

#: samples per batch by default: each metric runs its perturbations of a batch in one chunked run
DEFAULT_BATCH_SIZE = 32


def evaluate_dataset(model, rules, data, target="argmax", metrics=None, settings: Settings | None = None,
                     random: bool = True, output: str | None = None, show: str = "attribution",
                     batch_size: int = DEFAULT_BATCH_SIZE, limit: int | None = None,
                     progress: bool | None = None, preprocess=None, scale: float = 1.0,
                     column: str | None = None) -> Evaluation:
    """Evaluate each rule file on every sample of ``data`` (the first ``limit``), ``batch_size`` at a
    time; the answer has the samples' values in order (``Evaluation``; no curves). ``target``:
    ``"argmax"`` or one class for all samples; ``progress``: a tqdm bar (default: when standard error
    is a terminal); the rest as for ``evaluate`` and ``Explainer.explain_dataset``."""
    if batch_size < 1:
        raise RulegraphError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise RulegraphError(f"--limit must be at least 1, got {limit}")
    if not (isinstance(target, str) and target == "argmax") and np.ndim(target) != 0:
        raise RulegraphError("a dataset evaluation takes one target for all samples: argmax or a class index")
    explainers, first = explainers_for(model, rules, output, random)
    source = open_source(data, first, preprocess, scale, column=column)
    mprt = metrics is None or "mprt" in metrics   # only MPRT reads the model proto (to randomize it)
    graph_model = model if isinstance(model, onnx.ModelProto) or not mprt else onnx.load(str(model))
    graph_model = graph_model if mprt else onnx.ModelProto()
    rank = first.graph.rank(first.graph.inputs[0])
    items = iter(source.items) if limit is None else itertools.islice(source.items, limit)
    total = source.count if limit is None else min(limit, source.count or limit)
    bar = progress_bar(total, progress)
    scores: dict[str, dict[str, list]] = {}
    layers: dict[str, list] = {}
    classes, methods, runs = [], None, 0
    try:
        while batch := list(itertools.islice(items, batch_size)):
            x = _stack(batch, [item.load() for item in batch], rank)
            where = batch[0].id if len(batch) == 1 else f"{batch[0].id} .. {batch[-1].id}"
            try:
                part = evaluate_batch(model, explainers, first, x, target, metrics, settings, random, show,
                                      graph_model)
            except RulegraphError as exc:
                raise RulegraphError(f"samples {where}: {exc}") from exc
            methods = part.methods
            classes.append(part.classes)
            runs += part.runs
            for method, values in part.scores.items():
                for metric, v in values.items():
                    scores.setdefault(method, {}).setdefault(metric, []).append(v)
            for method, steps in part.layers.items():
                layers.setdefault(method, []).append(steps)
            bar.update(len(batch))
    finally:
        bar.close()
    if methods is None:
        raise RulegraphError(f"{source.where}: the dataset holds no samples")
    result = Evaluation(methods=methods, classes=np.concatenate(classes), runs=runs)
    result.scores = {m: {k: np.concatenate(v) for k, v in values.items()} for m, values in scores.items()}
    result.layers = {m: [(name, np.concatenate([steps[i][1] for steps in parts]))
                         for i, (name, _) in enumerate(parts[0])] for m, parts in layers.items()}
    return result
