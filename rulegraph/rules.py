"""Attribution knowledge: the table rule name -> emitter (RULES.md §3).

Every rule is a pure function with one signature, ``emit(ctx) -> list[str | None]``: it reads the
node, the associated numbers of its outputs (``ctx.a_out``) and its parameters (``ctx.params``),
emits ONNX nodes on ``ctx.tape``, and returns one tensor name per node input (``None``: that input
gets nothing). Rules are modified gradients: they are built on the VJP table (``ctx.vjp``).

Each rule declares the op kinds it accepts, its parameters (validated when the rule file is read),
and its conservation class per (quantity, kind) (RULES.md §5), which the checker reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .kinds import BILINEAR, LINEAR, MAX, NONLINEAR, NORMALIZING, ROUTE

EXACT, APPROXIMATE, LEAKS_BIAS, NONE = "exact", "approximate", "leaks bias", "none"
ALL_KINDS = frozenset({LINEAR, NONLINEAR, MAX, ROUTE, BILINEAR, NORMALIZING})
#: f(c·x) = c·f(x) for c > 0, so x·f'(x) = f(x): the gradient conserves the importance view.
POSITIVELY_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "Abs"})


def _exact_if_homogeneous(op_type: str) -> str:
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
            if p.check and (msg := p.check(out[p.name])):
                problems.append(f"parameter '{p.name}' of rule '{self.name}': {msg}")
        return out, problems

    def conservation_of(self, quantity: str, kind: str, op_type: str = "") -> str:
        """The rule's conservation class on a node (RULES.md §5), before bias and ε are counted."""
        value = self.conservation.get((quantity, kind), NONE)
        return value(op_type) if callable(value) else value


RULES: dict[str, RuleSpec] = {}


def rule(name: str, kinds, params=(), conservation=None):
    """Register the decorated emitter as rule ``name``."""

    def register(fn):
        RULES[name] = RuleSpec(name, frozenset(kinds), fn, tuple(params), dict(conservation or {}),
                               (fn.__doc__ or "").strip())
        return fn

    return register


def _nonnegative(v: float) -> str | None:
    return None if v >= 0 and math.isfinite(v) else f"must be a finite number >= 0, got {v}"


def _classes(**by_quantity: Mapping[str, str]) -> dict[tuple[str, str], str]:
    return {(q, k): c for q, kinds in by_quantity.items() for k, c in kinds.items()}


# --------------------------------------------------------------------------------------------------
# gradient, normalized, ignore, slope, repeat, radial


@rule("gradient", ALL_KINDS,
      conservation=_classes(
          relevance={MAX: EXACT, ROUTE: EXACT},
          importance={LINEAR: LEAKS_BIAS, MAX: EXACT, ROUTE: EXACT, NONLINEAR: _exact_if_homogeneous},
          difference={LINEAR: EXACT, ROUTE: EXACT}))
def gradient(ctx) -> list[str | None]:
    """``a(x) = VJP_x(a(y))``; a bias b of a linear op takes ``b ⊙ a(y)`` (RULES.md §3), except
    under the difference quantity, where it cancels."""
    grads = ctx.vjp(ctx.a_out)
    # under the difference quantity a bias cancels in y − y': it has no share
    if ctx.kind == LINEAR and ctx.quantity != "difference" and (bias := ctx.linear_bias()) is not None:
        ctx.report_bias(ctx.tape.op("Mul", bias, ctx.a_out[0]))
    return grads


@rule("normalized", {LINEAR}, params=[Param("eps", 1e-6, _nonnegative, "the stabilizer epsilon")],
      conservation=_classes(relevance={LINEAR: APPROXIMATE}))
def normalized(ctx) -> list[str | None]:
    """LRP-ε (Bach et al. 2015; Samek et al. 2016, eq. 6): ``a(x) = x ⊙ Lᵀ(a(y) / blip(d))``.

    ``d = z + b`` (the output, bias included) unless the bias policy is ``ignore``, where ``d = z``;
    ``blip(d) = d + ε·sign(d)`` with ``sign(0) = +1``; where ``blip(d) = 0`` (ε = 0) the share is 0.
    A bias takes ``b ⊙ a(y) / blip(d)``.
    """
    t = ctx.tape
    y = ctx.node.outputs[0]
    bias = ctx.linear_bias()
    d = y
    if bias is not None and ctx.bias_policy == "ignore":
        d = t.op("Sub", y, bias)
    eps = ctx.params["eps"]
    # |blip(d)| >= ε > 0 never vanishes; only ε = 0 needs the zero guard
    s = t.op("Div", ctx.a_out[0], t.blip(d, eps)) if eps > 0 else t.safe_div(ctx.a_out[0], d)
    grads = ctx.vjp([s] + [None] * (len(ctx.node.outputs) - 1))
    out = [None if g is None else t.op("Mul", x, g) for x, g in zip(ctx.node.inputs, grads)]
    if bias is not None and ctx.bias_policy != "ignore":
        ctx.report_bias(t.op("Mul", bias, s))
    return out


@rule("ignore", {NONLINEAR}, conservation=_classes(relevance={NONLINEAR: EXACT}))
def ignore(ctx) -> list[str | None]:
    """``a(x) = a(y)``: the nonlinearity passes its number through unchanged."""
    return [ctx.a_out[0] if i == 0 else None for i in range(len(ctx.node.inputs))]


@rule("slope", {NONLINEAR}, conservation=_classes(importance={NONLINEAR: EXACT}))
def slope(ctx) -> list[str | None]:
    """``a(x) = a(y) ⊙ (f(x) − f(0)) / x``, with ``f'(0)`` where ``x = 0``; ``f(0)`` is a bias.

    The bias takes ``f(0) ⊙ a(y)``. For Relu, slope equals the gradient.
    """
    t = ctx.tape
    x, y, a = ctx.node.inputs[0], ctx.node.outputs[0], ctx.a_out[0]
    f0 = ctx.value_at_zero()
    rise = y if f0 is None else t.op("Sub", y, f0)
    at_zero = t.op("Equal", x, t.scalar(0.0, like=x))
    safe_x = t.op("Where", at_zero, t.scalar(1.0, like=x), x)
    secant = t.op("Mul", a, t.op("Div", rise, safe_x))
    derivative = ctx.vjp([a])[0]
    if f0 is not None:
        ctx.report_bias(t.op("Mul", f0, a))
    return [t.op("Where", at_zero, derivative, secant)] + [None] * (len(ctx.node.inputs) - 1)


@rule("repeat", {NONLINEAR})
def repeat(ctx) -> list[str | None]:
    """``a(x) = f(a(y))`` (the deconvnet rule for Relu; Zeiler and Fergus 2014)."""
    return [ctx.apply_node_to(ctx.a_out[0])] + [None] * (len(ctx.node.inputs) - 1)


@rule("radial", {MAX}, conservation=_classes(relevance={MAX: EXACT}))
def radial(ctx) -> list[str | None]:
    """Radial max: ``a(a_i) = α_i a(b)``, ``α_i = relu(a_i) / Σ_j relu(a_j)`` over the window.

    **Decision** (RULES.md §3): a window with no positive value falls back to the gradient rule
    (all of ``a(b)`` to the arg-max).
    """
    t = ctx.tape
    a = ctx.a_out[0]
    # a constant operand of Max takes part in the window; its share is a bias share
    positive = [t.op("Relu", x) if act or ctx.const(i) is not None else None
                for i, (x, act) in enumerate(zip(ctx.node.inputs, ctx.active))]
    window_sum = ctx.window_sum(positive)
    has_positive = t.op("Greater", window_sum, t.scalar(0.0, like=a))
    zero = t.scalar(0.0, like=a)
    share = t.op("Where", has_positive, t.safe_div(a, window_sum), zero)
    rest = t.op("Where", has_positive, zero, a)
    spread = ctx.window_sum_vjp(share)
    fallback = ctx.vjp([rest])
    for p, act in zip(positive, ctx.active):
        if p is not None and not act:
            ctx.report_bias(t.op("Mul", p, share))
    return [t.op("Add", t.op("Mul", p, s), g) if act else None
            for p, s, g, act in zip(positive, spread, fallback, ctx.active)]


@rule("start", ALL_KINDS)
def start(ctx) -> list[str | None]:
    """Start the pass at this node's input: explain the logits, not the probabilities."""
    raise AssertionError("the compiler handles 'start' nodes itself")


# The baseline-difference rule (DeepLIFT) lives in its own module; importing it registers it.
from . import deeplift  # noqa: F401
