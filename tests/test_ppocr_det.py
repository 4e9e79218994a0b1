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
