"""PP-OCR's exports, unedited (tests/data/ppocr/, paddle2onnx, opset 11/12): the direction
classifier stores its batch as -1, the recogniser ends in a Softmax over [N·T, C] wrapped in
Flatten ... Reshape by the version converter. Oracles: onnxruntime on the original model (the
arg-max, the log-odds, finite differences) and the columns the rendered characters occupy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from PIL import Image, ImageDraw, ImageFont

from rulegraph import Explainer, Target, TargetError
from rulegraph.cli import main

DATA = Path(__file__).parent / "data" / "ppocr"
CLS = DATA / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
REC = DATA / "ch_PP-OCRv4_rec_infer.onnx"
TEXT, LEFT, WIDTH = "3057", 8, 160


def render(text: str, width: int, rotate: bool = False) -> tuple[np.ndarray, ImageFont.FreeTypeFont]:
    """Black text on white, height 48, normalized (x/255 − 0.5)/0.5, [1, 3, 48, width]."""
    font = ImageFont.load_default(size=36)
    image = Image.new("RGB", (width, 48), "white")
    ImageDraw.Draw(image).text((LEFT, 4), text, fill="black", font=font)
    if rotate:
        image = image.rotate(180)
    x = (np.asarray(image, dtype=np.float32) / 255 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), font


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def cls_explainer():
    return Explainer(CLS, "gradient")


def test_direction_classifier_with_batch_minus_one_explains_its_prediction(cls_explainer):
    """Both directions in one batch: the predicted class per row, and the log-odds of that class
    against the other (the start value of the contrastive target) as onnxruntime gives them."""
    x = np.concatenate([render(TEXT, 192)[0], render(TEXT, 192, rotate=True)[0]])
    probs = run_model(CLS, x).astype(np.float64)
    predicted = probs.argmax(axis=1)
    assert list(predicted) == [0, 1]   # 0°, 180°
    result = cls_explainer.explain(x, target=Target("argmax", versus=1 - predicted))
    np.testing.assert_array_equal(result.target, predicted)
    rows = np.arange(2)
    log_odds = np.log(probs[rows, predicted] / probs[rows, 1 - predicted])
    np.testing.assert_allclose(result.start_value, log_odds, rtol=1e-4)
    # the contrastive seed is the difference of the two one-class seeds (the pass is linear in the seed)
    each = [cls_explainer.explain(x, target=list(c)).saliency["x"] for c in (predicted, 1 - predicted)]
    np.testing.assert_allclose(result.saliency["x"], each[0] - each[1], rtol=1e-4, atol=1e-5)
    assert result.explained.endswith("[N, 2] (class axis 1)")


@pytest.fixture(scope="module")
def rec():
    return Explainer(REC, "gradient-x-input")


def test_recogniser_explains_one_character_at_its_time_step(rec):
    x, font = render(TEXT, WIDTH)
    probs = run_model(REC, x)[0]
    steps = probs.shape[0]
    best = probs.argmax(axis=1)
    hits = [t for t in range(steps) if best[t] != 0]
    assert len(hits) == len(TEXT)   # one non-blank step per character on this image
    assert rec.spec.class_axis == 2 and rec.spec.class_axis_source == "the final Softmax"
    for k, t in enumerate(hits):
        result = rec.explain(x, target=Target(int(best[t]), at=t))
        assert result.where == f"at t={t}" and int(result.target[0]) == best[t]
        profile = np.abs(result.map[0]).sum(axis=(0, 1))
        lo, hi = LEFT + font.getlength(TEXT[:k]), LEFT + font.getlength(TEXT[:k + 1])
        assert lo <= profile.argmax() < hi, (TEXT[k], t, profile.argmax(), (lo, hi))


def test_recogniser_argmax_at_a_step_and_bare_class_refused(rec):
    x, _ = render(TEXT, WIDTH)
    probs = run_model(REC, x)[0]
    result = rec.explain(x, target=Target("argmax", at=7))
    assert int(result.target[0]) == probs[7].argmax()
    with pytest.raises(TargetError, match=r"has position axes \(1\): a class alone is ambiguous"):
        rec.explain(x, target=int(probs[7].argmax()))
    with pytest.raises(TargetError, match=r"target class 6625 is out of range for .* valid classes are 0..6624"):
        rec.explain(x, target=Target(6625, at=7))


def test_recogniser_on_the_cli_and_in_check(tmp_path, capsys):
    x, _ = render(TEXT, WIDTH)
    np.save(tmp_path / "x.npy", x)
    assert main(["explain", str(REC), "--rules", "gradient-x-input", "--input", str(tmp_path / "x.npy"),
                 "--target", "argmax", "--at", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("row 0: class 631 of tensor 'p2o.Add.277' [p2o.DynamicDimension.0, ?, 6625] (class axis 2) "
                          "at t=7: start ")
    assert main(["check", str(REC), "--rules", "lrp-transformer", "--input", str(tmp_path / "x.npy")]) == 0


def test_batch_symbols_are_unified_only_for_the_explained_copy():
    """The model file is not modified; the explainer reads one batch symbol on its inputs."""
    before = CLS.read_bytes()
    explainer = Explainer(CLS, "gradient")
    assert explainer.graph.shapes["x"][0] == "N"
    assert CLS.read_bytes() == before
    assert onnx.load(str(CLS)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
