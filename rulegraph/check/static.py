"""The static check: every node on the path has a rule that accepts it, and each node's
conservation class is predicted from the rule table without running anything (docs/rules.md, conservation
classes).

Conservation per node: ``Σ view(what the node gives its inputs) + Σ bias shares = Σ view(its
outputs' numbers)``. Each (rule, quantity, kind) has a class: exact, approximate (ε), leaks bias
(exact once biases are blamed) or none; ``predict_node`` derives it per node.
"""

from __future__ import annotations

from ..backward.emit import Tape
from ..backward.rules import APPROXIMATE, EXACT, LEAKS_BIAS, NONE, RULES
from ..backward.vjp import VjpContext
from ..compile.context import RuleContext
from ..compile.plan import Assignment, assign, find_start, path_nodes
from ..errors import RulegraphError
from ..graph.kinds import LINEAR
from ..graph.read import Graph
from ..lang.parse import bundled_rule_names
from ..lang.ruleset import RuleSet
from .report import COUNTED_BIAS, SEVERITY, Diagnostic, NodeCheck


def _context(graph: Graph, assignment: Assignment, ruleset: RuleSet) -> RuleContext:
    node = assignment.node
    tape = Tape(graph.opset, set())
    base = VjpContext(node, graph, tape, [t in graph.active for t in node.inputs], lambda n, i: "")
    params = dict(assignment.binding.rule.params) if assignment.binding else {}
    return RuleContext(base, [None] * len(node.outputs), params, ruleset, lambda n, s: None)


def _has_bias(ctx: RuleContext, spec) -> bool:
    """Does the rule give a bias a share on this node: the rule's own answer, else (a rule that counts
    the bias in its denominators) whether the linear op has one."""
    if spec.has_bias is not None:
        return spec.has_bias(ctx)
    return ctx.kind == LINEAR and spec.bias_in_denominator and ctx.linear_bias() is not None


def predict_node(graph: Graph, assignment: Assignment, ruleset: RuleSet) -> tuple[str, str]:
    """(class, cause) of one node (docs/rules.md, conservation classes), counting its bias, the policy
    and ε."""
    node, rule = assignment.node, assignment.binding.rule
    spec = RULES[rule.name]
    quantity, policy = ruleset.quantity, ruleset.bias
    cls = spec.conservation_of(quantity, node.kind, node.op_type, rule.params)
    if cls != NONE and any(p.name == "eps" for p in spec.params):  # a stabilizer: exact at ε = 0
        cls = APPROXIMATE if rule.params.get("eps", 0) > 0 else EXACT
    ctx = _context(graph, assignment, ruleset)
    has_bias = quantity != "difference" and _has_bias(ctx, spec)
    counted = policy in COUNTED_BIAS or (spec.bias_in_denominator and policy == "ignore")
    if cls == LEAKS_BIAS:
        cls = EXACT if not has_bias or counted else LEAKS_BIAS
    elif cls in (EXACT, APPROXIMATE) and has_bias and not counted:
        cls = LEAKS_BIAS
    causes = {EXACT: "", APPROXIMATE: f"ε = {rule.params.get('eps', 0):g} in the denominators",
              LEAKS_BIAS: f"bias {policy}ed: its share is dropped" if policy == "absorb" else "bias share not counted",
              NONE: f"rule '{rule.name}' does not conserve {quantity} on {node.kind} ops"}
    if cls == LEAKS_BIAS and policy == "absorb":
        causes[LEAKS_BIAS] = "bias absorbed (use `bias blame` to report its share)"
    return cls, causes[cls]


def static(graph: Graph, ruleset: RuleSet, output: str | None = None, start: str | None = None):
    """(diagnostics, node checks with predictions, end-to-end prediction): no inference run."""
    diagnostics: list[Diagnostic] = []
    try:
        start_tensor = find_start(graph, ruleset, output, start)
    except RulegraphError as exc:
        return [Diagnostic("error", "start", ruleset.source, str(exc))], [], NONE
    assignments = assign(graph, ruleset, path_nodes(graph, start_tensor))
    nodes: list[NodeCheck] = []
    for a in assignments:
        if a.problem:
            code = "ambiguous" if a.binding is None and "equal specificity" in a.problem else (
                "no-rule" if a.binding is None else "wrong-kind")
            if a.node.kind is None:
                code = "unknown-op"
            elif a.binding is not None and a.binding.rule.name == "unsupported":
                code = "unsupported"
            message = a.problem.removeprefix(f"{a.node}: ").removeprefix(f"{a.node}, ").removeprefix(f"{a.node} ")
            diagnostics.append(Diagnostic("error", code, str(a.node), message))
            continue
        cls, cause = predict_node(graph, a, ruleset)
        nature = RULES[a.binding.rule.name].conservation_of(ruleset.quantity, a.node.kind, a.node.op_type,
                                                            a.binding.rule.params)
        nodes.append(NodeCheck(a.node.name, a.node.op_type, a.node.kind, str(a.binding.rule),
                               f"{a.binding.selector} at {a.binding.location}", cls, cause,
                               leak_by_nature=cls == LEAKS_BIAS and nature == LEAKS_BIAS))
    used = {id(a.binding) for a in assignments if a.binding is not None}
    bundled = {f"rules/{name}.rules" for name in bundled_rule_names()}
    for b in ruleset.bindings:
        # a kind binding that matches nothing is normal in a general file (no max op in an MLP), and so
        # is any binding of a bundled file (the CNN files bind GroupNorm, which most CNNs lack)
        if id(b) not in used and not RULES[b.rule.name].starts_pass and b.selector.form != "kind" \
                and b.location.file not in bundled:
            diagnostics.append(Diagnostic("warning", "unused-binding", str(b.location),
                                          f"'{b.selector} -> {b.rule}' matches no node on the relevance path"))
    diagnostics += _silent_overrides(ruleset)
    predicted = max((n.predicted for n in nodes), key=SEVERITY.__getitem__, default=EXACT)
    if any(d.severity == "error" for d in diagnostics):
        predicted = NONE
    return diagnostics, nodes, predicted


def _silent_overrides(ruleset: RuleSet) -> list[Diagnostic]:
    """A binding in an including file whose selector an included file already binds."""
    out = []
    for b in ruleset.bindings:
        for earlier in ruleset.bindings:
            if earlier.layer < b.layer and earlier.selector == b.selector and str(earlier.rule) != str(b.rule):
                out.append(Diagnostic("warning", "override", str(b.location),
                                      f"'{b.selector} -> {b.rule}' overrides '{earlier.selector} -> "
                                      f"{earlier.rule}' from {earlier.location}"))
                break
    return out


# --------------------------------------------------------------------------------------------------
# measured conservation
