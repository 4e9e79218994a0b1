"""Reading the user's input files: ``.npy``, ``.npz`` and images, refusing what cannot be read
exactly.

``.npy``/``.npz``: read with ``allow_pickle=False`` after checking each array's header (Python
objects, complex numbers and a payload shorter or longer than the header's shape are refused by
name). Images (Pillow): ``Image.MAX_IMAGE_PIXELS`` holds (its DecompressionBombWarning is an error
too), truncated and corrupt files are refused, and the value range follows the mode: 8-bit modes
(``1``, ``L``, ``P``, ``LA``, ``RGB``, ``RGBA``, ``CMYK``, ...) ``/ 255`` after an explicit
conversion to ``L`` or ``RGB`` (alpha dropped, palette expanded); 16-bit (``I;16*``, ``I``)
``/ 65535``; float (``F``, a float TIFF) as stored, with a warning. Everything is then multiplied
by ``scale``.
"""

from __future__ import annotations

import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import RulegraphError
from . import preprocess as pre
from .images import HIGH_DEPTH_MODES, high_depth, open_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: the most bytes one .npz may decompress to (a zip bomb is refused before it is inflated)
MAX_NPZ_BYTES = 8 << 30
def _check_dtype(where: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise RulegraphError(f"{where} holds Python objects (a pickled array), which rulegraph does not "
                             f"unpickle; save a numeric array (np.save(path, array.astype(np.float32)))")
    if dtype.kind == "c":
        raise RulegraphError(f"{where} holds complex numbers ({dtype}); models take real arrays: pass "
                             f"the real part, or real and imaginary parts as separate inputs")
    if dtype.kind not in "biuf":
        raise RulegraphError(f"{where} holds {dtype} values; save a numeric array")


def _read_header(handle, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of a .npy stream, or an error naming ``where``."""
    fmt = np.lib.format
    try:  # a corrupt compressed member (.npz) fails here with zlib.error
        version = fmt.read_magic(handle)
        reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = reader(handle, max_header_size=100_000)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, zlib.error, tokenize.TokenError) as exc:
        # numpy parses a damaged header with ast, then with tokenize (a NUL byte: TokenError)
        raise RulegraphError(f"{where} is not a readable .npy array ({exc}); write it with np.save") from None
    return tuple(shape), np.dtype(dtype), handle.tell()


def _expect_size(where: str, shape, dtype, payload: int) -> None:
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if payload != expected:
        state = "truncated" if payload < expected else "longer than its header says"
        raise RulegraphError(f"{where} is {state}: its header declares shape {shape} of {dtype} "
                             f"({expected} bytes) but it holds {payload}; write it again with np.save")


def read_npy(path: str | Path) -> np.ndarray:
    """One .npy array, checked (header, dtype, size) before it is read."""
    path = Path(path)
    with open(path, "rb") as handle:
        shape, dtype, header = _read_header(handle, str(path))
    _check_dtype(str(path), dtype)
    _expect_size(str(path), shape, dtype, path.stat().st_size - header)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RulegraphError(f"{path}: cannot read the array ({exc})") from None


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a .npz file, each checked like a .npy; the total size is bounded."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:   # a newer zip format
        raise RulegraphError(f"{path} is not a readable .npz archive ({exc}); write it with "
                             f"np.savez") from None
    arrays = {}
    with archive:
        members = archive.infolist()
        total = sum(m.file_size for m in members)
        if total > MAX_NPZ_BYTES:
            raise RulegraphError(f"{path} would decompress to {total} bytes, more than the {MAX_NPZ_BYTES} "
                                 f"rulegraph reads; is it the right file?")
        for member in members:
            if not member.filename.endswith(".npy"):
                raise RulegraphError(f"{path}: member '{member.filename}' is not a .npy array")
            name = member.filename[:-4]
            where = f"{path}: array '{name}'"
            try:
                with archive.open(member) as handle:
                    shape, dtype, header = _read_header(handle, where)
                _check_dtype(where, dtype)
                _expect_size(where, shape, dtype, member.file_size - header)
                with archive.open(member) as handle:
                    array = np.lib.format.read_array(handle, allow_pickle=False)
            except RulegraphError:
                raise
            except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError,
                    NotImplementedError) as exc:
                raise RulegraphError(f"{where} cannot be read ({exc}); write the file again with np.savez") \
                    from None
            arrays[name] = array
    if not arrays:
        raise RulegraphError(f"{path} holds no arrays")
    return arrays


def read_image(path: str | Path, shape: list, scale: float = 1.0) -> np.ndarray:
    """An image file as a float32 [1, C, H, W] array in [0, scale], resized to the model's H, W
    (bilinear) when they are fixed; C is 1 (grey) or 3 (RGB)."""
    from PIL import Image

    path = Path(path)
    _, channels, height, width = shape
    if channels not in (1, 3):
        raise RulegraphError(f"{path}: the model takes {channels} channels; images give 1 (grey) or 3 (RGB): "
                             f"pass a .npy instead")
    image = open_image(path)
    size = (width, height) if isinstance(height, int) and isinstance(width, int) else None
    if image.mode in HIGH_DEPTH_MODES:
        array = high_depth(path, image, size)
        if channels == 3:
            array = np.repeat(array[None], 3, axis=0)
        else:
            array = array[None]
    else:
        image = image.convert("L" if channels == 1 else "RGB")
        if size is not None:
            image = image.resize(size, Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return (array * np.float32(scale)).astype(np.float32)[None]


def _check_finite(where: str, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))
        raise RulegraphError(f"{where} holds {len(bad)} NaN or infinite values (the first at index "
                             f"{tuple(int(i) for i in bad[0])}); clean the input, or allow them explicitly")


def load_input(path: str | Path, explainer, scale: float = 1.0, allow_nonfinite: bool = False,
               preprocess=None):
    """A model input from .npy, .npz (arrays named like the model's inputs, or one array) or an image.

    ``preprocess`` (a ``preprocess.Preprocess``, preset name or .json file; default the explainer's
    ``preprocess``) turns an image into the model's input (``preprocess.py``); array files are taken
    as already preprocessed (a warning says so when a description is given).
    Returns an array, or a dict {input name: array} for a .npz that names the model's inputs."""
    p = Path(path)
    if not p.is_file():
        raise RulegraphError(f"{path}: no such input file")
    suffix = p.suffix.lower()
    spec = pre.resolve(preprocess if preprocess is not None else getattr(explainer, "preprocess", None))
    if spec is not None and suffix in (".npy", ".npz"):
        pre.already_preprocessed(p, spec)
    if spec is not None and suffix in IMAGE_SUFFIXES:
        name = explainer.graph.inputs[0]
        shape = explainer.graph.shapes.get(name)
        pre.check_against(spec, shape, f"{path} for input '{name}'")
        channels, height, width = pre.layout_shape(spec, shape)
        fixed = isinstance(height, int) and isinstance(width, int)
        return pre.preprocess(p, spec, channels if isinstance(channels, int) else 3,
                              (height, width) if fixed else None)
    if suffix == ".npy":
        value = read_npy(p)
        if not allow_nonfinite:
            _check_finite(str(p), value)
        return value
    if suffix == ".npz":
        arrays = read_npz(p)
        if not allow_nonfinite:
            for name, array in arrays.items():
                _check_finite(f"{p}: array '{name}'", array)
        names = explainer.graph.inputs
        if set(names) <= set(arrays):
            return {n: arrays[n] for n in names}
        if len(arrays) == 1 or "x" in arrays:
            return arrays.get("x", next(iter(arrays.values())))
        raise RulegraphError(f"{path}: holds {sorted(arrays)}; expected arrays named {names} or one "
                             f"array 'x'")
    if suffix in IMAGE_SUFFIXES:
        name = explainer.graph.inputs[0]
        shape = explainer.graph.shapes.get(name)
        if shape is None or len(shape) != 4:
            raise RulegraphError(f"{path}: an image needs a model input of shape [N, C, H, W]; "
                                 f"'{name}' has {shape}")
        return read_image(p, shape, scale)
    raise RulegraphError(f"{path}: unknown input format '{suffix}' (use .npy, .npz or an image: "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")


def convert(name: str, value: np.ndarray, want: np.dtype, allow_nonfinite: bool) -> np.ndarray:
    """``value`` as the model's dtype ``want``, only where that loses nothing a user would miss:
    integers (and floats) to a float input, integers to an integer input when every value fits;
    complex, object, string and bool arrays (for a non-bool input) are refused, as are floats for
    an integer input and NaN/Inf in a float input (unless allowed)."""
    got = value.dtype
    where = f"input '{name}' ({want} in the model)"
    if got.kind in "cOSUVMm" or got.hasobject:
        raise RulegraphError(f"{where} was given {got} values; pass a real numeric array")
    if want.kind == "b":
        if got.kind != "b":
            raise RulegraphError(f"{where} was given {got} values; pass a bool array")
        return value
    if got.kind == "b":
        raise RulegraphError(f"{where} was given bool values; pass {want} values (x.astype(np.{want}))")
    if want.kind in "iu":
        if got.kind == "f":
            raise RulegraphError(f"{where} was given {got} values; it takes integers (token ids, indices): "
                                 f"pass an integer array")
        info = np.iinfo(want)
        if value.size and (value.min() < info.min or value.max() > info.max):
            raise RulegraphError(f"{where}: values span [{value.min()}, {value.max()}], outside "
                                 f"{want}'s range")
        return value.astype(want, copy=False)
    with np.errstate(over="ignore"):  # values beyond the range become inf: refused below by name
        converted = value.astype(want, copy=False)
    if got.kind in "iu" and value.size and not np.array_equal(converted.astype(got), value):
        raise RulegraphError(f"{where}: the {got} values are not all exactly representable as {want} "
                             f"(|values| beyond 2^{np.finfo(want).nmant + 1}); scale them first")
    if not allow_nonfinite and value.size and not np.isfinite(converted).all():
        bad = np.argwhere(~np.isfinite(converted))
        finite = np.isfinite(value).all()
        cause = f"values beyond the {want} range" if finite else "NaN or infinite values"
        raise RulegraphError(f"{where} holds {len(bad)} {cause} (the first at index "
                             f"{tuple(int(i) for i in bad[0])}); clean the input, or set "
                             f"explainer.allow_nonfinite = True to explain it anyway")
    return converted
