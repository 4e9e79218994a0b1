"""Test oracles and the helpers every test file shares: small ONNX models built with onnx.helper
(``make_model``, ``one_node``), the ONNX reference evaluator with its known defects fixed (``run``),
one seeded pass of a compiled explainer (``seeded_pass``), the stabilizer ``blip``, and a
finite-difference check of a compiled VJP.

The VJP oracle: compile a model with the gradient rule in seed mode, so the explainer computes
``v = J(x)ᵀ s`` for a seed ``s`` shaped like the output, and compare ``Σ_i <v_i, d_i>`` with the
central difference ``<s, (f(x + h d) − f(x − h d)) / 2h>`` along one random direction ``d`` that
perturbs every float input at once. Everything runs in float64 on ``onnx.reference``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops._op import OpRunUnaryNum
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ConvTranspose
from onnx.reference.ops.op_grid_sample import GridSample as _GridSample
from onnx.reference.ops.op_max_pool import MaxPool as _MaxPool

from rulegraph.backward import ops as G
from rulegraph.compile.build import SEED, Compiled, compile_explainer
from rulegraph.errors import Location
from rulegraph.lang.ruleset import Binding, RuleCall, RuleSet, Selector

KINDS = ("linear", "nonlinear", "max", "route", "bilinear", "normalizing")
#: Every kind bound to the gradient rule, importance quantity: saliency = the plain VJP.
GRADIENT = RuleSet(tuple(Binding(Selector("kind", k), RuleCall("gradient", {}), Location("test", 1, 1))
                         for k in KINDS), quantity="importance")


# Known defects of onnx.reference (onnx 1.23) replaced by correct kernels -------------------------


class Erf(OpRunUnaryNum):
    """The reference Erf computes in float32 (``np.vectorize(erf, otypes=["f"])``): too coarse for
    a finite difference with h = 1e-6. This one keeps the input's precision."""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x).astype(x.dtype),)


class Gelu(OpRun):
    """The reference Gelu runs its function body, whose Erf is the float32 one above."""

    op_domain = ""

    def _run(self, x, approximate=None):
        if approximate == "tanh":
            return (0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),)
        erf = np.vectorize(math.erf, otypes=[x.dtype])
        return ((0.5 * x * (1 + erf(x / math.sqrt(2)))).astype(x.dtype),)


class ConvTranspose(_ConvTranspose):
    """The reference ConvTranspose mixes up the channels of groups > 1 (it slices W by output
    channels and writes one output channel per group); run each group with group = 1 instead."""

    def _run(self, X, W, B=None, group=None, **attrs):
        group = group or 1
        if group == 1:
            return super()._run(X, W, B, group=1, **attrs)
        c, m = X.shape[1] // group, W.shape[1]
        parts = [super(ConvTranspose, self)._run(X[:, g * c:(g + 1) * c], W[g * c:(g + 1) * c],
                                                 None if B is None else B[g * m:(g + 1) * m], group=1,
                                                 **attrs)[0] for g in range(group)]
        return (np.concatenate(parts, axis=1),)


class MaxPool(_MaxPool):
    """The reference MaxPool returns wrong Indices on its stride-1 fast path (CommonPool); use its
    general path, which agrees with onnxruntime, for every stride."""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        n = len(kernel_shape)
        return self._max_pool(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations or [1] * n,
                              kernel_shape=kernel_shape, pads=pads, storage_order=storage_order,
                              strides=strides or [1] * n)


class GatherElements(OpRun):
    """The reference GatherElements uses ``np.choose``, which takes at most 64 choices, so it fails
    on any 1-D input longer than 64 (the softness rule gathers from a flattened tensor).
    ``np.take_along_axis`` instead."""

    op_domain = ""

    def _run(self, data, indices, axis=None):
        axis = axis or 0
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, indices, axis=axis),)


class GroupNormalization(OpRun):
    """The reference GroupNormalization runs its function body, which computes in ``stash_type``
    (float32 by default): too coarse for a finite difference. This one keeps the input's precision;
    a scale of ``num_groups`` elements is per group (opset 18), one of C elements per channel (21)."""

    op_domain = ""

    def _run(self, x, scale, bias, epsilon=None, num_groups=None, stash_type=None):
        n, c = x.shape[:2]
        eps = 1e-5 if epsilon is None else epsilon
        v = x.reshape(n, num_groups, -1)
        mean = v.mean(axis=2, keepdims=True)
        std = np.sqrt(((v - mean) ** 2).mean(axis=2, keepdims=True) + eps)
        normalized = ((v - mean) / std).reshape(x.shape)
        repeat = c // scale.size
        shape = [c] + [1] * (x.ndim - 2)
        gamma, beta = np.repeat(scale, repeat).reshape(shape), np.repeat(bias, repeat).reshape(shape)
        return (normalized * gamma + beta,)


class LRN(OpRun):
    """The reference LRN loops over the batch axis instead of the channels (and takes 4-D input
    only); this one sums the window of ``size`` channels around each channel, any rank."""

    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        alpha, beta, bias = 1e-4 if alpha is None else alpha, 0.75 if beta is None else beta, \
            1.0 if bias is None else bias
        before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
        square_sum = np.zeros_like(x)
        for ch in range(x.shape[1]):
            square_sum[:, ch] = (x[:, max(0, ch - before):ch + after + 1] ** 2).sum(axis=1)
        return ((x / (bias + alpha / size * square_sum) ** beta).astype(x.dtype),)


class Pad(OpRun):
    """The reference Pad hands its amounts to ``np.pad``, which refuses negative ones; ONNX (and
    onnxruntime) crop there. Constant mode: crop by the negative amounts, then pad by the others;
    ``reflect``, ``edge`` and ``wrap`` are numpy's modes of the same names."""

    op_domain = ""

    def _run(self, data, pads, constant_value=None, axes=None, mode=None):
        mode = "constant" if mode is None else mode.decode() if isinstance(mode, bytes) else mode
        rank = data.ndim
        axes = range(rank) if axes is None else [int(a) % rank for a in axes]
        full = np.zeros((2, rank), dtype=np.int64)
        full[:, list(axes)] = np.asarray(pads).reshape(2, -1)
        crop = tuple(slice(max(-b, 0), data.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(full.T))
        if mode != "constant":
            assert (full >= 0).all(), "negative amounts in a border mode"
            return (np.pad(data, full.T, mode=mode).astype(data.dtype),)
        value = 0 if constant_value is None else np.asarray(constant_value).item()
        return (np.pad(data[crop], np.maximum(full, 0).T, constant_values=value).astype(data.dtype),)


class LpNormalization(OpRun):
    """The reference LpNormalization sums ``x^p`` without the absolute value, so its p = 1 norm is
    ``Σ x`` (onnxruntime's is ``Σ |x|``, the op's definition); this one takes ``(Σ |x|^p)^(1/p)``."""

    op_domain = ""

    def _run(self, x, axis=None, p=None):
        axis, p = -1 if axis is None else axis, 2 if p is None else p
        norm = (np.abs(x) ** p).sum(axis=axis, keepdims=True) ** (1.0 / p)
        return (np.where(norm == 0, 0, x / np.where(norm == 0, 1, norm)).astype(x.dtype),)


def window_sums(v: np.ndarray, kernel, strides=None, dilations=None, pads=None, auto_pad=None,
                ceil_mode=0) -> np.ndarray:
    """Σ of ``v [N, C, ...]`` over each pooling window: zeros in the padding, nothing past it (a
    ceil_mode window that overhangs the padded input sums what it covers; one that would start in
    the end padding is dropped, as onnxruntime and onnx's shape inference do)."""
    n = len(kernel)
    strides, dilations = strides or [1] * n, dilations or [1] * n
    pads = list(pads or [0] * (2 * n))
    mode = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad or "NOTSET"
    dk = [d * (k - 1) + 1 for d, k in zip(dilations, kernel)]
    sizes = v.shape[2:]
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        totals = [max(0, (-(-size // s) - 1) * s + k - size) for size, s, k in zip(sizes, strides, dk)]
        small = [t // 2 for t in totals]
        big = [t - t // 2 for t in totals]
        pads = small + big if mode == "SAME_UPPER" else big + small
    elif mode == "VALID":
        pads = [0] * (2 * n)
    out = []
    for i in range(n):
        span = sizes[i] + pads[i] + pads[n + i] - dk[i]
        count = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (count - 1) * strides[i] >= sizes[i] + pads[i]:
            count -= 1
        out.append(count)
    ends = [max(pads[n + i], (out[i] - 1) * strides[i] + dk[i] - sizes[i] - pads[i]) for i in range(n)]
    padded = np.pad(v, [(0, 0), (0, 0)] + [(pads[i], ends[i]) for i in range(n)])
    total = np.zeros(v.shape[:2] + tuple(out), dtype=v.dtype)
    for offset in np.ndindex(*kernel):
        window = tuple(slice(o * d, o * d + (c - 1) * s + 1, s)
                       for o, d, c, s in zip(offset, dilations, out, strides))
        total += padded[(slice(None), slice(None)) + window]
    return total


class LpPool(OpRun):
    """The reference LpPool takes ``kernel size × AveragePool(|x|^p)``, whose ceil_mode windows that
    overhang are averaged over the cells they cover: not their sum. This one sums each window."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, p=None, pads=None,
             strides=None):
        p = 2 if p is None else p
        total = window_sums(np.abs(x) ** p, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode or 0)
        return ((total ** (1.0 / p)).astype(x.dtype),)


class GlobalLpPool(OpRun):
    """onnx.reference has no GlobalLpPool: ``(Σ |x|^p)^(1/p)`` over the spatial axes, kept."""

    op_domain = ""

    def _run(self, x, p=None):
        p = 2 if p is None else p
        axes = tuple(range(2, x.ndim))
        return (((np.abs(x) ** p).sum(axis=axes, keepdims=True) ** (1.0 / p)).astype(x.dtype),)


class MeanVarianceNormalization(OpRun):
    """The reference MeanVarianceNormalization runs its function body, whose float32 constants fail
    on a float64 input; this one computes ``(x − μ)/(√(E[x²] − μ²) + 10⁻⁹)`` in the input's type."""

    op_domain = ""

    def _run(self, x, axes=None):
        axes = tuple([0, 2, 3] if axes is None else axes)
        mean = x.mean(axis=axes, keepdims=True)
        std = np.sqrt((x * x).mean(axis=axes, keepdims=True) - mean * mean)
        return ((x - mean) / (std + 1e-9),)


class MaxUnpool(OpRun):
    """The reference MaxUnpool places the flat indices in the size that kernel, strides and pads give
    and pads that to ``output_shape``; the indices are MaxPool's, over the pooled input, whose size
    ``output_shape`` gives: onnxruntime writes them into a zero tensor of that shape."""

    op_domain = ""

    def _run(self, x, indices, output_shape=None, kernel_shape=None, pads=None, strides=None):
        if output_shape is None:
            n = len(kernel_shape)
            strides, pads = strides or [1] * n, pads or [0] * (2 * n)
            output_shape = list(x.shape[:2]) + [(x.shape[2 + i] - 1) * strides[i] - pads[i] - pads[n + i]
                                                + kernel_shape[i] for i in range(n)]
        y = np.zeros(int(np.prod(output_shape)), dtype=x.dtype)
        y[indices.ravel()] = x.ravel()
        return (y.reshape(tuple(int(d) for d in output_shape)),)


class GridSample(_GridSample):
    """The reference GridSample knows opset 20's mode names only; opset 16's ``bilinear`` and
    ``bicubic`` are ``linear`` and ``cubic``, its default ``bilinear``."""

    def _run(self, X, grid, mode=None, padding_mode=None, align_corners=None):
        mode = mode or self.mode
        mode = mode.decode() if isinstance(mode, bytes) else mode
        mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
        return super()._run(X, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


class AffineGrid(OpRun):
    """The reference AffineGrid returns float32 whatever θ's type: too coarse for a finite difference.
    ``grid[n, o] = θ[n] (x, y[, z], 1)`` over the base grid, in θ's type."""

    op_domain = ""

    def _run(self, theta, size, align_corners=None):
        sizes = [int(d) for d in size[2:]]
        axes = [np.linspace(-1.0, 1.0, n) if align_corners else (np.arange(n) + 0.5) * 2 / n - 1
                for n in sizes]
        mesh = np.meshgrid(*axes, indexing="ij")
        base = np.stack([m for m in reversed(mesh)] + [np.ones(sizes)], axis=-1)    # [..., r + 1]
        grid = np.einsum("nij,...j->n...i", theta, base)
        return (grid.astype(theta.dtype),)


REFERENCE_FIXES = [Erf, Gelu, ConvTranspose, MaxPool, GatherElements, GroupNormalization, LRN, Pad,
                   LpNormalization, LpPool, GlobalLpPool, MeanVarianceNormalization, MaxUnpool, GridSample,
                   AffineGrid]


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Mapping[str, Sequence], consts=None,
               outputs: Sequence[str] = ("y",), opset: int = 17, elem: int = TensorProto.DOUBLE,
               ) -> onnx.ModelProto:
    """A model of ``nodes``; ``inputs`` maps graph input names to shapes (ints or symbols),
    ``consts`` initializer names to arrays (float64 ones in the model's float type: numpy's default
    follows ``elem``); outputs get their shapes from shape inference."""
    value_infos = [helper.make_tensor_value_info(name, elem, list(shape)) for name, shape in inputs.items()]
    out_infos = [helper.make_tensor_value_info(name, elem, None) for name in outputs]
    float_type = helper.tensor_dtype_to_np_dtype(elem)
    inits = [numpy_helper.from_array(_as_float(np.asarray(v), float_type), name)
             for name, v in (consts or {}).items()]
    graph = helper.make_graph(list(nodes), "test", value_infos, out_infos, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 9 if opset <= 20 else 10
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model)
    return model


def _as_float(value: np.ndarray, float_type) -> np.ndarray:
    return value.astype(float_type) if value.dtype == np.float64 else value


def one_node(op_type: str, args: Sequence[str], inputs: Mapping[str, Sequence], consts=None,
             opset: int = 17, elem: int = TensorProto.DOUBLE, **attrs) -> onnx.ModelProto:
    """A model of one node ``op_type(*args) -> y``; ``args`` names graph inputs, consts or ''."""
    node = helper.make_node(op_type, list(args), ["y"], name=f"the_{op_type}", **attrs)
    return make_model([node], inputs, consts, opset=opset, elem=elem)


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], outputs=None) -> dict[str, np.ndarray]:
    """Run ``model`` with the ONNX reference evaluator; returns output name -> array."""
    names = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
    values = ReferenceEvaluator(model, new_ops=REFERENCE_FIXES).run(names, dict(feeds))
    return dict(zip(names, values))


def blip(d, eps):
    """``d + ε·sign(d)`` with ``sign(0) = +1``: the stabilized denominator of the LRP rules."""
    return d + eps * np.where(d >= 0, 1.0, -1.0)


def seeded_pass(model: onnx.ModelProto, rules: RuleSet | str, x: np.ndarray, seed: np.ndarray,
                runtime: str = "reference") -> dict:
    """Attribution (``R``), bias shares per node (``bias``) and their total (``bias_total``) of one
    seed-mode pass of ``model``'s explainer from graph input ``x``; ``rules`` a RuleSet or rule-file
    text (read as ``t.rules``). ``runtime="reference"`` runs ``run`` (float64), ``"ort"`` onnxruntime."""
    from rulegraph.run import rulefiles as dsl

    ruleset = dsl.parse(rules, source="t.rules") if isinstance(rules, str) else rules
    compiled = compile_explainer(G.load(model), ruleset, seed_mode=True)
    names = [o.name for o in compiled.model.graph.output]
    if runtime == "ort":
        import onnxruntime

        session = onnxruntime.InferenceSession(compiled.model.SerializeToString())
        values = dict(zip(names, session.run(names, {"x": x, SEED: seed})))
    else:
        values = run(compiled.model, {"x": x, SEED: seed}, names)
    return {"R": values[compiled.attribution["x"]],
            "bias": {k: values[v] for k, v in compiled.bias_shares.items()},
            "bias_total": values[compiled.bias_total] if compiled.bias_total else None}


def compile_seed(model: onnx.ModelProto, rules: RuleSet = GRADIENT) -> Compiled:
    """The explainer of ``model`` in seed mode (extra input SEED, shaped like the output)."""
    return compile_explainer(G.load(model), rules, seed_mode=True)


def reference_vjp(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], seed: np.ndarray,
                  compiled: Compiled | None = None) -> dict[str, np.ndarray]:
    """``J(x)ᵀ seed`` for every float graph input, run on the reference evaluator."""
    compiled = compiled or compile_seed(model)
    names = list(compiled.saliency.values())
    values = run(compiled.model, {**feeds, SEED: seed}, names)
    return {x: values[o] for x, o in compiled.saliency.items()}


def check_vjp(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], rng: np.random.Generator,
              h: float = 1e-6, rtol: float = 1e-6, seed: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Assert the compiled VJP of ``model`` at ``feeds`` matches central differences; returns it.

    ``seed`` (shaped like the output) defaults to a random normal one.

    The tolerance is relative to ``Σ |s ⊙ fd|`` so that cancellation in the inner product cannot
    hide or fake an error.
    """
    out_name = model.graph.output[0].name
    y = run(model, feeds, [out_name])[out_name]
    seed = rng.standard_normal(np.shape(y)) if seed is None else seed
    vjps = reference_vjp(model, feeds, seed)
    assert set(vjps) == set(feeds), f"saliency for {sorted(vjps)}, inputs {sorted(feeds)}"
    direction = {k: rng.standard_normal(np.shape(v)) for k, v in feeds.items()}
    plus = run(model, {k: feeds[k] + h * direction[k] for k in feeds}, [out_name])[out_name]
    minus = run(model, {k: feeds[k] - h * direction[k] for k in feeds}, [out_name])[out_name]
    fd = (plus - minus) / (2 * h)
    for k, v in vjps.items():
        assert v.shape == np.shape(feeds[k]), f"VJP of '{k}' has shape {v.shape}, input {np.shape(feeds[k])}"
        assert np.all(np.isfinite(v)), f"VJP of '{k}' is not finite"
    lhs = sum(float(np.sum(vjps[k] * direction[k])) for k in feeds)
    rhs = float(np.sum(seed * fd))
    scale = float(np.sum(np.abs(seed * fd))) + float(np.sum([np.abs(vjps[k] * direction[k]).sum() for k in feeds]))
    assert abs(lhs - rhs) <= rtol * max(scale, 1e-12), (
        f"<VJP, d> = {lhs!r} but <s, FD> = {rhs!r} (difference {lhs - rhs:.3g}, scale {scale:.3g})")
    return vjps


def as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every float64 tensor, type and Cast target made float32 (subgraphs included)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)

    def convert(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == onnx.TensorProto.DOUBLE:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32),
                                                    tensor.name))

    def fix(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            convert(tensor)
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
                value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        for node in graph.node:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.DOUBLE:
                    attr.i = onnx.TensorProto.FLOAT
                if attr.type == onnx.AttributeProto.TENSOR:
                    convert(attr.t)
                if attr.type == onnx.AttributeProto.GRAPH:
                    fix(attr.g)

    fix(out.graph)
    return out
