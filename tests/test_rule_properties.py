"""Properties are data: the checker reads every property of a rule from its entry in the rule table,
never from its name. Each row of the conservation table is checked again with the rule registered a
second time under another name (the same emitter and table entry): the prediction and the
measurement must be those of the original; and a renamed ``start`` is still exempt from the
unused-binding warning.
"""

from __future__ import annotations

import dataclasses

import pytest

from rulegraph import dsl
from rulegraph.check import check
from rulegraph.rules import RULES
from test_check import CELLS, MLP, rules


def renamed(monkeypatch, rule_call: str) -> str:
    """``rule_call`` with its rule registered again as ``copy_of_<name>``; returns the new call."""
    name, _, rest = rule_call.partition("(")
    copy = f"copy_of_{name}"
    monkeypatch.setitem(RULES, copy, dataclasses.replace(RULES[name], name=copy))
    return copy + ("(" + rest if rest else "")


@pytest.mark.parametrize("onnx_model,kind,rule,quantity,bias,expected", CELLS,
                         ids=[f"{c[2]}-{c[1]}-{c[3]}-{c[4]}" for c in CELLS])
def test_a_renamed_rule_is_predicted_and_measured_as_the_original(monkeypatch, onnx_model, kind, rule,
                                                                  quantity, bias, expected):
    report = check(onnx_model, rules(kind, renamed(monkeypatch, rule), quantity, bias), samples=8,
                   tolerance=1e-5)
    (node,) = report.nodes
    assert node.predicted == expected and report.predicted == expected
    if expected == "exact":
        assert node.leak < 1e-5 and report.measured < 1e-5
    elif expected == "leaks bias":
        assert node.leak == pytest.approx(node.bias_share, rel=1e-3)


def test_a_renamed_start_is_not_an_unused_binding(monkeypatch):
    """``start`` binds a node beyond the relevance path: that is what the table's ``starts_pass`` says."""
    copy = renamed(monkeypatch, "start")
    text = f'rulegraph 1\ninclude "lrp-epsilon"\nnode "not_in_the_model" -> {copy}\n'
    report = check(MLP, dsl.parse(text, source="t.rules"))
    assert [d for d in report.diagnostics if d.code == "unused-binding"] == []
