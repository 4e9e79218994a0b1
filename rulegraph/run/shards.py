"""A dataset run: samples (``dataset.py``) in batches through the explainer, written shard by shard.

The samples are cut into shards of ``shard_size`` in source order and each shard into batches of
``batch_size``; shard k is written to ``OUT/part-0000k.parquet`` (or ``.npz``) once all its batches
are computed, through a temporary file renamed into place (``files.atomic_write``). A file that
exists is therefore complete: a rerun into the same folder skips it (checking that it names the
same samples) and computes the rest, and since shards and batches fall on the same samples, every
file is the one an uninterrupted run writes. ``OUT/rulegraph-run.json`` records what the files
were computed with (the compiled explainer's digest, target, sizes, format); a rerun with anything
else is refused rather than mixed in.

One row per sample (``columns``): ``id`` (``dataset.Item.id``), ``target`` (the class explained),
``logit`` (the start tensor at that class where it is ``[N, C]``, else NaN), ``start_value``,
``delta`` (Σ attribution + Σ bias shares − start value, float64), ``attribution`` (the first
attributed input's, flattened in parquet, with ``attribution_shape``) and, for models with several
attributed inputs, ``attribution/<input>`` and ``attribution_shape/<input>``.

The batch size is chosen to a memory budget from the tensor sizes per sample of the model
(``batch_size_for``), the shard size so that a shard's attributions fit the same budget.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import sys
import time
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..compile.targets import Target
from ..errors import RulegraphError, RulegraphWarning
from ..graph import large
from .dataset import Source, open_source, require
from .files import atomic_write

FORMATS = ("parquet", "npz")
MANIFEST = "rulegraph-run.json"
DEFAULT_MEMORY_BUDGET = 1 << 30
MAX_SHARD_SIZE = 1000
#: the largest batch chosen by itself: onnxruntime's throughput has long levelled off there, and
#: the runtime's buffers settle after the second run of a shape, so a run of a few batches already
#: has its whole-dataset peak memory
MAX_BATCH_SIZE = 256
#: the model's intermediate tensors are counted this many times per sample: the forward value, its
#: relevance view in the backward pass, and one more for the runtime's own buffers
TENSOR_COPIES = 3


@dataclass
class Summary:
    """What a dataset run did: samples, shards (``resumed`` of them found finished), seconds, and
    the worst and median relative conservation delta ``|delta| / |start value|`` (``worst_id``)."""

    samples: int
    shards: int
    resumed: int
    seconds: float
    worst_delta: float
    median_delta: float
    worst_id: str
    out: Path

    def __str__(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else float("inf")
        resumed = f" ({self.resumed} found finished)" if self.resumed else ""
        return (f"{self.samples} samples in {self.shards} shards{resumed} written to {self.out} in "
                f"{self.seconds:.1f} s ({rate:.1f} samples/s); relative conservation delta: worst "
                f"{self.worst_delta:.2e} ({self.worst_id}), median {self.median_delta:.2e}")


def _attribution_names(names) -> dict[str, tuple[str, str]]:
    """input -> (attribution column, shape column)."""
    return {x: ("attribution", "attribution_shape") if i == 0 else (f"attribution/{x}", f"attribution_shape/{x}")
            for i, x in enumerate(names)}


def logits(result) -> np.ndarray:
    """The start tensor at the explained class per row where it is ``[N, C]`` (float64), else NaN."""
    rows = len(result.start_value)
    start = np.asarray(result.start)
    if result.target is None or start.ndim != 2 or start.shape[0] != rows:
        return np.full(rows, np.nan)
    classes = np.asarray(result.target, dtype=np.int64)
    valid = (classes >= 0) & (classes < start.shape[1])
    picked = start[np.arange(rows), np.where(valid, classes, 0)].astype(np.float64)
    return np.where(valid, picked, np.nan)


def columns(result, ids: list[str]) -> dict[str, np.ndarray]:
    """One row per sample of an explain ``Result`` (the module docstring names the columns)."""
    rows = len(result.start_value)
    cols = {"id": np.asarray(ids, dtype=str),
            "target": np.full(rows, -1, np.int64) if result.target is None else
            np.asarray(result.target, dtype=np.int64).reshape(rows),
            "logit": logits(result),
            "start_value": np.asarray(result.start_value, dtype=np.float64).reshape(rows),
            "delta": np.asarray(result.delta, dtype=np.float64).reshape(rows)}
    for x, (name, shape) in _attribution_names(result.attribution).items():
        value = np.asarray(result.attribution[x])
        cols[name] = value
        cols[shape] = np.tile(np.asarray(value.shape[1:], dtype=np.int64), (rows, 1))
    return cols


def _bytes_per_row(graph, name: str, fallback: int) -> int:
    shape = graph.shapes.get(name)
    if not shape:
        return 0
    dims = shape[1:]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes.get(name, onnx.TensorProto.FLOAT))
    if all(isinstance(d, int) and d >= 0 for d in dims):
        return int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    return fallback


def batch_size_for(explainer, sample_bytes: int, budget: int) -> int:
    """The most samples whose tensors fit ``budget`` bytes: each tensor that carries the batch axis
    (its first dimension the inputs' batch dimension) counted ``TENSOR_COPIES`` times at its size per
    sample (a tensor with other unknown dimensions at the input sample's size), at least 1; a model
    exported with a fixed batch takes a multiple of it; at most ``MAX_BATCH_SIZE`` (or the fixed batch)."""
    graph = explainer.graph
    batch_dim = graph.dim(graph.inputs[0], 0) if graph.rank(graph.inputs[0]) else None
    static = batch_dim if isinstance(batch_dim, int) and batch_dim > 1 else None
    per_sample = sum(_bytes_per_row(graph, name, sample_bytes) for name, shape in graph.shapes.items()
                     if shape and shape[0] == batch_dim)
    per_sample = TENSOR_COPIES * max(per_sample, sample_bytes) + 2 * sample_bytes
    size = max(1, min(MAX_BATCH_SIZE, budget // max(per_sample, 1)))
    if static:
        size = max(static, size - size % static)
    return int(size)


def sizes(explainer, sample, batch_size: int | None, shard_size: int | None, budget: int) -> tuple[int, int]:
    """(batch size, shard size): those given, else chosen to ``budget`` from one ``sample``: the batch
    by ``batch_size_for``, the shard so that its attributions (about the inputs' size) take a quarter
    of the budget, at least one batch and at most ``MAX_SHARD_SIZE``."""
    values = sample.values() if isinstance(sample, Mapping) else [sample]
    sample_bytes = sum(np.asarray(v).nbytes for v in values)
    if batch_size is None:
        batch_size = batch_size_for(explainer, sample_bytes, budget)
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise RulegraphError(f"batch size {batch_size} and shard size {shard_size} must be at least 1")
    if shard_size is None:
        shard_size = int(min(MAX_SHARD_SIZE, max(batch_size, budget // max(4 * sample_bytes, 1))))
    return int(batch_size), int(shard_size)


def _digest(explainer) -> str:
    """What the outputs depend on besides the samples: the compiled pass and any loop around it."""
    h = hashlib.sha256()
    for piece in large.serialized(explainer.compiled().model):
        h.update(piece)
    h.update(repr(getattr(explainer.ruleset, "loop", None)).encode())
    return h.hexdigest()


def _target_text(target) -> str:
    if isinstance(target, Target) or isinstance(target, (str, int, np.integer)):
        return repr(target)
    raise RulegraphError(f"a dataset run explains one target for every sample: 'argmax', a class index or a "
                         f"Target (at=, region=, ...); got {type(target).__name__} (per-row classes and seed "
                         f"arrays fit one batch: use Explainer.explain)")


def manifest(explainer, target, format: str, shard_size: int, batch_size: int, options: dict) -> dict:
    """What a run's files depend on besides the samples (``MANIFEST``)."""
    return {"explainer": _digest(explainer), "target": _target_text(target), "format": format,
            "shard_size": shard_size, "batch_size": batch_size, "options": repr(sorted(options.items()))}


def _check_manifest(out: Path, manifest: dict) -> None:
    """Record ``manifest`` in ``out``, or check that the run already there was computed the same way."""
    path = out / MANIFEST
    if path.exists():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RulegraphError(f"{path} is not readable ({exc}); remove the folder's contents or choose "
                                 f"another output folder") from None
        changed = [k for k in manifest if found.get(k) != manifest[k]]
        if changed:
            listed = "; ".join(f"{k}: {found.get(k)!r} there, {manifest[k]!r} now" for k in changed)
            raise RulegraphError(f"{out} holds a run computed with other settings ({listed}); resume with the "
                                 f"same settings, or write to another folder")
        return
    with atomic_write(path, "run record") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _write_npz(path: Path, cols: dict[str, np.ndarray]) -> None:
    """An .npz whose bytes depend only on the arrays (fixed member dates, fixed order)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, value in cols.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(value), allow_pickle=False)
            archive.writestr(info, buffer.getvalue())


def _write_parquet(path: Path, cols: dict[str, np.ndarray]) -> None:
    """One parquet table, one row per sample; arrays of more than one axis as fixed-size lists."""
    pa = require("pyarrow", "writing parquet")
    pq = require("pyarrow.parquet", "writing parquet")
    arrays = {}
    for name, value in cols.items():
        if value.ndim == 1:
            arrays[name] = pa.array(value.tolist() if value.dtype.kind == "U" else value)
        else:
            flat = value.reshape(len(value), -1)
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    pq.write_table(pa.table(arrays), path)


def read_shard(path: str | Path) -> dict[str, np.ndarray]:
    """A shard's columns as arrays, the attributions in their own shapes (batch first)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    pa = require("pyarrow", f"reading {path}")
    pq = require("pyarrow.parquet", f"reading {path}")
    table = pq.read_table(path)
    cols = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            cols[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
        else:
            cols[name] = np.asarray(column.to_numpy(zero_copy_only=False))
    cols["id"] = cols["id"].astype(str)
    for name, shape in _shape_columns(cols).items():
        if len(cols[shape]):
            cols[name] = cols[name].reshape(len(cols[name]), *cols[shape][0])
    return cols


def _shape_columns(cols) -> dict[str, str]:
    return {name.replace("attribution_shape", "attribution"): name for name in cols
            if name.startswith("attribution_shape")}


def read_outputs(out: str | Path) -> dict[str, np.ndarray]:
    """Every shard of a finished run, in order, concatenated (a run's whole output in memory)."""
    out = Path(out)
    files = sorted(out.glob("part-*.parquet")) + sorted(out.glob("part-*.npz"))
    if not files:
        raise RulegraphError(f"{out}: no shards (part-*.parquet or part-*.npz)")
    parts = [read_shard(f) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


WRITERS = {"parquet": _write_parquet, "npz": _write_npz}


def _shard_summary(path: Path) -> dict[str, np.ndarray]:
    """The small columns of a finished shard (ids, start values, deltas), without its attributions."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in ("id", "start_value", "delta")}
    pq = require("pyarrow.parquet", f"reading {path}")
    table = pq.read_table(path, columns=["id", "start_value", "delta"])
    return {k: np.asarray(table.column(k).to_pylist(), dtype=str if k == "id" else np.float64)
            for k in ("id", "start_value", "delta")}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, enabled: bool | None):
    """A tqdm bar on standard error (rate and ETA), on by default when standard error is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        warnings.warn("no progress bar: tqdm is missing (pip install \"rulegraph-onnx[dataset]\")",
                      RulegraphWarning, stacklevel=3)
        return _NoBar()
    return tqdm(total=total, unit="sample", file=sys.stderr, dynamic_ncols=True)


def _stack(items, values, rank: int | None):
    """One batch from samples: arrays stacked (a leading axis of 1 at the model's full rank dropped),
    or a dict per input. Samples of different shapes are refused naming the first that differs."""
    if isinstance(values[0], Mapping):
        return {k: _stack(items, [v[k] for v in values], None) for k in values[0]}
    arrays = [np.asarray(v) for v in values]
    if rank is not None:
        arrays = [a[0] if a.ndim == rank and a.shape[:1] == (1,) else a for a in arrays]
    first = arrays[0].shape
    for item, array in zip(items, arrays):
        if array.shape != first:
            raise RulegraphError(f"{item.id}: shape {list(array.shape)} differs from {items[0].id}'s "
                                 f"{list(first)}; the samples of a batch must share a shape (images: give "
                                 f"--resize/--crop or a preprocess preset)")
    return np.stack(arrays)


def _explain_batch(explainer, items, target, options) -> dict[str, np.ndarray]:
    rank = explainer.graph.rank(explainer.graph.inputs[0])
    x = _stack(items, [item.load() for item in items], rank)
    where = items[0].id if len(items) == 1 else f"{items[0].id} .. {items[-1].id}"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RulegraphWarning)
            result = explainer.explain(x, target=target, **options)
    except RulegraphError as exc:
        raise RulegraphError(f"samples {where}: {exc}") from exc
    for warning in caught:  # said again naming the samples ("row 6" is a row of this batch)
        if issubclass(warning.category, RulegraphWarning):
            warnings.warn(f"samples {where}: {warning.message}", RulegraphWarning, stacklevel=2)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return columns(result, [item.id for item in items])


def _peek(items):
    """The first item and an iterator over all of them."""
    iterator = iter(items)
    first = next(iterator, None)
    return first, (iterator if first is None else itertools.chain([first], iterator))


def run(explainer, data, out: str | Path, target="argmax", format: str = "parquet",
        shard_size: int | None = None, batch_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool | None = None, preprocess=None,
        scale: float = 1.0, column: str | None = None, **options) -> Summary:
    """Explain every sample of ``data`` (``dataset.open_source``) into shards in the folder ``out``
    (created if missing; a run already there is resumed). ``options`` go to ``Explainer.explain``."""
    started = time.perf_counter()
    if format not in WRITERS:
        raise RulegraphError(f"unknown output format '{format}'; formats: {', '.join(FORMATS)}")
    if format == "parquet":
        require("pyarrow.parquet", "a parquet output (--format npz needs nothing more)")
    _target_text(target)
    source: Source = open_source(data, explainer, preprocess, scale, explainer.allow_nonfinite, column)
    out = _output_folder(out, data)
    first, items = _peek(source.items)
    if first is None:
        raise RulegraphError(f"{source.where}: the dataset is empty")
    batch_size, shard_size = sizes(explainer, first.load(), batch_size, shard_size, memory_budget)
    _check_manifest(out, manifest(explainer, target, format, shard_size, batch_size, options))
    for stale in out.glob(".part-*.tmp*"):  # left by a process killed outright (atomic_write's temp files)
        stale.unlink()
    bar = progress_bar(source.count, progress)
    done, summaries, resumed = 0, [], 0
    try:
        for index in itertools.count():
            shard = list(itertools.islice(items, shard_size))
            if not shard:
                break
            path = out / f"part-{index:05d}.{format}"
            if path.exists():
                summaries.append(_resumed(path, shard))
                resumed += 1
            else:
                parts = [_explain_batch(explainer, shard[i:i + batch_size], target, options)
                         for i in range(0, len(shard), batch_size)]
                cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                with atomic_write(path, "shard") as tmp:
                    WRITERS[format](tmp, cols)
                summaries.append({k: cols[k] for k in ("id", "start_value", "delta")})
            done += len(shard)
            bar.update(len(shard))
    finally:
        bar.close()
    return _summary(summaries, done, resumed, time.perf_counter() - started, out)


def _output_folder(out, data) -> Path:
    """``out`` as a folder to write shards in: created when missing (its parent must exist), never
    the input folder or inside it (a rerun would read the shards as inputs)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RulegraphError(f"output folder {out} is a file; a dataset run writes its shards into a folder")
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        source = Path(data).resolve()
        if out.resolve() == source or source in out.resolve().parents:
            raise RulegraphError(f"output folder {out} is inside the input folder {data}; a rerun would read "
                                 f"the shards as inputs: choose a folder outside it")
    if not out.exists():
        if not out.parent.is_dir():
            raise RulegraphError(f"output folder {out}: the folder {out.parent} does not exist; create it first")
        try:
            out.mkdir()
        except OSError as exc:
            raise RulegraphError(f"output folder {out}: cannot create it ({exc.strerror})") from None
    return out


def _resumed(path: Path, shard) -> dict[str, np.ndarray]:
    """A finished shard's summary columns, after checking that it holds the samples it should."""
    try:
        found = _shard_summary(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise RulegraphError(f"{path} cannot be read ({exc}); delete it and run again") from None
    expected = [item.id for item in shard]
    if found["id"].tolist() != expected:
        first = next((i for i, (a, b) in enumerate(zip(found["id"].tolist(), expected)) if a != b),
                     min(len(found["id"]), len(expected)))
        raise RulegraphError(f"{path} holds other samples than the source gives now (from sample {first}: "
                             f"'{found['id'][first] if first < len(found['id']) else '(end)'}' there, "
                             f"'{expected[first] if first < len(expected) else '(end)'}' now); the dataset "
                             f"changed since: write to another folder")
    return found


def _summary(parts, samples: int, resumed: int, seconds: float, out: Path) -> Summary:
    ids = np.concatenate([p["id"] for p in parts])
    start = np.concatenate([p["start_value"] for p in parts])
    delta = np.concatenate([p["delta"] for p in parts])
    relative = np.abs(delta) / np.maximum(np.abs(start), 1e-12)
    finite = np.where(np.isfinite(relative), relative, np.inf)
    worst = int(np.argmax(finite))
    return Summary(samples, len(parts), resumed, seconds, float(relative[worst]), float(np.median(relative)),
                   str(ids[worst]), out)
