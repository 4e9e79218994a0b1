"""The catalog of rules and op kinds the rule language reads files against (loops: ``run/rulefiles.py``)."""

from __future__ import annotations

from ..graph.kinds import BILINEAR_WHEN_ALL_ACTIVE, OP_KINDS
from ..lang.catalog import Catalog
from .rules import RULES

#: rules and op kinds, without loops: enough to read a file's bindings (``compile/refusal.py``)
RULE_CATALOG = Catalog(rules=RULES, op_kinds=OP_KINDS, bilinear_ops=BILINEAR_WHEN_ALL_ACTIVE)
