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

import numpy as np

from .kinds import BILINEAR, LINEAR, MAX, NONLINEAR, NORMALIZING, ROUTE

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
        """The rule's conservation class on a node (RULES.md §5), before bias and ε are counted; a
        callable class is called with the op type and the rule's parameters."""
        value = self.conservation.get((quantity, kind), NONE)
        return value(op_type, params or {}) if callable(value) else value


RULES: dict[str, RuleSpec] = {}


def rule(name: str, kinds, params=(), conservation=None, validate=None, bias_in_denominator=False,
         has_bias=None, op_types=(), starts_pass=False):
    """Register the decorated emitter as rule ``name``."""

    def register(fn):
        RULES[name] = RuleSpec(name, frozenset(kinds), fn, tuple(params), dict(conservation or {}),
                               (fn.__doc__ or "").strip(), validate, bias_in_denominator, has_bias,
                               frozenset(op_types), starts_pass)
        return fn

    return register


def _nonnegative(v: float) -> str | None:
    return None if v >= 0 and math.isfinite(v) else f"must be a finite number >= 0, got {v}"


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


#: ε ≤ 1e4 keeps ``z + ε`` distinct from ``ε`` in float32 for every |z| ≥ 1e-3 (the ratio stays below
#: 2²⁴); a larger ε drowns the pre-activations and every relevance shrinks towards 0.
EPS_MAX = 1e4


def _stabilizer(v: float) -> str | None:
    """ε of a rule: finite, >= 0 and at most EPS_MAX."""
    if (msg := _nonnegative(v)) is not None:
        return msg
    if v <= EPS_MAX:
        return None
    return (f"must be <= {EPS_MAX:g}, got {v:g}: a larger ε drowns the pre-activations in float32 and "
            "every relevance shrinks towards 0")


def _classes(**by_quantity: Mapping[str, str]) -> dict[tuple[str, str], str]:
    return {(q, k): c for q, kinds in by_quantity.items() for k, c in kinds.items()}


# --------------------------------------------------------------------------------------------------
# gradient, normalized, ignore, slope, repeat, radial


def _gradient_has_bias(ctx) -> bool:
    """The gradient blames a linear op's bias and a route op's operands that are not activations."""
    if ctx.kind == LINEAR:
        return ctx.linear_bias() is not None
    return ctx.kind == ROUTE and bool(ctx.parts_of_constants())


@rule("gradient", ALL_KINDS, has_bias=_gradient_has_bias,
      conservation=_classes(
          relevance={MAX: EXACT, ROUTE: EXACT},
          importance={LINEAR: LEAKS_BIAS, MAX: EXACT, ROUTE: EXACT, NONLINEAR: _exact_if_homogeneous},
          difference={LINEAR: EXACT, ROUTE: EXACT}))
def gradient(ctx) -> list[str | None]:
    """``a(x) = VJP_x(a(y))``; a bias b of a linear op takes ``b ⊙ a(y)`` (RULES.md §3), except
    under the difference quantity, where it cancels.

    A route op with an operand that is not an activation (Concat with a constant or expanded class
    token) passes that operand's part ``g`` of ``a(y)`` to it as to a bias: its share is the
    operand's view (``g``, or ``c ⊙ g`` under importance).
    """
    grads = ctx.vjp(ctx.a_out)
    # under the difference quantity a bias cancels in y − y': it has no share
    if ctx.kind == LINEAR and ctx.quantity != "difference" and (bias := ctx.linear_bias()) is not None:
        ctx.report_bias(ctx.tape.op("Mul", bias, ctx.a_out[0]))
    if ctx.kind == ROUTE and ctx.quantity != "difference":
        for operand, part in ctx.parts_of_constants():
            ctx.report_bias(part if ctx.quantity == "relevance" else ctx.tape.op("Mul", operand, part))
    return grads


@rule("normalized", {LINEAR}, params=[Param("eps", 1e-6, _stabilizer, "the stabilizer epsilon")],
      conservation=_classes(relevance={LINEAR: APPROXIMATE}), bias_in_denominator=True)
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


def _has_value_at_zero(ctx) -> bool:
    """slope blames ``f(0)`` where it is not 0."""
    return ctx.value_at_zero() is not None


@rule("slope", {NONLINEAR}, conservation=_classes(importance={NONLINEAR: EXACT}), has_bias=_has_value_at_zero)
def slope(ctx) -> list[str | None]:
    """``a(x) = a(y) ⊙ (f(x) − f(0)) / x``, with ``f'(0)`` where ``x = 0``; ``f(0)`` is a bias.

    The bias takes ``f(0) ⊙ a(y)``. For Relu, slope equals the gradient.
    """
    t = ctx.tape
    x, y, a = ctx.node.inputs[0], ctx.node.outputs[0], ctx.a_out[0]
    f0 = ctx.value_at_zero()
    rise = y if f0 is None else t.op("Sub", y, f0)
    at_zero = t.op("Equal", x, t.scalar(0.0))
    safe_x = t.op("Where", at_zero, t.scalar(1.0), x)
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
    has_positive = t.op("Greater", window_sum, t.scalar(0.0))
    zero = t.scalar(0.0)
    share = t.op("Where", has_positive, t.safe_div(a, window_sum), zero)
    rest = t.op("Where", has_positive, zero, a)
    spread = ctx.window_sum_vjp(share)
    fallback = ctx.vjp([rest])
    for p, act in zip(positive, ctx.active):
        if p is not None and not act:
            ctx.report_bias(t.op("Mul", p, share))
    return [t.op("Add", t.op("Mul", p, s), g) if act else None
            for p, s, g, act in zip(positive, spread, fallback, ctx.active)]


@rule("start", ALL_KINDS, starts_pass=True)
def start(ctx) -> list[str | None]:
    """Start the pass at this node's input: explain the logits, not the probabilities."""
    raise AssertionError("the compiler handles 'start' nodes itself")


# The baseline-difference rule (DeepLIFT) lives in its own module; importing it registers it.
from . import deeplift  # noqa: F401
from . import unsupported  # noqa: F401

# --------------------------------------------------------------------------------------------------
# the LRP weight rules (zplus, alpha_beta, gamma, zbox, flat, wsquare) and guided backprop
#
# Each weight rule is a modified gradient (Zennit's idea, STYLE.md): variants L_k of the linear op
# with modified constant weights (``ctx.variant``), each applied to a modified input in_k(x):
#
#     z = Σ_k L_k(in_k(x)) + b_mod,    s = a(y) / blip(z),    a(x) = Σ_k in_k(x) ⊙ L_kᵀ(s)
#
# The bias is an extra input of value 1 with weight b_mod (RULES.md §3, blame): it sits in the
# denominators and takes ``b_mod ⊙ s``, unless the policy is ``bias ignore`` (then b_mod = 0 and
# the inputs share everything); zbox and flat give it nothing (see there). They need a Conv, Gemm or
# MatMul with a constant weight operand (ctx.variant fails naming the node otherwise).

_EPS = Param("eps", 1e-6, _stabilizer, "the stabilizer epsilon")


def _finite(v: float) -> str | None:
    return None if math.isfinite(v) else f"must be a finite number, got {v}"


def _positive_part(w: np.ndarray) -> np.ndarray:
    return np.maximum(w, 0.0)


def _negative_part(w: np.ndarray) -> np.ndarray:
    return np.minimum(w, 0.0)


def _weights(ctx, modify: Callable[[np.ndarray], np.ndarray]):
    """The linear op with weights ``modify(w)``, no bias. Gemm's ``alpha`` is part of the weight:
    the variant keeps the attribute, so it gets ``modify(alpha·w) / alpha``."""
    alpha = float(ctx.node.attr("alpha", 1.0)) if ctx.node.op_type == "Gemm" else 1.0
    if alpha == 0:
        raise ctx.fail("a Gemm with alpha = 0 has no weights for the LRP rules")
    return ctx.variant(lambda w: modify(alpha * w) / alpha)


def _bias(ctx, modify: Callable[[object, str], str]) -> str | None:
    """``modify(tape, b)``, the bias in the denominators; None without a bias or under ``bias ignore``."""
    b = ctx.linear_bias()
    return None if b is None or ctx.bias_policy == "ignore" else modify(ctx.tape, b)


def _positive_bias(t, b: str) -> str:
    return t.op("Relu", b)


def _negative_bias(t, b: str) -> str:
    return t.op("Min", b, t.scalar(0.0))


def _filled(t, like: str, value: float) -> str:
    """A tensor shaped like ``like`` holding ``value`` everywhere (the inputs of flat, wsquare, zB)."""
    return t.op("Expand", t.scalar(value), t.shape(like))


def _modified_gradient(ctx, terms, bias: str | None, eps: float) -> tuple[str, str | None]:
    """``terms`` = [(in_k(x), L_k)]: returns ``(Σ_k in_k(x) ⊙ L_kᵀ(s), b_mod ⊙ s or None)``."""
    t = ctx.tape
    z = t.sum([variant.forward(x) for x, variant in terms] + ([bias] if bias is not None else []))
    # where blip(z) = 0 (ε = 0: no contribution at all) the output's number is lost, as in normalized
    s = t.op("Div", ctx.a_out[0], t.blip(z, eps)) if eps > 0 else t.safe_div(ctx.a_out[0], z)
    relevance = t.sum([t.op("Mul", x, variant.transpose(s)) for x, variant in terms])
    return relevance, None if bias is None else t.op("Mul", bias, s)


def _to_activation(ctx, variant, relevance: str, share: str | None) -> list[str | None]:
    """One entry per node input: the relevance for the activation operand; reports the bias share."""
    if share is not None:
        ctx.report_bias(share)
    out: list[str | None] = [None] * len(ctx.node.inputs)
    out[variant.activation_index] = relevance
    return out


def _activation(ctx, variant) -> str:
    return ctx.node.inputs[variant.activation_index]


def _relevance_only(ctx, name: str) -> None:
    """zB, flat and w² compute the input's relevance itself, not ``x ⊙ something``."""
    if ctx.quantity != "relevance":
        raise ctx.fail(f"rule '{name}' computes relevance directly and needs `quantity "
                       f"relevance`; under `quantity {ctx.quantity}` the finish would multiply it by x")


_LRP = _classes(relevance={LINEAR: APPROXIMATE})


@rule("zplus", {LINEAR}, params=[_EPS], conservation=_LRP, bias_in_denominator=True)
def zplus(ctx) -> list[str | None]:
    """LRP-z⁺ (Montavon et al. 2017, deep Taylor z⁺; Montavon et al. 2019): only the positive
    contributions ``x⁺w⁺``: ``a(x) = x⁺ ⊙ L₊ᵀ(a(y) / blip(L₊(x⁺) + b⁺))``, ``L₊`` with weights ``w⁺``.

    The bias takes ``b⁺ ⊙ a(y) / blip(·)``; under ``bias ignore`` it is left out. On the inputs
    ≥ 0 it is derived for (after a Relu) it equals ``alpha_beta(alpha = 1, beta = 0)``; negative
    inputs get nothing (Zennit's ZPlus also gives ``x⁻w⁻`` a share; Captum's Alpha1_Beta0_Rule
    uses ``x w⁺`` with the full bias ``b``). Conservative up to ε and bias where every output with
    a number has a positive contribution; an output without one (``z⁺ = 0``) loses its number.
    Feeding a Relu, such an output is dead (``y ≤ 0``, number 0); a BatchNormalization in between
    can shift it alive (merge it into the convolution first, as Zennit's canonizers do).
    """
    positive = _weights(ctx, _positive_part)
    x = ctx.tape.op("Relu", _activation(ctx, positive))
    relevance, share = _modified_gradient(ctx, [(x, positive)], _bias(ctx, _positive_bias), ctx.params["eps"])
    return _to_activation(ctx, positive, relevance, share)


def _alpha_minus_beta(params: Mapping[str, float]) -> str | None:
    """α − β = 1, in float64 and in float32 (where the rule computes: α = 1e8 + 1, β = 1e8 round to
    the same float32 number)."""
    alpha, beta = params["alpha"], params["beta"]
    if abs(alpha - beta - 1) > 1e-9:
        return f"needs alpha − beta = 1 (conservation), got alpha = {alpha:g}, beta = {beta:g}"
    in_float32 = float(np.float32(alpha) - np.float32(beta))
    if abs(in_float32 - 1) > 2 * FLOAT32.eps:
        return (f"needs alpha − beta = 1 (conservation) in float32, where the rule computes, but there "
                f"alpha = {alpha:g}, beta = {beta:g} give alpha − beta = {in_float32:g}: use smaller values")
    return None


def _conserves_if_beta_zero(op_type: str, params: Mapping[str, float]) -> str:
    """αβ with β > 0 loses conservation wherever an output has contributions of one sign only."""
    return APPROXIMATE if params.get("beta", 1.0) == 0 else NONE


@rule("alpha_beta", {LINEAR}, conservation=_classes(relevance={LINEAR: _conserves_if_beta_zero}),
      validate=_alpha_minus_beta, bias_in_denominator=True,
      params=[Param("alpha", None, _nonnegative, "the weight of the positive contributions, >= 0"),
              Param("beta", None, _nonnegative, "the weight of the negative contributions, >= 0"), _EPS])
def alpha_beta(ctx) -> list[str | None]:
    """LRP-αβ (Bach et al. 2015; Montavon et al. 2019; Zennit's AlphaBeta): ``a(x) = α R⁺ − β R⁻``.

    ``R⁺ = x⁺ ⊙ L₊ᵀ(s⁺) + x⁻ ⊙ L₋ᵀ(s⁺)``, ``s⁺ = a(y) / blip(L₊(x⁺) + L₋(x⁻) + b⁺)`` (the positive
    contributions ``x⁺w⁺ + x⁻w⁻``); ``R⁻`` the same with ``L₊``/``L₋`` swapped and ``b⁻`` (the
    negative ones); ``L₊``, ``L₋`` carry ``w⁺``, ``w⁻``. ``α − β = 1`` and ``α, β ≥ 0`` are checked
    when the rule file is read. The bias takes ``α b⁺ s⁺ − β b⁻ s⁻`` (nothing under ``bias ignore``).
    Conservation fails where one side has no contribution at all (e.g. no negative one: ``α a(y)``
    goes down instead of ``a(y)``).
    """
    t = ctx.tape
    alpha, beta, eps = ctx.params["alpha"], ctx.params["beta"], ctx.params["eps"]
    positive, negative = _weights(ctx, _positive_part), _weights(ctx, _negative_part)
    x = _activation(ctx, positive)
    x_pos, x_neg = t.op("Relu", x), t.op("Min", x, t.scalar(0.0))
    r_pos, b_pos = _modified_gradient(ctx, [(x_pos, positive), (x_neg, negative)], _bias(ctx, _positive_bias), eps)
    relevance = t.op("Mul", t.scalar(alpha), r_pos)
    share = None if b_pos is None else t.op("Mul", t.scalar(alpha), b_pos)
    if beta > 0:
        r_neg, b_neg = _modified_gradient(ctx, [(x_pos, negative), (x_neg, positive)], _bias(ctx, _negative_bias), eps)
        relevance = t.op("Sub", relevance, t.op("Mul", t.scalar(beta), r_neg))
        if share is not None:
            share = t.op("Sub", share, t.op("Mul", t.scalar(beta), b_neg))
    return _to_activation(ctx, positive, relevance, share)


#: γ ≤ 2²⁴: beyond, a negative weight vanishes next to (1 + γ)·w⁺ in float32 and the rule is zplus.
GAMMA_MAX = float(2**24)


def _gamma(v: float) -> str | None:
    if (msg := _nonnegative(v)) is not None:
        return msg
    if v <= GAMMA_MAX:
        return None
    return (f"must be <= 2**24 = {GAMMA_MAX:g}, got {v:g}: beyond, negative weights vanish next to "
            "(1 + γ)·w⁺ in float32; use the rule zplus")


@rule("gamma", {LINEAR}, conservation=_LRP, bias_in_denominator=True,
      params=[Param("gamma", None, _gamma, "how much the positive weights are favoured, >= 0"), _EPS])
def gamma(ctx) -> list[str | None]:
    """LRP-γ (Montavon et al. 2019): weights ``w + γw⁺``: ``a(x) = x ⊙ Lγᵀ(a(y) / blip(Lγ(x) + bγ))``.

    **Decision**: the inputs enter as they are and the bias is modified like a weight of a constant
    input 1, ``bγ = b + γb⁺``, as in Montavon et al.'s formula (the sum runs over the bias too) and
    Zennit's Gamma where the output is positive; the bias takes ``bγ ⊙ s`` (nothing under ``bias
    ignore``). Captum's GammaRule keeps ``b`` unmodified (or drops it), also with inputs as they are.
    Zennit's generalised Gamma instead splits inputs and weights by sign and favours contributions
    of the output's sign; for inputs ≥ 0 (after a Relu) and a positive output both agree with this.
    ``γ = 0`` is LRP-ε (``normalized``).
    """
    g = ctx.params["gamma"]
    favoured = _weights(ctx, lambda w: w + g * np.maximum(w, 0.0))
    bias = _bias(ctx, lambda t, b: t.op("Add", b, t.op("Mul", t.scalar(g), t.op("Relu", b))))
    relevance, share = _modified_gradient(ctx, [(_activation(ctx, favoured), favoured)], bias, ctx.params["eps"])
    return _to_activation(ctx, favoured, relevance, share)


def _low_at_most_high(params: Mapping[str, float]) -> str | None:
    if params["low"] > params["high"]:
        return f"needs low <= high (the input box), got low = {params['low']:g}, high = {params['high']:g}"
    return None


@rule("zbox", {LINEAR}, conservation=_LRP, validate=_low_at_most_high,
      params=[Param("low", None, _finite, "the lowest input value"),
              Param("high", None, _finite, "the highest input value"), _EPS])
def zbox(ctx) -> list[str | None]:
    """zB, for an input layer with values in ``[low, high]`` (Montavon et al. 2017, deep Taylor):
    ``R_i = Σ_j (x_i w_ij − l w⁺_ij − h w⁻_ij) / blip(Σ_i (x_i w_ij − l w⁺_ij − h w⁻_ij)) a(y_j)``.

    It computes the input's relevance directly (``quantity relevance`` only). The bias, an input
    fixed at 1 (its box is the point 1), contributes ``b − b⁺ − b⁻ = 0``: it takes nothing under
    every policy (as in Zennit's ZBox, where the bias terms cancel). For inputs inside the box every
    term is ≥ 0, so it conserves up to ε.
    """
    _relevance_only(ctx, "zbox")
    t = ctx.tape
    plain = _weights(ctx, lambda w: w)
    x = _activation(ctx, plain)
    terms = [(x, plain),
             (_filled(t, x, ctx.params["low"]), _weights(ctx, lambda w: -np.maximum(w, 0.0))),
             (_filled(t, x, ctx.params["high"]), _weights(ctx, lambda w: -np.minimum(w, 0.0)))]
    relevance, _ = _modified_gradient(ctx, terms, None, ctx.params["eps"])
    return _to_activation(ctx, plain, relevance, None)


@rule("flat", {LINEAR}, conservation=_classes(relevance={LINEAR: EXACT}))
def flat(ctx) -> list[str | None]:
    """Flat (Lapuschkin et al. 2019; Zennit's Flat): weights and inputs set to 1, so each output's
    number is spread uniformly over its receptive field: ``R_i = Σ_j 1[i ∈ field(j)] a(y_j) / |field(j)|``.

    It computes the input's relevance directly (``quantity relevance`` only). **Decision**: the bias
    takes nothing under every policy (Zennit zeroes it; a weight 1 for the bias would give it a
    share ``1/(n+1)`` that jumps as ``b → 0``).
    """
    _relevance_only(ctx, "flat")
    ones = _weights(ctx, np.ones_like)
    relevance, _ = _modified_gradient(ctx, [(_filled(ctx.tape, _activation(ctx, ones), 1.0), ones)], None, 0.0)
    return _to_activation(ctx, ones, relevance, None)


@rule("wsquare", {LINEAR}, conservation=_classes(relevance={LINEAR: EXACT}), bias_in_denominator=True)
def wsquare(ctx) -> list[str | None]:
    """w² (Montavon et al. 2017, deep Taylor for unbounded inputs): the input is ignored,
    ``R_i = Σ_j w_ij² / (Σ_i w_ij² + b_j²) a(y_j)``.

    It computes the input's relevance directly (``quantity relevance`` only). The bias, an input
    of value 1, enters as ``b²`` and takes ``b_j² a(y_j) / (Σ_i w_ij² + b_j²)``; under ``bias ignore``
    it is left out (Zennit's WSquare squares the bias too and drops its share).
    """
    _relevance_only(ctx, "wsquare")
    t = ctx.tape
    squared = _weights(ctx, np.square)
    ones = _filled(t, _activation(ctx, squared), 1.0)
    relevance, share = _modified_gradient(ctx, [(ones, squared)], _bias(ctx, lambda t, b: t.op("Mul", b, b)), 0.0)
    return _to_activation(ctx, squared, relevance, share)


@rule("guided", {NONLINEAR})
def guided(ctx) -> list[str | None]:
    """Guided backprop (Springenberg et al. 2015), Relu only: ``a(x) = 1[x > 0] · relu(a(y))``: the
    gradient, with negative numbers stopped on the way back as in the deconvnet."""
    if ctx.node.op_type != "Relu":
        raise ctx.fail("rule 'guided' (guided backprop) is defined for Relu only; bind another "
                       f"nonlinear rule to {ctx.node.op_type} nodes (e.g. `{ctx.node.op_type} -> gradient`)")
    grads = ctx.vjp([ctx.tape.op("Relu", ctx.a_out[0])])
    return grads


# The transformer rules (AttnLRP, CP-LRP) live in their own module; importing it registers them.
from . import transformer  # noqa: F401
