"""Writing the user's files safely: every output is checked before the work starts and written
atomically.

``check_output`` refuses, with a message naming the path and the fix, an output that is one of the
command's inputs (the model, its external-data files, the rule file, the input), a directory, a
path in a missing or unwritable folder, or one whose extension is not one the writer knows.
``atomic_write`` writes to a temporary file in the same folder and renames it into place
(``os.replace``), removing the temporary file on any failure, so a write that fails half way (disk
full, a file-size limit, Ctrl-C) leaves the previous file as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from ..errors import RulegraphError


def model_files(model, outputs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The files a model path reads: the .onnx file and the external-data files it names. The
    model is parsed for the latter only when one of ``outputs`` lies inside the model's folder
    (external data never lies elsewhere, graph/read.py), so a large model is not read twice for nothing."""
    if not isinstance(model, (str, os.PathLike)):
        return []
    path = Path(model)
    folder = path.resolve().parent
    near = [o for o in outputs if o is not None and folder in Path(o).resolve().parents]
    if not path.is_file() or not near:
        return [path]
    files = [path]
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError):  # an unreadable model is reported by the model reader
        return files
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute
                                               if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and path.parent / location not in files:
                files.append(path.parent / location)
    return files


def rule_files(rules) -> list[Path]:
    """The rule file a ``--rules`` argument names, when it is a file (not a bundled name)."""
    if isinstance(rules, (str, os.PathLike)) and Path(rules).is_file():
        return [Path(rules)]
    return []


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                 suffixes: Iterable[str] | None = None, what: str = "output") -> Path:
    """``path`` as a Path, after making sure it can be written without harming any of ``inputs``.

    ``suffixes`` (lower case, with the dot) restricts the extension; ``what`` names the output in
    messages (``--heatmap``)."""
    path = Path(path)
    if suffixes is not None:
        allowed = sorted(set(suffixes))
        if path.suffix.lower() not in allowed:
            found = f"extension '{path.suffix}'" if path.suffix else "no extension"
            raise RulegraphError(f"{what} {path}: {found}; use one of {', '.join(allowed)}")
    for given in inputs:
        if given is not None and _same_file(path, Path(given)):
            raise RulegraphError(f"{what} {path} is the input file {given}; writing it would destroy the "
                                 f"input: choose another output path")
    if path.is_dir():
        raise RulegraphError(f"{what} {path} is a directory; give a file name inside it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise RulegraphError(f"{what} {path}: the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise RulegraphError(f"{what} {path}: {folder} is a file, not a folder; choose another path")
    try:  # a real probe: permission bits say nothing for root or on a read-only file system
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise RulegraphError(f"{what} {path}: cannot create files in {folder} ({exc.strerror}); choose a "
                             f"writable folder") from None
    return path


def _new_file_mode(target: Path) -> int:
    """The permission bits the output gets: the replaced file's, else the default for new files."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def atomic_write(path: str | os.PathLike, what: str = "output"):
    """Yield a temporary path next to ``path`` (same extension); on success it replaces ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    untouched; an OSError becomes a RulegraphError naming ``path``."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=folder)
    except OSError as exc:
        raise RulegraphError(f"{what} {path}: cannot create a file in {folder}: {exc.strerror}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except OSError as exc:
        raise RulegraphError(f"{what} {path}: the write failed ({exc.strerror or exc}); the previous "
                             f"file, if any, is unchanged") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_with(path: str | os.PathLike, writer: Callable[[Path], object], what: str = "output") -> Path:
    """Run ``writer(temporary_path)`` and move the result to ``path`` atomically."""
    with atomic_write(path, what) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "output") -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data), what)
