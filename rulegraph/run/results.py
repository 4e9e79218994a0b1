"""What an explain run gives (``Result``), and the class per row a loop explains."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..compile.targets import Target, TargetError, class_indices


@dataclass
class Result:
    """What one explain run gives, per batch row where it has a batch axis.

    ``attribution``: input name -> array shaped like that input (for the first float input also
    ``.map``); ``saliency``: ``a(x)`` itself (importance quantity); ``bias_shares``: bias node ->
    [N] share; ``bias_total`` [N]; ``start_value`` [N]: Σ of the conserved view at the start;
    ``delta`` [N]: Σ attribution + Σ bias shares − start_value (0 when the rules conserve);
    ``outputs``: the model's own outputs; ``target`` [N]: the class explained per row (None for a
    seed array), ``versus`` [N]: the class subtracted (contrastive targets); ``explained``: what
    was explained, e.g. ``'logits' [N, T, 6625] (class axis 2)``, ``class_axis`` (of the start
    tensor) and ``where`` (``at t=20``, ``over region [2:5, 0:4]``, ... or ``''``); ``node_sums``:
    node -> (Σ view given to its inputs, Σ view of its outputs, Σ bias shares), [N] each (None
    where empty), when asked for; ``node_abs_sums``: node -> (Σ |view| given to its inputs,
    Σ |view| of its outputs), the magnitudes of the same numbers (amplification.py); ``at``: tensor ->
    the attribution at that intermediate tensor (latent relevance: ``a(t)``, or ``t ⊙ a(t)`` for
    importance), ``at_numbers``: tensor -> ``a(t)`` itself (the gradient for the gradient file), when asked for.
    ``nonfinite``: one sentence per array above that holds NaN/Inf while the inputs were finite,
    with its rows and cause (nonfinite.py; ``explain`` also warns), else empty.
    """

    attribution: dict[str, np.ndarray]
    saliency: dict[str, np.ndarray]
    bias_shares: dict[str, np.ndarray]
    bias_total: np.ndarray | None
    start_value: np.ndarray
    outputs: dict[str, np.ndarray]
    start: np.ndarray
    target: np.ndarray | None = None
    device: str = "cpu"
    node_sums: dict[str, tuple] = field(default_factory=dict)  # node -> (inputs, outputs, bias) [N]
    node_abs_sums: dict[str, tuple] = field(default_factory=dict)  # node -> (Σ|inputs|, Σ|outputs|) [N]
    versus: np.ndarray | None = None
    explained: str = ""
    class_axis: int | None = None
    where: str = ""
    at: dict[str, np.ndarray] = field(default_factory=dict)
    at_numbers: dict[str, np.ndarray] = field(default_factory=dict)
    nonfinite: list[str] = field(default_factory=list)

    @property
    def map(self) -> np.ndarray:
        """The attribution of the first float input (of the first token-id input where there is none)."""
        return next(iter(self.attribution.values()))

    @property
    def delta(self) -> np.ndarray:
        """End-to-end conservation error per row (docs/rules.md, conservation classes)."""
        rows = len(self.start_value)
        total = sum(a.reshape(rows, -1).sum(axis=1).astype(np.float64) for a in self.attribution.values())
        if self.bias_total is not None:
            total = total + self.bias_total.astype(np.float64)
        return total - self.start_value.astype(np.float64)

    @property
    def relative_delta(self) -> np.ndarray:
        scale = np.maximum(np.abs(self.start_value.astype(np.float64)), 1e-12)
        return self.delta / scale


def class_per_row(target, n: int, spec) -> np.ndarray:
    """A class per row (``-1``: arg-max) from a class, a class list or ``"argmax"`` (the loops'
    targets), checked as a plain pass checks it (``targets.class_indices``: integers only, in range)."""
    if isinstance(target, Target):
        if any(v is not None for v in (target.at, target.region, target.mask, target.versus)) or target.all_positions:
            raise TargetError("loops explain a class per row; position forms and versus= are not available "
                              "with a loop yet (explain without the loop, or pass a seed array)")
        target = target.cls
    if spec.class_axis is not None and spec.position_axes:
        raise TargetError(f"loops explain a class per row, and {spec.where()} has position axes: explain "
                          "without the loop (at=, region=, mask=, all_positions=), or pass a seed array")
    return class_indices(target, n, spec)
