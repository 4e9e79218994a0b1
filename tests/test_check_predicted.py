"""``check`` passes a leak the rule table predicts (gradient's bias leak under importance), fails a
node predicted to conserve that leaks, writes strict JSON, and names NaN/Inf in the inputs or the
model's outputs as the cause of NaN leaks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph.check import check
from rulegraph.cli import main

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "models" / "digits_mlp.onnx"
X = np.load(ROOT / "models" / "digits_sample.npz")["x"][:4]


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "r.rules"
    path.write_text(text)
    return str(path)


# rules, exit code, in the text, end-to-end as predicted; the measured leak is the oracle: beyond
# tolerance for the leaking files, within it for the conserving ones
CASES = [
    ("gradient", 0, "leaks bias, as predicted", True),
    ('rulegraph 1\ninclude "gradient"\nbias blame\n', 0, "OK: every checked property holds", False),
    ('rulegraph 1\ninclude "lrp-epsilon"\nbias absorb\n', 1, "FAILED", False),   # predicted to conserve
    ('rulegraph 1\ninclude "lrp-epsilon"\nlinear -> normalized(eps = 100)\n', 1, "FAILED", False),
]


@pytest.mark.parametrize("rules, code, text, as_predicted", CASES, ids=["gradient", "gradient blamed",
                                                                       "lrp absorbed", "lrp eps 100"])
def test_exit_code_follows_the_prediction(tmp_path, capsys, rules, code, text, as_predicted):
    rules = rules if "\n" not in rules else _write(tmp_path, rules)
    assert main(["check", str(MLP), "--rules", rules, "--samples", "4", "--format", "json"]) == code
    doc = _strict_json(capsys.readouterr().out)
    assert doc["end_to_end"]["as_predicted"] is as_predicted
    leaks = doc["end_to_end"]["measured"] > doc["tolerance"]
    assert leaks is (code == 1 or as_predicted)
    assert main(["check", str(MLP), "--rules", rules, "--samples", "4"]) == code
    assert text in capsys.readouterr().out


def test_predicted_leak_still_fails_assert_conserves():
    from rulegraph.testing import assert_conserves

    report = check(MLP, "gradient", samples=4)
    assert report.ok and not report.conserves
    leaking = [n for n in report.nodes if n.leak > report.tolerance]
    assert leaking and all(n.op_type == "Gemm" and n.leak_by_nature for n in leaking)
    with pytest.raises(AssertionError, match="conservation: end to end"):
        assert_conserves(MLP, "gradient")


def test_nan_in_the_input_is_named_and_json_is_strict():
    x = X.copy()
    x[1, 0, 2, 3] = np.nan
    report = check(MLP, "lrp-epsilon", x=x)
    assert not report.ok and math.isnan(report.measured)
    doc = _strict_json(report.to_json())
    assert doc["end_to_end"]["measured"] is None
    assert doc["end_to_end"]["nonfinite"] == [
        "input 'input' holds NaN at 1 of 256 values (first at index (1, 0, 2, 3))"]
    text = report.to_text()
    assert "not finite: input 'input' holds NaN at 1 of 256 values" in text
    rows = [line for line in text.splitlines() if line.startswith("/net/") and " nan " in line]
    assert rows and all("ε" not in line and "NaN/Inf in the inputs" in line for line in rows)


def test_inf_in_the_models_output_is_named():
    """Finite inputs, weights near float32's largest: the model's own output overflows."""
    w = np.full((2, 2), 3e38, np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = check(model, "gradient", x=np.ones((1, 2), np.float32))
    assert report.nonfinite == ["the model's output 'y' holds Inf at 2 of 2 values (first at index (0, 0))"]
    assert not report.ok
    _strict_json(report.to_json())
