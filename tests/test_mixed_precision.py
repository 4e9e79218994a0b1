"""precision="mixed": an fp16 model's forward in fp16, the relevance pass in float32 (compile/mixed.py).

Oracles:
- a network whose fp16 forward is exact (small integer weights and inputs, sums far below 2048, so
  every fp16 result is the float32 result): the mixed explainer must equal the float32 explainer of
  the same network exactly, for every bundled rule family, because the backward is the same float32
  computation on the same activations;
- the same network scaled by 2⁻²² (still exact in the forward: powers of two) where pre-activations
  and ε are fp16 subnormals: mixed is still exact, a half-precision backward (``precision="native"``)
  is not;
- type inference over the compiled explainer: no tensor the backward computes is half;
- the real digits CNN in fp16: the gradient (which reads only masks) equals float32's exactly,
  LRP-ε conserves as in float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph import Explainer
from test_interfaces import half_weights

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [0, 1, 2]


def exact_cnn(dtype, pool: bool = True, scale: float = 1.0) -> onnx.ModelProto:
    """Conv(1→4, 3×3) → Relu → [MaxPool 2×2] → Flatten → Gemm(→5); weights in {-1, 0, 1}, integer
    biases times ``scale``: with inputs in {0, 1, 2}·``scale`` every sum is an integer below 2048
    (times ``scale``), exact in fp16."""
    rng = np.random.default_rng(7)
    features = 36 if pool else 144
    values = {"w1": rng.integers(-1, 2, size=(4, 1, 3, 3)), "b1": rng.integers(-1, 2, size=4) * scale,
              "w2": rng.integers(-1, 2, size=(features, 5)), "b2": rng.integers(-2, 3, size=5) * scale}
    inits = [numpy_helper.from_array(np.asarray(v).astype(dtype), k) for k, v in values.items()]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    last = "r"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2],
                                      name="pool"))
        last = "p"
    nodes += [helper.make_node("Flatten", [last], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], name="dense")]
    graph = helper.make_graph(nodes, "exact", [helper.make_tensor_value_info("x", elem, ["N", 1, 6, 6])],
                              [helper.make_tensor_value_info("logits", elem, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def exact_inputs(scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(8).integers(0, 3, size=(3, 1, 6, 6)) * scale).astype(np.float32)


#: every single-pass rule family; integrated-gradients and smoothgrad are loops over the gradient rule
#: whose path and noise points (α·x, x + noise) are not exact in fp16, so this oracle does not hold there
RULE_FILES = ["gradient", "gradient-x-input", "lrp-epsilon", "lrp-0", "lrp-zplus", "lrp-gamma",
              "lrp-alpha2-beta1", "lrp-composite", "deeplift-rescale", "guided-backprop", "deconvnet"]


@pytest.mark.parametrize("rules", RULE_FILES)
def test_mixed_equals_float32_where_the_half_forward_is_exact(rules):
    x = exact_inputs()
    mixed = Explainer(exact_cnn(np.float16), rules, precision="mixed").explain(x.astype(np.float16),
                                                                               target=TARGETS)
    full = Explainer(exact_cnn(np.float32), rules).explain(x, target=TARGETS)
    assert mixed.map.dtype == np.float32
    np.testing.assert_array_equal(mixed.map, full.map)


def test_mixed_keeps_relevance_that_fp16_loses():
    """Scaled by 2⁻²², inputs and pre-activations are fp16 subnormals (exact: multiples of 2⁻²⁴), as is
    ε = 1e-6 (rounded by 1.3 %): a half backward's ε-rule loses 2.7 % of the largest attribution
    (measured), mixed keeps float32's answer exactly."""
    scale = 2.0 ** -22
    x = exact_inputs(scale)
    full = Explainer(exact_cnn(np.float32, pool=False, scale=scale), "lrp-epsilon").explain(x, target=TARGETS)
    half = exact_cnn(np.float16, pool=False, scale=scale)
    mixed = Explainer(half, "lrp-epsilon", precision="mixed").explain(x.astype(np.float16), target=TARGETS)
    native = Explainer(half, "lrp-epsilon", precision="native").explain(x.astype(np.float16), target=TARGETS)
    np.testing.assert_array_equal(mixed.map, full.map)
    lost = np.abs(native.map.astype(np.float64) - full.map).max() / np.abs(full.map).max()
    assert lost > 1e-2, lost


@pytest.mark.parametrize("rules", ["gradient", "lrp-epsilon", "deeplift-rescale"])
def test_no_backward_tensor_is_half(rules):
    explainer = Explainer(exact_cnn(np.float16), rules, precision="mixed")
    compiled = explainer.compiled()
    forward = {n.name for n in explainer.graph.model.graph.node}
    inferred = onnx.shape_inference.infer_shapes(compiled.model, strict_mode=True)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.output)}
    backward_outputs = [o for n in compiled.model.graph.node if n.name not in forward for o in n.output if o]
    assert len(backward_outputs) > 10 and all(o in types for o in backward_outputs)
    half = [o for o in backward_outputs if types[o] in (TensorProto.FLOAT16, TensorProto.BFLOAT16)]
    assert not half
    assert types["logits"] == TensorProto.FLOAT16   # the forward stays half


def test_real_fp16_cnn():
    """The digits CNN stored in fp16: onnxruntime's CPU has no fp16 ScatterElements(add) for MaxPool's
    backward, so only mixed runs natively in half; its gradient reads masks only and equals float32's."""
    cnn = onnx.load(str(ROOT / "models" / "digits_cnn.onnx"))
    x = np.load(ROOT / "models" / "digits_sample.npz")["x"]
    half, full = half_weights(cnn, True), half_weights(cnn, False)
    grad = Explainer(half, "gradient", precision="mixed").explain(x.astype(np.float16), target=[1] * 8)
    reference = Explainer(full, "gradient").explain(x.astype(np.float16).astype(np.float32), target=[1] * 8)
    np.testing.assert_array_equal(grad.map, reference.map)
    lrp = Explainer(half, "lrp-epsilon", precision="mixed").explain(x.astype(np.float16), target=[1] * 8)
    lrp_full = Explainer(full, "lrp-epsilon").explain(x.astype(np.float16).astype(np.float32), target=[1] * 8)
    assert np.abs(lrp.relative_delta).max() < 1e-4
    assert np.abs(lrp_full.relative_delta).max() < 1e-4


def test_precision_is_checked():
    with pytest.raises(ValueError, match="'fp32', 'mixed' or 'native'"):
        Explainer(exact_cnn(np.float16), "gradient", precision="half")
