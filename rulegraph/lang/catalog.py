"""What the rule language is read against: the rules, loops and op kinds that exist.

The language knows no rule, loop or op itself: ``parse`` and ``load`` are given a ``Catalog``
(``rulegraph.run.rulefiles.CATALOG`` is the full one). A rule or loop entry has ``kinds`` (rules
only) and ``resolve_params(given) -> (resolved, problems)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Catalog:
    #: rule name -> spec (``kinds``, ``resolve_params``)
    rules: Mapping[str, Any]
    #: op type -> kind (the kind a bare op-type selector selects)
    op_kinds: Mapping[str, str]
    #: op types that are bilinear when every float operand is an activation (Mul, Div, MatMul)
    bilinear_ops: frozenset[str] = frozenset()
    #: loop name -> spec (``resolve_params``); None: ``loop`` headers are read without checking
    #: their name and parameters (enough to read a file's bindings)
    loops: Mapping[str, Any] | None = field(default=None)
