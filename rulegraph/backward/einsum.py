"""Einsum: its VJP, its kind and its LRP weight operand.

``y = einsum(eq, x₁, …, xₙ)`` is multilinear: linear in each operand with the others fixed, so the
cotangent of operand ``i`` is the Einsum of ``g`` with the other operands, written to operand ``i``'s
subscripts: ``a(xᵢ) = einsum("out, …others… -> termᵢ", g, …)``. A letter only operand ``i`` has
(summed out within it, ``"ij->i"``) is spread back by a ones operand of its size; ellipsis dims that
operand ``i`` broadcast are summed back to its shape. Linear with one active operand, bilinear (the
uniform and gate rules) with more.

A repeated letter in an active operand (a diagonal, ``"...ii->...i"``): the cotangent of the diagonal
(each letter once) is written onto it by an identity operand, ``einsum("…i, ij -> …ij", d, I)``.

Refused by name: an ellipsis in an active operand that the output drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import numpy_helper

from ..graph.kinds import LINEAR
from .vjp import VjpContext, _sum_to, linear_params, vjp

ELLIPSIS = "."   # "..." after parsing: one character stands for it


@dataclass(frozen=True)
class Equation:
    """The operands' subscripts and the output's, each a string with ``.`` for ``...``."""

    terms: tuple[str, ...]
    output: str


def parse_equation(text: str) -> Equation:
    """An Einsum equation with spaces removed and ``...`` as ``.``; an implicit output (no ``->``)
    made explicit as ONNX defines it: the ellipsis first, then the letters used once, sorted."""
    text = text.replace(" ", "").replace("...", ELLIPSIS)
    left, arrow, right = text.partition("->")
    terms = tuple(left.split(","))
    if not arrow:
        letters = "".join(terms).replace(ELLIPSIS, "")
        once = sorted(c for c in set(letters) if letters.count(c) == 1)
        right = (ELLIPSIS if any(ELLIPSIS in t for t in terms) else "") + "".join(once)
    return Equation(terms, right)


def _spelled(term: str) -> str:
    return term.replace(ELLIPSIS, "...")


def _axis_of(term: str, letter: str) -> int:
    """The axis of ``letter`` in an operand with subscripts ``term`` (counted from the end after an
    ellipsis, whose rank is not known from the equation)."""
    at = term.index(letter)
    if ELLIPSIS in term and at > term.index(ELLIPSIS):
        return at - len(term)
    return at


def _einsum_equation(ctx: VjpContext) -> Equation:
    equation = ctx.node.attr("equation")
    return parse_equation(equation.decode() if isinstance(equation, bytes) else equation)


@vjp("Einsum", kind=LINEAR, bilinear=True)
def _einsum(ctx, g):
    """``a(xᵢ) = einsum(out, others…, ones(lonely letters) -> termᵢ)(g, …)``, summed back over the
    ellipsis dims ``xᵢ`` broadcast."""
    t = ctx.tape
    eq = _einsum_equation(ctx)
    out: list[str | None] = [None] * len(ctx.node.inputs)
    for i, (x, term) in enumerate(zip(ctx.node.inputs, eq.terms)):
        if not ctx.active[i]:
            continue
        letters = "".join(dict.fromkeys(term.replace(ELLIPSIS, "")))
        if ELLIPSIS in term and ELLIPSIS not in eq.output:
            raise ctx.fail(f"the Einsum equation sums out the ellipsis of operand {i} ('{_spelled(term)}' -> "
                           f"'{_spelled(eq.output)}'); its gradient is not supported. Write the summed axes "
                           "as letters")
        others = [(eq.terms[j], ctx.node.inputs[j]) for j in range(len(eq.terms)) if j != i]
        seen = set(eq.output + "".join(s for s, _ in others))
        lonely = [c for c in letters if c not in seen]
        terms = [eq.output] + [s for s, _ in others]
        operands = [g[0]] + [name for _, name in others]
        if lonely:
            sizes = t.op("Gather", t.shape(x), t.ints([_axis_of(term, c) for c in lonely]), axis=0)
            ones = t.op("ConstantOfShape", sizes, value=_one(t.float_dtype))
            terms.append("".join(lonely))
            operands.append(ones)
        diagonal = "".join(dict.fromkeys(term))      # a repeated letter once: the operand's diagonal
        spelled = ",".join(_spelled(s) for s in terms) + "->" + _spelled(diagonal)
        d = t.op("Einsum", *operands, equation=spelled)
        if diagonal != term:
            d = _onto_diagonal(t, d, diagonal, term, x, eq)
        out[i] = _sum_to(t, d, x, x) if ELLIPSIS in term else d
    return out


def _onto_diagonal(t, d: str, diagonal: str, term: str, x: str, eq: Equation) -> str:
    """``d`` (subscripts ``diagonal``, each letter once) written onto the diagonal of an operand with
    subscripts ``term``: each repeat of a letter ``c`` renamed to a fresh ``c'`` and ``d`` multiplied
    by the identity ``[c = c']``, ``einsum("diagonal, cc', … -> term'", d, I, …)``."""
    used = set("".join(eq.terms) + eq.output)
    fresh = (c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used)
    renamed, seen, terms, operands = [], set(), [diagonal], [d]
    for c in term:
        if c in seen and c != ELLIPSIS:
            other = next(fresh)
            size = t.op("Squeeze", t.op("Gather", t.shape(x), t.ints([_axis_of(term, c)]), axis=0))
            zero, one = (t.const(np.array(v, dtype=np.int64)) for v in (0, 1))
            n = t.op("Range", zero, size, one)
            eye = t.op("Cast", t.op("Equal", t.unsqueeze(n, [1]), t.unsqueeze(n, [0])), to=t.float_type)
            terms.append(c + other)
            operands.append(eye)
            c = other
        seen.add(c)
        renamed.append(c)
    spelled = ",".join(_spelled(s) for s in terms) + "->" + _spelled("".join(renamed))
    return t.op("Einsum", *operands, equation=spelled)


def _one(dtype):
    return numpy_helper.from_array(np.ones(1, dtype=dtype), "value")


@linear_params("Einsum")
def _einsum_params(ctx):
    """The LRP weight rules read a two-operand Einsum with one constant operand as a linear map."""
    active = [i for i, a in enumerate(ctx.active) if a]
    if len(ctx.node.inputs) != 2 or len(active) != 1 or ctx.const(1 - active[0]) is None:
        raise ctx.fail("the LRP weight rules need an Einsum of two operands, one activation and one "
                       "constant weight")
    return 1 - active[0], None
