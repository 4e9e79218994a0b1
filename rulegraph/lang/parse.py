"""The rule language: rule-file text -> RuleSet (DESIGN.md, "The rule language").

A rule file is data, one statement per line; ``#`` starts a comment; nothing is evaluated::

    rulegraph 1                         # version line: required, the first statement
    quantity relevance                  # relevance | importance | difference
    bias     blame                      # absorb | blame | total | ignore
    baseline zeros                      # difference only: zeros | mean | blur | file "x0.npy"
    start    output                     # optional: output | one
    include  "base.rules"               # a path relative to this file, or a bundled name
    linear -> normalized(eps = 1e-6)    # selector -> rule(param = value, ...)
    Softmax, LogSoftmax -> start        # several selectors, one rule
    node "/features/*/Conv" -> gradient # one node by name (exact or glob)
    first Conv -> gradient              # first OP / last OP

Choices made here:

- After the version line, headers, includes and bindings may come in any order; each header at
  most once per file. Headers a file leaves out take RuleSet's defaults (relevance, absorb).
- A bare selector word is a kind if it is in ``ruleset.KINDS``, else an op type, which must be in
  the catalog's ``op_kinds``. ``first``/``last`` take an op type.
- ``baseline file "p"`` is stored as ``"file:<p>"``; a relative ``p`` is taken from the rule file's
  folder (from the working directory for text parsed without a file).
- Includes read only ``.rules`` files (a symlink must point at one too) and bundled names, at most
  MAX_INCLUDE_DEPTH deep; an unreadable, binary or non-UTF-8 file is an error naming the byte, and
  no message shows a line of a file that is not a ``.rules`` file. The included files' bindings
  come first, each file one ``layer`` above the files it includes and the ones included before it,
  so ``RuleSet.files[b.layer]`` is the file of binding ``b``. A file included twice (a diamond) is
  read once. Headers of later files override.
- Every problem of every file read is collected and raised as one RuleSyntaxError. Each line is
  parsed on its own (a statement is one line), so a line with a syntax error is reported and
  skipped, later lines are checked too, and the work is linear in the file's size.
- Numbers are checked where they are written: a literal that float32 (the precision rules compute
  in) cannot hold is an error at its line:col; the rules' and loops' own bounds are checked next.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput

from ..errors import Location, RulegraphError, RuleSyntaxError, did_you_mean
from . import ruleset
from .catalog import Catalog
from .floats import float32_problem
from .ruleset import KINDS, Binding, RuleCall, RuleSet, Selector

VERSION = 1
BASELINES = ("zeros", "mean", "blur")
BASELINE_LOOPS = ("integrated_gradients",)  # loops that start from the baseline
HEADERS = ("rulegraph", "quantity", "bias", "baseline", "start", "loop", "include")
SUFFIX = ".rules"
#: how deep includes may nest (a file including a file including ...); deeper chains are an error
MAX_INCLUDE_DEPTH = 16

_located = v_args(meta=True, inline=True)
#: the catalog of the file being read (set by ``parse`` and ``load`` for the length of the call)
_CATALOG: ContextVar[Catalog] = ContextVar("catalog")
BILINEAR = "bilinear"


def _catalog() -> Catalog:
    return _CATALOG.get()


# --------------------------------------------------------------------------------------------------
# bundled rule files


def bundled_rules_dir() -> Path:
    """The folder of the rule files shipped with rulegraph (inside the package once installed)."""
    here = Path(__file__).resolve().parent.parent  # the rulegraph package
    for folder in (here.parent / "rules", here / "bundled_rules"):
        if folder.is_dir() and any(folder.glob("*" + SUFFIX)):
            return folder
    return here / "bundled_rules"


def bundled_rule_names() -> list[str]:
    """Names that ``load`` accepts without a path: ``lrp-epsilon`` for ``rules/lrp-epsilon.rules``."""
    return sorted(p.stem for p in bundled_rules_dir().glob("*" + SUFFIX))


def _bundled(name: str) -> Path | None:
    stem = name.removesuffix(SUFFIX)
    if "/" in stem or "\\" in stem or stem not in bundled_rule_names():
        return None
    return bundled_rules_dir() / (stem + SUFFIX)


def _bundled_hint(name: str) -> str:
    stem = name.removesuffix(SUFFIX)
    names = bundled_rule_names()
    return f"{did_you_mean(stem, names)}; bundled rule files: {', '.join(names) or 'none'}"


# --------------------------------------------------------------------------------------------------
# public entry points


def parse(text: str, catalog: Catalog, source: str = "<rules>") -> RuleSet:
    """Parse rule-file text against ``catalog``; ``source`` names it in messages, and anchors
    relative includes."""
    token = _CATALOG.set(catalog)
    try:
        if source.startswith("<"):
            return _Loader().run(text, source, Path.cwd())
        path = Path(source).resolve()
        return _Loader().run(text, source, path.parent, path if path.is_file() else None)
    finally:
        _CATALOG.reset(token)


def load(path_or_name: str | Path, catalog: Catalog) -> RuleSet:
    """Read a rule file from a path, or a bundled one by name (``load("lrp-epsilon")``), against
    ``catalog``."""
    token = _CATALOG.set(catalog)
    try:
        return _load(path_or_name)
    finally:
        _CATALOG.reset(token)


def _load(path_or_name: str | Path) -> RuleSet:
    given = str(path_or_name)
    path = Path(path_or_name)
    if not path.exists():
        bundled = _bundled(given)
        if bundled is None:
            if path.suffix == SUFFIX or os.sep in given or "/" in given:
                raise RulegraphError(f"no rule file '{given}'{_bundled_hint(path.name)}")
            raise RulegraphError(f"no rule file or bundled rule file named '{given}'{_bundled_hint(given)}")
        path, given = bundled, f"rules/{bundled.name}"
    text, problem = _read_text(path)
    if problem is not None:
        (line, column), why = problem
        raise RuleSyntaxError([(Location(given, line, column), f"'{given}' {why}")])
    return _Loader().run(text, given, path.resolve().parent, path.resolve())


def _read_text(path: Path) -> tuple[str, None] | tuple[None, tuple[tuple[int, int], str]]:
    """The text of a rule file, or ((line, column), why it cannot be read); never its content."""
    if path.exists() and not path.is_dir() and not path.is_file():
        return None, ((1, 1), "is not a regular file (a device, pipe or socket), not a rule file")
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        return None, ((1, 1), "is a directory, not a rule file")
    except OSError as exc:
        return None, ((1, 1), f"cannot be read ({exc.strerror or type(exc).__name__})")
    if b"\0" in data:
        offset = data.index(b"\0")
        return None, (_place(data, offset),
                      f"is a binary file, not a rule file (a NUL byte at offset {offset})")
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, (_place(data, exc.start), f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                                               f"{exc.start}); save it as UTF-8")


def _place(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column counted in bytes) of the byte at ``offset``."""
    return data.count(b"\n", 0, offset) + 1, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def _echoes(file: str) -> bool:
    """Messages show the lines of rule files (and of text given directly), never of another file."""
    return file.startswith("<") or file.endswith(SUFFIX)


# --------------------------------------------------------------------------------------------------
# grammar and syntax errors


@functools.cache
def _parser() -> Lark:
    grammar = (Path(__file__).parent / "dsl.lark").read_text(encoding="utf-8")
    return Lark(grammar, start="file", parser="lalr", lexer="contextual", propagate_positions=True)


_TERMINAL_WORDS = {
    "WORD": "a name", "NUMBER": "a number", "STRING": "a quoted string", "_NL": "the end of the line",
    "$END": "the end of the file", "_ARROW": "'->'", "_COMMA": "','", "_LPAR": "'('", "_RPAR": "')'",
    "_EQ": "'='",
}
_HEADER_VALUES = {
    "quantity": "a quantity (relevance, importance or difference)",
    "bias": "a bias policy (absorb, blame, total or ignore)",
    "start": "a start mode (output or one)",
    "baseline": "a baseline (zeros, mean, blur or file \"x0.npy\")",
    "rulegraph": "the version number (write 'rulegraph 1')",
}


def _words(terminals) -> str:
    names = []
    for name in sorted(terminals):
        if name in _TERMINAL_WORDS:
            names.append(_TERMINAL_WORDS[name])
        elif name.isupper() and name.isalpha():
            names.append(f"'{name.lower()}'")
    return " or ".join(dict.fromkeys(names)) or "something else"


def _expected(err: UnexpectedInput) -> set[str]:
    """The terminals the parser would have taken (the contextual lexer's own set is narrower)."""
    state = getattr(err, "state", None)
    try:
        return {name for name in state.parse_conf.states[state.position] if name.upper() == name}
    except (AttributeError, KeyError, TypeError):
        return set(getattr(err, "expected", None) or getattr(err, "allowed", None) or ())


def _found(err: UnexpectedInput) -> str:
    if isinstance(err, UnexpectedCharacters):
        return f"'{err.char}'"
    token = getattr(err, "token", None)
    if token is None or token.type == "$END":
        return "the end of the file"
    if token.type == "_NL":
        return "the end of the line"
    return f"'{token.value}'"


def _syntax_message(err: UnexpectedInput, line_text: str, column: int) -> tuple[str, int]:
    """Say in words what was expected where lark stopped, and what was found; and at which column."""
    message = _expected_message(err, line_text[: column - 1])
    if message.startswith("unknown header"):
        return message, len(line_text) - len(line_text.lstrip()) + 1
    return message, column


def _expected_message(err: UnexpectedInput, before: str) -> str:
    found = _found(err)
    tokens = re.findall(r'"[^"]*"?|->|[A-Za-z_]\w*|[^\s"A-Za-z_]+', before)
    last = tokens[-1] if tokens else ""
    expected = _expected(err)
    if isinstance(err, UnexpectedCharacters):
        if err.char == '"':
            return "unterminated string: close it with '\"' on the same line"
        if err.char == "'":
            return "strings are written in double quotes: \"...\""
        return f"unexpected character '{err.char}'; expected {_words(expected)}"
    if not tokens:
        return (f"expected a header ({', '.join(HEADERS)}) or a binding 'selector -> rule' at the start "
                f"of the line, found {found}")
    if "_EQ" in expected:
        return f"expected '=' after the parameter name '{last}' (write {last} = value), found {found}"
    if "_ARROW" in expected:
        first = tokens[0]
        hint = did_you_mean(first, HEADERS)
        if len(tokens) == 1 and hint and first not in KINDS and first not in _catalog().op_kinds:
            return f"unknown header '{first}'{hint}; a binding would need '->' after the selector"
        return f"expected '->' after the selector, found {found}"
    if last == "=":
        return f"expected a number or a quoted string after '=', found {found}"
    if "_RPAR" in expected:
        if "WORD" in expected:
            return f"expected a parameter (name = value) or ')' after '(', found {found}"
        return f"expected ',' or ')' after the parameter, found {found}"
    if last == "->":
        return f"expected a rule name after '->', found {found}"
    if "_LPAR" in expected:
        return (f"expected the end of the line or '(' after the rule '{last}' (one rule per binding), "
                f"found {found}")
    if expected <= {"_NL", "$END"}:
        return f"expected the end of the line (one statement per line), found {found}"
    if last == "," and "NODE" in expected:
        return f"expected another selector after ',', found {found}"
    if last == ",":
        return f"expected another parameter (name = value) after ',', found {found}"
    if last in ("first", "last"):
        return f"expected an op type after '{last}' (for example '{last} Conv'), found {found}"
    if last == "node":
        return f"expected the node's name in double quotes after 'node' (node \"name\"), found {found}"
    if last in ("include", "file"):
        return f"expected a file name in double quotes after '{last}', found {found}"
    if last in _HEADER_VALUES:
        return f"expected {_HEADER_VALUES[last]} after '{last}', found {found}"
    return f"expected {_words(expected)}, found {found}"


# --------------------------------------------------------------------------------------------------
# the transformer: parse tree -> bindings, headers and includes of one file


@dataclass(frozen=True)
class _Header:
    name: str
    value: str
    location: Location


@dataclass(frozen=True)
class _Include:
    target: str
    location: Location


@dataclass(frozen=True)
class _BindingLine:
    """``selector, ... -> rule``; ``rule`` is None when the line has a problem."""

    selectors: list[tuple[Selector, Location]]
    rule: RuleCall | None
    location: Location


@dataclass
class _File:
    """One file's statements, checked on their own."""

    headers: dict[str, _Header] = field(default_factory=dict)
    includes: list[_Include] = field(default_factory=list)
    bindings: list[Binding] = field(default_factory=list)


def _unquote(token: Token) -> str:
    return re.sub(r"\\(.)", r"\1", token.value[1:-1])


def _number(token: Token) -> int | float:
    """The literal's value; a long integer is read as a float (``float32_problem`` then bounds it)."""
    text = token.value
    return int(text) if re.fullmatch(r"[+-]?\d{1,18}", text) else float(text)


def _shown(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:12]}...{literal[-6:]} ({len(literal)} characters)"


def _rules_for(kinds: frozenset[str]) -> str:
    return ", ".join(name for name, spec in _catalog().rules.items() if kinds & spec.kinds)


class _Builder(Transformer):
    """Builds one file's bindings and headers; every problem goes to ``problems``."""

    def __init__(self, file: str, lines: list[str], directory: Path | None, blanked: set[int]):
        super().__init__()
        self.name = file
        self.lines = lines
        self.directory = directory
        self.blanked = blanked
        self.problems: list[tuple[Location, str]] = []

    def _at(self, line: int, column: int) -> Location:
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return Location(self.name, line, column, text)

    def _loc(self, meta) -> Location:
        return self._at(meta.line, meta.column)

    def _problem(self, location: Location, message: str) -> None:
        self.problems.append((location, message))

    def __default__(self, data, children, meta):
        raise AssertionError(f"lang/parse.py has no transformer method for grammar rule '{data}' (update both)")

    # headers -----------------------------------------------------------------------------------

    @_located
    def version(self, meta, number: Token) -> _Header:
        if number.value not in (str(VERSION), f"{VERSION}.0"):
            self._problem(self._loc(meta), f"unsupported rule-language version {number.value}: this "
                                           f"rulegraph reads version {VERSION}; write 'rulegraph {VERSION}'")
        return _Header("rulegraph", number.value, self._loc(meta))

    def _choice(self, meta, name: str, word: Token, choices, what: str) -> _Header:
        if word.value not in choices:
            self._problem(self._at(word.line, word.column),
                          f"unknown {what} '{word.value}'{did_you_mean(word.value, choices)}; "
                          f"{name} takes one of: {', '.join(choices)}")
        return _Header(name, word.value, self._loc(meta))

    @_located
    def quantity(self, meta, word: Token) -> _Header:
        return self._choice(meta, "quantity", word, ruleset.QUANTITIES, "quantity")

    @_located
    def bias(self, meta, word: Token) -> _Header:
        return self._choice(meta, "bias", word, ruleset.BIAS_POLICIES, "bias policy")

    @_located
    def start_mode(self, meta, word: Token) -> _Header:
        return self._choice(meta, "start", word, ruleset.START_MODES, "start mode")

    @_located
    def baseline(self, meta, word: Token) -> _Header:
        return self._choice(meta, "baseline", word, BASELINES + ('file "x0.npy"',), "baseline")

    @_located
    def baseline_file(self, meta, string: Token) -> _Header:
        path = _unquote(string)
        if not path:
            self._problem(self._at(string.line, string.column), "empty baseline file name")
        elif self.directory is not None and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(self.directory, path))
        return _Header("baseline", "file:" + path, self._loc(meta))

    @_located
    def include(self, meta, string: Token) -> _Include:
        return _Include(_unquote(string), self._loc(meta))

    # bindings ----------------------------------------------------------------------------------

    @_located
    def bare_selector(self, meta, word: Token) -> tuple[Selector | None, Location, frozenset[str]]:
        if word.value in KINDS:
            return Selector("kind", word.value), self._loc(meta), frozenset({word.value})
        return self._op(meta, "op", word)

    @_located
    def first_selector(self, meta, word: Token):
        return self._op(meta, "first", word)

    @_located
    def last_selector(self, meta, word: Token):
        return self._op(meta, "last", word)

    def _op(self, meta, form: str, word: Token):
        op = word.value
        op_kinds = _catalog().op_kinds
        if op in op_kinds:
            kinds = {op_kinds[op]} | ({BILINEAR} if op in _catalog().bilinear_ops else set())
            return Selector(form, op), self._loc(meta), frozenset(kinds)
        where = self._at(word.line, word.column)
        if form != "op" and op in KINDS:
            self._problem(where, f"'{form}' takes an op type, not the kind '{op}' (write '{form} Conv')")
        elif form == "op":
            hint = did_you_mean(op, KINDS + tuple(op_kinds))
            self._problem(where, f"unknown op type or kind '{op}'{hint}; "
                                 f"kinds: {', '.join(KINDS)}; to bind a node by name write node \"{op}\"")
        else:
            self._problem(where, f"unknown op type '{op}'{did_you_mean(op, op_kinds)}")
        return None, self._loc(meta), frozenset()

    @_located
    def node_selector(self, meta, string: Token):
        name = _unquote(string)
        if not name:
            self._problem(self._at(string.line, string.column), "empty node name: write node \"name\"")
            return None, self._loc(meta), frozenset()
        return Selector("node", name), self._loc(meta), frozenset()

    @_located
    def param(self, meta, key: Token, value: Token) -> tuple[str, int | float | str | None, Location]:
        """(name, value, where); the value is None when a number literal cannot be a float32 parameter."""
        if value.type != "NUMBER":
            return key.value, _unquote(value), self._loc(meta)
        parsed = _number(value)
        if (why := float32_problem(float(parsed))) is not None:
            self._problem(self._at(value.line, value.column),
                          f"number {_shown(value.value)} for '{key.value}': {why} "
                          "(parameters are used in float32)")
            return key.value, None, self._loc(meta)
        return key.value, parsed, self._loc(meta)

    @_located
    def call(self, meta, name: Token, *params) -> tuple[str, dict, Location]:
        """(name, parameters as written, where); a binding checks it against the rules, a loop
        header against the loops."""
        where = self._loc(meta)
        given: dict[str, int | float | str | None] = {}
        for key, value, location in params:
            if key in given:
                self._problem(location, f"parameter '{key}' given twice")
            given[key] = value
        return name.value, given, where

    def _resolve(self, call, table, what: str) -> tuple[str | None, RuleCall | None, Location]:
        """(the name if ``table`` has it, the call if its parameters are valid, where)."""
        name, given, where = call
        spec = table.get(name)
        if spec is None:
            self._problem(where, f"unknown {what} '{name}'{did_you_mean(name, table)}; "
                                 f"{what}s: {', '.join(table)}")
            return None, None, where
        if any(value is None for value in given.values()):  # a bad literal, reported where it is
            return spec.name, None, where
        resolved, problems = spec.resolve_params(given)
        for message in problems:
            self._problem(where, message)
        return spec.name, (None if problems else RuleCall(spec.name, resolved)), where

    @_located
    def loop(self, meta, call) -> _Header:
        loops = _catalog().loops
        if loops is None:  # a catalog without loops: the header is kept as written
            name, given, _ = call
            resolved = None if any(v is None for v in given.values()) else RuleCall(name, given)
        else:
            _, resolved, _ = self._resolve(call, loops, "loop")
        return _Header("loop", resolved, self._loc(meta))

    @_located
    def binding(self, meta, *children) -> _BindingLine:
        *selectors, call = children
        name, rule, rule_where = self._resolve(call, _catalog().rules, "rule")
        valid, ok = [], rule is not None
        for selector, where, kinds in selectors:
            if selector is None:
                ok = False
                continue
            if name is not None and kinds and not kinds & _catalog().rules[name].kinds:
                self._problem(rule_where, self._wrong_kind(selector, kinds, name))
                ok = False
            valid.append((selector, where))
        return _BindingLine(valid, rule if ok else None, self._loc(meta))

    @staticmethod
    def _wrong_kind(selector: Selector, kinds: frozenset[str], rule: str) -> str:
        accepts = ", ".join(k for k in KINDS if k in _catalog().rules[rule].kinds)
        kind = " or ".join(sorted(kinds))
        what = f"kind '{kind}'" if selector.form == "kind" else f"{selector.value} (kind {kind})"
        return (f"rule '{rule}' does not apply to {what}: it accepts {accepts}; "
                f"rules for {kind}: {_rules_for(kinds)}")

    # the file ----------------------------------------------------------------------------------

    def file(self, statements) -> _File:
        out = _File()
        bound: dict[Selector, Location] = {}
        for index, statement in enumerate(statements):
            if isinstance(statement, _Header):
                self._header(out, statement, first=index == 0)
            elif isinstance(statement, _Include):
                out.includes.append(statement)
            else:
                for selector, where in statement.selectors:
                    if selector in bound:
                        self._problem(where, f"'{selector}' is bound twice in this file "
                                             f"(first at {bound[selector]}); keep one")
                        continue
                    bound[selector] = where
                    if statement.rule is not None:
                        out.bindings.append(Binding(selector, statement.rule, where))
        if "rulegraph" not in out.headers:
            where = statements[0].location if statements else self._at(1, 1)
            if not any(line <= where.line for line in self.blanked):
                self._problem(where, f"missing version line: start the file with 'rulegraph {VERSION}'")
        return out

    def _header(self, out: _File, header: _Header, first: bool) -> None:
        if header.name in out.headers:
            self._problem(header.location, f"'{header.name}' is set twice in this file "
                                           f"(first at {out.headers[header.name].location}); keep one")
            return
        if header.name == "rulegraph" and not first:
            self._problem(header.location, f"the version line 'rulegraph {VERSION}' must be the first "
                                           "line of the file (only comments may come before it)")
        out.headers[header.name] = header


def _parse_file(text: str, file: str, directory: Path | None) -> tuple[_File, list, bool]:
    """Parse one file: (its statements, its problems, whether every line parsed).

    A statement is one line (no token spans a newline), so each line is parsed on its own: a line
    with a syntax error is reported and skipped, and the work stays linear in the file's size.
    """
    lines = [line.rstrip("\r") for line in text.split("\n")]
    problems: list[tuple[Location, str]] = []
    blanked: set[int] = set()
    statements: list[Tree] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            tree = _parser().parse(line + "\n")
        except UnexpectedInput as err:
            column = err.column if isinstance(err.column, int) and err.column > 0 else len(line) + 1
            message, column = _syntax_message(err, line, column)
            problems.append((Location(file, number, column, line), message))
            blanked.add(number)
            continue
        statements.extend(_moved(statement, number - 1) for statement in tree.children)
    builder = _Builder(file, lines, None if file.startswith("<") else directory, blanked)
    parsed = builder.transform(Tree("file", statements))
    problems += builder.problems
    if not _echoes(file):
        problems = [(dataclasses.replace(where, source_line=""), message) for where, message in problems]
    return parsed, problems, not blanked


def _moved(tree: Tree, lines: int) -> Tree:
    """``tree`` parsed from one line, with its positions moved down by ``lines``."""
    for subtree in tree.iter_subtrees():
        for name in ("line", "end_line"):
            if hasattr(subtree.meta, name):
                setattr(subtree.meta, name, getattr(subtree.meta, name) + lines)
        for token in subtree.children:
            if isinstance(token, Token) and token.line is not None:
                token.line += lines
                token.end_line = None if token.end_line is None else token.end_line + lines
    return tree


# --------------------------------------------------------------------------------------------------
# includes and headers: several files -> one RuleSet


class _Loader:
    """Reads a file and its includes depth-first; each file gets the next layer once its includes are in."""

    def __init__(self):
        self.problems: list[tuple[Location, str]] = []
        self.files: list[str] = []
        self.bindings: list[Binding] = []
        self.headers: dict[str, _Header] = {}
        self.done: set[Path] = set()
        self.complete = True

    def run(self, text: str, file: str, directory: Path, path: Path | None = None) -> RuleSet:
        self._read(text, file, directory, path, stack=[])
        self._check_headers()
        if self.problems:
            raise RuleSyntaxError(self.problems)
        values = {name: header.value for name, header in self.headers.items()}
        return RuleSet(
            bindings=tuple(self.bindings),
            quantity=values.get("quantity", RuleSet.quantity),
            bias=values.get("bias", RuleSet.bias),
            start=values.get("start"),
            baseline=values.get("baseline"),
            loop=values.get("loop"),
            source=file,
            files=tuple(self.files),
            header_locations={name: header.location for name, header in self.headers.items()},
        )

    def _read(self, text: str, file: str, directory: Path, path: Path | None, stack: list) -> None:
        parsed, problems, complete = _parse_file(text, file, directory)
        self.problems.extend(sorted(problems, key=lambda p: (p[0].line, p[0].column)))
        self.complete &= complete
        stack = stack + [(path, file)]
        for include in parsed.includes:
            self._include(include, file, directory, stack)
        if path is not None:
            self.done.add(path)
        layer = len(self.files)
        self.files.append(file)
        self.bindings.extend(dataclasses.replace(b, layer=layer) for b in parsed.bindings)
        self.headers.update((name, h) for name, h in parsed.headers.items() if name != "rulegraph")

    def _include(self, include: _Include, includer: str, directory: Path, stack: list) -> None:
        """Read an included file: only ``.rules`` files and bundled names are read, never another
        file (its content could end up in messages)."""
        target = include.target
        candidate = Path(target) if os.path.isabs(target) else directory / target
        base = os.path.dirname(includer) if not includer.startswith("<") else ""
        shown = target if os.path.isabs(target) else os.path.normpath(os.path.join(base, target))
        bundled = _bundled(target)
        if not target.endswith(SUFFIX) and bundled is None:
            self._problem(include.location, f"cannot include '{target}': only rule files (names ending in "
                                            f"{SUFFIX}) and bundled rule files can be included"
                                            f"{_bundled_hint(Path(target).name)}")
            return
        if target.endswith(SUFFIX) and (candidate.exists() or candidate.is_symlink()):
            path = candidate.resolve()
            if path.suffix != SUFFIX:
                self._problem(include.location, f"cannot include '{target}': it links to a file whose name "
                                                f"does not end in {SUFFIX}")
                return
        elif bundled is not None:
            path, shown = bundled.resolve(), f"rules/{bundled.name}"
        else:
            self._problem(include.location, f"cannot include '{target}': there is no file {shown} "
                                            f"and no bundled rule file of that name"
                                            f"{_bundled_hint(Path(target).name)}")
            return
        if path in (p for p, _ in stack):
            cycle = [f for p, f in stack[[p for p, _ in stack].index(path):]] + [shown]
            self._problem(include.location, f"include cycle: {' -> '.join(cycle)}; "
                                            "remove one of these includes")
            return
        if path in self.done:
            return
        if len(stack) > MAX_INCLUDE_DEPTH:
            self._problem(include.location, f"includes nested more than {MAX_INCLUDE_DEPTH} deep "
                                            f"({stack[0][1]} -> ... -> {includer} -> {shown}); "
                                            "include these files from one file instead")
            return
        text, problem = _read_text(path)
        if problem is not None:
            (line, column), why = problem
            where = f" (line {line}, column {column})" if (line, column) != (1, 1) else ""
            self._problem(include.location, f"cannot include '{target}': {shown} {why}{where}")
            return
        self._read(text, shown, path.parent, path, stack)

    def _problem(self, location: Location, message: str) -> None:
        self.problems.append((location, message))

    def _check_headers(self) -> None:
        """Headers that go together, checked on the merged headers of all files."""
        if not self.complete:
            return
        quantity = self.headers.get("quantity")
        baseline = self.headers.get("baseline")
        if quantity is not None and quantity.value not in ruleset.QUANTITIES:
            return
        loop = self.headers.get("loop")
        loop_uses_baseline = loop is not None and loop.value is not None and loop.value.name in BASELINE_LOOPS
        if baseline is not None and (quantity is None or quantity.value != "difference") and not loop_uses_baseline:
            now = f"quantity is '{quantity.value}'" if quantity else "quantity defaults to 'relevance'"
            self._problem(baseline.location, f"'baseline' only applies to quantity difference (or a loop "
                                             f"that uses one: {', '.join(BASELINE_LOOPS)}), but {now}: "
                                             "remove the baseline line or set 'quantity difference'")
        if quantity is not None and quantity.value == "difference" and baseline is None:
            self._problem(quantity.location, "quantity difference needs a baseline to compare to: add a "
                                             f"line 'baseline zeros' (or {', '.join(BASELINES[1:])}, "
                                             "file \"x0.npy\")")
