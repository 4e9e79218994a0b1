"""``node "name"`` bindings that match no node: a typo'd name or glob would otherwise be passed over
in silence, and the node it meant would get a more general binding.

Every command with a model (``explain``, ``compile``, ``ops``, ``check`` and the API ``Explainer``)
calls ``warn_unmatched``, which warns once per such binding with ``RulegraphWarning``, naming the
rule-file line and the closest node names.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings

from ..errors import RulegraphError, RulegraphWarning
from ..graph.read import Graph
from ..lang.ruleset import Binding, NodeInfo, RuleSet, Selector, matches
from .plan import find_start, path_nodes

#: how many close node names a warning suggests
SUGGESTIONS = 3


def unmatched(ruleset: RuleSet, path_names: list[str], all_names: list[str]) -> list[Binding]:
    """The ``node`` bindings that match none of ``path_names`` (the nodes on the relevance path);
    ``node "x" -> start`` is matched by any node in ``all_names`` (the start node itself precedes
    the path: relevance starts at its input)."""
    path = [NodeInfo(name, "", "") for name in path_names]
    everywhere = [NodeInfo(name, "", "") for name in all_names]
    return [b for b in ruleset.bindings if b.selector.form == "node" and not any(
        matches(b.selector, info) for info in (everywhere if b.rule.name == "start" else path))]


def message(binding: Binding, path_names: list[str], all_names: list[str]) -> str:
    """What the warning says: where the binding is, and what it may have meant."""
    selector: Selector = binding.selector
    head = f"{binding.location}: '{selector} -> {binding.rule}' matches no node on the relevance path"
    elsewhere = [n for n in all_names if n == selector.value or fnmatch.fnmatchcase(n, selector.value)]
    if elsewhere:
        return (f"{head}: it names {', '.join(repr(n) for n in elsewhere[:SUGGESTIONS])}, which relevance "
                "does not flow through (shape or index computations); remove the binding")
    names = all_names if binding.rule.name == "start" else path_names  # start applies anywhere
    close = difflib.get_close_matches(selector.value, names, n=SUGGESTIONS, cutoff=0.5)
    hint = (f"; did you mean {' or '.join(repr(n) for n in close)}?" if close
            else "; `rulegraph ops` lists the nodes on the path")
    return head + hint


def warn_unmatched(graph: Graph, ruleset: RuleSet, output: str | None = None,
                   start: str | None = None) -> None:
    """Warn once per ``node`` binding of ``ruleset`` that matches no node on ``graph``'s relevance path.

    Says nothing when the start cannot be found: the command reports that error itself.
    """
    if not any(b.selector.form == "node" for b in ruleset.bindings):
        return
    try:
        start_tensor = find_start(graph, ruleset, output, start)
    except RulegraphError:
        return
    path_names = [n.name for n in path_nodes(graph, start_tensor)]
    all_names = [n.name for n in graph.nodes] + [m.name for n in graph.nodes for m in n.members or []]
    for binding in unmatched(ruleset, path_names, all_names):
        warnings.warn(message(binding, path_names, all_names), RulegraphWarning, stacklevel=2)
