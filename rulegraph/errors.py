"""Error classes. Every user-facing error names a place and says what would fix it.

A rule-file error renders as ``file:line:col: message``, then the source line and a caret under the
column (the lark / cairo-lang convention). A model error names the ONNX node and its op type.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A place in a rule file: 1-based line and column, and the text of that line."""

    file: str
    line: int
    column: int
    source_line: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def render(self, message: str) -> str:
        """The message, the source line (a window of SHOWN_WIDTH characters around the column when
        the line is longer) and a caret under the column."""
        head = f"{self}: {message}"
        if not self.source_line:
            return head
        line, column = self.source_line.rstrip(), max(self.column, 1)
        if len(line) > SHOWN_WIDTH:
            start = max(0, min(column - 1 - SHOWN_WIDTH // 2, len(line) - SHOWN_WIDTH))
            before = "..." if start else ""
            after = "..." if start + SHOWN_WIDTH < len(line) else ""
            line = before + line[start:start + SHOWN_WIDTH] + after
            column += len(before) - start
        caret = " " * (column - 1) + "^"
        return f"{head}\n    {line}\n    {caret}"


#: how much of a long source line an error shows
SHOWN_WIDTH = 100


class RulegraphError(Exception):
    """Base class of every error rulegraph raises on bad input."""


class RuleSyntaxError(RulegraphError):
    """A rule file that does not parse or does not make sense; carries its location(s).

    ``problems`` holds every (location, message) pair found, so a file with several mistakes is
    reported at once.
    """

    def __init__(self, problems: list[tuple[Location, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(loc.render(msg) for loc, msg in self.problems))

    @classmethod
    def at(cls, location: Location, message: str) -> RuleSyntaxError:
        return cls([(location, message)])


class ModelError(RulegraphError):
    """A model rulegraph cannot read or explain; the message names the node and its op type."""


class CoverageError(RulegraphError):
    """Nodes on the relevance path that no binding of the rule file covers (or covers wrongly)."""


class RulegraphWarning(UserWarning):
    """Something the user should know about an answer that is still given (a binding that matches
    nothing, an amplifying map). Raised with ``warnings.warn``; the CLI prints it as one line."""


class InternalError(Exception):
    """A bug in rulegraph, not in the user's input: the CLI reports it with its own exit code."""


class RuntimeMissingError(RulegraphError):
    """Neither onnxruntime nor onnxruntime-gpu is installed."""


def node_ref(name: str, op_type: str) -> str:
    """How messages name a node: ``node 'conv1' (Conv)``."""
    return f"node '{name}' ({op_type})"


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else ``''``: the choice equal but for case
    first (``relu`` -> ``Relu``, not ``Selu``), else the closest by ``difflib``."""
    choices = list(choices)
    same = [c for c in choices if c.lower() == word.lower()]
    close = same or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
