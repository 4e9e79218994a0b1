"""The rule table with every rule family registered: import ``RULES`` from here.

``table.py`` holds the registry; each family file registers its rules when imported. ``RULES``
lists them family by family in ``FAMILIES`` order (the order messages list rules in), whichever
module was imported first.
"""

from . import basic, deeplift, guided, lrp, transformer, unsupported
from .table import ALL_KINDS, APPROXIMATE, EXACT, LEAKS_BIAS, NONE, RULES, Param, RuleSpec, rule

FAMILIES = (basic, deeplift, lrp, guided, transformer, unsupported)

_rank = {family.__name__: i for i, family in enumerate(FAMILIES)}
# sorted() is stable: each family keeps its own order
_ordered = sorted(RULES.items(), key=lambda item: _rank[item[1].emit.__module__])
RULES.clear()
RULES.update(_ordered)

__all__ = ["ALL_KINDS", "APPROXIMATE", "EXACT", "FAMILIES", "LEAKS_BIAS", "NONE", "Param", "RULES", "RuleSpec",
           "rule"]
