"""The real third-party models in ../shared/models/ (when present), explained end to end with the
bundled rule files and no edit: the prediction matches plain onnxruntime, lrp-epsilon conserves,
and the gradient agrees with a finite difference of the explained logit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from rulegraph import Explainer

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "models"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/models/ is not beside this checkout")


def kitten_bgr() -> np.ndarray:
    """SqueezeNet's input: BGR 0..255 minus the channel means (104, 117, 123)."""
    rgb = np.asarray(Image.open(SHARED / "kitten_224.png").convert("RGB").resize((224, 224)), dtype=np.float32)
    bgr = rgb[:, :, ::-1] - np.array([104, 117, 123], dtype=np.float32)
    return np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])


def cifar_like() -> np.ndarray:
    """ResNet20's input: RGB 0..1, then ImageNet mean/std (a downscaled photo stands in for CIFAR)."""
    rgb = np.asarray(Image.open(SHARED / "kitten_224.png").convert("RGB").resize((32, 32)), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((rgb - mean) / std).astype(np.float32).transpose(2, 0, 1)[None]


def mnist_pytorch() -> np.ndarray:
    grey = np.asarray(Image.open(SHARED / "mnist_7.jpg").convert("L"), dtype=np.float32) / 255
    return ((grey - 0.1307) / 0.3081)[None, None].astype(np.float32)


MODELS = [("squeezenet1.1_fp32.onnx", kitten_bgr), ("resnet20_cifar10.onnx", cifar_like),
          ("mnist_cnn_pytorch.onnx", mnist_pytorch)]


@pytest.mark.parametrize("name,make_input", MODELS, ids=[m[0] for m in MODELS])
def test_real_model_end_to_end(name, make_input):
    path = SHARED / name
    x = make_input()
    plain = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = plain.run(None, {plain.get_inputs()[0].name: x})[0].reshape(len(x), -1).argmax(axis=1)
    lrp = Explainer(path, "lrp-epsilon").explain(x)
    np.testing.assert_array_equal(lrp.target, expected)
    assert np.abs(lrp.relative_delta).max() < 1e-3
    grad = Explainer(path, "gradient").explain(x, target=expected)
    # finite difference of the explained logit (the start tensor) along the gradient's direction
    explainer = Explainer(path, "gradient")
    g = next(iter(grad.saliency.values()))
    direction = g / np.linalg.norm(g)
    h = 1e-3 * np.abs(x).max()  # small against the input, large against float32 noise

    def logit(v):
        start = explainer.forward(v)[explainer.compiled().start_tensor]
        return start.reshape(len(v), start.shape[1], -1)[0, expected[0], 0]

    slope = (logit(x + h * direction) - logit(x - h * direction)) / (2 * h)
    assert slope == pytest.approx(np.linalg.norm(g), rel=0.05)


def test_squeezenet_sees_a_cat():
    labels = (SHARED / "imagenet_labels.txt").read_text().splitlines()
    result = Explainer(SHARED / "squeezenet1.1_fp32.onnx", "lrp-epsilon").explain(kitten_bgr())
    name = labels[int(result.target[0])].split(",", 1)[1].lower()
    assert any(cat in name for cat in ("tabby", "tiger cat", "egyptian cat")), name
