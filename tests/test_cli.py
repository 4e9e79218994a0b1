"""The command line: demo, explain, compile (the saved explainer runs on plain onnxruntime), ops,
lint; exit codes 0 / 1 / 2 and error messages that name the place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from rulegraph import Explainer
from rulegraph.cli import main
from rulegraph.compile.build import TARGET

ROOT = Path(__file__).resolve().parent.parent
CNN = str(ROOT / "models" / "digits_cnn.onnx")
SAMPLE = ROOT / "models" / "digits_sample.npz"


def test_demo_writes_heatmap(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--heatmap", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted class: 3" in text and "conservation delta" in text
    assert out.stat().st_size > 100


def test_explain_npz_to_npy(tmp_path, capsys):
    out = tmp_path / "r.npy"
    assert main(["explain", CNN, "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--target", "argmax",
                 "--out", str(out), "--heatmap", str(tmp_path / "h.png")]) == 0
    r = np.load(out)
    assert r.shape == (8, 1, 8, 8)
    assert capsys.readouterr().out.count("row ") == 8


def test_compiled_explainer_runs_without_rulegraph(tmp_path):
    """`rulegraph compile` output + plain onnxruntime == Explainer.explain."""
    path = tmp_path / "explainer.onnx"
    assert main(["compile", CNN, "--rules", "lrp-epsilon", "-o", str(path)]) == 0
    x = np.load(SAMPLE)["x"]
    explainer = Explainer(CNN, "lrp-epsilon")
    expected = explainer.explain(x, target=[3] * 8)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    attribution_name = explainer.compiled().attribution["input"]
    (got,) = session.run([attribution_name], {"input": x, TARGET: np.full(8, 3, dtype=np.int64)})
    np.testing.assert_array_equal(got, expected.map)


def test_ops_table_marks_missing_rules(tmp_path, capsys):
    rules = tmp_path / "partial.rules"
    rules.write_text("rulegraph 1\nlinear -> gradient\nroute -> gradient\n")
    assert main(["ops", CNN, "--rules", str(rules)]) == 1
    text = capsys.readouterr().out
    assert "!! node" in text and "(Relu), kind nonlinear, has no rule" in text
    assert main(["ops", CNN, "--rules", "lrp-epsilon"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["explain", "missing.onnx", "--rules", "lrp-epsilon", "--input", "x.npy"], "missing.onnx: no such model file"),
    (["explain", CNN, "--rules", "lrp-epsilonn", "--input", str(SAMPLE)], "did you mean 'lrp-epsilon'"),
    (["explain", CNN, "--rules", "lrp-epsilon", "--input", "nothing.npy"], "nothing.npy: no such input file"),
    (["explain", CNN, "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--target", "cat"], "--target must be"),
    (["explain", CNN, "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--output", "probs"],
     "the model has no output 'probs'; its outputs: logits"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_lint(tmp_path, capsys):
    assert main(["lint", "lrp-epsilon"]) == 0
    bad = tmp_path / "bad.rules"
    bad.write_text("rulegraph 1\nlinear -> normalised(eps = 0.1)\n")
    assert main(["lint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:11: unknown rule 'normalised' (did you mean 'normalized'?)" in err
