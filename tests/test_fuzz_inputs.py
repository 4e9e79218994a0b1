"""Input fuzz campaign: random arrays through the API, random and mutated files through the input
reader and the CLI. The outcome is a result or a RulegraphError (exit 2), never another exception,
never a hang (each example has a time limit), and the user's files are byte-identical afterwards.

Seeded (``derandomize=True``) so CI sees the same examples every run; the number of examples each
campaign ran is printed (``pytest tests/test_fuzz_inputs.py -s``) and cited in the README.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import signal
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulegraph import Explainer
from rulegraph.cli import main
from rulegraph.errors import RulegraphError
from rulegraph.run.inputs import load_input

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"
X = np.load(ROOT / "models" / "digits_sample.npz")["x"]
SECONDS_PER_EXAMPLE = 20
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow])
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def explainer():
    return Explainer(CNN, "lrp-epsilon")


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (TimeoutError) when the block runs longer than ``seconds``: a hang is a finding."""
    def expired(signum, frame):
        raise TimeoutError(f"an example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def count(campaign: str) -> None:
    COUNTS[campaign] = COUNTS.get(campaign, 0) + 1


def report(campaign: str) -> None:
    print(f"\nfuzz campaign '{campaign}': {COUNTS.get(campaign, 0)} examples, "
          f"{COUNTS.get(campaign + ' explained', 0)} explained, the others refused with a RulegraphError")


# ---- arrays through the API --------------------------------------------------------------------------

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_,
          np.complex64, np.complex128, np.object_, np.str_]
SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e38, 3.5e38, -1e300, 2.0**24 + 1, 2.0**63]


@st.composite
def arrays(draw):
    """A batch of any rank (the model takes [N, 1, 8, 8]), any dtype, N possibly 0, special values."""
    shape = draw(st.sampled_from([(), (8,), (8, 8), (1, 8, 8), (0, 1, 8, 8), (1, 1, 8, 8), (3, 1, 8, 8),
                                  (2, 1, 8, 7), (2, 2, 8, 8), (1, 1, 1, 8, 8), (2, 1, 4, 4)]))
    dtype = draw(st.sampled_from(DTYPES))
    size = int(np.prod(shape))
    values = np.asarray(draw(st.lists(st.floats(-10, 10, allow_nan=False) | st.sampled_from(SPECIAL),
                                      min_size=min(size, 4), max_size=min(size, 4))) or [0.0])
    base = np.resize(values, shape) if size else np.zeros(shape)
    with np.errstate(all="ignore"):
        if dtype is np.object_:
            return base.astype(object)
        if dtype is np.str_:
            return base.astype(str)
        if np.dtype(dtype).kind in "iub":
            return np.nan_to_num(base, nan=0, posinf=0, neginf=0).astype(dtype)
        return base.astype(dtype)


@settings(FUZZ, max_examples=300)
@given(x=arrays(), target=st.sampled_from(["argmax", 0, 9, [1, 2], "cat", -1]), allow=st.booleans())
def api_arrays(explainer, x, target, allow):
    count("api arrays")
    explainer.allow_nonfinite = allow
    try:
        with time_limit(SECONDS_PER_EXAMPLE):
            result = explainer.explain(x, target=target)
    except RulegraphError:
        return
    finally:
        explainer.allow_nonfinite = False
    count("api arrays explained")
    n = 1 if x.ndim == 3 else x.shape[0]
    assert result.map.shape == (n, 1, 8, 8) and n >= 1
    if not allow:
        assert np.isfinite(result.map).all()


def test_fuzz_api_arrays(explainer):
    api_arrays(explainer)
    report("api arrays")
    assert COUNTS.get("api arrays", 0) >= 100


# ---- files through the reader and the CLI ------------------------------------------------------------

def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype.hasobject)
    return buffer.getvalue()


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            archive.writestr(f"{name}.npy", npy_bytes(array))
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_declaring(width: int, height: int, depth: int, colour: int, payload: bytes) -> bytes:
    """A PNG whose header declares any size (a valid CRC), with ``payload`` as its compressed data."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(payload))
            + png_chunk(b"IEND", b""))


def image_bytes(array, fmt="PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = {".npy": npy_bytes(X[:2]), ".npz": npz_bytes(x=X[:2]),
         ".png": image_bytes((X[0, 0] * 255).astype(np.uint8)),
         ".tif": image_bytes(X[0, 0].astype(np.float32), "TIFF")}


@st.composite
def files(draw):
    """(suffix, bytes): random bytes, a valid file mutated (bytes flipped, cut, appended), or a PNG
    declaring a huge or odd size."""
    suffix = draw(st.sampled_from(sorted(SEEDS)))
    how = draw(st.sampled_from(["random", "flip", "cut", "append", "huge png"]))
    seed = SEEDS[suffix]
    if how == "random":
        return suffix, draw(st.binary(max_size=600))
    if how == "huge png":
        side = st.one_of(st.integers(1, 64), st.integers(2**16, 2**31 - 1))
        depth, colour = draw(st.sampled_from([(8, 0), (16, 0), (8, 2), (16, 2), (8, 6), (1, 0), (8, 3)]))
        return ".png", png_declaring(draw(side), draw(side), depth, colour, draw(st.binary(max_size=300)))
    data = bytearray(seed)
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif how == "cut":
        del data[draw(st.integers(0, len(data) - 1)):]
    else:
        data += draw(st.binary(min_size=1, max_size=64))
    return suffix, bytes(data)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@settings(FUZZ, max_examples=400)
@given(file=files())
def files_api(explainer, tmp_path, file):
    count("files via API")
    suffix, data = file
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        with time_limit(SECONDS_PER_EXAMPLE):
            result = explainer.explain(load_input(path, explainer))
        assert result.map.shape[1:] == (1, 8, 8)
        count("files via API explained")
    except RulegraphError:
        pass
    assert path.read_bytes() == data


def test_fuzz_input_files_api(explainer, tmp_path):
    files_api(explainer, tmp_path)
    report("files via API")
    assert COUNTS.get("files via API", 0) >= 100


@settings(FUZZ, max_examples=60)
@given(file=files(), out=st.sampled_from(["r.npy", "r", "h.png", "h", "h.jpeg", "INPUT", "MODEL",
                                         "sub/r.npy"]))
def files_cli(tmp_path_factory, file, out):
    """``rulegraph explain`` in-process on a fuzzed file: exit 0 or 2, the user's files unchanged."""
    count("files via CLI")
    folder = tmp_path_factory.mktemp("cli")
    suffix, data = file
    (folder / f"fuzz{suffix}").write_bytes(data)
    (folder / "model.onnx").write_bytes(CNN.read_bytes())
    paths = {"INPUT": folder / f"fuzz{suffix}", "MODEL": folder / "model.onnx"}
    target = paths.get(out, folder / out)
    flag = "--heatmap" if out.startswith("h") or out == "INPUT" and suffix in (".png", ".tif") else "--out"
    before = digest(folder)
    argv = ["explain", str(folder / "model.onnx"), "--rules", "lrp-epsilon", "--input", str(paths["INPUT"]),
            flag, str(target)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with time_limit(SECONDS_PER_EXAMPLE), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        code = main(argv)
    assert code in (0, 2), stderr.getvalue()
    if code == 0:
        count("files via CLI explained")
    assert "Traceback" not in stderr.getvalue()
    after = digest(folder)
    assert {k: v for k, v in after.items() if k in before} == before
    written = set(after) - set(before)
    assert written == ({target.name} if code == 0 else set())


def test_fuzz_input_files_cli(tmp_path_factory):
    files_cli(tmp_path_factory)
    report("files via CLI")
    assert COUNTS.get("files via CLI", 0) >= 30
