"""``unsupported``: a rule file's statement that it does not explain a kind of op.

A file written for CNNs binds what it has no method for (``normalizing -> unsupported``: attention's
Softmax and LayerNorm), so that a model with such ops is refused with a sentence that says so and
names the bundled files that do explain them, instead of a bare "no rule" coverage error. The
compiler reports a node bound to it as a coverage problem (``refusal``); the rule never emits.
"""

from __future__ import annotations

from .table import ALL_KINDS, rule

NAME = "unsupported"


@rule(NAME, ALL_KINDS)
def unsupported(ctx) -> list[str | None]:
    """The file does not explain this op: ``compile`` refuses the node before any rule runs."""
    raise AssertionError("the compiler refuses nodes bound to 'unsupported' before emitting")
