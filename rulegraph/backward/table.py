"""The rule table: rule name -> emitter, with what each rule declares (docs/rules.md, the rules).

Every rule is a pure function with one signature, ``emit(ctx) -> list[str | None]``: it reads the
node, the associated numbers of its outputs (``ctx.a_out``) and its parameters (``ctx.params``),
emits ONNX nodes on ``ctx.tape``, and returns one tensor name per node input (``None``: that input
gets nothing). Rules are modified gradients: they are built on the VJP table (``ctx.vjp``).

A rule is added by one function and one ``@rule`` registration, in the file of its family
(``basic``, ``lrp``, ``guided``, ``deeplift``, ``transformer``, ``unsupported``; ``rules.py`` imports
them all). Each rule declares the op kinds it accepts, its parameters (validated when the rule file
is read), and its conservation class per (quantity, kind) (docs/rules.md, conservation classes), which
the checker reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import InternalError
from ..graph.kinds import BILINEAR, LINEAR, MAX, NONLINEAR, NORMALIZING, ROUTE
from ..lang.floats import float32_problem

EXACT, APPROXIMATE, LEAKS_BIAS, NONE = "exact", "approximate", "leaks bias", "none"
ALL_KINDS = frozenset({LINEAR, NONLINEAR, MAX, ROUTE, BILINEAR, NORMALIZING})
#: f(c·x) = c·f(x) for c > 0, so x·f'(x) = f(x): the gradient conserves the importance view.
POSITIVELY_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "Abs"})


def _exact_if_homogeneous(op_type: str, params: Mapping[str, float] | None = None) -> str:
    return EXACT if op_type in POSITIVELY_HOMOGENEOUS else NONE


@dataclass(frozen=True)
class Param:
    """A rule parameter; ``default=None`` makes it required; ``check`` returns an error or None.

    A number, unless ``choices`` lists the strings it may take (``max = "relu"``).
    """

    name: str
    default: float | str | None = None
    check: Callable[[float], str | None] | None = None
    doc: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuleSpec:
    name: str
    kinds: frozenset[str]
    emit: Callable | None
    params: tuple[Param, ...] = ()
    conservation: Mapping[tuple[str, str], str] = field(default_factory=dict)
    doc: str = ""
    #: a check across parameters (``alpha − beta = 1``): an error sentence, or None
    validate: Callable[[Mapping[str, float]], str | None] | None = None
    #: the bias of a linear op is an extra input in the rule's denominators, except under
    #: ``bias ignore`` (normalized and the LRP weight rules); the checker reads it
    bias_in_denominator: bool = False
    #: does the rule give a bias a share on this node? ``has_bias(ctx) -> bool``, read by the
    #: checker's prediction; None: the linear op's bias, where the rule counts it in its denominators
    has_bias: Callable | None = None
    #: the op types the rule is defined for, where it is not every op of its kinds (empty: all)
    op_types: frozenset[str] = frozenset()
    #: the rule is not run: the pass starts at the input of the node bound to it (``start``), so
    #: its node lies beyond the relevance path
    starts_pass: bool = False

    def resolve_params(self, given: Mapping[str, float | str]) -> tuple[dict[str, float], list[str]]:
        """Fill defaults and validate; returns (params, problems). Problems are full sentences."""
        known = {p.name: p for p in self.params}
        problems: list[str] = []
        out: dict[str, float] = {}
        for key, value in given.items():
            if key not in known:
                expected = ", ".join(known) or "no parameters"
                problems.append(f"rule '{self.name}' has no parameter '{key}' (it takes {expected})")
            elif known[key].choices:
                if value in known[key].choices:
                    out[key] = value
                else:
                    options = " or ".join(f'"{c}"' for c in known[key].choices)
                    problems.append(f"parameter '{key}' of rule '{self.name}' must be {options}, got {value!r}")
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                problems.append(f"parameter '{key}' of rule '{self.name}' must be a number, got {value!r}")
            else:
                out[key] = float(value)
        for p in self.params:
            if p.name not in out:
                if p.default is None:
                    problems.append(f"rule '{self.name}' needs parameter '{p.name}' ({p.doc})")
                    continue
                out[p.name] = p.default
            if not p.choices and (msg := float32_problem(out[p.name])):
                problems.append(f"parameter '{p.name}' of rule '{self.name}': {msg}")
                continue
            if p.check and (msg := p.check(out[p.name])):
                problems.append(f"parameter '{p.name}' of rule '{self.name}': {msg}")
        if not problems and self.validate and (msg := self.validate(out)):
            problems.append(f"rule '{self.name}': {msg}")
        return out, problems

    def conservation_of(self, quantity: str, kind: str, op_type: str = "",
                        params: Mapping[str, float] | None = None) -> str:
        """The rule's conservation class on a node (docs/rules.md, conservation classes), before bias and
        ε are counted; a
        callable class is called with the op type and the rule's parameters."""
        value = self.conservation.get((quantity, kind), NONE)
        return value(op_type, params or {}) if callable(value) else value


RULES: dict[str, RuleSpec] = {}


def rule(name: str, kinds, params=(), conservation=None, validate=None, bias_in_denominator=False,
         has_bias=None, op_types=(), starts_pass=False):
    """Register the decorated emitter as rule ``name``."""

    if name in RULES:
        raise InternalError(f"rule {name} is registered twice")

    def register(fn):
        RULES[name] = RuleSpec(name, frozenset(kinds), fn, tuple(params), dict(conservation or {}),
                               (fn.__doc__ or "").strip(), validate, bias_in_denominator, has_bias,
                               frozenset(op_types), starts_pass)
        return fn

    return register


def _nonnegative(v: float) -> str | None:
    return None if v >= 0 and math.isfinite(v) else f"must be a finite number >= 0, got {v}"


#: ε ≤ 1e4 keeps ``z + ε`` distinct from ``ε`` in float32 for every |z| ≥ 1e-3 (the ratio stays below
#: 2²⁴); a larger ε drowns the pre-activations and every relevance shrinks towards 0.
EPS_MAX = 1e4


def at_most(limit: float, shown: str, why: str):
    """A parameter validator: finite, >= 0 and at most ``limit`` (``shown`` in the message, with
    ``why`` a larger value is wrong in the precision the explainer computes in)."""

    def check(v: float) -> str | None:
        if (msg := _nonnegative(v)) is not None:
            return msg
        return None if v <= limit else f"must be <= {shown}, got {v:g}: {why}"

    return check


#: ε of a rule: finite, >= 0 and at most EPS_MAX
_stabilizer = at_most(EPS_MAX, f"{EPS_MAX:g}", "a larger ε drowns the pre-activations in float32 and every "
                      "relevance shrinks towards 0")


def _classes(**by_quantity: Mapping[str, str]) -> dict[tuple[str, str], str]:
    return {(q, k): c for q, kinds in by_quantity.items() for k, c in kinds.items()}
