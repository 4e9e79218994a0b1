"""GridSample and AffineGrid.

GridSample: ``Y[n, c, o] = Σ_i A[n, o, i] X[n, c, i]``, each output point ``o`` interpolating the
input at the location its grid entry gives (nearest, linear or cubic; zeros, border or reflection
padding; align_corners). For a constant grid it is linear in ``X``, without bias (``f(0) = 0``).

Every mode and padding is separable over the spatial axes: ``A[n, o, (i₁, …, i_r)] = Π_a W_a[n, o, i_a]``
(a tap outside the input adds nothing or is moved to a place inside, per axis). So the VJP never
rewrites the runtime's coordinate arithmetic: ``W_a`` is the node itself on an identity, the
``S_a`` unit vectors of axis ``a`` as channels, every other spatial axis of size 2 and its
location 0 (a tap of weight exactly 1 in every mode, the other taps' weights exactly 0). A row of ``W_a``
has at most ``k`` weights that are not 0 (nearest 1, linear 2, cubic 4; cubic's can be negative):
TopK of ``|W_a|`` finds them. The ``Π k_a`` combinations give each output point's taps and weights,
and ``∂X = Σ_o g[n, c, o] A[n, o, i]`` is a ScatterElements that adds ``g ⊙ weight`` at the taps.

A grid computed from the input (a spatial transformer's) is refused: its gradient, the slope of the
interpolation weights in the location, is not supported.
"""

from __future__ import annotations

import numpy as np

from ..graph.kinds import LINEAR
from .vjp import _text_attr, vjp

#: taps per axis of each interpolation mode (opset 16's names and 20's)
TAPS = {"nearest": 1, "bilinear": 2, "linear": 2, "bicubic": 4, "cubic": 4}


@vjp("GridSample", kind=LINEAR, first_input_only=True)
def _grid_sample(ctx, g):
    """``∂X = Σ_o g[n, c, o] Π_a W_a[n, o, i_a]`` over each output point's taps (module docstring)."""
    if ctx.active[1]:
        raise ctx.fail("GridSample with a grid computed from the input (a spatial transformer) is not "
                       "supported: rulegraph differentiates it in X for a constant grid only; export "
                       "the grid as a constant, or explain the model up to the grid")
    t = ctx.tape
    mode = _text_attr(ctx, "mode", "bilinear" if t.opset < 20 else "linear")
    shape = ctx.graph.shapes.get(ctx.x)
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        raise ctx.fail("GridSample needs the input's spatial sizes known when the model is read; "
                       "export with a fixed input size")
    sizes, r = [int(d) for d in shape[2:]], len(shape) - 2
    batch = t.shape(ctx.node.inputs[1], start=0, end=1)
    weights, taps = None, None
    # the other axes: size 2 (reflection about a single place divides by 0), location 0, which is
    # the coordinate −1 with align_corners, else −0.5
    corner = -1.0 if ctx.node.attr("align_corners", 0) else -0.5
    for a, size in enumerate(sizes):
        eye = np.eye(size).reshape([1, size] + [size if b == a else 1 for b in range(r)])
        eye = np.broadcast_to(eye, [1, size] + [size if b == a else 2 for b in range(r)])
        basis = t.op("Expand", t.const(np.ascontiguousarray(eye, dtype=t.float_dtype), hint="eye"),
                     t.op("Concat", batch, t.ints(eye.shape[1:]), axis=0))
        keep = np.zeros(r)
        keep[r - 1 - a] = 1.0   # the grid's last axis holds (x, y, z): the last spatial axis first
        grid = t.op("Add", t.op("Mul", ctx.node.inputs[1], t.const(keep.astype(t.float_dtype), hint="keep")),
                    t.const((corner * (1 - keep)).astype(t.float_dtype), hint="corner"))
        rows = t.copy_node(ctx.node, [basis, grid])                       # [N, S_a, O…]
        rows = t.op("Transpose", t.op("Reshape", rows, t.op("Concat", batch, t.ints([size, -1]), axis=0)),
                    perm=[0, 2, 1])                                       # [N, Ō, S_a]
        k = min(TAPS[mode], size)
        _, where = t.op("TopK", t.op("Abs", rows), t.ints([k]), axis=-1, outputs=2)
        w = t.op("GatherElements", rows, where, axis=-1)
        if weights is None:
            weights, taps = w, where
            continue
        # combine with the axes before: [N, Ō, K] × [N, Ō, k] -> [N, Ō, K·k]
        weights = t.op("Mul", t.unsqueeze(weights, [-1]), t.unsqueeze(w, [-2]))
        taps = t.op("Add", t.op("Mul", t.unsqueeze(taps, [-1]), t.ints([size])), t.unsqueeze(where, [-2]))
        weights = t.op("Reshape", weights, t.ints([0, 0, -1]))
        taps = t.op("Reshape", taps, t.ints([0, 0, -1]))
    # g [N, C, Ō, 1] ⊙ weights [N, 1, Ō, K] scattered into ∂X [N, C, Π S] at taps [N, 1, Ō·K]
    flat_g = t.op("Reshape", g[0], t.ints([0, 0, -1, 1]))
    updates = t.op("Reshape", t.op("Mul", flat_g, t.unsqueeze(weights, [1])), t.ints([0, 0, -1]))
    where = t.op("Expand", t.op("Reshape", taps, t.ints([0, 1, -1])), t.shape(updates))
    zeros = t.op("Reshape", t.zeros_like(ctx.x), t.ints([0, 0, -1]))
    gx = t.op("ScatterElements", zeros, where, updates, axis=2, reduction="add")
    return [t.reshape_like(gx, ctx.x), None]


def affine_base(sizes: list[int], align_corners: int) -> np.ndarray:
    """AffineGrid's homogeneous base grid ``B [Π sizes, r + 1]``: rows ``(x, y[, z], 1)`` in row-major
    order of the spatial axes, ``x`` along the last; each axis's coordinates ``−1 + (2i + 1)/n``, or
    ``−1 + 2i/(n − 1)`` with align_corners."""
    axes = [np.linspace(-1.0, 1.0, n) if align_corners else (2 * np.arange(n) + 1) / n - 1.0 for n in sizes]
    mesh = np.meshgrid(*axes, indexing="ij")
    columns = [m.ravel() for m in reversed(mesh)] + [np.ones(int(np.prod(sizes)))]
    return np.stack(columns, axis=1)


@vjp("AffineGrid", kind=LINEAR)
def _affine_grid(ctx, g):
    """``grid[n, o] = θ[n] · B[o]`` (``affine_base``), linear in ``θ``: ``∂θ[n] = Σ_o g[n, o]ᵀ B[o]``,
    one MatMul with the constant ``B``. Needs the size input constant (the base grid is built when
    the model is read)."""
    t = ctx.tape
    size = ctx.const(1)
    if size is None or ctx.active[1]:
        raise ctx.fail("AffineGrid needs a constant size input; export with a fixed output size")
    spatial = [int(d) for d in size[2:]]
    if ctx.node.attr("align_corners", 0) and min(spatial) < 2:
        raise ctx.fail("AffineGrid with align_corners over an axis of size 1 has no base grid (its step "
                       "2/(n − 1) divides by 0); use align_corners = 0")
    base = t.const(affine_base(spatial, ctx.node.attr("align_corners", 0)).astype(t.float_dtype), hint="base")
    rows = t.op("Reshape", g[0], t.ints([0, -1, len(spatial)]))                 # [N, Ō, r]
    return [t.op("MatMul", t.op("Transpose", rows, perm=[0, 2, 1]), base), None]
