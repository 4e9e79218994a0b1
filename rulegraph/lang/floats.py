"""Numbers a rule file may write: what float32, the precision rules compute in, can hold."""

from __future__ import annotations

import math

import numpy as np

#: Parameters are used in float32, the precision of the explainer (a rule file does not know its
#: model, so a float64 model's rules are held to float32 too): every number must be finite there and
#: not so small that float32 turns it into 0 or a denormal.
FLOAT32 = np.finfo(np.float32)


def float32_problem(v: float) -> str | None:
    """Why ``v`` cannot be used as a float32 parameter, or None."""
    if not math.isfinite(v) or abs(v) > float(FLOAT32.max):
        return f"must be a finite float32 number (|value| <= {float(FLOAT32.max):.3g}), got {v:g}"
    if v != 0 and abs(v) < float(FLOAT32.tiny):
        return (f"{v:g} is below float32's smallest normal magnitude {float(FLOAT32.tiny):.3g} and would "
                "become 0 or lose its precision: write 0 or a larger value")
    return None
