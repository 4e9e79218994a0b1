"""Rule files are data: linear-time error recovery, which files ``include`` reads, what messages echo,
unreadable files, and numbers checked in the precision the explainer uses."""

from __future__ import annotations

import pytest

from rulegraph import dsl
from rulegraph.errors import RuleSyntaxError

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
    counting = _CountingParser(dsl._parser())
    monkeypatch.setattr(dsl, "_parser", lambda: counting)
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
