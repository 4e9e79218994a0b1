"""RuleSet and Binding: what a parsed rule file says, and which binding a node gets.

Selectors, from most to least specific (DESIGN.md, "The rule language"):

    node "name"     exact node name, or a glob (``*``, ``?``, ``[...]``)
    first OP/last OP  the first/last node of op type OP on the relevance path
    OpType          every node of that op type
    kind            every node of that op kind (linear, nonlinear, max, route, bilinear, normalizing)

The most specific matching selector wins. Two bindings of equal specificity from the same file that
match one node are an error; a binding in an including file overrides one from an included file.

``start`` bound by op type, kind or first/last (``Softmax -> start``: explain the logits, not the
probabilities) applies only to a node at the end of the model, whose output reaches a graph output
through route ops alone; elsewhere (the Softmax inside an attention layer) it is passed over and the
node takes its next most specific binding. ``node "name" -> start`` applies wherever the node is.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import Location

KINDS = ("linear", "nonlinear", "max", "route", "bilinear", "normalizing")
QUANTITIES = ("relevance", "importance", "difference")
BIAS_POLICIES = ("absorb", "blame", "total", "ignore")
START_MODES = ("output", "one")

#: Specificity of each selector form; larger wins.
SPECIFICITY = {"node": 4, "first": 3, "last": 3, "op": 2, "kind": 1}


@dataclass(frozen=True)
class Selector:
    """One selector: ``form`` is a key of SPECIFICITY; ``value`` the kind, op type or node glob."""

    form: str
    value: str

    def __str__(self) -> str:
        if self.form == "node":
            return f'node "{self.value}"'
        if self.form in ("first", "last"):
            return f"{self.form} {self.value}"
        return self.value


@dataclass(frozen=True)
class RuleCall:
    """A rule name with its parameters, as written (the rule table, backward/table.py, fills in defaults)."""

    name: str
    params: Mapping[str, float | str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        args = ", ".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v:g}" for k, v in self.params.items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class Binding:
    """``selector -> rule``, with where it was written. ``layer`` orders files: later overrides."""

    selector: Selector
    rule: RuleCall
    location: Location
    layer: int = 0

    @property
    def specificity(self) -> int:
        return SPECIFICITY[self.selector.form]


@dataclass(frozen=True)
class NodeInfo:
    """What a selector may look at in a node."""

    name: str
    op_type: str
    kind: str
    first_of_type: bool = False
    last_of_type: bool = False
    #: the node's output reaches a graph output through route ops alone (see the module docstring)
    at_end: bool = True


class AmbiguousBinding(Exception):
    """Two bindings of equal specificity from one file match the same node."""

    def __init__(self, node: NodeInfo, bindings: list[Binding]):
        self.node = node
        self.bindings = bindings
        where = " and ".join(f"'{b.selector} -> {b.rule}' at {b.location}" for b in bindings)
        super().__init__(
            f"node '{node.name}' ({node.op_type}) is matched by {where} with equal specificity; "
            "make one selector more specific (node \"...\" beats first/last, which beat op types, "
            "which beat kinds)"
        )


def matches(selector: Selector, node: NodeInfo) -> bool:
    form, value = selector.form, selector.value
    if form == "node":
        return node.name == value or fnmatch.fnmatchcase(node.name, value)
    if form == "first":
        return node.op_type == value and node.first_of_type
    if form == "last":
        return node.op_type == value and node.last_of_type
    if form == "op":
        return node.op_type == value
    return node.kind == value


def _applies(binding: Binding, node: NodeInfo) -> bool:
    """``start`` by op type, kind or position only at the end of the model (module docstring)."""
    return binding.rule.name != "start" or node.at_end or binding.selector.form == "node"


@dataclass(frozen=True)
class RuleSet:
    """A parsed rule file (with its includes resolved)."""

    bindings: tuple[Binding, ...] = ()
    quantity: str = "relevance"
    bias: str = "absorb"
    start: str | None = None
    baseline: str | None = None
    loop: RuleCall | None = None      # a loop around the pass (run/loops.py), e.g. integrated_gradients
    source: str = "<rules>"
    files: tuple[str, ...] = ()
    header_locations: Mapping[str, Location] = field(default_factory=dict)

    def candidates(self, node: NodeInfo) -> list[Binding]:
        return [b for b in self.bindings if matches(b.selector, node) and _applies(b, node)]

    def binding_for(self, node: NodeInfo) -> Binding | None:
        """The binding that applies to ``node``, or None; raises AmbiguousBinding on a tie."""
        found = self.candidates(node)
        if not found:
            return None
        top = max(b.specificity for b in found)
        best = [b for b in found if b.specificity == top]
        latest = max(b.layer for b in best)
        best = [b for b in best if b.layer == latest]
        if len(best) > 1:
            raise AmbiguousBinding(node, best)
        return best[0]
