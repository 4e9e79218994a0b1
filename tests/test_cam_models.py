"""The CAM model on the bundled and real models (no torch needed): every method runs, gives a
finite map in [0, 1] shaped like the input's H × W, and emits only ops onnxruntime's CUDA
provider has (``run/kernels.py``); Grad-CAM's channel weights against the layer's gradient from
``explain(at=)``, replicated in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import rulegraph
from rulegraph.compile.cam import METHODS
from rulegraph.run import kernels
from rulegraph.run.cam import Cam

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"digits_cnn": (ROOT / "models" / "digits_cnn.onnx", (2, 1, 8, 8)),
          "digits_resnet": (ROOT / "models" / "digits_resnet.onnx", (2, 1, 8, 8)),
          "resnet20_cifar10": (ROOT / "tests" / "data" / "resnet20_cifar10.onnx", (2, 3, 32, 32))}


def inputs(name: str) -> np.ndarray:
    return np.random.default_rng(2).uniform(0, 1, MODELS[name][1]).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_runs_on_the_real_models_with_cuda_ops_only(name, method):
    path = MODELS[name][0]
    cam = Cam(str(path), method)
    result = cam.explain(inputs(name), "argmax")
    n, _, h, w = MODELS[name][1]
    assert result.map.shape == (n, h, w) and np.all(np.isfinite(result.map))
    assert result.map.min() >= 0 and result.map.max() <= 1
    user = {node.name for node in onnx.load(str(path)).graph.node}
    assert [f.line() for f in kernels.cuda_fallbacks(cam.compiled().model) if f.node not in user] == []


def resize_half_pixel(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres, clamped at the borders (OpenCV's INTER_LINEAR)."""
    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low
    (y0, y1, fy), (x0, x1, fx) = axis(image.shape[0], h), axis(image.shape[1], w)
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def minmax(m: np.ndarray) -> np.ndarray:
    m = m - m.min()
    return m / (1e-7 + m.max())


@pytest.mark.parametrize("name", list(MODELS))
def test_gradcam_is_the_numpy_replica_on_the_layer_gradient(name):
    """relu(Σ_k mean(G_k) A_k), min-max, resize, relu, min-max; ``A`` and ``G`` from ``explain(at=)``."""
    path = MODELS[name][0]
    x = inputs(name)
    cam = Cam(str(path), "gradcam")
    got = cam.explain(x, [3, 1])
    g = rulegraph.Explainer(str(path), "gradient").explain(x, [3, 1], at=cam.layer).at_numbers[cam.layer]
    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(cam.layer, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (a,) = session.run([cam.layer], {model.graph.input[0].name: x})
    raw = np.einsum("nk,nkhw->nhw", g.astype(np.float64).mean(axis=(2, 3)), a)
    for i in range(len(x)):
        small = minmax(np.maximum(raw[i], 0))
        want = minmax(np.maximum(resize_half_pixel(small, *x.shape[2:]), 0))
        np.testing.assert_allclose(got.map[i], want, rtol=0, atol=1e-5)
