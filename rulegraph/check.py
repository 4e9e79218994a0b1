"""Is a rule file sound for a model? Static checks, predicted and measured conservation, and the
consistency probes (RULES.md §4-5), gathered in one Report with text, JSON and JUnit renderings.

Conservation per node (RULES.md §5): ``Σ view(what the node gives its inputs) + Σ bias shares =
Σ view(its outputs' numbers)``. Each (rule, quantity, kind) has a class: exact, approximate (ε),
leaks bias (exact once biases are blamed) or none; ``predict`` derives it per node without running
anything, ``measure`` reads every node's sums from one run of the compiled explainer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from . import amplification
from .compile import Assignment, RuleContext, assign, find_start, path_nodes
from .emit import Tape
from .errors import RulegraphError
from .graph import Graph
from .kinds import LINEAR
from .rules import APPROXIMATE, EXACT, LEAKS_BIAS, NONE, RULES
from .ruleset import RuleSet
from .vjp import VjpContext

SCHEMA_VERSION = 1
COUNTED_BIAS = ("blame", "total")  # policies under which bias shares count towards conservation
#: how bad a class is, for the end-to-end prediction (the worst node decides)
SEVERITY = {EXACT: 0, APPROXIMATE: 1, LEAKS_BIAS: 2, NONE: 3}


@dataclass(frozen=True)
class Diagnostic:
    """A static finding: ``severity`` error (fails the check) or warning; ``where`` is a rule file
    location or an ONNX node."""

    severity: str
    code: str
    where: str
    message: str


@dataclass
class NodeCheck:
    """One node on the relevance path: its rule, predicted class and (once measured) its leak."""

    node: str
    op_type: str
    kind: str
    rule: str
    binding: str
    predicted: str
    cause: str
    leak: float | None = None        # max over rows of |out − in − counted bias| / |start value|
    bias_share: float | None = None  # max over rows of |bias shares| / |start value|
    #: the rule table itself says the rule leaks the bias here (gradient on a linear op under
    #: importance: the method's nature), so a leak is what the file predicts, not a violation
    leak_by_nature: bool = False
    amplification: float | None = None  # max over rows of Σ|view given to inputs| / Σ|view of outputs|

    def as_predicted(self, tolerance: float) -> bool:
        """Not measured, within ``tolerance``, or a finite leak that the rule table predicts."""
        if self.leak is None or self.leak <= tolerance:
            return True
        return self.leak_by_nature and math.isfinite(self.leak)


@dataclass
class Report:
    """Everything ``rulegraph check`` found; ``ok`` when every checked property holds."""

    model: str
    rules: str
    quantity: str
    bias: str
    tolerance: float
    diagnostics: list[Diagnostic] = field(default_factory=list)
    nodes: list[NodeCheck] = field(default_factory=list)
    predicted: str = EXACT
    measured: float | None = None      # end to end: max |Σ attribution + bias − start| / |start|
    samples: int = 0
    probes: list = field(default_factory=list)
    #: NaN/Inf found in the inputs or the model's outputs (then the leaks are NaN because of them)
    nonfinite: list[str] = field(default_factory=list)
    max_amplification: float = amplification.DEFAULT_MAX_AMPLIFICATION
    amplification: float | None = None  # end to end: max Σ|attribution| / |start value|

    def amplifying_nodes(self, count: int = 5) -> list[NodeCheck]:
        """The nodes that grow the magnitudes most (factor > 1), worst first."""
        gains = {n.node: n.amplification for n in self.nodes
                 if n.amplification is not None and n.amplification > 1}
        by_name = {n.node: n for n in self.nodes}
        return [by_name[name] for name, _ in amplification.worst(gains, count)]

    def _amplification_detail(self) -> str:
        where = ", ".join(f"node '{n.node}' ({n.op_type}, {n.rule}) ×{n.amplification:.2e}"
                          for n in self.amplifying_nodes())
        return (f"max Σ|attribution| / |start value| {self.amplification:.2e} "
                f"(limit {self.max_amplification:g})" + (f"; grows most at {where}" if where else ""))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    def properties(self) -> list[tuple[str, bool, str]]:
        """(name, passed, detail) of every checked property: one JUnit test case each."""
        props = [("static: every node on the path has a rule its kind accepts", not self.errors,
                  "\n".join(f"{d.where}: {d.message}" for d in self.errors))]
        if self.measured is not None:
            detail = (f"max relative delta {self.measured:.2e} (tolerance {self.tolerance:g}); "
                      f"predicted {self.predicted}{self._as_predicted()}{self._nonfinite_cause()}")
            passed = self.measured <= self.tolerance or bool(self._as_predicted())
            props.append(("conservation: end to end", passed, detail))
            if self.amplification is not None:
                props.append(("amplification: end to end", self.amplification <= self.max_amplification,
                              self._amplification_detail()))
            for n in self.nodes:
                detail = f"leak {n.leak:.2e}" if n.leak is not None else "not measured"
                ok = n.as_predicted(self.tolerance)
                by_nature = ok and n.leak is not None and n.leak > self.tolerance
                props.append((f"conservation: node {n.node} ({n.op_type}) under {n.rule}", ok,
                              f"{detail}; predicted {n.predicted}" + (", as predicted" if by_nature else "")
                              + (f" ({n.cause})" if n.cause else "")))
        for p in self.probes:
            if p.skipped:
                continue
            props.append((f"consistency: {p.probe}", p.consistent,
                          f"max difference {p.max_difference:.3g}; " + "; ".join(p.responsible)))
        return props

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.properties())

    @property
    def conserves(self) -> bool:
        """Measured, and every leak (end to end and per node) within tolerance, predicted or not."""
        return (self.measured is not None and self.measured <= self.tolerance
                and all(n.leak is None or n.leak <= self.tolerance for n in self.nodes))

    def _as_predicted(self) -> str:
        """``", as predicted"`` when the end-to-end leak is one the rule table predicts: the file is
        predicted to leak bias, every node beyond tolerance leaks by its rule's nature, and the
        measured delta is finite."""
        if (self.predicted != LEAKS_BIAS or self.measured is None or not math.isfinite(self.measured)
                or self.measured <= self.tolerance):
            return ""
        leaking = [n for n in self.nodes if n.leak is not None and n.leak > self.tolerance]
        ok = all(n.leak_by_nature and math.isfinite(n.leak) for n in leaking)
        return ", as predicted" if ok else ""

    def _nonfinite_cause(self) -> str:
        return f"; not finite because {'; '.join(self.nonfinite)}" if self.nonfinite else ""

    # renderings ------------------------------------------------------------------------------------
    def to_text(self, limit: int = 25) -> str:
        lines = [f"rulegraph check: {self.model} with {self.rules} (quantity {self.quantity}, bias {self.bias})"]
        for d in self.diagnostics:
            lines.append(f"{d.severity}: {d.where}: {d.message}")
        if self.nodes:
            lines.append("")
            lines.append(f"{'node':<40} {'op type':<18} {'rule':<26} {'predicted':<12} {'leak':>10}  cause")
            ordered = sorted(self.nodes, key=lambda n: (-(n.leak or 0.0), -SEVERITY[n.predicted], n.node))
            for n in ordered[:limit]:
                leak = "-" if n.leak is None else f"{n.leak:.2e}"
                cause = n.cause
                if n.leak is not None and not math.isfinite(n.leak) and self.nonfinite:
                    cause = "NaN/Inf in the inputs or the model's outputs (below), not this rule"
                lines.append(f"{n.node[:40]:<40} {n.op_type:<18} {n.rule[:26]:<26} {n.predicted:<12} "
                             f"{leak:>10}  {cause}")
            if len(ordered) > limit:
                lines.append(f"... {len(ordered) - limit} more nodes (worst first; use --format json for all)")
        lines.append("")
        lines.append(f"predicted end to end: {self.predicted}")
        if self.measured is not None:
            lines.append(f"measured end to end on {self.samples} input(s): max relative delta {self.measured:.2e} "
                         f"(tolerance {self.tolerance:g})"
                         + (f": {self.predicted}{self._as_predicted()}" if self._as_predicted() else ""))
        lines.extend(f"not finite: {cause}" for cause in self.nonfinite)
        if self.amplification is not None:
            lines.append(f"amplification end to end: {self._amplification_detail()}")
        for p in self.probes:
            state = "skipped: " + p.skipped if p.skipped else ("consistent" if p.consistent else "INCONSISTENT")
            lines.append(f"probe {p.probe}: {state}" + ("" if p.skipped else f" (max difference {p.max_difference:.3g})"))
            if not p.skipped and not p.consistent:
                lines.extend(f"    {r}" for r in p.responsible)
        failed = [name for name, passed, _ in self.properties() if not passed]
        lines.append("")
        lines.append("OK: every checked property holds" if not failed else
                     f"FAILED: {len(failed)} propert{'y' if len(failed) == 1 else 'ies'} violated: " + "; ".join(failed[:5]))
        return "\n".join(lines)

    def to_json(self) -> str:
        """Stable JSON (schema version 1; documented in the README, section "rulegraph check")."""
        doc = {
            "schema": SCHEMA_VERSION, "ok": self.ok, "model": self.model, "rules": self.rules,
            "quantity": self.quantity, "bias": self.bias, "tolerance": self.tolerance,
            "samples": self.samples,
            "end_to_end": {"predicted": self.predicted, "measured": self.measured,
                           "as_predicted": bool(self._as_predicted()), "nonfinite": list(self.nonfinite),
                           "amplification": self.amplification},
            "max_amplification": self.max_amplification,
            "diagnostics": [asdict(d) for d in self.diagnostics],
            "nodes": [asdict(n) for n in self.nodes],
            "probes": [{"probe": p.probe, "consistent": p.consistent, "max_difference": p.max_difference,
                        "responsible": list(p.responsible), "skipped": p.skipped} for p in self.probes],
            "properties": [{"name": n, "passed": ok, "detail": d} for n, ok, d in self.properties()],
        }
        return json.dumps(_strict(doc), indent=2, sort_keys=False, allow_nan=False)

    def to_junit(self) -> str:
        props = self.properties()
        failures = sum(1 for _, ok, _ in props if not ok)
        cases = []
        for name, ok, detail in props:
            body = "" if ok else f"<failure message={quoteattr(detail.splitlines()[0] if detail else name)}>{escape(detail)}</failure>"
            cases.append(f'    <testcase classname="rulegraph.check" name={quoteattr(name)}>{body}</testcase>')
        head = (f'<testsuite name={quoteattr("rulegraph check " + self.rules)} tests="{len(props)}" '
                f'failures="{failures}" errors="0">')
        return "\n".join(['<?xml version="1.0" encoding="utf-8"?>', "<testsuites>", "  " + head, *cases,
                          "  </testsuite>", "</testsuites>"]) + "\n"


def _strict(value):
    """``value`` with every NaN/Inf float as None (JSON's null): strict parsers reject bare NaN."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# --------------------------------------------------------------------------------------------------
# static checks and predictions


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
    """(class, cause) of one node (RULES.md §5), counting its bias, the policy and ε."""
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
    for b in ruleset.bindings:
        # a kind binding that matches nothing is normal in a general file (no max op in an MLP)
        if id(b) not in used and not RULES[b.rule.name].starts_pass and b.selector.form != "kind":
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


def sample_inputs(graph: Graph, samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs (integers: zeros) for every model input."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in graph.inputs:
        shape = graph.shapes.get(name)
        if shape is None or not all(isinstance(d, int) for d in shape[1:]):
            raise RulegraphError(f"input '{name}' has shape {shape}: --samples needs static sizes "
                                 "beyond the batch axis; pass --input instead")
        dims = [samples] + list(shape[1:])
        dtype = np.float32 if graph.is_float(name) else np.int64
        feeds[name] = rng.normal(size=dims).astype(dtype) if graph.is_float(name) else np.zeros(dims, dtype)
    return feeds


def measure(explainer, x, report: Report, target="argmax") -> None:
    """Fill each node's measured leak and the end-to-end delta, from one compiled run."""
    result = explainer.without_loop().explain(x, target=explainer.whole_target(target), node_sums=True,
                                              max_amplification=None)
    scale = np.maximum(np.abs(result.start_value.astype(np.float64)), 1e-12)
    counted = explainer.ruleset.bias in COUNTED_BIAS
    by_name = {n.node: n for n in report.nodes}
    for node, (given, outs, bias) in result.node_sums.items():
        check = by_name.get(node)
        if check is None or outs is None:
            continue
        leak = outs.astype(np.float64) - (0 if given is None else given.astype(np.float64))
        if bias is not None:
            check.bias_share = float(np.max(np.abs(bias) / scale))
            if counted:
                leak = leak - bias
        check.leak = float(np.max(np.abs(leak) / scale))
    for node, gain in amplification.per_node(result).items():
        if node in by_name:
            by_name[node].amplification = float(np.max(gain))
    report.amplification = float(np.max(amplification.end_to_end(result)))
    report.measured = float(np.max(np.abs(result.relative_delta)))
    report.samples = len(result.start_value)
    report.nonfinite = _nonfinite(explainer._feeds(x), result.outputs)


def _nonfinite(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> list[str]:
    """Sentences naming NaN/Inf in the inputs, else in the model's outputs (for finite inputs)."""
    found = []
    for what, arrays in (("input", inputs), ("the model's output", outputs)):
        for name, value in arrays.items():
            value = np.asarray(value)
            if not np.issubdtype(value.dtype, np.floating):
                continue
            bad = ~np.isfinite(value)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                kinds = " and ".join(k for k, m in (("NaN", np.isnan(value)), ("Inf", np.isinf(value)))
                                     if m.any())
                found.append(f"{what} '{name}' holds {kinds} at {int(bad.sum())} of {value.size} values "
                             f"(first at index {first})")
        if found:
            break
    return found


def check(model, rules, x=None, samples: int = 0, tolerance: float = 1e-3, probes: bool = False,
          output: str | None = None, start: str | None = None, providers=None,
          max_amplification: float = amplification.DEFAULT_MAX_AMPLIFICATION) -> Report:
    """Run every check that applies: static always, measured with inputs (``x`` or ``samples``):
    conservation and amplification (fails above ``max_amplification``); consistency probes when asked."""
    from .explainer import Explainer

    explainer = Explainer(model, rules, providers=providers, output=output, start=start)
    explainer.allow_nonfinite = True  # a NaN/Inf input is measured and named as the cause (Report.nonfinite)
    ruleset = explainer.ruleset
    diagnostics, nodes, predicted = static(explainer.graph, ruleset, output, start)
    report = Report(str(model) if not hasattr(model, "SerializeToString") else "<model>", ruleset.source,
                    ruleset.quantity, ruleset.bias, tolerance, diagnostics, nodes, predicted,
                    max_amplification=max_amplification)
    if not report.errors and (x is not None or samples):
        measure(explainer, x if x is not None else sample_inputs(explainer.graph, samples), report)
    if probes:
        from .probes import run_probes

        report.probes = run_probes(ruleset)
    return report
