"""Consistency probes (docs/rules.md, consistency): pairs of graphs that compute the same function.

A rule file is *consistent* when two graphs computing the same function get the same attribution.
Each probe is a pair of small whole models (input ``x`` -> ... -> a linear layer to a few logits
``y``), built with ``onnx.helper`` in float32 with a symbolic batch axis ``N``, sharing the same
random weights. ``run_probes(ruleset)`` explains both sides of every pair with the same rule file on
a few seeded random batches and reports how far the attributions are apart.

Side a is the left-hand form of a probe's description, side b the right-hand one. Nodes with the
same name and op type on both sides are the *common* part (the head, a shared activation); the
others are where the two exporters differ, and their bindings are the ones reported as
``responsible`` when the pair disagrees. The target is side a's arg-max, used for both sides.

The scaling probe (Hobson's scaling equivalence) needs ``y = c·x`` as an op of the *nonlinear* kind.
No ONNX op that rulegraph classifies as nonlinear is ``c·x`` on all of ℝ for ``c ≠ 1``
(LeakyRelu/PRelu are ``x`` for ``x > 0``, Clip and LeakyRelu(alpha=1) are the identity, and Mul by a
constant is *linear*). The probe uses ``PRelu`` with per-feature slope ``c`` on a strictly negative
input, where it is exactly ``c·x``; ``c = 1`` would not separate the rules. Rules that only look at
the forward values (gradient, slope, ignore) see ``c·x`` exactly. ``repeat`` evaluates ``f`` on
``a(y)`` instead, outside the forward domain: the head's weights are all negative so that, under the
importance quantity, ``a(y) = Wᵀ·onehot < 0`` stays on PRelu's ``c·x`` branch too.

``gelu_fused_vs_decomposed`` (``needs_fusion=True``) agrees only because ``graph.load`` fuses the
decomposed side into one Gelu node (``graph/fuse.py``): without fusion its ``h·(1 + Erf(·))`` is a
bilinear Mul and its Erf a nonlinear op of its own, and only a pure gradient file would agree.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..compile.plan import assign, find_start, path_nodes
from ..errors import RulegraphError, RulegraphWarning
from ..lang.ruleset import Binding, RuleSet
from ..run import rulefiles as dsl
from ..run.explainer import Explainer, Result

OPSET = 17
#: Gelu is an ONNX op from opset 20 on.
GELU_OPSET = 20
LOGITS = 3
#: Seeded batches per probe, and rows per batch.
BATCHES = 3
BATCH = 4
#: Forward outputs of the two sides must agree this closely (relative to their size), else the
#: probe itself is wrong.
FORWARD_RTOL = 1e-4

Pair = tuple[onnx.ModelProto, onnx.ModelProto]
Sampler = Callable[[np.random.Generator, dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Probe:
    """A pair of equivalent graphs. ``build(rng)`` returns (side a, side b) with the same weights;
    ``sample(rng, weights)`` one input batch of ``BATCH`` rows (``weights``: side b's initializers by
    name, for probes that keep a pre-activation away from 0). ``needs_fusion``: the pair agrees
    only because rulegraph fuses a multi-node pattern on one side into one op (``graph/fuse.py``)."""

    name: str
    description: str
    build: Callable[[np.random.Generator], Pair]
    sample: Sampler
    needs_fusion: bool = False

    def models(self, seed: int = 0) -> Pair:
        """(side a, side b), with the weights drawn for ``seed``."""
        return self.build(_rng(seed, self.name, 0))

    def inputs(self, seed: int = 0, count: int = BATCHES) -> list[np.ndarray]:
        """The ``count`` input batches ``run_probe`` explains for ``seed``."""
        weights = {i.name: numpy_helper.to_array(i) for i in self.models(seed)[1].graph.initializer}
        rng = _rng(seed, self.name, 1)
        return [self.sample(rng, weights) for _ in range(count)]


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe for one rule file.

    ``max_difference``: max over the sampled rows of ``max|R_a − R_b| / max|R_a|`` (NaN when
    skipped). ``consistent``: ``max_difference <= tolerance`` (False when skipped). ``responsible``
    (only when inconsistent): the bindings applied to the nodes the two sides do not share (and to
    shared nodes whose binding differs between the sides), as ``'<selector> -> <rule>' at
    file:line:col``. ``skipped``: why the probe could not run with this rule file.
    """

    probe: str
    description: str
    max_difference: float
    consistent: bool
    responsible: tuple[str, ...]
    skipped: str | None = None


PROBES: dict[str, Probe] = {}


def probe(name: str, sample: Sampler, needs_fusion: bool = False):
    """Register the decorated builder as probe ``name``; its docstring's first line states the identity."""

    def register(build: Callable[[np.random.Generator], Pair]):
        doc = (build.__doc__ or "").strip().splitlines()
        if not doc:
            raise AssertionError(f"probe '{name}' needs a one-line docstring stating its identity")
        PROBES[name] = Probe(name, doc[0].strip(), build, sample, needs_fusion)
        return build

    return register


# --------------------------------------------------------------------------------------------------
# building blocks


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: Sequence[int],
           opset: int = OPSET, name: str = "probe") -> onnx.ModelProto:
    """``x`` [N, *x_shape] -> ... -> ``y`` [N, LOGITS]; the initializers the nodes use, floats as float32."""
    used = {i for n in nodes for i in n.input}
    initializers = [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
                    for k, v in inits.items() if k in used]
    graph = helper.make_graph(nodes, name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", LOGITS])],
                              initializers)
    opsets = [helper.make_opsetid("", opset)]
    ir_version = max(8, helper.find_min_ir_version_for(opsets))  # opset 20 needs IR 9
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    onnx.checker.check_model(model, full_check=True)
    return model


def _weights(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    return rng.normal(size=shape) / math.sqrt(shape[-1])


def _head(rng: np.random.Generator, inp: str, features: int, inits: dict,
          sign: float | None = None) -> onnx.NodeProto:
    """The common last layer ``y = Gemm(inp, W, b)`` to LOGITS classes; ``sign`` fixes W's sign."""
    w = _weights(rng, (LOGITS, features))
    if sign is not None:
        w = sign * np.abs(w)
    inits["head_w"], inits["head_b"] = w, 0.1 * rng.normal(size=LOGITS)
    return helper.make_node("Gemm", [inp, "head_w", "head_b"], ["y"], name="head", transB=1)


def _ints(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _signed(shape: Sequence[int], sign: int | None = None, low: float = 0.25, high: float = 2.0) -> Sampler:
    """Magnitudes in [low, high), random signs unless ``sign`` is given: no value near the kink at 0."""

    def sample(rng: np.random.Generator, weights: dict[str, np.ndarray]) -> np.ndarray:
        mags = rng.uniform(low, high, size=(BATCH, *shape))
        signs = rng.choice([-1.0, 1.0], size=mags.shape) if sign is None else sign
        return (signs * mags).astype(np.float32)

    return sample


def _normal(shape: Sequence[int], mean: float = 0.0,
            keep: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray] | None = None,
            margin: float = 0.1) -> Sampler:
    """Normal rows; with ``keep(x, weights)`` (a pre-activation), only rows where every entry of it
    is at least ``margin`` away from 0, where the ε of ``normalized`` is negligible (ε/|z|)."""

    def sample(rng: np.random.Generator, weights: dict[str, np.ndarray]) -> np.ndarray:
        rows: list[np.ndarray] = []
        for _ in range(1000):
            x = (mean + rng.normal(size=(BATCH, *shape))).astype(np.float32)
            if keep is None:
                return x
            z = keep(x.astype(np.float64), weights).reshape(BATCH, -1)
            rows += [row for row, ok in zip(x, np.abs(z).min(axis=1) >= margin) if ok]
            if len(rows) >= BATCH:
                return np.stack(rows[:BATCH])
        raise AssertionError("could not sample rows with the pre-activation away from 0")

    return sample


# --------------------------------------------------------------------------------------------------
# the probes


@probe("scaling", sample=_signed([3], sign=-1))
def _scaling(rng):
    """c·x (c = [0.5, 2, 3]) as PRelu(x, slope c) on x < 0 (nonlinear) equals MatMul(x, c·I) (linear)."""
    c = np.array([0.5, 2.0, 3.0])
    inits = {"c": c, "c_eye": np.diag(c)}
    head = _head(rng, "s", 3, inits, sign=-1.0)
    a = helper.make_node("PRelu", ["x", "c"], ["s"], name="prelu")
    b = helper.make_node("MatMul", ["x", "c_eye"], ["s"], name="matmul")
    return _model([a, head], inits, [3]), _model([b, head], inits, [3])


@probe("max_with_zero", sample=_signed([4]))
def _max_with_zero(rng):
    """Relu(x) equals Max(x, 0) with a constant 0."""
    inits = {"zero": np.zeros((), dtype=np.float64)}
    head = _head(rng, "r", 4, inits)
    a = helper.make_node("Relu", ["x"], ["r"], name="relu")
    b = helper.make_node("Max", ["x", "zero"], ["r"], name="max")
    return _model([a, head], inits, [4]), _model([b, head], inits, [4])


@probe("maxpool_vs_max", sample=_normal([1, 2, 4], mean=0.3))
def _maxpool_vs_max(rng):
    """MaxPool(kernel 2, stride 2) on [N,1,2,4] equals Max of the window's four strided Slices."""
    inits: dict[str, np.ndarray] = {}
    head = _head(rng, "f", 2, inits)
    flatten = helper.make_node("Flatten", ["p"], ["f"], name="flatten")
    a = [helper.make_node("MaxPool", ["x"], ["p"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2])]
    inits.update(axes=_ints(2, 3), steps=_ints(1, 2))
    b, pieces = [], []
    for row in (0, 1):
        for col in (0, 1):  # row-major within the window, as MaxPool's arg-max order
            inits[f"starts_{row}{col}"] = _ints(row, col)
            inits[f"ends_{row}{col}"] = _ints(row + 1, 4)
            pieces.append(f"piece_{row}{col}")
            b.append(helper.make_node("Slice", ["x", f"starts_{row}{col}", f"ends_{row}{col}", "axes", "steps"],
                                      [pieces[-1]], name=f"slice_{row}{col}"))
    b.append(helper.make_node("Max", pieces, ["p"], name="max"))
    return _model(a + [flatten, head], inits, [1, 2, 4]), _model(b + [flatten, head], inits, [1, 2, 4])


@probe("gemm_vs_matmul_add", sample=_normal([4], keep=lambda x, w: x @ w["wt"]))
def _gemm_vs_matmul_add(rng):
    """Gemm(x, W, b, transB=1) equals Add(MatMul(x, Wᵀ), b) (then Relu and the head)."""
    w, bias = _weights(rng, (5, 4)), 0.5 * rng.normal(size=5)
    inits = {"w": w, "wt": w.T, "b": bias}
    relu = helper.make_node("Relu", ["h"], ["r"], name="relu")
    head = _head(rng, "r", 5, inits)
    a = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1)]
    b = [helper.make_node("MatMul", ["x", "wt"], ["z"], name="fc_matmul"),
         helper.make_node("Add", ["z", "b"], ["h"], name="fc_add")]
    return _model(a + [relu, head], inits, [4]), _model(b + [relu, head], inits, [4])


@probe("flatten_vs_reshape", sample=_normal([2, 2, 2]))
def _flatten_vs_reshape(rng):
    """Flatten(x) equals Reshape(x, [0, -1]) (then the head)."""
    inits = {"shape": _ints(0, -1)}
    head = _head(rng, "f", 8, inits)
    a = helper.make_node("Flatten", ["x"], ["f"], name="flatten")
    b = helper.make_node("Reshape", ["x", "shape"], ["f"], name="reshape")
    return _model([a, head], inits, [2, 2, 2]), _model([b, head], inits, [2, 2, 2])


@probe("gap_vs_reducemean", sample=_signed([3, 2, 2], sign=1))
def _gap_vs_reducemean(rng):
    """GlobalAveragePool(x) equals ReduceMean(x, axes [2, 3], keepdims 1) (then Flatten and the head)."""
    inits: dict[str, np.ndarray] = {}
    head = _head(rng, "f", 3, inits)
    flatten = helper.make_node("Flatten", ["m"], ["f"], name="flatten")
    a = helper.make_node("GlobalAveragePool", ["x"], ["m"], name="gap")
    b = helper.make_node("ReduceMean", ["x"], ["m"], name="reducemean", axes=[2, 3], keepdims=1)
    return _model([a, flatten, head], inits, [3, 2, 2]), _model([b, flatten, head], inits, [3, 2, 2])


@probe("batchnorm_vs_mul_add", sample=_normal([2, 2, 2]))
def _batchnorm_vs_mul_add(rng):
    """BatchNormalization(x) equals Add(Mul(x, s), b) with s = γ/√(var+ε), b = β − s·mean."""
    gamma, beta = rng.uniform(0.5, 2.0, size=2), 0.5 * rng.normal(size=2)
    mean, var, eps = 0.5 * rng.normal(size=2), rng.uniform(0.5, 2.0, size=2), 1e-5
    s = gamma / np.sqrt(var + eps)
    inits = {"gamma": gamma, "beta": beta, "mean": mean, "var": var,
             "s": s.reshape(2, 1, 1), "b": (beta - s * mean).reshape(2, 1, 1)}
    head = _head(rng, "f", 8, inits)
    flatten = helper.make_node("Flatten", ["h"], ["f"], name="flatten")
    a = [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["h"], name="bn",
                          epsilon=eps)]
    b = [helper.make_node("Mul", ["x", "s"], ["m"], name="bn_mul"),
         helper.make_node("Add", ["m", "b"], ["h"], name="bn_add")]
    return _model(a + [flatten, head], inits, [2, 2, 2]), _model(b + [flatten, head], inits, [2, 2, 2])


@probe("conv1x1_vs_matmul",
       sample=_normal([3, 2, 2], keep=lambda x, w: x.transpose(0, 2, 3, 1) @ w["wt"]))
def _conv1x1_vs_matmul(rng):
    """1×1 Conv(x, W, b) equals Transpose(Add(MatMul(Transpose(x, NHWC), Wᵀ), b), NCHW)."""
    w, bias = _weights(rng, (4, 3)), 0.5 * rng.normal(size=4)
    inits = {"w": w.reshape(4, 3, 1, 1), "b": bias, "wt": w.T}
    head = _head(rng, "f", 16, inits)
    flatten = helper.make_node("Flatten", ["h"], ["f"], name="flatten")
    a = [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", kernel_shape=[1, 1])]
    b = [helper.make_node("Transpose", ["x"], ["xt"], name="to_nhwc", perm=[0, 2, 3, 1]),
         helper.make_node("MatMul", ["xt", "wt"], ["zt"], name="conv_matmul"),
         helper.make_node("Add", ["zt", "b"], ["ht"], name="conv_add"),
         helper.make_node("Transpose", ["ht"], ["h"], name="to_nchw", perm=[0, 3, 1, 2])]
    return _model(a + [flatten, head], inits, [3, 2, 2]), _model(b + [flatten, head], inits, [3, 2, 2])


@probe("gelu_fused_vs_decomposed", sample=_normal([4]), needs_fusion=True)
def _gelu_fused_vs_decomposed(rng):
    """Gelu(h) equals 0.5·h·(1 + Erf(h/√2)) (opset 20; after a Gemm, before the head)."""
    inits = {"w": _weights(rng, (5, 4)), "b": 0.5 * rng.normal(size=5),
             "sqrt2": np.array(math.sqrt(2.0)), "one": np.array(1.0), "half": np.array(0.5)}
    fc = helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1)
    head = _head(rng, "g", 5, inits)
    a = [helper.make_node("Gelu", ["h"], ["g"], name="gelu")]
    b = [helper.make_node("Div", ["h", "sqrt2"], ["d"], name="gelu_div"),
         helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
         helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
         helper.make_node("Mul", ["h", "e1"], ["he"], name="gelu_mul"),
         helper.make_node("Mul", ["he", "half"], ["g"], name="gelu_half")]
    return (_model([fc] + a + [head], inits, [4], opset=GELU_OPSET),
            _model([fc] + b + [head], inits, [4], opset=GELU_OPSET))


# --------------------------------------------------------------------------------------------------
# running


def _load(rules: str | Path | RuleSet) -> RuleSet:
    if isinstance(rules, RuleSet):
        return rules
    return dsl.load(rules)


def _rng(seed: int, name: str, stream: int) -> np.random.Generator:
    """A generator per (seed, probe, stream): a probe's weights and inputs do not depend on which
    other probes run."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), stream])


def render(binding: Binding) -> str:
    """``'<selector> -> <rule>' at file:line:col``."""
    return f"'{binding.selector} -> {binding.rule}' at {binding.location}"


def _assignments(explainer: Explainer, ruleset: RuleSet) -> tuple[dict[tuple[str, str], Binding | None], list[str]]:
    """(node (name, op type) -> its binding, problems of the nodes the pass visits).

    The bindings cover every node on the way to the output, so a node bound to ``start`` (which the
    pass itself never visits) is shown too; a node the pass visits keeps the binding the compiler
    gives it there (``first``/``last`` count along the pass's own path).
    """
    graph = explainer.graph
    start = find_start(graph, ruleset, None, None)
    explained = assign(graph, ruleset, path_nodes(graph, start))
    shown = assign(graph, ruleset, path_nodes(graph, graph.outputs[0]))
    bindings = {(a.node.name, a.node.op_type): a.binding for a in shown + explained}
    return bindings, [a.problem for a in explained if a.problem]


def _responsible(sides: list[dict[tuple[str, str], Binding | None]]) -> tuple[str, ...]:
    """Bindings of the nodes the two sides do not share, or share with a different binding."""
    out: dict[str, None] = {}
    for side, other in zip(sides, reversed(sides)):
        for key, binding in side.items():
            if binding is not None and (key not in other or other[key] != binding):
                out[render(binding)] = None
    return tuple(out)


def _relative_difference(ra: Result, rb: Result) -> float:
    """max over rows of max|R_a − R_b| / max|R_a| (max|R_b| where R_a is 0; 0 when both are 0)."""
    a = ra.map.reshape(len(ra.map), -1).astype(np.float64)
    b = rb.map.reshape(len(rb.map), -1).astype(np.float64)
    scale = np.abs(a).max(axis=1)
    scale = np.where(scale > 0, scale, np.abs(b).max(axis=1))
    diff = np.abs(a - b).max(axis=1)
    rel = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
    return float(rel.max())


def _check_forward(p: Probe, ra: Result, rb: Result) -> None:
    ya, yb = ra.outputs["y"], rb.outputs["y"]
    scale = max(float(np.abs(ya).max()), 1e-6)
    if not np.allclose(ya, yb, rtol=0, atol=FORWARD_RTOL * scale):
        raise AssertionError(f"probe '{p.name}': the two graphs do not compute the same function "
                             f"(max |y_a − y_b| = {np.abs(ya - yb).max():.3g}); the probe is wrong")


def run_probe(p: Probe, rules: str | Path | RuleSet, tolerance: float = 1e-4, seed: int = 0) -> ProbeResult:
    """Explain both sides of ``p`` with ``rules`` on ``BATCHES`` seeded batches (target: side a's
    arg-max, used for both sides) and compare the attributions."""
    ruleset = _load(rules)
    model_a, model_b = p.models(seed)
    with warnings.catch_warnings():  # the user's node bindings name nodes of their model, not the probe's
        warnings.simplefilter("ignore", RulegraphWarning)
        explainers = [Explainer(model_a, ruleset), Explainer(model_b, ruleset)]

    def skipped(reason: str) -> ProbeResult:
        return ProbeResult(p.name, p.description, math.nan, False, (), reason)

    sides, problems = [], []
    for label, explainer in zip("ab", explainers):
        try:
            assignments, found = _assignments(explainer, ruleset)
        except RulegraphError as exc:
            return skipped(f"side {label}: {exc}")
        sides.append(assignments)
        problems += [f"side {label}: {problem}" for problem in found]
    if problems:
        return skipped(f"{ruleset.source} cannot explain probe '{p.name}': " + "; ".join(problems))

    worst = 0.0
    for x in p.inputs(seed):
        try:
            # a probe compares two graphs; whether either map amplifies is not the probe's question
            ra = explainers[0].explain(x, target="argmax", max_amplification=None)
            rb = explainers[1].explain(x, target=ra.target, max_amplification=None)
        except RulegraphError as exc:
            return skipped(f"{ruleset.source} cannot explain probe '{p.name}': {exc}")
        _check_forward(p, ra, rb)
        difference = _relative_difference(ra, rb)
        worst = max(worst, difference if math.isfinite(difference) else math.inf)  # NaN: not consistent
    consistent = worst <= tolerance
    return ProbeResult(p.name, p.description, worst, consistent, () if consistent else _responsible(sides))


def run_probes(ruleset: str | Path | RuleSet, tolerance: float = 1e-4, names: Sequence[str] | None = None,
               seed: int = 0) -> list[ProbeResult]:
    """Run the probes named in ``names`` (default: all, in registration order) with one rule file."""
    names = list(PROBES) if names is None else list(names)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise RulegraphError(f"unknown probe(s) {', '.join(unknown)}; probes: {', '.join(PROBES)}")
    rules = _load(ruleset)
    return [run_probe(PROBES[n], rules, tolerance, seed) for n in names]


def format_results(results: Sequence[ProbeResult]) -> str:
    """One line per probe: name, verdict, difference, and the responsible bindings or skip reason."""
    lines = []
    width = max((len(r.probe) for r in results), default=0)
    for r in results:
        if r.skipped:
            lines.append(f"{r.probe:<{width}}  skipped       {r.skipped}")
            continue
        verdict = "consistent  " if r.consistent else "INCONSISTENT"
        line = f"{r.probe:<{width}}  {verdict}  {r.max_difference:.2e}"
        if r.responsible:
            line += "  " + "; ".join(r.responsible)
        lines.append(line)
    return "\n".join(lines)
