"""The reference in docs/ and CONTRIBUTING.md says what the code does: every table a page marks with
``<!-- name -->`` ... ``<!-- /name -->`` is compared with the registry it describes, every rule-file
example parses (or fails with the message shown), and every name of the compiled explainer exists.

One oracle per row: the rule table, the op table, the parser, a compiled explainer."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph import Explainer
from rulegraph.backward.lrp import GAMMA_MAX
from rulegraph.backward.ops import OP_KINDS
from rulegraph.backward.rules import RULES
from rulegraph.backward.table import EPS_MAX
from rulegraph.backward.vjp import BILINEAR_WHEN_ALL_ACTIVE
from rulegraph.check.report import COUNTED_BIAS
from rulegraph.compile.build import Compiled
from rulegraph.compile.targets import FORMS, RANK_CLASS_AXIS
from rulegraph.errors import RuleSyntaxError
from rulegraph.graph.kinds import BILINEAR
from rulegraph.lang import parse as lang_parse
from rulegraph.lang.floats import FLOAT32
from rulegraph.lang.ruleset import BIAS_POLICIES, KINDS, QUANTITIES, SPECIFICITY, START_MODES
from rulegraph.run import rulefiles as dsl
from rulegraph.run.loopgraph import LoopModel
from rulegraph.run.loops import LOOPS, MAX_BATCH_BYTES, MAX_NOISE, MAX_PATCH, MAX_SAMPLES, MAX_STEPS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "CONTRIBUTING.md"]
CNN = ROOT / "models" / "digits_cnn.onnx"


# --------------------------------------------------------------------------------------------------
# reading the pages


def _text(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


def _cell(text: str) -> str:
    return text.strip().replace("`", "")


def table(page: str, marker: str) -> list[dict[str, str]]:
    """The markdown table between ``<!-- marker -->`` and ``<!-- /marker -->``: one dict per row,
    keyed by the header, backticks dropped."""
    found = re.search(rf"<!-- {marker} -->\n(.*?)\n<!-- /{marker} -->", _text(page), re.S)
    assert found, f"{page} has no table marked <!-- {marker} -->"
    lines = [line for line in found.group(1).splitlines() if line.startswith("|")]
    header = [_cell(c) for c in lines[0].strip("|").split("|")]
    rows = [[_cell(c) for c in line.strip("|").split(" | ")] for line in lines[2:]]
    assert all(len(r) == len(header) for r in rows), f"{page} <!-- {marker} -->: a row's cell count is wrong"
    return [dict(zip(header, r)) for r in rows]


def blocks(info: str) -> list[tuple[str, int, str]]:
    """(page, index, text) of every fenced block whose info string is ``info``, in every page."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        found = re.findall(rf"^```{re.escape(info)}\n(.*?)^```$", text, re.S | re.M)
        out += [(page.relative_to(ROOT).as_posix(), i, block) for i, block in enumerate(found)]
    return out


def _list(cell: str) -> list[str]:
    return [] if cell in ("none", "all") else [w.strip() for w in cell.split(",")]


def _kinds(cell: str) -> frozenset[str]:
    return frozenset(KINDS) if cell == "every kind" else frozenset(_list(cell))


def _params(cell: str) -> dict[str, float | str | None]:
    """``eps = 1e-06; alpha; max = "softness"`` -> {name: default}, None for a required one."""
    out: dict[str, float | str | None] = {}
    for item in ([] if cell == "none" else cell.split(";")):
        name, _, default = (s.strip() for s in item.partition("="))
        out[name] = None if not default else default.strip('"') if default.startswith('"') else float(default)
    return out


def _declared_params(spec) -> dict[str, float | str | None]:
    return {p.name: p.default if p.default is None or p.choices else float(p.default) for p in spec.params}


# --------------------------------------------------------------------------------------------------
# rules.md: the rule table


RULE_ROWS = {row["rule"]: row for row in table("docs/rules.md", "rule-table")}


def test_every_rule_is_documented():
    assert sorted(RULE_ROWS) == sorted(RULES)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_row_matches_the_rule_table(name):
    spec, row = RULES[name], RULE_ROWS[name]
    assert _kinds(row["kinds"]) == spec.kinds
    assert frozenset(_list(row["op types"])) == spec.op_types
    assert _params(row["parameters"]) == _declared_params(spec)


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_has_a_section(name):
    assert re.search(rf"^### {name}$", _text("docs/rules.md"), re.M), f"docs/rules.md lacks '### {name}'"


# conservation: CLASS, or CLASS if CONDITION; else CLASS ------------------------------------------


CONSERVATION_ROWS = table("docs/rules.md", "conservation-table")


def _op_types(kind: str) -> list[str]:
    if kind == BILINEAR:
        return sorted(BILINEAR_WHEN_ALL_ACTIVE)
    return sorted(op for op, k in OP_KINDS.items() if k == kind)


def _param_grid(spec) -> list[dict[str, float | str]]:
    """Every combination of a few values per parameter: 0, 1, 2 and the default; each choice."""
    values = []
    for p in spec.params:
        default = set() if p.default is None or p.choices else {float(p.default)}
        values.append(p.choices or sorted({0.0, 1.0, 2.0} | default))
    return [dict(zip([p.name for p in spec.params], combo)) for combo in itertools.product(*values)]


def _holds(condition: str, op_type: str, params) -> bool:
    for clause in condition.split(" and "):
        if clause.startswith("op in "):
            ok = op_type in _list(clause.removeprefix("op in "))
        else:
            name, op, value = re.fullmatch(r"(\w+) ([=>]) (\S+)", clause).groups()
            ok = params[name] == float(value) if op == "=" else params[name] > float(value)
        if not ok:
            return False
    return True


def _documented_class(cell: str, op_type: str, params) -> str:
    conditional = re.fullmatch(r"(.+?) if (.+); else (.+)", cell)
    if conditional is None:
        return cell
    then, condition, otherwise = conditional.groups()
    return then if _holds(condition, op_type, params) else otherwise


def test_conservation_table_has_one_row_per_rule_and_accepted_kind():
    documented = sorted((row["rule"], kind) for row in CONSERVATION_ROWS for kind in _kinds(row["kind"]))
    assert documented == sorted((name, kind) for name, spec in RULES.items() for kind in spec.kinds)
    for spec in RULES.values():  # a class declared for a kind the rule does not accept would not be shown
        assert {kind for _, kind in spec.conservation} <= spec.kinds, spec.name


@pytest.mark.parametrize("row", CONSERVATION_ROWS, ids=lambda r: f"{r['rule']}-{r['kind']}")
def test_conservation_class_as_the_rule_table_declares(row):
    spec = RULES[row["rule"]]
    if all(row[q] == "—" for q in QUANTITIES):   # start, unsupported: rules that never emit
        assert spec.conservation == {} and row["kind"] == "every kind"
        return
    for kind in _kinds(row["kind"]):
        for quantity in QUANTITIES:
            for op_type in _op_types(kind):
                for params in _param_grid(spec):
                    assert spec.conservation_of(quantity, kind, op_type, params) == _documented_class(
                        row[quantity], op_type, params), (quantity, kind, op_type, params)


# quantities, bias policies, loops, bundled files --------------------------------------------------


def test_quantities_are_the_languages():
    quantities = re.search(r"## Quantities\n\n(.*?)\n\n", _text("docs/rules.md"), re.S).group(1)
    assert re.findall(r"^\| `(\w+)`", quantities, re.M) == list(QUANTITIES)


BIAS_ROWS = table("docs/rules.md", "bias-table")


def test_bias_policies_are_the_languages():
    assert [row["policy"] for row in BIAS_ROWS] == list(BIAS_POLICIES)


@pytest.mark.parametrize("row", BIAS_ROWS, ids=lambda r: r["policy"])
def test_which_bias_policies_the_checker_counts(row):
    """"yes": the checker counts every bias share under the policy (ignore: for some rules only)."""
    assert (row["counted by the checker"] == "yes") is (row["policy"] in COUNTED_BIAS)


LOOP_ROWS = {row["loop"]: row for row in table("docs/rules.md", "loops-table")}


def test_every_loop_is_documented():
    assert sorted(LOOP_ROWS) == sorted(LOOPS)


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loop_parameters(name):
    assert _params(LOOP_ROWS[name]["parameters"]) == _declared_params(LOOPS[name])


BUNDLED_ROWS = {row["file"]: row for row in table("docs/rules.md", "bundled-table")}


def test_every_bundled_rule_file_is_listed():
    assert sorted(BUNDLED_ROWS) == dsl.bundled_rule_names()


@pytest.mark.parametrize("name", dsl.bundled_rule_names())
def test_bundled_file_headers(name):
    ruleset = dsl.load(name)
    assert (BUNDLED_ROWS[name]["quantity"], BUNDLED_ROWS[name]["bias"]) == (ruleset.quantity, ruleset.bias)


# --------------------------------------------------------------------------------------------------
# kinds.md


KIND_ROWS = {row["kind"]: row for row in table("docs/kinds.md", "kinds-table")}


def test_every_kind_is_documented():
    assert list(KIND_ROWS) == list(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_op_types_of_a_kind_are_the_op_tables(kind):
    assert _list(KIND_ROWS[kind]["op types"]) == _op_types(kind)


# --------------------------------------------------------------------------------------------------
# language.md and every rule-file example


@pytest.mark.parametrize("page, index, text", blocks("rules"), ids=lambda v: str(v)[:20])
def test_rule_file_example_parses(page, index, text):
    assert dsl.parse(text).bindings or dsl.parse(text).loop


ERROR_EXAMPLES = re.findall(r"^```rules-error\n(.*?)^```\n\n```text\n(.*?)^```$", _text("docs/language.md"),
                            re.S | re.M)


def test_language_page_shows_an_error_example():
    assert len(ERROR_EXAMPLES) == 1


@pytest.mark.parametrize("text, message", ERROR_EXAMPLES, ids=lambda v: "example")
def test_error_example_is_the_parsers_message(text, message):
    with pytest.raises(RuleSyntaxError) as caught:
        dsl.parse(text)
    assert str(caught.value) == message.rstrip("\n")


SELECTOR_FORMS = {'node "NAME"': ("node",), "first OP, last OP": ("first", "last"), "OP": ("op",),
                  "KIND": ("kind",)}
SELECTOR_ROWS = table("docs/language.md", "selectors-table")


@pytest.mark.parametrize("row", SELECTOR_ROWS, ids=lambda r: r["selector"])
def test_selector_specificity(row):
    forms = SELECTOR_FORMS[row["selector"]]
    assert [SPECIFICITY[form] for form in forms] == [int(row["specificity"])] * len(forms)


def test_every_selector_form_is_documented():
    assert sorted(f for r in SELECTOR_ROWS for f in SELECTOR_FORMS[r["selector"]]) == sorted(SPECIFICITY)


STATEMENTS = table("docs/language.md", "statements-table")
#: a header's values, as the parser knows them
HEADER_VALUES = {"quantity": QUANTITIES, "bias": BIAS_POLICIES, "start": START_MODES,
                 "baseline": lang_parse.BASELINES}


def test_every_header_is_a_statement():
    words = [row["statement"].split()[0] for row in STATEMENTS if not row["statement"].startswith("SELECTOR")]
    assert sorted(words) == sorted(lang_parse.HEADERS)


@pytest.mark.parametrize("header", sorted(HEADER_VALUES))
def test_header_values_are_the_parsers(header):
    (line,) = re.findall(rf"^\| `{header} \w+` \| (.*?) \|", _text("docs/language.md"), re.M)
    assert re.findall(r"`(\w+)`", line) == list(HEADER_VALUES[header])


NUMBERS = {
    "largest magnitude of any parameter (float32's largest finite number)": FLOAT32.max,
    "smallest nonzero magnitude (float32's smallest normal number)": FLOAT32.tiny,
    "largest eps": EPS_MAX,
    "largest gamma": GAMMA_MAX,
    "largest steps (integrated gradients)": MAX_STEPS,
    "largest samples (SmoothGrad)": MAX_SAMPLES,
    "largest noise (SmoothGrad)": MAX_NOISE,
    "largest patch and stride (occlusion)": MAX_PATCH,
    "largest batch of input copies a loop may build": MAX_BATCH_BYTES,
    "deepest include chain": dsl.MAX_INCLUDE_DEPTH,
}
NUMBER_ROWS = {row["limit"]: row["value"] for row in table("docs/language.md", "numbers-table")}


def _number(text: str) -> float:
    value = text.removesuffix(" bytes")
    base, _, power = value.partition("^")
    return float(base) ** int(power) if power else float(base)


def test_every_limit_is_documented():
    assert sorted(NUMBER_ROWS) == sorted(NUMBERS)


@pytest.mark.parametrize("limit", sorted(NUMBERS))
def test_limit_is_the_codes(limit):
    assert np.float32(_number(NUMBER_ROWS[limit])) == np.float32(NUMBERS[limit])


# --------------------------------------------------------------------------------------------------
# targets.md


def test_class_axis_defaults():
    rows = table("docs/targets.md", "class-axis-table")
    assert {int(r["rank of the batched start"]): int(r["class axis"]) for r in rows} == RANK_CLASS_AXIS


@pytest.mark.parametrize("form", FORMS)
def test_every_position_form_is_documented(form):
    keyword = form.split("=")[0] + "="
    assert keyword in _text("docs/targets.md")


BATCH_SPELLINGS = [-1, 0, None, "batch_size"]


@pytest.mark.parametrize("spelling", BATCH_SPELLINGS, ids=str)
def test_a_dynamic_batch_is_one_symbol(spelling):
    """The batch table: -1, 0, no value or a symbol are a dynamic batch; its symbol is the model's, else N."""
    spellings = table("docs/targets.md", "batch-table")[0]["the model's inputs declare axis 0 as"]
    assert all(f"{s}" in spellings for s in ("-1", "0", "no value", "a symbol"))
    model = _sequence_model(spelling)
    symbol = spelling if isinstance(spelling, str) else "N"
    inputs = Explainer(model, "gradient").saved().model.graph.input
    assert inputs[0].type.tensor_type.shape.dim[0].dim_param == symbol


# --------------------------------------------------------------------------------------------------
# explainer.md: the compiled explainer's names


def _sequence_model(batch: int | str | None = "N") -> onnx.ModelProto:
    """x [batch, 3, 4] -> MatMul -> y [batch, 3, 5]: a start with one position axis (class axis 2)."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4])
    if batch is None:   # no value at all, as some exporters write it
        x.type.tensor_type.shape.dim[0].Clear()
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "sequence", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 5])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


SMOOTHGRAD_LRP = 'rulegraph 1\ninclude "lrp-epsilon"\nloop smoothgrad(samples = 4)\n'

#: the "example" column of the io-table -> (model, rules, seed mode)
EXAMPLES = {
    "lrp-epsilon": (CNN, "lrp-epsilon", False),
    "lrp-epsilon in seed mode": (CNN, "lrp-epsilon", True),
    "deeplift-rescale": (CNN, "deeplift-rescale", False),
    "integrated-gradients": (CNN, "integrated-gradients", False),
    "smoothgrad": (CNN, "smoothgrad", False),
    "SmoothGrad around lrp-epsilon": (CNN, SMOOTHGRAD_LRP, False),
    "sequence model": (_sequence_model(), "gradient", False),
}
TYPES = {"int64": TensorProto.INT64, "float": TensorProto.FLOAT, "double": TensorProto.DOUBLE}
IO_ROWS = table("docs/explainer.md", "io-table")


def _explainer(example: str):
    model, rules, seed_mode = EXAMPLES[example]
    rules = dsl.parse(rules) if "\n" in rules else rules
    return Explainer(model, rules).saved(seed_mode).model


@pytest.mark.parametrize("row", IO_ROWS, ids=lambda r: f"{r['name']}-{r['example']}")
def test_public_name_exists_in_a_compiled_explainer(row):
    model = _explainer(row["example"])
    x = model.graph.input[0].name
    ios = model.graph.input if row["input/output"] == "input" else model.graph.output
    found = {v.name: v.type.tensor_type.elem_type for v in ios}
    name = row["name"].replace("<x>", x)
    assert name in found, f"{name} not among the {row['input/output']}s {sorted(found)}"
    assert found[name] == TYPES[row["type"]]


COMPILED_FIELDS = [r["field of Compiled"] for r in table("docs/explainer.md", "compiled-table")]


@pytest.mark.parametrize("field", COMPILED_FIELDS)
def test_compiled_fields_exist(field):
    assert field in {f.name for f in dataclasses.fields(Compiled)}


@pytest.mark.parametrize("field", ["attribution", "saliency", "bias_total", "start_value"])
def test_loop_model_fields_exist(field):
    assert field in {f.name for f in dataclasses.fields(LoopModel)}


def test_metadata_names_the_original_outputs():
    model = _explainer("lrp-epsilon")
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["rulegraph.explainer_of"]) == [o.name for o in onnx.load(str(CNN)).graph.output]


# --------------------------------------------------------------------------------------------------
# CONTRIBUTING.md and the README


def _sources() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for folder in ("rulegraph", "tests") for p in
                     sorted((ROOT / folder).rglob("*.py")))


@pytest.mark.parametrize("page, index, text", blocks("python"), ids=lambda v: str(v)[:20])
def test_code_shown_is_the_codes(page, index, text):
    """Code quoted in the docs is quoted from the code, verbatim."""
    assert text in _sources(), f"{page}: python block {index} is not in rulegraph/ or tests/"


def test_readme_links_the_reference():
    assert "docs/README.md" in _text("README.md")
    for page in re.findall(r"\]\(([\w.]+\.md)", _text("docs/README.md")):
        assert (DOCS / page).is_file(), page
