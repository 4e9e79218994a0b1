"""Properties are data: the checker reads every property of a rule from its entry in the rule table,
never from its name. Each row of the conservation table is checked again with the rule registered a
second time under another name (the same emitter and table entry): the prediction and the
measurement must be those of the original; and a renamed ``start`` is still exempt from the
unused-binding warning.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tables import CONSERVATION

from rulegraph.backward.rules import RULES
from rulegraph.check import check
from rulegraph.run import rulefiles as dsl

MLP = Path(__file__).resolve().parent.parent / "models" / "digits_mlp.onnx"


def renamed(monkeypatch, rule_call: str) -> str:
    """``rule_call`` with its rule registered again as ``copy_of_<name>``; returns the new call."""
    name, _, rest = rule_call.partition("(")
    copy = f"copy_of_{name}"
    monkeypatch.setitem(RULES, copy, dataclasses.replace(RULES[name], name=copy))
    return copy + ("(" + rest if rest else "")


@pytest.mark.parametrize("cell", CONSERVATION, ids=[c.id for c in CONSERVATION])
def test_a_renamed_rule_is_predicted_and_measured_as_the_original(monkeypatch, cell):
    ruleset = cell.ruleset(renamed(monkeypatch, cell.rule))
    report = check(cell.model, ruleset, x=cell.x, samples=0 if cell.x else 8, tolerance=1e-5)
    (node,) = report.nodes
    assert node.predicted == cell.expected == report.predicted
    if cell.expected == "exact":
        assert node.leak < 1e-5 and report.measured < 1e-5
    elif cell.expected == "leaks bias":
        assert node.leak == pytest.approx(node.bias_share, rel=1e-3)


def test_a_renamed_start_is_not_an_unused_binding(monkeypatch):
    """``start`` binds a node beyond the relevance path: that is what the table's ``starts_pass`` says."""
    copy = renamed(monkeypatch, "start")
    text = f'rulegraph 1\ninclude "lrp-epsilon"\nnode "not_in_the_model" -> {copy}\n'
    report = check(MLP, dsl.parse(text, source="t.rules"))
    assert [d for d in report.diagnostics if d.code == "unused-binding"] == []
