"""Amplification: a map can conserve and still be meaningless, when large numbers of opposite sign
cancel in its sum (a bias share of −3e6 against an attribution of +3e6 for a logit of 8.5).

End to end, per batch row::

    A = Σ |attribution| / |start value|

(every attribution array, all inputs; the start value is Σ of the conserved view at the start).
A = 1 for a map whose entries all have the sign of the explained logit; A ≫ 1 means the map is
mostly cancellation. Per node, from the same single run (``node_sums=True``)::

    A_node = Σ |view of what the node gives its inputs| / Σ |view of its outputs' numbers|

the factor by which that node grows the magnitudes it passes back; the nodes with the largest
factors are where a map's amplification comes from.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import numpy as np

from ..errors import RulegraphWarning

DEFAULT_MAX_AMPLIFICATION = 100.0
#: ``explain`` warns about rows whose map accounts for the value explained (|relative delta| at most
#: this): only there do large entries of opposite sign cancel in the sum. A map that does not add up
#: (the gradient's, with its biases unblamed) is no decomposition, and ``check`` reports its leak.
CONSERVING = 1e-2
TINY = 1e-12  # denominators below this count as this (the floor of relative_delta too)
_QUIET = contextvars.ContextVar("rulegraph_amplification_quiet", default=False)


def end_to_end(result) -> np.ndarray:
    """``Σ |attribution| / |start value|`` per row [N], in float64."""
    total = sum(np.abs(a.astype(np.float64)).reshape(len(a), -1).sum(axis=1)
                for a in result.attribution.values())
    scale = np.maximum(np.abs(result.start_value.astype(np.float64)), TINY)
    return np.asarray(total, dtype=np.float64) / scale


def per_node(result) -> dict[str, np.ndarray]:
    """node -> ``A_node`` per row [N] from ``Result.node_abs_sums`` (0 where the node passes
    nothing back)."""
    out = {}
    for node, (given, outs) in result.node_abs_sums.items():
        if given is None or outs is None:
            continue
        out[node] = given.astype(np.float64) / np.maximum(outs.astype(np.float64), TINY)
    return out


def worst(gains: dict[str, float], count: int = 5) -> list[tuple[str, float]]:
    """The ``count`` nodes with the largest factor, worst first (ties by name)."""
    return sorted(gains.items(), key=lambda kv: (-kv[1], kv[0]))[:count]


def warn_if_amplified(result, limit: float | None = DEFAULT_MAX_AMPLIFICATION) -> None:
    """One ``RulegraphWarning`` line when a conserving row's (``CONSERVING``) end-to-end
    amplification exceeds ``limit`` (None: never). Computed from the Result's arrays; no extra run.
    Silent inside ``quiet()``."""
    if limit is None or _QUIET.get() or not result.attribution or len(result.start_value) == 0:
        return
    conserving = np.abs(result.relative_delta) <= CONSERVING
    values = np.where(conserving, end_to_end(result), 0.0)
    row = int(np.argmax(values))
    if not values[row] > limit:
        return
    rows = np.flatnonzero(values > limit)
    which = f"row {row}" if len(rows) == 1 else f"{len(rows)} rows (worst: row {row})"
    warnings.warn(f"the map amplifies: Σ|attribution| / |start value| = {values[row]:.4g} in {which} "
                  f"(limit {limit:g}): its entries are far larger than the value explained and cancel "
                  f"in the sum; `rulegraph check` on this model and rule file names the nodes "
                  f"where it grows", RulegraphWarning, stacklevel=3)


@contextlib.contextmanager
def quiet():
    """No amplification warnings inside: the passes a loop runs (their points are not the input the
    user explains, and a loop's answer does not decompose the start value)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)
