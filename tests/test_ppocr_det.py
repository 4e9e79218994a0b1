"""The PP-OCRv4 text detector (tests/data/ppocr/ch_PP-OCRv4_det_infer.onnx): a DB head that upsamples
with ``Resize`` (nearest, asymmetric, floor; ×2, ×4, ×8) and ``ConvTranspose`` (k2 s2), input
``[N, 3, H, W]`` with H, W multiples of 32, output the probability map ``[N, 1, H, W]`` after a Sigmoid.

The oracle: the model converted to float64 (its Resize scales stay float32, as the op requires) and
to opset 17 (the reference evaluator's BatchNormalization before opset 14 computes batch statistics
when the node has a ``momentum``: 3 % off at the first BN here) on the ONNX reference evaluator, central differences ``(f(x + h e_i) − f(x − h e_i)) / 2h`` of one pixel
of the Sigmoid's input, against the gradient the explainer computes on onnxruntime (float32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from rulegraph import Explainer

pytest.importorskip("onnxruntime")

DET = Path(__file__).resolve().parent / "data" / "ppocr" / "ch_PP-OCRv4_det_infer.onnx"
PIXEL = (17, 9)


def _logit(model: onnx.ModelProto) -> str:
    return next(n.input[0] for n in model.graph.node if n.op_type == "Sigmoid")


def float64_model() -> onnx.ModelProto:
    """The detector in float64, its pre-Sigmoid map as the first output; Resize's roi and scales
    (float32 by the op's definition) kept."""
    model = onnx.load(DET)
    keep = {i for n in model.graph.node if n.op_type == "Resize" for i in n.input[1:]}
    for node in model.graph.node:
        tensor = node.attribute[0].t if node.op_type == "Constant" else None
        if tensor is not None and tensor.data_type == TensorProto.FLOAT and node.output[0] not in keep:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del model.graph.value_info[:]
    model.graph.output.insert(0, onnx.helper.make_tensor_value_info(_logit(model), TensorProto.DOUBLE, None))
    return onnx.version_converter.convert_version(model, 17)


@pytest.fixture(scope="module")
def detector():
    return onnx.load(DET)


def test_gradient_of_one_logit_matches_float64_central_differences(detector):
    logit = _logit(detector)
    rng = np.random.default_rng(32)
    x = rng.random((1, 3, 32, 32)).astype(np.float32)
    seed = np.zeros((1, 1, 32, 32), np.float32)
    seed[(0, 0) + PIXEL] = 1.0
    result = Explainer(detector, "gradient", start=logit).explain(x, target=seed)
    grad = next(iter(result.saliency.values())).astype(np.float64).ravel()
    reference = ReferenceEvaluator(float64_model())
    name = detector.graph.input[0].name

    def f(z: np.ndarray) -> float:
        return float(reference.run([logit], {name: z})[0][(0, 0) + PIXEL])

    x64 = x.astype(np.float64)
    assert f(x64) == pytest.approx(float(result.start[(0, 0) + PIXEL]), rel=1e-5)
    # the largest entries, and a few drawn at random
    chosen = list(np.argsort(-np.abs(grad))[:4]) + list(rng.choice(grad.size, 4, replace=False))
    h = 1e-5
    for i in chosen:
        step = np.zeros(grad.size)
        step[i] = h
        step = step.reshape(x.shape)
        fd = (f(x64 + step) - f(x64 - step)) / (2 * h)
        assert abs(grad[i] - fd) <= 2e-5 * np.abs(grad).max(), f"element {i}: gradient {grad[i]}, FD {fd}"


def test_lrp0_conserves_through_resize_and_conv_transpose(detector):
    """lrp-0 (normalized, ε = 0, biases blamed) on every linear op, the Resize and ConvTranspose nodes
    (every path to the map passes them) included: Σ attribution + Σ bias shares equals the explained
    logit (batch of 2, 32×64)."""
    rng = np.random.default_rng(64)
    x = rng.random((2, 3, 32, 64)).astype(np.float32)
    seed = np.zeros((2, 1, 32, 64), np.float32)
    seed[0, 0, 30, 40] = seed[1, 0, 5, 60] = 1.0
    result = Explainer(detector, "lrp-0", start=_logit(detector)).explain(x, target=seed)
    assert np.all(np.abs(result.start_value) > 1.0)
    np.testing.assert_allclose(result.delta, 0.0, atol=1e-4 * np.abs(result.start_value).max())


# --------------------------------------------------------------------------------------------------
# a region of the probability map, explained: two words, each region's relevance on its own word

WORDS_H, WORDS_W = 96, 320
#: (region of the map over one word, which half of the image holds that word)
WORD_REGIONS = {"left word": ((slice(40, 64), slice(24, 104)), 0),
                "right word": ((slice(40, 64), slice(206, 288)), 1)}


def two_words() -> np.ndarray:
    """"1234" on the left and "5678" on the right, black on white, normalized as PP-OCR's detector
    expects ((x/255 − mean) / std, ImageNet mean and std), [1, 3, 96, 320]. The detector's map is
    above 0.3 over columns 28–99 and 210–283, rows 43–59."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WORDS_W, WORDS_H), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=40)
    draw.text((16, 24), "1234", fill="black", font=font)
    draw.text((200, 24), "5678", fill="black", font=font)
    x = np.asarray(image, dtype=np.float32) / 255
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


@pytest.mark.parametrize("rules, share, tolerance", [("lrp-epsilon", 0.9, 1e-3), ("deeplift-rescale", 0.8, 1e-5)])
@pytest.mark.parametrize("word", list(WORD_REGIONS))
def test_a_region_of_the_map_is_explained_by_its_own_word(detector, rules, share, tolerance, word):
    """The pre-Sigmoid map summed over a region around one word (``Target(0, region=...)``): the
    map conserves (Σ attribution + Σ bias shares = the region's summed logits), and at least
    ``share`` of Σ|attribution| lies in the half of the image that holds that word. Measured:
    lrp-epsilon 0.961 / 0.927, deeplift-rescale 0.854 / 0.839."""
    from rulegraph import Target

    region, half = WORD_REGIONS[word]
    result = Explainer(detector, rules, start=_logit(detector)).explain(two_words(), target=Target(0, region=region))
    assert result.where == f"over region [{region[0].start}:{region[0].stop}, {region[1].start}:{region[1].stop}]"
    assert abs(result.relative_delta[0]) < tolerance
    magnitude = np.abs(result.map[0]).sum(axis=0)
    halves = magnitude[:, : WORDS_W // 2].sum(), magnitude[:, WORDS_W // 2:].sum()
    assert halves[half] / magnitude.sum() >= share
