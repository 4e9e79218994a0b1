"""Routes beyond ``vjp.py``'s: Trilu, ReverseSequence, Compress, CenterCropPad and MaxUnpool, each of
whose output elements is an input element or 0; and Hardmax, whose one-hot output is constant
between its ties (normalizing: it carries no input value, so no route rule's conservation holds).

* Trilu keeps a triangle and zeroes the rest: a mask, its own transpose (``Trilu(g)``).
* ReverseSequence reverses the first ``len_b`` steps of each sequence: an involution that is a
  permutation, hence its own transpose (``ReverseSequence(g)``).
* Compress keeps the slices (or flat elements) where a boolean condition holds: ``g`` is scattered
  back to the positions that the same Compress of element positions gives.
* CenterCropPad crops the centre (start ``⌊(n − m)/2⌋``) or pads around it (``⌊(m − n)/2⌋`` before):
  ``g`` is cut where the input was padded and zero-padded where it was cropped.
* MaxUnpool writes ``X`` at the flat indices ``I`` (MaxPool's, over the whole tensor) of a zero
  output, shaped ``output_shape`` where given (the pooled input's size, as onnxruntime does; onnx's
  reference places ``I`` in the size that kernel, strides and pads give, then pads): its VJP
  gathers ``g`` at ``I``. Of a repeated index (windows that share their maximum) the last copy is
  written, as onnxruntime's CPU kernel writes them in order: it alone takes ``g``.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..graph.kinds import NORMALIZING, ROUTE
from .vjp import _positions, _scatter_back, _zeros_for, positions, vjp


@vjp("Trilu", "ReverseSequence", kind=ROUTE)
def _self_transposed(ctx, g):
    """A mask (Trilu) or a permutation that is its own inverse (ReverseSequence): the same node on ``g``,
    ``k`` and ``sequence_lens`` as given (integers)."""
    if any(ctx.active[1:]):
        raise ctx.fail(f"the {ctx.node.op_type} k or sequence lengths must be integers, not activations")
    return [ctx.tape.copy_node(ctx.node, [g[0]] + ctx.node.inputs[1:])] + [None] * (len(ctx.node.inputs) - 1)


@vjp("Compress", kind=ROUTE)
def _compress(ctx, g):
    """``g`` scattered back to the positions ``Compress(positions(x), condition)`` (module docstring)."""
    taken = ctx.tape.copy_node(ctx.node, [_positions(ctx), ctx.node.inputs[1]])
    return [_scatter_back(ctx, taken, g[0], None), None]


@vjp("CenterCropPad", kind=ROUTE)
def _center_crop_pad(ctx, g):
    """Padded axes cut out of ``g``, cropped axes zero-padded back (module docstring). Needs the target
    shape constant and the input's sizes on those axes known when the model is read (CUDA has no
    CenterCropPad to run again)."""
    t = ctx.tape
    target, rank = ctx.const(1), ctx.graph.rank(ctx.x)
    if target is None or rank is None:
        raise ctx.fail("CenterCropPad needs a constant shape input and an input of known rank; export "
                       "the crop size as a constant")
    axes = [int(a) % rank for a in ctx.node.attr("axes", range(rank))]
    starts, ends, cut_axes, pads = [], [], [], [0] * (2 * rank)
    for axis, want in zip(axes, (int(v) for v in target)):
        size = ctx.graph.dim(ctx.x, axis)
        if not isinstance(size, int):
            raise ctx.fail(f"CenterCropPad on axis {axis}, whose size is not known when the model is read, "
                           "is not supported; export with a fixed input size")
        if want > size:   # padded: the input sits at (want − size) // 2
            begin = (want - size) // 2
            starts.append(begin)
            ends.append(begin + size)
            cut_axes.append(axis)
        elif want < size:   # cropped: the window starts at (size − want) // 2
            begin = (size - want) // 2
            pads[axis], pads[rank + axis] = begin, size - want - begin
    gx = g[0]
    if cut_axes:
        gx = t.op("Slice", gx, t.ints(starts), t.ints(ends), t.ints(cut_axes))
    if any(pads):
        gx = t.op("Pad", gx, t.ints(pads))
    elif not cut_axes:
        gx = t.op("Identity", gx)
    return [gx, None]


@vjp("MaxUnpool", kind=ROUTE)
def _max_unpool(ctx, g):
    """``∂X_i = g[I_i]`` where element ``i`` is the last written to ``I_i``, else 0 (module docstring):
    the last writer of each place is the largest position scattered there (``reduction = max``)."""
    t = ctx.tape
    if ctx.active[1]:
        raise ctx.fail("MaxUnpool's indices must be integers")
    indices = ctx.node.inputs[1]
    flat = t.op("Reshape", g[0], t.ints([-1]))
    order = positions(t, indices)
    nobody = t.op("ConstantOfShape", t.shape(flat), value=numpy_helper.from_array(np.array([-1], np.int64)))
    last = t.op("ScatterElements", nobody, t.op("Reshape", indices, t.ints([-1])),
                t.op("Reshape", order, t.ints([-1])), axis=0, reduction="max")
    written = t.op("Equal", t.op("Gather", last, indices, axis=0), order)
    gx = t.op("Where", written, t.op("Gather", flat, indices, axis=0), t.scalar(0.0))
    return [gx] + [None] * (len(ctx.node.inputs) - 1)


@vjp("Hardmax", kind=NORMALIZING)
def _hardmax(ctx, g):
    """``y = one_hot(argmax x)`` along ``axis``: constant between ties, ``y' = 0``."""
    return [_zeros_for(ctx, ctx.x)]

