"""The LRP weight rules (docs/rules.md, the rules): zplus, alpha_beta, gamma, zbox, flat, wsquare (LRP-ε is
``normalized`` in ``basic.py``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ..graph.kinds import LINEAR
from ..lang.floats import FLOAT32
from .table import APPROXIMATE, EXACT, NONE, Param, _classes, _nonnegative, _stabilizer, at_most, rule

# --------------------------------------------------------------------------------------------------
# the LRP weight rules (zplus, alpha_beta, gamma, zbox, flat, wsquare) and guided backprop
#
# Each weight rule is a modified gradient (Zennit's idea, STYLE.md): variants L_k of the linear op
# with modified constant weights (``ctx.variant``), each applied to a modified input in_k(x):
#
#     z = Σ_k L_k(in_k(x)) + b_mod,    s = a(y) / blip(z),    a(x) = Σ_k in_k(x) ⊙ L_kᵀ(s)
#
# The bias is an extra input of value 1 with weight b_mod (docs/rules.md, bias policies): it sits in the
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


def _filled(ctx, like: str, value: float) -> str:
    """A tensor shaped like ``like`` holding ``value`` everywhere: the constant inputs of flat,
    wsquare and zB. For a convolution one image of it (axis 0, the batch, of size 1): the same for
    every image, so the convolution runs once and its output broadcasts over the batch. (A Gemm's or
    MatMul's axis 0 may be the one it sums over.)"""
    t = ctx.tape
    shape = t.shape(like)
    if ctx.node.op_type == "Conv":
        shape = t.op("Concat", t.ints([1]), t.shape(like, start=1), axis=0)
    return t.op("Expand", t.scalar(value), shape)


def _modified_gradient(ctx, terms, bias: str | None, eps: float) -> tuple[str, str | None]:
    """``terms`` = [(in_k(x), L_k)]: returns ``(Σ_k in_k(x) ⊙ L_kᵀ(s), b_mod ⊙ s or None)``."""
    t = ctx.tape
    z = t.sum([variant.forward(x) for x, variant in terms] + ([bias] if bias is not None else []))
    s = _quotient(ctx, z, eps)
    relevance = t.sum([t.op("Mul", x, variant.transpose(s)) for x, variant in terms])
    return relevance, None if bias is None else t.op("Mul", bias, s)


def _quotient(ctx, z: str, eps: float) -> str:
    """``a(y) / blip(z)``; where ``z = 0`` at ε = 0 (no contribution at all) the output's number
    is lost, as in normalized."""
    t = ctx.tape
    return t.op("Div", ctx.a_out[0], t.blip(z, eps)) if eps > 0 else t.safe_div(ctx.a_out[0], z)


def _to_activation(ctx, variant, relevance: str, share: str | None) -> list[str | None]:
    """One entry per node input: the relevance for the activation operand; reports the bias share."""
    if share is not None:
        ctx.report_bias(share)
    out: list[str | None] = [None] * len(ctx.node.inputs)
    out[variant.activation_index] = relevance
    return out


def _activation(ctx, variant) -> str:
    return ctx.node.inputs[variant.activation_index]


#: ops whose output is ≥ 0 where their inputs are (pooling a ReLU's output, moving it, joining such)
_KEEP_SIGN = frozenset({"MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Flatten",
                        "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze"})


def _known_nonnegative(ctx, x: str) -> bool:
    """Is ``x`` a ReLU's output, or one pooled, moved or joined by ``_KEEP_SIGN`` ops? Then ``x⁺ = x``
    and ``x⁻ = 0``: the sign split of zplus and alpha_beta is skipped, and the terms of ``x⁻``, which
    are 0, are not computed."""
    node = ctx.graph.producer.get(x)
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Relu":
        return True
    data = node.inputs if node.op_type == "Concat" else node.inputs[:1]   # a constant part is not known ≥ 0
    return node.op_type in _KEEP_SIGN and all(_known_nonnegative(ctx, i) for i in data)


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
    x = _activation(ctx, positive)
    x = x if _known_nonnegative(ctx, x) else ctx.tape.op("Relu", x)
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
    if _known_nonnegative(ctx, x):   # x⁻ = 0: its terms are 0
        x_pos, x_neg = x, None
    else:
        x_pos, x_neg = t.op("Relu", x), t.op("Min", x, t.scalar(0.0))

    def terms(first, second):
        return [(x_pos, first)] + ([(x_neg, second)] if x_neg is not None else [])

    r_pos, b_pos = _modified_gradient(ctx, terms(positive, negative), _bias(ctx, _positive_bias), eps)
    relevance = t.op("Mul", t.scalar(alpha), r_pos)
    share = None if b_pos is None else t.op("Mul", t.scalar(alpha), b_pos)
    if beta > 0:
        r_neg, b_neg = _modified_gradient(ctx, terms(negative, positive), _bias(ctx, _negative_bias), eps)
        relevance = t.op("Sub", relevance, t.op("Mul", t.scalar(beta), r_neg))
        if share is not None:
            share = t.op("Sub", share, t.op("Mul", t.scalar(beta), b_neg))
    return _to_activation(ctx, positive, relevance, share)


#: γ ≤ 2²⁴: beyond, a negative weight vanishes next to (1 + γ)·w⁺ in float32 and the rule is zplus.
GAMMA_MAX = float(2**24)


_gamma = at_most(GAMMA_MAX, f"2**24 = {GAMMA_MAX:g}", "beyond, negative weights vanish next to (1 + γ)·w⁺ in "
                 "float32; use the rule zplus")


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

    The pass computes it as ``(x − l) ⊙ W⁺ᵀs + (x − h) ⊙ W⁻ᵀs`` (``W = W⁺ + W⁻``): two transposed
    ops instead of three, the box's corners ``l`` and ``h`` through the op on one row.
    """
    _relevance_only(ctx, "zbox")
    t = ctx.tape
    low, high = ctx.params["low"], ctx.params["high"]
    plain, positive, negative = (_weights(ctx, lambda w: w), _weights(ctx, _positive_part),
                                 _weights(ctx, _negative_part))
    x = _activation(ctx, plain)
    corners = t.op("Add", positive.forward(_filled(ctx, x, low)), negative.forward(_filled(ctx, x, high)))
    s = _quotient(ctx, t.op("Sub", plain.forward(x), corners), ctx.params["eps"])
    relevance = t.op("Add", t.op("Mul", t.op("Sub", x, t.scalar(low)), positive.transpose(s)),
                     t.op("Mul", t.op("Sub", x, t.scalar(high)), negative.transpose(s)))
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
    relevance, _ = _modified_gradient(ctx, [(_filled(ctx, _activation(ctx, ones), 1.0), ones)], None, 0.0)
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
    ones = _filled(ctx, _activation(ctx, squared), 1.0)
    relevance, share = _modified_gradient(ctx, [(ones, squared)], _bias(ctx, lambda t, b: t.op("Mul", b, b)), 0.0)
    return _to_activation(ctx, squared, relevance, share)
