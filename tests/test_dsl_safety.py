"""Rule files are data: linear-time error recovery, which files ``include`` reads, what messages echo,
unreadable files, and numbers checked in the precision the explainer uses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rulegraph import Explainer, cli
from rulegraph.backward import lrp, table
from rulegraph.errors import RulegraphError, RuleSyntaxError
from rulegraph.lang import parse as lang_parse
from rulegraph.run import loops
from rulegraph.run import rulefiles as dsl

HEAD = "rulegraph 1\n"


class _CountingParser:
    """Wraps the rule parser and counts the characters it is given."""

    def __init__(self, parser):
        self.parser = parser
        self.characters = 0
        self.calls = 0

    def parse(self, text: str):
        self.characters += len(text)
        self.calls += 1
        return self.parser.parse(text)


def _bad_lines(n: int) -> str:
    return HEAD + "".join(f"linear -> normalized(eps = ) # {i}\n" for i in range(n))


def _parsed_characters(monkeypatch, text: str) -> tuple[int, RuleSyntaxError]:
    counting = _CountingParser(lang_parse._parser())
    monkeypatch.setattr(lang_parse, "_parser", lambda: counting)
    with pytest.raises(RuleSyntaxError) as err:
        dsl.parse(text, "x.rules")
    return counting.characters, err.value


# (bad lines, ) -> every line reported, and the parser reads each character about once
@pytest.mark.parametrize("n", [1, 400, 4000])
def test_every_bad_line_reported_with_linear_work(monkeypatch, n):
    text = _bad_lines(n)
    characters, err = _parsed_characters(monkeypatch, text)
    assert [loc.line for loc, _ in err.problems] == list(range(2, n + 2))
    assert {loc.column for loc, _ in err.problems} == {len("linear -> normalized(eps = ") + 1}
    assert characters <= len(text) + text.count("\n") + 1  # each line once, plus its newline


def test_work_doubles_when_the_bad_lines_double(monkeypatch):
    small, _ = _parsed_characters(monkeypatch, _bad_lines(2000))
    large, _ = _parsed_characters(monkeypatch, _bad_lines(4000))
    assert large / small == pytest.approx(len(_bad_lines(4000)) / len(_bad_lines(2000)), rel=1e-9)


# --------------------------------------------------------------------------------------------------
# include reads rule files only, and messages never echo another file's content

SECRET = "CI_TOKEN=s3cr3t-value"


def _files(folder, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


# name, files (main.rules includes), expected message fragment, line:col of the problem
INCLUDE_ERRORS = [
    ("not a rules file", {"main.rules": HEAD + 'include "secret.txt"\n', "secret.txt": SECRET + "\n"},
     "cannot include 'secret.txt': only rule files (names ending in .rules)", "main.rules:2:1"),
    ("absolute non-rules path", {"main.rules": HEAD + 'include "/etc/passwd"\n'},
     "cannot include '/etc/passwd': only rule files", "main.rules:2:1"),
    ("proc environ", {"main.rules": HEAD + 'include "/proc/self/environ"\n'},
     "cannot include '/proc/self/environ': only rule files", "main.rules:2:1"),
    ("missing", {"main.rules": HEAD + 'include "nope.rules"\n'},
     "cannot include 'nope.rules': there is no file nope.rules", "main.rules:2:1"),
    ("directory", {"main.rules": HEAD + 'include "d.rules"\n', "d.rules/x.rules": HEAD},
     "cannot include 'd.rules': d.rules is a directory, not a rule file", "main.rules:2:1"),
    ("not utf-8", {"main.rules": HEAD + 'include "b.rules"\n',
                   "b.rules": b"rulegraph 1\nlinear -> gr\xe9dient\n"},
     "cannot include 'b.rules': b.rules is not UTF-8 text (byte 0xe9 at offset 24); save it as UTF-8 "
     "(line 2, column 13)", "main.rules:2:1"),
    ("binary", {"main.rules": HEAD + 'include "b.rules"\n',
                "b.rules": b"\x7fELF\x02\x01\x00\x00" + SECRET.encode()},
     "cannot include 'b.rules': b.rules is a binary file, not a rule file (a NUL byte at offset 6) "
     "(line 1, column 7)", "main.rules:2:1"),
    ("symlink to another file", {"main.rules": HEAD + 'include "link.rules"\n', "secret.txt": SECRET},
     "cannot include 'link.rules': it links to a file whose name does not end in .rules", "main.rules:2:1"),
    ("cycle", {"main.rules": HEAD + 'include "a.rules"\n', "a.rules": HEAD + 'include "main.rules"\n'},
     "include cycle: main.rules -> a.rules -> main.rules", "a.rules:2:1"),
]


@pytest.mark.parametrize("files, fragment, where", [row[1:] for row in INCLUDE_ERRORS],
                         ids=[row[0] for row in INCLUDE_ERRORS])
def test_include_errors(tmp_path, monkeypatch, files, fragment, where):
    _files(tmp_path, files)
    if "link.rules" in files["main.rules"]:
        (tmp_path / "link.rules").symlink_to(tmp_path / "secret.txt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuleSyntaxError) as err:
        dsl.load("main.rules")
    assert [str(loc) for loc, _ in err.value.problems] == [where]
    assert fragment in err.value.problems[0][1]
    assert "s3cr3t" not in str(err.value) and "root:" not in str(err.value)


def _chain(folder, n: int) -> None:
    """f0.rules includes f1.rules ... includes f{n-1}.rules."""
    for i in range(n):
        include = f'include "f{i + 1}.rules"\n' if i + 1 < n else "linear -> gradient\n"
        (folder / f"f{i}.rules").write_text(HEAD + include)


@pytest.mark.parametrize("files, ok", [(dsl.MAX_INCLUDE_DEPTH + 1, True), (dsl.MAX_INCLUDE_DEPTH + 2, False),
                                       (2000, False)])
def test_include_depth_limit(tmp_path, files, ok):
    _chain(tmp_path, files)
    if ok:
        assert len(dsl.load(tmp_path / "f0.rules").files) == files
        return
    with pytest.raises(RuleSyntaxError) as err:
        dsl.load(tmp_path / "f0.rules")
    (loc, message), = err.value.problems
    assert loc.file.endswith(f"f{dsl.MAX_INCLUDE_DEPTH}.rules") and loc.line == 2
    assert f"includes nested more than {dsl.MAX_INCLUDE_DEPTH} deep" in message


# top-level files: unreadable ones are named with a place, and a non-.rules file's lines are not shown
TOP_LEVEL = [
    ("not utf-8", "r.rules", b"rulegraph 1\n\xff\xfe\n", "r.rules:2:1",
     "'r.rules' is not UTF-8 text (byte 0xff at offset 12); save it as UTF-8"),
    ("binary", "r.rules", b"rulegraph 1\nab\x00cd", "r.rules:2:3",
     "'r.rules' is a binary file, not a rule file (a NUL byte at offset 14)"),
    ("directory", "d.rules", None, "d.rules:1:1", "'d.rules' is a directory, not a rule file"),
    ("endless device", "/dev/zero", b"", "/dev/zero:1:1",
     "'/dev/zero' is not a regular file (a device, pipe or socket), not a rule file"),
]


@pytest.mark.parametrize("name, content, where, message", [row[1:] for row in TOP_LEVEL],
                         ids=[row[0] for row in TOP_LEVEL])
def test_unreadable_top_level_file(tmp_path, monkeypatch, name, content, where, message):
    monkeypatch.chdir(tmp_path)
    if content is None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.rules").write_text(HEAD)
    elif name.startswith("/dev/"):
        assert Path(name).is_char_device()
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(RuleSyntaxError) as err:
        dsl.load(name)
    assert [(str(loc), msg) for loc, msg in err.value.problems] == [(where, message)]


def test_lines_of_a_non_rules_file_are_not_shown(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(HEAD + SECRET + " -> gradient\n")
    with pytest.raises(RuleSyntaxError) as err:
        dsl.load(path)
    (loc, _), = err.value.problems
    assert (loc.line, loc.source_line) == (2, "") and "s3cr3t-value" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# numbers: checked where they are written, in the precision the explainer uses (float32)

BINDING = "rulegraph 1\nlinear -> "
# name, text, line:col of the problem, message fragment
NUMBER_ERRORS = [
    ("eps beyond float32", BINDING + "normalized(eps = 1e39)\n", "x.rules:2:28",
     "number 1e39 for 'eps': must be a finite float32 number"),
    ("eps above its bound", BINDING + "normalized(eps = 1e20)\n", "x.rules:2:11",
     f"parameter 'eps' of rule 'normalized': must be <= {table.EPS_MAX:g}, got 1e+20"),
    ("eps that float32 turns to 0", BINDING + "normalized(eps = 1e-50)\n", "x.rules:2:28",
     "1e-50 is below float32's smallest normal magnitude"),
    ("eps of an LRP weight rule", BINDING + "zplus(eps = 20000)\n", "x.rules:2:11",
     f"parameter 'eps' of rule 'zplus': must be <= {table.EPS_MAX:g}"),
    ("eps of a transformer rule", "rulegraph 1\nbilinear -> uniform(eps = 1e5)\n", "x.rules:2:13",
     f"parameter 'eps' of rule 'uniform': must be <= {table.EPS_MAX:g}"),
    ("gamma beyond float32", BINDING + "gamma(gamma = 1e39)\n", "x.rules:2:25",
     "number 1e39 for 'gamma': must be a finite float32 number"),
    ("gamma above its bound", BINDING + "gamma(gamma = 1e30)\n", "x.rules:2:11",
     "parameter 'gamma' of rule 'gamma': must be <= 2**24"),
    ("alpha - beta = 1 only in float64", BINDING + "alpha_beta(alpha = 100000001, beta = 100000000)\n",
     "x.rules:2:11", "needs alpha − beta = 1 (conservation) in float32"),
    ("a 5000-digit integer", BINDING + "normalized(eps = " + "9" * 5000 + ")\n", "x.rules:2:28",
     "number 999999999999...999999 (5000 characters) for 'eps'"),
    ("a negative 400-digit integer", "rulegraph 1\nloop occlusion(value = -" + "1" * 400 + ")\n",
     "x.rules:2:24",
     "(401 characters) for 'value': must be a finite float32 number"),
    ("IG steps", "rulegraph 1\nloop integrated_gradients(steps = 1e12)\n", "x.rules:2:6",
     f"must be a whole number >= 1 and <= {loops.MAX_STEPS}, got 1e+12"),
    ("SmoothGrad samples", "rulegraph 1\nloop smoothgrad(samples = 1e9)\n", "x.rules:2:6",
     f"must be a whole number >= 1 and <= {loops.MAX_SAMPLES}, got 1e+09"),
    ("SmoothGrad noise", "rulegraph 1\nloop smoothgrad(noise = 1e39)\n", "x.rules:2:25",
     "number 1e39 for 'noise': must be a finite float32 number"),
    ("SmoothGrad noise above its bound", "rulegraph 1\nloop smoothgrad(noise = 1e6)\n", "x.rules:2:6",
     f"must be from 0 to {loops.MAX_NOISE:g}"),
    ("SmoothGrad seed", "rulegraph 1\nloop smoothgrad(seed = 1e30)\n", "x.rules:2:6",
     "must be a whole number >= 0 and <= 4294967295"),
    ("occlusion patch", "rulegraph 1\nloop occlusion(patch = 1e15)\n", "x.rules:2:6",
     f"must be a whole number >= 1 and <= {loops.MAX_PATCH}"),
]


@pytest.mark.parametrize("text, where, fragment", [row[1:] for row in NUMBER_ERRORS],
                         ids=[row[0] for row in NUMBER_ERRORS])
def test_number_errors(text, where, fragment):
    with pytest.raises(RuleSyntaxError) as err:
        dsl.parse(text, "x.rules")
    assert [str(loc) for loc, _ in err.value.problems] == [where]
    assert fragment in err.value.problems[0][1]


def _float32_usable(v: float) -> bool:
    """The oracle: numpy's float32 keeps v finite, and nonzero v normal."""
    with np.errstate(over="ignore"):
        f = np.float32(v)
    return bool(np.isfinite(f)) and (v == 0 or abs(float(f)) >= np.finfo(np.float32).tiny)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_number_is_accepted_exactly_when_float32_holds_it(v):
    text = f"rulegraph 1\nloop occlusion(value = {v!r})\n"
    if _float32_usable(v):
        assert dsl.parse(text).loop.params["value"] == v
    else:
        with pytest.raises(RuleSyntaxError, match="float32"):
            dsl.parse(text)


@pytest.mark.parametrize("text, value", [
    (BINDING + f"normalized(eps = {table.EPS_MAX:g})\n", table.EPS_MAX),
    (BINDING + f"gamma(gamma = {lrp.GAMMA_MAX:.0f})\n", lrp.GAMMA_MAX),
    (BINDING + "alpha_beta(alpha = 2, beta = 1)\n", 2.0),
    (f"rulegraph 1\nloop integrated_gradients(steps = {loops.MAX_STEPS})\n", loops.MAX_STEPS),
])
def test_bounds_themselves_are_accepted(text, value):
    ruleset = dsl.parse(text)
    call = ruleset.loop if ruleset.loop is not None else ruleset.bindings[0].rule
    assert next(iter(call.params.values())) == value


def test_lint_reports_a_float32_parameter(tmp_path, capsys):
    path = tmp_path / "big.rules"
    path.write_text(BINDING + "normalized(eps = 1e39)\n")
    assert cli.main(["lint", str(path)]) == 2
    assert f"{path}:2:28: number 1e39 for 'eps'" in capsys.readouterr().err


# loops checked again when they run, against the actual input
CNN = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


@pytest.mark.parametrize("params, budget, message", [
    ({"loop": "occlusion", "patch": 9}, None,
     "occlusion patch = 9 is larger than input 'input' (shape (2, 1, 8, 8)"),
    ({"loop": "integrated_gradients", "steps": 30}, 2**10,
     "loop 'integrated_gradients' would build 32 copies"),
    ({"loop": "smoothgrad", "samples": 30}, 2**10, "loop 'smoothgrad' would build 31 copies"),
    ({"loop": "occlusion", "patch": 1}, 2**10, "loop 'occlusion' would build 65 copies"),
])
def test_loops_refuse_what_cannot_run(monkeypatch, params, budget, message):
    if budget is not None:
        monkeypatch.setattr(loops, "MAX_BATCH_BYTES", budget)
    x = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(RulegraphError, match=re.escape(message)):
        Explainer(CNN, "gradient").explain(x, target=[0, 1], **params)


# column of the problem in a long line -> the shown window and where its caret is
LONG_LINES = [
    ("linear -> normalized(eps = " + "9" * 5000 + ")", 28, "linear -> normalized(eps = 999", 28),
    ("'" + "x" * 3000, 1, "'" + "x" * 99 + "...", 1),
    ("linear -> gradient" + " " * 3000 + "@", 3019, "..." + " " * 99 + "@", 103),
]


@pytest.mark.parametrize("line, column, shown_start, caret", LONG_LINES, ids=["literal", "start", "end"])
def test_long_lines_are_shown_as_a_window(line, column, shown_start, caret):
    with pytest.raises(RuleSyntaxError) as err:
        dsl.parse(HEAD + line + "\n", "x.rules")
    (loc, _), = err.value.problems
    assert (loc.line, loc.column, loc.source_line) == (2, column, line)
    _, shown, marker = str(err.value).split("\n")
    assert shown.startswith("    " + shown_start) and len(shown) <= 4 + 3 + 100 + 3
    assert marker == " " * (4 + caret - 1) + "^" and shown[4 + caret - 1] == line[column - 1]
