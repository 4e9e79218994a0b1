"""Transformer rules: relevance through products of activations (attention) and through normalizing
ops, for the ``relevance`` quantity.

Sources: Achtibat et al. 2024, "AttnLRP: Attention-aware layer-wise relevance propagation for
transformers" (ICML; the uniform rule for products, the Softmax rule, LayerNorm as a linear map);
Ali et al. 2022, "XAI for transformers: better explanations through conservative propagation"
(ICML; CP-LRP: the attention weights and LayerNorm's normalising factor held constant).

- ``uniform``: a product of two activations shares its relevance equally between its factors;
  on MatMul first over the product terms by the ε-rule. With ``softmax_constant = 1`` an operand
  computed by a Softmax (attention weights) is held constant instead (CP-LRP): the other operand
  takes everything.
- ``gate``: one operand of a product held constant, the other takes everything (CP-LRP's rule for
  ``softmax(QKᵀ)·V``; a squeeze-excitation gate ``x·σ(·)``).
- ``softmax_taylor``: AttnLRP's Softmax rule, the ε-rule on the Softmax's linearisation at its
  input, with the remainder blamed as a bias.
- ``block``: the input gets nothing.
- ``layernorm_linear``: LayerNormalization with ``γ/σ`` held constant is a linear map of ``x``;
  the ε-rule on that map, ``β`` blamed as a bias (Instance, Group and RMS normalization likewise).
- ``cp_attention``: the ONNX Attention op with its attention weights held constant (CP-LRP): the
  values take all the relevance by the ε-rule.

Every rule here computes relevance directly; under the importance or difference quantity their
numbers mean nothing, and the checker predicts no conservation there.
"""

from __future__ import annotations

from ..graph.kinds import BILINEAR, NORMALIZING
from ..graph.read import Graph
from .table import APPROXIMATE, EXACT, LEAKS_BIAS, Param, _classes, _stabilizer, rule
from .attention import attention_parts, heads_of, present_back, unrepeat
from .contrib import NORMS, norm_axes, norm_stats, norm_sum
from .normalization import lp_norm, norm_form
from .vjp import _layer_norm_stats, _reduce_where_one, layer_norm_axes, unbroadcast

_EPS = Param("eps", 1e-6, _stabilizer, "the stabilizer epsilon")


def _zero_or_one(v: float) -> str | None:
    return None if v in (0.0, 1.0) else f"must be 0 or 1, got {v:g}"


def _relevance(ctx, s: str, index: int) -> str:
    """``x_k ⊙ VJP_k(s)`` for operand ``k``: the ε-rule's share of operand ``k``, the others fixed."""
    t = ctx.tape
    grads = ctx.vjp([s] + [None] * (len(ctx.node.outputs) - 1))
    return t.op("Mul", ctx.node.inputs[index], grads[index])


def _normalized_output(ctx) -> str:
    """``s = a(y) / blip(y)`` (ε > 0), or ``a(y) / y`` with 0 where ``y = 0`` (ε = 0)."""
    t, eps = ctx.tape, ctx.params["eps"]
    y, a = ctx.node.outputs[0], ctx.a_out[0]
    return t.op("Div", a, t.blip(y, eps)) if eps > 0 else t.safe_div(a, y)


def produced_by(graph: Graph, tensor: str, op_types: frozenset[str]) -> bool:
    """Is ``tensor`` computed from outputs of ``op_types`` only: such an output, moved by route ops
    (Reshape, ...), or the output of any op whose every activation input is such a tensor (Mixtral's
    router: the top-k softmax weights divided by their sum)? A walk over the producers, each tensor
    decided once; it stops at the first input that is not."""
    known: dict[str, bool] = {}
    stack = [tensor]
    while stack:
        name = stack[-1]
        node = graph.producer.get(name)
        if node is None or node.op_type in op_types:
            known[name] = node is not None
            stack.pop()
            continue
        active = [i for i in node.inputs if i in graph.active]
        pending = [i for i in active if i not in known]
        if not active or any(known.get(i) is False for i in active):
            known[name] = False
        elif pending:
            stack.append(pending[0])
            continue
        else:
            known[name] = True
        stack.pop()
    return known[tensor]


SOFTMAX = frozenset({"Softmax"})
GATES = frozenset({"Sigmoid", "HardSigmoid"})  # squeeze-excitation gates x·σ(s(x))
#: norms of an activation: SwinV2's cosine attention q / ‖q‖, ConvNeXtV2's response normalization
NORMS_HELD = frozenset({"ReduceL1", "ReduceL2", "ReduceSumSquare"})
#: exponentials: a hand-written softmax exp(x − max) / Σ exp (RWKV's WKV), a state-space decay exp(ΔA)
EXPS = frozenset({"Exp"})
#: the uniform rule's parameters that hold an operand constant, and the op types each one holds
HOLDS = {"softmax_constant": SOFTMAX, "gate_constant": GATES, "norm_constant": NORMS_HELD,
         "exp_constant": EXPS}


def held_op_types(params) -> frozenset[str]:
    """The op types whose outputs (and what is computed from them only) ``uniform`` holds constant."""
    return frozenset().union(*(ops for name, ops in HOLDS.items() if params.get(name)))


def held_operands(graph: Graph, node, rule_call) -> set[int]:
    """The operands of a product ``node`` that ``rule_call`` (a ``uniform`` with a hold, or ``gate``)
    holds constant: they get no relevance, nor does what only they read (the Softmax of a ResNeSt
    split attention weighing its branches, as a Sigmoid weighs a squeeze-excitation gate)."""
    if node.op_type not in ("Mul", "Div", "MatMul", "Einsum") or len(node.inputs) < 2:
        return set()
    if rule_call.name == "gate":
        keep = rule_call.params.get("keep")
        return set() if keep is None else {1 - int(keep)}
    if rule_call.name != "uniform":
        return set()
    held = held_op_types(rule_call.params)
    constant = [produced_by(graph, x, held) for x in node.inputs[:2]] if held else []
    return {constant.index(True)} if constant.count(True) == 1 else set()


def _product(ctx, name: str) -> None:
    if ctx.node.op_type not in ("Mul", "Div", "MatMul", "Einsum"):
        raise ctx.fail(f"rule '{name}' is defined for Mul, Div, MatMul and Einsum of activations, "
                       f"not {ctx.node.op_type}")


def _keep(ctx, index: int) -> list[str | None]:
    """Operand ``index`` takes all the relevance by the ε-rule with the other operand held constant."""
    if ctx.node.op_type == "Div" and index == 1:
        raise ctx.fail("a quotient a/b is not linear in its divisor b: hold the divisor constant (keep = 0)")
    out: list[str | None] = [None] * len(ctx.node.inputs)
    out[index] = _relevance(ctx, _normalized_output(ctx), index)
    return out


def _uniform_conservation(op_type: str, params) -> str:
    held = held_op_types(params)
    return EXACT if op_type in ("Mul", "Div") and not held else APPROXIMATE


@rule("uniform", {BILINEAR}, conservation=_classes(relevance={BILINEAR: _uniform_conservation}),
      params=[_EPS, Param("softmax_constant", 0.0, _zero_or_one,
                          "1: an operand computed by a Softmax is held constant (CP-LRP)"),
              Param("gate_constant", 0.0, _zero_or_one,
                    "1: an operand computed by a Sigmoid or HardSigmoid (a gate) is held constant"),
              Param("norm_constant", 0.0, _zero_or_one,
                    "1: an operand computed from norms (ReduceL1, ReduceL2, ReduceSumSquare) is held "
                    "constant"),
              Param("exp_constant", 0.0, _zero_or_one,
                    "1: an operand computed from Exp outputs (a hand-written softmax's weights, a "
                    "state-space decay) is held constant")])
def uniform(ctx) -> list[str | None]:
    """The uniform rule for products of two activations (Achtibat et al. 2024, AttnLRP).

    Elementwise ``y = a ⊙ b`` (Mul): each factor gets half, ``a(a) = a(b) = ½ a(y)``, summed over
    the axes a factor was broadcast along; conservative exactly. **Decision**: a quotient ``a / b``
    (Div) is the product ``a ⊙ (1/b)`` with the reciprocal passing its number unchanged, as the
    ignore rule does, so ``b`` gets half too.

    MatMul ``y_ij = Σ_k A_ik B_kj``: the ε-rule over the sum gives each term
    ``A_ik B_kj / blip(y_ij) · a(y_ij)``, which its two factors share half and half:
    ``a(A) = ½ A ⊙ (s Bᵀ)``, ``a(B) = ½ B ⊙ (Aᵀ s)``, ``s = a(y) / blip(y)``; conservative up to ε.
    An Einsum of ``n`` active operands (multilinear, so ``Σ xₖ ⊙ VJPₖ(s) = s ⊙ y`` for each) gives each
    ``a(xₖ) = xₖ ⊙ VJPₖ(s) / n``; a constant operand gets nothing.

    ``softmax_constant = 1``: where one operand is computed from Softmax outputs only (the attention
    weights of ``softmax(QKᵀ)·V`` through route ops; a mixture-of-experts router's top-k weights
    renormalized by their sum), that operand is held constant and the other takes all
    the relevance by the ε-rule, as ``gate`` does (CP-LRP, Ali et al. 2022); the Softmax, and Q and
    K behind it, get nothing. ``gate_constant = 1`` does the same for an operand computed by a
    Sigmoid or HardSigmoid (the squeeze-excitation gate of MobileNetV3 and EfficientNet), and
    ``norm_constant = 1`` for an operand computed from norms of an activation (SwinV2's cosine
    attention ``q / ‖q‖``, ConvNeXtV2's ``x ⊙ ‖x‖ / mean ‖x‖``): the normalizing factor is a constant,
    as AttnLRP holds LayerNorm's ``σ``. ``exp_constant = 1`` holds an operand computed from Exp
    outputs only: the weights ``exp(x − m) / Σ exp(x − m)`` of a softmax written out by hand (RWKV's
    WKV, whose running numerator and denominator are sums of such products), as CP-LRP holds a
    Softmax's, and a state-space model's decay ``exp(ΔA)``, which MambaLRP (Jafari et al. 2024,
    "MambaLRP: Explaining selective state space sequence models", NeurIPS) holds constant so that
    the recurrence is linear in its state; the exponentials and what computed their arguments get
    nothing.
    """
    _product(ctx, "uniform")
    held = held_op_types(ctx.params)
    if held:
        constant = [produced_by(ctx.graph, x, held) for x in ctx.node.inputs[:2]]
        if constant.count(True) == 1:
            return _keep(ctx, constant.index(False))
    t = ctx.tape
    if ctx.node.op_type in ("MatMul", "Einsum"):
        share = 1.0 / sum(ctx.active)
        s = t.op("Mul", _normalized_output(ctx), t.scalar(share))
        grads = ctx.vjp([s])
        return [None if g is None else t.op("Mul", x, g) for x, g in zip(ctx.node.inputs, grads)]
    half = t.op("Mul", ctx.a_out[0], t.scalar(0.5))
    return [unbroadcast(ctx, half, ctx.y, x) for x in ctx.node.inputs]


@rule("gate", {BILINEAR}, conservation=_classes(relevance={BILINEAR: APPROXIMATE}),
      params=[Param("keep", None, _zero_or_one, "the operand (0 or 1) that takes all the relevance"), _EPS])
def gate(ctx) -> list[str | None]:
    """One factor of a product held constant (Ali et al. 2022, CP-LRP): operand ``keep`` takes all the
    relevance by the ε-rule of the map that is linear in it, ``a(x_k) = x_k ⊙ VJP_k(a(y) / blip(y))``;
    the other operand gets nothing. Conservative up to ε.

    For ``softmax(QKᵀ)·V`` (attention weights constant: ``keep = 1``), and for gates such as the
    squeeze-excitation ``x·σ(·)`` (``keep`` = the operand that is not the gate). A quotient ``a/b``
    keeps only its numerator (``keep = 0``).
    """
    _product(ctx, "gate")
    return _keep(ctx, int(ctx.params["keep"]))


@rule("block", {NORMALIZING})
def block(ctx) -> list[str | None]:
    """``a(x) = 0``: the node passes nothing back; the relevance that reaches it is lost.

    Under CP-LRP (``uniform(softmax_constant = 1)`` or ``gate``) the attention Softmax is the constant
    side of its product, so nothing reaches it and nothing is lost.
    """
    return [None] * len(ctx.node.inputs)


def _softmax_has_bias(ctx) -> bool:
    return True


@rule("softmax_taylor", {NORMALIZING}, params=[_EPS], bias_in_denominator=True, has_bias=_softmax_has_bias,
      conservation=_classes(relevance={NORMALIZING: LEAKS_BIAS}), op_types={"Softmax"})
def softmax_taylor(ctx) -> list[str | None]:
    """AttnLRP's Softmax rule (Achtibat et al. 2024): the ε-rule on the Softmax's first-order
    Taylor expansion at its input ``x``, ``y_j = Σ_i J_ji x_i + b_j`` with ``J = ∂y/∂x``:

    ``a(x_i) = x_i Σ_j J_ji a(y_j) / blip(y_j) = x_i (a(y_i) − y_i Σ_j a(y_j))`` (ε → 0),

    over the Softmax's axis. The remainder ``b_j = y_j (1 − x_j + Σ_i y_i x_i)`` is a bias and takes
    ``b_j a(y_j) / blip(y_j)``, so with the bias counted it conserves up to ε. Under ``bias ignore``
    the denominator is ``Σ_i J_ji x_i`` instead. Where ``y = 0`` (a masked position, ``x = −∞``) the
    input gets nothing.
    """
    if ctx.node.op_type != "Softmax":
        raise ctx.fail(f"rule 'softmax_taylor' is defined for Softmax, not {ctx.node.op_type}")
    t = ctx.tape
    axis = [ctx.node.attr("axis", -1)]
    x, y, a = ctx.x, ctx.y, ctx.a_out[0]
    zero = t.scalar(0.0)
    x = t.op("Where", t.op("Equal", y, zero), zero, x)  # x = −∞ where y = 0: keep it out of the products
    mean = t.reduce_sum(t.op("Mul", y, x), axis, keepdims=True)
    linear = t.op("Mul", y, t.op("Sub", x, mean))  # Σ_i J_ji x_i
    bias = t.op("Sub", y, linear)
    d = linear if ctx.bias_policy == "ignore" else y
    eps = ctx.params["eps"]
    s = t.op("Div", a, t.blip(d, eps)) if eps > 0 else t.safe_div(a, d)
    sy = t.op("Mul", s, y)
    relevance = t.op("Mul", x, t.op("Sub", sy, t.op("Mul", y, t.reduce_sum(sy, axis, keepdims=True))))
    if ctx.bias_policy != "ignore":
        ctx.report_bias(t.op("Mul", bias, s))
    return [relevance]


def _layernorm_inputs(ctx) -> tuple[str | None, str | None]:
    """(γ, β) of a LayerNormalization, native or fused, as tensor names (None where absent or zero)."""
    inputs = ctx.node.inputs
    scale = inputs[1] if len(inputs) > 1 and inputs[1] else None
    beta = ctx.const(2)
    return scale, (inputs[2] if beta is not None and beta.any() else None)


def _layernorm_has_bias(ctx) -> bool:
    if ctx.node.op_type in NORMS:
        return any(v is not None and v.any() for v in norm_biases(ctx))
    return _layernorm_inputs(ctx)[1] is not None


def l2_factor(ctx) -> str:
    """``c = 1/‖x‖_p`` of an LpNormalization: for a fused F.normalize the reciprocal of its Div's
    divisor ``max(‖x‖₂, ε)``, a tensor of the forward pass."""
    if ctx.node.members:
        return ctx.tape.op("Reciprocal", ctx.node.members[-1].inputs[1])
    return ctx.tape.op("Reciprocal", lp_norm(ctx))


#: the normalizations ``layernorm_linear`` reads through their view (``normalization.norm_form``)
VIEWED_NORMS = frozenset({"InstanceNormalization", "GroupNormalization", "RMSNormalization",
                          "MeanVarianceNormalization"})


@rule("layernorm_linear", {NORMALIZING}, params=[_EPS], bias_in_denominator=True,
      has_bias=_layernorm_has_bias, conservation=_classes(relevance={NORMALIZING: APPROXIMATE}),
      op_types={"LayerNormalization", "LpNormalization", *VIEWED_NORMS, *NORMS})
def layernorm_linear(ctx) -> list[str | None]:
    """LayerNormalization with its normalising factor held constant (Ali et al. 2022, the LN-rule;
    Achtibat et al. 2024): ``y = (x − mean(x)) ⊙ c + β`` with ``c = γ / σ(x)`` constant is the linear
    map ``z = M x`` (centering over the normalized axes, then ``c``) plus the bias ``β``; the ε-rule on it:

    ``a(x) = x ⊙ Mᵀ(a(y) / blip(d))``, ``Mᵀg = c ⊙ g − mean(c ⊙ g)``,

    with ``d = y`` (``β`` takes ``β ⊙ a(y) / blip(d)``, reported under ``bias blame``) or ``d = z``
    under ``bias ignore``. Conservative up to ε with the bias counted. Native and fused (decomposed)
    LayerNorms alike.

    Instance, Group and RMS normalization likewise, through their view (``normalization.py``):
    ``Mᵀg = unview(v(γ ⊙ g)/σ − mean_A(v(γ ⊙ g)/σ))``, without the mean for RMS (not centered);
    MeanVarianceNormalization over its axes, ``c = 1/(σ + ε)`` (no γ, no β).
    An L2 normalization ``y = x ⊙ c``, ``c = 1/max(‖x‖, ε)`` (fused F.normalize): ``Mᵀg = c ⊙ g``.
    """
    if ctx.node.op_type == "LpNormalization":
        t = ctx.tape
        eps = ctx.params["eps"]
        s = t.op("Div", ctx.a_out[0], t.blip(ctx.y, eps)) if eps > 0 else t.safe_div(ctx.a_out[0], ctx.y)
        return [t.op("Mul", ctx.x, t.op("Mul", s, l2_factor(ctx)))]
    if ctx.node.op_type in VIEWED_NORMS:
        return _viewed_norm_linear(ctx)
    if ctx.node.op_type in NORMS:
        return _norm_linear(ctx)
    if ctx.node.op_type != "LayerNormalization":
        raise ctx.fail(f"rule 'layernorm_linear' is defined for LayerNormalization, not {ctx.node.op_type}")
    t = ctx.tape
    axes = layer_norm_axes(ctx)
    _, inv_std = _layer_norm_stats(ctx, axes)
    scale, beta = _layernorm_inputs(ctx)
    y, a = ctx.y, ctx.a_out[0]
    d = t.op("Sub", y, beta) if beta is not None and ctx.bias_policy == "ignore" else y
    eps = ctx.params["eps"]
    s = t.op("Div", a, t.blip(d, eps)) if eps > 0 else t.safe_div(a, d)
    c = inv_std if scale is None else t.op("Mul", inv_std, scale)
    cs = t.op("Mul", s, c)
    transposed = t.op("Sub", cs, t.reduce("ReduceMean", cs, axes))
    if beta is not None and ctx.bias_policy != "ignore":
        ctx.report_bias(t.op("Mul", beta, s))
    return [t.op("Mul", ctx.x, transposed)] + [None] * (len(ctx.node.inputs) - 1)



def _viewed_norm_linear(ctx) -> list[str | None]:
    """``layernorm_linear`` on an Instance, Group or RMS normalization: ``c = γ/σ`` held constant."""
    t = ctx.tape
    form = norm_form(ctx)
    _, inv_std = form.stats(t, form.to_view(t, ctx.x))
    y, a = ctx.y, ctx.a_out[0]
    beta = form.bias if _layernorm_has_bias(ctx) else None
    d = y
    if beta is not None and ctx.bias_policy == "ignore":
        d = t.op("Sub", y, form.back(t, t.op("Add", form.to_view(t, t.zeros_like(y)), beta), y))
    eps = ctx.params["eps"]
    s = t.op("Div", a, t.blip(d, eps)) if eps > 0 else t.safe_div(a, d)
    sv = form.to_view(t, s)
    cs = t.op("Mul", sv if form.scale is None else t.op("Mul", sv, form.scale), inv_std)
    if form.centered:
        cs = t.op("Sub", cs, t.reduce("ReduceMean", cs, form.axes))
    if beta is not None and ctx.bias_policy != "ignore":
        ctx.report_bias(form.back(t, t.op("Mul", sv, beta), y))
    return [t.op("Mul", ctx.x, form.back(t, cs, ctx.x))] + [None] * (len(ctx.node.inputs) - 1)


@rule("cp_attention", {NORMALIZING}, params=[_EPS],
      conservation=_classes(relevance={NORMALIZING: APPROXIMATE}), op_types={"Attention"})
def cp_attention(ctx) -> list[str | None]:
    """CP-LRP on the ONNX Attention op (Ali et al. 2022): the attention weights ``P`` held constant,
    ``Y = P V`` is linear in the values, which take all the relevance by the ε-rule:

    ``a(V) = V ⊙ Pᵀ(a(Y) / blip(Y))`` per head (repeated heads summed back; past values take their
    part likewise); Q, K and the mask get nothing. Conservative up to ε (no bias).
    """
    if ctx.node.op_type != "Attention":
        raise ctx.fail(f"rule 'cp_attention' is defined for Attention, not {ctx.node.op_type}")
    if any(a is not None for a in ctx.a_out[1:]):
        raise ctx.fail("rule 'cp_attention' explains the Y output of Attention; its present_key, "
                       "present_value or qk_matmul_output output feeds the explained output too (bind "
                       "Attention -> gradient)")
    t = ctx.tape
    parts = attention_parts(ctx)
    s = _normalized_output(ctx)
    s4 = heads_of(ctx, parts, s)
    weights_t = t.op("Transpose", parts.p, perm=[0, 1, 3, 2])
    d_v = unrepeat(t, t.op("MatMul", weights_t, s4), parts.repeats, parts.v)
    past, new = present_back(ctx, parts, d_v, 2)
    out: list[str | None] = [None] * len(ctx.node.inputs)
    out[2] = t.op("Mul", ctx.node.inputs[2], new) if ctx.active[2] else None
    if past is not None and len(ctx.active) > 5 and ctx.active[5]:
        out[5] = t.op("Mul", ctx.node.inputs[5], past)
    return out


def norm_biases(ctx) -> tuple:
    """(β, the bias of the sum) of a contrib normalization (``contrib.NORMS``) as constants, or None."""
    form = NORMS[ctx.node.op_type]
    return tuple(None if i is None else ctx.const(i) for i in (form.beta, form.bias))


def _norm_linear(ctx) -> list[str | None]:
    """layernorm_linear on onnxruntime's Skip/Simplified LayerNormalization (``contrib.NORMS``):
    ``s = x + skip + b`` is linear, and so is the normalization of ``s`` with ``c = γ/σ(s)`` held
    constant, ``y = M s + β`` (``M s = c ⊙ (s − mean s)``, no centering for the RMS forms). With
    ``T = Mᵀ(a(y) / blip(d))`` (plus ``a(s) / blip(s)`` where the sum output ``s`` is used too),
    each summed input ``x_i`` gets ``x_i ⊙ T``; ``β`` and ``b`` are blamed (``β ⊙ a(y)/blip(d)``,
    ``b ⊙ T``) with ``d = y``, or left out of ``d`` under ``bias ignore``."""
    t, form = ctx.tape, NORMS[ctx.node.op_type]
    axes = norm_axes(ctx)
    s = norm_sum(ctx)
    _, inv_std = norm_stats(ctx, s, axes)
    beta, bias = (ctx.node.inputs[i] if v is not None and v.any() else None
                  for i, v in zip((form.beta, form.bias), norm_biases(ctx)))
    c = t.op("Mul", inv_std, ctx.node.inputs[form.gamma])

    def m(b: str) -> str:  # M b of the 1-D bias b: the Skip forms normalize over the last axis, b's only one
        return t.op("Mul", c, t.op("Sub", b, t.reduce("ReduceMean", b, [-1])) if form.centered else b)

    ignore, eps = ctx.bias_policy == "ignore", ctx.params["eps"]

    def share(a: str, d: str) -> str:
        return t.op("Div", a, t.blip(d, eps)) if eps > 0 else t.safe_div(a, d)

    transposed = []
    if ctx.a_out[0] is not None:
        d = ctx.y
        if ignore:
            d = t.op("Sub", d, t.sum([x for x in (beta, bias and m(bias)) if x])) if beta or bias else d
        elif beta:
            ctx.report_bias(t.op("Mul", beta, share(ctx.a_out[0], d)))
        cs = t.op("Mul", share(ctx.a_out[0], d), c)
        transposed.append(t.op("Sub", cs, t.reduce("ReduceMean", cs, axes)) if form.centered else cs)
    if form.sum_output is not None and form.sum_output < len(ctx.a_out) and ctx.a_out[form.sum_output]:
        d = t.op("Sub", s, bias) if bias and ignore else s
        transposed.append(share(ctx.a_out[form.sum_output], d))
    out: list[str | None] = [None] * len(ctx.node.inputs)
    if not transposed:
        return out
    total = t.sum(transposed)
    if bias and not ignore:
        ctx.report_bias(t.op("Mul", bias, total))
    for i in form.summed:
        if ctx.active[i]:
            x = ctx.node.inputs[i]
            out[i] = t.reshape_like(_reduce_where_one(t, t.op("Mul", x, total), x), x)
    return out
