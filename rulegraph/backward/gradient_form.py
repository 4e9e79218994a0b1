"""The Gradient × Input form of a relevance rule set (Arras et al. 2025, LXT's "efficient" AttnLRP).

A relevance rule that is ``a(x) = x ⊙ Mᵀ(a(y) / d)`` for some local map ``M`` becomes, with
``a(t) = t ⊙ g(t)`` substituted for every tensor (docs/rules.md, quantities: Hobson's rephrasing
``a_importance = a_relevance / x``), ``g(x) = Mᵀ(g(y) ⊙ y / d)``, and with ``d = y`` (the bias in the
denominator: ``bias blame``, ``total`` or ``absorb``) simply ``g(x) = Mᵀ g(y)``: a plain backward pass
with modified local Jacobians. The pass then carries ``g`` (the importance quantity) and the
attribution is ``x ⊙ g(x)``, at the inputs and at every ``at=`` tensor, equal to the relevance the
rules give at **ε = 0**: the form drops each rule's ``ε`` stabilizer, and with it the division by
``blip(y)`` and the multiplication by ``x`` of every layer. Bias shares are ``b ⊙ g(y)``, the rules'
``b ⊙ a(y) / y``.

The modified Jacobians, per rule (``GRADIENT_FORMS``):

- ``normalized`` (LRP-ε on linear ops): the gradient; under ``bias ignore`` ``Lᵀ(g ⊙ y / z)``;
- ``ignore`` (nonlinear, AttnLRP's identity rule): ``f(x) / x`` (0 where ``x = 0``, where the rules
  at ε = 0 pass nothing on either);
- ``gradient`` on max and route ops: the gradient (a selection: ``x ⊙ Lᵀg = Lᵀ(y ⊙ g)``);
- ``uniform`` (products): each factor's gradient times ``1/n`` for ``n`` factors (a divisor's with
  its sign flipped: the reciprocal passes its number as ``ignore`` does); a factor held constant
  (a Softmax output, a gate) gets nothing and the other the full gradient, as ``gate`` does;
- ``softmax_taylor``: the Softmax's own Jacobian ``y ⊙ (g − Σ y ⊙ g)`` (the ε-rule on its
  linearisation, remainder blamed, is the gradient); under ``bias ignore`` ``g`` is scaled by
  ``y / Σ_i J_ji x_i`` first;
- ``layernorm_linear``: the gradient with ``γ/σ`` held constant, ``c ⊙ g − mean(c ⊙ g)`` (RMS: no
  mean; an L2 normalization: ``c ⊙ g``, ``c = 1/max(‖x‖, ε)``); the Skip forms pass it to each summed input;
- ``cp_attention``: ``Pᵀ g`` to the values, nothing to Q, K and the mask;
- ``block``: nothing.

Every other rule (the LRP weight rules, radial, repeat, ``gradient`` on linear, nonlinear, bilinear
or normalizing ops, the difference rules) has no such form: ``x ⊙ Mᵀ`` with a constant ``M`` is not
what it computes. Compiling with it is refused, naming the node and the rule.
"""

from __future__ import annotations

from collections.abc import Callable

from . import basic
from .attention import attention_parts, heads_of, present_back, unrepeat
from .contrib import NORMS, norm_axes, norm_stats, norm_sum
from .normalization import norm_form
from .transformer import (
    VIEWED_NORMS,
    _layernorm_has_bias,
    _layernorm_inputs,
    _product,
    held_op_types,
    l2_factor,
    norm_biases,
    produced_by,
)
from .vjp import _layer_norm_stats, _reduce_where_one, layer_norm_axes

STANDARD, GRADIENT_X_INPUT = "standard", "gradient-x-input"
#: the forms a relevance rule set compiles in: its rules as written, or their Gradient × Input form
FORMS = (STANDARD, GRADIENT_X_INPUT)


def _scaled(ctx, g: str, d: str | None) -> str:
    """``g ⊙ y / d`` (0 where ``d = 0``), or ``g`` itself where the rule's denominator is ``y``."""
    t = ctx.tape
    return g if d is None else t.safe_div(t.op("Mul", g, ctx.y), d)


def _normalized(ctx) -> list[str | None]:
    """``normalized``: ``g(x) = Lᵀ g(y)``; the bias takes ``b ⊙ g(y)``; under ``bias ignore``
    ``g(x) = Lᵀ(g ⊙ y / z)``, ``z = y − b``."""
    t, bias = ctx.tape, ctx.linear_bias()
    ignore = bias is not None and ctx.bias_policy == "ignore"
    s = _scaled(ctx, ctx.a_out[0], t.op("Sub", ctx.y, bias) if ignore else None)
    grads = ctx.vjp([s] + [None] * (len(ctx.node.outputs) - 1))
    if bias is not None and not ignore:
        ctx.report_bias(t.op("Mul", bias, s))
    return grads


def _ignore(ctx) -> list[str | None]:
    """``ignore``: ``g(x) = g(y) ⊙ f(x) / x``, 0 where ``x = 0``."""
    t = ctx.tape
    x, zero = ctx.x, t.scalar(0.0)
    ratio = t.op("Where", t.op("Equal", x, zero), zero, t.op("Div", ctx.y, x))
    return [t.op("Mul", ctx.a_out[0], ratio)] + [None] * (len(ctx.node.inputs) - 1)


def _keep(ctx, index: int) -> list[str | None]:
    """Operand ``index`` takes the full gradient, the other (held constant) nothing."""
    if ctx.node.op_type == "Div" and index == 1:
        raise ctx.fail("a quotient a/b is not linear in its divisor b: hold the divisor constant (keep = 0)")
    out: list[str | None] = [None] * len(ctx.node.inputs)
    out[index] = ctx.vjp([ctx.a_out[0]] + [None] * (len(ctx.node.outputs) - 1))[index]
    return out


def _uniform(ctx) -> list[str | None]:
    """``uniform``: each active factor's gradient ``/ n``; a Div's divisor with its sign flipped; an
    operand held constant (``softmax_constant``, ``gate_constant``, ``norm_constant``) as ``gate`` does."""
    _product(ctx, "uniform")
    held = held_op_types(ctx.params)
    if held:
        constant = [produced_by(ctx.graph, x, held) for x in ctx.node.inputs[:2]]
        if constant.count(True) == 1:
            return _keep(ctx, constant.index(False))
    t = ctx.tape
    n = sum(ctx.active) if ctx.node.op_type in ("MatMul", "Einsum") else 2
    grads = ctx.vjp([t.op("Mul", ctx.a_out[0], t.scalar(1.0 / n))])
    if ctx.node.op_type == "Div" and grads[1] is not None:
        grads[1] = t.op("Neg", grads[1])
    return grads


def _gate(ctx) -> list[str | None]:
    _product(ctx, "gate")
    return _keep(ctx, int(ctx.params["keep"]))


def _block(ctx) -> list[str | None]:
    return [None] * len(ctx.node.inputs)


def _softmax_taylor(ctx) -> list[str | None]:
    """``softmax_taylor``: ``g(x) = y ⊙ (s − Σ y ⊙ s)`` with ``s = g`` (bias counted: the remainder
    ``b = y − Σ_i J_ji x_i`` takes ``b ⊙ g``), or ``s = g ⊙ y / Σ_i J_ji x_i`` under ``bias ignore``."""
    if ctx.node.op_type != "Softmax":
        raise ctx.fail(f"rule 'softmax_taylor' is defined for Softmax, not {ctx.node.op_type}")
    t = ctx.tape
    axis = [ctx.node.attr("axis", -1)]
    x, y, zero = ctx.x, ctx.y, t.scalar(0.0)
    x = t.op("Where", t.op("Equal", y, zero), zero, x)  # x = −∞ where y = 0: keep it out of the products
    linear = t.op("Mul", y, t.op("Sub", x, t.reduce_sum(t.op("Mul", y, x), axis, keepdims=True)))
    ignore = ctx.bias_policy == "ignore"
    s = _scaled(ctx, ctx.a_out[0], linear if ignore else None)
    sy = t.op("Mul", s, y)
    if not ignore:
        ctx.report_bias(t.op("Mul", t.op("Sub", y, linear), s))
    return [t.op("Sub", sy, t.op("Mul", y, t.reduce_sum(sy, axis, keepdims=True)))]


def _layernorm_linear(ctx) -> list[str | None]:
    """``layernorm_linear``: ``g(x) = Mᵀ s``, ``Mᵀs = c ⊙ s − mean(c ⊙ s)``, ``c = γ/σ`` constant,
    ``s = g`` (β takes ``β ⊙ g``), or ``s = g ⊙ y / (y − β)`` under ``bias ignore``."""
    if ctx.node.op_type == "LpNormalization":   # y = x ⊙ c: g(x) = c ⊙ g
        return [ctx.tape.op("Mul", _scaled(ctx, ctx.a_out[0], None), l2_factor(ctx))]
    if ctx.node.op_type in VIEWED_NORMS:
        return _viewed_norm(ctx)
    if ctx.node.op_type in NORMS:
        return _skip_norm(ctx)
    if ctx.node.op_type != "LayerNormalization":
        raise ctx.fail(f"rule 'layernorm_linear' is defined for LayerNormalization, not {ctx.node.op_type}")
    t = ctx.tape
    axes = layer_norm_axes(ctx)
    _, inv_std = _layer_norm_stats(ctx, axes)
    scale, beta = _layernorm_inputs(ctx)
    ignore = beta is not None and ctx.bias_policy == "ignore"
    s = _scaled(ctx, ctx.a_out[0], t.op("Sub", ctx.y, beta) if ignore else None)
    cs = t.op("Mul", s, inv_std if scale is None else t.op("Mul", inv_std, scale))
    if beta is not None and not ignore:
        ctx.report_bias(t.op("Mul", beta, s))
    return [t.op("Sub", cs, t.reduce("ReduceMean", cs, axes))] + [None] * (len(ctx.node.inputs) - 1)


def _viewed_norm(ctx) -> list[str | None]:
    """Instance, Group and RMS normalization through their view (``normalization.norm_form``)."""
    t = ctx.tape
    form = norm_form(ctx)
    _, inv_std = form.stats(t, form.to_view(t, ctx.x))
    beta = form.bias if _layernorm_has_bias(ctx) else None
    ignore = beta is not None and ctx.bias_policy == "ignore"
    d = None
    if ignore:
        d = t.op("Sub", ctx.y, form.back(t, t.op("Add", form.to_view(t, t.zeros_like(ctx.y)), beta), ctx.y))
    sv = form.to_view(t, _scaled(ctx, ctx.a_out[0], d))
    cs = t.op("Mul", sv if form.scale is None else t.op("Mul", sv, form.scale), inv_std)
    if form.centered:
        cs = t.op("Sub", cs, t.reduce("ReduceMean", cs, form.axes))
    if beta is not None and not ignore:
        ctx.report_bias(form.back(t, t.op("Mul", sv, beta), ctx.y))
    return [form.back(t, cs, ctx.x)] + [None] * (len(ctx.node.inputs) - 1)


def _skip_norm(ctx) -> list[str | None]:
    """onnxruntime's Skip/Simplified LayerNormalization: ``T = Mᵀ s`` (plus the sum output's own
    ``g``) to every summed input, ``β`` taking ``β ⊙ s`` and the bias ``b ⊙ T``."""
    t, form = ctx.tape, NORMS[ctx.node.op_type]
    axes = norm_axes(ctx)
    total_in = norm_sum(ctx)
    _, inv_std = norm_stats(ctx, total_in, axes)
    beta, bias = (ctx.node.inputs[i] if v is not None and v.any() else None
                  for i, v in zip((form.beta, form.bias), norm_biases(ctx)))
    c = t.op("Mul", inv_std, ctx.node.inputs[form.gamma])
    ignore = ctx.bias_policy == "ignore"

    def m(b: str) -> str:  # M b of the 1-D bias b: the Skip forms normalize over the last axis, b's only one
        return t.op("Mul", c, t.op("Sub", b, t.reduce("ReduceMean", b, [-1])) if form.centered else b)

    transposed = []
    if ctx.a_out[0] is not None:
        d = None
        if ignore and (beta or bias):
            d = t.op("Sub", ctx.y, t.sum([x for x in (beta, bias and m(bias)) if x]))
        s = _scaled(ctx, ctx.a_out[0], d)
        if beta and not ignore:
            ctx.report_bias(t.op("Mul", beta, s))
        cs = t.op("Mul", s, c)
        transposed.append(t.op("Sub", cs, t.reduce("ReduceMean", cs, axes)) if form.centered else cs)
    if form.sum_output is not None and form.sum_output < len(ctx.a_out) and ctx.a_out[form.sum_output]:
        g_sum = ctx.a_out[form.sum_output]
        if bias and ignore:
            g_sum = t.safe_div(t.op("Mul", g_sum, total_in), t.op("Sub", total_in, bias))
        transposed.append(g_sum)
    out: list[str | None] = [None] * len(ctx.node.inputs)
    if not transposed:
        return out
    total = t.sum(transposed)
    if bias and not ignore:
        ctx.report_bias(t.op("Mul", bias, total))
    for i in form.summed:
        if ctx.active[i]:
            x = ctx.node.inputs[i]
            out[i] = t.reshape_like(_reduce_where_one(t, total, x), x)
    return out


def _cp_attention(ctx) -> list[str | None]:
    """``cp_attention``: the attention weights ``P`` constant, ``g(V) = Pᵀ g(Y)`` per head (repeated
    heads summed back, the past values their part); Q, K and the mask nothing."""
    if ctx.node.op_type != "Attention":
        raise ctx.fail(f"rule 'cp_attention' is defined for Attention, not {ctx.node.op_type}")
    if any(a is not None for a in ctx.a_out[1:]):
        raise ctx.fail("rule 'cp_attention' explains the Y output of Attention; its present_key, "
                       "present_value or qk_matmul_output output feeds the explained output too (bind "
                       "Attention -> gradient)")
    t = ctx.tape
    parts = attention_parts(ctx)
    weights_t = t.op("Transpose", parts.p, perm=[0, 1, 3, 2])
    d_v = unrepeat(t, t.op("MatMul", weights_t, heads_of(ctx, parts, ctx.a_out[0])), parts.repeats, parts.v)
    past, new = present_back(ctx, parts, d_v, 2)
    out: list[str | None] = [None] * len(ctx.node.inputs)
    out[2] = new if ctx.active[2] else None
    if past is not None and len(ctx.active) > 5 and ctx.active[5]:
        out[5] = past
    return out


#: relevance rule -> the emitter of its Gradient × Input form (module docstring); the pass carries
#: the importance number ``g`` and every ε is 0
GRADIENT_FORMS: dict[str, Callable] = {
    "normalized": _normalized,
    "ignore": _ignore,
    "gradient": basic.gradient,   # on max and route ops only (compile/form.py refuses the rest)
    "uniform": _uniform,
    "gate": _gate,
    "block": _block,
    "softmax_taylor": _softmax_taylor,
    "layernorm_linear": _layernorm_linear,
    "cp_attention": _cp_attention,
}
