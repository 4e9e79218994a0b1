"""Preprocessing described once (run/preprocess.py): each step against a numpy replica (Pillow's
bilinear resize in its own fixed-point arithmetic, the crop box, scaling, mean/std, BGR, NHWC), the
presets against hand-computed pixels, SqueezeNet's documented input, the metadata round trip, the
preset file beside a model, and the errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from PIL import Image

from rulegraph import Explainer, Preprocess, preprocess
from rulegraph.cli import main
from rulegraph.errors import RulegraphError, RulegraphWarning
from rulegraph.run import preprocess as pre
from rulegraph.run.inputs import load_input

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"
SHARED = ROOT.parent / "shared" / "models"
RNG = np.random.default_rng(11)
PIXELS = RNG.integers(0, 256, size=(37, 50, 3), dtype=np.uint8)  # H 37, W 50
IMAGE = Image.fromarray(PIXELS, "RGB")

# --- a numpy replica of Pillow's 8-bit bilinear resize (Resample.c: triangle filter widened by the
# scale when shrinking, coefficients in 22-bit fixed point, horizontal pass then vertical, each rounded)
PRECISION_BITS = 22


def _coefficients(in_size: int, out_size: int) -> list[tuple[int, np.ndarray]]:
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    rows = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        t = (np.arange(xmin, xmax) - center + 0.5) / filterscale
        w = np.where(np.abs(t) < 1, 1 - np.abs(t), 0.0)
        w = w / w.sum()
        fixed = np.where(w >= 0, np.floor(w * (1 << PRECISION_BITS) + 0.5),
                         np.ceil(w * (1 << PRECISION_BITS) - 0.5)).astype(np.int64)
        rows.append((xmin, fixed))
    return rows


def _pass(array: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One Pillow pass along ``axis`` (uint8 in, uint8 out)."""
    moved = np.moveaxis(array.astype(np.int64), axis, 0)
    out = np.empty((out_size,) + moved.shape[1:], dtype=np.int64)
    for i, (start, k) in enumerate(_coefficients(moved.shape[0], out_size)):
        acc = (1 << (PRECISION_BITS - 1)) + np.tensordot(k, moved[start:start + len(k)], axes=(0, 0))
        out[i] = np.clip(acc >> PRECISION_BITS, 0, 255)
    return np.moveaxis(out, 0, axis).astype(np.uint8)


def pillow_bilinear(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] uint8 resized to height x width as Pillow's BILINEAR does."""
    out = pixels if pixels.shape[1] == width else _pass(pixels, width, 1)
    return out if out.shape[0] == height else _pass(out, height, 0)


def nchw(hwc: np.ndarray) -> np.ndarray:
    return hwc.transpose(2, 0, 1)[None]


# name, description, channels, model H×W, replica of the result from PIXELS (float64)
STEPS = [
    ("resize shorter side 20 (shrink: 37x50 -> 20x27)", Preprocess(resize=20), 3, None,
     lambda p: nchw(pillow_bilinear(p, 20, 27) / 255)),
    ("resize to H,W 60x45 (grow one side, shrink the other)", Preprocess(resize=(60, 45)), 3, None,
     lambda p: nchw(pillow_bilinear(p, 60, 45) / 255)),
    ("no resize or crop: the model's fixed 16x16", Preprocess(), 3, (16, 16),
     lambda p: nchw(pillow_bilinear(p, 16, 16) / 255)),
    ("centre crop 11x20: top round(26/2)=13, left round(30/2)=15", Preprocess(crop=(11, 20)), 3, None,
     lambda p: nchw(p[13:24, 15:35] / 255)),
    ("centre crop 12x21: top round(12.5)=12, left round(14.5)=14 (half to even)",
     Preprocess(crop=(12, 21)), 3, None, lambda p: nchw(p[12:24, 14:35] / 255)),
    ("resize 20 then crop 16x16: left round(11/2)=6 (half to even), top 2",
     Preprocess(resize=20, crop=(16, 16)), 3, None,
     lambda p: nchw(pillow_bilinear(p, 20, 27)[2:18, 6:22] / 255)),
    ("scale 255: the pixels as stored", Preprocess(crop=(37, 50), scale=255.0), 3, None,
     lambda p: nchw(p.astype(np.float64))),
    ("mean and std per channel in the scaled range", Preprocess(crop=(37, 50), scale=255.0, mean=(10, 20, 30),
                                                               std=(2.0, 4.0, 8.0)), 3, None,
     lambda p: nchw((p - np.array([10, 20, 30])) / np.array([2.0, 4.0, 8.0]))),
    ("one mean and std for every channel", Preprocess(crop=(37, 50), mean=(0.5,), std=(0.25,)), 3, None,
     lambda p: nchw((p / 255 - 0.5) / 0.25)),
    ("BGR: the channels reversed before the mean", Preprocess(crop=(37, 50), scale=255.0, order="BGR",
                                                             mean=(1.0, 2.0, 3.0)), 3, None,
     lambda p: nchw(p[..., ::-1] - np.array([1.0, 2.0, 3.0]))),
    ("NHWC layout", Preprocess(crop=(37, 50), layout="NHWC"), 3, None, lambda p: (p / 255)[None]),
    ("grey (one channel): ITU-R 601 luma as Pillow's convert('L')", Preprocess(crop=(37, 50)), 1, None,
     lambda p: nchw(((p.astype(np.int64) @ np.array([19595, 38470, 7471]) + 0x8000) >> 16)[..., None] / 255)),
]


@pytest.mark.parametrize("name,spec,channels,model_hw,replica", STEPS, ids=[s[0] for s in STEPS])
def test_each_step_matches_its_numpy_replica(name, spec, channels, model_hw, replica):
    got = preprocess(IMAGE, spec, channels, model_hw)
    want = replica(PIXELS)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def two_colour_image(width: int, height: int) -> Image.Image:
    """Left half RGB (200, 100, 50), right half (10, 240, 128)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (200, 100, 50)
    pixels[:, width // 2:] = (10, 240, 128)
    return Image.fromarray(pixels, "RGB")


# preset, pixel (row, col) in the 224x224 result, expected [c0, c1, c2] computed by hand
PRESET_PIXELS = [
    # imagenet: (v/255 - mean) / std in RGB order
    ("imagenet", (5, 5), [(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224,
                          (50 / 255 - 0.406) / 0.225]),
    ("imagenet", (200, 220), [(10 / 255 - 0.485) / 0.229, (240 / 255 - 0.456) / 0.224,
                              (128 / 255 - 0.406) / 0.225]),
    # imagenet-caffe: BGR 0..255 minus (103.939, 116.779, 123.68): B 50 - 103.939 = -53.939, ...
    ("imagenet-caffe", (5, 5), [-53.939, -16.779, 76.32]),
    ("imagenet-caffe", (200, 220), [24.061, 123.221, -113.68]),
]


@pytest.mark.parametrize("name,pixel,expected", PRESET_PIXELS)
def test_presets_at_hand_computed_pixels(name, pixel, expected):
    # 400x300 -> shorter side 256: 341x256; centre crop 224: left 58; the halves stay uniform far from
    # the boundary at column 170 (- 58 = 112 in the crop)
    x = preprocess(two_colour_image(400, 300), name)
    assert x.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(x[0, :, pixel[0], pixel[1]], expected, rtol=1e-6, atol=1e-5)


def test_preset_descriptions():
    assert pre.PRESETS["imagenet"] == Preprocess(resize=256, crop=(224, 224), scale=1.0, order="RGB",
                                                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                                 layout="NCHW")
    assert pre.PRESETS["imagenet-caffe"] == Preprocess(resize=256, crop=(224, 224), scale=255.0, order="BGR",
                                                       mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0))


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/models/ is not beside this checkout")


def squeezenet_documented_input() -> np.ndarray:
    """The models README: BGR 0..255 minus (104, 117, 123), [1, 3, 224, 224]."""
    rgb = np.asarray(Image.open(SHARED / "kitten_224.png").convert("RGB"), dtype=np.float32)
    bgr = rgb[:, :, ::-1] - np.array([104, 117, 123], np.float32)
    return np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])


@needs_shared
def test_squeezenet_flags_give_its_documented_input_and_see_a_cat(capsys):
    model = SHARED / "squeezenet1.1_fp32.onnx"
    explainer = Explainer(model, "lrp-epsilon")
    flags = Preprocess(scale=255.0, order="BGR", mean=(104.0, 117.0, 123.0))
    x = load_input(SHARED / "kitten_224.png", explainer, preprocess=flags)
    np.testing.assert_allclose(x, squeezenet_documented_input(), atol=1e-4)
    probabilities = onnxruntime.InferenceSession(str(model)).run(None, {"data_0": x})[0].reshape(-1)
    assert int(np.argmax(probabilities)) in (281, 282, 285)
    assert main(["explain", str(model), "--rules", "lrp-epsilon", "--input", str(SHARED / "cat.jpg"),
                 "--preprocess", "imagenet-caffe", "--mean", "104,117,123"]) == 0
    line = capsys.readouterr().out
    assert any(f"class {c} of" in line for c in (281, 282, 285)), line


@needs_shared
def test_explainer_preprocess_is_what_load_input_uses():
    explainer = Explainer(SHARED / "squeezenet1.1_fp32.onnx", "lrp-epsilon", preprocess="imagenet-caffe")
    got = load_input(SHARED / "cat.jpg", explainer)
    np.testing.assert_array_equal(got, preprocess(SHARED / "cat.jpg", pre.PRESETS["imagenet-caffe"]))


SPECS = [Preprocess(scale=255.0, mean=(33.0,), std=(64.0,)),
         Preprocess(resize=(8, 8), order="BGR", mean=(0.5,), labels="labels.txt")]


@pytest.mark.parametrize("spec", SPECS)
def test_metadata_round_trip(tmp_path, spec):
    path = Explainer(CNN, "lrp-epsilon", preprocess=spec).save(tmp_path / "explainer.onnx")
    assert pre.from_metadata(path) == spec
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props[pre.METADATA_KEY]) == spec.to_dict()
    onnxruntime.InferenceSession(str(path))  # still a model any runtime loads


def test_no_metadata_without_preprocess(tmp_path, capsys):
    path = Explainer(CNN, "lrp-epsilon").save(tmp_path / "explainer.onnx")
    assert pre.from_metadata(path) is None
    assert main(["show", str(path)]) == 0
    assert "no preprocessing recorded" in capsys.readouterr().out


def test_cli_compile_saves_the_file_beside_the_model_and_show_reads_it(tmp_path, capsys):
    model = tmp_path / "digits.onnx"
    shutil.copy(CNN, model)
    (tmp_path / "digits.preprocess.json").write_text('{"scale": 16, "mean": 8, "labels": "names.txt"}')
    assert main(["compile", str(model), "--rules", "lrp-epsilon", "-o", str(tmp_path / "e.onnx"),
                 "--std", "4"]) == 0
    want = Preprocess(scale=16.0, mean=(8,), std=(4.0,), labels=str(tmp_path / "names.txt"))
    assert pre.from_metadata(tmp_path / "e.onnx") == want
    assert main(["show", str(tmp_path / "e.onnx")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == want.to_dict()


def test_cli_explain_image_through_the_flags(tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.fromarray(RNG.integers(0, 256, size=(12, 10), dtype=np.uint8), "L").save(image)
    out = tmp_path / "a.npy"
    assert main(["explain", str(CNN), "--rules", "gradient", "--input", str(image), "--resize", "8",
                 "--crop", "8", "--scale", "16", "--mean", "8", "--out", str(out)]) == 0
    spec = Preprocess(resize=8, crop=(8, 8), scale=16.0, mean=(8.0,))
    x = preprocess(image, spec, channels=1)
    # the replica: shorter side 10 -> 8 (12 -> int(8 * 12 / 10) = 9 rows), crop rows round(0.5) = 0
    grey = np.asarray(Image.open(image), dtype=np.uint8)[..., None]
    np.testing.assert_allclose(x, nchw(pillow_bilinear(grey, 9, 8)[0:8] / 255 * 16 - 8), atol=1e-5)
    np.testing.assert_allclose(np.load(out), Explainer(CNN, "gradient").explain(x).map, rtol=1e-5, atol=1e-6)


def test_array_files_are_taken_as_already_preprocessed(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((1, 1, 8, 8), np.float32))
    with pytest.warns(RulegraphWarning, match="already preprocessed"):
        x = load_input(path, Explainer(CNN, "lrp-epsilon"), preprocess=Preprocess(mean=(0.5,)))
    np.testing.assert_array_equal(x, np.zeros((1, 1, 8, 8)))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.json"
    path.write_text(text)
    return path


# what goes wrong, the call, a regular expression the message must match
ERRORS = [
    ("unknown preset", lambda t: pre.resolve("imagenet-cafe"),
     r"unknown preprocessing preset 'imagenet-cafe' \(did you mean 'imagenet-caffe'\?\); the presets are "
     r"imagenet, imagenet-caffe"),
    ("unknown preset inside a file", lambda t: pre.read_file(write(t, '{"preset": "vgg"}')),
     r"p\.json: unknown preprocessing preset 'vgg'.*imagenet, imagenet-caffe"),
    ("malformed JSON at line 3",
     lambda t: pre.read_file(write(t, '{\n  "resize": 256,\n  "crop": [224 224]\n}')),
     r"p\.json:3:\d+: not valid JSON"),
    ("a key that does not exist", lambda t: pre.read_file(write(t, '{"means": [1, 2, 3]}')),
     r"p\.json: unknown key\(s\) \['means'\] \(did you mean 'mean'\?\)"),
    ("a value of the wrong kind", lambda t: pre.read_file(write(t, '{"layout": "CHW", "std": [1, 0, 1]}')),
     r"p\.json: preprocessing: std is \(1, 0, 1\); expected a list of non-zero.*layout is 'CHW'; "
     r"expected one of NCHW, NHWC"),
    ("mean of 3 for a 1-channel model", lambda t: Explainer(CNN, "lrp-epsilon", preprocess="imagenet"),
     r"preprocess for input 'input': mean has 3 values but the model takes 1 channel\(s\) "
     r"\(shape \['N', 1, 8, 8\], NCHW\)"),
    ("std of 2 at load_input", lambda t: load_input(ROOT / "models" / "digit_3.png",
                                                    Explainer(CNN, "lrp-epsilon"),
                                                    preprocess=Preprocess(std=(1.0, 2.0))),
     r"digit_3\.png for input 'input': std has 2 values but the model takes 1 channel"),
    ("mean of 3 for a grey read", lambda t: preprocess(IMAGE, "imagenet", channels=1),
     r"the image: mean has 3 values for 1 channel\(s\); give 1 values or one"),
    ("crop larger than the resized image", lambda t: preprocess(IMAGE, Preprocess(resize=20, crop=(24, 24))),
     r"the crop 24x24 is larger than the resized image 20x27; crop at most 20x27, or resize to at least "
     r"24x24"),
    ("final size not the model's",
     lambda t: Explainer(CNN, "lrp-epsilon", preprocess=Preprocess(crop=(7, 7))),
     r"the preprocessing gives 7x7 images but the model takes 8x8.*--crop 8,8"),
    ("NHWC read of an NCHW model",
     lambda t: Explainer(CNN, "lrp-epsilon", preprocess=Preprocess(layout="NHWC")),
     r"read as NHWC has 8 channels"),
    ("a missing .json file", lambda t: pre.resolve(str(t / "none.json")), r"none\.json: no such file"),
]


@pytest.mark.parametrize("name,call,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_the_place(tmp_path, name, call, message):
    with pytest.raises(RulegraphError, match=message):
        call(tmp_path)


def test_cli_unknown_preset_is_a_bad_input(capsys):
    assert main(["check", str(CNN), "--rules", "lrp-epsilon", "--input", str(ROOT / "models" / "digit_3.png"),
                 "--preprocess", "cifar"]) == 2
    assert "the presets are imagenet, imagenet-caffe" in capsys.readouterr().err


def doc_table(name: str) -> list[list[str]]:
    """The rows of the docs/explainer.md table marked ``<!-- name -->``, cells stripped of backticks."""
    text = (ROOT / "docs" / "explainer.md").read_text(encoding="utf-8")
    block = text.split(f"<!-- {name} -->")[1].split(f"<!-- /{name} -->")[0]
    return [[cell.strip().strip("`") for cell in line.strip("|").split("|")]
            for line in block.strip().splitlines()[2:]]


def test_docs_field_table_lists_every_field():
    fields = [f.name for f in dataclasses.fields(Preprocess)]
    assert [row[0] for row in doc_table("preprocess-table")] == fields


def test_docs_preset_table_is_the_presets():
    def cells(spec: Preprocess) -> list[str]:
        numbers = [", ".join(f"{v:g}" for v in values) for values in (spec.mean, spec.std)]
        return [str(spec.resize), f"{spec.crop[0]}x{spec.crop[1]}", spec.order, f"{spec.scale:g}", *numbers,
                spec.layout]

    assert {row[0]: row[1:] for row in doc_table("preset-table")} == {
        name: cells(spec) for name, spec in pre.PRESETS.items()}


# flags, what the command's arguments hold afterwards (labels, bgr for the pictures), the description
CLI_ROWS = [
    (["--preprocess", "imagenet-caffe"], {"bgr": True, "labels": None}, pre.PRESETS["imagenet-caffe"]),
    (["--preprocess", "imagenet", "--crop", "200,180", "--bgr"], {"bgr": True, "labels": None},
     pre.PRESETS["imagenet"].replace(crop=(200, 180), order="BGR")),
    (["--resize", "8,8", "--nhwc", "--std", "2,3"], {"bgr": False, "labels": None},
     Preprocess(resize=(8, 8), layout="NHWC", std=(2.0, 3.0))),
    ([], {"bgr": False, "labels": None}, None),
]


@pytest.mark.parametrize("flags,after,spec", CLI_ROWS)
def test_cli_flags_build_the_description(flags, after, spec):
    from rulegraph.cli import build_parser, preprocess_of

    args = build_parser().parse_args(["explain", str(CNN), "--rules", "lrp-epsilon", "--input", "x.png",
                                      *flags])
    assert preprocess_of(args) == spec
    assert {k: getattr(args, k) for k in after} == after


def test_cli_labels_come_from_the_preset_file(tmp_path):
    from rulegraph.cli import build_parser, preprocess_of

    model = tmp_path / "m.onnx"
    shutil.copy(CNN, model)
    (tmp_path / "m.preprocess.json").write_text('{"preset": "imagenet-caffe", "labels": "names.txt"}')
    args = build_parser().parse_args(["compare", str(model), "--rules", "gradient", "--input", "x.png",
                                      "-o", "g.png"])
    assert preprocess_of(args) == pre.PRESETS["imagenet-caffe"].replace(labels=str(tmp_path / "names.txt"))
    assert (args.labels, args.bgr) == (str(tmp_path / "names.txt"), True)
