"""NaN or Inf in an answer is never returned silently.

After a run whose float inputs are all finite, every array the Result gives (each input's
attribution and saliency, each bias share) is checked; what holds NaN or Inf is named in
``Result.nonfinite`` (one sentence per array: which rows, how many entries, and the cause) and in
one ``RulegraphWarning``. The cause is told apart by the start value of those rows: not finite there,
the model's own forward overflowed (or divided by zero) before the pass began; finite there, the
backward pass made them (a rule dividing by a zero denominator, as LRP-ε does at ε = 0 where a
neuron's input is 0, or a bug in rulegraph). Inputs holding NaN/Inf (``allow_nonfinite``) give
non-finite answers by nature: nothing is checked then.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import RulegraphWarning


def _rows(bad: np.ndarray) -> list[int]:
    return [int(r) for r in np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))] if bad.ndim else [0]


def _row_text(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
    return f"row{'s' if len(rows) > 1 else ''} {shown}"


def nonfinite_answers(result) -> list[str]:
    """Sentences naming each array of ``result`` that holds NaN/Inf, with its rows and the cause;
    empty when every one is finite. For runs whose inputs were checked finite (the explainer's
    input check, unless ``allow_nonfinite``)."""
    arrays = [(f"the attribution of input '{k}'", v) for k, v in result.attribution.items()]
    arrays += [(f"the saliency of input '{k}'", v) for k, v in result.saliency.items()]
    arrays += [(f"the bias share of node '{k}'", v) for k, v in result.bias_shares.items()]
    start = np.asarray(result.start_value)
    found = []
    for what, value in arrays:
        value = np.asarray(value)
        bad = ~np.isfinite(value)
        if not bad.any():
            continue
        rows = _rows(bad)
        kinds = " and ".join(k for k, m in (("NaN", np.isnan(value)), ("Inf", np.isinf(value))) if m.any())
        forward = [r for r in rows if r < start.size and not np.isfinite(start.reshape(-1)[r])]
        if forward:
            cause = (f"the start value {result.explained or ''} is not finite in {_row_text(forward)}: "
                     f"the model's forward overflowed or divided by zero before the pass began")
        else:
            cause = ("the start value is finite there, so the backward pass made them: a rule dividing by a "
                     "zero denominator (LRP at ε = 0 where a neuron's input is 0: use ε > 0), or a bug in "
                     "rulegraph (please report it with the model and the rule file)")
        found.append(f"{what} holds {kinds} in {_row_text(rows)} ({int(bad.sum())} of {value.size} entries) "
                     f"while the inputs are finite; {cause}")
    return found


def warn_if_nonfinite(result) -> None:
    """Fill ``result.nonfinite`` and warn (one ``RulegraphWarning``) when it is not empty."""
    result.nonfinite = nonfinite_answers(result)
    if result.nonfinite:
        warnings.warn("not finite: " + "; ".join(result.nonfinite), RulegraphWarning, stacklevel=3)
