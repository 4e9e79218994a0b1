"""The VJP table (rulegraph/vjp.py), one row per op case, against central finite differences.

Each row is a small float64 ONNX model with graph output ``y``. The oracle (tests/oracles.py)
compiles it with the gradient rule in seed mode, runs it on the ONNX reference evaluator and
compares ``<J(x)ᵀ s, d>`` with ``<s, (f(x + h d) − f(x − h d)) / 2h>`` along one random direction
that perturbs every activation input at once. Constant operands (weights) are initializers.

Piecewise ops are sampled away from their kinks (the sampler of each row says how), so that the
finite difference with h = 1e-6 never crosses one.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from oracles import GRADIENT, check_vjp, compile_seed, make_model, one_node, reference_vjp, run

from rulegraph import Explainer, ModelError
from rulegraph.compile.build import SEED
from rulegraph.errors import Location
from rulegraph.lang.ruleset import Binding, RuleCall, RuleSet, Selector

W = np.random.default_rng(1234)   # constant operands (weights), fixed at collection time
INT64_MAX = np.iinfo(np.int64).max


def weight(*shape) -> np.ndarray:
    return W.standard_normal(shape)


def ints(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# samplers: (rng, {input name: shape}) -> feeds ------------------------------------------------------


def normal(scale: float = 1.0) -> Callable:
    def sample(rng, shapes):
        return {k: scale * rng.standard_normal(s) for k, s in shapes.items()}
    return sample


NORMAL = normal()


def away(*kinks: float, margin: float = 0.05, scale: float = 1.0) -> Callable:
    """Normal samples pushed at least ``margin`` away from every kink (h·|d| ≈ 1e-6 never crosses)."""
    def sample(rng, shapes):
        feeds = {}
        for k, s in shapes.items():
            x = scale * rng.standard_normal(s)
            for kink in kinks:
                near = np.abs(x - kink) < margin
                x = np.where(near, kink + np.where(x >= kink, margin, -margin), x)
            feeds[k] = x
        return feeds
    return sample


def positive(low: float = 0.3, scale: float = 1.0) -> Callable:
    """Samples ``low + scale·|normal|``: kept away from 0 (Sqrt, Log, Pow's base under a real exponent)."""
    def sample(rng, shapes):
        return {k: low + scale * np.abs(rng.standard_normal(s)) for k, s in shapes.items()}
    return sample


def uniform(low: float, high: float) -> Callable:
    """Samples uniform in ``[low, high]``: a domain such as ``|x| < 1`` (Asin, Atanh), kept off its ends."""
    def sample(rng, shapes):
        return {k: rng.uniform(low, high, s) for k, s in shapes.items()}
    return sample


def off_grid(step: float = 1.0, offset: float = 0.0, margin: float = 0.05, scale: float = 3.0) -> Callable:
    """Normal samples at least ``margin·step`` away from every jump ``offset + k·step`` of a rounding
    (Floor and Ceil: the integers; Round: the half-integers)."""
    def sample(rng, shapes):
        feeds = {}
        for k, s in shapes.items():
            x = scale * rng.standard_normal(s)
            frac = np.mod(x - offset, step) / step
            feeds[k] = x + step * (np.clip(frac, margin, 1 - margin) - frac)
        return feeds
    return sample


def mod_pairs(low: float = 0.5) -> Callable:
    """A dividend and a divisor (``|b| >= low``) whose quotient is at least 0.1 from an integer: Mod
    has its jumps where ``a/b`` is one. A constant divisor (one input only): ``b = 1.3``."""
    def sample(rng, shapes):
        names = list(shapes)
        if len(names) > 1:
            b = rng.standard_normal(shapes[names[1]])
            b = np.sign(b) * (low + np.abs(b))
        else:
            b = np.array(1.3)
        q = 3 * rng.standard_normal(shapes[names[0]])
        frac = np.mod(q, 1.0)
        q = q + np.clip(frac, 0.1, 0.9) - frac
        feeds = {names[0]: q * b}
        if len(names) > 1:
            feeds[names[1]] = b
        return feeds
    return sample


def clip_bounds(lo: float | None, hi: float | None = None, kinks=()) -> Callable:
    """``x`` normal away from the bounds; inputs after ``x`` get ``lo`` then ``hi`` (the bounds that
    are activations)."""
    def sample(rng, shapes):
        names = list(shapes)
        feeds = away(*[b for b in (lo, hi) if b is not None], *kinks)(rng, {names[0]: shapes[names[0]]})
        feeds.update({k: np.array(float(b)) for k, b in zip(names[1:], [b for b in (lo, hi) if b is not None])})
        return feeds
    return sample


def distinct(rng, shapes):
    """All values of all inputs distinct and 4/n apart (a scaled permutation): no max ties."""
    sizes = [int(np.prod(s)) for s in shapes.values()]
    n = sum(sizes)
    values = (rng.permutation(n) - n / 2) * (4.0 / n)
    feeds, at = {}, 0
    for (k, s), size in zip(shapes.items(), sizes):
        feeds[k] = values[at:at + size].reshape(s)
        at += size
    return feeds


def with_zeros(share: float = 0.3) -> Callable:
    """Normal samples with about ``share`` of the elements exactly 0 (a product's VJP at zeros: several
    in one scan, one, none). A product is a polynomial: the finite difference needs no margin."""
    def sample(rng, shapes):
        return {k: np.where(rng.random(s) < share, 0.0, rng.standard_normal(s)) for k, s in shapes.items()}
    return sample


# cases --------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    model: onnx.ModelProto
    sample: Callable = NORMAL

    def param(self):
        return pytest.param(self, id=self.id)


def op(id: str, op_type: str, args, inputs, consts=None, opset=17, sample=NORMAL, **attrs) -> Case:
    """A one-node row: ``op_type(*args) -> y``."""
    return Case(id, one_node(op_type, args, inputs, consts, opset=opset, **attrs), sample)


def nodes(id: str, node_list, inputs, consts=None, opset=17, sample=NORMAL) -> Case:
    """A few-node row; the last node writes ``y``."""
    return Case(id, make_model(node_list, inputs, consts, opset=opset), sample)


def without(attribute: str, case: Case) -> Case:
    """``case`` with ``attribute`` dropped from its first node (its default then applies)."""
    node = case.model.graph.node[0]
    kept = [a for a in node.attribute if a.name != attribute]
    del node.attribute[:]
    node.attribute.extend(kept)
    return case


N = helper.make_node
X234 = {"x": [2, 3, 4]}

GEMM = [
    op("Gemm-plain", "Gemm", ["x", "w"], {"x": [3, 4]}, {"w": weight(4, 5)}),
    op("Gemm-transB-alpha-beta-C", "Gemm", ["x", "w", "c"], {"x": [3, 4]},
       {"w": weight(5, 4), "c": weight(5)}, alpha=0.7, beta=1.3, transB=1),
    op("Gemm-transA-C2d", "Gemm", ["x", "w", "c"], {"x": [4, 3]}, {"w": weight(4, 5), "c": weight(3, 5)},
       transA=1, beta=0.5),
    op("Gemm-transA-transB", "Gemm", ["x", "w"], {"x": [4, 3]}, {"w": weight(5, 4)}, transA=1, transB=1,
       alpha=2.0),
    op("Gemm-activation-B", "Gemm", ["x", "x1", "c"], {"x": [3, 4], "x1": [4, 5]}, {"c": weight(1, 5)},
       alpha=0.6),
    op("Gemm-activation-B-transA-transB", "Gemm", ["x", "x1"], {"x": [4, 3], "x1": [5, 4]},
       transA=1, transB=1, alpha=1.5),
    op("Gemm-const-A-activation-B", "Gemm", ["w", "x", "c"], {"x": [5, 4]}, {"w": weight(3, 4), "c": weight(5)},
       transB=1, alpha=0.9),
]

MATMUL = [
    op("MatMul-const-right-2d", "MatMul", ["x", "w"], {"x": [3, 4]}, {"w": weight(4, 5)}),
    op("MatMul-const-right-batched", "MatMul", ["x", "w"], {"x": [2, 3, 4]}, {"w": weight(4, 5)}),
    op("MatMul-const-left-2d", "MatMul", ["w", "x"], {"x": [2, 4, 5]}, {"w": weight(3, 4)}),
    op("MatMul-batched-activations", "MatMul", ["x", "x1"], {"x": [2, 3, 4, 5], "x1": [2, 3, 5, 6]}),
    op("MatMul-broadcast-3d-2d", "MatMul", ["x", "x1"], {"x": [3, 4, 5], "x1": [5, 6]}),
    op("MatMul-broadcast-size1-batch", "MatMul", ["x", "x1"], {"x": [2, 1, 4, 5], "x1": [3, 5, 6]}),
    op("MatMul-1d-left-activations", "MatMul", ["x", "x1"], {"x": [4], "x1": [2, 4, 5]}),
    op("MatMul-1d-right-activations", "MatMul", ["x", "x1"], {"x": [2, 3, 4], "x1": [4]}),
    # a scalar product; Unsqueeze keeps the start tensor rank 1 (see test_scalar_start_tensor)
    nodes("MatMul-1d-both", [N("MatMul", ["x", "x1"], ["p"]), N("Unsqueeze", ["p", "axes"], ["y"])],
          {"x": [4], "x1": [4]}, {"axes": ints(0)}),
    op("MatMul-1d-left-const-right", "MatMul", ["x", "w"], {"x": [4]}, {"w": weight(4, 5)}),
    op("MatMul-const-1d-right", "MatMul", ["x", "w"], {"x": [2, 3, 4]}, {"w": weight(4)}),
    op("MatMul-const-1d-left", "MatMul", ["w", "x"], {"x": [2, 4, 5]}, {"w": weight(4)}),
]

CONV = [
    op("Conv-1d", "Conv", ["x", "w", "b"], {"x": [2, 3, 7]}, {"w": weight(4, 3, 3), "b": weight(4)}),
    op("Conv-2d-pads1", "Conv", ["x", "w", "b"], {"x": [2, 3, 6, 5]}, {"w": weight(4, 3, 3, 3), "b": weight(4)},
       pads=[1, 1, 1, 1]),
    op("Conv-2d-stride2-pads1", "Conv", ["x", "w"], {"x": [1, 2, 7, 7]}, {"w": weight(3, 2, 3, 3)},
       strides=[2, 2], pads=[1, 1, 1, 1]),
    op("Conv-asymmetric-pads", "Conv", ["x", "w"], {"x": [1, 2, 6, 5]}, {"w": weight(3, 2, 3, 2)},
       pads=[0, 1, 1, 2]),
    op("Conv-asymmetric-pads-stride2", "Conv", ["x", "w"], {"x": [1, 2, 7, 6]}, {"w": weight(3, 2, 3, 3)},
       pads=[0, 1, 1, 2], strides=[2, 2]),
    op("Conv-dilation2", "Conv", ["x", "w"], {"x": [1, 2, 9, 8]}, {"w": weight(3, 2, 3, 3)},
       dilations=[2, 2], pads=[2, 1, 2, 1]),
    op("Conv-dilation2-stride2", "Conv", ["x", "w"], {"x": [1, 2, 10, 9]}, {"w": weight(3, 2, 3, 2)},
       dilations=[2, 2], strides=[2, 2]),
    op("Conv-groups2", "Conv", ["x", "w", "b"], {"x": [1, 4, 6, 6]}, {"w": weight(6, 2, 3, 3), "b": weight(6)},
       group=2, pads=[1, 1, 1, 1]),
    op("Conv-groups2-stride2", "Conv", ["x", "w"], {"x": [2, 4, 7, 6]}, {"w": weight(6, 2, 3, 3)},
       group=2, strides=[2, 2]),
    op("Conv-depthwise", "Conv", ["x", "w"], {"x": [2, 3, 6, 6]}, {"w": weight(3, 1, 3, 3)},
       group=3, pads=[1, 1, 1, 1]),
    op("Conv-depthwise-multiplier2-stride2", "Conv", ["x", "w"], {"x": [1, 3, 7, 7]}, {"w": weight(6, 1, 3, 3)},
       group=3, strides=[2, 2], pads=[1, 1, 1, 1]),
    op("Conv-same-upper-stride2", "Conv", ["x", "w"], {"x": [1, 2, 7, 6]}, {"w": weight(3, 2, 3, 3)},
       auto_pad="SAME_UPPER", strides=[2, 2]),
    op("Conv-same-lower-stride2", "Conv", ["x", "w"], {"x": [1, 2, 7, 6]}, {"w": weight(3, 2, 4, 2)},
       auto_pad="SAME_LOWER", strides=[2, 2]),
    op("Conv-same-upper-even-kernel", "Conv", ["x", "w"], {"x": [1, 2, 6, 5]}, {"w": weight(3, 2, 2, 4)},
       auto_pad="SAME_UPPER"),
    op("Conv-same-lower-even-kernel", "Conv", ["x", "w"], {"x": [1, 2, 6, 5]}, {"w": weight(3, 2, 2, 4)},
       auto_pad="SAME_LOWER"),
    op("Conv-valid", "Conv", ["x", "w"], {"x": [1, 2, 6, 5]}, {"w": weight(3, 2, 3, 3)}, auto_pad="VALID"),
    # stride 2 on 8 rows with kernel 3: windows reach rows 0..6, row 7 gets nothing
    op("Conv-stride2-uncovered-tail", "Conv", ["x", "w"], {"x": [1, 2, 8, 8]}, {"w": weight(3, 2, 3, 3)},
       strides=[2, 2]),
    # odd sizes, end padding 2: the transposed conv overshoots and is cut
    op("Conv-stride2-odd-end-pads", "Conv", ["x", "w"], {"x": [1, 2, 9, 7]}, {"w": weight(3, 2, 3, 3)},
       strides=[2, 2], pads=[0, 0, 2, 2]),
    # H: end padding 1 but a tail row uncovered (cut, then zero-extend); W: overshoot (cut)
    op("Conv-stride3-end-pad-mixed", "Conv", ["x", "w"], {"x": [1, 2, 9, 10]}, {"w": weight(3, 2, 2, 2)},
       strides=[3, 3], pads=[0, 0, 1, 1]),
    op("Conv-1d-stride2-pads", "Conv", ["x", "w"], {"x": [2, 3, 10]}, {"w": weight(2, 3, 4)},
       strides=[2], pads=[2, 1]),
    # ResNet's shapes: the 1×1 stride-2 shortcut leaves the last row and column uncovered (output
    # padding); the 7×7 stride-2 stem overshoots by two (end pads of the transposed conv)
    op("Conv-1x1-stride2-shortcut", "Conv", ["x", "w"], {"x": [2, 3, 8, 8]}, {"w": weight(4, 3, 1, 1)},
       strides=[2, 2]),
    op("Conv-7x7-stride2-stem", "Conv", ["x", "w"], {"x": [1, 3, 12, 12]}, {"w": weight(4, 3, 7, 7)},
       strides=[2, 2], pads=[3, 3, 3, 3]),
    op("Conv-stride3-shortfall2", "Conv", ["x", "w"], {"x": [1, 2, 11, 9]}, {"w": weight(3, 2, 2, 2)},
       strides=[3, 3]),
]

# ConvTranspose and Resize in float64 on the reference (tests/test_vjp_upsampling.py: every attribute
# against onnxruntime, which runs them in float32 only)
#: their own generator: the draws of the rows after them stay as they were
UW = np.random.default_rng(99)


def up_weight(*shape) -> np.ndarray:
    return UW.standard_normal(shape)


UPSAMPLING = [
    op("ConvTranspose-stride2-pads-output-padding", "ConvTranspose", ["x", "w", "b"], {"x": [2, 2, 4, 3]},
       {"w": up_weight(2, 3, 3, 3), "b": up_weight(3)}, strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 1]),
    op("ConvTranspose-groups2-dilation2", "ConvTranspose", ["x", "w"], {"x": [1, 4, 3, 4]}, {"w": up_weight(4, 2, 2, 3)},
       group=2, dilations=[2, 2], strides=[2, 1]),
    op("ConvTranspose-same-lower-stride2", "ConvTranspose", ["x", "w"], {"x": [1, 2, 5, 4]}, {"w": up_weight(2, 2, 3, 4)},
       strides=[2, 2], auto_pad="SAME_LOWER"),
    op("ConvTranspose-1d-stride3-pads", "ConvTranspose", ["x", "w"], {"x": [2, 3, 5]}, {"w": up_weight(3, 2, 4)},
       strides=[3], pads=[2, 1]),
    op("Resize-linear-half-pixel", "Resize", ["x", "", "s"], {"x": [1, 2, 4, 5]}, {"s": np.array([1, 1, 1.5, 0.6], dtype=np.float32)},
       opset=19, mode="linear"),
    op("Resize-cubic-exclude-outside-align-corners", "Resize", ["x", "", "s"], {"x": [1, 2, 4, 5]},
       {"s": np.array([1, 1, 2.0, 1.4], dtype=np.float32)}, opset=19, mode="cubic", exclude_outside=1,
       coordinate_transformation_mode="align_corners"),
    op("Resize-nearest-sizes-asymmetric-floor", "Resize", ["x", "", "", "z"], {"x": [2, 3, 4, 5]},
       {"z": ints(2, 3, 8, 7)}, opset=19, mode="nearest", nearest_mode="floor",
       coordinate_transformation_mode="asymmetric"),
]

# max pooling: `distinct` inputs have no ties, so the arg-max of each window is unique
POOL = [
    op("MaxPool-k3-s1-overlap", "MaxPool", ["x"], {"x": [1, 2, 6, 6]}, sample=distinct, kernel_shape=[3, 3]),
    op("MaxPool-k3-s2-pads", "MaxPool", ["x"], {"x": [2, 2, 7, 7]}, sample=distinct, kernel_shape=[3, 3],
       strides=[2, 2], pads=[1, 1, 1, 1]),
    op("MaxPool-k2-s2", "MaxPool", ["x"], {"x": [2, 3, 6, 4]}, sample=distinct, kernel_shape=[2, 2],
       strides=[2, 2]),
    op("MaxPool-ceil-mode", "MaxPool", ["x"], {"x": [1, 2, 6, 6]}, sample=distinct, kernel_shape=[3, 3],
       strides=[2, 2], ceil_mode=1),
    op("MaxPool-1d", "MaxPool", ["x"], {"x": [2, 3, 9]}, sample=distinct, kernel_shape=[3], strides=[2],
       pads=[1, 1]),
    op("AveragePool-exclude-pad", "AveragePool", ["x"], {"x": [1, 2, 7, 7]}, kernel_shape=[3, 3],
       strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0),
    op("AveragePool-include-pad", "AveragePool", ["x"], {"x": [1, 2, 6, 5]}, kernel_shape=[3, 3],
       pads=[1, 1, 1, 1], count_include_pad=1),
    op("AveragePool-exclude-pad-asymmetric", "AveragePool", ["x"], {"x": [1, 2, 6, 5]}, kernel_shape=[3, 2],
       pads=[0, 1, 2, 0], count_include_pad=0),
    op("AveragePool-ceil-mode", "AveragePool", ["x"], {"x": [1, 2, 6, 6]}, kernel_shape=[3, 3],
       strides=[2, 2], ceil_mode=1),
    op("AveragePool-ceil-mode-include-pad", "AveragePool", ["x"], {"x": [1, 2, 6, 6]}, kernel_shape=[3, 3],
       strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
    op("AveragePool-ceil-mode-exclude-pad", "AveragePool", ["x"], {"x": [1, 2, 7, 6]}, kernel_shape=[3, 2],
       strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1),
    # the last window would start in the end padding: onnxruntime and onnx.reference drop it
    op("AveragePool-ceil-mode-window-in-pad", "AveragePool", ["x"], {"x": [1, 2, 6, 6]}, kernel_shape=[2, 2],
       strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1, count_include_pad=1),
    # stride 3 > kernel 2: the last ceil window would start in the end padding and is dropped by the
    # runtimes, while onnx shape inference keeps it (output 3x3 inferred, 2x2 computed)
    op("AveragePool-ceil-mode-stride-over-kernel", "AveragePool", ["x"], {"x": [1, 2, 6, 6]}, kernel_shape=[2, 2],
       strides=[3, 3], pads=[0, 0, 1, 1], ceil_mode=1),
    op("AveragePool-1d-stride1-ceil", "AveragePool", ["x"], {"x": [2, 3, 7]}, kernel_shape=[3], pads=[1, 2],
       ceil_mode=1),
    op("AveragePool-same-upper-exclude-pad", "AveragePool", ["x"], {"x": [1, 2, 7, 6]}, kernel_shape=[3, 3],
       strides=[2, 2], auto_pad="SAME_UPPER"),
    op("AveragePool-opset19-dilations", "AveragePool", ["x"], {"x": [1, 2, 8, 7]}, opset=19, kernel_shape=[2, 3],
       dilations=[2, 2], pads=[1, 1, 1, 1]),
    op("MaxPool-dilations-same-lower", "MaxPool", ["x"], {"x": [1, 2, 8, 7]}, sample=distinct, kernel_shape=[2, 2],
       dilations=[2, 2], auto_pad="SAME_LOWER"),
    op("AveragePool-no-pads", "AveragePool", ["x"], {"x": [2, 2, 6, 6]}, kernel_shape=[2, 2], strides=[2, 2]),
    op("GlobalAveragePool", "GlobalAveragePool", ["x"], {"x": [2, 3, 4, 5]}),
    op("GlobalMaxPool", "GlobalMaxPool", ["x"], {"x": [2, 3, 4, 5]}, sample=distinct),
    # found by the ONNX backend suite (tests/test_onnx_backend.py): the Indices order does not matter
    op("MaxPool-storage-order-1", "MaxPool", ["x"], {"x": [1, 2, 5, 4]}, sample=distinct, kernel_shape=[2, 2],
       strides=[2, 1], storage_order=1),
]

REDUCE = [
    op("ReduceMean-attr-axes-keepdims1", "ReduceMean", ["x"], X234, axes=[1]),
    op("ReduceMean-attr-axes-keepdims0", "ReduceMean", ["x"], X234, axes=[0, 2], keepdims=0),
    nodes("ReduceMean-all-axes", [N("ReduceMean", ["x"], ["m"], keepdims=0), N("Unsqueeze", ["m", "axes"], ["y"])],
          X234, {"axes": ints(0)}),
    op("ReduceMean-opset18-axes-input", "ReduceMean", ["x", "axes"], X234, {"axes": ints(-1)}, opset=18,
       keepdims=0),
    op("ReduceMean-opset18-keepdims1", "ReduceMean", ["x", "axes"], X234, {"axes": ints(0, 1)}, opset=18),
    op("ReduceSum-axes-input-keepdims0", "ReduceSum", ["x", "axes"], X234, {"axes": ints(1, 2)}, keepdims=0),
    op("ReduceSum-keepdims1", "ReduceSum", ["x", "axes"], X234, {"axes": ints(-2)}),
    # distinct inputs: the maximum along the axis is unique
    op("ReduceMax-one-axis", "ReduceMax", ["x"], X234, sample=distinct, axes=[1]),
    op("ReduceMax-keepdims0", "ReduceMax", ["x"], X234, sample=distinct, axes=[-1], keepdims=0),
    op("ReduceMax-opset18-axes-input", "ReduceMax", ["x", "axes"], X234, {"axes": ints(0)}, opset=18,
       sample=distinct, keepdims=0),
    op("ReduceMin-one-axis", "ReduceMin", ["x"], X234, sample=distinct, axes=[1]),
    op("ReduceMin-keepdims0", "ReduceMin", ["x"], X234, sample=distinct, axes=[-1], keepdims=0),
    op("ReduceMin-opset18-axes-input", "ReduceMin", ["x", "axes"], X234, {"axes": ints(0)}, opset=18,
       sample=distinct, keepdims=0),
    op("ReduceMin-opset20-axes-input", "ReduceMin", ["x", "axes"], X234, {"axes": ints(2)}, opset=20,
       sample=distinct),
    op("ReduceMin-opset20-noop-empty-axes", "ReduceMin", ["x"], X234, opset=20, noop_with_empty_axes=1),
    # L1: |x| kinks at 0 avoided; L2: the norm is far from 0; Prod: one row with exact zeros
    op("ReduceL1-attr-axes", "ReduceL1", ["x"], X234, sample=away(0.0), axes=[0, 2]),
    op("ReduceL1-opset18-axes-input-keepdims0", "ReduceL1", ["x", "axes"], X234, {"axes": ints(-1)}, opset=18,
       sample=away(0.0), keepdims=0),
    op("ReduceL2-attr-axes-keepdims0", "ReduceL2", ["x"], X234, axes=[1], keepdims=0),
    op("ReduceL2-opset18-all-axes", "ReduceL2", ["x"], X234, opset=18),
    op("ReduceSumSquare-attr-axes", "ReduceSumSquare", ["x"], X234, axes=[1, 2], keepdims=0),
    op("ReduceSumSquare-opset18-axes-input", "ReduceSumSquare", ["x", "axes"], X234, {"axes": ints(0)},
       opset=18),
    op("ReduceLogSumExp-attr-axes", "ReduceLogSumExp", ["x"], X234, sample=normal(2.0), axes=[2]),
    op("ReduceLogSumExp-opset18-axes-input-keepdims0", "ReduceLogSumExp", ["x", "axes"], X234,
       {"axes": ints(0, 1)}, opset=18, sample=normal(2.0), keepdims=0),
    op("ReduceLogSumExp-opset28-noop-empty-axes", "ReduceLogSumExp", ["x", "axes"], X234,
       {"axes": np.zeros(0, dtype=np.int64)}, opset=28, noop_with_empty_axes=1),
    op("ReduceProd-attr-axes", "ReduceProd", ["x"], X234, axes=[1]),
    op("ReduceProd-opset18-all-axes-keepdims0", "ReduceProd", ["x"], X234, opset=18, keepdims=0),
    op("ReduceProd-opset18-axes-input", "ReduceProd", ["x", "axes"], X234, {"axes": ints(0, 2)}, opset=18),
    # several axes (found by the ONNX backend suite, tests/test_onnx_backend.py)
    op("ReduceMax-two-axes", "ReduceMax", ["x"], {"x": [2, 3, 4, 5]}, sample=distinct, axes=[1, 3]),
    op("ReduceMax-two-axes-keepdims0", "ReduceMax", ["x"], {"x": [2, 3, 4, 5]}, sample=distinct, axes=[3, 0],
       keepdims=0),
    op("ReduceMin-all-axes", "ReduceMin", ["x"], X234, sample=distinct),
    op("ReduceMax-opset18-two-axes-input", "ReduceMax", ["x", "axes"], X234, {"axes": ints(-1, 0)}, opset=18,
       sample=distinct),
]

# reductions and windows of rulegraph/backward/{vjp,lp_pool,cumprod,normalization}.py, per opset signature
MORE_REDUCE = [
    op("ReduceLogSum-opset11-negative-axes", "ReduceLogSum", ["x"], X234, opset=11, sample=positive(),
       axes=[-1, 0]),
    op("ReduceLogSum-opset13-attr-axes-keepdims0", "ReduceLogSum", ["x"], X234, opset=13, sample=positive(),
       axes=[1], keepdims=0),
    op("ReduceLogSum-all-axes", "ReduceLogSum", ["x"], X234, sample=positive()),
    op("ReduceLogSum-opset18-axes-input", "ReduceLogSum", ["x", "axes"], X234, {"axes": ints(0, 2)}, opset=18,
       sample=positive()),
    op("ReduceLogSum-opset18-noop-empty-axes", "ReduceLogSum", ["x"], X234, opset=18, sample=positive(),
       noop_with_empty_axes=1),
    op("ReduceLogSum-opset28-axes-input-keepdims0", "ReduceLogSum", ["x", "axes"], X234, {"axes": ints(-2)},
       opset=28, sample=positive(), keepdims=0),
    # onnx's strict shape inference fails on the default axes (its function body reads the absent
    # attribute): the model is built with them written, then the attribute dropped
    without("axes", op("MeanVarianceNormalization-default-axes", "MeanVarianceNormalization", ["x"],
                       {"x": [2, 3, 4, 5]}, opset=13, axes=[0, 2, 3])),
    op("MeanVarianceNormalization-opset13-axes-2", "MeanVarianceNormalization", ["x"], X234, opset=13,
       axes=[2]),
    op("MeanVarianceNormalization-axes-0-1", "MeanVarianceNormalization", ["x"], X234, axes=[0, 1]),
    # p = 1: |x| has its kink at 0; p = 2, 3 are smooth where the window is not all 0
    op("LpPool-p2-default", "LpPool", ["x"], {"x": [2, 2, 5, 5]}, kernel_shape=[2, 2]),
    op("LpPool-p1-strides-pads", "LpPool", ["x"], {"x": [1, 2, 7, 6]}, sample=away(0.0), kernel_shape=[3, 3],
       strides=[2, 2], pads=[1, 0, 1, 1], p=1),
    op("LpPool-p3-same-upper", "LpPool", ["x"], {"x": [1, 2, 7, 6]}, kernel_shape=[3, 2], strides=[2, 2],
       auto_pad="SAME_UPPER", p=3),
    op("LpPool-opset11-1d-p3", "LpPool", ["x"], {"x": [2, 3, 9]}, opset=11, kernel_shape=[3], strides=[2],
       pads=[1, 1], p=3),
    op("LpPool-opset18-dilations-ceil-mode", "LpPool", ["x"], {"x": [1, 2, 8, 7]}, opset=18,
       kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 1], ceil_mode=1),
    op("LpPool-opset22-p1-ceil-mode-pads", "LpPool", ["x"], {"x": [1, 2, 6, 7]}, opset=22, sample=away(0.0),
       kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1, p=1),
    op("GlobalLpPool-p2", "GlobalLpPool", ["x"], {"x": [2, 3, 4, 5]}),
    op("GlobalLpPool-p1", "GlobalLpPool", ["x"], {"x": [2, 3, 4, 5]}, sample=away(0.0), p=1),
    op("GlobalLpPool-opset22-p3-1d", "GlobalLpPool", ["x"], {"x": [2, 3, 6]}, opset=22, p=3),
    op("CumProd-axis1", "CumProd", ["x", "axis"], X234, {"axis": np.array(1)}, opset=26),
    op("CumProd-exclusive", "CumProd", ["x", "axis"], X234, {"axis": np.array(-1)}, opset=26, exclusive=1),
    op("CumProd-reverse-int32-axis", "CumProd", ["x", "axis"], X234, {"axis": np.array(2, dtype=np.int32)},
       opset=26, reverse=1),
    op("CumProd-exclusive-reverse", "CumProd", ["x", "axis"], X234, {"axis": np.array(0)}, opset=26,
       exclusive=1, reverse=1),
    op("CumProd-zeros", "CumProd", ["x", "axis"], {"x": [4, 6]}, {"axis": np.array(1)}, opset=26,
       sample=with_zeros()),
    op("CumProd-zeros-exclusive-reverse", "CumProd", ["x", "axis"], {"x": [4, 6]}, {"axis": np.array(-1)},
       opset=26, sample=with_zeros(), exclusive=1, reverse=1),
    op("CumProd-zeros-reverse", "CumProd", ["x", "axis"], {"x": [6, 4]}, {"axis": np.array(0)},
       opset=26, sample=with_zeros(), reverse=1),
]

# ReduceProd with exact zeros: windows with no zero, one zero (the product of the rest) and two zeros (0)
PROD_ZEROS = np.array([[1.5, -0.7, 0.9], [0.0, 1.3, -1.1], [0.0, 0.8, 0.0], [2.0, 0.0, -0.6]])

BN = [op("BatchNormalization", "BatchNormalization", ["x", "s", "b", "m", "v"], {"x": [2, 3, 4, 4]},
         {"s": weight(3), "b": weight(3), "m": weight(3), "v": 0.5 + W.random(3)}, epsilon=1e-3)]


def _binary_rows(op_type: str, sample: Callable, const_scale: float = 0.0) -> list[Case]:
    """Broadcast against a constant [3, 1], a constant scalar, and activations [3, 1] and []."""
    c31 = weight(3, 1)
    c = np.array(1.7)
    if const_scale:  # Div: denominators kept away from 0
        c31 = np.sign(c31) * (np.abs(c31) + const_scale)
    return [
        op(f"{op_type}-const-3x1", op_type, ["x", "c"], X234, {"c": c31}, sample=sample),
        op(f"{op_type}-const-left-3x1", op_type, ["c", "x"], X234, {"c": c31}, sample=sample),
        op(f"{op_type}-const-scalar", op_type, ["x", "c"], X234, {"c": c}, sample=sample),
        op(f"{op_type}-activations-3x1", op_type, ["x", "x1"], {"x": [2, 3, 4], "x1": [3, 1]}, sample=sample),
        op(f"{op_type}-activations-3x1-left", op_type, ["x1", "x"], {"x": [2, 3, 4], "x1": [3, 1]},
           sample=sample),
        op(f"{op_type}-activation-scalar", op_type, ["x", "x1"], {"x": [2, 3, 4], "x1": []}, sample=sample),
        op(f"{op_type}-activations-same-shape", op_type, ["x", "x1"], {"x": [2, 3, 4], "x1": [2, 3, 4]},
           sample=sample),
    ]


# Div: every value at least 0.5 away from 0, so 1/b is smooth along the finite difference
ARITHMETIC = (_binary_rows("Add", normal()) + _binary_rows("Sub", normal()) + _binary_rows("Mul", normal())
              + _binary_rows("Div", away(0.0, margin=0.5), const_scale=0.5) + [
    op("Neg", "Neg", ["x"], X234),
    op("CumSum", "CumSum", ["x", "axis"], X234, {"axis": np.array(1, dtype=np.int64)}),
    op("CumSum-exclusive", "CumSum", ["x", "axis"], X234, {"axis": np.array(-1, dtype=np.int64)},
       exclusive=1),
    op("CumSum-reverse", "CumSum", ["x", "axis"], X234, {"axis": np.array(2, dtype=np.int32)}, reverse=1),
    op("CumSum-exclusive-reverse", "CumSum", ["x", "axis"], X234, {"axis": np.array(0, dtype=np.int64)},
       exclusive=1, reverse=1),
    op("Sum-3-broadcast", "Sum", ["x", "x1", "x2"], {"x": [2, 3, 4], "x1": [4], "x2": [3, 1]}),
    op("Sum-with-const", "Sum", ["x", "c", "x1"], {"x": [2, 3, 4], "x1": [2, 3, 4]}, {"c": weight(4)}),
])

# elementwise: kinks at 0 (Relu, LeakyRelu, PRelu, Elu, Selu, Abs) or at the listed points are
# avoided by the `away` sampler
ELEMENTWISE = [
    op("Relu", "Relu", ["x"], X234, sample=away(0.0)),
    op("LeakyRelu", "LeakyRelu", ["x"], X234, sample=away(0.0), alpha=0.1),
    op("PRelu-slope-Cx1x1", "PRelu", ["x", "slope"], {"x": [2, 3, 4, 5]}, {"slope": weight(3, 1, 1)},
       sample=away(0.0)),
    op("Sigmoid", "Sigmoid", ["x"], X234, sample=normal(2.0)),
    op("Tanh", "Tanh", ["x"], X234, sample=normal(2.0)),
    op("Softplus", "Softplus", ["x"], X234, sample=normal(2.0)),
    op("Elu", "Elu", ["x"], X234, sample=away(0.0), alpha=0.7),
    op("Selu", "Selu", ["x"], X234, sample=away(0.0)),
    op("Selu-attrs", "Selu", ["x"], X234, sample=away(0.0), alpha=1.3, gamma=0.8),
    op("Clip-min-max", "Clip", ["x", "lo", "hi"], X234, {"lo": np.array(-0.5), "hi": np.array(0.8)},
       sample=away(-0.5, 0.8)),
    op("Clip-min-only", "Clip", ["x", "lo"], X234, {"lo": np.array(-0.3)}, sample=away(-0.3)),
    op("Clip-max-only", "Clip", ["x", "", "hi"], X234, {"hi": np.array(0.4)}, sample=away(0.4)),
    op("Erf", "Erf", ["x"], X234, sample=normal(1.5)),
    op("Gelu-none", "Gelu", ["x"], X234, opset=20, sample=normal(2.0)),
    op("Gelu-tanh", "Gelu", ["x"], X234, opset=20, sample=normal(2.0), approximate="tanh"),
    # alpha 0.3, beta 0.4: kinks where 0.3 x + 0.4 is 0 or 1
    op("HardSigmoid", "HardSigmoid", ["x"], X234, sample=away(-4 / 3, 2.0, scale=2.5), alpha=0.3, beta=0.4),
    op("HardSigmoid-defaults", "HardSigmoid", ["x"], X234, sample=away(-2.5, 2.5, scale=3.0)),
    op("HardSwish", "HardSwish", ["x"], X234, sample=away(-3.0, 3.0, scale=3.0)),
    op("Abs", "Abs", ["x"], X234, sample=away(0.0)),
    op("Sqrt", "Sqrt", ["x"], X234, sample=positive()),
    op("Exp", "Exp", ["x"], X234),
    op("Log", "Log", ["x"], X234, sample=positive()),
    op("Reciprocal", "Reciprocal", ["x"], X234, sample=away(0.0, margin=0.5)),
    op("Sin", "Sin", ["x"], X234, sample=normal(2.0)),
    op("Sin-opset22", "Sin", ["x"], X234, opset=22, sample=normal(2.0)),
    op("Cos", "Cos", ["x"], X234, sample=normal(2.0)),
    op("Cos-opset22", "Cos", ["x"], X234, opset=22, sample=normal(2.0)),
    op("Softsign", "Softsign", ["x"], X234, sample=normal(2.0)),
    op("Softsign-opset22", "Softsign", ["x"], X234, opset=22, sample=normal(2.0)),
    op("Mish-opset18", "Mish", ["x"], X234, opset=18, sample=normal(2.0)),
    op("Mish-opset22", "Mish", ["x"], X234, opset=22, sample=normal(2.0)),
    op("Celu", "Celu", ["x"], X234, sample=away(0.0), alpha=0.6),
    op("Celu-opset28", "Celu", ["x"], X234, opset=28, sample=away(0.0)),
    # kinks at α (ThresholdedRelu) and at ±λ (Shrink)
    op("ThresholdedRelu", "ThresholdedRelu", ["x"], X234, sample=away(0.4), alpha=0.4),
    op("ThresholdedRelu-opset22-default", "ThresholdedRelu", ["x"], X234, opset=22,
       sample=away(1.0, scale=2.0)),
    op("Shrink", "Shrink", ["x"], X234, sample=away(-0.7, 0.7), lambd=0.7, bias=0.2),
    op("Shrink-defaults", "Shrink", ["x"], X234, sample=away(-0.5, 0.5)),
    op("Pow-const-integer-exponent", "Pow", ["x", "e"], X234, {"e": np.array(3.0)}),
    op("Pow-const-int64-exponent", "Pow", ["x", "e"], X234, {"e": np.array(2, dtype=np.int64)}),
    op("Pow-const-real-exponent-broadcast", "Pow", ["x", "e"], X234, {"e": np.array([0.5, 1.5, -0.7, 2.2])},
       sample=positive()),
    op("Pow-activation-exponent", "Pow", ["x", "x1"], {"x": [2, 3, 4], "x1": [3, 1]}, sample=positive()),
    op("Pow-const-base-activation-exponent", "Pow", ["c", "x"], X234, {"c": 0.5 + np.abs(weight(4))}),
    # found by the ONNX backend suite (tests/test_onnx_backend.py): a zero base, activation bounds of Clip
    op("Pow-zero-base-activation-exponent", "Pow", ["c", "x"], X234, {"c": np.array([0.0, 0.5, 0.0, 2.0])},
       sample=positive()),
    op("Clip-activation-bounds", "Clip", ["x", "x1", "x2"], {"x": [2, 3, 4], "x1": [], "x2": []},
       sample=clip_bounds(-0.4, 0.5)),
    op("Clip-activation-min-above-max", "Clip", ["x", "x1", "x2"], {"x": [2, 3, 4], "x1": [], "x2": []},
       sample=clip_bounds(0.6, -0.2)),
    op("Clip-activation-min-only", "Clip", ["x", "x1"], {"x": [2, 3, 4], "x1": []}, sample=clip_bounds(-0.3)),
    op("Clip-const-min-activation-max", "Clip", ["x", "lo", "x1"], {"x": [2, 3, 4], "x1": []},
       {"lo": np.array(-0.5)}, sample=clip_bounds(0.3, kinks=(-0.5,))),
]

# elementwise ops of rulegraph/backward/elementwise.py: inverse and hyperbolic functions inside their
# domains; the roundings and Mod sampled away from their jumps (their derivative there is 0, resp. 1 and
# −k, and the finite difference sees the same)
MORE_ELEMENTWISE = [
    op("Tan", "Tan", ["x"], X234, sample=uniform(-1.3, 1.3)),
    op("Tan-opset22", "Tan", ["x"], X234, opset=22, sample=uniform(-1.3, 1.3)),
    op("Asin", "Asin", ["x"], X234, sample=uniform(-0.95, 0.95)),
    op("Asin-opset22", "Asin", ["x"], X234, opset=22, sample=uniform(-0.95, 0.95)),
    op("Acos", "Acos", ["x"], X234, sample=uniform(-0.95, 0.95)),
    op("Acos-opset22", "Acos", ["x"], X234, opset=22, sample=uniform(-0.95, 0.95)),
    op("Atan", "Atan", ["x"], X234, sample=normal(2.0)),
    op("Atan-opset22", "Atan", ["x"], X234, opset=22, sample=normal(2.0)),
    op("Sinh", "Sinh", ["x"], X234, sample=normal(2.0)),
    op("Sinh-opset22", "Sinh", ["x"], X234, opset=22, sample=normal(2.0)),
    op("Cosh", "Cosh", ["x"], X234, sample=normal(2.0)),
    op("Cosh-opset22", "Cosh", ["x"], X234, opset=22, sample=normal(2.0)),
    op("Asinh", "Asinh", ["x"], X234, sample=normal(3.0)),
    op("Asinh-opset22", "Asinh", ["x"], X234, opset=22, sample=normal(3.0)),
    op("Acosh", "Acosh", ["x"], X234, sample=positive(1.1, 2.0)),
    op("Acosh-opset22", "Acosh", ["x"], X234, opset=22, sample=positive(1.1, 2.0)),
    op("Atanh", "Atanh", ["x"], X234, sample=uniform(-0.95, 0.95)),
    op("Atanh-opset22", "Atanh", ["x"], X234, opset=22, sample=uniform(-0.95, 0.95)),
    op("Swish-opset24-default", "Swish", ["x"], X234, opset=24, sample=normal(3.0)),
    op("Swish-opset24-alpha", "Swish", ["x"], X234, opset=24, sample=normal(3.0), alpha=1.702),
    op("Ceil", "Ceil", ["x"], X234, sample=off_grid()),
    op("Floor", "Floor", ["x"], X234, sample=off_grid()),
    op("Floor-opset13", "Floor", ["x"], X234, opset=13, sample=off_grid()),
    op("Round", "Round", ["x"], X234, sample=off_grid(offset=0.5)),
    op("Round-opset22", "Round", ["x"], X234, opset=22, sample=off_grid(offset=0.5)),
    op("Sign", "Sign", ["x"], X234, sample=away(0.0)),
    nodes("Floor-then-Mul", [N("Floor", ["x"], ["f"]), N("Mul", ["f", "x1"], ["y"])],
          {"x": [2, 3, 4], "x1": [2, 3, 4]}, sample=off_grid()),
    op("Mod-fmod-activations", "Mod", ["x", "x1"], X234 | {"x1": [2, 3, 4]}, sample=mod_pairs(), fmod=1),
    op("Mod-fmod-broadcast-divisor", "Mod", ["x", "x1"], X234 | {"x1": [3, 1]}, sample=mod_pairs(), fmod=1),
    op("Mod-fmod-const-divisor", "Mod", ["x", "c"], X234, {"c": np.array(1.3)}, sample=mod_pairs(), fmod=1),
    op("Mod-opset28-fmod", "Mod", ["x", "x1"], X234 | {"x1": [4]}, opset=28, sample=mod_pairs(), fmod=1),
    op("Mod-opset28-floor", "Mod", ["x", "x1"], X234 | {"x1": [2, 3, 4]}, opset=28, sample=mod_pairs()),
    op("CastLike-double", "CastLike", ["x", "like"], X234, {"like": np.zeros(1)}, opset=15),
    op("CastLike-opset21", "CastLike", ["x", "like"], X234, {"like": np.zeros(1)}, opset=21),
    op("CastLike-opset25-like-activation", "CastLike", ["x", "x1"], X234 | {"x1": [2]}, opset=25),
]

ROUTE = [
    op("Reshape", "Reshape", ["x", "shape"], X234, {"shape": ints(4, -1)}),
    op("Reshape-zero-dim", "Reshape", ["x", "shape"], X234, {"shape": ints(0, 0, 2, 2)}),
    op("Flatten-axis2", "Flatten", ["x"], {"x": [2, 3, 4, 5]}, axis=2),
    op("Flatten-default", "Flatten", ["x"], {"x": [2, 3, 4, 5]}),
    op("Transpose-perm", "Transpose", ["x"], X234, perm=[2, 0, 1]),
    op("Transpose-default", "Transpose", ["x"], X234),
    op("Squeeze", "Squeeze", ["x", "axes"], {"x": [2, 1, 4, 1]}, {"axes": ints(1)}),
    op("Squeeze-all", "Squeeze", ["x"], {"x": [2, 1, 4, 1]}),
    op("Unsqueeze", "Unsqueeze", ["x", "axes"], X234, {"axes": ints(0, 3)}),
    op("Identity", "Identity", ["x"], X234),
    op("Dropout-inference", "Dropout", ["x"], X234),
    op("Concat-3-axis1", "Concat", ["x", "x1", "x2"], {"x": [2, 1, 4], "x1": [2, 3, 4], "x2": [2, 2, 4]}, axis=1),
    op("Concat-negative-axis-with-const", "Concat", ["x", "c", "x1"], {"x": [2, 3, 1], "x1": [2, 3, 2]},
       {"c": weight(2, 3, 3)}, axis=-1),
    nodes("Split-then-Concat-reordered", [
        N("Split", ["x", "sizes"], ["s0", "s1", "s2"], axis=1),
        N("Concat", ["s2", "s0", "s1"], ["y"], axis=1)], {"x": [2, 6, 4]}, {"sizes": ints(1, 2, 3)}),
    nodes("Split-equal-then-Mul", [
        N("Split", ["x"], ["s0", "s1", "s2"], axis=-1),
        N("Mul", ["s0", "s1"], ["p"]),
        N("Add", ["p", "s2"], ["y"])], {"x": [2, 3, 6]}),
    nodes("Split-one-output-unused", [
        N("Split", ["x", "sizes"], ["s0", "s1", "s2"], axis=1),
        N("Concat", ["s2", "s0"], ["y"], axis=1)], {"x": [2, 6, 4]}, {"sizes": ints(2, 2, 2)}),
    nodes("Split-opset18-num-outputs", [
        N("Split", ["x"], ["s0", "s1", "s2"], axis=0, num_outputs=3),
        N("Concat", ["s1", "s2", "s0"], ["y"], axis=0)], {"x": [7, 3]}, opset=18),
    op("Slice-steps2-axes-subset", "Slice", ["x", "starts", "ends", "axes", "steps"], {"x": [5, 6, 7]},
       {"starts": ints(0, 1), "ends": ints(5, 7), "axes": ints(0, 2), "steps": ints(2, 2)}),
    op("Slice-negative-step", "Slice", ["x", "starts", "ends", "axes", "steps"], {"x": [5, 6, 7]},
       {"starts": ints(5), "ends": ints(-7), "axes": ints(1), "steps": ints(-2)}),
    op("Slice-negative-step-to-start", "Slice", ["x", "starts", "ends", "axes", "steps"], {"x": [5, 6, 7]},
       {"starts": ints(-1, 4), "ends": ints(-INT64_MAX, 0), "axes": ints(-1, 0), "steps": ints(-3, -1)}),
    op("Slice-no-axes", "Slice", ["x", "starts", "ends"], {"x": [5, 6]}, {"starts": ints(1, 2), "ends": ints(4, 100)}),
    op("Pad-constant-begin-end", "Pad", ["x", "pads"], X234, {"pads": ints(0, 1, 2, 1, 0, 3)}),
    op("Pad-constant-value", "Pad", ["x", "pads", "value"], X234, {"pads": ints(1, 0, 0, 0, 2, 1),
                                                                   "value": np.array(0.5)}),
    op("Pad-opset18-axes", "Pad", ["x", "pads", "", "axes"], X234, {"pads": ints(1, 2, 0, 1), "axes": ints(1, -1)},
       opset=18),
    # amounts computed at run time (Longformer pads by its number of global tokens): from a value of x
    # (1 whatever x is, as onnxruntime computes it: never folded), with a negative amount that crops
    nodes("Pad-run-time-amounts", [
        N("ReduceMax", ["x"], ["m"], keepdims=0),
        N("Less", ["m", "big"], ["small"]),
        N("Cast", ["small"], ["one"], to=TensorProto.INT64),
        N("Reshape", ["one", "shape1"], ["s1"]),
        N("Concat", ["zeros2", "s1", "zeros2", "crop"], ["pads"], axis=0),
        N("Pad", ["x", "pads"], ["y"])], X234,
        {"big": np.array(1e9), "shape1": ints(1), "zeros2": ints(0, 0), "crop": ints(-1)}),
    nodes("Pad-opset18-run-time-amounts-axes", [
        N("ReduceMax", ["x"], ["m"], keepdims=0),
        N("Less", ["m", "big"], ["small"]),
        N("Cast", ["small"], ["one"], to=TensorProto.INT64),
        N("Reshape", ["one", "shape1"], ["s1"]),
        N("Add", ["s1", "s1"], ["s2"]),
        N("Concat", ["s2", "minus", "s1", "s2"], ["pads"], axis=0),
        N("Pad", ["x", "pads", "", "axes"], ["y"])], X234,
        {"big": np.array(1e9), "shape1": ints(1), "minus": ints(-1), "axes": ints(1, -1)}, opset=18),
    # the border modes copy input elements (TResNet's anti-aliasing blur, ReflectionPad2d, ReplicationPad2d)
    op("Pad-reflect", "Pad", ["x", "pads"], X234, {"pads": ints(0, 2, 1, 0, 1, 3)}, mode="reflect"),
    op("Pad-edge", "Pad", ["x", "pads"], X234, {"pads": ints(1, 2, 0, 0, 3, 2)}, mode="edge"),
    op("Pad-reflect-value-input", "Pad", ["x", "pads", "value"], X234, {"pads": ints(0, 1, 2, 0, 1, 1),
                                                                         "value": np.array(0.5)}, mode="reflect"),
    op("Pad-opset18-axes-reflect", "Pad", ["x", "pads", "", "axes"], {"x": [2, 3, 5, 4]},
       {"pads": ints(2, 1, 3, 1), "axes": ints(-2, 3)}, opset=18, mode="reflect"),
    op("Pad-opset19-wrap", "Pad", ["x", "pads", "", "axes"], X234, {"pads": ints(2, 1, 1, 3), "axes": ints(1, 2)},
       opset=19, mode="wrap"),
    op("Gather-duplicates-axis1", "Gather", ["x", "idx"], {"x": [3, 5, 4]}, {"idx": ints(0, 4, 4, -1, 2, 0)},
       axis=1),
    op("Gather-2d-indices-axis0", "Gather", ["x", "idx"], {"x": [4, 3]}, {"idx": np.array([[1, 1], [3, 0]])}),
    op("Gather-scalar-index", "Gather", ["x", "idx"], X234, {"idx": np.array(2, dtype=np.int64)}, axis=2),
    op("Expand-3x1", "Expand", ["x", "shape"], {"x": [3, 1]}, {"shape": ints(2, 3, 4)}),
    op("Expand-rank-up", "Expand", ["x", "shape"], {"x": [4]}, {"shape": ints(3, 1)}),
    op("Tile", "Tile", ["x", "reps"], X234, {"reps": ints(2, 1, 3)}),
    op("DepthToSpace-DCR", "DepthToSpace", ["x"], {"x": [2, 8, 2, 3]}, blocksize=2),
    op("DepthToSpace-CRD", "DepthToSpace", ["x"], {"x": [2, 8, 2, 3]}, blocksize=2, mode="CRD"),
    op("DepthToSpace-opset28-CRD", "DepthToSpace", ["x"], {"x": [1, 18, 2, 2]}, opset=28, blocksize=3,
       mode="CRD"),
    op("SpaceToDepth", "SpaceToDepth", ["x"], {"x": [2, 3, 4, 6]}, blocksize=2),
    op("SpaceToDepth-opset28", "SpaceToDepth", ["x"], {"x": [1, 2, 6, 3]}, opset=28, blocksize=3),
    op("GatherElements-duplicates-axis1", "GatherElements", ["x", "idx"], {"x": [3, 4]},
       {"idx": np.array([[0, 3, 3], [1, 1, -1], [2, 0, 2]])}, axis=1),
    op("GatherElements-axis0", "GatherElements", ["x", "idx"], X234,
       {"idx": np.array([[[1, 0, 1, 1]], [[0, 0, 1, 0]]])}),
    op("GatherND", "GatherND", ["x", "idx"], X234, {"idx": np.array([[0, 2], [1, 0], [0, 2]])}),
    op("GatherND-batch-dims1", "GatherND", ["x", "idx"], X234,
       {"idx": np.array([[[2, 1], [0, 3]], [[1, 1], [2, 0]]])}, batch_dims=1),
    op("GatherND-full-index", "GatherND", ["x", "idx"], X234,
       {"idx": np.array([[1, 2, 3], [1, 2, 3], [0, 0, 1]])}),
    op("Where-both-active-broadcast", "Where", ["cond", "x", "x1"], {"x": [2, 3, 4], "x1": [3, 1]},
       {"cond": W.random((3, 4)) > 0.5}),
    # GPT-2's causal mask: the scores where the mask holds, a large negative constant elsewhere
    op("Where-causal-mask", "Where", ["cond", "x", "lo"], {"x": [2, 4, 4]},
       {"cond": np.tril(np.ones((4, 4), dtype=bool)), "lo": np.array(-1e4)}),
    op("Where-const-left", "Where", ["cond", "c", "x"], X234, {"cond": W.random(4) > 0.5, "c": weight(3, 1)}),
    op("Cast-to-double", "Cast", ["x"], X234, to=TensorProto.DOUBLE),
    op("Cast-opset19-to-double", "Cast", ["x"], X234, opset=19, to=TensorProto.DOUBLE),
    op("Cast-opset21-to-double", "Cast", ["x"], X234, opset=21, to=TensorProto.DOUBLE),
    op("Cast-opset25-to-double", "Cast", ["x"], X234, opset=25, to=TensorProto.DOUBLE),
    op("Cast-opset28-to-double", "Cast", ["x"], X234, opset=28, to=TensorProto.DOUBLE),
    # found by the ONNX backend suite (tests/test_onnx_backend.py)
    op("SpaceToDepth-opset28-CRD", "SpaceToDepth", ["x"], {"x": [1, 2, 6, 4]}, opset=28, blocksize=2, mode="CRD"),
    op("Pad-activation-value", "Pad", ["x", "pads", "x1"], {"x": [2, 3, 4], "x1": []},
       {"pads": ints(1, 0, 0, 0, 2, 1)}),
    op("Dropout-training-mode-false", "Dropout", ["x", "r", "t"], X234, {"r": np.array(0.3), "t": np.array(False)}),
    op("Dropout-training-ratio-0", "Dropout", ["x", "r", "t"], X234, {"r": np.array(0.0), "t": np.array(True)}),
    # negative amounts crop (RWKV's time shift, ZeroPad2d((0, 0, 1, -1))), mixed with padding
    op("Pad-crop-and-pad", "Pad", ["x", "pads"], X234, {"pads": ints(0, 1, -1, 0, -1, 2)}),
    op("Pad-opset18-axes-crop", "Pad", ["x", "pads", "", "axes"], X234, {"pads": ints(-1, 1, 0, -2),
                                                                          "axes": ints(1, -1)}, opset=18),
    op("Pad-crop-activation-value", "Pad", ["x", "pads", "x1"], {"x": [2, 3, 4], "x1": []},
       {"pads": ints(0, -1, 1, 0, 0, -1)}),
    # FNet's token mixing (torch.fft.fftn(x).real), spectrogram front ends (rfft: onesided)
    op("DFT-real-axis1", "DFT", ["x"], {"x": [2, 5, 3, 1]}),
    op("DFT-complex-axis2-inverse", "DFT", ["x"], {"x": [2, 3, 4, 2]}, axis=2, inverse=1),
    op("DFT-real-onesided-even", "DFT", ["x"], {"x": [2, 6, 1]}, onesided=1),
    op("DFT-real-onesided-odd", "DFT", ["x"], {"x": [2, 3, 5, 1]}, axis=2, onesided=1),
    op("DFT-dft-length-equal", "DFT", ["x", "len"], {"x": [2, 4, 2]}, {"len": np.array(4)}),
    op("DFT-opset20-axis-input", "DFT", ["x", "", "axis"], {"x": [2, 5, 3, 2]}, {"axis": np.array(-3)},
       opset=20),
    op("DFT-opset20-default-axis-real", "DFT", ["x"], {"x": [2, 3, 4, 1]}, opset=20),
    nodes("DFT-fnet-real-part", [N("DFT", ["x"], ["f"], axis=1), N("DFT", ["f"], ["ff"], axis=2),
                                 N("Slice", ["ff", "zero", "one", "last"], ["y"])],
          {"x": [2, 4, 3, 1]}, {"zero": ints(0), "one": ints(1), "last": ints(-1)}),
    # torch's fold (MobileViTV2 folds its patches back): non-overlapping, overlapping, padded, dilated
    op("Col2Im-patches", "Col2Im", ["x", "image", "block"], {"x": [2, 12, 6]},
       {"image": ints(4, 6), "block": ints(2, 2)}, opset=18, strides=[2, 2]),
    op("Col2Im-overlap", "Col2Im", ["x", "image", "block"], {"x": [2, 18, 9]},
       {"image": ints(4, 5), "block": ints(3, 3)}, opset=18, pads=[1, 0, 0, 0]),
    op("Col2Im-dilated-strided", "Col2Im", ["x", "image", "block"], {"x": [1, 8, 9]},
       {"image": ints(5, 6), "block": ints(2, 2)}, opset=18, dilations=[2, 1], strides=[1, 2],
       pads=[0, 0, 0, 1]),
    # a mixture-of-experts router (Mixtral, Qwen2-MoE): the k largest gate scores weigh the experts
    nodes("TopK-axis1", [N("TopK", ["x", "k"], ["y", "i"], axis=1)], X234, {"k": ints(2)}, sample=distinct),
    nodes("TopK-last-axis-k1", [N("TopK", ["x", "k"], ["y", "i"])], X234, {"k": ints(1)}, sample=distinct),
    nodes("TopK-opset11-smallest-unsorted-negative-axis", [N("TopK", ["x", "k"], ["y", "i"], axis=-2,
                                                             largest=0, sorted=0)],
          X234, {"k": ints(2)}, opset=11, sample=distinct),
    nodes("TopK-opset10", [N("TopK", ["x", "k"], ["y", "i"], axis=0)], X234, {"k": ints(1)}, opset=10,
          sample=distinct),
    nodes("TopK-opset1-k-attribute", [N("TopK", ["x"], ["y", "i"], k=3)], X234, opset=1, sample=distinct),
    nodes("TopK-values-and-indices-used", [N("TopK", ["x", "k"], ["v", "i"], axis=-1),
                                           N("GatherElements", ["x", "i"], ["g"], axis=-1),
                                           N("Mul", ["v", "g"], ["y"])],
          X234, {"k": ints(2)}, sample=distinct),
]

# routes of rulegraph/backward/routes.py: k and the sequence lengths as constants, a constant condition,
# crop and pad per axis, MaxUnpool of MaxPool's own indices (SegNet), with and without output_shape
MORE_ROUTE = [
    op("Trilu-upper", "Trilu", ["x"], {"x": [2, 4, 5]}, opset=14),
    op("Trilu-lower-k-negative", "Trilu", ["x", "k"], {"x": [2, 4, 5]}, {"k": np.array(-1)}, opset=14,
       upper=0),
    op("Trilu-upper-k2", "Trilu", ["x", "k"], {"x": [3, 5]}, {"k": np.array(2)}, opset=14),
    op("ReverseSequence-time-major", "ReverseSequence", ["x", "lens"], {"x": [4, 3, 2]},
       {"lens": ints(4, 1, 3)}, opset=10, batch_axis=1, time_axis=0),
    op("ReverseSequence-batch-major", "ReverseSequence", ["x", "lens"], {"x": [3, 5, 2]},
       {"lens": ints(2, 5, 0)}, opset=10, batch_axis=0, time_axis=1),
    op("ReverseSequence-opset28", "ReverseSequence", ["x", "lens"], {"x": [2, 4]}, {"lens": ints(3, 4)},
       opset=28),
    op("Compress-axis1", "Compress", ["x", "cond"], X234, {"cond": np.array([True, False, True])}, axis=1),
    op("Compress-flat-short-condition", "Compress", ["x", "cond"], X234,
       {"cond": np.array([False, True, True, False, True])}),
    op("Compress-opset11-negative-axis", "Compress", ["x", "cond"], X234,
       {"cond": np.array([0, 1, 1, 0]) > 0}, opset=11, axis=-1),
    op("Compress-opset28-axis0", "Compress", ["x", "cond"], X234, {"cond": np.array([False, True])}, opset=28,
       axis=0),
    op("CenterCropPad-crop-and-pad", "CenterCropPad", ["x", "shape"], {"x": [2, 5, 4]},
       {"shape": ints(2, 2, 7)}, opset=18),
    op("CenterCropPad-odd-differences", "CenterCropPad", ["x", "shape"], {"x": [2, 6, 3]},
       {"shape": ints(3, 6)}, opset=18, axes=[1, 2]),
    op("CenterCropPad-negative-axes-hwc", "CenterCropPad", ["x", "shape"], {"x": [5, 4, 3]},
       {"shape": ints(6, 2)}, opset=18, axes=[-3, -2]),
    nodes("MaxUnpool-of-MaxPool", [N("MaxPool", ["x"], ["p", "i"], kernel_shape=[2, 2], strides=[2, 2]),
                                   N("MaxUnpool", ["p", "i"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
          {"x": [2, 3, 4, 6]}, sample=distinct),
    # onnx infers no shape from an output_shape input: a Reshape to it gives the output its shape
    nodes("MaxUnpool-output-shape", [N("MaxPool", ["x"], ["p", "i"], kernel_shape=[2, 2], strides=[2, 2]),
                                     N("MaxUnpool", ["p", "i", "size"], ["u"], kernel_shape=[2, 2],
                                       strides=[2, 2]),
                                     N("Reshape", ["u", "size"], ["y"])],
          {"x": [1, 2, 5, 5]}, {"size": ints(1, 2, 5, 5)}, sample=distinct),
    nodes("MaxUnpool-opset22-pads", [N("MaxPool", ["x"], ["p", "i"], kernel_shape=[3, 3], strides=[2, 2],
                                       pads=[1, 1, 1, 1]),
                                     N("MaxUnpool", ["p", "i", "size"], ["u"], kernel_shape=[3, 3],
                                       strides=[2, 2], pads=[1, 1, 1, 1]),
                                     N("Reshape", ["u", "size"], ["y"])],
          {"x": [1, 2, 5, 6]}, {"size": ints(1, 2, 6, 7)}, opset=22, sample=distinct),
    op("MaxUnpool-constant-indices", "MaxUnpool", ["x", "i"], {"x": [1, 2, 2, 2]},
       {"i": np.array([[[[1, 2], [9, 14]], [[16, 18], [27, 31]]]])}, kernel_shape=[2, 2], strides=[2, 2]),
    op("Hardmax", "Hardmax", ["x"], X234, sample=distinct, axis=1),
    op("Hardmax-opset11", "Hardmax", ["x"], X234, opset=11, sample=distinct),
]

# GridSample with a constant grid (linear in X): every mode under each padding, both opset signatures,
# align_corners, a volumetric input; the grid reaches past the borders (±1.3)
GW = np.random.default_rng(16)


def grid(*shape) -> np.ndarray:
    return GW.uniform(-1.3, 1.3, shape)


def _grid_rows() -> list[Case]:
    rows = []
    for opset, mode, padding, corners in [
            (16, "bilinear", "zeros", 0), (16, "bilinear", "border", 1), (16, "bilinear", "reflection", 0),
            (16, "nearest", "reflection", 1), (16, "bicubic", "zeros", 1), (16, "bicubic", "border", 0),
            (20, "linear", "reflection", 1), (20, "nearest", "zeros", 0), (20, "cubic", "reflection", 0),
            (22, "cubic", "reflection", 1), (22, "nearest", "border", 0), (22, "linear", "zeros", 1)]:
        rows.append(op(f"GridSample-opset{opset}-{mode}-{padding}-corners{corners}", "GridSample",
                       ["x", "grid"], {"x": [2, 3, 4, 5]}, {"grid": grid(2, 3, 6, 2)}, opset=opset, mode=mode,
                       padding_mode=padding, align_corners=corners))
    rows.append(op("GridSample-opset16-defaults", "GridSample", ["x", "grid"], {"x": [1, 2, 5, 4]},
                   {"grid": grid(1, 4, 3, 2)}, opset=16))
    for mode, padding in [("linear", "border"), ("nearest", "reflection"), ("cubic", "zeros")]:
        rows.append(op(f"GridSample-opset20-volumetric-{mode}-{padding}", "GridSample", ["x", "grid"],
                       {"x": [1, 2, 3, 4, 5]}, {"grid": grid(1, 2, 3, 4, 3)}, opset=20, mode=mode,
                       padding_mode=padding))
    return rows


SAMPLING = _grid_rows() + [
    # a spatial transformer's grid from its θ [N, 2, 3] (2-D) or [N, 3, 4] (volumetric)
    op("AffineGrid-2d", "AffineGrid", ["x", "size"], {"x": [2, 2, 3]}, {"size": ints(2, 3, 4, 5)}, opset=20),
    op("AffineGrid-2d-align-corners", "AffineGrid", ["x", "size"], {"x": [2, 2, 3]},
       {"size": ints(2, 1, 3, 6)}, opset=20, align_corners=1),
    op("AffineGrid-3d", "AffineGrid", ["x", "size"], {"x": [1, 3, 4]}, {"size": ints(1, 2, 3, 4, 2)},
       opset=20),
    op("AffineGrid-3d-align-corners", "AffineGrid", ["x", "size"], {"x": [2, 3, 4]},
       {"size": ints(2, 1, 2, 3, 4)}, opset=20, align_corners=1),
    nodes("AffineGrid-then-GridSample-constant-theta", [N("AffineGrid", ["theta", "size"], ["grid"]),
                                                        N("GridSample", ["x", "grid"], ["y"])],
          {"x": [2, 3, 5, 6]}, {"theta": np.array([[[0.9, -0.2, 0.1], [0.3, 1.1, -0.2]]] * 2),
                                "size": ints(2, 3, 4, 4)}, opset=20),
]

# `distinct`: values of all operands are distinct, so the maximum is never a tie
MAX = [
    op("Min-3-broadcast", "Min", ["x", "x1", "x2"], {"x": [2, 3, 4], "x1": [3, 1], "x2": [4]}, sample=distinct),
    op("Min-with-const", "Min", ["x", "c"], X234, {"c": np.linspace(-0.51, 0.49, 4)}, sample=distinct),
    op("Mean-3-broadcast", "Mean", ["x", "x1", "x2"], {"x": [2, 3, 4], "x1": [4], "x2": [3, 1]}),
    op("Mean-with-const", "Mean", ["x", "c"], X234, {"c": weight(3, 1)}),
    op("Max-3-broadcast", "Max", ["x", "x1", "x2"], {"x": [2, 3, 4], "x1": [3, 1], "x2": [4]}, sample=distinct),
    op("Max-same-shape", "Max", ["x", "x1"], {"x": [2, 3, 4], "x1": [2, 3, 4]}, sample=distinct),
    op("Max-with-const", "Max", ["x", "c"], X234, {"c": np.linspace(-0.51, 0.49, 4)}, sample=distinct),
]

NORMALIZING = [
    op("Softmax-axis1", "Softmax", ["x"], X234, axis=1),
    op("Softmax-axis-1", "Softmax", ["x"], X234, axis=-1),
    op("LogSoftmax-axis1", "LogSoftmax", ["x"], X234, axis=1),
    op("LogSoftmax-axis-1", "LogSoftmax", ["x"], X234, axis=-1),
]

CASES = (GEMM + MATMUL + CONV + UPSAMPLING + POOL + REDUCE + MORE_REDUCE + BN + ARITHMETIC + ELEMENTWISE
         + MORE_ELEMENTWISE + ROUTE + MORE_ROUTE + SAMPLING + MAX + NORMALIZING)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_vjp_matches_finite_differences(case: Case):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    feeds = case.sample(rng, _shapes(case.model))
    check_vjp(case.model, feeds, rng)


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_scalar_start_tensor():
    """A model whose output is a scalar (no batch axis) still compiles and differentiates."""
    model = one_node("MatMul", ["x", "x1"], {"x": [4], "x1": [4]})
    rng = np.random.default_rng(0)
    check_vjp(model, {"x": rng.standard_normal(4), "x1": rng.standard_normal(4)}, rng)


# unsupported ops: a ModelError naming the node -----------------------------------------------------

UNSUPPORTED = [
    op("Conv-activation-weights", "Conv", ["x", "x1"], {"x": [1, 2, 5, 5], "x1": [3, 2, 3, 3]}),
    op("Dropout-training-mode", "Dropout", ["x", "r", "t"], X234, {"r": np.array(0.3), "t": np.array(True)}),
    op("Dropout-training-mode-default-ratio", "Dropout", ["x", "", "t"], X234, {"t": np.array(True)}),
    op("GridSample-activation-grid", "GridSample", ["x", "x1"], {"x": [1, 2, 4, 5], "x1": [1, 3, 3, 2]},
       opset=16),
]


@pytest.mark.parametrize("case", [c.param() for c in UNSUPPORTED])
def test_unsupported_raises_model_error(case: Case):
    node = case.model.graph.node[0]
    with pytest.raises(ModelError, match=f"'{node.name}' \\({node.op_type}\\)"):
        compile_seed(case.model)


# symbolic shapes on onnxruntime (float32) against the float64 reference --------------------------


@dataclass
class SymCase:
    id: str
    op_type: str
    args: list
    symbolic: dict          # input name -> shape with symbols (the onnxruntime model)
    concrete: dict          # input name -> the shape fed
    consts: dict
    attrs: dict
    sample: Callable = NORMAL

    def param(self):
        return pytest.param(self, id=self.id)

    def model(self, shapes, elem, dtype) -> onnx.ModelProto:
        consts = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in self.consts.items()}
        return one_node(self.op_type, self.args, shapes, consts, elem=elem, **self.attrs)


SYMBOLIC = [
    SymCase("Conv-stride2-uncovered-tail", "Conv", ["x", "w", "b"], {"x": ["N", 2, "H", "W"]},
            {"x": [2, 2, 8, 9]}, {"w": weight(3, 2, 3, 3), "b": weight(3)}, {"strides": [2, 2]}),
    SymCase("Conv-stride3-end-pad-mixed", "Conv", ["x", "w"], {"x": ["N", 2, "H", "W"]},
            {"x": [2, 2, 9, 10]}, {"w": weight(3, 2, 2, 2)}, {"strides": [3, 3], "pads": [0, 0, 1, 1]}),
    SymCase("Conv-stride2-odd-end-pads", "Conv", ["x", "w"], {"x": ["N", 2, "H", "W"]},
            {"x": [3, 2, 9, 7]}, {"w": weight(3, 2, 3, 3)}, {"strides": [2, 2], "pads": [1, 0, 2, 2]}),
    SymCase("Conv-stride1", "Conv", ["x", "w"], {"x": ["N", 2, "H", "W"]},
            {"x": [2, 2, 6, 5]}, {"w": weight(3, 2, 3, 3)}, {"pads": [1, 1, 1, 1]}),
    SymCase("Conv-groups2-stride2", "Conv", ["x", "w"], {"x": ["N", 4, "H", "W"]},
            {"x": [2, 4, 7, 6]}, {"w": weight(6, 2, 3, 3)}, {"group": 2, "strides": [2, 2]}),
    SymCase("Conv-depthwise-stride2", "Conv", ["x", "w"], {"x": ["N", 3, "H", "W"]},
            {"x": [2, 3, 7, 7]}, {"w": weight(6, 1, 3, 3)}, {"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    SymCase("MaxPool-k3-s1", "MaxPool", ["x"], {"x": ["N", 2, "H", "W"]}, {"x": [2, 2, 6, 5]}, {},
            {"kernel_shape": [3, 3]}, sample=distinct),
    SymCase("MaxPool-k3-s2-pads", "MaxPool", ["x"], {"x": ["N", 2, "H", "W"]}, {"x": [2, 2, 7, 8]}, {},
            {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, sample=distinct),
    SymCase("AveragePool-exclude-pad", "AveragePool", ["x"], {"x": ["N", 2, "H", "W"]}, {"x": [2, 2, 7, 8]}, {},
            {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 0}),
    SymCase("AveragePool-ceil-include-pad", "AveragePool", ["x"], {"x": ["N", 2, "H", "W"]}, {"x": [2, 2, 6, 7]},
            {}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1,
                 "ceil_mode": 1}),
    SymCase("AveragePool-ceil-exclude-pad", "AveragePool", ["x"], {"x": ["N", 2, "H", "W"]}, {"x": [2, 2, 6, 7]},
            {}, {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1}),
    SymCase("Slice-steps", "Slice", ["x", "starts", "ends", "axes", "steps"], {"x": ["N", 3, "H", "W"]},
            {"x": [2, 3, 7, 6]}, {"starts": ints(1, -1), "ends": ints(INT64_MAX, -INT64_MAX),
                                  "axes": ints(2, 3), "steps": ints(2, -2)}, {}),
    SymCase("Concat-symbolic-axis", "Concat", ["x", "x1", "x2"],
            {"x": ["N", 2, "H", "W"], "x1": ["N", 2, "H1", "W"], "x2": ["N", 2, "H2", "W"]},
            {"x": [2, 2, 3, 4], "x1": [2, 2, 1, 4], "x2": [2, 2, 2, 4]}, {}, {"axis": 2}),
    SymCase("Mul-activations-broadcast", "Mul", ["x", "x1"], {"x": ["N", 3, "W"], "x1": ["N", 3, 1]},
            {"x": [2, 3, 4], "x1": [2, 3, 1]}, {}, {}),
    SymCase("ReduceMean-symbolic-axes", "ReduceMean", ["x"], {"x": ["N", 2, "H", "W"]}, {"x": [2, 2, 3, 5]}, {},
            {"axes": [2, 3], "keepdims": 0}),
    SymCase("GlobalAveragePool", "GlobalAveragePool", ["x"], {"x": ["N", 2, "H", "W"]}, {"x": [2, 2, 3, 5]}, {},
            {}),
    SymCase("GlobalMaxPool", "GlobalMaxPool", ["x"], {"x": ["N", 2, "H", "W"]}, {"x": [2, 2, 3, 5]}, {}, {},
            sample=distinct),
    SymCase("Gemm-transB-C", "Gemm", ["x", "w", "c"], {"x": ["N", 4]}, {"x": [3, 4]},
            {"w": weight(5, 4), "c": weight(5)}, {"transB": 1, "alpha": 0.7}),
    SymCase("DepthToSpace-DCR", "DepthToSpace", ["x"], {"x": ["N", 8, "H", "W"]}, {"x": [2, 8, 3, 2]}, {},
            {"blocksize": 2}),
    SymCase("DepthToSpace-CRD", "DepthToSpace", ["x"], {"x": ["N", "C", "H", "W"]}, {"x": [2, 18, 2, 3]}, {},
            {"blocksize": 3, "mode": "CRD"}),
    SymCase("SpaceToDepth", "SpaceToDepth", ["x"], {"x": ["N", 3, "H", "W"]}, {"x": [2, 3, 4, 6]}, {},
            {"blocksize": 2}),
    SymCase("Tile", "Tile", ["x", "reps"], {"x": ["N", 3, "W"]}, {"x": [2, 3, 4]}, {"reps": ints(1, 2, 3)},
            {}),
    SymCase("GatherND-batch-dims1", "GatherND", ["x", "idx"], {"x": [2, 3, "W"]}, {"x": [2, 3, 4]},
            {"idx": np.array([[[2, 1], [0, 3]], [[1, 1], [2, 0]]])}, {"batch_dims": 1}),
    SymCase("CumSum-exclusive-reverse", "CumSum", ["x", "axis"], {"x": ["N", 3, "W"]}, {"x": [2, 3, 5]},
            {"axis": np.array(2, dtype=np.int64)}, {"exclusive": 1, "reverse": 1}),
]


@pytest.mark.parametrize("case", [c.param() for c in SYMBOLIC])
def test_symbolic_shapes_on_onnxruntime(case: SymCase):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    feeds = {k: v.astype(np.float32) for k, v in case.sample(rng, case.concrete).items()}
    reference = case.model(case.concrete, TensorProto.DOUBLE, np.float64)
    feeds64 = {k: v.astype(np.float64) for k, v in feeds.items()}
    y = run(reference, feeds64)["y"]
    seed = rng.standard_normal(y.shape).astype(np.float32)
    want = check_vjp(reference, feeds64, rng, seed=seed.astype(np.float64))
    explainer = Explainer(case.model(case.symbolic, TensorProto.FLOAT, np.float32), GRADIENT)
    symbolic_dims = [d for d in explainer.graph.shapes["x"] if isinstance(d, str)]
    assert symbolic_dims, "the model must keep symbolic dims"
    got = explainer.explain(feeds, target=seed).saliency
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4 * np.abs(value).max(), err_msg=name)


# the window sums of max ops (used by the radial rule) -------------------------------------------

RADIAL = RuleSet((Binding(Selector("kind", "max"), RuleCall("radial", {}), Location("test", 1, 1)),),
                 quantity="relevance")

WINDOWED = [
    op("MaxPool-k3-s1", "MaxPool", ["x"], {"x": [1, 2, 6, 6]}, kernel_shape=[3, 3]),
    op("MaxPool-k3-s2-pads", "MaxPool", ["x"], {"x": [2, 2, 7, 7]}, kernel_shape=[3, 3], strides=[2, 2],
       pads=[1, 1, 1, 1]),
    op("MaxPool-ceil-mode-pads", "MaxPool", ["x"], {"x": [1, 2, 6, 7]}, kernel_shape=[3, 2], strides=[2, 2],
       pads=[1, 0, 1, 1], ceil_mode=1),
    op("GlobalMaxPool", "GlobalMaxPool", ["x"], {"x": [2, 3, 4, 5]}),
    op("Max-3-broadcast", "Max", ["x", "x1", "x2"], {"x": [2, 3, 4], "x1": [3, 1], "x2": [4]}),
]


@pytest.mark.parametrize("case", [c.param() for c in WINDOWED])
def test_window_sum_conserves_under_radial(case: Case):
    """Radial max with positive inputs is exact: Σ a(x) = Σ a(y) only if every window sum is right."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    feeds = {k: 0.1 + np.abs(v) for k, v in distinct(rng, _shapes(case.model)).items()}
    y = run(case.model, feeds)["y"]
    seed = rng.standard_normal(y.shape)
    compiled = compile_seed(case.model, RADIAL)
    names = list(compiled.attribution.values())
    got = run(compiled.model, {**feeds, SEED: seed}, names)
    total = sum(float(v.sum()) for v in got.values())
    want = float(np.sum(y * seed))   # relevance starts at y ⊙ seed
    assert total == pytest.approx(want, rel=1e-9, abs=1e-9)


# a rule that blames f(0) on an op whose f(0) is infinite: refused by name ---------------------------

SLOPE = RuleSet((Binding(Selector("kind", "nonlinear"), RuleCall("slope", {}), Location("test", 1, 1)),),
                quantity="importance")


@pytest.mark.parametrize("case", [c.param() for c in [
    op("Log", "Log", ["x"], X234),
    op("Reciprocal", "Reciprocal", ["x"], X234),
    op("Pow-negative-exponent", "Pow", ["x", "e"], X234, {"e": np.array(-1.5)}),
]])
def test_slope_refuses_an_infinite_value_at_zero(case: Case):
    node = case.model.graph.node[0]
    want = f"'{node.name}' \\({node.op_type}\\).*f\\(0\\) = -?inf is not finite"
    with pytest.raises(ModelError, match=want):
        compile_seed(case.model, SLOPE)


# pinned points the finite differences keep away from ----------------------------------------------


def _others_product(x: np.ndarray) -> np.ndarray:
    """Π_{j≠i} x_j along the last axis, by deleting each element in turn (numpy, float64)."""
    return np.stack([np.prod(np.delete(x, i, axis=-1), axis=-1) for i in range(x.shape[-1])], axis=-1)


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_prod_with_zeros_is_the_product_of_the_others(keepdims):
    model = one_node("ReduceProd", ["x"], {"x": list(PROD_ZEROS.shape)}, axes=[1], keepdims=keepdims)
    seed = np.array([0.7, -1.2, 0.4, 1.9]).reshape([4, 1] if keepdims else [4])
    got = reference_vjp(model, {"x": PROD_ZEROS}, seed)["x"]
    np.testing.assert_allclose(got, seed.reshape(4, 1) * _others_product(PROD_ZEROS), rtol=1e-12, atol=0)


TIES = np.array([[0.5, -1.0, 2.0], [0.5, -1.0, 3.0]])


@pytest.mark.parametrize("op_type, args, feeds, want", [
    # equal operands: the first takes the cotangent (autograd's rule, as for Max)
    ("Min", ["x", "x1"], {"x": TIES[0], "x1": TIES[0]}, {"x": np.ones(3), "x1": np.zeros(3)}),
    ("Min", ["x", "x1"], {"x": TIES[1], "x1": TIES[0]}, {"x": np.array([1.0, 1.0, 0.0]),
                                                         "x1": np.array([0.0, 0.0, 1.0])}),
    ("Max", ["x", "x1"], {"x": TIES[0], "x1": TIES[1]}, {"x": np.array([1.0, 1.0, 0.0]),
                                                         "x1": np.array([0.0, 0.0, 1.0])}),
])
def test_min_max_ties_go_to_the_first_operand(op_type, args, feeds, want):
    model = one_node(op_type, args, {k: [3] for k in feeds})
    got = reference_vjp(model, feeds, np.ones(3))
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("axes, x, want", [
    ([0, 1], [[1.0, 3.0], [3.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]),
    ([1, 0], [[2.0, 0.0], [2.0, 2.0]], [[1.0, 0.0], [0.0, 0.0]]),
])
def test_reduce_max_over_several_axes_ties_go_to_the_first_in_row_major_order(axes, x, want):
    model = one_node("ReduceMax", ["x"], {"x": [2, 2]}, axes=axes)
    got = reference_vjp(model, {"x": np.array(x)}, np.ones((1, 1)))["x"]
    np.testing.assert_array_equal(got, np.array(want))


@pytest.mark.parametrize("axis, x, want", [
    # a tie along the axis: the first minimum takes it
    (1, np.array([[0.3, -0.2, -0.2], [1.0, 1.0, 2.0]]), np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])),
    (0, np.array([[0.3, -0.2, 5.0], [0.3, -0.4, 5.0]]), np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
])
def test_reduce_min_ties_go_to_the_first_index(axis, x, want):
    model = one_node("ReduceMin", ["x"], {"x": [2, 3]}, axes=[axis], keepdims=0)
    got = reference_vjp(model, {"x": x}, np.ones(x.shape[1 - axis]))["x"]
    np.testing.assert_array_equal(got, want)


def test_mean_bias_is_its_constant_share():
    """``normalized`` with ε → 0 on Mean(x, c): x and the constant c each take their half of y ⊙ seed."""
    c = weight(3, 1)
    model = one_node("Mean", ["x", "c"], X234, {"c": c})
    rules = RuleSet((Binding(Selector("kind", "linear"), RuleCall("normalized", {"eps": 1e-12}),
                             Location("test", 1, 1)),), quantity="relevance", bias="total")
    compiled = compile_seed(model, rules)
    rng = np.random.default_rng(5)
    x, seed = rng.standard_normal([2, 3, 4]), rng.standard_normal([2, 3, 4])
    got = run(compiled.model, {"x": x, SEED: seed}, [compiled.attribution["x"], compiled.bias_total])
    # a(y) = y ⊙ seed, s = a(y)/y = seed: R(x) = x ⊙ seed/2, the bias share c ⊙ seed/2
    np.testing.assert_allclose(got[compiled.attribution["x"]], x * seed / 2, rtol=1e-9)
    assert float(np.sum(got[compiled.bias_total])) == pytest.approx(float(np.sum(c * seed / 2)), rel=1e-9)


@pytest.mark.parametrize("args, inputs, consts, kind", [
    (["x", "e"], X234, {"e": np.array(2.0)}, "nonlinear"),
    (["c", "x"], X234, {"c": np.array(2.0)}, "normalizing"),
    (["x", "x1"], {"x": [2, 3, 4], "x1": [4]}, {}, "normalizing"),
])
def test_pow_is_nonlinear_in_its_base_only(args, inputs, consts, kind):
    graph = compile_seed(one_node("Pow", args, inputs, consts)).graph
    (node,) = [n for n in graph.nodes if n.op_type == "Pow"]
    assert node.kind == kind


@pytest.mark.parametrize("op_type, args, inputs, consts, kind", [
    ("Clip", ["x", "lo", "hi"], X234, {"lo": np.array(-0.5), "hi": np.array(0.5)}, "nonlinear"),
    ("Clip", ["x", "x1", "hi"], {"x": [2, 3, 4], "x1": []}, {"hi": np.array(0.5)}, "normalizing"),
    ("Pad", ["x", "pads"], X234, {"pads": ints(0, 1, 0, 0, 1, 0)}, "route"),
    ("Pad", ["x", "pads", "x1"], {"x": [2, 3, 4], "x1": []}, {"pads": ints(0, 1, 0, 0, 1, 0)}, "normalizing"),
])
def test_activation_bounds_and_pad_values_make_the_node_normalizing(op_type, args, inputs, consts, kind):
    """Rules of Clip's and Pad's kinds read their first input only; an activation bound or pad value
    makes the node normalizing (no rule assumed), as an activation exponent does for Pow."""
    graph = compile_seed(one_node(op_type, args, inputs, consts)).graph
    (node,) = [n for n in graph.nodes if n.op_type == op_type]
    assert node.kind == kind


def test_a_nonlinear_rule_is_not_assumed_for_an_activation_exponent():
    """``nonlinear -> ignore`` would give 2^x's relevance to the constant base: the node is normalizing,
    which the rule set does not cover, and the model is refused naming it."""
    from rulegraph import CoverageError

    model = one_node("Pow", ["c", "x"], X234, {"c": np.array(2.0)})
    rules = RuleSet((Binding(Selector("kind", "nonlinear"), RuleCall("ignore", {}), Location("test", 1, 1)),))
    with pytest.raises(CoverageError, match=r"\(Pow\)"):
        compile_seed(model, rules)
