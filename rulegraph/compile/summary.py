"""The coverage summary of ``rulegraph ops MODEL --summary``: per op type and kind, how many nodes the
model has, how many are on the relevance path, how many of those get a usable rule (and which), how
many are off the path (shape arithmetic, integer ops, outputs not explained); plus the total.

Coverage is the share of the nodes on the relevance path that get a usable rule: the nodes off the
path need none and are counted in their own column. Counts are of the graph rulegraph explains,
where a fused group (``graph/fuse.py``, e.g. a decomposed GELU) is one node; ``onnx_nodes`` counts
the model's own nodes behind each row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..graph.read import Graph
from ..lang.ruleset import RuleSet
from .plan import HELD, assign, path_nodes


@dataclass
class Row:
    """The nodes of one op type and kind."""

    op_type: str
    kind: str
    nodes: int = 0
    onnx_nodes: int = 0
    on_path: int = 0
    with_rule: int = 0
    off_path: int = 0
    rules: list[str] = field(default_factory=list)   # the rules the nodes on the path get, first seen first

    @property
    def covered(self) -> float | None:
        """with_rule / on_path; None when no node of the row is on the path."""
        return self.with_rule / self.on_path if self.on_path else None


@dataclass
class Summary:
    rules: str        # the rule file's source
    start: str
    rows: list[Row]

    @property
    def total(self) -> Row:
        total = Row("total", "", rules=[])
        for r in self.rows:
            total.nodes += r.nodes
            total.onnx_nodes += r.onnx_nodes
            total.on_path += r.on_path
            total.with_rule += r.with_rule
            total.off_path += r.off_path
        return total

    def to_json(self) -> str:
        def row(r: Row) -> dict:
            return {**asdict(r), "covered": r.covered}

        total = row(self.total)
        del total["op_type"], total["kind"], total["rules"]
        return json.dumps({"rules": self.rules, "start": self.start, "op_types": [row(r) for r in self.rows],
                           "total": total}, indent=2)

    def to_text(self) -> str:
        header = ("op type", "kind", "nodes", "on path", "with rule", "off path", "covered", "rule")
        lines = [[r.op_type + (f" (fused, {r.onnx_nodes} ONNX nodes)" if r.onnx_nodes != r.nodes else ""),
                  r.kind, str(r.nodes), str(r.on_path), str(r.with_rule), str(r.off_path), _share(r.covered),
                  _rule_text(r)] for r in self.rows]
        t = self.total
        lines.append(["total", "", str(t.nodes), str(t.on_path), str(t.with_rule), str(t.off_path),
                      _share(t.covered), f"{t.onnx_nodes} ONNX nodes"])
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header) - 1)]
        out = [f"rules: {self.rules}; start: '{self.start}'"]
        for row in [header, *lines]:
            cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            out.append("  ".join([*cells, row[-1]]).rstrip())
        return "\n".join(out)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _rule_text(r: Row) -> str:
    missing = r.on_path - r.with_rule
    parts = list(r.rules) + ([f"!! {missing} without a usable rule"] if missing else [])
    return ", ".join(parts) if parts else "- (off the path)"


def summarize(graph: Graph, ruleset: RuleSet, start: str) -> Summary:
    """The coverage of ``graph`` under ``ruleset`` for the relevance path to ``start``; rows in the
    order the op types first appear in the graph."""
    assignments = {a.node.name: a for a in assign(graph, ruleset, path_nodes(graph, start))}
    rows: dict[tuple[str, str], Row] = {}
    for node in graph.nodes:
        kind = node.kind or "unknown"
        row = rows.setdefault((node.op_type, kind), Row(node.op_type, kind))
        row.nodes += 1
        row.onnx_nodes += len(node.members) or 1
        a = assignments.get(node.name)
        if a is None:
            row.off_path += 1
            continue
        row.on_path += 1
        if a.held or a.problem is None and a.binding is not None:
            row.with_rule += 1
            rule = HELD if a.held else str(a.binding.rule)
            if rule not in row.rules:
                row.rules.append(rule)
    return Summary(ruleset.source, start, list(rows.values()))
