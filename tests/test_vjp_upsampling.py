"""ConvTranspose and Resize (rulegraph/vjp.py) against onnxruntime, the runtime users run.

onnxruntime has these ops in float32 only; both are linear in the activation input, so the oracle
(tests/ort_oracle.py) builds the exact Jacobian from onnxruntime's own forward, one basis input
per column, and compares ``J(x)ᵀ s`` with the compiled explainer's saliency elementwise. A row
passes only if every attribute is honoured exactly as onnxruntime reads it. Symbolic rows run
the explainer of a model with symbolic dims and the Jacobian of the same model made static.

The Resize rows are also the separability test: the explainer applies ``M_aᵀ`` axis by axis (each
``M_a`` a 1-D resize of an identity), while the oracle is onnxruntime's full N-D Jacobian, so a
mode that onnxruntime did not compute separably (cubic with exclude_outside, antialias,
tf_crop_and_resize with its extrapolation) would fail its row.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import GRADIENT, compile_seed, one_node
from ort_oracle import check_linear_vjp, ort_forward, ort_jacobian

from rulegraph import Explainer, ModelError

pytest.importorskip("onnxruntime")

W = np.random.default_rng(4321)
F32 = TensorProto.FLOAT


def weight(*shape) -> np.ndarray:
    return W.standard_normal(shape).astype(np.float32)


def floats(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def ints(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class Row:
    id: str
    op_type: str
    args: list
    shape: list                      # the input fed
    consts: dict
    attrs: dict = field(default_factory=dict)
    opset: int = 17
    symbolic: list | None = None     # the input's declared shape with symbols (None: static)

    def param(self):
        return pytest.param(self, id=self.id)

    def model(self, shape) -> onnx.ModelProto:
        return one_node(self.op_type, self.args, {"x": shape}, self.consts, opset=self.opset, elem=F32,
                        **self.attrs)


def ct(id, shape, w, b=None, symbolic=None, **attrs) -> Row:
    consts = {"w": w} if b is None else {"w": w, "b": b}
    return Row(f"ConvTranspose-{id}", "ConvTranspose", ["x", *consts], shape, consts, attrs, symbolic=symbolic)


CONV_TRANSPOSE = [
    ct("1d", [2, 3, 5], weight(3, 2, 3), weight(2)),
    ct("1d-stride3-pads", [1, 2, 6], weight(2, 3, 4), strides=[3], pads=[2, 1]),
    ct("2d-stride2-k2", [1, 3, 4, 5], weight(3, 2, 2, 2), weight(2), strides=[2, 2]),
    ct("2d-stride2-pads-asymmetric", [1, 2, 5, 4], weight(2, 3, 3, 3), strides=[2, 2], pads=[1, 0, 0, 2]),
    ct("2d-dilation2-stride2", [1, 2, 4, 5], weight(2, 2, 3, 2), strides=[2, 2], dilations=[2, 2], pads=[1, 1, 0, 1]),
    ct("2d-output-padding", [1, 2, 4, 4], weight(2, 3, 3, 3), strides=[2, 3], pads=[1, 1, 1, 1],
       output_padding=[1, 2]),
    ct("2d-groups2", [1, 4, 4, 3], weight(4, 3, 3, 3), weight(6), group=2, strides=[2, 1], pads=[0, 1, 1, 1]),
    ct("2d-depthwise", [2, 3, 4, 4], weight(3, 1, 3, 3), group=3, strides=[2, 2], pads=[1, 1, 1, 1]),
    ct("2d-depthwise-multiplier2", [1, 3, 3, 4], weight(3, 2, 2, 3), group=3, strides=[2, 2]),
    ct("2d-output-shape-smaller", [1, 2, 4, 5], weight(2, 2, 4, 3), strides=[2, 2], output_shape=[7, 9]),
    ct("2d-output-shape-larger", [1, 2, 4, 5], weight(2, 2, 3, 3), strides=[2, 2], output_shape=[10, 12]),
    ct("2d-output-shape-same-upper", [1, 2, 4, 5], weight(2, 2, 4, 3), strides=[2, 2], output_shape=[7, 9],
       auto_pad="SAME_UPPER"),
    ct("2d-same-upper-odd-total", [1, 2, 5, 4], weight(2, 2, 3, 4), strides=[2, 2], auto_pad="SAME_UPPER"),
    ct("2d-same-lower-odd-total", [1, 2, 5, 4], weight(2, 2, 3, 4), strides=[2, 2], auto_pad="SAME_LOWER"),
    ct("2d-same-upper-dilation", [1, 2, 4, 4], weight(2, 2, 3, 3), strides=[2, 2], dilations=[2, 2],
       auto_pad="SAME_UPPER"),
    ct("2d-same-lower-stride1", [1, 2, 5, 5], weight(2, 2, 2, 3), auto_pad="SAME_LOWER"),
    ct("2d-same-upper-kernel-below-stride", [1, 2, 3, 4], weight(2, 2, 2, 2), strides=[3, 3], auto_pad="SAME_UPPER"),
    ct("2d-valid", [1, 2, 4, 5], weight(2, 3, 3, 3), strides=[2, 2], auto_pad="VALID"),
    ct("2d-valid-output-padding", [1, 2, 3, 4], weight(2, 3, 3, 3), strides=[2, 2], auto_pad="VALID",
       output_padding=[1, 1]),
    ct("3d", [1, 2, 3, 4, 3], weight(2, 2, 2, 3, 2), weight(2), strides=[2, 1, 2], pads=[0, 1, 1, 1, 0, 0]),
    # symbolic spatial sizes (and batch)
    ct("sym-stride2-pads-output-padding", [2, 2, 4, 5], weight(2, 3, 3, 3), weight(3), strides=[2, 2],
       pads=[1, 0, 1, 1], output_padding=[1, 0], symbolic=["N", 2, "H", "W"]),
    ct("sym-same-upper", [2, 2, 5, 4], weight(2, 2, 3, 4), strides=[2, 2], auto_pad="SAME_UPPER",
       symbolic=["N", 2, "H", "W"]),
    ct("sym-same-lower", [1, 2, 5, 4], weight(2, 2, 3, 4), strides=[2, 2], auto_pad="SAME_LOWER",
       symbolic=["N", 2, "H", "W"]),
    ct("sym-valid-groups", [2, 4, 3, 4], weight(4, 1, 2, 3), group=2, strides=[2, 2], auto_pad="VALID",
       symbolic=["N", 4, "H", "W"]),
    ct("sym-k2-s2", [1, 3, 4, 6], weight(3, 2, 2, 2), strides=[2, 2], symbolic=[1, 3, "H", "W"]),
    ct("sym-batch-output-shape", [2, 2, 4, 5], weight(2, 2, 4, 3), strides=[2, 2], output_shape=[7, 9],
       symbolic=["N", 2, 4, 5]),
]


def rs(id, shape, scales=None, sizes=None, roi=None, opset=19, symbolic=None, **attrs) -> Row:
    """A Resize row: x, roi, scales, sizes (absent ones as '')."""
    args, consts = ["x"], {}
    for name, value in (("roi", roi), ("scales", scales), ("sizes", sizes)):
        if value is not None:
            consts[name] = value
            args.append(name)
        else:
            args.append("")
    while args[-1] == "":
        args.pop()
    return Row(f"Resize-{id}", "Resize", args, shape, consts, attrs, opset, symbolic)


UP = floats(1, 1, 2, 1.5)
DOWN = floats(1, 1, 0.6, 0.75)
X = [1, 2, 5, 6]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
TRANSFORMS = ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric"]

RESIZE = (
    [rs(f"nearest-{m}-{t}-{d}", X, s, mode="nearest", nearest_mode=m, coordinate_transformation_mode=t)
     for m in NEAREST_MODES for t in ("half_pixel", "asymmetric") for d, s in (("up", UP), ("down", DOWN))]
    + [rs(f"linear-{t}-{d}", X, s, mode="linear", coordinate_transformation_mode=t)
       for t in TRANSFORMS for d, s in (("up", UP), ("down", DOWN))]
    + [rs(f"cubic-{t}-a{a}-exclude{e}", X, s, mode="cubic", coordinate_transformation_mode=t, cubic_coeff_a=a,
          exclude_outside=e)
       for t, s in (("half_pixel", UP), ("align_corners", DOWN), ("pytorch_half_pixel", DOWN),
                    ("half_pixel_symmetric", UP))
       for a in (-0.75, -0.5) for e in (0, 1)]
    + [rs(f"tf-crop-{m}-extrapolation{v}", X, floats(1, 1, 1.6, 0.8), roi=floats(0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3),
          mode=m, coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=v)
       for m in ("nearest", "linear", "cubic") for v in (0.0, 2.5)]
    + [rs(f"antialias-{m}-down", [1, 2, 8, 9], floats(1, 1, 0.5, 0.4), mode=m, antialias=1)
       for m in ("linear", "cubic")]
    + [rs("antialias-linear-up-and-down", [1, 2, 4, 9], floats(1, 1, 1.75, 0.45), mode="linear", antialias=1,
          coordinate_transformation_mode="half_pixel_symmetric"),
       rs("antialias-cubic-exclude-outside", [1, 2, 8, 7], floats(1, 1, 0.6, 0.5), mode="cubic", antialias=1,
          exclude_outside=1, cubic_coeff_a=-0.5),
       rs("sizes-linear", X, sizes=ints(1, 2, 8, 4), mode="linear"),
       rs("sizes-nearest-odd", X, sizes=ints(1, 2, 7, 13), mode="nearest"),
       rs("sizes-cubic-align-corners", X, sizes=ints(1, 2, 3, 9), mode="cubic",
          coordinate_transformation_mode="align_corners"),
       rs("axes-scales", X, floats(2.5, 0.7), mode="linear", axes=[3, 2]),
       rs("axes-negative-sizes", X, sizes=ints(9), mode="cubic", axes=[-1]),
       rs("axes-tf-crop", X, floats(1.5), roi=floats(0.1, 0.8), mode="linear", axes=[2],
          coordinate_transformation_mode="tf_crop_and_resize"),
       rs("policy-not-larger-one-axis", X, sizes=ints(8), mode="linear", axes=[3],
          keep_aspect_ratio_policy="not_larger"),
       rs("1d-linear", [2, 3, 6], floats(1, 1, 1.5), mode="linear"),
       rs("3d-linear", [1, 2, 3, 4, 3], floats(1, 1, 2, 0.5, 1.5), mode="linear"),
       rs("3d-nearest", [1, 1, 3, 4, 3], floats(1, 1, 2, 0.5, 1.5), mode="nearest"),
       rs("scale-1-axes-kept", X, floats(1, 1, 1, 2), mode="nearest"),
       rs("channel-axis-nearest", X, floats(1, 2, 1, 1), mode="nearest"),
       # the signatures of every opset that defines Resize (10 is upgraded on load)
       rs("opset18", X, UP, opset=18, mode="linear"),
       rs("opset13-sizes", X, sizes=ints(1, 2, 9, 4), opset=13, mode="cubic"),
       rs("opset13-empty-roi", X, UP, roi=floats(), opset=13, mode="nearest"),
       rs("opset11", X, DOWN, roi=floats(), opset=11, mode="linear", coordinate_transformation_mode="asymmetric"),
       rs("opset11-sizes-empty-scales", X, floats(), sizes=ints(1, 2, 3, 11), roi=floats(), opset=11, mode="cubic"),
       # symbolic sizes
       rs("sym-nearest-asymmetric-floor", [2, 3, 4, 5], floats(1, 1, 2, 2), mode="nearest", nearest_mode="floor",
          coordinate_transformation_mode="asymmetric", symbolic=["N", 3, "H", "W"]),
       rs("sym-linear-half-pixel", [2, 2, 4, 5], floats(1, 1, 1.5, 0.6), mode="linear",
          symbolic=["N", 2, "H", "W"]),
       rs("sym-cubic-antialias", [1, 2, 8, 7], floats(1, 1, 0.5, 0.6), mode="cubic", antialias=1,
          symbolic=["N", 2, "H", "W"]),
       rs("sym-sizes-tf-crop", [1, 2, 5, 6], sizes=ints(1, 2, 7, 4), roi=floats(0, 0, 0.1, -0.1, 1, 1, 1.2, 0.9),
          mode="linear", coordinate_transformation_mode="tf_crop_and_resize", symbolic=[1, 2, "H", "W"])]
)

ROWS = CONV_TRANSPOSE + RESIZE


@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_vjp_matches_onnxruntime_jacobian(row: Row):
    rng = np.random.default_rng(zlib.crc32(row.id.encode()))
    x = rng.standard_normal(row.shape).astype(np.float32)
    static = row.model(row.shape)
    if row.symbolic is None:
        model = static
    else:
        model = row.model(row.symbolic)
        assert any(isinstance(d, str) for d in Explainer(model, GRADIENT).graph.shapes["x"])
    if row.attrs.get("extrapolation_value"):   # the roi reaches outside: f is affine, not linear
        assert np.any(ort_forward(static, np.zeros(row.shape, np.float32)))
    check_linear_vjp(model, x, rng, static=static)


def test_row_ids_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


# Resize before opset 11 (upgraded on load): the explainer must keep the old op's function -------

def legacy(id: str, op_type: str, opset: int, mode: str, scales, shape=(1, 2, 5, 6)) -> pytest.param:
    """An Upsample or Resize-10 model at its own opset: scales as an attribute (Upsample-7) or input."""
    inits = []
    if op_type == "Upsample" and opset < 9:
        node = helper.make_node(op_type, ["x"], ["y"], mode=mode, scales=[float(s) for s in scales])
    else:
        node = helper.make_node(op_type, ["x", "s"], ["y"], mode=mode)
        inits.append(numpy_helper.from_array(floats(*scales), "s"))
    graph = helper.make_graph([node], "legacy", [helper.make_tensor_value_info("x", F32, list(shape))],
                              [helper.make_tensor_value_info("y", F32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return pytest.param(model, list(shape), id=id)


LEGACY = [
    legacy("Upsample7-linear", "Upsample", 7, "linear", (1, 1, 2, 1.5)),
    legacy("Upsample7-nearest", "Upsample", 7, "nearest", (1, 1, 3, 2.5)),
    legacy("Upsample9-linear", "Upsample", 9, "linear", (1, 1, 1.5, 2)),
    legacy("Upsample9-nearest", "Upsample", 9, "nearest", (1, 1, 1.3, 1.7)),
    legacy("Resize10-linear-down", "Resize", 10, "linear", (1, 1, 0.6, 0.7)),
    legacy("Resize10-nearest-down-rounds-up", "Resize", 10, "nearest", (1, 1, 0.6, 0.7), (1, 1, 7, 9)),
    legacy("Resize10-nearest-mixed-rounds-down", "Resize", 10, "nearest", (1, 1, 0.5, 2.5), (1, 1, 7, 9)),
    legacy("Resize10-nearest-up", "Resize", 10, "nearest", (1, 1, 3, 2.5)),
]


@pytest.mark.parametrize(("model", "shape"), LEGACY)
def test_legacy_resize_keeps_its_function(model: onnx.ModelProto, shape):
    """The Jacobian is onnxruntime's of the model at its own opset; the explainer reads the model
    upgraded (onnx's converter alone would turn asymmetric coordinates into half_pixel)."""
    rng = np.random.default_rng(zlib.crc32(model.graph.node[0].op_type.encode() + bytes(shape)))
    check_linear_vjp(model, rng.standard_normal(shape).astype(np.float32), rng)


def test_legacy_nearest_with_computed_scales_is_refused():
    node = helper.make_node("Resize", ["x", "s"], ["y"], name="up", mode="nearest")
    graph = helper.make_graph([node], "legacy", [helper.make_tensor_value_info("x", F32, [1, 1, 3, 3]),
                                                 helper.make_tensor_value_info("s", F32, [4])],
                              [helper.make_tensor_value_info("y", F32, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 7
    with pytest.raises(ModelError, match=r"node 'up' \(Resize\) \(opset 10\) takes its scales from a computed"):
        Explainer(model, GRADIENT)


# refusals: a ModelError naming the node and what is not supported -------------------------------

REFUSED = [
    (rs("policy-not-smaller-two-axes", X, sizes=ints(8, 9), mode="linear", axes=[2, 3],
        keep_aspect_ratio_policy="not_smaller"), "keep_aspect_ratio_policy 'not_smaller'"),
    (ct("output-shape-symbolic", [1, 2, 4, 5], weight(2, 2, 3, 3), strides=[2, 2], output_shape=[9, 11],
        symbolic=[1, 2, "H", "W"]), "the output_shape attribute with a symbolic input size"),
]


@pytest.mark.parametrize(("row", "why"), [pytest.param(r, w, id=r.id) for r, w in REFUSED])
def test_refused_with_the_node_named(row: Row, why: str):
    model = row.model(row.symbolic or row.shape)
    with pytest.raises(ModelError, match=f"node 'the_{row.op_type}' \\({row.op_type}\\): {why}"):
        compile_seed(model)



# LRP-0 on a Resize whose roi reaches outside (an affine op): the extrapolation value is a bias -----

LRP0 = "rulegraph 1\nquantity relevance\nbias blame\nstart one\nlinear -> normalized(eps = 0)\n"


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_normalized_eps0_conserves_on_extrapolating_resize(mode):
    """``R_i = Σ_j x_i J_ji a_j / y_j`` and the bias ``f(0)_j a_j / y_j`` (J and f(0) from onnxruntime):
    Σ R + bias share = Σ a(y), to float32 accuracy."""
    from rulegraph.run import rulefiles as dsl

    row = rs(f"lrp0-{mode}", [1, 1, 4, 5], floats(1, 1, 1.6, 0.8), roi=floats(0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3),
             mode=mode, coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=2.5)
    model = row.model(row.shape)
    rng = np.random.default_rng(zlib.crc32(row.id.encode()))
    x = (0.5 + rng.random(row.shape)).astype(np.float32)        # positive: every output is away from 0
    jac = ort_jacobian(model, row.shape)
    f0 = ort_forward(model, np.zeros(row.shape, np.float32)).astype(np.float64).ravel()
    assert np.any(f0)
    y = jac @ x.astype(np.float64).ravel() + f0
    a = rng.standard_normal(y.shape)
    s = a / y
    result = Explainer(model, dsl.parse(LRP0, source="lrp0.rules")).explain(
        x, target=a.reshape(ort_forward(model, x).shape).astype(np.float32))
    want = x.astype(np.float64).ravel() * (jac.T @ s)
    bound = x.astype(np.float64).ravel() * (np.abs(jac).T @ np.abs(s)) + 1e-6
    assert np.all(np.abs(result.map.ravel() - want) <= 1e-5 * bound)
    share = float(result.bias_shares["the_Resize"][0])
    assert share == pytest.approx(float(f0 @ s), rel=1e-5)
    assert float(result.map.sum()) + share == pytest.approx(float(a.sum()), rel=1e-5, abs=1e-5 * np.abs(a).sum())


def _sizes_from_shape(shape) -> onnx.ModelProto:
    """``Resize(x, sizes = Shape(x) · [1, 1, 2, 3])``, linear: sizes computed in the graph (an
    FPN-style export); with symbolic dims they stay a run-time tensor and every axis is planned."""
    from oracles import make_model

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Mul", ["s", "k"], ["sizes"]),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="the_Resize", mode="linear")]
    return make_model(nodes, {"x": shape}, {"k": ints(1, 1, 2, 3)}, opset=19, elem=F32)


def test_resize_with_sizes_computed_at_run_time():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    check_linear_vjp(_sizes_from_shape(["N", 2, "H", "W"]), x, rng, static=_sizes_from_shape([2, 2, 3, 4]))


def test_resize_with_roi_from_an_explained_input_is_refused():
    node = helper.make_node("Resize", ["x", "r", "s"], ["y"], name="the_Resize", mode="linear",
                            coordinate_transformation_mode="tf_crop_and_resize")
    graph = helper.make_graph([node], "roi", [helper.make_tensor_value_info("x", F32, [1, 1, 4, 4]),
                                              helper.make_tensor_value_info("r", F32, [8])],
                              [helper.make_tensor_value_info("y", F32, None)],
                              [numpy_helper.from_array(floats(1, 1, 2, 2), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    with pytest.raises(ModelError, match=r"node 'the_Resize' \(Resize\): a Resize whose roi, scales or sizes are "
                                         "computed from the explained input"):
        compile_seed(model)
