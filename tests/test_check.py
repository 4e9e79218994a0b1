"""rulegraph check: the docs/rules.md, conservation classes table derived and measured cell by cell,
seeded violations,
the CI exit codes, one compiled run for all node sums, and golden reports."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from tables import CONSERVATION

from rulegraph.check import check
from rulegraph.cli import main
from rulegraph.run import rulefiles as dsl
from rulegraph.testing import assert_conserves

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "check"
MLP = ROOT / "models" / "digits_mlp.onnx"
CNN = ROOT / "models" / "digits_cnn.onnx"
F = TensorProto.FLOAT
RNG = np.random.default_rng(11)


@pytest.mark.parametrize("cell", CONSERVATION, ids=[c.id for c in CONSERVATION])
def test_conservation_table_cell(cell):
    """The checker derives the cell's class (tests/tables.py), and one measured run confirms it."""
    report = check(cell.model, cell.ruleset(), x=cell.x, samples=0 if cell.x else 8, tolerance=1e-5)
    (node,) = report.nodes
    assert node.predicted == cell.expected == report.predicted
    if cell.expected == "exact":
        assert node.leak < 1e-5 and report.measured < 1e-5
    elif cell.expected == "approximate":
        assert 1e-7 < node.leak < 0.1  # the ε terms, small but present
    elif cell.expected == "leaks bias":
        assert node.leak > 1e-3 and node.bias_share is not None
        assert node.leak == pytest.approx(node.bias_share, rel=1e-3)  # the leak is the bias's share
    elif cell.none_leak is not None:
        assert node.leak == pytest.approx(cell.none_leak, rel=1e-4)
    else:
        assert node.leak > 1e-3


def write(tmp_path, text: str, name="r.rules") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def sigmoid_mlp():
    w1, w2 = RNG.normal(size=(5, 6)), RNG.normal(size=(3, 5))
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("Sigmoid", ["h"], ["s"], name="act"),
             helper.make_node("Gemm", ["s", "w2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 6])],
                              [helper.make_tensor_value_info("y", F, ["N", 3])],
                              [numpy_helper.from_array(w.astype(np.float32), n) for n, w in (("w1", w1), ("w2", w2))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


SEEDED = [
    ("bias absorbed", CNN, 'rulegraph 1\ninclude "lrp-epsilon"\nbias absorb\n', "bias absorbed", "BatchNormalization"),
    ("eps 100", CNN, 'rulegraph 1\ninclude "lrp-epsilon"\nlinear -> normalized(eps = 100)\n', "ε = 100", "Gemm"),
    ("gradient on sigmoid", None, 'rulegraph 1\ninclude "lrp-epsilon"\nSigmoid -> gradient\n',
     "rule 'gradient' does not conserve relevance on nonlinear ops", "act"),
    ("missing rule", CNN, "rulegraph 1\nlinear -> normalized(eps = 0)\nmax -> gradient\nroute -> gradient\n",
     "kind nonlinear, has no rule; add a binding such as `Relu -> ignore`", "Relu"),
]


@pytest.mark.parametrize("name,onnx_path,text,cause,node", SEEDED, ids=[s[0] for s in SEEDED])
def test_seeded_violations_exit_1_and_name_the_node(tmp_path, capsys, name, onnx_path, text, cause, node):
    if onnx_path is None:
        onnx_path = tmp_path / "sigmoid.onnx"
        import onnx

        onnx.save(sigmoid_mlp(), str(onnx_path))
    assert main(["check", str(onnx_path), "--rules", write(tmp_path, text), "--samples", "4"]) == 1
    out = capsys.readouterr().out
    assert cause in out and node in out and "FAILED" in out


def test_bad_rule_file_exits_2(tmp_path, capsys):
    assert main(["check", str(CNN), "--rules", write(tmp_path, "rulegraph 1\nlinear => gradient\n")]) == 2
    assert "r.rules:2:" in capsys.readouterr().err


def test_sound_file_exits_0_in_every_format(tmp_path, capsys):
    for fmt in ("text", "json", "junit"):
        out = tmp_path / f"report.{fmt}"
        assert main(["check", str(CNN), "--rules", "lrp-epsilon", "--format", fmt, "--output-file", str(out)]) == 0
        assert out.stat().st_size > 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["ok"] is True and doc["schema"] == 1


def test_node_sums_cost_one_compiled_run(ort_runs):
    """Every node's conservation comes from one run of one compiled explainer."""
    report = check(CNN, "lrp-epsilon", samples=8)
    assert len(ort_runs) == 1
    assert len(report.nodes) == 10 and all(n.leak is not None for n in report.nodes)


def test_assert_conserves():
    assert_conserves(MLP, "lrp-epsilon")
    with pytest.raises(AssertionError, match="conservation: end to end"):
        assert_conserves(MLP, "gradient")


def test_static_warnings_unused_binding_and_override(tmp_path):
    text = 'rulegraph 1\ninclude "lrp-epsilon"\nlinear -> normalized(eps = 0.1)\nGlobalMaxPool -> radial\n'
    report = check(MLP, write(tmp_path, text))
    codes = {(d.code, d.severity) for d in report.diagnostics}
    assert ("override", "warning") in codes and ("unused-binding", "warning") in codes
    override = next(d for d in report.diagnostics if d.code == "override")
    assert "lrp-epsilon.rules" in override.message and ":3:" in override.where


def mask_numbers(text: str) -> str:
    """Leaks and deltas differ in their last bits across machines: pin everything else."""
    return re.sub(r"-?\d+\.\d+e[-+]\d+|-?\d\.\d+e[-+]\d+", "<num>", text)


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("RULEGRAPH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


def test_golden_reports():
    """Static reports are pinned whole; the measured one with its numbers masked (its rows are
    ordered by leak, and the absorbed biases differ by far more than float noise)."""
    static_report = check(MLP, "lrp-epsilon")
    static_report.model = "models/digits_mlp.onnx"
    golden("mlp-lrp-epsilon.txt", static_report.to_text() + "\n")
    golden("mlp-lrp-epsilon.json", static_report.to_json() + "\n")
    golden("mlp-lrp-epsilon.xml", static_report.to_junit())
    absorbed = check(MLP, dsl.parse('rulegraph 1\ninclude "lrp-epsilon"\nbias absorb\n', source="absorb.rules"),
                     samples=2)
    absorbed.model = "models/digits_mlp.onnx"
    golden("mlp-absorb.txt", mask_numbers(absorbed.to_text()) + "\n")
    golden("mlp-absorb.xml", mask_numbers(absorbed.to_junit()))
    failing = check(MLP, dsl.parse("rulegraph 1\nlinear -> gradient\nroute -> gradient\n", source="partial.rules"))
    failing.model = "models/digits_mlp.onnx"
    golden("mlp-missing-rule.txt", failing.to_text() + "\n")
    golden("mlp-missing-rule.xml", failing.to_junit())


def test_text_report_puts_the_worst_node_first():
    report = check(CNN, dsl.parse('rulegraph 1\ninclude "lrp-epsilon"\nbias absorb\n', source="a.rules"), samples=2)
    rows = [line for line in report.to_text().splitlines() if line.startswith("/")]
    leaks = [float(re.search(r"\s(\d\.\d\de[-+]\d\d)\s", row).group(1)) for row in rows]
    assert leaks == sorted(leaks, reverse=True) and leaks[0] > 1e-3


def test_probes_are_properties_of_the_report(tmp_path, capsys):
    report = check(MLP, "deconvnet", probes=True)
    names = {name: passed for name, passed, _ in report.properties()}
    assert names["consistency: max_with_zero"] is False  # repeat vs gradient-max (docs/rules.md, consistency)
    assert names["consistency: flatten_vs_reshape"] is True
    assert not report.ok and "probe max_with_zero: INCONSISTENT" in report.to_text()
    assert main(["check", str(MLP), "--rules", "lrp-epsilon", "--probes", "--samples", "0"]) == 0
    assert "probe scaling: consistent" in capsys.readouterr().out
