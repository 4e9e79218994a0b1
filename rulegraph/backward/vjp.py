"""Op knowledge: the table op type -> VJP emitter, plus each linear op's bias and each max op's
window sum.

A VJP emitter has one signature, ``vjp(ctx, g) -> list[str | None]``: ``g`` holds one cotangent per
node output (``None`` where an output gets nothing), and the result one per node input (``None``
for constants, integer inputs and inputs that need nothing, ``ctx.active[i]`` false). Emitters
read forward tensors by name (the compiled model holds the forward pass) and emit nodes on
``ctx.tape``; they never run anything.

Conventions taken from autograd: ties of a max go to the first index; Relu's mask is ``y > 0``
(so the derivative at 0 is 0), LeakyRelu's is ``x > 0``, Clip's is ``min <= x <= max``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..errors import InternalError, ModelError
from ..graph.kinds import LINEAR, MAX, NONLINEAR, NORMALIZING, ROUTE
from ..graph.read import Graph, Node
from .emit import Tape

INT64_MAX = np.iinfo(np.int64).max


@dataclass
class VjpContext:
    """What a VJP emitter may read: the node, the graph, the tape, and which inputs need numbers."""

    node: Node
    graph: Graph
    tape: Tape
    active: list[bool]
    request_output: Callable[[Node, int], str]

    @property
    def x(self) -> str:
        return self.node.inputs[0]

    @property
    def y(self) -> str:
        return self.node.outputs[0]

    def const(self, i: int) -> np.ndarray | None:
        """The value of input ``i`` when it is a constant (or absent), else None."""
        if i >= len(self.node.inputs) or not self.node.inputs[i]:
            return None
        return self.graph.constants.get(self.node.inputs[i])

    def fail(self, why: str) -> ModelError:
        return ModelError(f"{self.node}: {why}")


VJPS: dict[str, Callable[[VjpContext, list], list]] = {}
#: op type -> bias of a linear op, broadcastable to its output: a constant, a tensor the emitter
#: computes in the graph (its name), or None.
LINEAR_BIAS: dict[str, Callable[[VjpContext], np.ndarray | str | None]] = {}
#: linear op type -> (index of its constant weight input, index of its bias input or None);
#: the LRP family re-runs these ops with modified weights (Montavon et al. 2019).
LINEAR_PARAMS: dict[str, Callable[[VjpContext], tuple[int, int | None]]] = {}
#: max op type -> (window sum S(values), its transpose Sᵀ(g)); used by the radial rule.
WINDOW_SUMS: dict[str, tuple[Callable, Callable]] = {}


#: op type -> kind, declared with the op's VJP (``@vjp(..., kind=...)``); ``ops.py`` adds the fused-only ops
OP_KINDS: dict[str, str] = {}
#: op types that are bilinear when every float operand is an activation (Mul, Div, MatMul)
BILINEAR_WHEN_ALL_ACTIVE: set[str] = set()
#: nonlinear op types that are normalizing (no rule assumed) when an input after the first is an
#: activation: nonlinear rules read ``y = f(x)`` of the first input only (Pow's exponent)
NONLINEAR_IN_FIRST_INPUT_ONLY: set[str] = set()


def vjp(*op_types: str, kind: str, bilinear: bool = False, first_input_only: bool = False):
    """Register the decorated VJP emitter under each op type, with the op's kind: one registration
    per op. ``bilinear``: the op is bilinear when every float operand is an activation;
    ``first_input_only``: the op is of its kind only while its first input is its only activation,
    normalizing otherwise."""

    def register(fn):
        for op in op_types:
            if op in VJPS or op in OP_KINDS:
                raise InternalError(f"op {op} is registered twice")
            VJPS[op], OP_KINDS[op] = fn, kind
            if bilinear:
                BILINEAR_WHEN_ALL_ACTIVE.add(op)
            if first_input_only:
                NONLINEAR_IN_FIRST_INPUT_ONLY.add(op)
        return fn

    return register


def fused_kind(op_type: str, kind: str) -> None:
    """Declare the kind of an op that exists only as a fused node (``graph/fuse.py``): it has no VJP
    of its own, its backward is its members' chain (``fused.py``)."""
    if op_type in OP_KINDS:
        raise InternalError(f"op {op_type} is registered twice")
    OP_KINDS[op_type] = kind


def registrar(table: dict):
    """A decorator factory filling ``table``: ``@entry("Add", "Sum")`` registers the function under
    each op type, right under its definition."""

    def entry(*op_types: str):
        def register(fn):
            for op in op_types:
                table[op] = fn
            return fn

        return register

    return entry


linear_bias = registrar(LINEAR_BIAS)
linear_params = registrar(LINEAR_PARAMS)


def window_sum(op_type: str, transpose: Callable):
    def register(fn):
        WINDOW_SUMS[op_type] = (fn, transpose)
        return fn

    return register


# --------------------------------------------------------------------------------------------------
# helpers


def _dims(graph: Graph, tensor: str) -> list | None:
    if tensor in graph.constants:
        return list(graph.constants[tensor].shape)
    return graph.shapes.get(tensor)


def unbroadcast(ctx: VjpContext, g: str, g_of: str, x: str) -> str:
    """Sum ``g`` (shaped like tensor ``g_of``) down to the shape of ``x`` (numpy broadcasting)."""
    t = ctx.tape
    gd, xd = _dims(ctx.graph, g_of), _dims(ctx.graph, x)
    if gd is None or xd is None:
        raise ctx.fail(f"the rank of '{x}' or '{g_of}' is unknown; cannot undo broadcasting "
                       "(run shape inference on the model, or export with static ranks)")
    lead = len(gd) - len(xd)
    axes = list(range(lead))
    for i, dx in enumerate(xd):
        dy = gd[lead + i]
        if dx == 1 and dy != 1:
            axes.append(lead + i)
    if axes:
        g = t.reduce_sum(g, axes, keepdims=True)
    if lead:
        g = t.reshape_like(g, x)
    return g


def _zeros_for(ctx: VjpContext, tensor: str) -> str:
    return ctx.tape.zeros_like(tensor)


def _where_positive(t: Tape, cond_of: str, g: str, strict: bool = True) -> str:
    return t.gate(t.op("Greater" if strict else "GreaterOrEqual", cond_of, t.scalar(0.0)), g)


def _spatial_attrs(ctx: VjpContext, kernel: list[int]) -> tuple[list, list, list, list]:
    """strides, dilations, begin pads, end pads of a Conv/pool node; auto_pad made explicit."""
    node, n = ctx.node, len(kernel)
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    pads = list(node.attr("pads", [0] * (2 * n)))
    auto_pad = node.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = ctx.graph.static_shape(ctx.x)
        pads = []
        begin, end = [], []
        for i in range(n):
            dk = dilations[i] * (kernel[i] - 1) + 1
            if strides[i] == 1:
                total = dk - 1
            elif shape is not None:
                size = shape[2 + i]
                out = -(-size // strides[i])
                total = max(0, (out - 1) * strides[i] + dk - size)
            else:
                raise ctx.fail("auto_pad SAME with stride > 1 needs static spatial sizes; export with "
                               "explicit pads or fixed input size")
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        pads = begin + end
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    return strides, dilations, pads[:n], pads[n:]


def _spatial_sizes(graph, tensor: str, n: int) -> tuple | None:
    """``tensor``'s shape with its ``n`` trailing (spatial) sizes known, the batch and channel
    dimensions possibly symbolic; None when a spatial size is not known."""
    shape = graph.shapes.get(tensor)
    if shape is None or len(shape) != n + 2 or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return tuple(shape)


def conv_input_vjp(ctx: VjpContext, g: str, weight: np.ndarray, group: int, strides, dilations,
                   pads_begin, pads_end, x: str, y: str) -> str:
    """Cotangent of a Conv's input ``x`` for a constant ``weight`` [M, C/G, *K].

    Stride 1: a Conv with channel-swapped, spatially flipped weights (fast on onnxruntime's CPU).
    Otherwise a ConvTranspose with the same weights, its output cut or zero-extended at the end to
    the input's size (the trailing rows a strided window never reaches get nothing).
    """
    t = ctx.tape
    kernel = list(weight.shape[2:])
    n = len(kernel)
    dk = [dilations[i] * (kernel[i] - 1) + 1 for i in range(n)]
    full_begin = [dk[i] - 1 - pads_begin[i] for i in range(n)]
    full_end = [dk[i] - 1 - pads_end[i] for i in range(n)]
    if all(s == 1 for s in strides) and min(full_begin + full_end) >= 0:
        m, cg = weight.shape[0], weight.shape[1]
        w = weight.reshape(group, m // group, cg, *kernel).swapaxes(1, 2).reshape(group * cg, m // group, *kernel)
        w = np.ascontiguousarray(np.flip(w, axis=tuple(range(2, 2 + n))))
        return t.op("Conv", g, t.const(w, hint="w_flip"), group=group, dilations=list(dilations),
                    pads=full_begin + full_end, kernel_shape=kernel)
    xs, ys = _spatial_sizes(ctx.graph, x, n), _spatial_sizes(ctx.graph, y, n)
    if ctx.node.attr("ceil_mode", 0):
        ys = None  # onnx shape inference keeps a last window that starts in the end padding; runtimes drop it
    if xs is not None and ys is not None:
        extent = [strides[i] * (ys[2 + i] - 1) + dk[i] - pads_begin[i] for i in range(n)]
        surplus = [e - s for e, s in zip(extent, xs[2:])]
        if all(-strides[i] < surplus[i] for i in range(n)):
            # the input's size in one node: the surplus trimmed by end pads, a shortfall (rows no
            # window reaches: they get nothing) added as output_padding
            return t.op("ConvTranspose", g, t.const(weight, hint="w"), group=group,
                        dilations=list(dilations), strides=list(strides), kernel_shape=kernel,
                        pads=list(pads_begin) + [max(d, 0) for d in surplus],
                        output_padding=[max(-d, 0) for d in surplus] if min(surplus) < 0 else None)
    ct = t.op("ConvTranspose", g, t.const(weight, hint="w"), group=group, dilations=list(dilations),
              strides=list(strides), pads=list(pads_begin) + [0] * n, kernel_shape=kernel)
    if xs is not None and ys is not None:
        if all(e >= s for e, s in zip(extent, xs[2:])):
            if extent == list(xs[2:]):
                return ct
            return t.op("Slice", ct, t.ints([0] * n), t.ints(xs[2:]), t.ints(range(2, 2 + n)))
        cut = [min(e, s) for e, s in zip(extent, xs[2:])]
        sliced = t.op("Slice", ct, t.ints([0] * n), t.ints(cut), t.ints(range(2, 2 + n)))
        tail = [s - c for s, c in zip(xs[2:], cut)]
        return t.op("Pad", sliced, t.ints([0] * (n + 2) + [0, 0] + tail))
    # symbolic sizes: cut to the input's size, then zero-extend what is missing
    size = t.shape(x, start=2)
    sliced = t.op("Slice", ct, t.ints([0] * n), size, t.ints(range(2, 2 + n)))
    missing = t.op("Max", t.op("Sub", size, t.shape(sliced, start=2)), t.ints([0]))
    pads = t.op("Concat", t.ints([0] * (n + 2) + [0, 0]), missing, axis=0)
    return t.op("Pad", sliced, pads)


# --------------------------------------------------------------------------------------------------
# linear


@vjp("Add", "Sum", kind=LINEAR)
def _add(ctx, g):
    return [unbroadcast(ctx, g[0], ctx.y, x) if a else None for x, a in zip(ctx.node.inputs, ctx.active)]


@vjp("Sub", kind=LINEAR)
def _sub(ctx, g):
    a, b = ctx.active
    t = ctx.tape
    return [unbroadcast(ctx, g[0], ctx.y, ctx.node.inputs[0]) if a else None,
            unbroadcast(ctx, t.op("Neg", g[0]), ctx.y, ctx.node.inputs[1]) if b else None]


@vjp("Neg", kind=LINEAR)
def _neg(ctx, g):
    return [ctx.tape.op("Neg", g[0])]


@vjp("Mean", kind=LINEAR)
def _mean(ctx, g):
    """``y = (x₁ + … + xₙ)/n`` (broadcasting): ``g/n`` to each operand, summed over its broadcast axes."""
    t = ctx.tape
    share = t.op("Div", g[0], t.scalar(float(len(ctx.node.inputs))))
    return [unbroadcast(ctx, share, ctx.y, x) if a else None for x, a in zip(ctx.node.inputs, ctx.active)]


@vjp("CumSum", kind=LINEAR)
def _cumsum(ctx, g):
    """``y_i = Σ_{j≤i} x_j`` (``j<i`` exclusive; the other way reversed): ``∂x`` is ``g`` summed the
    other way, with the same exclusivity."""
    if ctx.active[1]:
        raise ctx.fail("CumSum's axis must be an integer, not an activation")
    reverse = 0 if ctx.node.attr("reverse", 0) else 1
    back = ctx.tape.op("CumSum", g[0], ctx.node.inputs[1], exclusive=ctx.node.attr("exclusive", 0),
                       reverse=reverse)
    return [back, None]


@vjp("DFT", kind=LINEAR)
def _dft(ctx, g):
    """``y = DFT(x)`` along one signal axis of static length ``n``, the last axis holding (real) or
    (real, imaginary): a real-linear map. With ``C_jk = cos 2πjk/n``, ``S_jk = sin 2πjk/n`` the
    transform is ``F = C − iS`` (its inverse ``(C + iS) / n``), and the adjoint of ``σ = ±1``,
    scale ``s`` is ``∂x_re = s (Cᵀ g_re − σ Sᵀ g_im)``, ``∂x_im = s (σ Sᵀ g_re + Cᵀ g_im)``: MatMuls
    with constant matrices along the axis (CUDA has no DFT kernel). A onesided output (the first
    ``n/2 + 1`` bins of a real signal) takes those rows of ``C`` and ``S``; a real input takes the real
    part. ``dft_length`` must be absent or the signal's own length."""
    t = ctx.tape
    if any(ctx.active[1:]):
        raise ctx.fail("DFT's dft_length and axis must be integers, not activations")
    rank, shape = ctx.graph.rank(ctx.x), _dims(ctx.graph, ctx.x)
    if shape is None or shape[-1] not in (1, 2):
        raise ctx.fail("the DFT input's last axis (1: real, 2: complex) must be known when the model is read")
    if t.opset >= 20:
        axis = ctx.const(2)
        axis = -2 if axis is None else int(axis)
    else:
        axis = ctx.node.attr("axis", 1)
    axis %= rank
    n = shape[axis] if isinstance(shape[axis], int) else None
    if n is None:
        raise ctx.fail("a DFT along an axis whose length is not known when the model is read is not supported")
    length = ctx.const(1)
    if (len(ctx.node.inputs) > 1 and ctx.node.inputs[1]) and (length is None or int(length) != n):
        raise ctx.fail(f"DFT with a dft_length other than the signal's length {n} (zero-padded or truncated) "
                       "is not supported")
    inverse, onesided = ctx.node.attr("inverse", 0), ctx.node.attr("onesided", 0)
    if onesided and inverse:
        raise ctx.fail("an inverse onesided DFT (irfft) is not supported")
    bins = n // 2 + 1 if onesided else n
    angle = 2 * np.pi * np.outer(np.arange(bins), np.arange(n)) / n
    sign, scale = (-1.0, 1.0 / n) if inverse else (1.0, 1.0)
    cos, sin = t.const(scale * np.cos(angle)), t.const(sign * scale * np.sin(angle))
    perm = [d for d in range(rank) if d != axis] + [axis]
    back_perm = [int(i) for i in np.argsort(perm)]

    def along(part: str, matrix: str) -> str:
        return t.op("Transpose", t.op("MatMul", t.op("Transpose", part, perm=perm), matrix), perm=back_perm)

    g_re = t.op("Slice", g[0], t.ints([0]), t.ints([1]), t.ints([-1]))
    g_im = t.op("Slice", g[0], t.ints([1]), t.ints([2]), t.ints([-1]))
    x_re = t.op("Sub", along(g_re, cos), along(g_im, sin))
    if shape[-1] == 1:
        back = x_re
    else:
        back = t.op("Concat", x_re, t.op("Add", along(g_re, sin), along(g_im, cos)), axis=-1)
    return [back] + [None] * (len(ctx.node.inputs) - 1)


@vjp("Col2Im", kind=LINEAR)
def _col2im(ctx, g):
    """``y = Col2Im(x)``: the columns ``x [N, C·kh·kw, L]`` summed into the image (torch's ``fold``;
    MobileViTV2 folds its patches back). Its adjoint is im2col of ``g``: a convolution with the same
    strides, pads and dilations whose ``C·kh·kw`` one-hot kernels (groups of ``C``) each pick one
    kernel position of one channel, flattened to ``[N, C·kh·kw, L]``."""
    t = ctx.tape
    if any(ctx.active[1:]):
        raise ctx.fail("Col2Im's image and block shapes must be integers, not activations")
    block = ctx.const(2)
    dims = _dims(ctx.graph, ctx.x)
    if block is None or dims is None or not isinstance(dims[1], int):
        raise ctx.fail("Col2Im needs a constant block_shape and a static column axis")
    block = [int(b) for b in block]
    size = int(np.prod(block))
    if dims[1] % size:
        raise ctx.fail(f"Col2Im's {dims[1]} columns are not a multiple of the block size {size}")
    channels = dims[1] // size
    kernels = np.zeros((channels * size, 1, *block))
    for c in range(channels):
        for k, position in enumerate(np.ndindex(*block)):
            kernels[(c * size + k, 0, *position)] = 1.0
    rank = len(block)
    attrs = {"strides": ctx.node.attr("strides", [1] * rank), "pads": ctx.node.attr("pads", [0] * 2 * rank),
             "dilations": ctx.node.attr("dilations", [1] * rank), "group": channels, "kernel_shape": block}
    cols = t.op("Conv", g[0], t.const(kernels), **attrs)
    return [t.reshape_like(cols, ctx.x), None, None]


@vjp("Mul", kind=LINEAR, bilinear=True)
def _mul(ctx, g):
    t = ctx.tape
    a, b = ctx.node.inputs
    return [unbroadcast(ctx, t.op("Mul", g[0], b), ctx.y, a) if ctx.active[0] else None,
            unbroadcast(ctx, t.op("Mul", g[0], a), ctx.y, b) if ctx.active[1] else None]


@vjp("Div", kind=LINEAR, bilinear=True)
def _div(ctx, g):
    t = ctx.tape
    a, b = ctx.node.inputs
    ga = t.op("Div", g[0], b)
    return [unbroadcast(ctx, ga, ctx.y, a) if ctx.active[0] else None,
            unbroadcast(ctx, t.op("Neg", t.op("Mul", ga, ctx.y)), ctx.y, b) if ctx.active[1] else None]


def _swap_last(t: Tape, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return t.op("Transpose", x, perm=perm)


@vjp("MatMul", kind=LINEAR, bilinear=True)
def _matmul(ctx, g):
    t, graph = ctx.tape, ctx.graph
    a, b = ctx.node.inputs
    ra, rb = graph.rank(a), graph.rank(b)
    if ra is None or rb is None:
        raise ctx.fail("MatMul operands of unknown rank")
    bc = ctx.const(1)
    if ctx.active[0] and not ctx.active[1] and bc is not None and rb == 2 and ra >= 2:
        if bc.dtype != t.float_dtype:   # a half weight under a float32 backward: upcast once, here
            return [t.op("MatMul", g[0], t.const(np.ascontiguousarray(bc.T), hint="wT")), None]
        # g·Wᵀ as a Gemm on the forward's own weight (transB): no transposed copy of W in the
        # explainer, its file or its session (onnxruntime packs B for either orientation)
        if ra == 2:
            return [t.op("Gemm", g[0], b, transB=1), None]
        rows = t.op("Reshape", g[0], t.ints([-1, bc.shape[1]]))
        return [t.reshape_like(t.op("Gemm", rows, b, transB=1), a), None]
    # general case: promote 1-D operands, multiply by the transposes, sum out broadcast axes
    a2 = t.unsqueeze(a, [0]) if ra == 1 else a
    b2 = t.unsqueeze(b, [1]) if rb == 1 else b
    g2 = g[0]
    if ra == 1:
        g2 = t.unsqueeze(g2, [-2]) if rb != 1 else t.unsqueeze(g2, [0])
    if rb == 1:
        g2 = t.unsqueeze(g2, [-1])
    out = [None, None]
    if ctx.active[0]:
        da = t.op("MatMul", g2, _swap_last(t, b2, max(rb, 2)))
        out[0] = _sum_to(t, da, a2, a)
    if ctx.active[1]:
        db = t.op("MatMul", _swap_last(t, a2, max(ra, 2)), g2)
        out[1] = _sum_to(t, db, b2, b)
    return out


def _sum_to(t: Tape, d: str, promoted: str, x: str) -> str:
    """Sum ``d`` to the shape of ``promoted`` (``x`` as multiplied: 1-D made 2-D), reshape to ``x``.

    Summing against ``x`` itself is wrong for a 1-D right operand: ``[K]`` aligns with the trailing
    size-1 axis of ``d = [..., K, 1]``, not with K.
    """
    return t.reshape_like(_reduce_where_one(t, d, promoted), x)


def _reduce_where_one(t: Tape, d: str, x: str) -> str:
    """ReduceSum ``d`` over the axes where ``x``'s (right-aligned) dims are 1 and ``d``'s are not."""
    xs, ds = t.shape(x), t.shape(d)
    rank_d = t.op("Size", ds)
    rank_x = t.op("Size", xs)
    lead = t.op("Sub", rank_d, rank_x)
    ones = t.op("Expand", t.ints([1]), t.op("Reshape", lead, t.ints([1])))
    xs_full = t.op("Concat", ones, xs, axis=0)
    differ = t.op("And", t.op("Equal", xs_full, t.ints([1])), t.op("Not", t.op("Equal", ds, t.ints([1]))))
    axes = t.op("Reshape", t.op("NonZero", differ), t.ints([-1]))
    return t.op("ReduceSum", d, axes, keepdims=1, noop_with_empty_axes=1)


@vjp("Gemm", kind=LINEAR)
def _gemm(ctx, g):
    t = ctx.tape
    node = ctx.node
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    trans_a, trans_b = node.attr("transA", 0), node.attr("transB", 0)
    a, b = node.inputs[:2]
    out: list[str | None] = [None] * len(node.inputs)
    bc = ctx.const(1)
    if ctx.active[0]:
        if bc is not None and bc.dtype == t.float_dtype:
            # α·g·B'ᵀ on the forward's own B (B'ᵀ = Bᵀ, or B itself under transB): no copy of B
            da = t.op("Gemm", g[0], b, alpha=alpha if alpha != 1.0 else None, transB=0 if trans_b else 1)
        elif bc is not None:
            w = bc if trans_b else bc.T  # B'ᵀ
            da = t.op("MatMul", g[0], t.const(np.ascontiguousarray(alpha * w), hint="wT"))
        else:
            bt = b if trans_b else t.op("Transpose", b, perm=[1, 0])
            da = t.op("MatMul", g[0], bt)
            if alpha != 1.0:
                da = t.op("Mul", da, t.scalar(alpha))
        out[0] = t.op("Transpose", da, perm=[1, 0]) if trans_a else da
    if ctx.active[1]:
        at = t.op("Transpose", a, perm=[1, 0]) if not trans_a else a  # A'ᵀ
        db = t.op("MatMul", at, g[0])
        if alpha != 1.0:
            db = t.op("Mul", db, t.scalar(alpha))
        out[1] = t.op("Transpose", db, perm=[1, 0]) if trans_b else db
    if len(node.inputs) > 2 and node.inputs[2] and ctx.active[2]:
        gc = g[0] if beta == 1.0 else t.op("Mul", g[0], t.scalar(beta))
        out[2] = unbroadcast(ctx, gc, ctx.y, node.inputs[2])
    return out


@vjp("Conv", kind=LINEAR)
def _conv(ctx, g):
    weight = ctx.const(1)
    if weight is None or ctx.active[1] or (len(ctx.active) > 2 and ctx.active[2]):
        raise ctx.fail("a Conv whose weights or bias are computed from the input is not supported; "
                       "rulegraph needs constant Conv weights")
    kernel = list(weight.shape[2:])
    strides, dilations, pb, pe = _spatial_attrs(ctx, kernel)
    dx = conv_input_vjp(ctx, g[0], weight, ctx.node.attr("group", 1), strides, dilations, pb, pe,
                        ctx.x, ctx.y)
    return [dx] + [None] * (len(ctx.node.inputs) - 1)


def _text_attr(ctx: VjpContext, name: str, default: str) -> str:
    value = ctx.node.attr(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _conv_transpose_pads(ctx: VjpContext, kernel: list[int]) -> tuple[list, list, list, list]:
    """strides, dilations, begin pads of a ConvTranspose node (auto_pad and output_shape made
    explicit, as onnxruntime and the ONNX spec derive them), and its output_padding.

    With ``output_shape`` (or auto_pad SAME, whose output is ``in·stride``) the total padding is
    ``max(0, natural − out)``, ``natural = stride·(in − 1) + output_padding + dk``; SAME_UPPER puts
    the smaller half at the beginning, every other mode the larger one.
    """
    node, n = ctx.node, len(kernel)
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    out_pad = list(node.attr("output_padding", [0] * n))
    pads = list(node.attr("pads", [0] * (2 * n)))
    auto_pad = _text_attr(ctx, "auto_pad", "NOTSET")
    output_shape = node.attr("output_shape")
    if output_shape is None and auto_pad in ("NOTSET", "VALID"):
        return strides, dilations, pads[:n] if auto_pad == "NOTSET" else [0] * n, out_pad
    begin = []
    for i in range(n):
        dk = dilations[i] * (kernel[i] - 1) + 1
        if output_shape is None:   # SAME: natural − in·stride does not depend on the input's size
            total = max(0, out_pad[i] + dk - strides[i])
        else:
            size = ctx.graph.dim(ctx.x, 2 + i)
            if not isinstance(size, int):
                raise ctx.fail("the output_shape attribute with a symbolic input size is not supported; "
                               "export with explicit pads or a fixed input size")
            total = max(0, strides[i] * (size - 1) + out_pad[i] + dk - list(output_shape)[-n:][i])
        begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    return strides, dilations, begin, out_pad


@vjp("ConvTranspose", kind=LINEAR)
def _conv_transpose(ctx, g):
    """``y = ConvTranspose(x, W)`` is the transpose of ``Conv(·, W)`` with the same weights
    ``[C_in, C_out/G, k…]``, strides, dilations, group and begin pads: ``a(x) = Conv(a(y), W)``,
    its end padding chosen so the output has the input's size (or cut to it)."""
    weight = ctx.const(1)
    if weight is None or ctx.active[1] or (len(ctx.active) > 2 and ctx.active[2]):
        raise ctx.fail("a ConvTranspose whose weights or bias are computed from the input is not "
                       "supported; rulegraph needs constant ConvTranspose weights")
    t = ctx.tape
    kernel = list(weight.shape[2:])
    n = len(kernel)
    strides, dilations, begin, out_pad = _conv_transpose_pads(ctx, kernel)
    # Conv output size: ⌊(out + begin + end − dk)/s⌋ + 1 = in needs end = s(in − 1) + dk − out − begin;
    # with symbolic sizes out = s(in − 1) + output_padding + dk − begin − end_pad (NOTSET) or in·s (SAME)
    size_in = [ctx.graph.dim(ctx.x, 2 + i) for i in range(n)]
    size_out = [ctx.graph.dim(ctx.y, 2 + i) for i in range(n)]
    dk = [dilations[i] * (kernel[i] - 1) + 1 for i in range(n)]
    static = all(isinstance(d, int) for d in size_in + size_out)
    if static:
        need = [strides[i] * (size_in[i] - 1) + dk[i] - size_out[i] - begin[i] for i in range(n)]
    else:
        auto_pad = _text_attr(ctx, "auto_pad", "NOTSET")
        end_pad = list(ctx.node.attr("pads", [0] * (2 * n)))[n:] if auto_pad == "NOTSET" else [0] * n
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            need = [dk[i] - strides[i] - begin[i] for i in range(n)]
        else:
            need = [end_pad[i] - out_pad[i] for i in range(n)]
    end = [max(0, e) for e in need]
    dx = t.op("Conv", g[0], t.const(weight, hint="w"), group=ctx.node.attr("group", 1),
              dilations=dilations, strides=strides, pads=begin + end, kernel_shape=kernel)
    if min(need) < 0:   # the output reaches past the last input's window: cut to the input's size
        size = t.ints(size_in) if static else t.shape(ctx.x, start=2)
        dx = t.op("Slice", dx, t.ints([0] * n), size, t.ints(range(2, 2 + n)))
    return [dx] + [None] * (len(ctx.node.inputs) - 1)


# Resize: separable per axis --------------------------------------------------------------------

#: Resize attributes that shape the 1-D interpolation matrix of each axis (passed on unchanged).
_RESIZE_AXIS_ATTRS = ("mode", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside",
                      "nearest_mode", "antialias")


def _resize_plan(ctx: VjpContext) -> tuple[str, list[tuple[int, int]]]:
    """Which input of a Resize gives the output size ('scales' or 'sizes') and the (axis, position
    in that input) of every axis it may change; axes whose constant scale is 1 (or size is the
    input's) are left out, except under tf_crop_and_resize, whose roi crops any axis."""
    node, rank = ctx.node, ctx.graph.rank(ctx.x)
    if rank is None:
        raise ctx.fail("the input's rank is unknown; cannot differentiate Resize")
    named = [i < len(node.inputs) and bool(node.inputs[i]) for i in range(4)]
    sizes = ctx.const(3)
    use = "sizes" if named[3] and (sizes is None or sizes.size > 0) else "scales"
    if use == "scales" and not named[2]:
        raise ctx.fail("Resize has neither scales nor sizes")
    axes = [int(a) % rank for a in node.attr("axes", range(rank))]
    policy = _text_attr(ctx, "keep_aspect_ratio_policy", "stretch")
    if use == "sizes" and policy != "stretch" and len(axes) > 1:
        raise ctx.fail(f"keep_aspect_ratio_policy '{policy}' with sizes on several axes is not supported "
                       "(its common scale is not each axis's own); export with scales or policy 'stretch'")
    value = ctx.const(2 if use == "scales" else 3)
    crop = _text_attr(ctx, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
    plan = []
    for position, axis in enumerate(axes):
        if value is not None and not crop:
            unchanged = (value[position] == 1.0 if use == "scales"
                         else value[position] == ctx.graph.dim(ctx.x, axis))
            if unchanged:
                continue
        plan.append((axis, position))
    return use, plan


def resize_matrix(ctx: VjpContext, axis: int, position: int, use: str) -> str:
    """``M [n_out, n_in]`` of one axis of a Resize node: the node's own attributes applied to an
    identity matrix ``I [n_in, n_in]`` along its first axis, with that axis's scale (or size) and roi.
    The extrapolation value is 0 there: what tf_crop_and_resize writes outside the input is a bias."""
    t, node = ctx.tape, ctx.node
    n_in = t.op("Gather", t.shape(ctx.x), t.ints([axis]), axis=0)
    square = t.op("ConstantOfShape", t.op("Concat", n_in, n_in, axis=0),
                  value=numpy_helper.from_array(np.zeros(1, dtype=t.float_dtype)))
    eye = t.op("EyeLike", square)
    count = len(node.attr("axes", [])) or ctx.graph.rank(ctx.x)
    take = t.ints([position])
    roi = ""
    if _text_attr(ctx, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        value = ctx.const(1)
        if value is None or value.size < 2 * count:
            raise ctx.fail("coordinate_transformation_mode tf_crop_and_resize needs a constant roi input "
                           f"(a start and an end for each of the {count} resized axes)")
        bounds = [value[position], 0, value[position + count], 1]
        roi = t.const(np.array(bounds, dtype=value.dtype), hint="roi")
    attrs = {name: node.attr(name) for name in _RESIZE_AXIS_ATTRS}
    if use == "scales":
        scales = t.op("Concat", t.op("Gather", node.inputs[2], take, axis=0),
                      t.const(np.array([1.0], dtype=np.float32)), axis=0)
        return t.op("Resize", eye, roi, scales, **attrs)
    sizes = t.op("Concat", t.op("Gather", node.inputs[3], take, axis=0), n_in, axis=0)
    return t.op("Resize", eye, roi, "", sizes, **attrs)


def _contract_axis(t: Tape, g: str, matrix: str, axis: int, rank: int) -> str:
    """``Σ_o g[…, o, …] M[o, i]`` along ``axis``: Mᵀ applied to that axis of ``g``."""
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = t.op("MatMul", t.op("Transpose", g, perm=perm), matrix)
    return t.op("Transpose", moved, perm=[int(i) for i in np.argsort(perm)])


@vjp("Resize", kind=LINEAR)
def _resize(ctx, g):
    """ONNX Resize is separable: ``y = x ×_a M_a`` over its resized axes ``a`` (nearest, linear and
    cubic interpolation, antialias, every coordinate transform), so ``a(x) = a(y) ×_a M_aᵀ`` with each
    ``M_a`` built in the graph by ``resize_matrix`` (symbolic sizes work)."""
    if any(ctx.active[1:]):
        raise ctx.fail("a Resize whose roi, scales or sizes are computed from the explained input is "
                       "not supported")
    use, plan = _resize_plan(ctx)
    rank = ctx.graph.rank(ctx.x)
    gx = g[0]
    for axis, position in plan:
        gx = _contract_axis(ctx.tape, gx, resize_matrix(ctx, axis, position, use), axis, rank)
    if not plan:
        gx = ctx.tape.op("Identity", gx)
    return [gx] + [None] * (len(ctx.node.inputs) - 1)


def _pool_kernel(ctx: VjpContext) -> list[int]:
    return list(ctx.node.attr("kernel_shape"))


def _channels(ctx: VjpContext) -> int:
    c = ctx.graph.dim(ctx.x, 1)
    if not isinstance(c, int):
        raise ctx.fail("the channel count must be static to differentiate a pooling op")
    return c


def _sum_pool_transpose(ctx: VjpContext, g: str, scale: float) -> str:
    """Transpose of ``scale ×`` the window sum of a pooling node: a depthwise conv VJP."""
    kernel = _pool_kernel(ctx)
    c = _channels(ctx)
    strides, dilations, pb, pe = _spatial_attrs(ctx, kernel)
    weight = np.full([c, 1] + kernel, scale, dtype=ctx.tape.float_dtype)
    return conv_input_vjp(ctx, g, weight, c, strides, dilations, pb, pe, ctx.x, ctx.y)


def _sum_pool(ctx: VjpContext, x: str, pad_value: float = 0.0) -> str:
    """Σ over each pooling window of ``ctx.node`` applied to ``x``: pad cells hold ``pad_value``,
    cells a ceil_mode window reaches past the padded input hold 0.

    A depthwise Conv with ones, not ``AveragePool × size``: an AveragePool divides a ceil_mode
    window that overhangs by fewer cells (onnxruntime and onnx.reference agree), and onnxruntime
    refuses an AveragePool whose (fused) padding is not smaller than the kernel.
    """
    t = ctx.tape
    kernel = _pool_kernel(ctx)
    n = len(kernel)
    strides, dilations, pb, pe = _spatial_attrs(ctx, kernel)
    if pad_value and (any(pb) or any(pe)):
        x = t.op("Pad", x, t.ints([0, 0] + pb + [0, 0] + pe), t.scalar(pad_value))
        pb, pe = [0] * n, [0] * n
    ceil = ctx.node.attr("ceil_mode", 0)
    if ceil:  # room for the last, partial window; extra windows are cut below
        pe = [e + s - 1 for e, s in zip(pe, strides)]
    c = _channels(ctx)
    ones = t.const(np.ones([c, 1] + kernel, dtype=t.float_dtype), hint="ones")
    total = t.op("Conv", x, ones, group=c, kernel_shape=kernel, strides=strides, dilations=dilations,
                 pads=pb + pe)
    if ceil:
        total = t.op("Slice", total, t.ints([0] * n), t.shape(ctx.y, start=2), t.ints(range(2, 2 + n)))
    return total


@vjp("AveragePool", kind=LINEAR)
def _average_pool(ctx, g):
    """``y = Σ_window x / n``: n counts the window's cells inside the padded input
    (count_include_pad=1) or inside the input (count_include_pad=0); ceil_mode windows may be short."""
    t = ctx.tape
    kernel = _pool_kernel(ctx)
    size = math.prod(kernel)
    _, _, pb, pe = _spatial_attrs(ctx, kernel)
    include_pad = ctx.node.attr("count_include_pad", 0)
    gy = g[0]
    if ctx.node.attr("ceil_mode", 0) or (not include_pad and (any(pb) or any(pe))):
        ones = t.op("Add", t.zeros_like(ctx.x), t.scalar(1.0))
        count = _sum_pool(ctx, ones, pad_value=float(include_pad))
        gy = t.op("Div", gy, t.op("Div", count, t.scalar(float(size))))
    return [_sum_pool_transpose(ctx, gy, 1.0 / size)]


def _reduce_axes(ctx: VjpContext) -> list[int] | None:
    """Normalised axes of a Reduce* node (attribute or constant input); None means all axes."""
    node = ctx.node
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        value = ctx.const(1)
        if value is None:
            raise ctx.fail("reduction axes computed at run time are not supported")
        axes = value.tolist()
    rank = ctx.graph.rank(ctx.x)
    if rank is None:
        raise ctx.fail("the input's rank is unknown")
    if not axes:
        return None if not node.attr("noop_with_empty_axes", 0) else []
    return sorted(a % rank for a in axes)


def _expand_back(ctx: VjpContext, g: str, axes: list[int] | None) -> str:
    """Undo a reduction's shape: restore reduced axes (if not kept) and expand to the input."""
    t = ctx.tape
    rank = ctx.graph.rank(ctx.x)
    axes = list(range(rank)) if axes is None else axes
    if not ctx.node.attr("keepdims", 1) and axes:
        g = t.unsqueeze(g, axes)
    return t.op("Expand", g, t.shape(ctx.x))


def _count(ctx: VjpContext, axes: list[int] | None) -> str:
    """Number of elements averaged, as a float tensor (a constant when sizes are static)."""
    t = ctx.tape
    rank = ctx.graph.rank(ctx.x)
    axes = list(range(rank)) if axes is None else axes
    dims = [ctx.graph.dim(ctx.x, a) for a in axes]
    if all(isinstance(d, int) for d in dims):
        return t.scalar(float(math.prod(dims)))
    sizes = t.op("Gather", t.shape(ctx.x), t.ints(axes), axis=0)
    return t.op("Cast", t.op("ReduceProd", sizes, keepdims=0), to=t.float_type)


@vjp("ReduceSum", kind=LINEAR)
def _reduce_sum(ctx, g):
    return [_expand_back(ctx, g[0], _reduce_axes(ctx))] + [None] * (len(ctx.node.inputs) - 1)


@vjp("ReduceMean", kind=LINEAR)
def _reduce_mean(ctx, g):
    axes = _reduce_axes(ctx)
    spread = _expand_back(ctx, g[0], axes)
    return [ctx.tape.op("Div", spread, _count(ctx, axes))] + [None] * (len(ctx.node.inputs) - 1)


@vjp("GlobalAveragePool", kind=LINEAR)
def _global_average_pool(ctx, g):
    axes = list(range(2, ctx.graph.rank(ctx.x)))
    spread = ctx.tape.op("Expand", g[0], ctx.tape.shape(ctx.x))
    return [ctx.tape.op("Div", spread, _count(ctx, axes))]


def _kept(ctx: VjpContext, tensor: str, axes: list[int] | None) -> str:
    """A reduction's output (or its cotangent) with the reduced axes restored as size 1."""
    if ctx.node.attr("keepdims", 1):
        return tensor
    axes = list(range(ctx.graph.rank(ctx.x))) if axes is None else axes
    return ctx.tape.unsqueeze(tensor, axes) if axes else tensor


def _reduction(ctx: VjpContext, g: list, slope: Callable[[VjpContext, str, list[int] | None], str]) -> list:
    """``∂x = g ⊙ slope``, ``g`` spread back over the reduced axes; ``slope(ctx, y_kept, axes)``."""
    axes = _reduce_axes(ctx)
    spread = _expand_back(ctx, g[0], axes)
    d = slope(ctx, _kept(ctx, ctx.y, axes), axes)
    return [ctx.tape.op("Mul", spread, d)] + [None] * (len(ctx.node.inputs) - 1)


@vjp("ReduceL1", kind=NORMALIZING)
def _reduce_l1(ctx, g):
    """``y = Σ|x|``: ``sign(x)``."""
    return _reduction(ctx, g, lambda ctx, y, axes: ctx.tape.op("Sign", ctx.x))


@vjp("ReduceL2", kind=NORMALIZING)
def _reduce_l2(ctx, g):
    """``y = √Σx²``: ``x/y``."""
    return _reduction(ctx, g, lambda ctx, y, axes: ctx.tape.op("Div", ctx.x, y))


@vjp("ReduceSumSquare", kind=NORMALIZING)
def _reduce_sum_square(ctx, g):
    """``y = Σx²``: ``2x``."""
    return _reduction(ctx, g, lambda ctx, y, axes: ctx.tape.op("Mul", ctx.x, ctx.tape.scalar(2.0)))


@vjp("ReduceLogSumExp", kind=NORMALIZING)
def _reduce_log_sum_exp(ctx, g):
    """``y = log Σ exp x``: ``exp(x − y)``, the softmax over the reduced axes."""
    return _reduction(ctx, g, lambda ctx, y, axes: ctx.tape.op("Exp", ctx.tape.op("Sub", ctx.x, y)))


@vjp("ReduceLogSum", kind=NORMALIZING)
def _reduce_log_sum(ctx, g):
    """``y = log Σ x``: ``1/Σx = exp(−y)`` (``1/x`` where ``noop_with_empty_axes`` keeps x)."""
    return _reduction(ctx, g, lambda ctx, y, axes: ctx.tape.op("Exp", ctx.tape.op("Neg", y)))


def _product_of_others(ctx: VjpContext, y: str, axes: list[int] | None) -> str:
    """``∂y/∂xᵢ = Π_{j≠i} xⱼ``, exact with zeros: ``y/xᵢ`` without zeros in the window; with one zero, the
    product of the rest at the zero and 0 elsewhere; with two or more, 0."""
    t, x = ctx.tape, ctx.x
    if axes == []:
        return t.op("Add", t.zeros_like(x), t.scalar(1.0))
    zero = t.op("Equal", x, t.scalar(0.0))
    safe = t.op("Where", zero, t.scalar(1.0), x)
    rest = t.reduce("ReduceProd", safe, axes)
    zeros = t.reduce("ReduceSum", t.op("Cast", zero, to=t.float_type), axes)
    lone = t.op("And", zero, t.op("Equal", zeros, t.scalar(1.0)))
    at_lone = t.op("Where", lone, rest, t.scalar(0.0))
    return t.op("Where", t.op("Equal", zeros, t.scalar(0.0)), t.op("Div", rest, safe), at_lone)


@vjp("ReduceProd", kind=NORMALIZING)
def _reduce_prod(ctx, g):
    return _reduction(ctx, g, _product_of_others)


def _batchnorm_scale(ctx: VjpContext) -> tuple[np.ndarray, np.ndarray]:
    """(s, b) of the inference BatchNormalization ``y = s·x + b``, shaped to broadcast over x."""
    values = [ctx.const(i) for i in range(1, 5)]
    if any(v is None for v in values):
        raise ctx.fail("BatchNormalization needs constant scale, bias, mean and variance (inference)")
    scale, bias, mean, var = (v.astype(np.float64) for v in values)
    s = scale / np.sqrt(var + ctx.node.attr("epsilon", 1e-5))
    rank = ctx.graph.rank(ctx.x) or 4
    shape = [-1] + [1] * (rank - 2)
    dtype = ctx.tape.float_dtype
    return s.reshape(shape).astype(dtype), (bias - s * mean).reshape(shape).astype(dtype)


@vjp("BatchNormalization", kind=LINEAR)
def _batchnorm(ctx, g):
    if ctx.node.attr("training_mode", 0):
        raise ctx.fail("BatchNormalization in training mode; export the model in eval mode")
    s, _ = _batchnorm_scale(ctx)
    return [ctx.tape.op("Mul", g[0], ctx.tape.const(s, hint="bn_s"))] + [None] * 4


# weights and biases of linear ops ----------------------------------------------------------------


def _weight_operand(ctx: VjpContext) -> int:
    active = [i for i, a in enumerate(ctx.active[:2]) if a]
    if len(active) != 1 or ctx.const(1 - active[0]) is None:
        raise ctx.fail("the LRP weight rules need one activation and one constant weight operand")
    return 1 - active[0]


@linear_params("Gemm")
def _gemm_params(ctx):
    return _weight_operand(ctx), 2


@linear_params("Conv", "ConvTranspose")
def _conv_params(ctx):
    return 1, 2


@linear_params("MatMul")
def _matmul_params(ctx):
    return _weight_operand(ctx), None


# biases of linear ops -----------------------------------------------------------------------------


@linear_bias("Gemm")
def _gemm_bias(ctx):
    c = ctx.const(2)
    return None if c is None else ctx.node.attr("beta", 1.0) * c


@linear_bias("Conv", "ConvTranspose")
def _conv_bias(ctx):
    b = ctx.const(2)
    if b is None:
        return None
    return b.reshape([-1] + [1] * ((ctx.graph.rank(ctx.x) or 4) - 2))


@linear_bias("Resize")
def _resize_bias(ctx):
    """``f(0)``: tf_crop_and_resize writes ``extrapolation_value`` where the roi reaches outside the
    input; computed by the node itself on zeros (the runtime's own idea of outside)."""
    crop = _text_attr(ctx, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
    if not crop or not ctx.node.attr("extrapolation_value", 0.0):
        return None
    return ctx.tape.copy_node(ctx.node, [ctx.tape.zeros_like(ctx.x)] + ctx.node.inputs[1:])


@linear_bias("BatchNormalization")
def _batchnorm_bias(ctx):
    return _batchnorm_scale(ctx)[1]


@linear_bias("Add", "Sum")
def _add_bias(ctx):
    consts = [ctx.const(i) for i, a in enumerate(ctx.active) if not a]
    consts = [c for c in consts if c is not None]
    return sum(consts[1:], consts[0]) if consts else None


@linear_bias("Mean")
def _mean_bias(ctx):
    consts = [ctx.const(i) for i, a in enumerate(ctx.active) if not a]
    consts = [c for c in consts if c is not None]
    return sum(consts[1:], consts[0]) / len(ctx.node.inputs) if consts else None


@linear_bias("Sub")
def _sub_bias(ctx):
    c0, c1 = ctx.const(0), ctx.const(1)
    if c1 is not None and ctx.active[0]:
        return -c1
    if c0 is not None and ctx.active[1]:
        return c0
    return None


# --------------------------------------------------------------------------------------------------
# nonlinear (elementwise)


@vjp("Relu", kind=NONLINEAR)
def _relu(ctx, g):
    return [_where_positive(ctx.tape, ctx.y, g[0])]


@vjp("LeakyRelu", kind=NONLINEAR)
def _leaky_relu(ctx, g):
    t = ctx.tape
    alpha = ctx.node.attr("alpha", 0.01)
    positive = t.op("Greater", ctx.x, t.scalar(0.0))
    return [t.op("Where", positive, g[0], t.op("Mul", g[0], t.scalar(alpha)))]


@vjp("PRelu", kind=NONLINEAR)
def _prelu(ctx, g):
    t = ctx.tape
    if ctx.active[1]:
        raise ctx.fail("PRelu with a slope computed from the input is not supported")
    positive = t.op("Greater", ctx.x, t.scalar(0.0))
    return [t.op("Where", positive, g[0], t.op("Mul", g[0], ctx.node.inputs[1])), None]


@vjp("Sigmoid", kind=NONLINEAR)
def _sigmoid(ctx, g):
    t = ctx.tape
    one_minus = t.op("Sub", t.scalar(1.0), ctx.y)
    return [t.op("Mul", g[0], t.op("Mul", ctx.y, one_minus))]


@vjp("Tanh", kind=NONLINEAR)
def _tanh(ctx, g):
    t = ctx.tape
    return [t.op("Mul", g[0], t.op("Sub", t.scalar(1.0), t.op("Mul", ctx.y, ctx.y)))]


@vjp("Softplus", kind=NONLINEAR)
def _softplus(ctx, g):
    return [ctx.tape.op("Mul", g[0], ctx.tape.op("Sigmoid", ctx.x))]


@vjp("Elu", kind=NONLINEAR)
def _elu(ctx, g):
    t = ctx.tape
    alpha = ctx.node.attr("alpha", 1.0)
    positive = t.op("Greater", ctx.x, t.scalar(0.0))
    slope = t.op("Add", ctx.y, t.scalar(alpha))
    return [t.op("Where", positive, g[0], t.op("Mul", g[0], slope))]


@vjp("Selu", kind=NONLINEAR)
def _selu(ctx, g):
    t = ctx.tape
    alpha = ctx.node.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.node.attr("gamma", 1.05070102214813232421875)
    positive = t.op("Greater", ctx.x, t.scalar(0.0))
    slope = t.op("Add", ctx.y, t.scalar(alpha * gamma))
    return [t.op("Where", positive, t.op("Mul", g[0], t.scalar(gamma)), t.op("Mul", g[0], slope))]


@vjp("Erf", kind=NONLINEAR)
def _erf(ctx, g):
    t = ctx.tape
    gauss = t.op("Exp", t.op("Neg", t.op("Mul", ctx.x, ctx.x)))
    return [t.op("Mul", g[0], t.op("Mul", gauss, t.scalar(2.0 / math.sqrt(math.pi))))]


@vjp("Gelu", kind=NONLINEAR)
def _gelu(ctx, g):
    t, x = ctx.tape, ctx.x
    approx = ctx.node.attr("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    if approx == "tanh":
        k = math.sqrt(2.0 / math.pi)
        x2 = t.op("Mul", x, x)
        inner = t.op("Mul", t.scalar(k), t.op("Add", x, t.op("Mul", t.scalar(0.044715), t.op("Mul", x2, x))))
        th = t.op("Tanh", inner)
        dinner = t.op("Mul", t.scalar(k), t.op("Add", t.scalar(1.0), t.op("Mul", t.scalar(3 * 0.044715), x2)))
        sech2 = t.op("Sub", t.scalar(1.0), t.op("Mul", th, th))
        d = t.op("Add", t.op("Mul", t.scalar(0.5), t.op("Add", t.scalar(1.0), th)),
                 t.op("Mul", t.op("Mul", t.scalar(0.5), x), t.op("Mul", sech2, dinner)))
    else:
        cdf = t.op("Mul", t.scalar(0.5), t.op("Add", t.scalar(1.0), t.op("Erf", t.op("Mul", x, t.scalar(1 / math.sqrt(2))))))
        pdf = t.op("Mul", t.scalar(1 / math.sqrt(2 * math.pi)), t.op("Exp", t.op("Mul", t.scalar(-0.5), t.op("Mul", x, x))))
        d = t.op("Add", cdf, t.op("Mul", x, pdf))
    return [t.op("Mul", g[0], d)]


@vjp("HardSigmoid", kind=NONLINEAR)
def _hard_sigmoid(ctx, g):
    t = ctx.tape
    alpha = ctx.node.attr("alpha", 0.2)
    beta = ctx.node.attr("beta", 0.5)
    z = t.op("Add", t.op("Mul", ctx.x, t.scalar(alpha)), t.scalar(beta))
    inside = t.op("And", t.op("Greater", z, t.scalar(0.0)), t.op("Less", z, t.scalar(1.0)))
    return [t.gate(inside, t.op("Mul", g[0], t.scalar(alpha)))]


@vjp("HardSwish", kind=NONLINEAR)
def _hard_swish(ctx, g):
    t, x = ctx.tape, ctx.x
    mid = t.op("Div", t.op("Add", t.op("Mul", x, t.scalar(2.0)), t.scalar(3.0)), t.scalar(6.0))
    above = t.op("Greater", x, t.scalar(3.0))
    below = t.op("Less", x, t.scalar(-3.0))
    d = t.op("Where", above, t.scalar(1.0), t.op("Where", below, t.scalar(0.0), mid))
    return [t.op("Mul", g[0], d)]


@vjp("Clip", kind=NONLINEAR, first_input_only=True)
def _clip(ctx, g):
    """``y = min(max(x, lo), hi)``: ``g`` to ``x`` where ``lo <= x <= hi``; to a bound that is an
    activation where it is the value taken: ``lo`` where ``x < lo <= hi``, ``hi`` everywhere else
    (``x > hi``, or ``lo > hi``, where ONNX gives ``hi``). The node is normalizing then (as Pow with an
    activation exponent): nonlinear rules read ``y = f(x)`` of the first input."""
    t, x, zero = ctx.tape, ctx.x, ctx.tape.scalar(0.0)
    bound = [i < len(ctx.node.inputs) and bool(ctx.node.inputs[i]) for i in (0, 1, 2)]
    lo, hi = (ctx.node.inputs[i] if bound[i] else None for i in (1, 2))
    inside = None
    for b, op in ((lo, "GreaterOrEqual"), (hi, "LessOrEqual")):
        if b is not None:
            cond = t.op(op, x, b)
            inside = cond if inside is None else t.op("And", inside, cond)
    gx = g[0] if inside is None else t.gate(inside, g[0])
    grads = [gx, None, None]
    at_lo = None
    if lo is not None:
        at_lo = t.op("Less", x, lo)
        if hi is not None:
            at_lo = t.op("And", at_lo, t.op("LessOrEqual", lo, hi))
        if ctx.active[1]:
            grads[1] = unbroadcast(ctx, t.op("Where", at_lo, g[0], zero), ctx.y, lo)
    if hi is not None and ctx.active[2]:
        at_hi = t.op("Not", inside if at_lo is None else t.op("Or", inside, at_lo))
        grads[2] = unbroadcast(ctx, t.op("Where", at_hi, g[0], zero), ctx.y, hi)
    return grads[:len(ctx.node.inputs)]


@vjp("Abs", kind=NONLINEAR)
def _abs(ctx, g):
    return [ctx.tape.op("Mul", g[0], ctx.tape.op("Sign", ctx.x))]


@vjp("Sqrt", kind=NONLINEAR)
def _sqrt(ctx, g):
    """``d√x = 1/(2√x)``."""
    return [ctx.tape.op("Div", ctx.tape.op("Mul", g[0], ctx.tape.scalar(0.5)), ctx.y)]


@vjp("Exp", kind=NONLINEAR)
def _exp(ctx, g):
    return [ctx.tape.op("Mul", g[0], ctx.y)]


@vjp("Log", kind=NONLINEAR)
def _log(ctx, g):
    return [ctx.tape.op("Div", g[0], ctx.x)]


@vjp("Reciprocal", kind=NONLINEAR)
def _reciprocal(ctx, g):
    """``d(1/x) = −1/x² = −y²``."""
    t = ctx.tape
    return [t.op("Neg", t.op("Mul", g[0], t.op("Mul", ctx.y, ctx.y)))]


@vjp("Sin", kind=NONLINEAR)
def _sin(ctx, g):
    return [ctx.tape.op("Mul", g[0], ctx.tape.op("Cos", ctx.x))]


@vjp("Cos", kind=NONLINEAR)
def _cos(ctx, g):
    return [ctx.tape.op("Neg", ctx.tape.op("Mul", g[0], ctx.tape.op("Sin", ctx.x)))]


@vjp("Softsign", kind=NONLINEAR)
def _softsign(ctx, g):
    """``y = x/(1 + |x|)``, ``y' = 1/(1 + |x|)²``."""
    t = ctx.tape
    denominator = t.op("Add", t.scalar(1.0), t.op("Abs", ctx.x))
    return [t.op("Div", g[0], t.op("Mul", denominator, denominator))]


@vjp("Mish", kind=NONLINEAR)
def _mish(ctx, g):
    """``y = x·tanh(softplus x)``, ``y' = tanh(sp) + x·σ(x)·(1 − tanh²(sp))``."""
    t, x = ctx.tape, ctx.x
    th = t.op("Tanh", t.op("Softplus", x))
    sech2 = t.op("Sub", t.scalar(1.0), t.op("Mul", th, th))
    d = t.op("Add", th, t.op("Mul", t.op("Mul", x, t.op("Sigmoid", x)), sech2))
    return [t.op("Mul", g[0], d)]


@vjp("Celu", kind=NONLINEAR)
def _celu(ctx, g):
    """``y' = 1`` for ``x > 0``, ``exp(x/α)`` otherwise."""
    t = ctx.tape
    alpha = ctx.node.attr("alpha", 1.0)
    positive = t.op("Greater", ctx.x, t.scalar(0.0))
    slope = t.op("Exp", t.op("Div", ctx.x, t.scalar(alpha)))
    return [t.op("Where", positive, g[0], t.op("Mul", g[0], slope))]


@vjp("ThresholdedRelu", kind=NONLINEAR)
def _thresholded_relu(ctx, g):
    """``y = x`` where ``x > α``, else 0 (mask ``x > α``)."""
    t = ctx.tape
    above = t.op("Greater", ctx.x, t.scalar(ctx.node.attr("alpha", 1.0)))
    return [t.gate(above, g[0])]


@vjp("Shrink", kind=NONLINEAR)
def _shrink(ctx, g):
    """``y = x ∓ bias`` where ``|x| > λ``, else 0 (mask ``|x| > λ``)."""
    t = ctx.tape
    outside = t.op("Greater", t.op("Abs", ctx.x), t.scalar(ctx.node.attr("lambd", 0.5)))
    return [t.gate(outside, g[0])]


@vjp("Pow", kind=NONLINEAR, first_input_only=True)
def _pow(ctx, g):
    """``y = xᵇ``: ``∂x = b·x^(b−1)``, ``∂b = y·ln x`` (an activation exponent: defined for ``x > 0``;
    the node is then normalizing, as nonlinear rules read the base only)."""
    t = ctx.tape
    x, b = ctx.node.inputs
    gx = gb = None
    if ctx.active[0]:
        bc = ctx.const(1)
        if bc is not None:
            factor = t.const(np.asarray(bc, dtype=t.float_dtype), hint="exponent")
            power = t.op("Pow", x, t.const(np.asarray(bc - 1, dtype=t.float_dtype), hint="exponent"))
        else:
            factor, power = b, t.op("Pow", x, t.op("Sub", b, t.scalar(1.0)))
        gx = unbroadcast(ctx, t.op("Mul", g[0], t.op("Mul", factor, power)), ctx.y, x)
    if ctx.active[1]:
        # at x = 0 (b >= 0) y = 0 for every b near: ∂b = 0, not 0·ln 0 = NaN (autograd's convention)
        flat = t.op("And", t.op("Equal", x, t.scalar(0.0)), t.op("GreaterOrEqual", b, t.scalar(0.0)))
        slope = t.op("Where", flat, t.scalar(0.0), t.op("Mul", ctx.y, t.op("Log", x)))
        gb = unbroadcast(ctx, t.op("Mul", g[0], slope), ctx.y, b)
    return [gx, gb]


# --------------------------------------------------------------------------------------------------
# normalizing


def _softmax_axis(ctx: VjpContext) -> int:
    return ctx.node.attr("axis", -1)


@vjp("Softmax", kind=NORMALIZING)
def _softmax(ctx, g):
    t = ctx.tape
    dot = t.reduce_sum(t.op("Mul", g[0], ctx.y), [_softmax_axis(ctx)], keepdims=True)
    return [t.op("Mul", ctx.y, t.op("Sub", g[0], dot))]


@vjp("LogSoftmax", kind=NORMALIZING)
def _log_softmax(ctx, g):
    t = ctx.tape
    total = t.reduce_sum(g[0], [_softmax_axis(ctx)], keepdims=True)
    return [t.op("Sub", g[0], t.op("Mul", t.op("Exp", ctx.y), total))]


# --------------------------------------------------------------------------------------------------
# route


@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze", kind=ROUTE)
def _reshape(ctx, g):
    return [ctx.tape.reshape_like(g[0], ctx.x)] + [None] * (len(ctx.node.inputs) - 1)


@vjp("Identity", kind=ROUTE)
def _identity(ctx, g):
    return [g[0]] + [None] * (len(ctx.node.inputs) - 1)


@vjp("Dropout", kind=ROUTE)
def _dropout(ctx, g):
    """Inference Dropout is the identity. In training mode (``training_mode`` true or computed, ratio
    not 0) it drops random elements: refused, as BatchNormalization in training mode is."""
    if len(ctx.node.inputs) > 2 and ctx.node.inputs[2]:
        training, ratio = ctx.const(2), ctx.const(1)
        has_ratio = len(ctx.node.inputs) > 1 and bool(ctx.node.inputs[1])
        r = 0.5 if not has_ratio else None if ratio is None else float(np.ravel(ratio)[0])
        if (training is None or bool(np.ravel(training)[0])) and r != 0.0:
            raise ctx.fail("Dropout in training mode drops random elements; export the model in eval mode")
    return [g[0]] + [None] * (len(ctx.node.inputs) - 1)


@vjp("Transpose", kind=ROUTE)
def _transpose(ctx, g):
    perm = ctx.node.attr("perm")
    if perm is None:
        perm = list(reversed(range(ctx.graph.rank(ctx.x))))
    inverse = list(np.argsort(perm))
    return [ctx.tape.op("Transpose", g[0], perm=[int(i) for i in inverse])]


@vjp("Concat", kind=ROUTE)
def _concat(ctx, g):
    t = ctx.tape
    axis = ctx.node.attr("axis")
    inputs = ctx.node.inputs
    dims = [ctx.graph.dim(x, axis) for x in inputs]
    if all(isinstance(d, int) for d in dims):
        sizes = t.ints(dims)
    else:
        sizes = t.op("Concat", *[t.op("Gather", t.shape(x), t.ints([axis]), axis=0) for x in inputs], axis=0)
    parts = t.op("Split", g[0], sizes, axis=axis, outputs=len(inputs)) if len(inputs) > 1 else [g[0]]
    return [p if a else None for p, a in zip(parts, ctx.active)]


@vjp("Split", kind=ROUTE)
def _split(ctx, g):
    t = ctx.tape
    pieces = [gi if gi is not None else _zeros_for(ctx, out) for gi, out in zip(g, ctx.node.outputs)]
    return [t.op("Concat", *pieces, axis=ctx.node.attr("axis", 0))] + [None] * (len(ctx.node.inputs) - 1)


def positions(t: Tape, tensor: str) -> str:
    """An int64 tensor shaped like ``tensor`` holding each element's flat index."""
    numel = t.op("ReduceProd", t.shape(tensor), keepdims=0)
    flat = t.op("Range", t.const(np.array(0, dtype=np.int64)), numel, t.const(np.array(1, dtype=np.int64)))
    return t.op("Reshape", flat, t.shape(tensor))


def _positions(ctx: VjpContext) -> str:
    return positions(ctx.tape, ctx.x)


def _scatter_back(ctx: VjpContext, selected: str, g: str, reduction: str | None) -> str:
    """Add each element of ``g`` into the input position it was taken from."""
    t = ctx.tape
    flat_zero = t.op("Reshape", t.zeros_like(ctx.x), t.ints([-1]))
    idx = t.op("Reshape", selected, t.ints([-1]))
    vals = t.op("Reshape", g, t.ints([-1]))
    scattered = t.op("ScatterElements", flat_zero, idx, vals, axis=0, reduction=reduction)
    return t.reshape_like(scattered, ctx.x)


@vjp("Slice", kind=ROUTE)
def _slice(ctx, g):
    taken = ctx.tape.copy_node(ctx.node, [_positions(ctx)] + ctx.node.inputs[1:])
    return [_scatter_back(ctx, taken, g[0], None)] + [None] * (len(ctx.node.inputs) - 1)


@vjp("Gather", kind=ROUTE)
def _gather(ctx, g):
    if ctx.active[1]:
        raise ctx.fail("Gather indices must be integers")
    taken = ctx.tape.copy_node(ctx.node, [_positions(ctx), ctx.node.inputs[1]])
    return [_scatter_back(ctx, taken, g[0], "add"), None]


@vjp("Pad", kind=ROUTE, first_input_only=True)
def _pad(ctx, g):
    t = ctx.tape
    mode = ctx.node.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return [_copied_back(ctx, g[0])] + [None] * (len(ctx.node.inputs) - 1)
    pads = ctx.const(1)
    rank = ctx.graph.rank(ctx.x)
    axes = ctx.const(3)
    if len(ctx.node.inputs) > 3 and ctx.node.inputs[3] and axes is None:
        raise ctx.fail("Pad axes computed at run time are not supported")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    if pads is None:   # Longformer pads by the number of global tokens, a run-time value
        return [_unpadded_at_run_time(ctx, g[0], axes)] + [None] * (len(ctx.node.inputs) - 1)
    n = len(axes)
    begin, end = [int(p) for p in pads[:n]], [int(p) for p in pads[n:]]
    # the padded elements are sliced off g; a negative amount crops x (RWKV's time shift,
    # ZeroPad2d((0, 0, 1, -1))): the cropped elements get zeros back, a Pad of the slice
    ends = [-e if e > 0 else INT64_MAX for e in end]
    kept = t.op("Slice", g[0], t.ints([max(b, 0) for b in begin]), t.ints(ends), t.ints(axes))
    cropped = [0] * (2 * rank)   # all axes: the Pad of opsets before 18 has no axes input
    for axis, b, e in zip(axes, begin, end):
        cropped[axis], cropped[rank + axis] = max(-b, 0), max(-e, 0)
    gx = kept if not any(cropped) else t.op("Pad", kept, t.ints(cropped), t.scalar(0.0))
    grads = [gx] + [None] * (len(ctx.node.inputs) - 1)
    if len(ctx.active) > 2 and ctx.active[2]:
        if ctx.node.inputs[2] in ctx.graph.active:   # an activation pad value: every padded element is it
            # a constant one gets no part here, also where a route rule asks for the parts of
            # constants (context.py): a zero pad value is no per-row bias
            padded = t.op("Sub", t.reduce_sum(g[0], None, keepdims=False),
                          t.reduce_sum(kept, None, keepdims=False))
            grads[2] = t.reshape_like(padded, ctx.node.inputs[2])
        elif not _zero(ctx.const(2)):
            # asked for the parts of constants (context.py): a non-zero constant pad value (EfficientViT
            # pads its values with ones) is a bias at the padded elements; its part there is g's, per
            # element (0 elsewhere), so that it is summed per row
            full = [0] * (2 * rank)
            for axis, b, e in zip(axes, begin, end):
                full[axis], full[rank + axis] = max(b, 0), max(e, 0)
            grads[2] = t.op("Sub", g[0], t.op("Pad", kept, t.ints(full)))
    return grads


def _unpadded_at_run_time(ctx: VjpContext, g: str, axes: list[int]) -> str:
    """The VJP of a constant-mode Pad whose amounts ``[b…, e…]`` are computed at run time: ``g`` sliced
    to ``[max(b, 0), dim − max(e, 0))`` on the padded axes, then padded with zeros by ``max(−b, 0)``,
    ``max(−e, 0)`` where the amounts cropped ``x``."""
    t, n = ctx.tape, len(axes)
    pads, zero = ctx.node.inputs[1], t.ints([0])
    begin = t.op("Slice", pads, t.ints([0]), t.ints([n]))
    end = t.op("Slice", pads, t.ints([n]), t.ints([2 * n]))
    size = t.op("Gather", t.shape(g), t.ints(axes))
    kept = t.op("Slice", g, t.op("Max", begin, zero), t.op("Sub", size, t.op("Max", end, zero)), t.ints(axes))
    cropped = t.op("Concat", t.op("Max", t.op("Neg", begin), zero), t.op("Max", t.op("Neg", end), zero), axis=0)
    rank = ctx.graph.rank(ctx.x)
    if axes != list(range(rank)):   # amounts for every axis (a Pad before opset 18 has no axes input)
        at = t.ints(axes + [rank + a for a in axes])
        cropped = t.op("ScatterElements", t.ints([0] * (2 * rank)), at, cropped, axis=0)
    return t.op("Pad", kept, cropped, t.scalar(0.0))


def _copied_back(ctx: VjpContext, g: str) -> str:
    """The VJP of a Pad that copies input elements into the border (``reflect``, ``edge``, ``wrap``):
    each output element of ``g`` is added into the input position it copies. The positions are the
    same Pad applied to each element's flat index, carried in float64 (exact to 2⁵³; onnxruntime's
    CUDA Pad has no integer kernel), then a ScatterElements with ``reduction = add``."""
    t = ctx.tape
    index = t.op("Cast", _positions(ctx), to=TensorProto.DOUBLE)
    inputs = [index] + ctx.node.inputs[1:2]
    if len(ctx.node.inputs) > 2:   # no constant value (it would be float, not double), the same axes
        inputs += [""] + ctx.node.inputs[3:]
    copied = t.copy_node(ctx.node, inputs)
    return _scatter_back(ctx, t.op("Cast", copied, to=TensorProto.INT64), g, "add")


def _zero(value) -> bool:
    """A constant pad value that is 0 (or absent); None (computed at run time) is not."""
    return value is not None and not np.any(value)


@vjp("Expand", kind=ROUTE)
def _expand(ctx, g):
    return [unbroadcast(ctx, g[0], ctx.y, ctx.x), None]


@vjp("Where", kind=ROUTE)
def _where(ctx, g):
    """``y = Where(c, a, b)``: ``g`` where c holds to ``a``, elsewhere to ``b`` (c is boolean, never
    active). A branch that is not an activation (a fill value, asked for by a route rule as the part of
    a constant, context.py) gets its part per output element, not summed to its own shape: a scalar
    fill would otherwise sum over the batch, and a bias is reported per row."""
    t = ctx.tape
    zero = t.scalar(0.0)
    c = ctx.node.inputs[0]

    def branch(index: int, part: str) -> str | None:
        x = ctx.node.inputs[index]
        if not ctx.active[index]:
            return None
        return unbroadcast(ctx, part, ctx.y, x) if x in ctx.graph.active else part

    return [None, branch(1, t.op("Where", c, g[0], zero)), branch(2, t.op("Where", c, zero, g[0]))]


@vjp("Cast", kind=ROUTE)
def _cast(ctx, g):
    """A float-to-float Cast: ``g`` cast to the pass's float type (half types are read as float32). A cast
    to an integer type is never active: the model reader refuses an output that depends on x only so."""
    return [ctx.tape.op("Cast", g[0], to=ctx.tape.float_type)]


@vjp("Tile", "GatherElements", "GatherND", kind=ROUTE)
def _select(ctx, g):
    """Selections by constant or integer indices: the node re-run on element positions says where each
    output element came from; ``g`` is added back there (repeats add up)."""
    if any(ctx.active[1:]):
        raise ctx.fail(f"the {ctx.node.op_type} repeats or indices must be integers, not activations")
    taken = ctx.tape.copy_node(ctx.node, [_positions(ctx)] + ctx.node.inputs[1:])
    return [_scatter_back(ctx, taken, g[0], "add")] + [None] * (len(ctx.node.inputs) - 1)


@vjp("TopK", kind=ROUTE)
def _top_k(ctx, g):
    """``values, indices = TopK(x, k)``: a selection along ``axis`` by the forward's own ``indices``
    (distinct per row, so a plain scatter): ``g`` of the values goes back to where each came from.
    ``k`` is an integer and ``indices`` an integer output: neither takes a gradient."""
    t = ctx.tape
    if g[0] is None:
        return [None] * len(ctx.node.inputs)
    indices = ctx.request_output(ctx.node, 1)
    gx = t.op("ScatterElements", t.zeros_like(ctx.x), indices, g[0], axis=ctx.node.attr("axis", -1))
    return [gx] + [None] * (len(ctx.node.inputs) - 1)


def _shape_of_parts(ctx: VjpContext, parts: list) -> str:
    """An int64 shape tensor from parts: ints, or ``(start, end, divisor)``, a slice of ``x``'s shape
    divided by ``divisor``."""
    t = ctx.tape
    pieces = []
    for part in parts:
        if isinstance(part, int):
            pieces.append(t.ints([part]))
        else:
            start, end, divisor = part
            dims = t.shape(ctx.x, start=start, end=end)
            pieces.append(dims if divisor == 1 else t.op("Div", dims, t.ints([divisor] * (end - start))))
    return t.op("Concat", *pieces, axis=0)


def _blocks_back(ctx: VjpContext, g: str, parts: list, perm: list[int]) -> str:
    """VJP of ``reshape → transpose(perm) → reshape``: ``g`` viewed as the transposed 6-d tensor
    (shape ``parts``), the transpose undone, viewed as ``x``."""
    t = ctx.tape
    inverse = [int(i) for i in np.argsort(perm)]
    unpermuted = t.op("Transpose", t.op("Reshape", g, _shape_of_parts(ctx, parts)), perm=inverse)
    return t.reshape_like(unpermuted, ctx.x)


@vjp("DepthToSpace", kind=ROUTE)
def _depth_to_space(ctx, g):
    """DCR: ``[N, b, b, C/b², H, W]`` transposed ``(0, 3, 4, 1, 5, 2)``; CRD: ``[N, C/b², b, b, H, W]``
    transposed ``(0, 1, 4, 2, 5, 3)``; both give ``[N, C/b², H, b, W, b]``."""
    b = ctx.node.attr("blocksize")
    mode = _text_attr(ctx, "mode", "DCR")
    perm = [0, 3, 4, 1, 5, 2] if mode == "DCR" else [0, 1, 4, 2, 5, 3]
    parts = [(0, 1, 1), (1, 2, b * b), (2, 3, 1), b, (3, 4, 1), b]
    return [_blocks_back(ctx, g[0], parts, perm)]


@vjp("SpaceToDepth", kind=ROUTE)
def _space_to_depth(ctx, g):
    """``[N, C, H/b, b, W/b, b]`` transposed, DCR: ``(0, 3, 5, 1, 2, 4)`` to ``[N, b, b, C, H/b, W/b]``;
    CRD (opset 28's ``mode``): ``(0, 1, 3, 5, 2, 4)`` to ``[N, C, b, b, H/b, W/b]``."""
    b = ctx.node.attr("blocksize")
    if _text_attr(ctx, "mode", "DCR") == "DCR":
        parts, perm = [(0, 1, 1), b, b, (1, 2, 1), (2, 3, b), (3, 4, b)], [0, 3, 5, 1, 2, 4]
    else:
        parts, perm = [(0, 1, 1), (1, 2, 1), b, b, (2, 3, b), (3, 4, b)], [0, 1, 3, 5, 2, 4]
    return [_blocks_back(ctx, g[0], parts, perm)]


# --------------------------------------------------------------------------------------------------
# max


@vjp("MaxPool", kind=MAX)
def _maxpool(ctx, g):
    if ctx.node.attr("storage_order", 0):   # column-major Indices: the row-major ones of a copy instead
        attrs = {a.name: helper.get_attribute_value(a) for a in ctx.node.attribute_protos
                 if a.name != "storage_order"}
        indices = ctx.tape.op("MaxPool", ctx.x, outputs=2, **attrs)[1]
    else:
        indices = ctx.request_output(ctx.node, 1)
    return [_scatter_back(ctx, indices, g[0], "add")]


def first_max_masks(t: Tape, operands: list[str], y: str) -> list[str]:
    """For each operand, where it is the first to equal the max ``y`` (autograd's tie rule)."""
    taken, masks = None, []
    for x in operands:
        hit = t.op("Equal", x, y)
        if taken is not None:
            hit = t.op("And", hit, t.op("Not", taken))
        taken = hit if taken is None else t.op("Or", taken, hit)
        masks.append(hit)
    return masks


@vjp("Max", kind=MAX)
def _max(ctx, g):
    t = ctx.tape
    masks = first_max_masks(t, ctx.node.inputs, ctx.y)
    return [unbroadcast(ctx, t.op("Where", hit, g[0], t.scalar(0.0)), ctx.y, x) if active else None
            for hit, x, active in zip(masks, ctx.node.inputs, ctx.active)]


@vjp("Min", kind=MAX)
def _min(ctx, g):
    """The first operand equal to the minimum takes ``g`` (Max's tie rule)."""
    return _max(ctx, g)


def _argmax_mask(ctx: VjpContext, flat: str, axis: int, arg: str = "ArgMax", rank: int | None = None) -> str:
    """Boolean mask of the first arg-max (``arg="ArgMin"``: arg-min) along ``axis`` of ``flat`` (ties:
    the first index); ``rank``: that of ``flat`` where it is not ``x`` and not 3."""
    t = ctx.tape
    am = t.op(arg, flat, axis=axis, keepdims=1)
    size = t.op("Gather", t.shape(flat), t.ints([axis]), axis=0)
    rng = t.op("Range", t.const(np.array(0, dtype=np.int64)), t.op("Squeeze", size),
               t.const(np.array(1, dtype=np.int64)))
    rank = rank or (ctx.graph.rank(ctx.x) if flat == ctx.x else 3)
    shape = [1] * rank
    shape[axis] = -1
    return t.op("Equal", t.op("Reshape", rng, t.ints(shape)), am)


@vjp("GlobalMaxPool", kind=MAX)
def _global_max_pool(ctx, g):
    t = ctx.tape
    flat = t.op("Reshape", ctx.x, t.ints([0, 0, -1]))
    mask = _argmax_mask(ctx, flat, 2)
    spread = t.op("Where", mask, t.op("Reshape", g[0], t.ints([0, 0, 1])), t.scalar(0.0))
    return [t.reshape_like(spread, ctx.x)]


@vjp("ReduceMax", "ReduceMin", kind=MAX)
def _reduce_max(ctx, g):
    t = ctx.tape
    axes = _reduce_axes(ctx)
    if axes == []:
        return [g[0]] + [None] * (len(ctx.node.inputs) - 1)
    rank = ctx.graph.rank(ctx.x)
    axes = list(range(rank)) if axes is None else axes
    gk = g[0] if ctx.node.attr("keepdims", 1) else t.unsqueeze(g[0], axes)
    arg = "ArgMin" if ctx.node.op_type == "ReduceMin" else "ArgMax"
    if len(axes) == 1:
        mask = _argmax_mask(ctx, ctx.x, axes[0], arg)
    else:   # several axes: moved last and merged into one (ties: the first in row-major order)
        kept = [a for a in range(rank) if a not in axes]
        moved = t.op("Transpose", ctx.x, perm=kept + axes)
        flat = t.op("Reshape", moved, t.ints([0] * len(kept) + [-1]))
        merged = _argmax_mask(ctx, flat, len(kept), arg, rank=len(kept) + 1)
        mask = t.op("Transpose", t.op("Reshape", merged, t.shape(moved)),
                    perm=[int(i) for i in np.argsort(kept + axes)])
    return [t.op("Where", mask, gk, t.scalar(0.0))] + [None] * (len(ctx.node.inputs) - 1)


# window sums for the radial rule ------------------------------------------------------------------


def _maxpool_sum_transpose(ctx, g):
    return [_sum_pool_transpose(ctx, g, 1.0)]


@window_sum("MaxPool", _maxpool_sum_transpose)
def _maxpool_sum(ctx, xs):
    return _sum_pool(ctx, xs[0])


def _global_sum_transpose(ctx, g):
    return [ctx.tape.op("Expand", g, ctx.tape.shape(ctx.x))]


@window_sum("GlobalMaxPool", _global_sum_transpose)
def _global_max_sum(ctx, xs):
    return ctx.tape.reduce_sum(xs[0], list(range(2, ctx.graph.rank(ctx.x))), keepdims=True)


def _max_sum_transpose(ctx, g):
    return [unbroadcast(ctx, g, ctx.y, x) if a else None for x, a in zip(ctx.node.inputs, ctx.active)]


@window_sum("Max", _max_sum_transpose)
def _max_sum(ctx, xs):
    t = ctx.tape
    terms = [x for x in xs if x is not None]
    return t.sum(terms) if len(terms) > 1 else t.op("Identity", terms[0])


# --------------------------------------------------------------------------------------------------
# normalizing: LayerNormalization


def _layer_norm_stats(ctx: VjpContext, axes: list[int]) -> tuple[str, str]:
    """(μ, 1/σ) of a LayerNormalization over ``axes``, shaped to broadcast over x: the node's own
    Mean and InvStdDev outputs where their type (float32, the spec's only one) is the input's, else
    computed again from x in the input's precision."""
    from onnx import TensorProto

    if not ctx.node.members and ctx.graph.dtypes.get(ctx.x) == TensorProto.FLOAT:
        return ctx.request_output(ctx.node, 1), ctx.request_output(ctx.node, 2)
    t = ctx.tape
    mean = t.reduce("ReduceMean", ctx.x, axes)
    centered = t.op("Sub", ctx.x, mean)
    variance = t.reduce("ReduceMean", t.op("Mul", centered, centered), axes)
    std = t.op("Sqrt", t.op("Add", variance, t.scalar(ctx.node.attr("epsilon", 1e-5))))
    return mean, t.op("Reciprocal", std)


def layer_norm_axes(ctx: VjpContext) -> list[int]:
    """The normalized axes of a LayerNormalization, whose scale and bias must be constant."""
    if any(ctx.active[1:]):
        raise ctx.fail("LayerNormalization with a scale or bias computed from the input is not supported")
    rank = ctx.graph.rank(ctx.x)
    if rank is None:
        raise ctx.fail("the input's rank is unknown")
    return list(range(ctx.node.attr("axis", -1) % rank, rank))


@vjp("LayerNormalization", kind=NORMALIZING)
def _layer_normalization(ctx, g):
    """``y = x̂ ⊙ γ + β``, ``x̂ = (x − μ)/σ`` over the axes from ``axis`` on (γ, β constant):
    ``a(x) = (ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)) / σ`` with ``ĝ = g ⊙ γ``."""
    if any(gi is not None for gi in g[1:]):
        raise ctx.fail("the Mean and InvStdDev outputs of LayerNormalization feed the explained output; "
                       "only Y is supported")
    t = ctx.tape
    axes = layer_norm_axes(ctx)
    mean, inv_std = _layer_norm_stats(ctx, axes)
    normalized = t.op("Mul", t.op("Sub", ctx.x, mean), inv_std)
    scale = ctx.node.inputs[1] if len(ctx.node.inputs) > 1 else ""
    gh = t.op("Mul", g[0], scale) if scale else g[0]
    mean_g = t.reduce("ReduceMean", gh, axes)
    mean_gx = t.reduce("ReduceMean", t.op("Mul", gh, normalized), axes)
    centered = t.op("Sub", t.op("Sub", gh, mean_g), t.op("Mul", normalized, mean_gx))
    return [t.op("Mul", centered, inv_std)] + [None] * (len(ctx.node.inputs) - 1)
