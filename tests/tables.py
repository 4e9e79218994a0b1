"""Tables that several test files read: the facts of every bundled rule file (one row per file,
checked against ``dsl.bundled_rule_names()``), and the conservation classes of the rules (docs/rules.md,
conservation classes): the cells on one-node models, one row per (model, rule, quantity, bias policy), and the
transformer rules' cells on a small attention model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto
from oracles import one_node

from rulegraph.lang.ruleset import RuleSet
from rulegraph.run import rulefiles as dsl


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
    return {name: getattr(facts, field) for name, facts in BUNDLED.items()
            if getattr(facts, field) is not None}


# --------------------------------------------------------------------------------------------------
# conservation cells (docs/rules.md, conservation classes): the checker's class, confirmed by one measured run


class Cell(NamedTuple):
    """``selector -> rule`` on a one-node float32 model under ``quantity`` and ``bias``; ``x`` the
    inputs (None: the checker's seeded normal samples); ``expected`` the class; ``none_leak`` the
    leak a "none" cell must measure (None: any leak above 1e-3)."""

    model: onnx.ModelProto
    selector: str
    rule: str
    quantity: str
    bias: str
    expected: str
    x: dict | None = None
    none_leak: float | None = None

    @property
    def id(self) -> str:
        return f"{self.rule}-{self.model.graph.node[0].op_type}-{self.quantity}-{self.bias}"

    def ruleset(self, rule: str | None = None) -> RuleSet:
        """The cell's rule file (``rule`` in place of the cell's own, when given)."""
        baseline = "baseline mean\n" if self.quantity == "difference" else ""
        return dsl.parse(f"rulegraph 1\nquantity {self.quantity}\nbias {self.bias}\n{baseline}"
                         f"{self.selector} -> {rule or self.rule}\n", source="cell.rules")


def _op(op_type: str, x_shape, consts=None, **attrs) -> onnx.ModelProto:
    """x → op(x, *consts) → y, float32, symbolic batch."""
    return one_node(op_type, ["x", *(consts or {})], {"x": ["N", *x_shape]}, consts, elem=F, **attrs)


F = TensorProto.FLOAT
_RNG = np.random.default_rng(11)
GEMM = _op("Gemm", [6], {"W": _RNG.normal(size=(4, 6)), "B": _RNG.normal(size=4)}, transB=1)
SIGMOID = _op("Sigmoid", [6])
RELU = _op("Relu", [6])
MAXPOOL = _op("MaxPool", [2, 4, 4], kernel_shape=[2, 2], strides=[2, 2])
TRANSPOSE = _op("Transpose", [2, 3], perm=[0, 2, 1])
W32, B32 = _RNG.normal(size=(4, 6)), _RNG.normal(size=4)
GEMM32 = _op("Gemm", [6], {"W": W32, "B": B32}, transB=1)
#: weights ≥ 0 and inputs ≥ 0: no negative contribution anywhere (αβ's failure case)
GEMM_POSITIVE = _op("Gemm", [6], {"W": np.abs(W32), "B": np.abs(B32)}, transB=1)
X_POSITIVE = {"x": np.abs(_RNG.normal(size=(8, 6))).astype(np.float32)}

CONSERVATION = [
    Cell(GEMM, "linear", "normalized(eps = 0.01)", "relevance", "blame", "approximate"),
    Cell(GEMM, "linear", "normalized(eps = 0)", "relevance", "blame", "exact"),
    Cell(GEMM, "linear", "normalized(eps = 0)", "relevance", "absorb", "leaks bias"),
    Cell(GEMM, "linear", "normalized(eps = 0.01)", "importance", "blame", "none"),
    Cell(GEMM, "linear", "gradient", "relevance", "blame", "none"),
    Cell(GEMM, "linear", "gradient", "importance", "absorb", "leaks bias"),
    Cell(GEMM, "linear", "gradient", "importance", "blame", "exact"),
    Cell(SIGMOID, "nonlinear", "ignore", "relevance", "blame", "exact"),
    Cell(SIGMOID, "nonlinear", "ignore", "importance", "blame", "none"),
    Cell(SIGMOID, "nonlinear", "slope", "importance", "blame", "exact"),
    Cell(SIGMOID, "nonlinear", "slope", "importance", "absorb", "leaks bias"),
    Cell(SIGMOID, "nonlinear", "slope", "relevance", "blame", "none"),
    Cell(SIGMOID, "nonlinear", "gradient", "importance", "blame", "none"),
    Cell(RELU, "nonlinear", "gradient", "importance", "blame", "exact"),
    # (Relu alone would conserve here: a(y) = y ⊙ onehot vanishes where y = 0; Sigmoid does not)
    Cell(SIGMOID, "nonlinear", "gradient", "relevance", "blame", "none"),
    Cell(MAXPOOL, "max", "gradient", "relevance", "blame", "exact"),
    Cell(MAXPOOL, "max", "gradient", "importance", "blame", "exact"),
    Cell(MAXPOOL, "max", "radial", "relevance", "blame", "exact"),
    Cell(MAXPOOL, "max", "radial", "importance", "blame", "none"),
    Cell(TRANSPOSE, "route", "gradient", "relevance", "blame", "exact"),
    Cell(TRANSPOSE, "route", "gradient", "importance", "blame", "exact"),
    # difference (baseline: the batch mean)
    Cell(GEMM, "linear", "normalized(eps = 0.01)", "difference", "blame", "none"),
    Cell(GEMM, "linear", "gradient", "difference", "absorb", "exact"),  # the bias cancels in y − y'
    Cell(GEMM, "linear", "baseline_difference", "difference", "blame", "exact"),
    Cell(SIGMOID, "nonlinear", "ignore", "difference", "blame", "none"),
    Cell(SIGMOID, "nonlinear", "gradient", "difference", "blame", "none"),
    Cell(SIGMOID, "nonlinear", "baseline_difference", "difference", "blame", "exact"),
    Cell(MAXPOOL, "max", "gradient", "difference", "blame", "none"),
    Cell(MAXPOOL, "max", 'baseline_difference(max = "softness")', "difference", "blame", "exact"),
    Cell(MAXPOOL, "max", 'baseline_difference(max = "relu")', "difference", "blame", "exact"),
    Cell(TRANSPOSE, "route", "gradient", "difference", "blame", "exact"),
    Cell(TRANSPOSE, "route", "baseline_difference", "difference", "blame", "exact"),
    # the LRP weight rules; z⁺ on inputs ≥ 0, its premise (test_rules_lrp:
    # test_zplus_loses_an_output_without_positive_contribution)
    Cell(GEMM32, "linear", "zplus(eps = 0)", "relevance", "blame", "exact", X_POSITIVE),
    Cell(GEMM32, "linear", "zplus(eps = 0.01)", "relevance", "blame", "approximate", X_POSITIVE),
    Cell(GEMM32, "linear", "zplus(eps = 0)", "relevance", "absorb", "leaks bias", X_POSITIVE),
    Cell(GEMM32, "linear", "zplus(eps = 0)", "relevance", "ignore", "exact", X_POSITIVE),
    Cell(GEMM32, "linear", "alpha_beta(alpha = 1, beta = 0, eps = 0)", "relevance", "blame", "exact"),
    # α·a(y) goes down instead of a(y): the leak is α − 1
    Cell(GEMM_POSITIVE, "linear", "alpha_beta(alpha = 2, beta = 1, eps = 0)", "relevance", "blame", "none",
         X_POSITIVE, none_leak=1.0),
    Cell(GEMM32, "linear", "gamma(gamma = 0.25, eps = 0)", "relevance", "blame", "exact"),
    Cell(GEMM32, "linear", "gamma(gamma = 0.25, eps = 0.01)", "relevance", "total", "approximate"),
    Cell(GEMM32, "linear", "gamma(gamma = 0.25, eps = 0)", "relevance", "absorb", "leaks bias"),
    # the bias takes nothing under zbox
    Cell(GEMM32, "linear", "zbox(low = -3, high = 3, eps = 0)", "relevance", "absorb", "exact"),
    Cell(GEMM32, "linear", "zbox(low = -3, high = 3, eps = 0.01)", "relevance", "blame", "approximate"),
    Cell(GEMM32, "linear", "flat", "relevance", "absorb", "exact"),
    Cell(GEMM32, "linear", "wsquare", "relevance", "blame", "exact"),
    Cell(GEMM32, "linear", "wsquare", "relevance", "absorb", "leaks bias"),
]

#: (binding, bias policy, class) of the transformer rules, each on ``Softmax(a·b)`` then a LayerNorm
#: with every other node bound to a conserving rule (test_transformer.py builds the model)
ATTENTION_CONSERVATION = [
    ("LayerNormalization -> layernorm_linear", "blame", "approximate"),
    ("LayerNormalization -> layernorm_linear", "absorb", "leaks bias"),
    ("LayerNormalization -> layernorm_linear(eps = 0)", "blame", "exact"),
    ("LayerNormalization -> layernorm_linear(eps = 0)", "ignore", "exact"),
    ("Softmax -> softmax_taylor", "blame", "approximate"),
    ("Softmax -> softmax_taylor", "absorb", "leaks bias"),
    ("Softmax -> block", "blame", "none"),
    ("bilinear -> uniform(eps = 0)", "blame", "exact"),
    ("bilinear -> gate(keep = 0)", "blame", "approximate"),
]
