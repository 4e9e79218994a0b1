"""ONNX Attention (opset 23 to 25): its VJP and kind (normalizing: a Softmax inside).

The node computes, per batch and head (3-D inputs ``[B, S, H·d]`` are split into heads first; past
keys and values are prepended along the sequence: the ``present`` outputs):

    P = softmax(cap(scale · Q Kᵀ) + bias),   Y = P V,

with ``cap(s) = c·tanh(s/c)`` (``softcap = c > 0``), ``bias`` the float mask, or 0/−∞ from a boolean
mask (a mask shorter than the keys padded with −∞), plus −∞ where the structure hides key ``j`` from
query ``i``: at ``p = i + offset`` (offset: the past's length, or ``nonpad_kv_seqlen − Sq`` per batch for
an external cache, else 0) it sees ``j ≤ p`` under ``is_causal``, ``p − left ≤ j ≤ p + right`` for the
window sizes ≥ 0 (opset 25) and ``j < nonpad_kv_seqlen`` (opset 24); grouped-query attention repeats
each of the ``kv_num_heads`` key and value heads for ``q_num_heads / kv_num_heads`` query heads. The
VJP recomputes ``P`` and differentiates each step:

    dV = Pᵀ g,  dP = g Vᵀ,  dL = P ⊙ (dP − Σ_j dP ⊙ P),  ds = dL ⊙ cap'(s),
    dQ = scale · ds K,  dK = scale · dsᵀ Q,  d(float mask) = dL (its keys),

the repeated heads summed back, ``present`` cotangents added, and the past split off. The cotangent
of ``qk_matmul_output`` joins the chain where its mode takes it: ``ds`` (0: the raw scores, as
onnxruntime and the operator's text have it), before ``cap'`` (1), ``dL`` (2), ``dP`` (3).
``softmax_precision`` changes only the rounding of the forward, not its derivative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..graph.kinds import NORMALIZING
from .emit import Tape
from .vjp import VjpContext, _reduce_where_one, vjp

_NEG_INF = float("-inf")


@dataclass
class Parts:
    """The recomputed forward of an Attention node, per head (``[B, H, S, d]``)."""

    q: str
    k: str            # present keys, kv heads
    v: str            # present values, kv heads
    k_rep: str        # repeated to the query heads
    v_rep: str
    s: str            # scale · Q Kᵀ (before the cap)
    p: str            # the attention weights
    repeats: int
    three_d: bool
    scale: float


def _input(ctx: VjpContext, i: int) -> str | None:
    inputs = ctx.node.inputs
    return inputs[i] if i < len(inputs) and inputs[i] else None


def _active(ctx: VjpContext, i: int) -> bool:
    return i < len(ctx.active) and ctx.active[i]


def _heads(t: Tape, x: str, heads: int) -> str:
    """``[B, S, H·d] → [B, H, S, d]``."""
    return t.op("Transpose", t.op("Reshape", x, t.ints([0, 0, heads, -1])), perm=[0, 2, 1, 3])


def _unheads(t: Tape, x: str) -> str:
    """``[B, H, S, d] → [B, S, H·d]``."""
    return t.op("Reshape", t.op("Transpose", x, perm=[0, 2, 1, 3]), t.ints([0, 0, -1]))


def _repeat(t: Tape, x: str, repeats: int) -> str:
    """Each head ``repeats`` times in a row (``[h0, h0, h1, h1, …]``)."""
    if repeats == 1:
        return x
    shape = t.shape(x)
    five = t.op("Concat", t.op("Slice", shape, t.ints([0]), t.ints([2])), t.ints([1]),
                t.op("Slice", shape, t.ints([2]), t.ints([4])), axis=0)
    big = t.op("Concat", t.op("Slice", shape, t.ints([0]), t.ints([2])), t.ints([repeats]),
               t.op("Slice", shape, t.ints([2]), t.ints([4])), axis=0)
    out = t.op("Concat", t.op("Slice", shape, t.ints([0]), t.ints([1])), t.ints([-1]),
               t.op("Slice", shape, t.ints([2]), t.ints([4])), axis=0)
    return t.op("Reshape", t.op("Expand", t.op("Reshape", x, five), big), out)


def unrepeat(t: Tape, x: str, repeats: int, like: str) -> str:
    """The transpose of ``_repeat``: the copies of each head summed, shaped like ``like``."""
    if repeats == 1:
        return x
    shape = t.shape(like)
    five = t.op("Concat", t.op("Slice", shape, t.ints([0]), t.ints([2])), t.ints([repeats]),
                t.op("Slice", shape, t.ints([2]), t.ints([4])), axis=0)
    return t.op("ReduceSum", t.op("Reshape", x, five), t.ints([2]), keepdims=0)


def _refuse_unsupported(ctx: VjpContext) -> None:
    if _active(ctx, 3) and ctx.graph.dtypes.get(ctx.node.inputs[3]) == TensorProto.BOOL:
        raise ctx.fail("a boolean attn_mask cannot be an activation")


def _int(t: Tape, value: int) -> str:
    return t.const(np.array(value, dtype=np.int64))


def _keys(ctx: VjpContext) -> int | None:
    """The static number of keys (past and new), None where it is not static."""
    k, past = ctx.node.inputs[1], _input(ctx, 4)
    keys = ctx.graph.dim(k, 1 if ctx.graph.rank(k) == 3 else 2)
    if past is not None:
        before = ctx.graph.dim(past, 2)
        keys = before + keys if isinstance(before, int) and isinstance(keys, int) else None
    return keys if isinstance(keys, int) else None


def _padded_mask(ctx: VjpContext, s: str) -> str | None:
    """The attn_mask as an additive float bias (boolean: 0 where True, −∞ where False), its last axis
    padded with −∞ to the keys of ``s [B, H, Sq, Skv]`` (a mask may be shorter than the keys)."""
    t, mask = ctx.tape, _input(ctx, 3)
    if mask is None:
        return None
    bias = mask
    if ctx.graph.dtypes.get(mask) == TensorProto.BOOL:
        bias = t.op("Where", mask, t.scalar(0.0), t.scalar(_NEG_INF))
    rank = ctx.graph.rank(mask)
    if not rank:
        raise ctx.fail("the attn_mask must have a static rank of at least 1 (run shape inference on the "
                       "model)")
    last = ctx.graph.dim(mask, -1)
    if isinstance(last, int) and last == _keys(ctx):
        return bias
    short = t.op("Sub", t.op("Gather", t.shape(s), t.ints([3]), axis=0), t.shape(mask, -1))
    pads = t.op("Concat", t.ints([0] * (2 * rank - 1)), short, axis=0)
    return t.op("Pad", bias, pads, t.scalar(_NEG_INF))


def _allowed(ctx: VjpContext, s: str, past: str | None) -> str | None:
    """Which keys each query sees by structure, broadcast to ``s [B, H, Sq, Skv]`` (None: all). A query
    ``i`` sits at ``p = i + offset`` (offset: the past's length, ``nonpad_kv_seqlen − Sq`` per batch
    for an external cache, else 0) and sees key ``j`` iff ``j ≤ p`` (``is_causal``),
    ``p − left ≤ j ≤ p + right`` (the window sizes that are ≥ 0) and ``j < nonpad_kv_seqlen``."""
    t, node = ctx.tape, ctx.node
    nonpad = _input(ctx, 6)
    left, right = node.attr("left_window_size", -1), node.attr("right_window_size", -1)
    causal = bool(node.attr("is_causal", 0))
    if not causal and left < 0 and right < 0 and nonpad is None:
        return None
    rows = t.op("Squeeze", t.op("Gather", t.shape(s), t.ints([2]), axis=0))
    cols = t.op("Squeeze", t.op("Gather", t.shape(s), t.ints([3]), axis=0))
    j = t.op("Range", _int(t, 0), cols, _int(t, 1))                       # [Skv]
    p = t.unsqueeze(t.op("Range", _int(t, 0), rows, _int(t, 1)), [1])    # [Sq, 1]
    n = None
    if nonpad is not None:
        n = t.op("Reshape", t.op("Cast", nonpad, to=TensorProto.INT64), t.ints([-1, 1, 1, 1]))
    if past is not None:
        p = t.op("Add", p, t.op("Squeeze", t.op("Gather", t.shape(past), t.ints([2]), axis=0)))
    elif n is not None:
        p = t.op("Add", p, t.op("Sub", n, rows))                             # [B, 1, Sq, 1]
    conditions = []
    if causal:
        conditions.append(t.op("LessOrEqual", j, p))
    if left >= 0:
        conditions.append(t.op("GreaterOrEqual", j, t.op("Sub", p, _int(t, left))))
    if right >= 0:
        conditions.append(t.op("LessOrEqual", j, t.op("Add", p, _int(t, right))))
    if n is not None:
        conditions.append(t.op("Less", j, n))
    allowed = conditions[0]
    for c in conditions[1:]:
        allowed = t.op("And", allowed, c)
    return allowed


def _mask_bias(ctx: VjpContext, s: str, past: str | None) -> str | None:
    """The additive bias of the scores ``s [B, H, Sq, Skv]``: the (padded) mask plus −∞ where the
    structure (causal, window, padding) hides a key; None without either."""
    t = ctx.tape
    bias = _padded_mask(ctx, s)
    allowed = _allowed(ctx, s, past)
    if allowed is not None:
        hidden = t.op("Where", allowed, t.scalar(0.0), t.scalar(_NEG_INF))
        bias = hidden if bias is None else t.op("Add", bias, hidden)
    return bias


def attention_parts(ctx: VjpContext) -> Parts:
    """The node's forward again, per head, with the attention weights ``P`` (a fully masked row: 0)."""
    _refuse_unsupported(ctx)
    t, node = ctx.tape, ctx.node
    q, k, v = node.inputs[:3]
    three_d = ctx.graph.rank(q) == 3
    if three_d:
        q_heads, kv_heads = node.attr("q_num_heads"), node.attr("kv_num_heads")
        if not q_heads or not kv_heads:
            raise ctx.fail("3-D Attention inputs need the q_num_heads and kv_num_heads attributes")
        q, k, v = _heads(t, q, q_heads), _heads(t, k, kv_heads), _heads(t, v, kv_heads)
        repeats = q_heads // kv_heads
    else:
        q_heads, kv_heads = ctx.graph.dim(q, 1), ctx.graph.dim(k, 1)
        if not isinstance(q_heads, int) or not isinstance(kv_heads, int):
            raise ctx.fail("the head counts of 4-D Attention inputs must be static")
        repeats = q_heads // kv_heads
    past_k, past_v = _input(ctx, 4), _input(ctx, 5)
    if past_k is not None:
        k = t.op("Concat", past_k, k, axis=2)
    if past_v is not None:
        v = t.op("Concat", past_v, v, axis=2)
    head = ctx.graph.dim(node.inputs[0], -1)
    scale = node.attr("scale")
    if scale is None:
        size = head // q_heads if three_d and isinstance(head, int) else head
        if not isinstance(size, int):
            raise ctx.fail("the head size of the Attention inputs must be static (or give the scale "
                           "attribute)")
        scale = 1.0 / float(np.sqrt(size))
    k_rep, v_rep = _repeat(t, k, repeats), _repeat(t, v, repeats)
    s = t.op("Mul", t.op("MatMul", q, t.op("Transpose", k_rep, perm=[0, 1, 3, 2])), t.scalar(scale))
    logits = _capped(t, s, node.attr("softcap", 0.0))
    bias = _mask_bias(ctx, s, past_k)
    if bias is not None:
        logits = t.op("Add", logits, bias)
    p = t.op("Softmax", logits, axis=-1)
    p = t.op("Where", t.op("IsNaN", p), t.scalar(0.0), p)
    return Parts(q, k, v, k_rep, v_rep, s, p, repeats, three_d, scale)


def _capped(t: Tape, s: str, cap: float) -> str:
    return s if not cap else t.op("Mul", t.op("Tanh", t.op("Div", s, t.scalar(cap))), t.scalar(cap))


def heads_of(ctx: VjpContext, parts: Parts, g: str) -> str:
    """A tensor laid out as Y (3-D: ``[B, S, H·d]``) per head, ``[B, H, S, d]``."""
    return _heads(ctx.tape, g, ctx.node.attr("q_num_heads")) if parts.three_d else g


def present_back(ctx: VjpContext, parts: Parts, d_present: str | None,
                 index: int) -> tuple[str | None, str | None]:
    """The cotangent of the present keys (``index = 1``) or values (2), ``[B, Hkv, S_past + S, d]``,
    split into (past, new input in its own layout)."""
    if d_present is None:
        return None, None
    t = ctx.tape
    past = _input(ctx, 3 + index)
    new, old = d_present, None
    if past is not None:
        length = t.op("Gather", t.shape(past), t.ints([2]), axis=0)
        old = t.op("Slice", d_present, t.ints([0]), length, t.ints([2]))
        new = t.op("Slice", d_present, length, t.ints([np.iinfo(np.int64).max]), t.ints([2]))
    if parts.three_d:
        new = _unheads(t, new)
    return old, new


def _plus(t: Tape, a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a if b is None else b
    return t.op("Add", a, b)


#: qk_matmul_output_mode -> where its cotangent joins the chain: the scores ``s`` (0), the capped
#: scores (1), the biased logits (2), the weights ``P`` (3)
QK_OUTPUT_AT = {0: "s", 1: "capped", 2: "logits", 3: "p"}


@vjp("Attention", kind=NORMALIZING)
def _attention(ctx, g):
    """The chain of the module docstring, for every active input; the cotangent of
    ``qk_matmul_output`` joins it where its mode takes the output (``QK_OUTPUT_AT``)."""
    t = ctx.tape
    parts = attention_parts(ctx)
    out: list[str | None] = [None] * len(ctx.node.inputs)
    gy = heads_of(ctx, parts, g[0]) if g[0] is not None else None
    g_qk = g[3] if len(g) > 3 else None
    at = QK_OUTPUT_AT.get(ctx.node.attr("qk_matmul_output_mode", 0))
    if g_qk is not None and at is None:
        raise ctx.fail(f"qk_matmul_output_mode {ctx.node.attr('qk_matmul_output_mode')} is not one of "
                       "ONNX's modes 0 to 3")

    def joined(d: str | None, point: str) -> str | None:
        return _plus(t, d, g_qk) if at == point and g_qk is not None else d

    d_k = d_v = d_p = None
    if gy is not None:
        d_v = unrepeat(t, t.op("MatMul", t.op("Transpose", parts.p, perm=[0, 1, 3, 2]), gy), parts.repeats,
                        parts.v)
        d_p = t.op("MatMul", gy, t.op("Transpose", parts.v_rep, perm=[0, 1, 3, 2]))
    d_p = joined(d_p, "p")
    d_logits = None
    if d_p is not None:
        d_logits = t.op("Mul", parts.p, t.op("Sub", d_p, t.reduce_sum(t.op("Mul", d_p, parts.p), [-1])))
    d_logits = joined(d_logits, "logits")
    d_s = joined(d_logits, "capped")
    cap = ctx.node.attr("softcap", 0.0)
    if cap and d_s is not None:
        th = t.op("Tanh", t.op("Div", parts.s, t.scalar(cap)))
        d_s = t.op("Mul", d_s, t.op("Sub", t.scalar(1.0), t.op("Mul", th, th)))
    d_s = joined(d_s, "s")
    if d_s is not None:
        d_s = t.op("Mul", d_s, t.scalar(parts.scale))
        if ctx.active[0]:
            d_q = t.op("MatMul", d_s, parts.k_rep)
            out[0] = _unheads(t, d_q) if parts.three_d else d_q
        d_k = unrepeat(t, t.op("MatMul", t.op("Transpose", d_s, perm=[0, 1, 3, 2]), parts.q), parts.repeats,
                        parts.k)
    if _active(ctx, 3) and d_logits is not None:
        out[3] = _mask_back(t, d_logits, ctx.node.inputs[3])
    for index, d in ((1, d_k), (2, d_v)):
        extra = g[index] if len(g) > index else None
        past, new = present_back(ctx, parts, _plus(t, d, extra), index)
        if ctx.active[index]:
            out[index] = new
        if _active(ctx, 3 + index):
            out[3 + index] = past
    return out


def _mask_back(t: Tape, d: str, mask: str) -> str:
    """``d [B, H, Sq, Skv]`` cut to the float mask's keys (it may be shorter) and summed to its
    (broadcast) shape."""
    d = t.op("Slice", d, t.ints([0]), t.shape(mask, -1), t.ints([-1]))
    return t.reshape_like(_reduce_where_one(t, d, mask), mask)
