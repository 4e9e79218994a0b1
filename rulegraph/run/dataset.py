"""Where the samples of a dataset run come from, one at a time.

A source is a sequence of ``Item(id, load)``: ``id`` names the sample in the user's world (an
image's path relative to its folder, ``shard.npy:17`` for row 17 of a shard, ``table.parquet:3``
or the table's own ``id``/``path`` column, the position in an iterable) and ``load()`` reads that
one sample (an array without the batch axis, or a dict per model input). Nothing is read before it
is asked for, so a run holds one batch in memory whatever the dataset's size, and a resumed run
skips finished shards without reading them.

Sources (``open_source``):

- a folder: every image, ``.npy`` and ``.npz`` file below it (recursively), in sorted path order;
- a glob pattern (``data/**/*.png``, ``shards/*.npy``): the matching files, sorted;
- one ``.npy``/``.npz`` file: a sample per row (a ``.npy`` is memory-mapped, never read whole);
- a ``.parquet`` file (pyarrow, the ``dataset`` extra): a column of encoded images (bytes) or of
  tensors (nested lists, reshaped to the model input's fixed shape), read one row group at a time;
- in the API, any iterable of arrays (one sample each, or ``(id, array)`` pairs).

Images go through the preprocessing (``preprocess.py``); array files are taken as already
preprocessed. Array rows are checked as ``inputs.py`` checks whole files (dtype, size, NaN/Inf),
and every error names the file and row.
"""

from __future__ import annotations

import glob
import io
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RulegraphError
from . import preprocess as pre
from .inputs import IMAGE_SUFFIXES, _check_dtype, _check_finite, _expect_size, _read_header, load_input

ARRAY_SUFFIXES = {".npy", ".npz"}
GLOB_CHARACTERS = set("*?[")
#: the columns a parquet source takes its sample names from, in order
ID_COLUMNS = ("id", "path")


@dataclass(frozen=True)
class Item:
    """One sample: its name and how to read it."""

    id: str
    load: Callable[[], object]


@dataclass
class Source:
    """The samples of a dataset in order; ``count`` is their number when known before reading
    (files, tables; None for a plain iterable) and ``where`` names the source in messages."""

    items: Iterable[Item]
    count: int | None
    where: str


def require(module: str, what: str):
    """Import ``module`` (pyarrow, tqdm) or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RulegraphError(f"{what} needs {module.split('.')[0]}: pip install \"rulegraph-onnx[dataset]\"") \
            from None


def is_dataset_path(text: str) -> bool:
    """A folder, a glob pattern or a parquet file: inputs only a dataset run takes."""
    return (Path(text).is_dir() or bool(GLOB_CHARACTERS & set(text))
            or Path(text).suffix.lower() == ".parquet")


def open_source(data, explainer, preprocess=None, scale: float = 1.0, allow_nonfinite: bool = False,
                column: str | None = None) -> Source:
    """The ``Source`` of ``data``: a folder, glob pattern, ``.npy``/``.npz``/``.parquet`` path, or an
    iterable of arrays (the module docstring)."""
    if isinstance(data, Source):
        return data
    spec = pre.resolve(preprocess if preprocess is not None else getattr(explainer, "preprocess", None))
    if not isinstance(data, (str, os.PathLike)):
        if isinstance(data, (np.ndarray, Mapping)):
            raise RulegraphError("a dataset is an iterable of samples (or a folder, glob or file path); for "
                                 "one batch array use Explainer.explain")
        return Source(_iterable_items(data), _length(data), "the iterable")
    text = str(data)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _readable_suffix(p))
        if not files:
            raise RulegraphError(f"{path}: the folder holds no images, .npy or .npz files")
        return _files_source(files, path, text, explainer, spec, scale, allow_nonfinite)
    if GLOB_CHARACTERS & set(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        unknown = [p for p in files if not _readable_suffix(p)]
        if unknown:
            raise RulegraphError(f"{unknown[0]}: unknown input format '{unknown[0].suffix}' in the files matching "
                                 f"{text} (use images, .npy or .npz)")
        if not files:
            raise RulegraphError(f"{text}: no file matches the pattern")
        return _files_source(files, _glob_root(text), text, explainer, spec, scale, allow_nonfinite)
    if not path.is_file():
        raise RulegraphError(f"{path}: no such input file or folder")
    if path.suffix.lower() == ".parquet":
        return _parquet_source(path, explainer, spec, scale, allow_nonfinite, column)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return _files_source([path], path.parent, text, explainer, spec, scale, allow_nonfinite)
    raise RulegraphError(f"{path}: a dataset is a folder, a glob pattern, a .npy, .npz or .parquet file; "
                         f"'{path.suffix}' is none of them")


def _glob_root(pattern: str) -> Path:
    """The folder a pattern's matches are named relative to: its leading parts without wildcards."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[:next(i for i, p in enumerate(parts) if GLOB_CHARACTERS & set(p))]]
    return Path(*fixed) if fixed else Path(".")


def _readable_suffix(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES


def _length(data) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _iterable_items(data) -> Iterator[Item]:
    """Items of an iterable: each element one sample, or an ``(id, sample)`` pair."""
    for i, value in enumerate(data):
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            name, value = value
        else:
            name = str(i)
        yield Item(name, lambda v=value: v)


def _files_source(files: list[Path], root: Path, where: str, explainer, spec, scale, allow_nonfinite) -> Source:
    """Images (one sample each) and array files (a sample per row) in the given order."""
    if spec is not None and any(p.suffix.lower() in ARRAY_SUFFIXES for p in files):
        pre.already_preprocessed(where, spec)
    names = explainer.graph.inputs
    shards, count = [], 0
    for path in files:
        name = _relative(path, root)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            shards.append((name, path, None))
            count += 1
        else:
            shard = ArrayShard(path, names, allow_nonfinite)
            shards.append((name, path, shard))
            count += shard.rows

    def items():
        for name, path, shard in shards:
            if shard is None:
                yield Item(name, lambda p=path: _image(p, explainer, spec, scale))
            else:
                for row in range(shard.rows):
                    yield Item(f"{name}:{row}", lambda s=shard, r=row: s.row(r))

    return Source(items(), count, where)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _image(path: Path, explainer, spec, scale: float) -> np.ndarray:
    """One image file as the model's input without the batch axis (``inputs.load_input``)."""
    with warnings.catch_warnings():
        return load_input(path, explainer, scale, preprocess=spec)[0]


class ArrayShard:
    """A ``.npy``/``.npz`` file read a row at a time. Headers are checked when the source is opened
    (the row count comes from them); a ``.npy`` is memory-mapped, a ``.npz`` read whole once, when its
    first row is asked for, and dropped when another shard is read (one shard in memory)."""

    _held: tuple[Path, dict] | None = None  # the one .npz held in memory, shared by all shards

    def __init__(self, path: Path, names: list[str], allow_nonfinite: bool):
        self.path, self.allow_nonfinite = path, allow_nonfinite
        shapes = _npy_shapes(path) if path.suffix.lower() == ".npy" else _npz_shapes(path)
        if path.suffix.lower() == ".npz":
            if set(names) <= set(shapes):
                self.keys = {n: n for n in names}
            elif len(shapes) == 1 or "x" in shapes:
                self.keys = {names[0]: "x" if "x" in shapes else next(iter(shapes))}
            else:
                raise RulegraphError(f"{path}: holds {sorted(shapes)}; expected arrays named {names} or one "
                                     f"array 'x'")
        else:
            self.keys = {names[0]: None}
        rows = {key: shapes[key][0] if shapes[key] else None for key in self.keys.values()}
        if None in rows.values():
            raise RulegraphError(f"{path}: a scalar array has no rows; a dataset shard is batch first [N, ...]")
        if len(set(rows.values())) > 1:
            raise RulegraphError(f"{path}: the arrays have different numbers of rows ({rows}); give each "
                                 f"input the same number")
        self.rows = next(iter(rows.values()))
        self.single = len(names) == 1

    def _arrays(self) -> dict:
        if self.path.suffix.lower() == ".npy":
            if not hasattr(self, "_mapped"):
                self._mapped = {None: np.load(self.path, mmap_mode="r", allow_pickle=False)}
            return self._mapped
        held = ArrayShard._held
        if held is None or held[0] != self.path:
            from .inputs import read_npz

            ArrayShard._held = held = (self.path, read_npz(self.path))
        return held[1]

    def row(self, index: int):
        """Row ``index`` of every array (a copy: the file is not kept mapped through it)."""
        arrays = self._arrays()
        out = {}
        for name, key in self.keys.items():
            value = np.array(arrays[key][index])
            where = f"{self.path} row {index}" + (f" of array '{key}'" if key else "")
            if not self.allow_nonfinite:
                _check_finite(where, value)
            out[name] = value
        return next(iter(out.values())) if self.single else out


def _npy_shapes(path: Path) -> dict:
    with open(path, "rb") as handle:
        shape, dtype, header = _read_header(handle, str(path))
    _check_dtype(str(path), dtype)
    _expect_size(str(path), shape, dtype, path.stat().st_size - header)
    return {None: shape}


def _npz_shapes(path: Path) -> dict:
    """The shape of each array of a .npz, from the headers alone (checked as ``inputs.read_npz`` does)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:   # a newer zip format
        raise RulegraphError(f"{path} is not a readable .npz archive ({exc}); write it with np.savez") from None
    shapes = {}
    with archive:
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                raise RulegraphError(f"{path}: member '{member.filename}' is not a .npy array")
            where = f"{path}: array '{member.filename[:-4]}'"
            try:
                with archive.open(member) as handle:
                    shape, dtype, header = _read_header(handle, where)
            except (zipfile.BadZipFile, OSError, NotImplementedError) as exc:
                raise RulegraphError(f"{where} cannot be read ({exc})") from None
            _check_dtype(where, dtype)
            _expect_size(where, shape, dtype, member.file_size - header)
            shapes[member.filename[:-4]] = shape
    if not shapes:
        raise RulegraphError(f"{path} holds no arrays")
    return shapes


def _parquet_source(path: Path, explainer, spec, scale, allow_nonfinite, column) -> Source:
    """A parquet table: its image or tensor column, a row group in memory at a time."""
    pq = require("pyarrow.parquet", f"reading {path}")
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
        raise RulegraphError(f"{path} is not a readable parquet file ({exc})") from None
    schema = table.schema_arrow
    column = _pick_column(path, schema, explainer.graph.inputs[0], column)
    id_column = next((c for c in ID_COLUMNS if c in schema.names and c != column), None)
    binary = _is_binary(schema.field(column).type)
    decode = _decoder(path, column, binary, explainer, spec, scale, allow_nonfinite)
    wanted = [column] + ([id_column] if id_column else [])
    groups = table.metadata.num_row_groups

    def items():
        start = 0
        for g in range(groups):
            rows = table.metadata.row_group(g).num_rows
            names = (table.read_row_group(g, columns=[id_column]).column(0).to_pylist() if id_column
                     else [f"{path.name}:{start + i}" for i in range(rows)])
            held: dict = {}

            def cell(i, g=g, held=held):
                if "group" not in held:  # the group's data, read once when its first sample is asked for
                    held.clear()
                    held["group"] = table.read_row_group(g, columns=wanted).column(0)
                return held["group"][i]

            for i in range(rows):
                yield Item(str(names[i]), lambda i=i, cell=cell, row=start + i: decode(cell(i), row))
            start += rows

    return Source(items(), table.metadata.num_rows, str(path))


def _is_binary(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _pick_column(path: Path, schema, input_name: str, column: str | None) -> str:
    """The column to explain: the one named, else one named like the model input, else ``image``,
    else the only binary or list column."""
    import pyarrow as pa

    if column is not None:
        if column not in schema.names:
            raise RulegraphError(f"{path}: no column '{column}'; columns: {', '.join(schema.names)}")
        return column
    for name in (input_name, "image"):
        if name in schema.names:
            return name
    candidates = [f.name for f in schema if _is_binary(f.type) or pa.types.is_list(f.type)
                  or pa.types.is_fixed_size_list(f.type) or pa.types.is_large_list(f.type)]
    if len(candidates) != 1:
        raise RulegraphError(f"{path}: cannot tell which column holds the inputs (columns: "
                             f"{', '.join(schema.names)}); name it with --column (column= in Python)")
    return candidates[0]


def image_from_bytes(data: bytes | None, where: str, explainer, spec, scale: float = 1.0) -> np.ndarray:
    """An encoded image (PNG, JPEG, ... bytes) as the model's first input without the batch axis,
    through ``spec`` (or plain reading at ``scale``); errors name ``where``."""
    from .images import open_image

    if data is None:
        raise RulegraphError(f"{where} is empty (null)")
    buffer = io.BytesIO(data)
    try:
        picture = open_image(buffer)
    except RulegraphError as exc:  # its message names the buffer: name the row instead
        raise RulegraphError(str(exc).replace(str(buffer), where)) from None
    name = explainer.graph.inputs[0]
    shape = explainer.graph.shapes.get(name)
    chosen = spec or pre.Preprocess(scale=scale)
    pre.check_against(chosen, shape, f"{where} for input '{name}'")
    channels, height, width = pre.layout_shape(chosen, shape)
    fixed = isinstance(height, int) and isinstance(width, int)
    return pre.preprocess(picture, chosen, channels if isinstance(channels, int) else 3,
                          (height, width) if fixed else None)[0]


def _decoder(path: Path, column: str, binary: bool, explainer, spec, scale, allow_nonfinite):
    """cell, row -> the sample: encoded image bytes through the preprocessing, or a nested list as an
    array reshaped to the model input's fixed shape."""
    name = explainer.graph.inputs[0]
    shape = explainer.graph.shapes.get(name)

    def image(cell, row):
        return image_from_bytes(cell.as_py(), f"{path} row {row} (column '{column}')", explainer, spec, scale)

    def tensor(cell, row):
        where = f"{path} row {row} (column '{column}')"
        value = cell.as_py()
        if value is None:
            raise RulegraphError(f"{where} is empty (null)")
        try:
            array = np.asarray(value)
        except ValueError as exc:
            raise RulegraphError(f"{where}: the nested lists are ragged ({exc})") from None
        _check_dtype(where, array.dtype)
        sample = list(shape[1:]) if shape else None
        if array.ndim == 1 and sample and all(isinstance(d, int) for d in sample) and len(sample) > 1:
            if array.size != int(np.prod(sample)):
                raise RulegraphError(f"{where} holds {array.size} values; input '{name}' takes {sample} "
                                     f"({int(np.prod(sample))} values) per sample")
            array = array.reshape(sample)
        if not allow_nonfinite:
            _check_finite(where, array)
        return array

    return image if binary else tensor
