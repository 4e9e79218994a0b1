"""A loop around a pass written as one ONNX model (``rulegraph compile`` of a rule file with a
``loop`` header, ``Explainer.save``): the loop's rows are built inside the graph, the compiled
pass runs on all of them as one batch, and the quadrature or the mean reduces them.

The loop model's inputs: the model's own, ``rulegraph/target`` (int64 [N], negative = arg-max of
the real input's output), and per float input ``x``:

- ``integrated_gradients``: ``rulegraph/baseline/<x>`` (``x'``, shaped like ``x``). Rows: the
  ``K`` path points ``x' + α_k(x − x')``, then ``x`` and ``x'`` (for ``f(x) − f(x')``).
- ``smoothgrad``: ``rulegraph/noise/<x>``, float64 ``[S, N, ...]``, standard-normal draws; the
  graph scales them by ``σ = noise · (max x − min x)`` per row, so ``S`` is whatever the input
  holds. **Decision**: the noise is an input, not a ``RandomNormalLike``: runtimes' generators
  differ, and with the draws of ``loops.smoothgrad_noise`` the model gives exactly what
  ``explain(x, loop="smoothgrad")`` gives. Difference files also take ``rulegraph/baseline/<x>``.
- ``occlusion``: nothing more; the patches are constant masks, so the input's spatial size must
  be fixed in the model.

Outputs: the model's own outputs on ``x``, ``rulegraph/loop/attribution/<input>``,
``rulegraph/loop/saliency/<x>`` (importance files), ``rulegraph/loop/bias_total`` (SmoothGrad
around a file that blames or totals its bias), and ``rulegraph/loop/start_value`` [N], with the
meaning ``loops.py`` gives each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..backward.emit import Tape
from ..compile.build import BASELINE_PREFIX, TARGET, prune
from ..errors import InternalError, RulegraphError
from ..graph import large
from ..graph.model_check import explainer_metadata
from .loops import quadrature, refuse_integrated_gradients

NOISE_PREFIX = "rulegraph/noise/"
OUT = "rulegraph/loop/"
INNER = "rulegraph/loop/pass/"        # the pass's own inputs, fed by the loop's rows
FORWARD = "rulegraph/loop/forward/"   # the forward copy on x (arg-max targets, the model's outputs)


@dataclass
class LoopModel:
    """The loop model and the names of what it computes (as ``Compiled`` for a plain pass)."""

    model: onnx.ModelProto
    attribution: dict[str, str] = field(default_factory=dict)   # graph input -> output name
    saliency: dict[str, str] = field(default_factory=dict)
    bias_total: str | None = None
    start_value: str = OUT + "start_value"

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input]


def compile_loop(explainer, loop_call) -> LoopModel:
    """The loop ``loop_call`` (a ``RuleCall`` of ``loops.LOOPS``) around ``explainer``'s pass."""
    build = LOOP_GRAPHS.get(loop_call.name)
    if build is None:
        raise RulegraphError(f"loop '{loop_call.name}' cannot be written as a graph; loops that can: "
                             f"{', '.join(LOOP_GRAPHS)}")
    static = explainer._static_batch()
    if static is not None and static > 0:  # -1 and 0 are how some exporters write a dynamic axis
        raise RulegraphError(f"the model was exported with a fixed batch of {static}; the loop model runs "
                             f"all of a loop's rows as one batch. Re-export the model with a dynamic batch "
                             f"axis, or explain it with explain(x, loop='{loop_call.name}'), which runs it "
                             f"in chunks")
    return build(_Builder(explainer.without_loop()), dict(loop_call.params))


class _Builder:
    """The pieces every loop graph shares: the renamed pass, the forward copy, row tiling."""

    def __init__(self, explainer):
        self.explainer = explainer
        self.graph = explainer.graph
        self.inner = explainer.compiled()
        self.start = self.inner.start_tensor
        taken = {name for node in self.inner.model.graph.node for name in [*node.input, *node.output]}
        taken |= {i.name for i in self.inner.model.graph.initializer} | set(self.inner.input_names)
        self.tape = Tape(self.graph.opset, taken, prefix="rulegraph/loop",
                         float_dtype=helper.tensor_dtype_to_np_dtype(self.elem(self.start)))
        self.inputs = [i for i in self.graph.model.graph.input if i.name in self.graph.inputs]
        self.extra_inputs: list[onnx.ValueInfoProto] = [
            helper.make_tensor_value_info(TARGET, TensorProto.INT64, ["N"])]
        self.outputs: list[onnx.ValueInfoProto] = []
        self.fed = 0
        first = self.graph.inputs[0]
        self.n = self.tape.shape(first, start=0, end=1)     # [1] int64: the batch
        self.floats = [k for k in self.graph.inputs if self.graph.is_float(k)]
        if not self.floats:
            raise RulegraphError(f"a loop moves the model's float inputs, and this model has none (inputs: "
                                 f"{', '.join(self.graph.inputs)})")

    # the forward copy on x: targets, the model's outputs -------------------------------------------
    def targets(self) -> str:
        """The class per row: ``rulegraph/target``, with the arg-max of ``f(x)`` where it is negative."""
        t = self.tape
        start = FORWARD + self.start
        first = t.op("Gather", t.op("Reshape", start, t.ints([0, 0, -1])), t.ints([0]), axis=2)
        argmax = t.op("ArgMax", t.op("Squeeze", first, t.ints([2])), axis=1, keepdims=0)
        return t.op("Where", t.op("Less", TARGET, t.const(np.array(0, dtype=np.int64))), argmax, TARGET)

    def forward_start_value(self, chosen: str) -> str:
        """``y_target`` per row on x, from the forward copy."""
        t = self.tape
        flat = t.op("Reshape", FORWARD + self.start, t.ints([0, 0, -1]))
        picked = t.op("GatherElements", flat, t.op("Reshape", chosen, t.ints([-1, 1, 1])), axis=1)
        return t.op("Reshape", picked, t.ints([-1]))

    # rows ------------------------------------------------------------------------------------------
    def count(self, k) -> str:
        return k if isinstance(k, str) else self.tape.ints([k])

    def tile_rows(self, x: str, copies) -> str:
        """``[copies · N, ...]``: x repeated ``copies`` times (copy-major, as ``np.tile``)."""
        t = self.tape
        expanded = t.op("Expand", t.unsqueeze(x, [0]), t.op("Concat", self.count(copies), t.shape(x), axis=0))
        return self.merge(expanded)

    def merge(self, stacked: str) -> str:
        """``[K, N, ...] -> [K·N, ...]``."""
        t = self.tape
        return t.op("Reshape", stacked, t.op("Concat", t.ints([-1]), t.shape(stacked, start=2), axis=0))

    def block(self, rows: str, first, last) -> str:
        """Rows ``first·N .. last·N`` of a pass output (``first``, ``last``: ints or [1] tensors)."""
        t = self.tape
        return t.op("Slice", rows, t.op("Mul", self.count(first), self.n),
                    t.op("Mul", self.count(last), self.n), t.ints([0]))

    def split(self, rows: str, k) -> str:
        """The first ``k·N`` rows as ``[k, N, ...]``."""
        t = self.tape
        head = self.block(rows, 0, k)
        shape = t.op("Concat", self.count(k), t.ints([-1]), t.shape(head, start=1), axis=0)
        return t.op("Reshape", head, shape)

    def feed(self, rows: dict[str, str]) -> None:
        """Make ``rows[name]`` the pass's input ``name`` (its renamed graph input)."""
        for name, value in rows.items():
            self.tape.nodes.append(helper.make_node("Identity", [value], [INNER + name],
                                                    name=f"{INNER}{name}/feed"))
        self.fed = len(self.tape.nodes)  # nodes before the pass; the reductions come after it

    def output(self, name: str, value: str, elem: int, dims) -> str:
        self.tape.nodes.append(helper.make_node("Identity", [value], [name], name=f"{name}/out"))
        self.outputs.append(helper.make_tensor_value_info(name, elem, dims))
        return name

    def input(self, name: str, elem: int, dims) -> str:
        self.extra_inputs.append(helper.make_tensor_value_info(name, elem, dims))
        return name

    def elem(self, x: str) -> int:
        return self.graph.dtypes.get(x, TensorProto.FLOAT)

    # assembly --------------------------------------------------------------------------------------
    def assemble(self) -> onnx.ModelProto:
        inner = onnx.ModelProto()
        inner.CopyFrom(self.inner.model)
        # the pass's inputs, and the model's outputs (which the loop model gives on x, from the copy)
        names = {name: INNER + name for name in self.inner.input_names + list(self.graph.outputs)}
        _rename(inner.graph, names)
        forward = onnx.compose.add_prefix_graph(self.graph.model.graph, FORWARD, rename_inputs=False,
                                                rename_initializers=False)
        nodes = (list(forward.node) + self.tape.nodes[:self.fed] + list(inner.graph.node)
                 + self.tape.nodes[self.fed:])
        inits = {i.name: i for i in list(forward.initializer) + list(inner.graph.initializer)}
        for x in self.tape.initializers:
            inits[x.name] = x
        model_outputs = []
        for o in self.graph.model.graph.output:
            nodes.append(helper.make_node("Identity", [FORWARD + o.name], [o.name], name=f"{o.name}/out"))
            model_outputs.append(o)
        graph = helper.make_graph(nodes, f"{self.graph.model.graph.name}_loop",
                                  self.inputs + self.extra_inputs, model_outputs + self.outputs,
                                  list(inits.values()))
        model = helper.make_model(graph, opset_imports=list(inner.opset_import), ir_version=inner.ir_version)
        model.functions.extend(inner.functions)
        prune(model)
        model.metadata_props.append(explainer_metadata([o.name for o in self.graph.model.graph.output]))
        try:
            onnx.checker.check_model(large.without_weights(model))
        except onnx.checker.ValidationError as exc:
            raise InternalError(f"the loop model is not valid ONNX: {exc}") from exc
        return model


def _rename(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Rename tensors where they are made and wherever they are used, in subgraphs too."""
    for value in graph.input:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names.get(o, o) for o in node.output]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename(sub, names)


# the loops ---------------------------------------------------------------------------------------


def _integrated_gradients(b: _Builder, params: dict) -> LoopModel:
    """Rows ``[path (K·N); x; x']``; saliency ``Σ_k w_k a(path_k)``, attribution ``(x − x') ⊙`` it,
    start value ``f(x) − f(x')`` (``loops.integrated_gradients``)."""
    refuse_integrated_gradients(b.explainer.ruleset)
    t = b.tape
    alphas, weights = quadrature(params["method"], int(params["steps"]))
    k = len(alphas)
    chosen = b.targets()
    rows, bases = {}, {}
    for x in b.graph.inputs:
        if x not in b.floats:
            rows[x] = b.tile_rows(x, k + 2)
            continue
        rank = b.graph.rank(x)
        dtype = helper.tensor_dtype_to_np_dtype(b.elem(x))
        bases[x] = b.input(BASELINE_PREFIX + x, b.elem(x), b.graph.shapes.get(x))
        diff = t.op("Sub", x, bases[x])
        steps = t.const(alphas.reshape((-1,) + (1,) * rank).astype(dtype), hint="alphas")
        path = t.op("Add", t.unsqueeze(bases[x], [0]), t.op("Mul", steps, t.unsqueeze(diff, [0])))
        rows[x] = t.op("Concat", b.merge(path), x, bases[x], axis=0)
    rows[TARGET] = t.op("Tile", chosen, t.ints([k + 2]))
    b.feed(rows)
    out = LoopModel(onnx.ModelProto())
    for x in b.floats:
        rank = b.graph.rank(x)
        dtype = helper.tensor_dtype_to_np_dtype(b.elem(x))
        w = t.const(weights.reshape((-1,) + (1,) * rank).astype(dtype), hint="weights")
        saliency = t.reduce_sum(t.op("Mul", w, b.split(b.inner.saliency[x], k)), [0], keepdims=False)
        shape = b.graph.shapes.get(x)
        out.saliency[x] = b.output(f"{OUT}saliency/{x}", saliency, b.elem(x), shape)
        attribution = t.op("Mul", t.op("Sub", x, bases[x]), saliency)
        out.attribution[x] = b.output(f"{OUT}attribution/{x}", attribution, b.elem(x), shape)
    start_values = b.inner.start_value
    value = t.op("Sub", b.block(start_values, k, k + 1), b.block(start_values, k + 1, k + 2))
    b.output(out.start_value, value, b.elem(b.start), ["N"])
    out.model = b.assemble()
    return out


def _smoothgrad(b: _Builder, params: dict) -> LoopModel:
    """Rows ``[x + σ ε (S·N); x]``; the mean over the S copies of every output of the pass
    (``loops.smoothgrad``)."""
    t = b.tape
    noisy = {}
    for x in b.floats:
        rank = b.graph.rank(x)
        draws = b.input(NOISE_PREFIX + x, TensorProto.DOUBLE, ["S", *(b.graph.shapes.get(x) or ["N"] * rank)])
        spread = t.op("Sub", t.reduce("ReduceMax", t.op("Flatten", x, axis=1), [1], keepdims=False),
                      t.reduce("ReduceMin", t.op("Flatten", x, axis=1), [1], keepdims=False))
        dtype = helper.tensor_dtype_to_np_dtype(b.elem(x))
        sigma = t.op("Mul", spread, t.const(np.array(params["noise"], dtype=dtype)))
        per_row = t.ints([1, -1] + [1] * (rank - 1))
        sigma = t.op("Reshape", t.op("Cast", sigma, to=TensorProto.DOUBLE), per_row)
        scaled = t.op("Cast", t.op("Mul", draws, sigma), to=b.elem(x))
        noisy[x] = t.op("Add", t.unsqueeze(x, [0]), scaled)
    samples = t.shape(NOISE_PREFIX + b.floats[0], start=0, end=1)
    copies = t.op("Add", samples, t.ints([1]))
    chosen = b.targets()
    rows = {x: t.op("Concat", b.merge(noisy[x]), x, axis=0) if x in noisy else b.tile_rows(x, copies)
            for x in b.graph.inputs}
    for x, name in b.inner.baseline_inputs.items():
        base = b.input(name, b.elem(x), b.graph.shapes.get(x))
        rows[name] = b.tile_rows(base, copies)
    rows[TARGET] = t.op("Tile", chosen, copies)
    b.feed(rows)

    def mean(name: str) -> str:
        return t.reduce("ReduceMean", b.split(name, samples), [0], keepdims=False)

    out = LoopModel(onnx.ModelProto())
    for x, name in b.inner.attribution.items():
        out.attribution[x] = b.output(f"{OUT}attribution/{x}", mean(name), b.elem(b.start),
                                      b.graph.shapes.get(x))
    for x, name in b.inner.saliency.items():
        out.saliency[x] = b.output(f"{OUT}saliency/{x}", mean(name), b.elem(x), b.graph.shapes.get(x))
    if b.inner.bias_total:
        out.bias_total = b.output(OUT + "bias_total", mean(b.inner.bias_total), b.elem(b.start), ["N"])
    b.output(out.start_value, mean(b.inner.start_value), b.elem(b.start), ["N"])
    out.model = b.assemble()
    return out


def _occlusion(b: _Builder, params: dict) -> LoopModel:
    """Rows: ``x`` with each patch filled (``M·N``), forward only; per cell the mean drop of the
    target output over the patches that cover it (``loops.occlusion``)."""
    t = b.tape
    name = b.floats[0]
    shape = b.graph.shapes.get(name) or []
    spatial = shape[2:]
    if len(shape) < 3 or not all(isinstance(d, int) for d in spatial):
        raise RulegraphError(f"occlusion as a graph needs the spatial size of input '{name}' fixed in the "
                             f"model (its shape is {shape}): the patches are constant masks. Re-export with "
                             f"fixed spatial axes, or explain with explain(x, loop='occlusion')")
    masks = occlusion_masks(spatial, int(params["patch"]), int(params["stride"]))
    m = len(masks)
    dtype = helper.tensor_dtype_to_np_dtype(b.elem(name))
    chosen = b.targets()
    filled = t.op("Where", t.const(masks[:, None, None]), t.const(np.array(params["value"], dtype=dtype)),
                  t.unsqueeze(name, [0]))
    rows = {x: b.tile_rows(x, m) for x in b.graph.inputs if x != name}
    rows[name] = b.merge(filled)
    b.feed(rows)
    start = INNER + b.start if b.start in b.graph.outputs else b.start
    flat = t.op("Reshape", start, t.ints([0, 0, -1]))
    index = t.op("Reshape", t.op("Tile", chosen, t.ints([m])), t.ints([-1, 1, 1]))
    picked = t.op("GatherElements", flat, index, axis=1)
    own = b.forward_start_value(chosen)
    drop = t.op("Sub", t.unsqueeze(own, [0]), t.op("Reshape", picked, t.ints([m, -1])))        # [M, N]
    weights = (masks / np.maximum(masks.sum(axis=0), 1)).reshape(m, -1).astype(dtype)          # [M, cells]
    cells = t.op("MatMul", t.op("Transpose", drop, perm=[1, 0]), t.const(weights, hint="occlusion"))
    per_cell = t.op("Reshape", cells, t.ints([-1, 1, *spatial]))
    out = LoopModel(onnx.ModelProto())
    out.attribution[name] = b.output(f"{OUT}attribution/{name}", t.op("Expand", per_cell, t.shape(name)),
                                     b.elem(name), shape)
    b.output(out.start_value, own, b.elem(b.start), ["N"])
    out.model = b.assemble()
    return out


def occlusion_masks(spatial, patch: int, stride: int) -> np.ndarray:
    """``[M, *spatial]`` bool: one mask per patch, ``ceil((size − patch)/stride) + 1`` per axis (as
    Captum), the last one cut at the border."""
    starts = [range(0, -(-max(size - patch, 0) // stride) * stride + 1, stride) for size in spatial]
    corners = np.stack(np.meshgrid(*starts, indexing="ij"), axis=-1).reshape(-1, len(spatial))
    masks = np.zeros((len(corners), *spatial), dtype=bool)
    for i, corner in enumerate(corners):
        masks[(i,) + tuple(slice(c, c + patch) for c in corner)] = True
    return masks


LOOP_GRAPHS = {"integrated_gradients": _integrated_gradients, "smoothgrad": _smoothgrad,
               "occlusion": _occlusion}
