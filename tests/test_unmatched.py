"""``node`` bindings that match nothing on the relevance path warn in every command that has a model,
once per binding, with the rule-file place and the closest node names."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rulegraph import Explainer, cli
from rulegraph.check import check
from rulegraph.errors import RulegraphWarning

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "models" / "digits_mlp.onnx"
RULES = ('rulegraph 1\ninclude "lrp-epsilon"\n'
         'node "/net/net.1/Gem" -> gradient\n'      # a typo: did you mean '/net/net.1/Gemm'
         'node "/head/*" -> gradient\n'             # a glob that matches nothing, nothing close
         'node "/net/*/Relu" -> ignore\n')          # matches two nodes: no warning
EXPECTED = [
    ":3:1: 'node \"/net/net.1/Gem\" -> gradient' matches no node on the relevance path; "
    "did you mean '/net/net.1/Gemm'",
    ":4:1: 'node \"/head/*\" -> gradient' matches no node on the relevance path; "
    "`rulegraph ops` lists the nodes on the path",
]


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "typo.rules"
    path.write_text(RULES)
    return path


def _warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, RulegraphWarning)]


def _assert_expected(messages: list[str], rules: Path) -> None:
    assert len(messages) == len(EXPECTED)
    for got, want in zip(messages, EXPECTED):
        assert got.startswith(str(rules) + want), got


def _x(tmp_path) -> str:
    np.save(tmp_path / "x.npy", np.load(ROOT / "models" / "digits_sample.npz")["x"][:2])
    return str(tmp_path / "x.npy")


COMMANDS = {
    "explain": lambda r, t: cli.main(["explain", str(MLP), "--rules", str(r), "--input", _x(t)]),
    "compile": lambda r, t: cli.main(["compile", str(MLP), "--rules", str(r), "-o", str(t / "e.onnx")]),
    "ops": lambda r, t: cli.main(["ops", str(MLP), "--rules", str(r)]),
    "check": lambda r, t: cli.main(["check", str(MLP), "--rules", str(r), "--samples", "2"]),
    "Explainer": lambda r, t: Explainer(MLP, r).explain(np.zeros((1, 1, 8, 8), np.float32), target=0),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_warns_once_per_binding(tmp_path, rules, capsys, command):
    messages = _warnings(lambda: COMMANDS[command](rules, tmp_path))
    if command != "Explainer":  # the CLI prints each warning as one line on standard error
        prefix = f"rulegraph {command}: warning: "
        assert not messages
        messages = [line.removeprefix(prefix) for line in capsys.readouterr().err.splitlines()
                    if line.startswith(prefix)]
    _assert_expected(messages, rules)


def test_check_keeps_its_diagnostic(rules):
    with pytest.warns(RulegraphWarning, match="matches no node"):
        report = check(MLP, rules)
    unused = [d.where for d in report.diagnostics if d.code == "unused-binding"]
    assert unused == [f"{rules}:3:1", f"{rules}:4:1"]


def test_a_node_off_the_relevance_path_is_named(tmp_path):
    """``Shape`` feeds only an integer computation: binding it is a binding relevance never uses."""
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"], name="shape_of_x"),
         helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "shape.rules"
    path.write_text('rulegraph 1\nquantity importance\nRelu -> gradient\nnode "shape_*" -> gradient\n')
    messages = _warnings(lambda: Explainer(model, path))
    assert messages == [f"{path}:4:1: 'node \"shape_*\" -> gradient' matches no node on the relevance path: "
                        "it names 'shape_of_x', which relevance does not flow through (shape or index "
                        "computations); remove the binding"]


def test_a_start_binding_is_matched_by_the_node_it_starts_at(tmp_path):
    path = tmp_path / "start.rules"
    path.write_text('rulegraph 1\ninclude "lrp-epsilon"\n'
                    'node "/net/net.5/Gemm" -> start\nnode "/net/net.9/Gemm" -> start\n')
    messages = _warnings(lambda: Explainer(MLP, path))
    (message,) = messages
    assert message.startswith(f"{path}:4:1: 'node \"/net/net.9/Gemm\" -> start' matches no node on the "
                              "relevance path; did you mean '/net/net.5/Gemm'")


def test_check_probes_do_not_warn_about_the_users_node_names(rules):
    messages = _warnings(lambda: check(MLP, rules, probes=True))
    _assert_expected(messages, rules)  # the model's own, once; none from the probes' small graphs
