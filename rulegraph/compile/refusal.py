"""The refusal of a node bound to ``unsupported``: which bundled rule files would explain it."""

from __future__ import annotations

from functools import lru_cache

from ..backward.catalog import RULE_CATALOG
from ..backward.rules import RULES
from ..backward.unsupported import NAME
from ..lang.parse import bundled_rule_names, load
from ..lang.ruleset import AmbiguousBinding, NodeInfo


@lru_cache(maxsize=None)
def bundled_files_for(kind: str, op_type: str) -> tuple[str, ...]:
    """The bundled rule files whose bindings give an op of ``op_type`` and ``kind`` a rule that
    accepts it (not ``unsupported``, not ``start``)."""
    names = []
    for name in bundled_rule_names():
        try:
            binding = load(name, RULE_CATALOG).binding_for(NodeInfo("", op_type, kind, at_end=False))
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
