"""The plan: which nodes are on the relevance path, where it starts, which binding each node gets
(and why a node cannot be explained)."""

from __future__ import annotations

from dataclasses import dataclass

from ..backward import unsupported
from ..backward.ops import VJPS
from ..backward.rules import APPROXIMATE, EXACT, LEAKS_BIAS, RULES
from ..backward.transformer import held_operands
from ..errors import RulegraphError
from ..graph.kinds import NORMALIZING, ROUTE
from ..graph.read import Graph, Node
from ..lang.ruleset import AmbiguousBinding, Binding, NodeInfo, RuleSet
from .refusal import refusal


#: what ``rulegraph ops`` shows for a node whose relevance is held constant by the products it feeds
HELD = "held constant (gets nothing)"


@dataclass(frozen=True)
class Assignment:
    """Which binding a node got (for ``rulegraph ops``); ``binding`` is None when it has none."""

    node: Node
    binding: Binding | None
    on_path: bool
    problem: str | None = None
    #: on the path, but only through operands that products' rules hold constant: it gets nothing and
    #: needs no rule
    held: bool = False


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
            problem = refusal(n, binding, ruleset.source)
        out.append(Assignment(n, binding, True, problem))
    reached = _reached(graph, out)
    return [a if a.node.name in reached else Assignment(a.node, a.binding, True, held=True) for a in out]


def _reached(graph: Graph, assignments: list[Assignment]) -> set[str]:
    """The nodes that relevance reaches: walking back from the path's end, a product passes nothing to
    an operand its rule holds constant (``transformer.held_operands``), so the nodes only such an
    operand reads get nothing and need no rule (ResNeSt's and SKNet's branch Softmax under a CNN file)."""
    if not assignments:
        return set()
    needed = set(assignments[-1].node.outputs)
    reached: set[str] = set()
    for a in reversed(assignments):
        if not any(o in needed for o in a.node.outputs if o):
            continue
        reached.add(a.node.name)
        held = held_operands(graph, a.node, a.binding.rule) if a.binding is not None else set()
        needed.update(t for i, t in enumerate(a.node.inputs) if i not in held and t in graph.active)
    return reached


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
