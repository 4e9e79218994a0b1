"""The knowledge tables agree: the op table (VJP + kind, one registration per op), the rule table,
the loop table and the rule language's catalog."""

import pytest

from rulegraph.backward import table, vjp
from rulegraph.backward.fused import MEMBER_VJPS
from rulegraph.backward.ops import OP_KINDS, OPS, VJPS
from rulegraph.backward.rules import FAMILIES, RULES
from rulegraph.errors import InternalError
from rulegraph.graph.kinds import KINDS
from rulegraph.lang.ruleset import KINDS as LANGUAGE_KINDS
from rulegraph.run import loops
from rulegraph.run.loops import LOOPS
from rulegraph.run.rulefiles import CATALOG

#: the ops that exist only as fused nodes (their backward is their members' chain)
FUSED_ONLY = {"SiLU", "QuantizeDequantize"}


@pytest.mark.parametrize("claim, holds", [
    ("every op with a VJP has a kind", lambda: set(VJPS) <= set(OP_KINDS)),
    ("every op with a kind has a VJP or is fused-only", lambda: set(OP_KINDS) - set(VJPS) == FUSED_ONLY),
    ("a member-only VJP is no op of its own", lambda: not set(MEMBER_VJPS) & set(OP_KINDS)),
    ("every declared kind is a kind", lambda: set(OP_KINDS.values()) <= set(KINDS)),
    ("bilinear ops are linear ops", lambda: {OP_KINDS[o] for o in OPS.bilinear} == {"linear"}),
    ("the language's kinds are the reader's", lambda: tuple(LANGUAGE_KINDS) == KINDS),
    ("every kind a rule accepts exists", lambda: set().union(*(s.kinds for s in RULES.values())) <= set(KINDS)),
    ("every kind has a rule", lambda: set(KINDS) <= set().union(*(s.kinds for s in RULES.values()))),
    ("every rule comes from a family file",
     lambda: {s.emit.__module__ for s in RULES.values()} == {f.__name__ for f in FAMILIES}),
    ("the catalog's loops are the loop table", lambda: CATALOG.loops is LOOPS),
    ("the catalog reads the tables themselves",
     lambda: CATALOG.rules is RULES and CATALOG.op_kinds is OP_KINDS and CATALOG.bilinear_ops == OPS.bilinear),
])
def test_tables_agree(claim, holds):
    assert holds(), claim


@pytest.mark.parametrize("register", [
    lambda: vjp.vjp("Relu", kind="nonlinear")(lambda ctx, g: g),
    lambda: vjp.fused_kind("Gelu", "nonlinear"),
    lambda: table.rule("gradient", {"linear"})(lambda ctx: []),
    lambda: loops.loop("smoothgrad")(lambda *a: None),
])
def test_an_op_registered_twice_is_refused(register):
    before = (dict(VJPS), dict(OP_KINDS), dict(RULES), dict(LOOPS))
    with pytest.raises(InternalError, match="registered twice"):
        register()
    assert (dict(VJPS), dict(OP_KINDS), dict(RULES), dict(LOOPS)) == before
