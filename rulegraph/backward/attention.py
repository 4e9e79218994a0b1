"""ONNX Attention (opset 23 to 25): its VJP and kind (normalizing: a Softmax inside).

The node computes, per batch and head (3-D inputs ``[B, S, H·d]`` are split into heads first; past
keys and values are prepended along the sequence: the ``present`` outputs):

    P = softmax(cap(scale · Q Kᵀ) + bias),   Y = P V,

with ``cap(s) = c·tanh(s/c)`` (``softcap = c > 0``), ``bias`` the float mask, or 0/−∞ from a boolean
mask and ``is_causal`` (a query ``i`` sees keys ``j ≤ i + past``), and grouped-query attention
repeating each of the ``kv_num_heads`` key and value heads for ``q_num_heads / kv_num_heads`` query
heads. The VJP recomputes ``P`` and differentiates each step:

    dV = Pᵀ g,  dP = g Vᵀ,  dL = P ⊙ (dP − Σ_j dP ⊙ P),  ds = dL ⊙ cap'(s),
    dQ = scale · ds K,  dK = scale · dsᵀ Q,  d(float mask) = dL,

the repeated heads summed back, ``present`` cotangents added, and the past split off.

Refused by name: ``nonpad_kv_seqlen`` (opset 24), sliding windows (opset 25), a mask shorter than the
keys, and the ``qk_matmul_output`` output on the explained path.
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
    node = ctx.node
    if _input(ctx, 6) is not None:
        raise ctx.fail("Attention with nonpad_kv_seqlen (opset 24's external cache) is not supported; "
                       "pass the padding as attn_mask instead")
    for name in ("left_window_size", "right_window_size"):
        if node.attr(name, -1) >= 0:
            raise ctx.fail(f"Attention with a sliding window ({name} = {node.attr(name)}) is not supported; "
                           "write the window into attn_mask instead")
    if _active(ctx, 3) and ctx.graph.dtypes.get(node.inputs[3]) == TensorProto.BOOL:
        raise ctx.fail("a boolean attn_mask cannot be an activation")


def _mask_bias(ctx: VjpContext, s: str, past: str | None) -> str | None:
    """The additive bias of the scores ``s [B, H, Sq, Skv]``: the mask (boolean: 0 or −∞) plus the causal
    part; None without either."""
    t, node = ctx.tape, ctx.node
    mask = _input(ctx, 3)
    bias = None
    if mask is not None:
        last = ctx.graph.dim(mask, -1) if ctx.graph.rank(mask) else None
        keys = ctx.graph.dim(node.inputs[1], 1 if ctx.graph.rank(node.inputs[1]) == 3 else 2)
        if past is not None and isinstance(keys, int):
            keys = ctx.graph.dim(past, 2) + keys if isinstance(ctx.graph.dim(past, 2), int) else None
        if isinstance(last, int) and isinstance(keys, int) and last != keys:
            raise ctx.fail(f"an attn_mask of {last} keys for {keys} keys (padded by the runtime) is not "
                           "supported; pass a mask as long as the keys")
        if ctx.graph.dtypes.get(mask) == TensorProto.BOOL:
            bias = t.op("Where", mask, t.scalar(0.0), t.scalar(_NEG_INF))
        else:
            bias = mask
    if node.attr("is_causal", 0):
        rows = t.op("Gather", t.shape(s), t.ints([2]), axis=0)
        cols = t.op("Gather", t.shape(s), t.ints([3]), axis=0)
        zero, one = t.const(np.array(0, dtype=np.int64)), t.const(np.array(1, dtype=np.int64))
        i = t.op("Range", zero, t.op("Squeeze", rows), one)
        j = t.op("Range", zero, t.op("Squeeze", cols), one)
        if past is not None:
            i = t.op("Add", i, t.op("Squeeze", t.op("Gather", t.shape(past), t.ints([2]), axis=0)))
        allowed = t.op("LessOrEqual", t.unsqueeze(j, [0]), t.unsqueeze(i, [1]))
        causal = t.op("Where", allowed, t.scalar(0.0), t.scalar(_NEG_INF))
        bias = causal if bias is None else t.op("Add", bias, causal)
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


@vjp("Attention", kind=NORMALIZING)
def _attention(ctx, g):
    """The chain of the module docstring, for every active input."""
    if len(g) > 3 and g[3] is not None:
        raise ctx.fail("the qk_matmul_output output of Attention feeds the explained output; only Y, "
                       "present_key and present_value are supported")
    t = ctx.tape
    parts = attention_parts(ctx)
    out: list[str | None] = [None] * len(ctx.node.inputs)
    gy = heads_of(ctx, parts, g[0]) if g[0] is not None else None
    d_k = d_v = None
    if gy is not None:
        d_v = unrepeat(t, t.op("MatMul", t.op("Transpose", parts.p, perm=[0, 1, 3, 2]), gy), parts.repeats,
                        parts.v)
        d_p = t.op("MatMul", gy, t.op("Transpose", parts.v_rep, perm=[0, 1, 3, 2]))
        d_logits = t.op("Mul", parts.p, t.op("Sub", d_p, t.reduce_sum(t.op("Mul", d_p, parts.p), [-1])))
        cap = ctx.node.attr("softcap", 0.0)
        d_s = d_logits
        if cap:
            th = t.op("Tanh", t.op("Div", parts.s, t.scalar(cap)))
            d_s = t.op("Mul", d_logits, t.op("Sub", t.scalar(1.0), t.op("Mul", th, th)))
        d_s = t.op("Mul", d_s, t.scalar(parts.scale))
        if ctx.active[0]:
            d_q = t.op("MatMul", d_s, parts.k_rep)
            out[0] = _unheads(t, d_q) if parts.three_d else d_q
        d_k = unrepeat(t, t.op("MatMul", t.op("Transpose", d_s, perm=[0, 1, 3, 2]), parts.q), parts.repeats,
                        parts.k)
        if _active(ctx, 3):
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
    """``d [B, H, Sq, Skv]`` summed to the (broadcast) shape of the float mask."""
    return t.reshape_like(_reduce_where_one(t, d, mask), mask)
