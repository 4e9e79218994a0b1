"""Compile model + rules into one ONNX model: the forward pass and the relevance pass together.

The reverse walk (docs/rules.md, quantities): every active tensor ``t`` gets an associated number
``a(t)``. The
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

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..backward.emit import Tape, free_name, free_prefix
from ..backward.fused import emit_copy
from ..backward.reverse import checked, walk_back
from ..backward.rules import RULES
from ..backward.vjp import VjpContext
from ..errors import CoverageError, InternalError, ModelError, RulegraphError
from ..graph import large
from ..graph.model_check import SEED, TARGET, checkable, explainer_metadata
from ..graph.read import Graph, Node, sort_nodes
from ..lang.ruleset import RuleSet
from . import mixed, simplify
from .context import RuleContext
from .form import STANDARD, emitter, pass_ruleset
from .plan import assign, find_start, path_nodes
from .targets import StartSpec, batch_axes, batch_dim, relocate, start_spec

POSITIONS = "rulegraph/positions"
CLASS = "rulegraph/class"   # output: int64 [N], the class explained per row
BASELINE_PREFIX = "rulegraph/baseline/"


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
    #: ``at=`` tensors (latent relevance, ``layers.py``): tensor -> output of ``a(t)``, and of its view
    #: (the attribution at ``t``: ``a(t)``, ``t ⊙ a(t)`` or ``(t − t') ⊙ a(t)``), both shaped like ``t``
    at_numbers: dict[str, str] = field(default_factory=dict)
    at_attribution: dict[str, str] = field(default_factory=dict)
    seed: str = ""   # the tensor ``a(start)`` the pass starts from (``_seed``)
    #: ``"standard"``, or ``"gradient-x-input"``: the pass carries ``g`` with ``a = t ⊙ g`` (``form.py``)
    form: str = STANDARD
    #: the arrays of the big constants the backward added to a large model, held by ``model``'s stubs
    held: list = field(default_factory=list, repr=False)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input]


# --------------------------------------------------------------------------------------------------
# compile


def compile_explainer(graph: Graph, ruleset: RuleSet, output: str | None = None,
                      start_tensor: str | None = None, seed_mode: bool = False,
                      node_sums: bool = False, class_axis: int | None = None,
                      at: tuple[str, ...] = (), form: str = STANDARD, relevance_dtype=None) -> Compiled:
    """Build the explainer model (forward + relevance pass) and check it with onnx.checker.

    ``relevance_dtype``: the backward's float type when it is not the start tensor's (float32 for
    an fp16/bf16 model read in its own type: ``mixed.py``).

    ``node_sums`` adds, per node on the path, three [N] outputs (docs/rules.md, conservation
    classes): Σ of the conserved view over what the node gives its inputs, over its outputs'
    numbers, and over its bias shares, so one run measures every node's conservation. ``class_axis``: the start tensor's class axis
    when the default (``targets.py``) does not apply. ``at``: intermediate tensors whose number
    ``a(t)`` and attribution are extra outputs of the same run (``Compiled.at_numbers``, ``at_attribution``).
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
    user_rules, ruleset = ruleset, pass_ruleset(ruleset, form, assignments)

    forward_dtype = helper.tensor_dtype_to_np_dtype(graph.dtypes.get(start, TensorProto.FLOAT))
    dtype = np.dtype(relevance_dtype) if relevance_dtype is not None else forward_dtype
    taken = _names_in(graph)
    tape = Tape(graph.opset, taken, float_dtype=dtype, prefix=free_prefix(taken))
    tape.hold = large.holds(graph.model)
    compiled = Compiled(graph.model, graph, user_rules, start, seed_mode, axes, target_input=free_name(TARGET, taken),
                        seed_input=free_name(SEED, taken), positions_input=free_name(POSITIONS, taken),
                        class_output=free_name(CLASS, taken), form=form)
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
    binding_of = {assignment.node.name: assignment.binding for assignment in assignments}

    def apply_rule(node: Node, a_out: list[str | None]) -> list[str | None]:
        """The node's rule on the numbers of its outputs: one entry per input."""
        binding = binding_of[node.name]
        active = [t in graph.active for t in node.inputs]
        tape.scope, tape.context = f"{node.name}/", f"the backward of {node}"
        base = VjpContext(node, graph, tape, active, request_output)
        spec = RULES[binding.rule.name]
        ctx = RuleContext(base, a_out, dict(binding.rule.params), ruleset, bias_sink, baseline_of)
        try:
            result = checked(f"rule '{spec.name}' on {node}", node, emitter(spec.name, form)(ctx))
        except RulegraphError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ModelError(f"{node}: rule '{spec.name}' failed: {exc}") from exc
        if node_sums:
            compiled.node_sums[node.name], compiled.node_abs_sums[node.name] = _node_sums(
                tape, view, node, a_out, result, bias_terms.get(node.name, []), graph, rows, moved)
        return result

    moved = batch_axes(graph) if node_sums else {}   # where tensors carry the batch (node sums only)
    compiled.seed = _seed(tape, graph, ruleset, axes, seed_mode, compiled, view, rows)
    seeds = {start: [compiled.seed]}
    a = walk_back(tape, [assignment.node for assignment in assignments], seeds, graph.active, apply_rule)
    tape.scope, tape.context = "", "rulegraph's attribution outputs"

    outputs = _finish(tape, graph, ruleset, a, compiled, bias_terms, view, rows)
    outputs.update(_at_outputs(tape, graph, ruleset, a, compiled, view, at))
    if compiled.node_sums:
        row = _row_dims(graph, axes)
        outputs.update({name: row for sums in (*compiled.node_sums.values(), *compiled.node_abs_sums.values())
                        for name in sums if name})
    compiled.baseline_inputs = {x: baseline_of[x] for x in graph.float_inputs() if x in baseline_of}
    extra_inputs, typed_outputs = _target_io(graph, axes, seed_mode, compiled)
    compiled.model = _assemble(graph, tape, extra_outputs, outputs, compiled, extra_inputs, typed_outputs)
    if dtype != forward_dtype:
        tape.context = "the boundary between the half-precision forward and the float32 backward"
        mixed.keep_backward_in_float32(compiled.model, {n.name for n in tape.nodes}, graph.dtypes, tape.fresh)
    compiled.held = tape.held
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


def _node_sums(tape: Tape, view: _Views, node: Node, a_out, a_in, bias_shares, graph: Graph, rows: str,
               moved: dict[str, int]):
    """((Σ view over what the node gives its inputs, Σ view over its outputs, Σ bias shares),
    (Σ |view| over what it gives its inputs, Σ |view| over its outputs)), each [N]; None where
    there is nothing to sum. The magnitudes measure the node's amplification (amplification.py)."""

    def totals(pairs) -> tuple[str | None, str | None]:
        views = [(view(t, v), t) for t, v in pairs if v is not None and t in graph.active]
        if not views:
            return None, None
        firsts = [_batch_first(tape, graph, v, t, moved) for v, t in views]
        signed = [_row_sum(tape, v, rows) for v in firsts]
        magnitude = [_row_sum(tape, tape.op("Abs", v), rows) for v in firsts]
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


def _batch_first(tape: Tape, graph: Graph, x: str, like: str, moved: dict[str, int]) -> str:
    """``x``, shaped like the graph tensor ``like``, with the batch axis moved first where ``like``
    carries it elsewhere (time-major ``[T, N, H]`` of a recurrent op, a fused qkv ``[3, N, H, T, D]``):
    the axis of the batch symbol, found once in its declared shape, or where ``moved``
    (``targets.batch_axes``) followed it from the inputs."""
    batch, shape = batch_dim(graph), graph.shapes.get(like)
    if isinstance(batch, str) and shape and list(shape).count(batch) == 1:
        axis = list(shape).index(batch)
    else:   # no batch symbol in the inferred shape (TorchScript's unk dims)
        axis = moved.get(like, 0)
    rank = graph.rank(like)
    if axis == 0 or rank is None:
        return x
    return tape.op("Transpose", x, perm=[axis] + [i for i in range(rank) if i != axis])


def _row_sum(tape: Tape, x: str, rows: str) -> str:
    """Σ over every axis but the batch: [N, ...] -> [N]. ``x`` is reshaped to [N, -1], so a tensor
    that carries the batch folded into its first axis as the outermost factor (``[N·T, C]`` after a
    Flatten) is summed per row too."""
    flat = tape.op("Reshape", x, tape.op("Concat", rows, tape.ints([-1]), axis=0))
    return tape.reduce_sum(flat, [1], keepdims=False)


class _Views:
    """The conserved view of a tensor (docs/rules.md, quantities): ``a`` (relevance), ``t ⊙ a``
    (importance), ``(t − t') ⊙ a`` (difference; ``t'`` from the baseline forward pass)."""

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


def _at_outputs(tape: Tape, graph: Graph, ruleset: RuleSet, a, compiled: Compiled, view: _Views,
                at: tuple[str, ...]) -> dict:
    """``a(t)`` and its view for every ``at`` tensor (a tensor the pass reaches: on the path from
    the inputs to the start), and ``t`` itself, as outputs shaped like ``t``."""
    outputs = {}
    for t in at:
        if t not in a:
            raise ModelError(f"tensor '{t}' is not on the relevance path from the inputs to the start "
                             f"'{compiled.start_tensor}': the pass gives it no number; name a tensor "
                             "between the inputs and the start (rulegraph ops lists the nodes on the path)")
        number = tape.op("Identity", tape.sum(a[t]))
        compiled.at_numbers[t] = number
        compiled.at_attribution[t] = number if ruleset.quantity == "relevance" else view(t, number)
        outputs.update({number: graph.shapes.get(t), compiled.at_attribution[t]: graph.shapes.get(t),
                        t: graph.shapes.get(t)})
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
            per_lookup.append(_back_to_ids(tape, graph, summed, graph.producer[emb].inputs[1], ids))
        out[ids] = tape.op("Identity", tape.sum(per_lookup)) if per_lookup else tape.zeros_like(ids)
    return out


def _back_to_ids(tape: Tape, graph: Graph, number: str, indices: str, ids: str) -> str:
    """``number``, shaped like a lookup's ``indices``, shaped like the token ids: the ops between them
    (``read.TOKEN_ROUTES``) undone, the last first; a Transpose by its inverse permutation, the
    others keep the order (a reshape)."""
    while indices != ids:
        producer = graph.producer[indices]
        if producer.op_type == "Transpose":
            perm = producer.attr("perm") or list(range(graph.rank(producer.inputs[0]) or 0))[::-1]
            inverse = [int(i) for i in np.argsort(perm)]
            number = tape.op("Transpose", tape.reshape_like(number, indices), perm=inverse)
        indices = producer.inputs[0]
    return tape.reshape_like(number, ids)


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
        g.input.append(helper.make_tensor_value_info(compiled.target_input, TensorProto.INT64,
                                                     _row_dims(graph, compiled.spec)))
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
    if simplify.epsilon_ratios(g, tape):
        sort_nodes(model)
    prune(model)
    model.metadata_props.append(explainer_metadata([o.name for o in graph.model.graph.output]))
    try:
        onnx.checker.check_model(checkable(large.without_weights(model)))
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"the compiled explainer is not valid ONNX: {exc}") from exc
    return model


def prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing downstream of the outputs uses (bias shares under
    ``absorb``; the loop model's unused copies), counting the names a subgraph reads from the outer
    scope as used."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
