"""Rule-file fuzz campaign: whatever text, tokens, bytes or includes a rule file holds, ``dsl.parse`` /
``dsl.load`` (what ``lint`` runs) returns a RuleSet or raises a RuleSyntaxError whose every problem
has a place, never another exception; and no message shows the content of a file that is not a
``.rules`` file. Deterministic (``derandomize=True``); the example counts are in the README."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulegraph.backward.ops import OP_KINDS
from rulegraph.backward.rules import RULES
from rulegraph.errors import RuleSyntaxError
from rulegraph.lang.ruleset import KINDS, RuleSet
from rulegraph.run import rulefiles as dsl
from rulegraph.run.loops import LOOPS

SECRET = "S3CRET-TOKEN-do-not-echo"
#: examples per strategy (the README's "Fuzzed" line counts these)
EXAMPLES = {"text": 300, "tokens": 400, "mutated": 300, "bytes": 300, "includes": 150}
def fuzz(strategy: str):
    return settings(max_examples=EXAMPLES[strategy], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])





def _outcome(run, lines: int) -> object:
    """Run a parse; a RuleSyntaxError must place every problem in the file(s) read."""
    try:
        result = run()
    except RuleSyntaxError as err:
        assert err.problems
        for location, message in err.problems:
            assert location.line >= 1 and location.column >= 1 and message
        return err
    assert isinstance(result, RuleSet)
    return result


# --------------------------------------------------------------------------------------------------
# random text and random tokens of the grammar

ALPHABET = 'rulegraph 1\nlinear->normalized(eps=1e-6,")# node first last include quantity \t\r\\\'é∑\x00'


@fuzz("text")
@given(st.one_of(st.text(alphabet=ALPHABET, max_size=200), st.text(max_size=200)))
def test_random_text(text):
    _outcome(lambda: dsl.parse(text, "fuzz.rules"), text.count("\n") + 1)


WORDS = (["rulegraph", "quantity", "bias", "start", "baseline", "file", "loop", "include", "node", "first",
          "last", "->", ",", "(", ")", "=", "#", "\n", "\n", "\n", '"', '""', '"lrp-epsilon"', '"x.rules"',
          '"/etc/passwd"', "1", "0", "-1", "1e-6", "1e39", "-1e39", "1e-50", "9" * 400, ".5", "+3", "1.0",
          "relevance", "importance", "difference", "absorb", "blame", "total", "ignore", "output", "one",
          "zeros", "mean", "blur", "eps", "alpha", "beta", "gamma", "steps", "samples", "noise", "patch",
          "method", '"gausslegendre"', "@", "'", "\t"]
         + list(KINDS) + sorted(OP_KINDS)[:40] + list(RULES) + list(LOOPS))


@fuzz("tokens")
@given(st.lists(st.sampled_from(WORDS), max_size=60), st.booleans())
def test_random_tokens(words, with_version):
    text = ("rulegraph 1\n" if with_version else "") + " ".join(words)
    _outcome(lambda: dsl.parse(text, "fuzz.rules"), text.count("\n") + 1)


# --------------------------------------------------------------------------------------------------
# the bundled files, mutated

BUNDLED = {name: (dsl.bundled_rules_dir() / f"{name}.rules").read_text() for name in dsl.bundled_rule_names()}


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(sorted(BUNDLED.values())))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["delete", "insert", "replace", "duplicate line", "swap lines"]))
        if action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        elif action == "insert":
            text = text[:at] + draw(st.sampled_from(WORDS + ["x", " ", "\n"])) + text[at:]
        elif action == "replace" and at < len(text):
            text = text[:at] + draw(st.characters()) + text[at + 1:]
        else:
            lines = text.split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if action == "duplicate line":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


@fuzz("mutated")
@given(mutated())
def test_mutated_bundled_files(text):
    _outcome(lambda: dsl.parse(text, "fuzz.rules"), text.count("\n") + 1)


# --------------------------------------------------------------------------------------------------
# random bytes in a rule file, and random include graphs over rule files and other files


@fuzz("bytes")
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda t, b: t.encode() + b, st.sampled_from(sorted(BUNDLED.values())),
                           st.binary(max_size=20))))
def test_random_bytes(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.rules"
        path.write_bytes(data)
        _outcome(lambda: dsl.load(path), data.count(b"\n") + 1)


TARGETS = ["a.rules", "b.rules", "sub/c.rules", "../a.rules", "secret.txt", "secret", "binary.rules",
           "latin1.rules", "missing.rules", "folder.rules", "lrp-epsilon", "gradient.rules", "/etc/passwd",
           "/proc/self/environ", "link.rules", ""]


@st.composite
def include_graphs(draw):
    """Three rule files including random targets (each other, cycles, other files, bundled names)."""
    files = {}
    for name in ("main.rules", "a.rules", "b.rules", "sub/c.rules"):
        targets = draw(st.lists(st.sampled_from(TARGETS), max_size=4))
        lines = ["rulegraph 1"] + [f'include "{t}"' for t in targets]
        lines += draw(st.lists(st.sampled_from(["linear -> gradient", "Relu -> ignore", "bias blame",
                                               SECRET + " -> gradient", "x"]), max_size=2))
        files[name] = "\n".join(lines) + "\n"
    return files


@fuzz("includes")
@given(include_graphs())
def test_random_includes_never_echo_other_files(files):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "sub").mkdir()
        (root / "folder.rules").mkdir()
        (root / "secret.txt").write_text(f"{SECRET}\nlinear -> gradient\n")
        (root / "secret").write_text(f"rulegraph 1\n{SECRET}\n")
        (root / "binary.rules").write_bytes(b"\x7fELF\x00" + SECRET.encode())
        (root / "latin1.rules").write_bytes(f"rulegraph 1\n# caf\xe9 {SECRET}\n".encode("latin-1"))
        (root / "link.rules").symlink_to(root / "secret.txt")
        for name, text in files.items():
            (root / name).write_text(text)
        outcome = _outcome(lambda: dsl.load(root / "main.rules"), 0)
        if isinstance(outcome, RuleSyntaxError):
            shown = str(outcome)
            for location, _ in outcome.problems:
                if SECRET in location.source_line:  # only a rule file's own line, written above
                    assert location.file.endswith(".rules") and "secret" not in location.file
            assert SECRET not in shown.replace(f"{SECRET} -> gradient", "")
