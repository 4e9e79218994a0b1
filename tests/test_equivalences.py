"""docs/rules.md, equivalences on ReLU networks with max-pooling, run end to end with onnxruntime.

1. Bias-free: LRP-0 (relevance) = gradient × input (importance).
2. With biases and ``bias blame``: inputs + bias shares = output (relevance and importance).
3. LRP-ε → gradient × input as ε → 0, in the Bach form (bias in the denominator). In a ReLU/max
   network every layer keeps ``a_relevance(t) = t ⊙ a_importance(t)`` exactly (Hobson's
   "rephrasing"), so the bias shares agree too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph import Explainer
from rulegraph.run import rulefiles as dsl

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
RELU_MODELS = ["digits_mlp", "digits_cnn", "digits_resnet"]


def sample() -> np.ndarray:
    return np.load(MODELS / "digits_sample.npz")["x"]


def with_eps(eps: float):
    return dsl.parse(f'rulegraph 1\ninclude "lrp-epsilon"\nlinear -> normalized(eps = {eps})\n',
                     source="eps.rules")


def bias_free_cnn():
    """Conv → Relu → MaxPool(3, stride 2, overlapping) → Flatten → Gemm → Relu → Gemm, no biases."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.normal(size=(4, 1, 3, 3)), "w2": rng.normal(size=(12, 36)) / 6,
             "w3": rng.normal(size=(10, 12)) / 3}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w2"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w3"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "bias_free", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_lrp0_equals_gradient_x_input_without_bias():
    x = sample()
    lrp = Explainer(bias_free_cnn(), "lrp-0").explain(x, target=[0, 1, 2, 3, 4, 5, 6, 7])
    gxi = Explainer(bias_free_cnn(), "gradient-x-input").explain(x, target=[0, 1, 2, 3, 4, 5, 6, 7])
    scale = np.abs(gxi.map).max()
    np.testing.assert_allclose(lrp.map, gxi.map, atol=1e-5 * scale)
    assert lrp.bias_total is None and gxi.bias_total is None  # nothing to blame
    np.testing.assert_allclose(lrp.delta, 0, atol=1e-4 * np.abs(lrp.start_value).max())


@pytest.mark.parametrize("model", RELU_MODELS)
@pytest.mark.parametrize("rules", ["lrp-0", "gradient-x-input"])
def test_inputs_plus_bias_shares_equal_output(model, rules):
    result = Explainer(MODELS / f"{model}.onnx", rules).explain(sample(), target="argmax")
    assert result.bias_total is not None and result.bias_shares
    logits = result.outputs["logits"]
    np.testing.assert_allclose(result.start_value, logits[np.arange(len(logits)), result.target], rtol=1e-6)
    np.testing.assert_allclose(result.relative_delta, 0, atol=2e-5)


@pytest.mark.parametrize("model", RELU_MODELS)
def test_lrp_epsilon_tends_to_gradient_x_input(model):
    """The error is of order ε once ε is below the smallest |pre-activation|: each tenfold cut in
    ε cuts it about tenfold; at ε = 0 only float32 rounding is left."""
    x = sample()
    gxi = Explainer(MODELS / f"{model}.onnx", "gradient-x-input").explain(x, target="argmax")
    scale = np.abs(gxi.map).max()

    def error(eps):
        lrp = Explainer(MODELS / f"{model}.onnx", with_eps(eps)).explain(x, target="argmax")
        return float(np.abs(lrp.map - gxi.map).max() / scale)

    e6, e7, e0 = error(1e-6), error(1e-7), error(0.0)
    assert 5 < e6 / e7 < 20, (e6, e7)
    assert e0 < 2e-6, e0
    lrp0 = Explainer(MODELS / f"{model}.onnx", "lrp-0").explain(x, target="argmax")
    np.testing.assert_allclose(lrp0.bias_total, gxi.bias_total, rtol=1e-4, atol=1e-5)
