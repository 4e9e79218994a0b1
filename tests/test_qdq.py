"""QDQ models (docs/kinds.md, fused nodes): an activation's QuantizeLinear → DequantizeLinear pair
is one straight-through route node, a weight's DequantizeLinear folds to its float weight.

Oracles: torch's fake quantization (``torch.fake_quantize_per_tensor_affine``), whose backward is
the clipped straight-through estimator, and the same estimator written out per element (per axis,
block-wise) on a replica of each model; for the CNN made by onnxruntime.quantization, a torch
replica with the weights dequantized by numpy and torch's fake quantization at every pair; exact
expected errors for the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rulegraph.backward.ops as G
from rulegraph import Explainer, ModelError
from rulegraph.compile.build import SEED, compile_explainer
from rulegraph.run import rulefiles

GRADIENT = rulefiles.load("gradient")
INT = {"int8": (TensorProto.INT8, np.int8), "uint8": (TensorProto.UINT8, np.uint8),
       "int16": (TensorProto.INT16, np.int16), "uint16": (TensorProto.UINT16, np.uint16)}


def pair_model(dtype: str, scale: np.ndarray, zero: np.ndarray, axis: int | None = None, opset: int = 21,
               block_size: int | None = None, shape=(2, 3, 4)) -> onnx.ModelProto:
    """x → QuantizeLinear → DequantizeLinear → Mul by a constant (a path that goes on) → y."""
    elem, np_type = INT[dtype]
    attrs = {} if axis is None else {"axis": axis}
    if block_size is not None:
        attrs["block_size"] = block_size
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], **attrs),
             helper.make_node("Mul", ["d", "w"], ["y"])]
    inits = [numpy_helper.from_array(scale.astype(np.float32), "s"),
             numpy_helper.from_array(zero.astype(np_type), "z"),
             numpy_helper.from_array(np.float32(1.5) * np.ones(shape[-1], np.float32), "w")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph(nodes, "qdq", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def fake_quantize(x: torch.Tensor, scale: np.ndarray, zero: np.ndarray, dtype: str, axis: int | None,
                  block_size: int | None) -> torch.Tensor:
    info = np.iinfo(INT[dtype][1])
    if block_size is not None:  # block-wise: each block of the axis its own scale, as per channel
        scale, zero = np.repeat(scale, block_size, axis=axis), np.repeat(zero, block_size, axis=axis)
        return _per_element(x, scale, zero, info)
    if scale.ndim == 0:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero), int(info.min), int(info.max))
    along = [1] * x.ndim  # per axis: the scale broadcast along its axis
    along[axis % x.ndim] = -1
    return _per_element(x, scale.reshape(along), zero.reshape(along), info)


def _per_element(x, scale, zero, info):
    """Fake quantization with a scale per element, torch's clipped straight-through estimator by
    hand: the gradient passes where ``round(x/s) + z`` lies in the integer range, 0 elsewhere."""
    s, z = torch.tensor(scale), torch.tensor(zero.astype(np.float64))
    q = torch.round(x / s) + z
    inside = (q >= info.min) & (q <= info.max)
    y = (torch.clamp(q, info.min, info.max) - z) * s
    return torch.where(inside, x + (y - x).detach(), y.detach())


RNG = np.random.default_rng(7)
PAIRS = [  # id, dtype, scale, zero point, axis, opset, block size
    ("int8-per-tensor", "int8", np.array(0.02), np.array(0), None, 17, None),
    ("uint8-per-tensor-zero-point", "uint8", np.array(0.01), np.array(128), None, 17, None),
    ("int8-saturating-relu-like", "int8", np.array(0.01), np.array(-128), None, 17, None),
    ("int16-per-tensor", "int16", np.array(1e-4), np.array(3), None, 21, None),
    ("uint16-per-tensor", "uint16", np.array(1e-4), np.array(30000), None, 21, None),
    ("int8-per-axis", "int8", np.array([0.01, 0.02, 0.05]), np.array([0, 1, -2]), 1, 17, None),
    ("uint8-per-axis-last", "uint8", np.array([0.01, 0.02, 0.03, 0.04]), np.array([120, 128, 130, 127]), -1,
     17, None),
    ("int8-block-wise", "int8", np.array([[[0.01, 0.03]] * 3] * 2), np.zeros((2, 3, 2)), -1, 21, 2),
]


@pytest.mark.parametrize("name, dtype, scale, zero, axis, opset, block", PAIRS, ids=[p[0] for p in PAIRS])
def test_pair_is_one_straight_through_route_node(name, dtype, scale, zero, axis, opset, block):
    model = pair_model(dtype, scale, zero, axis, opset, block)
    graph = G.load(model)
    (pair,) = [n for n in graph.nodes if n.members]
    assert (pair.op_type, pair.kind, [m.op_type for m in pair.members]) == (
        "QuantizeDequantize", "route", ["QuantizeLinear", "DequantizeLinear"])
    spread = 0.4 if "8" in dtype else 2.0  # some values beyond the range of the 8-bit rows: saturated
    x = (spread * RNG.standard_normal((2, 3, 4))).astype(np.float32)
    seed = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    compiled = compile_explainer(graph, GRADIENT, seed_mode=True)
    session = onnxruntime.InferenceSession(compiled.model.SerializeToString())
    names = [compiled.saliency["x"], "y"]
    got, y = session.run(names, {"x": x, SEED: seed})
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    yt = fake_quantize(xt, scale, zero, dtype, axis, block) * 1.5
    yt.backward(torch.tensor(seed.astype(np.float64)))
    # the forward is onnxruntime's rounding; the replica's in float64 may round a value at a half
    # step the other way, by one step (the scale) at most
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1.5 * float(np.max(scale)) * 1.0001)
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# a CNN quantized by onnxruntime.quantization


class _Calibration:
    """A few random inputs for the calibration of quantize_static."""

    def __init__(self, shape, count=4):
        self.batches = iter([{"input": np.random.default_rng(i).standard_normal(shape).astype(np.float32)}
                             for i in range(count)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def quantized_cnn(tmp_path_factory):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    folder = tmp_path_factory.mktemp("qdq")
    torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), str(folder / "cnn.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}}, opset_version=17,
                      dynamo=False)
    paths = {}
    reader = type("Reader", (_Calibration, CalibrationDataReader), {})
    for name, fmt in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        paths[name] = folder / f"cnn_{name}.onnx"
        quantize_static(str(folder / "cnn.onnx"), str(paths[name]), reader((1, 3, 16, 16)), quant_format=fmt,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return paths


def _replica(model: onnx.ModelProto, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The QDQ CNN in torch, float64: the weights dequantized by numpy (the model's rounding), every
    activation pair torch's fake quantization (straight-through, clipped); returns (x, logits)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values: dict[str, torch.Tensor] = {}

    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    values["input"] = xt
    for node in model.graph.node:
        ins, attrs = list(node.input), {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear" and ins[0] in inits:
            q, s, z = (inits[i] for i in ins)
            q, z, s = (v.astype(np.float64) for v in (q, z, s))
            values[node.output[0]] = torch.tensor((q - z) * s)
        elif node.op_type == "QuantizeLinear":
            s, z = inits[ins[1]], inits[ins[2]]
            values[node.output[0]] = fake_quantize(values[ins[0]], np.asarray(s, np.float64), z, "int8",
                                                   None, None)
        elif node.op_type == "DequantizeLinear":
            values[node.output[0]] = values[ins[0]]  # the pair: fake_quantize already gives the float value
        elif node.op_type == "Conv":
            values[node.output[0]] = torch.nn.functional.conv2d(values[ins[0]], values[ins[1]],
                                                                values[ins[2]],
                                                                padding=attrs["pads"][:2])
        elif node.op_type == "MaxPool":
            values[node.output[0]] = torch.nn.functional.max_pool2d(values[ins[0]], attrs["kernel_shape"])
        elif node.op_type == "GlobalAveragePool":
            values[node.output[0]] = values[ins[0]].mean((2, 3), keepdim=True)
        elif node.op_type == "Flatten":
            values[node.output[0]] = values[ins[0]].flatten(1)
        elif node.op_type == "Gemm":
            values[node.output[0]] = values[ins[0]] @ values[ins[1]].T + values[ins[2]]
        else:
            raise AssertionError(f"the replica has no {node.op_type}")
    return xt, values["logits"]


def test_quantize_static_qdq_model_is_explained(quantized_cnn):
    """The defect: 'output 'logits' does not depend on a float input of the model' (the path became
    integer at QuantizeLinear). Now its gradient is the straight-through gradient of the replica."""
    model = onnx.load(str(quantized_cnn["qdq"]))
    x = np.random.default_rng(11).standard_normal((2, 3, 16, 16)).astype(np.float32)
    result = Explainer(str(quantized_cnn["qdq"]), "gradient").explain({"input": x}, target=[1, 3])
    xt, logits = _replica(model, x)
    np.testing.assert_allclose(logits.detach().numpy(), result.outputs["logits"], atol=0.05)  # a step or two
    logits[[0, 1], [1, 3]].sum().backward()
    got = result.saliency["input"]
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-4, atol=1e-5 * np.abs(got).max())


def test_quantize_static_qdq_model_conserves_under_lrp_epsilon(quantized_cnn):
    """Within the calibrated range: a value the quantizer saturates passes nothing back (the clipped
    straight-through estimator, as Clip's gradient), so its relevance would show in the delta."""
    x = 0.5 * np.random.default_rng(12).standard_normal((2, 3, 16, 16)).astype(np.float32)
    result = Explainer(str(quantized_cnn["qdq"]), "lrp-epsilon").explain({"input": x})
    assert np.all(np.abs(result.relative_delta) <= 1e-3), result.relative_delta


def test_qoperator_model_is_refused_naming_the_op(quantized_cnn):
    with pytest.raises(ModelError) as err:
        Explainer(str(quantized_cnn["qoperator"]), "gradient")
    message = str(err.value)
    assert ("node '/0/Conv_quant' (QLinearConv) (and 1 more), node '/5/GlobalAveragePool_quant' "
            "(QLinearGlobalAveragePool) (domain 'com.microsoft'), node '/7/Gemm_quant' (QGemm) (domain "
            "'com.microsoft') are not supported: it is an integer op") in message
    assert "quantize with `quant_format=QuantFormat.QDQ`" in message
