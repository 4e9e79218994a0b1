"""The reverse interpreter: one walk back over nodes, used by the compiler (each node's rule) and by
fused nodes (each member's VJP).

``cotangents`` maps a tensor to the contributions it has received so far (summed when read). Each
node, last first, gets the sum of its outputs' contributions (skipped when none reached it) and
``step(node, g)`` gives one entry per input; the entries for active inputs are passed on.
"""

from __future__ import annotations

from collections.abc import Callable, Container

from ..graph.read import Node
from .emit import Tape


def checked(what: str, node: Node, result: list) -> list:
    """``result`` if it has one entry per input of ``node``; else a bug in ``what`` (a rule or VJP)."""
    if len(result) != len(node.inputs):
        raise AssertionError(f"{what} returned {len(result)} entries for {len(node.inputs)} inputs")
    return result


def walk_back(tape: Tape, nodes: list[Node], cotangents: dict[str, list[str]], active: Container[str],
              step: Callable[[Node, list[str | None]], list[str | None]]) -> dict[str, list[str]]:
    """Walk ``nodes`` (topological order) in reverse, adding each node's entries for its inputs in
    ``active`` to ``cotangents``; returns ``cotangents``."""
    for node in reversed(nodes):
        g = [tape.sum(cotangents[o]) if o in cotangents else None for o in node.outputs]
        if all(x is None for x in g):
            continue
        for tensor, entry in zip(node.inputs, step(node, g)):
            if entry is not None and tensor in active:
                cotangents.setdefault(tensor, []).append(entry)
    return cotangents
