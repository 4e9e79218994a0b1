"""Explaining a Ray Data dataset (the ``ray`` extra: ``pip install "rulegraph-onnx[ray]"``).

``explain(dataset, model, rules, ...)`` maps a ``ray.data.Dataset`` through the compiled explainer:
``map_batches`` with the callable class ``ExplainBatch`` on an actor pool (``ActorPoolStrategy``),
each actor compiling the explainer once and holding one onnxruntime session (CPU actors; with
``num_gpus`` per actor, GPU actors whose sessions take onnxruntime's CUDA provider where the
``gpu`` extra is installed). A model given as a path is opened by each actor from that path (a
file the workers can read: a local cluster, or shared storage), so a large model is never pickled;
a ``ModelProto`` travels to the actors as bytes; the rule set as a parsed ``RuleSet``.

``explain_files`` (``rulegraph explain --ray``) writes the local run's shard files and resumes like
it: shards already in the output folder are checked (same samples) and skipped, and only the rows
of the others go through Ray, so a rerun after an interruption gives identical files.

The result has the columns of a local dataset run (``run/shards.py``: ``id`` when the dataset has
an ``id`` or ``path`` column, ``target``, ``logit``, ``start_value``, ``delta``, ``attribution``
with ``attribution_shape``), computed by the same explainer, so each row equals the local run's.
The input column holds tensors (a Ray tensor column), encoded images (bytes, through the
preprocessing), or file paths (images, read by the actors). ``ray`` is imported only here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import RulegraphError
from .run import rulefiles
from .run.dataset import ID_COLUMNS, image_from_bytes, is_dataset_path, open_source, require
from .run.explainer import Explainer
from .run.files import atomic_write
from .run.inputs import load_input
from .run.preprocess import resolve
from .run.shards import (
    DEFAULT_MEMORY_BUDGET,
    WRITERS,
    _check_manifest,
    _output_folder,
    _resumed,
    _summary,
    _target_text,
    columns,
    manifest,
    progress_bar,
    sizes,
)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RulegraphError("running on Ray needs ray: pip install \"rulegraph-onnx[ray]\"") from None
    return ray


class ExplainBatch:
    """The callable class of ``map_batches``: one explainer (one onnxruntime session) per actor; a
    batch ``{column: values}`` in, the rows of a local run out."""

    def __init__(self, model: bytes | str, rules, column: str | None, target="argmax", preprocess=None,
                 scale: float = 1.0, max_amplification: float | None = None, options: dict | None = None):
        import onnx

        source = model if isinstance(model, str) else onnx.load_from_string(model)   # a path: opened here
        self.explainer = Explainer(source, rules, preprocess=preprocess, **(options or {}))
        self.column, self.target, self.scale = column, target, scale
        self.max_amplification = max_amplification

    def _column(self, batch: dict) -> str:
        if self.column is not None:
            if self.column not in batch:
                raise RulegraphError(f"the dataset has no column '{self.column}'; columns: {', '.join(batch)}")
            return self.column
        inputs = [c for c in (self.explainer.graph.inputs[0], "image", "bytes") if c in batch]
        others = [c for c in batch if c not in ID_COLUMNS]
        if inputs:
            return inputs[0]
        if len(others) == 1:
            return others[0]
        if "path" in batch:
            return "path"
        raise RulegraphError(f"cannot tell which column holds the inputs (columns: {', '.join(batch)}); pass "
                             f"column=")

    def _inputs(self, values, ids) -> np.ndarray:
        """Tensors as they are; bytes decoded as images; strings read as image files."""
        if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
            return values
        first = values[0]
        spec = self.explainer.preprocess
        if isinstance(first, (bytes, bytearray)):
            return np.stack([image_from_bytes(bytes(v), f"row '{i}'", self.explainer, spec, self.scale)
                             for v, i in zip(values, ids)])
        if isinstance(first, str):
            return np.stack([load_input(v, self.explainer, self.scale, preprocess=spec)[0] for v in values])
        return np.stack([np.asarray(v) for v in values])

    def __call__(self, batch: dict) -> dict:
        column = self._column(batch)
        id_column = next((c for c in ID_COLUMNS if c in batch), None)
        rows = len(batch[column])
        ids = [str(v) for v in batch[id_column]] if id_column else [str(i) for i in range(rows)]
        result = self.explainer.explain(self._inputs(batch[column], ids), target=self.target,
                                        max_amplification=self.max_amplification)
        out = columns(result, ids)
        if id_column is None:
            del out["id"]
        return out


def _cpus_per_actor(ray, actors: int) -> float:
    """1 CPU per actor where the cluster has one more CPU than actors, else a share of all but one:
    actors holding every CPU leave none for the tasks that read the dataset, and the run stalls."""
    if not ray.is_initialized():
        return 1.0
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.1, min(1.0, (cpus - 1) / max(actors, 1)))


def explain(dataset, model, rules, target="argmax", column: str | None = None, batch_size: int = 64,
            actors: int = 2, num_gpus: float = 0, num_cpus: float | None = None, preprocess=None,
            scale: float = 1.0, max_amplification: float | None = None, checked=None, **explainer_options):
    """``dataset`` (a ``ray.data.Dataset``) mapped through the explainer of ``model`` (a path or a
    ModelProto) and ``rules`` (a rule file, bundled name or RuleSet) on ``actors`` actors, each
    given ``num_gpus`` and ``num_cpus`` (default: 1, or a share that leaves one CPU of the cluster
    for reading); ``batch_size`` rows per explainer run. ``explainer_options`` go to ``Explainer``
    (``output``, ``start``, ``class_axis``, ``providers``, ...); ``checked``: an Explainer of the same
    model and rules the caller already made (the check is not repeated). Returns a Dataset with the
    columns of a local run (module docstring); nothing runs until it is consumed."""
    ray = _ray()
    import onnx

    _target_text(target)
    # a path travels as its text and each actor opens the file; a ModelProto as bytes
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(Path(model).resolve())
    ruleset = rules if not isinstance(rules, (str, Path)) else rulefiles.load(rules)
    if checked is None:   # bad model or rules: refused here
        Explainer(model if isinstance(model, onnx.ModelProto) else data, ruleset, **explainer_options)
    return dataset.map_batches(
        ExplainBatch, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model": data, "rules": ruleset, "column": column, "target": target,
                               "preprocess": resolve(preprocess), "scale": scale,
                               "max_amplification": max_amplification, "options": explainer_options},
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=num_gpus or None,
        num_cpus=_cpus_per_actor(ray, actors) if num_cpus is None else num_cpus)


def _dataset_of(path: str, explainer, ray, spans=None):
    """A Ray dataset of the CLI's ``--input``: a parquet file as it is, an image folder or glob as
    rows of (relative ``id``, ``path``) whose images the actors read. ``spans``: only the rows in
    these [start, end) ranges, in order (the shards still to write)."""
    if Path(path).suffix.lower() == ".parquet":
        dataset = ray.data.read_parquet(path)
        if spans is None:
            return dataset
        cuts = sorted({i for span in spans for i in span})
        pieces = dict(zip([0, *cuts], dataset.split_at_indices(cuts)))
        kept = [pieces[start] for start, _ in spans]
        return kept[0].union(*kept[1:]) if len(kept) > 1 else kept[0]
    if not is_dataset_path(path) and Path(path).suffix.lower() in (".npy", ".npz"):
        raise RulegraphError(f"--ray reads parquet files and folders of images; for {path} use "
                             f"ray.data.read_numpy in Python, or run without --ray")
    source = open_source(path, explainer)
    rows = []
    for item in source.items:
        if ":" in item.id and Path(item.id.rsplit(":", 1)[0]).suffix.lower() in (".npy", ".npz"):
            raise RulegraphError(f"--ray reads images from folders; {item.id.rsplit(':', 1)[0]} is an array file: "
                                 f"run without --ray")
        rows.append({"id": item.id, "path": str(_path_of(path, item.id))})
    if spans is not None:
        rows = [row for start, end in spans for row in rows[start:end]]
    return ray.data.from_items(rows)


def _path_of(given: str, relative: str) -> Path:
    from .run.dataset import _glob_root

    root = Path(given) if Path(given).is_dir() else _glob_root(given)
    return (root / relative).resolve()


def explain_files(input_path: str, model, rules, out, actors: int = 2, num_gpus: float = 0, target="argmax",
                  format: str = "parquet", shard_size: int | None = None, batch_size: int | None = None,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, preprocess=None, scale: float = 1.0,
                  column: str | None = None, max_amplification: float | None = None, progress: bool | None = None,
                  **explainer_options):
    """``rulegraph explain --ray``: the dataset at ``input_path`` explained on Ray, the rows gathered
    in order by the driver and written as the shards of a local run (``run/shards.py``); a rerun into
    ``out`` skips the shards written (checking they hold the same samples) and sends Ray only the
    rows of the others. Returns the run's ``Summary``."""
    import time

    ray = _ray()
    started = time.perf_counter()
    if format == "parquet":
        require("pyarrow.parquet", "a parquet output")
    explainer = Explainer(model, rules, preprocess=preprocess, **explainer_options)
    out = _output_folder(out, input_path)
    items = list(open_source(input_path, explainer, preprocess, scale, column=column).items)
    if not items:
        raise RulegraphError(f"{input_path}: the dataset is empty")
    batch_size, shard_size = sizes(explainer, items[0].load(), batch_size, shard_size, memory_budget)
    _check_manifest(out, manifest(explainer, target, format, shard_size, batch_size,
                                  {"max_amplification": max_amplification}))
    for stale in out.glob(".part-*.tmp*"):  # left by a process killed outright (atomic_write's temp files)
        stale.unlink()
    shards = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    paths = [Path(out) / f"part-{k:05d}.{format}" for k in range(len(shards))]
    summaries = {k: _resumed(path, shards[k]) for k, path in enumerate(paths) if path.exists()}
    pending = [k for k in range(len(shards)) if k not in summaries]
    bar = progress_bar(len(items), progress)
    bar.update(sum(len(shards[k]) for k in summaries))
    try:
        if pending:
            if not ray.is_initialized():
                ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().execution_options.preserve_order = True
            spans = None if not summaries else [(k * shard_size, k * shard_size + len(shards[k]))
                                                for k in pending]
            dataset = _dataset_of(input_path, explainer, ray, spans)
            mapped = explain(dataset, model, explainer.ruleset, target, column, batch_size, actors, num_gpus,
                             preprocess=preprocess, scale=scale, max_amplification=max_amplification,
                             checked=explainer, **explainer_options)
            batches = mapped.iter_batches(batch_size=shard_size, batch_format="numpy")
            for index, batch in zip(pending, batches):   # shards fall on the same rows as the local run's
                cols = {k: np.asarray(v) for k, v in batch.items()}
                ids = np.asarray([item.id for item in shards[index]])
                if "id" in cols and cols["id"].astype(str).tolist() != ids.tolist():
                    raise RulegraphError(f"{paths[index]}: Ray gave the rows out of order (a bug in "
                                         f"rulegraph)")
                cols.pop("id", None)
                cols = {"id": ids.astype(str), **cols}
                with atomic_write(paths[index], "shard") as tmp:
                    WRITERS[format](tmp, cols)
                summaries[index] = {k: cols[k] for k in ("id", "start_value", "delta")}
                bar.update(len(ids))
    finally:
        bar.close()
    return _summary([summaries[k] for k in range(len(shards))], len(items), len(shards) - len(pending),
                    time.perf_counter() - started, out)


__all__ = ["ExplainBatch", "explain", "explain_files"]
