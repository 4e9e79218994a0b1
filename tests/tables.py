"""Tables that several test files read: the facts of every bundled rule file (one row per file,
checked against ``dsl.bundled_rule_names()``), and the conservation cells of the rules on one-node
models (RULES.md §5), one row per (model, rule, quantity, bias policy)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bundled:
    """What a bundled rule file is.

    ``conserves``: the README's "conserves" column as a bound on the relative delta on the small
    models of every kind (``test_bundled_coverage``), None for "none" / "leaks bias";
    ``transformers``: it explains attention's Softmax and LayerNorm; ``cnn``: (class the checker
    predicts end to end on ``models/digits_cnn.onnx``, a measured bound or None), where a test
    pins it; ``inconsistent``: the consistency probes it fails, where a test runs them all.
    """

    quantity: str
    bias: str
    conserves: float | None
    transformers: bool
    cnn: tuple[str, float | None] | None = None
    inconsistent: frozenset[str] | None = None


EXACT, EPS = 1e-5, 1e-4
NO_PROBE = frozenset()

BUNDLED: dict[str, Bundled] = {
    "gradient": Bundled("importance", "absorb", None, True, inconsistent=NO_PROBE),
    # exact on ReLU/max nets only: the gate's Sigmoid (test_bundled_coverage) is not one
    "gradient-x-input": Bundled("importance", "blame", None, True, inconsistent=NO_PROBE),
    # repeat on Relu vs gradient on Max(x, 0): Hobson pairs neither
    "deconvnet": Bundled("importance", "absorb", None, True, inconsistent=frozenset({"max_with_zero"})),
    "guided-backprop": Bundled("importance", "absorb", None, True, cnn=("none", None)),
    "lrp-0": Bundled("relevance", "blame", EXACT, False, inconsistent=NO_PROBE),
    "lrp-epsilon": Bundled("relevance", "blame", EPS, False, inconsistent=NO_PROBE),
    "lrp-zplus": Bundled("relevance", "blame", EPS, False, cnn=("approximate", 1e-2)),
    "lrp-alpha2-beta1": Bundled("relevance", "blame", None, False, cnn=("none", None)),
    "lrp-gamma": Bundled("relevance", "blame", EPS, False, cnn=("approximate", 1e-4)),
    "lrp-composite": Bundled("relevance", "blame", EPS, False, cnn=("approximate", 1e-4)),
    "lrp-transformer": Bundled("relevance", "blame", EPS, True),
    "deeplift-rescale": Bundled("difference", "absorb", EXACT, False),
    "integrated-gradients": Bundled("importance", "absorb", None, True),
    "smoothgrad": Bundled("importance", "absorb", None, True),
}


def bundled_where(field: str) -> dict:
    """File -> the value of ``field`` for the files where it is set (not None)."""
    return {name: getattr(facts, field) for name, facts in BUNDLED.items() if getattr(facts, field) is not None}
