"""Compile model + rules into one ONNX model: the forward pass and the relevance pass together.

The reverse walk (RULES.md §1): every active tensor ``t`` gets an associated number ``a(t)``. The
pass starts at the start tensor (the chosen output, the input of a node bound to ``start``, or a
tensor the user names), visits the nodes on the relevance path in reverse topological order, asks
each node's rule for its inputs' numbers, and sums contributions where a tensor feeds several
nodes. It finishes at the float graph inputs, where the quantity turns ``a(x)`` into the
attribution, and at the embedding lookups of integer token-id inputs (``Graph.sources``), whose
attribution is ``Σ_e view(emb, a(emb))`` over the embedding axes: one number per token, shaped like
the ids (under the difference quantity against the zero embedding).

Graph inputs of the compiled model: the model's own, plus ``rulegraph/target`` (int64 [N], a class
index per batch row in ``0..C-1``, or ``-1`` for the arg-max; any other value makes that row's
attribution NaN) and, when the start tensor has position axes (``targets.py``),
``rulegraph/positions`` (float, the start's shape without the class axis, batch first: weights of
the positions), or in seed mode ``rulegraph/seed`` (a float array shaped like the start tensor);
under the difference quantity also ``rulegraph/baseline/<input>``
per float input, on which a copy of the path's forward nodes runs in the same model. Outputs: the model's own, then those named in ``Compiled``.

Names: the public inputs keep the names above unless the user's model already uses them (then a
suffix ``_1``, ``_2``, ... is added and ``Compiled.target_input`` / ``seed_input`` /
``baseline_inputs`` record the name); every other tensor, node and initializer rulegraph adds
starts with a prefix (``rg/``, else ``rg1/``, ...) no name of the user's model starts with, and
``Compiled.origins`` says, per added name, which node's backward (or baseline copy) it belongs to.
The explainer carries metadata ``rulegraph.explainer_of`` (the original outputs): given again as a
model, it is refused (``model_check``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from .emit import Tape, free_name, free_prefix
from .errors import CoverageError, InternalError, ModelError, RulegraphError
from .fusion import emit_copy, evaluate, vjp_of
from .graph import Graph, Node
from .kinds import NORMALIZING, ROUTE
from . import unsupported
from .model_check import explainer_metadata
from .rules import APPROXIMATE, EXACT, LEAKS_BIAS, RULES
from .ruleset import AmbiguousBinding, Binding, NodeInfo, RuleSet
from .targets import StartSpec, batch_dim, relocate, start_spec
from .vjp import LINEAR_BIAS, LINEAR_PARAMS, VJPS, WINDOW_SUMS, VjpContext

TARGET = "rulegraph/target"
SEED = "rulegraph/seed"
POSITIONS = "rulegraph/positions"
CLASS = "rulegraph/class"   # output: int64 [N], the class explained per row
BASELINE_PREFIX = "rulegraph/baseline/"


@dataclass(frozen=True)
class Assignment:
    """Which binding a node got (for ``rulegraph ops``); ``binding`` is None when it has none."""

    node: Node
    binding: Binding | None
    on_path: bool
    problem: str | None = None


@dataclass
class Compiled:
    """The explainer model and the names of what it computes."""

    model: onnx.ModelProto
    graph: Graph
    ruleset: RuleSet
    start_tensor: str
    seed_mode: bool
    spec: StartSpec | None = None   # the start's batch and class axes (targets.py)
    attribution: dict[str, str] = field(default_factory=dict)   # graph input -> output name
    saliency: dict[str, str] = field(default_factory=dict)
    bias_shares: dict[str, str] = field(default_factory=dict)   # node name -> output name [N]
    bias_total: str | None = None
    start_value: str = ""        # Σ view(start) per batch row [N]
    node_sums: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)  # node -> (in, out, bias)
    node_abs_sums: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # Σ|in|, Σ|out|
    baseline_inputs: dict[str, str] = field(default_factory=dict)  # graph input -> its baseline input
    model_outputs: list[str] = field(default_factory=list)
    target_input: str = TARGET   # the names of the public inputs and outputs in this explainer (module docstring)
    seed_input: str = SEED
    positions_input: str = POSITIONS
    class_output: str = CLASS
    #: every name rulegraph added -> what it belongs to in the user's terms ("the backward of node ...")
    origins: dict[str, str] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input]


class RuleContext(VjpContext):
    """What a rule emitter may read and call (rules.py); extends the VJP context."""

    def __init__(self, base: VjpContext, a_out, params, ruleset: RuleSet, bias_sink, baseline_of=None):
        super().__init__(base.node, base.graph, base.tape, base.active, base.request_output)
        self.baseline_of = baseline_of or {}
        self.a_out = a_out
        self.params = params
        self.quantity = ruleset.quantity
        self.bias_policy = ruleset.bias
        self.kind = base.node.kind
        self._bias_sink = bias_sink

    def vjp(self, g: list[str | None]) -> list[str | None]:
        return _run_vjp(self, g)

    def baseline(self, tensor: str) -> str:
        """``t'``: the tensor computed on the baseline input (difference quantity only)."""
        if tensor not in self.baseline_of:
            raise self.fail(f"rule needs the baseline forward pass (quantity difference); "
                            f"'{tensor}' has none under quantity {self.quantity}")
        return self.baseline_of[tensor]

    def linear_bias(self) -> str | None:
        """The bias of a linear op as a tensor name, or None: its constant part, plus for Add, Sub and
        Sum the operands that are not activations (``inactive_operands``)."""
        fn = LINEAR_BIAS.get(self.node.op_type)
        value = None if fn is None else fn(self)
        constant = None
        if isinstance(value, str):   # a bias computed in the graph (a tensor name)
            constant = value
        elif value is not None and np.any(value):
            constant = self.tape.const(np.asarray(value, dtype=self.tape.float_dtype), hint="bias")
        runtime = self._runtime_bias()
        if runtime is None or constant is None:
            return constant if runtime is None else runtime
        return self.tape.op("Add", constant, runtime)

    def inactive_operands(self) -> list[int]:
        """Indices of float operands computed at run time without the explained inputs (a position
        embedding looked up by Range-derived ids, an attention mask): no number flows into them, so
        what they add is a bias."""
        return [i for i, (t, act) in enumerate(zip(self.node.inputs, self.active))
                if t and not act and t not in self.graph.constants and self.graph.is_float(t)]

    def parts_of_constants(self) -> list[tuple[str, str]]:
        """For a route op: (operand, its part of ``a(y)``) for every float operand that is not an
        activation (a constant, or an inactive operand), where the op's VJP gives it one (Concat)."""
        flags = [bool(t) and not act and self.graph.is_float(t) for t, act in zip(self.node.inputs, self.active)]
        if not any(flags):
            return []
        flipped = VjpContext(self.node, self.graph, self.tape, flags, self.request_output)
        parts = _run_vjp(flipped, self.a_out)
        return [(t, p) for t, p in zip(self.node.inputs, parts) if p is not None]

    def _runtime_bias(self) -> str | None:
        """The inactive operands of Add, Sub, Sum as one bias tensor; infinities (a mask's −∞) as 0."""
        t, node = self.tape, self.node
        indices = self.inactive_operands() if node.op_type in ("Add", "Sub", "Sum") else []
        if not indices:
            return None
        terms = [node.inputs[i] if node.op_type != "Sub" or i == 0 else t.op("Neg", node.inputs[i]) for i in indices]
        bias = t.sum(terms)
        return t.op("Where", t.is_inf(bias), t.scalar(0.0), bias)

    def report_bias(self, share: str) -> None:
        self._bias_sink(self.node, share)

    def value_at_zero(self) -> str | None:
        """``f(0)`` of an elementwise node (a fused one: its members) as a constant, or None when it is 0."""
        rank = self.graph.rank(self.x) or 1
        zero = np.zeros([1] * rank, dtype=self.tape.float_dtype)
        try:
            value = evaluate(self.graph, self.node, {self.x: zero})[0]
        except Exception as exc:
            raise self.fail(f"cannot evaluate f(0): {exc}") from exc
        if not np.any(value):
            return None
        return self.tape.const(np.asarray(value, dtype=self.tape.float_dtype), hint="f0")

    def variant(self, weight_fn, bias_fn=None) -> LinearVariant:
        """This linear op with constant weights ``weight_fn(w)`` and bias ``bias_fn(b)`` (no bias
        when ``bias_fn`` is None): the building block of the LRP family (Montavon et al. 2019)."""
        entry = LINEAR_PARAMS.get(self.node.op_type)
        if entry is None:
            raise self.fail(f"rule needs a Conv, Gemm or MatMul with constant weights, not {self.node.op_type}")
        weight_index, bias_index = entry(self)
        inputs = list(self.node.inputs)
        constants: dict[str, np.ndarray] = {}
        dtype = self.tape.float_dtype

        def put(index: int, value: np.ndarray) -> None:
            value = np.asarray(value, dtype=dtype)
            inputs[index] = self.tape.const(value, hint="w_mod")
            constants[inputs[index]] = value

        put(weight_index, weight_fn(self.const(weight_index).astype(np.float64)))
        if bias_index is not None and bias_index < len(inputs) and inputs[bias_index]:
            if bias_fn is None:
                inputs[bias_index] = ""
            else:
                put(bias_index, bias_fn(self.const(bias_index).astype(np.float64)))
        graph = replace(self.graph, constants={**self.graph.constants, **constants},
                        shapes={**self.graph.shapes, **{k: list(v.shape) for k, v in constants.items()}})
        node = replace(self.node, inputs=inputs)
        return LinearVariant(VjpContext(node, graph, self.tape, self.active, self.request_output),
                             1 - weight_index if weight_index < 2 else 0)

    def apply_node_to(self, a: str) -> str:
        """``f(a)``: the node (a fused one: its members) emitted again on ``a``."""
        return emit_copy(self.tape, self.node, [a] + self.node.inputs[1:])[0]

    def window_sum(self, xs: list[str | None]) -> str:
        return self._window(0)(self, xs)

    def window_sum_vjp(self, g: str) -> list[str | None]:
        return self._window(1)(self, g)

    def _window(self, i: int):
        entry = WINDOW_SUMS.get(self.node.op_type)
        if entry is None:
            raise self.fail(f"the radial rule has no window for {self.node.op_type}; it supports "
                            f"{', '.join(sorted(WINDOW_SUMS))}")
        return entry[i]


@dataclass
class LinearVariant:
    """A linear op with modified weights: its forward on any input, and its VJP."""

    ctx: VjpContext
    activation_index: int

    def forward(self, x: str) -> str:
        """The modified op applied to ``x`` (no bias unless the variant kept one)."""
        inputs = list(self.ctx.node.inputs)
        inputs[self.activation_index] = x
        return self.ctx.tape.copy_node(self.ctx.node, inputs)

    def transpose(self, g: str) -> str:
        """``Lᵀg`` of the modified op with respect to its activation input."""
        return _run_vjp(self.ctx, [g] + [None] * (len(self.ctx.node.outputs) - 1))[self.activation_index]


def _run_vjp(ctx: VjpContext, g: list[str | None]) -> list[str | None]:
    fn = vjp_of(ctx.node)
    if fn is None:
        raise ctx.fail(f"no VJP for op type {ctx.node.op_type}; supported: {', '.join(sorted(VJPS))}")
    result = fn(ctx, g)
    if len(result) != len(ctx.node.inputs):
        raise AssertionError(f"VJP of {ctx.node.op_type} returned {len(result)} entries for "
                             f"{len(ctx.node.inputs)} inputs")
    return [r if active else None for r, active in zip(result, ctx.active)]


# --------------------------------------------------------------------------------------------------
# which nodes are on the path, and which binding each gets


def path_nodes(graph: Graph, start_tensor: str) -> list[Node]:
    """Nodes on an active path from a float input to ``start_tensor``, in topological order.

    Walks back from the start over active tensors only, so shape computations (Shape, Gather on
    shapes) that feed a Reshape's integer input are not on the path.
    """
    needed = {start_tensor}
    on_path: list[Node] = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs if o):
            active_inputs = [t for t in node.inputs if t in graph.active]
            if active_inputs:
                on_path.append(node)
                needed.update(active_inputs)
    return list(reversed(on_path))


def node_infos(nodes: list[Node], graph: Graph | None = None) -> dict[str, NodeInfo]:
    """What selectors see of each node; with ``graph``, also which nodes are at the end of the model."""
    first: dict[str, str] = {}
    last: dict[str, str] = {}
    for n in nodes:
        first.setdefault(n.op_type, n.name)
        last[n.op_type] = n.name
    ends = end_nodes(graph) if graph is not None else {n.name for n in nodes}
    return {n.name: NodeInfo(n.name, n.op_type, n.kind or "unknown", first[n.op_type] == n.name,
                             last[n.op_type] == n.name, n.name in ends) for n in nodes}


def end_nodes(graph: Graph) -> set[str]:
    """Nodes whose output reaches a graph output through route ops alone: for every output, the
    route nodes producing it and the first other node behind them (a final Softmax)."""
    ends: set[str] = set()
    for output in graph.outputs:
        node = graph.producer.get(output)
        while node is not None and node.name not in ends:
            ends.add(node.name)
            active = [t for t in node.inputs if t in graph.active]
            if node.kind != ROUTE or len(active) != 1:
                break
            node = graph.producer.get(active[0])
    return ends


def assign(graph: Graph, ruleset: RuleSet, nodes: list[Node], infos=None) -> list[Assignment]:
    """The binding of every node on the path, with a problem sentence where there is none."""
    infos = infos or node_infos(nodes, graph)
    out = []
    for n in nodes:
        try:
            binding = ruleset.binding_for(infos[n.name])
        except AmbiguousBinding as exc:
            out.append(Assignment(n, None, True, str(exc)))
            continue
        problem = _problem(n, binding, ruleset.quantity)
        if problem is None and binding is not None and binding.rule.name == unsupported.NAME:
            problem = unsupported.refusal(n, binding, ruleset.source)
        out.append(Assignment(n, binding, True, problem))
    return out


def _accepting(kind: str | None, op_type: str | None = None) -> list[str]:
    """The rules (but start) that accept ``kind``, and ``op_type`` where a rule names its op types."""
    return sorted(name for name, spec in RULES.items()
                  if kind in spec.kinds and name not in ("start", unsupported.NAME)
                  and (op_type is None or not spec.op_types or op_type in spec.op_types))


def _suggestion(kind: str, quantity: str, op_type: str) -> str:
    """A binding for an op of ``op_type`` and ``kind`` without a rule, from the rule table: the first
    accepting rule (registration order: the seed rules come first) that conserves ``quantity`` on it,
    exactly or up to ε, with its default parameters; else one that conserves it once biases are
    counted; else a sentence saying that no rule conserves it."""
    by_class: dict[str, list[str]] = {}
    accepting = set(_accepting(kind, op_type))
    for name in (n for n in RULES if n in accepting):
        params, problems = RULES[name].resolve_params({})
        if not problems:  # a rule with a required parameter cannot be suggested bare
            by_class.setdefault(RULES[name].conservation_of(quantity, kind, op_type, params), []).append(name)
    if conserving := [n for n in RULES if n in by_class.get(EXACT, []) + by_class.get(APPROXIMATE, [])]:
        return f"add a binding such as `{op_type} -> {conserving[0]}`"
    if leaking := by_class.get(LEAKS_BIAS):
        return (f"add a binding such as `{op_type} -> {leaking[0]}` (it conserves {quantity} on {kind} ops "
                "once biases are counted: `bias blame` or `bias total`)")
    return f"add a binding: no rule conserves {quantity} on {op_type} ({kind}) ops"


def _problem(node: Node, binding: Binding | None, quantity: str = "relevance") -> str | None:
    if node.kind is None:
        return (f"{node}: rulegraph does not know op type {node.op_type}; it knows "
                f"{', '.join(sorted(VJPS))}")
    if binding is None:
        extra = " (normalizing ops need an explicit rule, e.g. `Softmax -> start`)" if node.kind == NORMALIZING else ""
        hint = _suggestion(node.kind, quantity, node.op_type)
        return (f"{node}, kind {node.kind}, has no rule{extra}; {hint} "
                f"(rules accepting {node.kind}: {', '.join(_accepting(node.kind))})")
    spec = RULES[binding.rule.name]
    if node.kind not in spec.kinds:
        return (f"{node} is {node.kind}, but '{binding.selector} -> {binding.rule}' at {binding.location} "
                f"binds rule '{spec.name}', which accepts {', '.join(sorted(spec.kinds))}; rules "
                f"accepting {node.kind}: {', '.join(_accepting(node.kind))}")
    if spec.op_types and node.op_type not in spec.op_types:
        return (f"{node}: '{binding.selector} -> {binding.rule}' at {binding.location} binds rule "
                f"'{spec.name}', which is defined for {', '.join(sorted(spec.op_types))} only; rules accepting "
                f"{node.op_type}: {', '.join(_accepting(node.kind, node.op_type))}")
    return None


def find_start(graph: Graph, ruleset: RuleSet, output: str | None, start_tensor: str | None) -> str:
    """The tensor the pass starts at (see the module docstring)."""
    if start_tensor is not None:
        if start_tensor not in graph.active:
            raise RulegraphError(f"cannot start at tensor '{start_tensor}': it is not an activation "
                                 "computed from a float input of the model")
        return start_tensor
    if output is None:
        output = graph.outputs[0]
    elif output not in graph.outputs:
        raise RulegraphError(f"the model has no output '{output}'; its outputs: {', '.join(graph.outputs)}")
    candidates = path_nodes(graph, output)
    infos = node_infos(candidates, graph)
    starts = []
    for n in candidates:
        try:
            b = ruleset.binding_for(infos[n.name])
        except AmbiguousBinding:
            continue
        if b is not None and b.rule.name == "start":
            starts.append(n)
    if not starts:
        if output not in graph.active:
            raise RulegraphError(f"output '{output}' does not depend on a float input of the model")
        return output
    # the start node nearest the input wins only if it is unique on every path; keep it simple
    node = starts[-1] if len(starts) == 1 else None
    if node is None:
        names = ", ".join(str(n) for n in starts)
        raise RulegraphError(f"several nodes are bound to 'start' on the way to '{output}': {names}; "
                             "bind 'start' to one of them with node \"...\"")
    return node.inputs[0]


# --------------------------------------------------------------------------------------------------
# compile


def compile_explainer(graph: Graph, ruleset: RuleSet, output: str | None = None,
                      start_tensor: str | None = None, seed_mode: bool = False,
                      node_sums: bool = False, class_axis: int | None = None) -> Compiled:
    """Build the explainer model (forward + relevance pass) and check it with onnx.checker.

    ``node_sums`` adds, per node on the path, three [N] outputs (RULES.md §5): Σ of the conserved
    view over what the node gives its inputs, over its outputs' numbers, and over its bias shares,
    so one run measures every node's conservation. ``class_axis``: the start tensor's class axis
    when the default (``targets.py``) does not apply.
    """
    unknown = [x for x in graph.inputs if graph.rank(x) is None]
    if unknown:
        raise ModelError(f"input '{unknown[0]}' is declared without a shape and no consumer fixes its rank: "
                         "explain the model with an input array (the rank is taken from it), or re-export "
                         "it with input shapes")
    found = find_start(graph, ruleset, output, start_tensor)
    start = relocate(graph, found)   # before a Flatten/Reshape that folded the batch: same seed
    axes = start_spec(graph, start, output, class_axis, found)
    nodes = path_nodes(graph, start)
    assignments = assign(graph, ruleset, nodes)
    problems = [a.problem for a in assignments if a.problem]
    if problems:
        raise CoverageError(f"{ruleset.source}: {len(problems)} node(s) cannot be explained:\n  - "
                            + "\n  - ".join(problems))

    dtype = helper.tensor_dtype_to_np_dtype(graph.dtypes.get(start, TensorProto.FLOAT))
    taken = _names_in(graph)
    tape = Tape(graph.opset, taken, float_dtype=dtype, prefix=free_prefix(taken))
    compiled = Compiled(graph.model, graph, ruleset, start, seed_mode, axes, target_input=free_name(TARGET, taken),
                        seed_input=free_name(SEED, taken), positions_input=free_name(POSITIONS, taken),
                        class_output=free_name(CLASS, taken))
    rows = _rows(tape, graph, axes)
    extra_outputs: dict[str, dict[int, str]] = {}

    def request_output(node: Node, index: int) -> str:
        if index < len(node.outputs) and node.outputs[index]:
            return node.outputs[index]
        slots = extra_outputs.setdefault(node.name, {})
        if index not in slots:
            slots[index] = tape.fresh(f"{node.op_type}_out{index}")
        return slots[index]

    bias_terms: dict[str, list[str]] = {}

    def bias_sink(node: Node, share: str) -> None:
        bias_terms.setdefault(node.name, []).append(share)

    baseline_of = _baseline_forward(tape, graph, nodes, taken) if ruleset.quantity == "difference" else {}
    view = _Views(tape, ruleset.quantity, baseline_of)
    a: dict[str, list[str]] = {start: [_seed(tape, graph, ruleset, axes, seed_mode, compiled, view, rows)]}
    for assignment in reversed(assignments):
        node, binding = assignment.node, assignment.binding
        a_out = [tape.sum(a[o]) if o in a else None for o in node.outputs]
        if all(x is None for x in a_out):
            continue
        active = [t in graph.active for t in node.inputs]
        tape.scope, tape.context = f"{node.name}/", f"the backward of {node}"
        base = VjpContext(node, graph, tape, active, request_output)
        spec = RULES[binding.rule.name]
        ctx = RuleContext(base, a_out, dict(binding.rule.params), ruleset, bias_sink, baseline_of)
        try:
            result = spec.emit(ctx)
        except RulegraphError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ModelError(f"{node}: rule '{spec.name}' failed: {exc}") from exc
        if len(result) != len(node.inputs):
            raise AssertionError(f"rule '{spec.name}' on {node} returned {len(result)} entries for "
                                 f"{len(node.inputs)} inputs")
        for tensor, contribution in zip(node.inputs, result):
            if contribution is not None and tensor in graph.active:
                a.setdefault(tensor, []).append(contribution)
        if node_sums:
            compiled.node_sums[node.name], compiled.node_abs_sums[node.name] = _node_sums(
                tape, view, node, a_out, result, bias_terms.get(node.name, []), graph, rows)
    tape.scope, tape.context = "", "rulegraph's attribution outputs"

    outputs = _finish(tape, graph, ruleset, a, compiled, bias_terms, view, rows)
    if compiled.node_sums:
        row = _row_dims(graph, axes)
        outputs.update({name: row for sums in (*compiled.node_sums.values(), *compiled.node_abs_sums.values())
                        for name in sums if name})
    compiled.baseline_inputs = {x: baseline_of[x] for x in graph.float_inputs() if x in baseline_of}
    extra_inputs, typed_outputs = _target_io(graph, axes, seed_mode, compiled)
    compiled.model = _assemble(graph, tape, extra_outputs, outputs, compiled, extra_inputs, typed_outputs)
    compiled.origins = {**tape.origins, compiled.target_input: "rulegraph's target input",
                        compiled.seed_input: "rulegraph's seed input",
                        compiled.positions_input: "rulegraph's positions input",
                        **{b: f"the baseline of input '{x}'" for x, b in compiled.baseline_inputs.items()}}
    return compiled


def _names_in(graph: Graph) -> set[str]:
    """Every name the user's model uses: tensors, nodes, initializers, inputs and outputs."""
    g = graph.model.graph
    names = {t for n in g.node for t in list(n.input) + list(n.output)} | {n.name for n in g.node}
    names |= {i.name for i in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
    names |= {t for n in graph.nodes for m in n.members or [n] for t in m.inputs + m.outputs + [m.name]}
    return names | set(graph.constants)


def _node_sums(tape: Tape, view: _Views, node: Node, a_out, a_in, bias_shares, graph: Graph, rows: str):
    """((Σ view over what the node gives its inputs, Σ view over its outputs, Σ bias shares),
    (Σ |view| over what it gives its inputs, Σ |view| over its outputs)), each [N]; None where
    there is nothing to sum. The magnitudes measure the node's amplification (amplification.py)."""

    def totals(pairs) -> tuple[str | None, str | None]:
        views = [view(t, v) for t, v in pairs if v is not None and t in graph.active]
        if not views:
            return None, None
        signed = [_row_sum(tape, v, rows) for v in views]
        magnitude = [_row_sum(tape, tape.op("Abs", v), rows) for v in views]
        return tuple(tape.sum(terms) if len(terms) > 1 else tape.op("Identity", terms[0])
                     for terms in (signed, magnitude))

    bias = _row_sum(tape, tape.sum(bias_shares), rows) if bias_shares else None
    (given, given_abs), (outs, outs_abs) = totals(zip(node.inputs, a_in)), totals(zip(node.outputs, a_out))
    return (given, outs, bias), (given_abs, outs_abs)


def _rows(tape: Tape, graph: Graph, spec: StartSpec) -> str:
    """The batch size as an int64 [1] tensor: the first input's first dimension at run time, or 1
    when the start has no batch axis (the model is explained as one sample)."""
    first = next((i for i in graph.inputs if graph.rank(i)), None)
    if not spec.batched or first is None:
        return tape.ints([1])
    return tape.shape(first, start=0, end=1)


def _row_dims(graph: Graph, spec: StartSpec) -> list:
    """The declared shape of a per-row output."""
    batch = batch_dim(graph) if spec.batched else 1
    return [batch if batch is not None else "N"]


def _row_sum(tape: Tape, x: str, rows: str) -> str:
    """Σ over every axis but the batch: [N, ...] -> [N]. ``x`` is reshaped to [N, -1], so a tensor
    that carries the batch folded into its first axis as the outermost factor (``[N·T, C]`` after a
    Flatten) is summed per row too."""
    flat = tape.op("Reshape", x, tape.op("Concat", rows, tape.ints([-1]), axis=0))
    return tape.reduce_sum(flat, [1], keepdims=False)


class _Views:
    """The conserved view of a tensor (RULES.md §1): ``a`` (relevance), ``t ⊙ a`` (importance),
    ``(t − t') ⊙ a`` (difference; ``t'`` from the baseline forward pass)."""

    def __init__(self, tape: Tape, quantity: str, baseline_of: dict[str, str]):
        self.tape, self.quantity, self.baseline_of = tape, quantity, baseline_of
        self._deltas: dict[str, str] = {}

    def delta(self, tensor: str) -> str:
        if tensor not in self._deltas:
            self._deltas[tensor] = self.tape.op("Sub", tensor, self.baseline_of[tensor])
        return self._deltas[tensor]

    def __call__(self, tensor: str, a: str) -> str:
        if self.quantity == "relevance":
            return a
        if self.quantity == "difference":
            return self.tape.op("Mul", self.delta(tensor), a)
        return self.tape.op("Mul", tensor, a)


def _baseline_forward(tape: Tape, graph: Graph, nodes: list[Node], taken: set[str]) -> dict[str, str]:
    """Copies of the path's nodes on the baseline inputs ``rulegraph/baseline/<input>``: every
    active tensor ``t`` gets its baseline twin ``t'`` in the same compiled run."""
    baseline_of = {x: free_name(f"{BASELINE_PREFIX}{x}", taken) for x in graph.float_inputs()}
    tape.context = "the baseline's forward pass"
    # **decision**: an embedding lookup's baseline is the zero embedding, whatever ``baseline`` says
    baseline_of.update({emb: tape.zeros_like(emb) for emb in graph.sources})
    for node in nodes:
        tape.context = f"the baseline copy of {node}"
        inputs = [baseline_of.get(t, t) for t in node.inputs]
        outputs = emit_copy(tape, node, inputs)
        baseline_of.update({o: b for o, b in zip(node.outputs, outputs) if o in graph.active})
    return baseline_of


def _seed(tape: Tape, graph: Graph, ruleset: RuleSet, spec: StartSpec, seed_mode: bool, compiled: Compiled,
          view: _Views, rows: str) -> str:
    """``a(start)``: ``y ⊙ s`` (relevance, or ``start output``) or ``s``, with ``s`` the seed array
    (seed mode) or ``onehot(c) ⊙ w`` (``targets.py``; NaN in rows whose target is out of range)."""
    start = spec.tensor
    tape.context = f"the seed at the start tensor '{start}'"
    onehot = compiled.seed_input if seed_mode else _onehot(tape, graph, spec.require_class_axis(), compiled)
    mode = ruleset.start or ("output" if ruleset.quantity == "relevance" else "one")
    seed = tape.op("Mul", start, onehot) if mode == "output" else onehot
    compiled.start_value = _row_sum(tape, view(start, seed), rows)
    return seed


def _onehot(tape: Tape, graph: Graph, spec: StartSpec, compiled: Compiled) -> str:
    """``onehot_k(c) ⊙ w`` shaped like the start: ``c`` from ``rulegraph/target`` (``-1``: the class
    maximizing ``Σ_positions w ⊙ y``), ``w`` from ``rulegraph/positions`` (position axes only)."""
    k, rank = spec.vclass, len(spec.vshape)
    y = spec.tensor if spec.batched else tape.unsqueeze(spec.tensor, [0])
    weights = None
    if spec.position_axes:
        weights = tape.unsqueeze(tape.op("Cast", compiled.positions_input, to=tape.float_type), [k])
    scores = y if weights is None else tape.op("Mul", y, weights)
    if spec.position_axes:
        scores = tape.reduce_sum(scores, spec.position_axes, keepdims=True)
    argmax = tape.op("ArgMax", scores, axis=k, keepdims=1)
    one = [1] * (rank - 1)
    target = tape.op("Reshape", compiled.target_input, tape.ints([-1] + one))
    chosen = tape.op("Where", tape.op("Equal", target, tape.ints([-1])), argmax, target)
    count = tape.shape(y, start=k, end=k + 1)
    valid = tape.op("And", tape.op("GreaterOrEqual", chosen, tape.ints([0])), tape.op("Less", chosen, count))
    classes = tape.op("Range", tape.const(np.array(0, dtype=np.int64)), tape.op("Squeeze", count),
                      tape.const(np.array(1, dtype=np.int64)))
    classes = tape.op("Reshape", classes, tape.ints([1] * k + [-1] + [1] * (rank - k - 1)))
    onehot = tape.op("Cast", tape.op("Equal", classes, chosen), to=tape.float_type)
    if weights is not None:
        onehot = tape.op("Mul", onehot, weights)
    onehot = tape.op("Where", valid, onehot, tape.scalar(float("nan")))
    tape.nodes.append(helper.make_node("Reshape", [chosen, tape.ints([-1])], [compiled.class_output],
                                      name=compiled.class_output))
    return onehot if spec.batched else tape.op("Squeeze", onehot, tape.ints([0]))


def _target_io(graph: Graph, spec: StartSpec, seed_mode: bool, compiled: Compiled):
    """The target's extra inputs (``rulegraph/positions``) and typed outputs (``rulegraph/class``)."""
    if seed_mode:
        return [], []
    row = _row_dims(graph, spec)
    inputs = []
    spec.require_class_axis()
    if spec.position_axes:
        dims = [d if d is not None else f"rulegraph_d{a}" for a, d in enumerate(spec.vshape) if a != spec.vclass]
        inputs.append(helper.make_tensor_value_info(compiled.positions_input, TensorProto.FLOAT, [row[0]] + dims[1:]))
    return inputs, [helper.make_tensor_value_info(compiled.class_output, TensorProto.INT64, row)]


def _finish(tape: Tape, graph: Graph, ruleset: RuleSet, a, compiled: Compiled, bias_terms, view, rows) -> dict:
    """Attribution per float input (``R = a(x)``, ``x ⊙ a(x)`` or ``(x − x') ⊙ a(x)``) and the
    saliency ``a(x)`` where the quantity has one; bias shares; the new outputs with their shapes."""
    for x in graph.float_inputs():
        ax = tape.sum(a[x]) if x in a else tape.zeros_like(x)
        if ruleset.quantity == "relevance":
            compiled.attribution[x] = tape.op("Identity", ax)
        else:
            compiled.saliency[x] = tape.op("Identity", ax)
            compiled.attribution[x] = view(x, ax)
    compiled.attribution.update(_token_attribution(tape, graph, a, view))
    outputs = {o: graph.shapes.get(x) for d in (compiled.attribution, compiled.saliency) for x, o in d.items()}
    row = _row_dims(graph, compiled.spec)
    if ruleset.bias in ("blame", "total") and bias_terms:
        per_node = {name: _row_sum(tape, tape.sum(terms), rows) for name, terms in bias_terms.items()}
        compiled.bias_total = tape.sum(list(per_node.values())) if len(per_node) > 1 else tape.op("Identity", next(iter(per_node.values())))
        outputs[compiled.bias_total] = row
        if ruleset.bias == "blame":
            compiled.bias_shares = per_node
            outputs.update({o: row for o in per_node.values()})
    outputs[compiled.start_value] = row
    return outputs


def _token_attribution(tape: Tape, graph: Graph, a, view: _Views) -> dict[str, str]:
    """Per integer input holding token ids (``Graph.sources``): ``Σ_e view(emb, a(emb))`` over the
    embedding axes of every lookup of those ids, shaped like the ids."""
    out = {}
    for ids in dict.fromkeys(graph.sources.values()):
        per_lookup = []
        for emb, source_ids in graph.sources.items():
            if source_ids != ids or emb not in a:
                continue
            table = graph.constants[graph.producer[emb].inputs[0]]
            rank = graph.rank(emb)
            if rank is None:
                raise ModelError(f"the rank of the embedding lookup '{emb}' is unknown")
            summed = tape.reduce_sum(view(emb, tape.sum(a[emb])), list(range(rank - table.ndim + 1, rank)),
                                     keepdims=False)
            per_lookup.append(tape.reshape_like(summed, ids))
        out[ids] = tape.op("Identity", tape.sum(per_lookup)) if per_lookup else tape.zeros_like(ids)
    return out


def _assemble(graph: Graph, tape: Tape, extra_outputs, outputs: dict[str, list | None], compiled: Compiled,
              extra_inputs=(), typed_outputs=()) -> onnx.ModelProto:
    seed_mode, start, baseline_inputs = compiled.seed_mode, compiled.start_tensor, compiled.baseline_inputs
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    g = model.graph
    for node in g.node:
        for index, name in extra_outputs.get(node.name, {}).items():
            while len(node.output) <= index:
                node.output.append("")
            node.output[index] = name
    g.node.extend(tape.nodes)
    g.initializer.extend(tape.initializers)
    if seed_mode:
        elem = graph.dtypes.get(start, TensorProto.FLOAT)
        g.input.append(helper.make_tensor_value_info(compiled.seed_input, elem, graph.shapes.get(start)))
    else:
        g.input.append(helper.make_tensor_value_info(compiled.target_input, TensorProto.INT64, ["N"]))
    for x, name in baseline_inputs.items():
        g.input.append(helper.make_tensor_value_info(name, graph.dtypes[x], graph.shapes.get(x)))
    g.input.extend(extra_inputs)
    g.output.extend(typed_outputs)
    existing = {o.name for o in g.output}
    for out in g.output:  # outputs declared without a shape take the inferred one
        tensor_type = out.type.tensor_type
        if not tensor_type.HasField("shape") and graph.shapes.get(out.name) is not None:
            elem_type = tensor_type.elem_type or graph.dtypes.get(out.name, TensorProto.FLOAT)
            out.CopyFrom(helper.make_tensor_value_info(out.name, elem_type, graph.shapes[out.name]))
    elem = graph.dtypes.get(start, TensorProto.FLOAT)
    for name, shape in list(outputs.items()) + [(start, graph.shapes.get(start))]:
        if name not in existing:
            dims = shape if shape is not None else []
            g.output.append(helper.make_tensor_value_info(name, elem, dims))
            existing.add(name)
    _prune(model)
    model.metadata_props.append(explainer_metadata([o.name for o in graph.model.graph.output]))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"the compiled explainer is not valid ONNX: {exc}") from exc
    return model


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing downstream uses (e.g. bias shares under ``absorb``)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
