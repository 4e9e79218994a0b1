"""Rule files read against the full catalog: every rule, op kind and loop rulegraph has.

``parse`` and ``load`` are ``lang.parse``'s, given ``CATALOG``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..backward.catalog import RULE_CATALOG
from ..lang import parse as _parse
from ..lang.parse import MAX_INCLUDE_DEPTH, SUFFIX, bundled_rule_names, bundled_rules_dir  # noqa: F401
from ..lang.ruleset import RuleSet
from .loops import LOOPS

CATALOG = replace(RULE_CATALOG, loops=LOOPS)


def parse(text: str, source: str = "<rules>") -> RuleSet:
    """Parse rule-file text; ``source`` names it in messages, and anchors relative includes."""
    return _parse.parse(text, CATALOG, source)


def load(path_or_name: str | Path) -> RuleSet:
    """Read a rule file from a path, or a bundled one by name (``load("lrp-epsilon")``)."""
    return _parse.load(path_or_name, CATALOG)
