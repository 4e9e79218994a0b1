"""The rule language: bundled files, valid snippets, golden error messages, binding resolution.

Golden messages live in ``tests/golden/dsl/<name>.txt``; ``RULEGRAPH_UPDATE_GOLDEN=1 pytest`` rewrites
them (read the diff before committing).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lark import Tree
from tables import BUNDLED

from rulegraph.backward.rules import RULES, Param, RuleSpec
from rulegraph.errors import RulegraphError, RuleSyntaxError
from rulegraph.lang import parse as lang_parse
from rulegraph.lang.ruleset import AmbiguousBinding, NodeInfo
from rulegraph.run import rulefiles as dsl

GOLDEN = Path(__file__).parent / "golden" / "dsl"
UPDATE = os.environ.get("RULEGRAPH_UPDATE_GOLDEN") == "1"
HEAD = "rulegraph 1\nquantity relevance\n"
SEED_RULES = ("gradient", "normalized", "ignore", "slope", "repeat", "radial", "start")


def _parse(text: str):
    return dsl.parse(text, "x.rules")


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _summary(ruleset) -> list[tuple]:
    return [(b.selector.form, b.selector.value, b.rule.name, dict(b.rule.params), b.layer)
            for b in ruleset.bindings]


# --------------------------------------------------------------------------------------------------
# (a) bundled rule files



def CNN_NORMS(eps: float) -> dict[str, str]:  # noqa: N802 (reads as a table entry)
    """The normalizations of CNNs the LRP files bind (1/σ held constant)."""
    return {op: f"layernorm_linear(eps = {eps:g})" for op in ("GroupNormalization", "InstanceNormalization")}


# name -> {selector: rule as printed}; quantity and bias: tests/tables.py
BINDINGS = {
    "gradient": {"linear": "gradient", "nonlinear": "gradient", "max": "gradient", "route": "gradient",
                 "bilinear": "gradient", "normalizing": "gradient"},
    "gradient-x-input": {"linear": "gradient", "nonlinear": "slope", "max": "gradient", "route": "gradient",
                         "bilinear": "gradient", "normalizing": "gradient"},
    "lrp-0": {"linear": "normalized(eps = 0)", "nonlinear": "ignore", "max": "gradient", "route": "gradient",
              "bilinear": "uniform(eps = 0, softmax_constant = 1, gate_constant = 1, exp_constant = 1, "
                          "norm_constant = 0)",
              "normalizing": "unsupported", **CNN_NORMS(0)},
    "lrp-epsilon": {"linear": "normalized(eps = 1e-06)", "nonlinear": "ignore", "max": "gradient",
                    "route": "gradient",
                    "bilinear": "uniform(eps = 1e-06, softmax_constant = 1, gate_constant = 1, "
                                "exp_constant = 1, norm_constant = 0)",
                    "normalizing": "unsupported", **CNN_NORMS(1e-06)},
    "deconvnet": {"linear": "gradient", "nonlinear": "repeat", "max": "gradient", "route": "gradient",
                  "bilinear": "gradient", "normalizing": "gradient"},
}


def test_bundled_names():
    assert set(BINDINGS) <= set(dsl.bundled_rule_names()) == set(BUNDLED)
    assert (dsl.bundled_rules_dir() / "lrp-epsilon.rules").is_file()


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_quantity_and_bias(name):
    ruleset = dsl.load(name)
    assert (ruleset.quantity, ruleset.bias) == (BUNDLED[name].quantity, BUNDLED[name].bias)


@pytest.mark.parametrize("name", sorted(BINDINGS))
def test_bundled_file(name):
    kinds = BINDINGS[name]
    ruleset = dsl.load(name)
    quantity, bias = BUNDLED[name].quantity, BUNDLED[name].bias
    assert (ruleset.quantity, ruleset.bias, ruleset.start, ruleset.baseline) == (quantity, bias, None, None)
    assert ruleset.source == ruleset.files[0] == f"rules/{name}.rules"
    got = {str(b.selector): str(b.rule) for b in ruleset.bindings}
    assert got == {**kinds, "Softmax": "start", "LogSoftmax": "start"}
    assert {b.layer for b in ruleset.bindings} == {0}


@pytest.mark.parametrize("name", dsl.bundled_rule_names())
def test_bundled_file_parses_and_cites(name):
    """Every shipped file parses, and opens with a comment that cites its source (a year)."""
    assert dsl.load(name).bindings
    head = (dsl.bundled_rules_dir() / f"{name}.rules").read_text().splitlines()[0]
    assert head.startswith("#") and any(str(year) in head for year in range(1990, 2040))


@pytest.mark.parametrize("given", ["lrp-epsilon", "lrp-epsilon.rules"])
def test_load_bundled_by_name(given):
    assert dsl.load(given).source == "rules/lrp-epsilon.rules"


def test_load_path(tmp_path, monkeypatch):
    _write(tmp_path, {"sub/my.rules": HEAD + "linear -> gradient\n"})
    monkeypatch.chdir(tmp_path)
    assert dsl.load("sub/my.rules").source == "sub/my.rules"
    assert dsl.load(Path("sub/my.rules")).files == ("sub/my.rules",)
    assert dsl.load(tmp_path / "sub/my.rules").bindings[0].location.file == str(tmp_path / "sub/my.rules")


@pytest.mark.parametrize("given, message", [
    ("lrp-epsilo", ("no rule file or bundled rule file named 'lrp-epsilo' (did you mean 'lrp-epsilon'?); "
                    "bundled rule files: ")),
    ("nowhere/x.rules", "no rule file 'nowhere/x.rules'; bundled rule files: "),
])
def test_load_unknown(given, message):
    with pytest.raises(RulegraphError) as err:
        dsl.load(given)
    assert str(err.value).startswith(message)
    assert "lrp-0" in str(err.value)


# --------------------------------------------------------------------------------------------------
# (b) valid snippets


VALID = [
    ("kind", HEAD + "linear -> gradient\n",
     {"bindings": [("kind", "linear", "gradient", {}, 0)]}),
    ("op type", HEAD + "Relu -> ignore\n",
     {"bindings": [("op", "Relu", "ignore", {}, 0)]}),
    ("several selectors", HEAD + "Softmax, LogSoftmax,linear -> start\n",
     {"bindings": [("op", "Softmax", "start", {}, 0), ("op", "LogSoftmax", "start", {}, 0),
                   ("kind", "linear", "start", {}, 0)]}),
    ("node exact and glob", HEAD + 'node "/features/features.0/Conv" -> gradient\nnode "/fc*" -> gradient\n',
     {"bindings": [("node", "/features/features.0/Conv", "gradient", {}, 0),
                   ("node", "/fc*", "gradient", {}, 0)]}),
    ("node name with escapes", HEAD + 'node "a\\"b\\\\c" -> gradient\n',
     {"bindings": [("node", 'a"b\\c', "gradient", {}, 0)]}),
    ("first and last", HEAD + "first Conv -> gradient\nlast Gemm -> normalized(eps = 0)\n",
     {"bindings": [("first", "Conv", "gradient", {}, 0), ("last", "Gemm", "normalized", {"eps": 0.0}, 0)]}),
    ("default parameter", HEAD + "linear -> normalized\n",
     {"bindings": [("kind", "linear", "normalized", {"eps": 1e-6}, 0)]}),
    ("empty parentheses", HEAD + "max -> radial()\n",
     {"bindings": [("kind", "max", "radial", {}, 0)]}),
    ("scientific", HEAD + "linear -> normalized(eps=2.5E-3)\n",
     {"bindings": [("kind", "linear", "normalized", {"eps": 0.0025}, 0)]}),
    ("integer", HEAD + "linear -> normalized( eps = 2 )\n",
     {"bindings": [("kind", "linear", "normalized", {"eps": 2.0}, 0)]}),
    ("leading dot and plus", HEAD + "linear -> normalized(eps = +.25)\n",
     {"bindings": [("kind", "linear", "normalized", {"eps": 0.25}, 0)]}),
    ("linear-or-bilinear op", HEAD + "MatMul -> normalized\nMul -> gradient\n",
     {"bindings": [("op", "MatMul", "normalized", {"eps": 1e-6}, 0), ("op", "Mul", "gradient", {}, 0)]}),
    ("defaults", "rulegraph 1\n",
     {"quantity": "relevance", "bias": "absorb", "start": None, "baseline": None, "bindings": []}),
    ("all headers, any order", "rulegraph 1\nstart one\nbaseline mean\nbias total\nquantity difference\n",
     {"quantity": "difference", "bias": "total", "start": "one", "baseline": "mean"}),
    ("baseline file", "rulegraph 1\nquantity difference\nbaseline file \"x0.npy\"\n",
     {"baseline": "file:x0.npy"}),
    ("headers after bindings", "rulegraph 1\nlinear -> gradient\nquantity importance\nbias blame\n",
     {"quantity": "importance", "bias": "blame", "bindings": [("kind", "linear", "gradient", {}, 0)]}),
    ("comments and blank lines",
     "\n# a comment\n\nrulegraph 1   # version\n\n# more\nquantity importance  # q\nlinear->gradient#\n\n",
     {"quantity": "importance", "bindings": [("kind", "linear", "gradient", {}, 0)]}),
    ("windows line ends, no final newline", "rulegraph 1\r\nquantity importance\r\nlinear -> gradient",
     {"quantity": "importance", "bindings": [("kind", "linear", "gradient", {}, 0)]}),
    ("keywords as rule names", HEAD + "Softmax -> start\nnonlinear -> ignore\nbias ignore\n",
     {"bias": "ignore",
      "bindings": [("op", "Softmax", "start", {}, 0), ("kind", "nonlinear", "ignore", {}, 0)]}),
]


@pytest.mark.parametrize("text, expected", [row[1:] for row in VALID], ids=[row[0] for row in VALID])
def test_valid(text, expected):
    ruleset = dsl.parse(text)
    for name, value in expected.items():
        got = _summary(ruleset) if name == "bindings" else getattr(ruleset, name)
        assert got == value, name


def test_locations_and_header_locations():
    ruleset = _parse(HEAD + "  Softmax,  LogSoftmax -> start\n")
    assert [(b.location.line, b.location.column) for b in ruleset.bindings] == [(3, 3), (3, 13)]
    assert ruleset.bindings[0].location.source_line == "  Softmax,  LogSoftmax -> start"
    assert ruleset.bindings[0].location.file == "x.rules"
    assert str(ruleset.header_locations["quantity"]) == "x.rules:2:1"
    assert (ruleset.source, ruleset.files) == ("x.rules", ("x.rules",))


def test_baseline_file_relative_to_rule_file(tmp_path):
    _write(tmp_path, {"sub/d.rules": "rulegraph 1\nquantity difference\nbaseline file \"x0.npy\"\n"})
    assert dsl.load(tmp_path / "sub/d.rules").baseline == "file:" + str(tmp_path / "sub/x0.npy")


# includes: (files, the file to load, expected) with layers; files are written to tmp_path
BASE = HEAD + "bias absorb\nlinear -> gradient\nnonlinear -> ignore\n"
INCLUDES = [
    ("includer overrides",
     {"base.rules": BASE,
      "top.rules": 'rulegraph 1\ninclude "base.rules"\nbias blame\nlinear -> normalized\n'},
     {"bindings": [("kind", "linear", "gradient", {}, 0), ("kind", "nonlinear", "ignore", {}, 0),
                   ("kind", "linear", "normalized", {"eps": 1e-6}, 1)],
      "quantity": "relevance", "bias": "blame", "files": ("base.rules", "top.rules")}),
    ("include from a subfolder",
     {"lib/base.rules": BASE, "top.rules": 'rulegraph 1\nmax -> radial\ninclude "lib/base.rules"\n'},
     {"bindings": [("kind", "linear", "gradient", {}, 0), ("kind", "nonlinear", "ignore", {}, 0),
                   ("kind", "max", "radial", {}, 1)],
      "files": ("lib/base.rules", "top.rules")}),
    ("include relative to the including file",
     {"lib/base.rules": BASE, "lib/mid.rules": 'rulegraph 1\ninclude "base.rules"\n',
      "top.rules": 'rulegraph 1\ninclude "lib/mid.rules"\n'},
     {"files": ("lib/base.rules", "lib/mid.rules", "top.rules")}),
    ("include a bundled file",
     {"top.rules": 'rulegraph 1\ninclude "lrp-epsilon"\nbias absorb\nnode "fc" -> gradient\n'},
     {"quantity": "relevance", "bias": "absorb", "files": ("rules/lrp-epsilon.rules", "top.rules")}),
    ("diamond read once",
     {"base.rules": BASE, "a.rules": 'rulegraph 1\ninclude "base.rules"\nmax -> gradient\n',
      "b.rules": 'rulegraph 1\ninclude "base.rules"\nmax -> radial\n',
      "top.rules": 'rulegraph 1\ninclude "a.rules"\ninclude "b.rules"\n'},
     {"files": ("base.rules", "a.rules", "b.rules", "top.rules"),
      "bindings": [("kind", "linear", "gradient", {}, 0), ("kind", "nonlinear", "ignore", {}, 0),
                   ("kind", "max", "gradient", {}, 1), ("kind", "max", "radial", {}, 2)]}),
]


@pytest.mark.parametrize("files, expected", [row[1:] for row in INCLUDES], ids=[row[0] for row in INCLUDES])
def test_include(tmp_path, monkeypatch, files, expected):
    _write(tmp_path, files)
    monkeypatch.chdir(tmp_path)
    ruleset = dsl.load("top.rules")
    for name, value in expected.items():
        got = _summary(ruleset) if name == "bindings" else getattr(ruleset, name)
        assert got == value, name
    assert all(b.location.file == ruleset.files[b.layer] for b in ruleset.bindings)


# --------------------------------------------------------------------------------------------------
# (c) golden error messages: the whole rendered message is pinned


GOLDEN_CASES = [
    ("unknown-rule", HEAD + "linear -> normalised(eps = 1e-6)\n"),
    ("unknown-op-type", HEAD + "Rlu -> ignore\n"),
    ("misspelt-kind", HEAD + "nonlinar -> ignore\n"),
    ("first-with-kind", HEAD + "first linear -> gradient\nlast Cnv -> gradient\n"),
    ("unknown-parameter", HEAD + "linear -> normalized(epsilon = 0.1)\n"),
    ("missing-parameter", HEAD + "first Conv -> zbox(low = -1)\n"),
    ("bad-parameter-value", HEAD + "linear -> normalized(eps = -1)\n"),
    ("string-parameter", HEAD + 'linear -> normalized(eps = "small")\n'),
    ("parameter-twice", HEAD + "linear -> normalized(eps = 1, eps = 2)\n"),
    ("rule-wrong-kind", HEAD + "nonlinear -> normalized\n"),
    ("rule-wrong-op", HEAD + "Relu, MaxPool -> normalized\n"),
    ("missing-arrow", HEAD + "linear normalized\n"),
    ("missing-rule", HEAD + "linear ->\n"),
    ("missing-equals", HEAD + "linear -> normalized(eps 1e-6)\n"),
    ("unclosed-parenthesis", HEAD + "linear -> normalized(eps = 1e-6\n"),
    ("positional-parameter", HEAD + "linear -> normalized(1e-6)\n"),
    ("two-rules", HEAD + "linear -> gradient normalized\n"),
    ("unterminated-string", HEAD + 'node "/features/0/Conv -> gradient\n'),
    ("single-quotes", HEAD + "node '/features/0/Conv' -> gradient\n"),
    ("unquoted-node", HEAD + "node conv1 -> gradient\n"),
    ("unexpected-character", HEAD + "linear -> gradient;\n"),
    ("misspelt-header", "rulegraph 1\nquantitiy relevance\n"),
    ("bad-header-values", "rulegraph 1\nquantity relevence\nbias blam\nstart outptu\n"),
    ("header-twice", HEAD + "quantity importance\n"),
    ("missing-version", "# my rules\nquantity relevance\nlinear -> gradient\n"),
    ("wrong-version", "rulegraph 2\nquantity relevance\n"),
    ("version-not-first", "quantity relevance\nrulegraph 1\n"),
    ("bad-version", "rulegraph one\nquantity relevance\n"),
    ("baseline-without-difference", HEAD + "baseline zeros\n"),
    ("difference-without-baseline", "rulegraph 1\nquantity difference\nlinear -> gradient\n"),
    ("duplicate-binding", HEAD + "linear -> gradient\nmax -> gradient\nlinear -> normalized\n"),
    ("duplicate-on-one-line", HEAD + "Softmax, Softmax -> start\n"),
    ("include-missing", HEAD + 'include "base.rules"\ninclude "lrp-epsilo"\n'),
    ("include-unquoted", HEAD + "include base.rules\n"),
    ("include-cycle", {"main.rules": 'rulegraph 1\ninclude "a.rules"\n',
                       "a.rules": 'rulegraph 1\ninclude "sub/b.rules"\n',
                       "sub/b.rules": 'rulegraph 1\ninclude "../a.rules"\n'}),
    ("include-self", 'rulegraph 1\ninclude "main.rules"\n'),
    ("error-in-included-file", {"main.rules": 'rulegraph 1\ninclude "base.rules"\nRelu -> slop\n',
                                "base.rules": "rulegraph 1\nlinear -> normalised\n"}),
    ("several-problems", ("rulegraph 1\nquantity relevance\nlinear -> normalised\nRlu -> ignore\n"
                          "max gradient\nroute -> gradient(eps = 1)\nnonlinear -> normalized\n"
                          "linear -> gradient\n")),
]

#: A rule with required parameters (none of the seed rules has one), for the missing-parameter case.
ZBOX = RuleSpec("zbox", frozenset({"linear"}), None, (Param("low", doc="the lowest input value"),
                                                      Param("high", doc="the highest input value")))


@pytest.fixture
def seed_rules(monkeypatch):
    """Pin RULES to the seed rules (plus zbox), so new rules do not change the golden messages."""
    for name in list(RULES):
        if name not in SEED_RULES:
            monkeypatch.delitem(RULES, name)
    monkeypatch.setitem(RULES, "zbox", ZBOX)
    seed_files = ["deconvnet", "gradient", "gradient-x-input", "lrp-0", "lrp-epsilon"]
    monkeypatch.setattr(lang_parse, "bundled_rule_names", lambda: seed_files)  # new files keep goldens stable


@pytest.mark.parametrize("name, files", GOLDEN_CASES, ids=[row[0] for row in GOLDEN_CASES])
def test_golden_error(tmp_path, monkeypatch, seed_rules, name, files):
    _write(tmp_path, {"main.rules": files} if isinstance(files, str) else files)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuleSyntaxError) as err:
        dsl.load("main.rules")
    message = str(err.value) + "\n"
    for location, _ in err.value.problems:
        lines = (tmp_path / location.file).read_text().splitlines()
        assert location.source_line == lines[location.line - 1]
    golden = GOLDEN / f"{name}.txt"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(message)
    assert golden.is_file(), f"no golden file {golden}: run with RULEGRAPH_UPDATE_GOLDEN=1"
    assert message == golden.read_text()


def test_no_orphan_goldens():
    assert {p.stem for p in GOLDEN.glob("*.txt")} == {row[0] for row in GOLDEN_CASES}


def test_several_problems_in_one_error():
    with pytest.raises(RuleSyntaxError) as err:
        _parse(dict(GOLDEN_CASES)["several-problems"])
    assert [loc.line for loc, _ in err.value.problems] == [3, 4, 5, 6, 7, 8]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='rulegraph 1\nlinear->normalized(eps=1e-6,")# node first Relu', max_size=80))
def test_never_a_lark_error(text):
    """Whatever the text, parse returns a RuleSet or raises RuleSyntaxError, never a lark error."""
    try:
        dsl.parse(text)
    except RuleSyntaxError as err:
        assert err.problems and all(loc.line >= 1 and loc.column >= 1 for loc, _ in err.problems)


def test_unhandled_grammar_rule_fails_loudly():
    builder = lang_parse._Builder("x.rules", [], None, set())
    with pytest.raises(AssertionError, match="no transformer method for grammar rule 'mystery'"):
        builder.transform(Tree("mystery", []))


def test_every_grammar_rule_has_a_transformer_method():
    names = {rule.alias or rule.origin.name for rule in lang_parse._parser().rules}
    names = {str(n) for n in names if not str(n).startswith("_")}
    assert names and all(callable(getattr(lang_parse._Builder, n, None)) for n in names)


# --------------------------------------------------------------------------------------------------
# (d) which binding a node gets


RESOLVE = HEAD + """\
linear -> normalized
Conv -> gradient
first Conv -> normalized(eps = 0.5)
node "conv1" -> normalized(eps = 0.25)
"""

BINDING_FOR = [
    ("node beats first", NodeInfo("conv1", "Conv", "linear", first_of_type=True), 'node "conv1"'),
    ("first beats op", NodeInfo("conv0", "Conv", "linear", first_of_type=True), "first Conv"),
    ("op beats kind", NodeInfo("conv2", "Conv", "linear"), "Conv"),
    ("kind", NodeInfo("fc", "Gemm", "linear"), "linear"),
    ("nothing", NodeInfo("relu", "Relu", "nonlinear"), None),
]


@pytest.mark.parametrize("node, selector", [row[1:] for row in BINDING_FOR],
                         ids=[row[0] for row in BINDING_FOR])
def test_binding_for(node, selector):
    binding = _parse(RESOLVE).binding_for(node)
    assert (None if binding is None else str(binding.selector)) == selector


@pytest.mark.parametrize("text, node", [
    (HEAD + 'node "conv*" -> gradient\nnode "*1" -> normalized\n', NodeInfo("conv1", "Conv", "linear")),
    (HEAD + "first Conv -> gradient\nlast Conv -> normalized\n",
     NodeInfo("conv", "Conv", "linear", first_of_type=True, last_of_type=True)),
], ids=["two node globs", "first and last of a single Conv"])
def test_equal_specificity_is_ambiguous(text, node):
    with pytest.raises(AmbiguousBinding, match="equal specificity"):
        _parse(text).binding_for(node)


@pytest.mark.parametrize("top, node, rule", [
    ("linear -> normalized\n", NodeInfo("fc", "Gemm", "linear"), "normalized"),  # equal: includer wins
    ("linear -> normalized\n", NodeInfo("c", "Conv", "linear"), "gradient"),  # base's Conv: more specific
    ('node "c*" -> radial\n', NodeInfo("c", "MaxPool", "max"), "radial"),
], ids=["includer overrides", "specificity before layer", "includer adds"])
def test_includer_overrides(tmp_path, top, node, rule):
    _write(tmp_path, {"base.rules": HEAD + "linear -> gradient\nConv -> gradient\nmax -> gradient\n",
                      "top.rules": 'rulegraph 1\ninclude "base.rules"\n' + top})
    assert dsl.load(tmp_path / "top.rules").binding_for(node).rule.name == rule
