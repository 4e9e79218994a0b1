"""``rulegraph ops MODEL --summary [--json]``: the coverage per op type and kind, with exact counts on
the bundled ResNet and on a built model with a fused group, both kinds of Mul, shape arithmetic off
the relevance path and a second output that is not explained."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph.cli import main

ROOT = Path(__file__).resolve().parent.parent
RESNET = str(ROOT / "models" / "digits_resnet.onnx")


def summary_json(capsys, *argv) -> tuple[int, dict]:
    code = main(["ops", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def rows(report: dict) -> list[tuple]:
    return [(r["op_type"], r["kind"], r["nodes"], r["onnx_nodes"], r["on_path"], r["with_rule"], r["off_path"],
             r["rules"]) for r in report["op_types"]]


# the bundled ResNet under the bundled composite file: first Conv flat, the others z+ ---------------

RESNET_COMPOSITE = [
    ("Conv", "linear", 8, 8, 8, 8, 0, ["flat", "zplus(eps = 1e-06)"]),
    ("BatchNormalization", "linear", 8, 8, 8, 8, 0, ["normalized(eps = 1e-06)"]),
    ("Relu", "nonlinear", 7, 7, 7, 7, 0, ["ignore"]),
    ("Add", "linear", 3, 3, 3, 3, 0, ["normalized(eps = 1e-06)"]),
    ("GlobalAveragePool", "linear", 1, 1, 1, 1, 0, ["normalized(eps = 1e-06)"]),
    ("Flatten", "route", 1, 1, 1, 1, 0, ["gradient"]),
    ("Gemm", "linear", 1, 1, 1, 1, 0, ["normalized(eps = 1e-06)"]),
]


def test_resnet_counts_are_the_models_own(capsys):
    """The node counts per op type are those of the ONNX file itself (nothing fused, all on the path)."""
    code, report = summary_json(capsys, RESNET, "--rules", "lrp-composite")
    assert code == 0
    assert rows(report) == RESNET_COMPOSITE
    own = Counter(n.op_type for n in onnx.load(RESNET).graph.node)
    assert {r["op_type"]: r["nodes"] for r in report["op_types"]} == dict(own)
    assert report["total"] == {"nodes": 29, "onnx_nodes": 29, "on_path": 29, "with_rule": 29, "off_path": 0,
                               "covered": 1.0}
    assert report["start"] == "logits"


def test_resnet_text_table(capsys):
    assert main(["ops", RESNET, "--summary"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("gradient.rules; start: 'logits'")
    assert lines[1].split() == ["op", "type", "kind", "nodes", "on", "path", "with", "rule", "off", "path",
                                "covered", "rule"]
    assert lines[2].split() == ["Conv", "linear", "8", "8", "8", "0", "100.0", "%", "gradient"]
    assert lines[-2].split() == ["total", "29", "29", "29", "0", "100.0", "%", "29", "ONNX", "nodes"]
    assert lines[-1] == "CUDA: every node of the model has a CUDA kernel"
    assert len(lines) == 2 + len(RESNET_COMPOSITE) + 2


# a built model ------------------------------------------------------------------------------------


def built_model(path: Path) -> str:
    """y = Reshape(0.5 · (SiLU(xW) · xW), [N, -1]) with the shape computed from Shape(x); z = Relu(x),
    a second output that is not explained."""
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w"], ["a"], name="proj"),
        n("Sigmoid", ["a"], ["s"], name="silu_sigmoid"),
        n("Mul", ["a", "s"], ["g"], name="silu_mul"),
        n("Mul", ["g", "a"], ["b"], name="gate"),
        n("Mul", ["b", "half"], ["c"], name="scale"),
        n("Shape", ["x"], ["shp"], name="shape"),
        n("Gather", ["shp", "zero"], ["batch"], name="batch_dim", axis=0),
        n("Unsqueeze", ["batch", "axis0"], ["batch1"], name="batch_dim_1d"),
        n("Concat", ["batch1", "minus1"], ["shape2"], name="new_shape", axis=0),
        n("Reshape", ["c", "shape2"], ["y"], name="flatten"),
        n("Relu", ["x"], ["z"], name="side_relu"),
    ]
    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 4]) for o in ("y", "z")]
    graph = helper.make_graph(nodes, "summary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path / "built.onnx")
    return str(path / "built.onnx")


OFF_PATH = [
    ("Shape", "unknown", 1, 1, 0, 0, 1, []),
    ("Gather", "route", 1, 1, 0, 0, 1, []),
    ("Unsqueeze", "route", 1, 1, 0, 0, 1, []),
    ("Concat", "route", 1, 1, 0, 0, 1, []),
]


@pytest.mark.parametrize("rules, expected", [
    ("gradient", [
        ("MatMul", "linear", 1, 1, 1, 1, 0, ["gradient"]),
        ("SiLU", "nonlinear", 1, 2, 1, 1, 0, ["gradient"]),
        ("Mul", "bilinear", 1, 1, 1, 1, 0, ["gradient"]),
        ("Mul", "linear", 1, 1, 1, 1, 0, ["gradient"]),
        *OFF_PATH,
        ("Reshape", "route", 1, 1, 1, 1, 0, ["gradient"]),
        ("Relu", "nonlinear", 1, 1, 0, 0, 1, []),
    ]),
    ("lrp-epsilon", [
        ("MatMul", "linear", 1, 1, 1, 1, 0, ["normalized(eps = 1e-06)"]),
        ("SiLU", "nonlinear", 1, 2, 1, 1, 0, ["ignore"]),
        ("Mul", "bilinear", 1, 1, 1, 1, 0,
         ["uniform(eps = 1e-06, softmax_constant = 1, gate_constant = 1, exp_constant = 1, norm_constant = 0)"]),
        ("Mul", "linear", 1, 1, 1, 1, 0, ["normalized(eps = 1e-06)"]),
        *OFF_PATH,
        ("Reshape", "route", 1, 1, 1, 1, 0, ["gradient"]),
        ("Relu", "nonlinear", 1, 1, 0, 0, 1, []),
    ]),
])
def test_built_model_rows(tmp_path, capsys, rules, expected):
    code, report = summary_json(capsys, built_model(tmp_path), "--rules", rules)
    assert code == 0
    assert rows(report) == expected
    assert report["total"] == {"nodes": 10, "onnx_nodes": 11, "on_path": 5, "with_rule": 5, "off_path": 5,
                               "covered": 1.0}
    off = [r for r in report["op_types"] if r["on_path"] == 0]
    assert all(r["covered"] is None for r in off)


def test_the_second_output_is_explained_on_request(tmp_path, capsys):
    code, report = summary_json(capsys, built_model(tmp_path), "--output", "z")
    assert code == 0
    assert report["start"] == "z"
    assert report["total"] == {"nodes": 10, "onnx_nodes": 11, "on_path": 1, "with_rule": 1, "off_path": 9,
                               "covered": 1.0}


def test_nodes_without_a_rule_lower_the_share_and_exit_1(tmp_path, capsys):
    rules = tmp_path / "partial.rules"
    rules.write_text("rulegraph 1\nlinear -> gradient\nroute -> gradient\n")
    code, report = summary_json(capsys, built_model(tmp_path), "--rules", str(rules))
    assert code == 1
    by_kind = {(r["op_type"], r["kind"]): r for r in report["op_types"]}
    assert (by_kind["SiLU", "nonlinear"]["with_rule"], by_kind["SiLU", "nonlinear"]["covered"]) == (0, 0.0)
    assert (by_kind["Mul", "bilinear"]["with_rule"], by_kind["Mul", "linear"]["with_rule"]) == (0, 1)
    assert report["total"]["with_rule"] == 3 and report["total"]["covered"] == pytest.approx(3 / 5)
    assert main(["ops", built_model(tmp_path), "--rules", str(rules), "--summary"]) == 1
    text = capsys.readouterr().out
    silu = next(line for line in text.splitlines() if line.startswith("SiLU"))
    assert silu.split()[:9] == ["SiLU", "(fused,", "2", "ONNX", "nodes)", "nonlinear", "1", "1", "0"]
    assert silu.endswith("0.0 %  !! 1 without a usable rule")
    assert "60.0 %" in text.splitlines()[-2]
