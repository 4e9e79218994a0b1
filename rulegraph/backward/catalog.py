"""The catalog of rules and op kinds the rule language reads files against (loops: ``run/rulefiles.py``)."""

from __future__ import annotations

from ..lang.catalog import Catalog
from .ops import OPS
from .rules import RULES

#: rules and op kinds, without loops: enough to read a file's bindings (``compile/refusal.py``)
RULE_CATALOG = Catalog(rules=RULES, op_kinds=OPS.table, bilinear_ops=frozenset(OPS.bilinear))
