"""The CLI and the user's files: exit codes (0 / 1 / 2 / 3 / 130 / 141), outputs checked before
the work and written atomically, never onto an input; a failed write keeps the previous file."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from rulegraph import Explainer, cli
from rulegraph.cli import main
from rulegraph.errors import RulegraphError, RulegraphWarning
from rulegraph.run.files import atomic_write, check_output, model_files, write_with

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"
SAMPLE = ROOT / "models" / "digits_sample.npz"
DIGIT = ROOT / "models" / "digit_3.png"
UNWRITABLE = Path("/proc")  # no file can be created there, not even by root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def work(tmp_path):
    """Copies of the user's files: model, input (.npz, .npy, image), a rule file."""
    shutil.copy(CNN, tmp_path / "model.onnx")
    shutil.copy(SAMPLE, tmp_path / "x.npz")
    np.save(tmp_path / "x.npy", np.load(SAMPLE)["x"])
    shutil.copy(DIGIT, tmp_path / "digit.png")
    (tmp_path / "my.rules").write_text((ROOT / "rules" / "lrp-epsilon.rules").read_text())
    (tmp_path / "out").mkdir()
    return tmp_path


def explain(work, *extra):
    return ["explain", str(work / "model.onnx"), "--rules", str(work / "my.rules"), "--input",
            str(work / "x.npy"), *extra]


def compile_to(work, out, rules="lrp-epsilon"):
    return ["compile", str(work / "model.onnx"), "--rules", rules, "-o", str(out)]


# (argv built from the work folder, message on stderr); every row exits 2 and leaves every file as it was
OUTPUT_ROWS = {
    "compile onto the model": (lambda w: compile_to(w, w / "model.onnx"), "is the input file"),
    "compile onto the model by another name": (lambda w: compile_to(w, w / "out" / ".." / "model.onnx"),
                                               "is the input file"),
    "compile onto the rule file": (lambda w: compile_to(w, w / "my.rules", str(w / "my.rules")),
                                   "is the input file"),
    "explain --out onto the input": (lambda w: explain(w, "--out", str(w / "x.npy")), "is the input file"),
    "explain --heatmap onto the input image": (
        lambda w: ["explain", str(w / "model.onnx"), "--rules", "lrp-epsilon", "--input",
                   str(w / "digit.png"), "--heatmap", str(w / "digit.png")], "is the input file"),
    "check --output-file onto the rule file": (
        lambda w: ["check", str(w / "model.onnx"), "--rules", str(w / "my.rules"), "--output-file",
                   str(w / "my.rules")], "is the input file"),
    "demo --heatmap onto a rule file": (lambda w: ["demo", "--rules", str(w / "my.rules"), "--heatmap",
                                                   str(w / "my.rules")], "extension '.rules'"),
    "heatmap without extension": (lambda w: explain(w, "--heatmap", str(w / "out" / "map")),
                                  "no extension; use one of .bmp, .gif, .jpeg, .jpg, .png"),
    "heatmap of an unknown extension": (lambda w: explain(w, "--heatmap", str(w / "out" / "map.xyz")),
                                        "extension '.xyz'; use one of"),
    "--out not .npy": (lambda w: explain(w, "--out", str(w / "out" / "r.txt")), "use one of .npy"),
    "--out in a missing folder": (lambda w: explain(w, "--out", str(w / "nowhere" / "r.npy")),
                                  "nowhere does not exist; create it first"),
    "--out is a directory": (lambda w: compile_to(w, w / "out"),
                             "is a directory; give a file name inside it"),
    "--out under a file": (lambda w: explain(w, "--out", str(w / "x.npz" / "r.npy")),
                           "is a file, not a folder"),
    "--out in an unwritable folder": (lambda w: explain(w, "--out", str(UNWRITABLE / "r.npy")),
                                      "cannot create files in /proc"),
    "-o in an unwritable folder": (lambda w: compile_to(w, UNWRITABLE / "e.onnx"),
                                   "cannot create files in /proc"),
    "--output-file in an unwritable folder": (
        lambda w: ["check", str(w / "model.onnx"), "--rules", "lrp-epsilon", "--output-file",
                   str(UNWRITABLE / "r.xml")], "cannot create files in /proc"),
    "--heatmap in an unwritable folder": (lambda w: explain(w, "--heatmap", str(UNWRITABLE / "h.png")),
                                          "cannot create files in /proc"),
    "demo --heatmap in an unwritable folder": (lambda w: ["demo", "--heatmap", str(UNWRITABLE / "h.png")],
                                               "cannot create files in /proc"),
}


@pytest.mark.parametrize("row", list(OUTPUT_ROWS))
def test_unsafe_outputs_exit_2_and_touch_nothing(row, work, capsys):
    make_argv, message = OUTPUT_ROWS[row]
    before = {p: digest(p) for p in work.iterdir() if p.is_file()}
    assert main(make_argv(work)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {p: digest(p) for p in work.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (work / "out").iterdir()) == []


def test_output_onto_external_data_file(tmp_path):
    model = onnx.load(str(CNN))
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    before = digest(tmp_path / "m.data")
    with pytest.raises(RulegraphError, match=r"m.data is the input file .*m.data"):
        Explainer(tmp_path / "m.onnx", "lrp-epsilon").save(tmp_path / "m.data")
    argv = ["compile", str(tmp_path / "m.onnx"), "--rules", "lrp-epsilon", "-o", str(tmp_path / "m.data")]
    assert main(argv) == 2
    assert digest(tmp_path / "m.data") == before


def test_explainer_save_refuses_its_model(work):
    before = digest(work / "model.onnx")
    with pytest.raises(RulegraphError, match="is the input file"):
        Explainer(work / "model.onnx", "lrp-epsilon").save(work / "model.onnx")
    assert digest(work / "model.onnx") == before


class HalfWay(Exception):
    pass


# (what the writer raises half way) -> the exception the caller sees
FAILURES = [(HalfWay("boom"), HalfWay), (KeyboardInterrupt(), KeyboardInterrupt),
            (OSError(28, "No space left on device"), RulegraphError)]


@pytest.mark.parametrize("raised,seen", FAILURES, ids=["exception", "ctrl-c", "disk-full"])
def test_a_write_failing_half_way_keeps_the_old_file(tmp_path, raised, seen):
    target = tmp_path / "r.npy"
    target.write_bytes(b"previous good file")

    def writer(tmp):
        tmp.write_bytes(b"half of the new")
        raise raised

    with pytest.raises(seen):
        write_with(target, writer)
    assert target.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["r.npy"]


def test_atomic_write_keeps_the_replaced_files_mode(tmp_path):
    target = tmp_path / "r.txt"
    target.write_text("old")
    target.chmod(0o640)
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("argv_tail,name", [
    (["compile", "MODEL", "--rules", "lrp-epsilon", "-o", "OUT/e.onnx"], "e.onnx"),
    (["explain", "MODEL", "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--heatmap", "OUT/h.png"],
     "h.png"),
    (["check", "MODEL", "--rules", "lrp-epsilon", "--samples", "1", "--format", "junit", "--output-file",
      "OUT/r.xml"], "r.xml"),
])
def test_file_size_limit_keeps_the_old_file(tmp_path, argv_tail, name):
    """RLIMIT_FSIZE below the output's size: the write fails (EFBIG), exit 2, the old file intact."""
    old = b"x" * 100
    (tmp_path / name).write_bytes(old)
    argv = [str(tmp_path / "model.onnx") if a == "MODEL" else a.replace("OUT", str(tmp_path))
            for a in argv_tail]
    shutil.copy(CNN, tmp_path / "model.onnx")
    limit = 400  # bytes: any of these outputs is larger (the explainer, a 256-px PNG, the JUnit report)

    def limit_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "rulegraph.cli", *argv], capture_output=True, text=True,
                          preexec_fn=limit_writes, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                          timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "the write failed" in proc.stderr and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / name).read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "model.onnx"])


def test_outputs_are_written_when_all_is_well(work, capsys):
    out = work / "out"
    assert main(explain(work, "--out", str(out / "r.npy"), "--heatmap", str(out / "h.png"))) == 0
    expected = Explainer(CNN, "lrp-epsilon").explain(np.load(SAMPLE)["x"]).map
    np.testing.assert_array_equal(np.load(out / "r.npy"), expected)
    width, height = Image.open(out / "h.png").size
    assert height > 4 * width  # one panel row per batch item (8 rows)
    assert sorted(p.name for p in out.iterdir()) == ["h.png", "r.npy"]


# ---- exit codes ------------------------------------------------------------------------------------

def _raising(exc):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("exc,code,line", [
    (ZeroDivisionError("division by zero"), 3,
     ("rulegraph lint: internal error (a bug in rulegraph; please report it): ZeroDivisionError: "
      "division by zero (run again with RULEGRAPH_DEBUG=1 for the traceback)")),
    (KeyError("w1"), 3, "KeyError: 'w1'"),
    (KeyboardInterrupt(), 130, "rulegraph lint: interrupted"),
    (RulegraphError("bad.rules:1:1: no"), 2, "rulegraph lint: error: bad.rules:1:1: no"),
])
def test_exit_codes(monkeypatch, capsys, exc, code, line):
    monkeypatch.delenv("RULEGRAPH_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_lint", _raising(exc))
    assert main(["lint", "x.rules"]) == code
    err = capsys.readouterr().err
    assert line in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("RULEGRAPH_DEBUG", "1")
    monkeypatch.setattr(cli, "cmd_lint", _raising(ZeroDivisionError("division by zero")))
    with pytest.raises(ZeroDivisionError):
        main(["lint", "x.rules"])


def test_property_violated_exits_1_and_usage_errors_2(tmp_path, capsys):
    rules = tmp_path / "partial.rules"
    rules.write_text("rulegraph 1\nlinear -> gradient\nroute -> gradient\n")
    assert main(["ops", str(CNN), "--rules", str(rules)]) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(CNN)])
    assert exit_info.value.code == 2


def test_warnings_print_as_one_line(monkeypatch, capsys):
    def command(args):
        warnings.warn("binding 'Gemm -> gradient' matches no node", RulegraphWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_lint", command)
    assert main(["lint", "x.rules"]) == 0
    assert capsys.readouterr().err == "rulegraph lint: warning: binding 'Gemm -> gradient' matches no node\n"


def test_closed_stdout_exits_quietly():
    """`rulegraph ops ... | head` after head has exited: no traceback, exit 141."""
    argv = [sys.executable, "-m", "rulegraph.cli", "ops", str(CNN), "--rules", "lrp-epsilon"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_check_output_accepts_a_new_file_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output("r.npy", [CNN], [".npy"]) == Path("r.npy")


@pytest.mark.parametrize("output,listed", [("elsewhere/e.onnx", ["m.onnx"]), ("e.onnx", ["m.onnx", "m.data"]),
                                           ("sub/e.onnx", ["m.onnx", "m.data"])])
def test_external_data_is_looked_up_only_for_outputs_beside_the_model(tmp_path, output, listed):
    (tmp_path / "models" / "sub").mkdir(parents=True)
    onnx.save(onnx.load(str(CNN)), str(tmp_path / "models" / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    out = tmp_path / output if output.startswith("elsewhere") else tmp_path / "models" / output
    assert [p.name for p in model_files(tmp_path / "models" / "m.onnx", [out])] == listed
