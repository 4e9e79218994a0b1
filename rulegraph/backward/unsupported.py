"""``unsupported``: a rule file's statement that it does not explain a kind of op.

A file written for CNNs binds what it has no method for (``normalizing -> unsupported``: attention's
Softmax and LayerNorm), so that a model with such ops is refused with a sentence that says so and
names the bundled files that do explain them, instead of a bare "no rule" coverage error. The
compiler reports a node bound to it as a coverage problem (``refusal``); the rule never emits.
"""

from __future__ import annotations

from functools import lru_cache

from .rules import ALL_KINDS, rule

NAME = "unsupported"


@rule(NAME, ALL_KINDS)
def unsupported(ctx) -> list[str | None]:
    """The file does not explain this op: ``compile`` refuses the node before any rule runs."""
    raise AssertionError("the compiler refuses nodes bound to 'unsupported' before emitting")


@lru_cache(maxsize=None)
def bundled_files_for(kind: str, op_type: str) -> tuple[str, ...]:
    """The bundled rule files whose bindings give an op of ``op_type`` and ``kind`` a rule that
    accepts it (not ``unsupported``, not ``start``)."""
    from ..lang import parse as dsl
    from .rules import RULES
    from ..lang.ruleset import AmbiguousBinding, NodeInfo

    names = []
    for name in dsl.bundled_rule_names():
        try:
            binding = dsl.load(name).binding_for(NodeInfo("", op_type, kind, at_end=False))
        except AmbiguousBinding:
            continue
        spec = RULES.get(binding.rule.name) if binding is not None else None
        if spec is not None and spec.name not in (NAME, "start") and kind in spec.kinds and (
                not spec.op_types or op_type in spec.op_types):
            names.append(name)
    return tuple(names)


def refusal(node, binding, source: str) -> str:
    """The coverage problem of ``node`` bound to ``unsupported`` by ``binding`` in file ``source``."""
    others = bundled_files_for(node.kind, node.op_type)
    hint = f"bundled files that explain it: {', '.join(others)}" if others else "no bundled file explains it"
    return (f"{node}, kind {node.kind}: {source} does not explain {node.kind} ops ('{binding.selector} -> "
            f"{NAME}' at {binding.location}; see the file's header); {hint}")
