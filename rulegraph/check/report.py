"""The report of ``rulegraph check``: diagnostics, per-node conservation (predicted and measured),
amplification and probes, with text, JSON and JUnit renderings."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from ..backward.rules import APPROXIMATE, EXACT, LEAKS_BIAS, NONE
from ..run import amplification

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
