"""Reading and checking the user's inputs: .npy/.npz/images refused by name when they cannot be read
exactly, image value ranges by mode, input arrays checked against the model (batch, dtype, finite),
baseline names, heatmaps of tabular inputs."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from rulegraph import Explainer
from rulegraph.cli import main
from rulegraph.errors import RulegraphError, RulegraphWarning
from rulegraph.run.inputs import read_image, read_npy, read_npz
from rulegraph.viz import bars_rgb

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"
X = np.load(ROOT / "models" / "digits_sample.npz")["x"]
RNG = np.random.default_rng(7)


def npy_bytes(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npy_header(shape, descr="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in arrays.items():
            payload = data if isinstance(data, bytes) else npy_bytes(data)
            archive.writestr(name if "." in name else f"{name}.npy", payload)
    return buffer.getvalue()


def png_bytes(array, mode=None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def deflate_corrupted(member: bytes) -> bytes:
    """A .npz whose one member's compressed stream is damaged at its start (zlib.error)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", member)
    data = bytearray(buffer.getvalue())
    start = 30 + len("x.npy")  # the local file header, then the compressed data
    data[start:start + 4] = b"\xff\xff\xff\xff"  # block type 3: reserved, "invalid block type"
    return bytes(data)


GOOD_NPY = npy_bytes(X[:2])
GOOD_PNG = png_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)

# file name -> (its bytes, the message): each one is refused by name, never a traceback
BAD_FILES = {
    "object.npy": (npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True), "holds Python objects"),
    "complex.npy": (npy_bytes(X[:1].astype(np.complex64)), "holds complex numbers (complex64)"),
    "strings.npy": (npy_bytes(np.array(["a", "b"])), "holds <U1 values"),
    "truncated.npy": (GOOD_NPY[:-10], "is truncated: its header declares shape (2, 1, 8, 8) of float32"),
    "longer.npy": (GOOD_NPY + b"\0" * 8, "longer than its header says"),
    "random.npy": (bytes(RNG.integers(0, 256, 300, dtype=np.uint8)), "is not a readable .npy array"),
    "empty.npy": (b"", "is not a readable .npy array"),
    # a NUL where the header dict opens: numpy's fallback header parser raises tokenize.TokenError
    "nul-header.npy": (GOOD_NPY[:10] + b"\0" + GOOD_NPY[11:], "is not a readable .npy array"),
    "huge-header.npy": (npy_header((99999999999, 1, 8, 8)) + b"\0" * 256,
                        ("is truncated: its header declares shape (99999999999, 1, 8, 8) of float32 "
                         "(25599999999744 bytes) but it holds 256")),
    "nan.npy": (npy_bytes(np.where(X[:1] > 0.5, np.nan, X[:1])),
                "NaN or infinite values (the first at index"),
    "object.npz": (npz_bytes(x=npy_bytes(np.array([None], dtype=object), allow_pickle=True)),
                   "array 'x' holds Python objects"),
    "truncated.npz": (npz_bytes(x=X[:1])[:-40], "is not a readable .npz archive"),
    "short-member.npz": (npz_bytes(x=npy_bytes(X[:1])[:-4]), "array 'x' is truncated"),
    "corrupt-deflate.npz": (deflate_corrupted(npy_bytes(X[:2])),
                            ("array 'x' is not a readable .npy array "
                             "(Error -3 while decompressing data: invalid block type)")),
    "random.npz": (bytes(RNG.integers(0, 256, 300, dtype=np.uint8)), "is not a readable .npz archive"),
    "not-npy-member.npz": (npz_bytes(**{"x.txt": b"hello"}), "is not a .npy array"),
    "inf.npz": (npz_bytes(x=np.full((1, 1, 8, 8), np.inf, np.float32)), "array 'x' holds 64 NaN or infinite"),
    "corrupt.png": (GOOD_PNG[:20] + bytes(RNG.integers(0, 256, 60, dtype=np.uint8)) + GOOD_PNG[80:],
                    "is not a readable image"),
    "truncated.png": (GOOD_PNG[: len(GOOD_PNG) // 2], "is not a readable image"),
    "random.png": (bytes(RNG.integers(0, 256, 300, dtype=np.uint8)), "is not a readable image"),
    "text.jpg": (b"not an image at all", "is not a readable image"),
    "x.csv": (b"1,2,3", "unknown input format '.csv'"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_input_files_exit_2_by_name(name, tmp_path, capsys):
    data, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    assert main(["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err
    assert path.read_bytes() == data


def test_nonfinite_inputs_are_explained_when_allowed(tmp_path, capsys):
    path = tmp_path / "nan.npy"
    path.write_bytes(BAD_FILES["nan.npy"][0])
    assert main(["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(path), "--allow-nonfinite",
                 "--target", "3"]) == 0
    assert "conservation delta" in capsys.readouterr().out


@pytest.mark.parametrize("pixels,declared", [(65, 64), (129, 64)], ids=["over-the-limit", "twice-the-limit"])
def test_decompression_bombs_are_refused(tmp_path, monkeypatch, capsys, pixels, declared):
    """Pillow's MAX_IMAGE_PIXELS holds: its warning (over) and its error (over twice) both refuse."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(np.zeros((1, pixels), np.uint8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", declared)
    with pytest.raises(RulegraphError, match=r"bomb.png: .*exceeds limit.*raise PIL.Image.MAX_IMAGE_PIXELS"):
        read_image(path, [1, 1, 8, 8])
    assert main(["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(path)]) == 2


def _save(path: Path, array, mode=None) -> Path:
    Image.fromarray(array, mode).save(path)
    return path


U16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 7)
U8 = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
F32 = np.linspace(-2.5, 7.25, 64, dtype=np.float32).reshape(8, 8)
RGBA = np.dstack([U8, 255 - U8, U8 // 2, np.full((8, 8), 9, np.uint8)])
PALETTE = Image.fromarray(U8).convert("P")

# name -> (write the file, channels, the expected [C, H, W] in closed form)
IMAGES = {
    "16-bit png": (lambda p: _save(p / "a.png", U16), 1, U16[None] / 65535.0),
    "16-bit png as rgb": (lambda p: _save(p / "a.png", U16), 3, np.repeat(U16[None], 3, 0) / 65535.0),
    "32-bit int tiff": (lambda p: _save(p / "a.tif", U16.astype(np.int32)), 1, U16[None] / 65535.0),
    "8-bit grey": (lambda p: _save(p / "a.png", U8), 1, U8[None] / 255.0),
    "palette": (lambda p: PALETTE.save(p / "a.png") or p / "a.png", 1,
                np.asarray(PALETTE.convert("L"))[None] / 255.0),
    "rgba drops alpha": (lambda p: _save(p / "a.png", RGBA), 3, RGBA[..., :3].transpose(2, 0, 1) / 255.0),
    "grey+alpha": (lambda p: _save(p / "a.png", np.dstack([U8, U8 // 3]), "LA"), 1, U8[None] / 255.0),
    "float tiff as stored": (lambda p: _save(p / "a.tif", F32), 1, F32[None].astype(np.float64)),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_image_value_range_by_mode(name, tmp_path):
    write, channels, expected = IMAGES[name]
    path = write(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = read_image(path, [1, channels, 8, 8], scale=2.0)
    assert got.dtype == np.float32 and got.shape == (1, channels, 8, 8)
    np.testing.assert_allclose(got[0], 2.0 * expected, rtol=1e-6, atol=1e-7)
    float_warning = [w for w in caught if issubclass(w.category, RulegraphWarning)]
    assert len(float_warning) == (1 if "float" in name else 0)


def test_16_bit_values_beyond_the_range_are_refused(tmp_path):
    path = _save(tmp_path / "a.tif", (U16.astype(np.int32) + 70000))
    with pytest.raises(RulegraphError, match="outside the 16-bit range"):
        read_image(path, [1, 1, 8, 8])


def test_npy_and_npz_readers_return_the_arrays(tmp_path):
    (tmp_path / "a.npy").write_bytes(GOOD_NPY)
    (tmp_path / "a.npz").write_bytes(npz_bytes(x=X[:2], y=np.arange(3)))
    np.testing.assert_array_equal(read_npy(tmp_path / "a.npy"), X[:2])
    arrays = read_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(arrays["x"], X[:2])
    np.testing.assert_array_equal(arrays["y"], np.arange(3))


def test_an_npz_of_a_newer_zip_format_is_a_clear_error(tmp_path):
    """A central directory that needs zip version 6.4 (found by tests/test_fuzz_inputs.py): Python's
    zipfile raises NotImplementedError, which is a clear error here, not a traceback."""
    data = bytearray(npz_bytes(x=X[:2]))
    central = data.rindex(b"PK\x01\x02")
    data[central + 6] = 64   # version needed to extract
    (tmp_path / "a.npz").write_bytes(bytes(data))
    with pytest.raises(RulegraphError, match="is not a readable .npz archive"):
        read_npz(tmp_path / "a.npz")


# ---- arrays given to the API ---------------------------------------------------------------------

def two_inputs():
    """y = (a + b) W: two float inputs with a batch axis."""
    w = RNG.normal(size=(4, 3)).astype(np.float32)
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
                                            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


A = RNG.normal(size=(3, 4)).astype(np.float32)
BAD_ARRAYS = {
    "different batch sizes": ({"a": A, "b": A[:2]}, "different batch sizes ('a': 3, 'b': 2)"),
    "empty batch": ({"a": A[:0], "b": A[:0]}, "empty batch: input 'a' has 0 rows (shape [0, 4])"),
    "complex": ({"a": A.astype(np.complex64), "b": A},
                "input 'a' (float32 in the model) was given complex64"),
    "object": ({"a": A.astype(object), "b": A}, "was given object values"),
    "bool": ({"a": A > 0, "b": A}, "was given bool values"),
    "strings": ({"a": A.astype(str), "b": A}, "was given <U"),
    "inexact integers": ({"a": np.full((3, 4), 2**24 + 1, np.int64), "b": A},
                         "are not all exactly representable as float32"),
    "nan": ({"a": np.where(A > 0, np.nan, A), "b": A}, "input 'a' (float32 in the model) holds"),
    "beyond float32": ({"a": A.astype(np.float64) * 1e300, "b": A}, "values beyond the float32 range"),
}


@pytest.mark.parametrize("name", list(BAD_ARRAYS))
def test_bad_arrays_are_refused_by_name(name):
    feeds, message = BAD_ARRAYS[name]
    with pytest.raises(RulegraphError, match=None) as info:
        Explainer(two_inputs(), "gradient").explain(feeds, target=0)
    assert message in str(info.value)


def test_integer_arrays_for_float_inputs_are_converted_exactly():
    ints = RNG.integers(-1000, 1000, size=(3, 4))
    explainer = Explainer(two_inputs(), "gradient")
    got = explainer.explain({"a": ints, "b": ints.astype(np.int16)}, target=1)
    want = explainer.explain({"a": ints.astype(np.float32), "b": ints.astype(np.float32)}, target=1)
    np.testing.assert_array_equal(got.attribution["a"], want.attribution["a"])


def test_floats_for_token_ids_are_refused():
    from test_interfaces import two_inputs_two_outputs

    model, _ = two_inputs_two_outputs()
    with pytest.raises(RulegraphError, match=r"input 'ids' \(int64 in the model\) was given float64 values; "
                                             r"it takes integers"):
        Explainer(model, "gradient", output="y1").explain({"a": A[:2], "ids": np.ones((2, 2))})


def test_nonfinite_inputs_when_allowed():
    explainer = Explainer(two_inputs(), "gradient")
    explainer.allow_nonfinite = True
    a = A.copy()
    a[0, 0] = np.nan
    result = explainer.explain({"a": a, "b": A}, target=0)
    assert np.isnan(result.start_value[0]) and np.isfinite(result.start_value[1:]).all()


def test_baseline_naming_an_unknown_input():
    explainer = Explainer(two_inputs(), "deeplift-rescale")
    with pytest.raises(RulegraphError, match=r"the baseline names \['c'\], which the model does not have; "
                                             r"its inputs are \['a', 'b'\]"):
        explainer.explain({"a": A, "b": A}, target=0, baseline={"a": 0.0, "c": 1.0})


# ---- heatmaps of tabular inputs ---------------------------------------------------------------------

W_TAB = np.array([[1.0, -2.0], [0.5, 0.0], [-1.5, 1.0], [2.0, 2.0], [0.0, -1.0]], np.float32)


def tabular():
    """y = x W for x [N, 5]: a tabular model."""
    w = W_TAB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "tab",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def bar_heights(rgb: np.ndarray) -> np.ndarray:
    """Signed bar height per column: coloured pixels above the middle count up, below count down."""
    coloured = (rgb != 255).any(axis=-1)
    half = rgb.shape[0] // 2
    return coloured[:half].sum(axis=0) - coloured[half:].sum(axis=0)


@pytest.mark.parametrize("values", [[1.0, -0.5, 0.0, 0.25, -1.0], [3.0], [-2.0, -2.0], [0.0, 0.0]])
def test_bars_have_heights_proportional_to_the_values(values):
    v = np.array(values)
    scale = np.abs(v).max() or 1.0
    np.testing.assert_array_equal(bar_heights(bars_rgb(v)), np.round(v / scale * 32).astype(int))


def test_heatmap_of_a_tabular_input_is_a_bar_image(tmp_path, capsys):
    model = tmp_path / "tab.onnx"
    onnx.save(tabular(), str(model))
    x = np.array([[1.0, 2.0, -1.0, 0.5, 3.0]], np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["explain", str(model), "--rules", "gradient-x-input", "--input", str(tmp_path / "x.npy"),
                 "--target", "0", "--heatmap", str(tmp_path / "h.png")]) == 0
    assert Image.open(tmp_path / "h.png").format == "PNG"
    from rulegraph import Explainer
    from rulegraph.viz import render

    expected = x[0] * W_TAB[:, 0]  # gradient x input of class 0
    fig = render(Explainer(str(model), "gradient-x-input").explain(x, target=0), mode="heatmap")
    np.testing.assert_allclose([bar.get_height() for bar in fig.axes[0].patches], expected, rtol=1e-6)


@pytest.mark.parametrize("data,message", [
    (npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True), "holds Python objects"),
    (npy_bytes(A.astype(np.complex64)), "holds complex numbers"),
    (npy_bytes(A)[:-3], "is truncated"),
    (npy_bytes(np.full(4, np.nan, np.float32)), "holds 4 NaN or infinite values"),
    (None, "no such file"),
])
def test_baseline_files_are_read_safely(tmp_path, data, message):
    path = tmp_path / "base.npy"
    if data is not None:
        path.write_bytes(data)
    explainer = Explainer(two_inputs(), "deeplift-rescale")
    with pytest.raises(RulegraphError) as info:
        explainer.explain({"a": A, "b": A}, target=0, baseline=f"file:{path}")
    assert message in str(info.value) and str(path) in str(info.value)
