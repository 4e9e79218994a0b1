"""The rules on Einsum, the normalizations (Instance, Group, RMS) and Attention-23 against
closed-form numpy replicas (seeded pass on the ONNX reference evaluator, float64, ``start one``:
``a(y)`` is an arbitrary array)."""

from __future__ import annotations

import numpy as np
import pytest
from oracles import blip
from test_transformer import model, node, rules, seeded

RNG = np.random.default_rng(23)


# Einsum under normalized (one active operand) and uniform (several) --------------------------------

EINSUM_UNIFORM = {
    # equation, operand shapes, numpy replica of y
    "two-active": ("bij,bjk->bik", {"a": [2, 3, 4], "b": [2, 4, 5]}),
    "three-active": ("ij,j,jk->ik", {"a": [3, 4], "b": [4], "c": [4, 2]}),
    "lonely-letter": ("ij,ik->k", {"a": [3, 4], "b": [3, 5]}),
}


def _einsum_vjps(equation: str, xs: dict, s: np.ndarray) -> dict:
    """``∂<s, y>/∂x_k``, exact: y is linear in each operand, so the gradient of
    ``<s, einsum(..x_k..)>`` is read off basis vectors (exact, small shapes)."""
    grads = {}
    for k, x in xs.items():
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = 1.0
            g[idx] = np.sum(s * np.einsum(equation, *[e if n == k else v for n, v in xs.items()]))
        grads[k] = g
    return grads


@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("case", sorted(EINSUM_UNIFORM))
def test_uniform_einsum_shares_equally(case, eps):
    equation, shapes = EINSUM_UNIFORM[case]
    xs = {k: RNG.normal(size=s) for k, s in shapes.items()}
    y = np.einsum(equation, *xs.values())
    g = RNG.normal(size=y.shape)
    m = model([node("Einsum", list(xs), "y", equation=equation)], shapes)
    out = seeded(m, rules(f"bilinear -> uniform(eps = {eps})\n"), xs, g)
    q = g / blip(y, eps) if eps else g / y
    grads = _einsum_vjps(equation, xs, q)
    for k, x in xs.items():
        np.testing.assert_allclose(out["R"][k], x * grads[k] / len(xs), rtol=1e-9, atol=1e-12)
    total = sum(r.sum() for r in out["R"].values())
    assert total == pytest.approx((q * y).sum(), rel=1e-9)


def test_normalized_einsum_with_a_constant_operand():
    """One active operand: linear, the ε-rule ``a(x) = x ⊙ Lᵀ(a(y)/blip(y))``."""
    x, c = RNG.normal(size=(3, 4)), RNG.normal(size=(4, 5))
    y = np.einsum("ij,jk->ik", x, c)
    g = RNG.normal(size=y.shape)
    m = model([node("Einsum", ["x", "c"], "y", equation="ij,jk->ik")], {"x": [3, 4]}, {"c": c})
    out = seeded(m, rules("linear -> normalized(eps = 1e-3)\n"), {"x": x}, g)
    np.testing.assert_allclose(out["R"]["x"], x * ((g / blip(y, 1e-3)) @ c.T), rtol=1e-10)


# Scatter: route without a reduction, linear with reduction add ------------------------------------

SCATTER_KINDS = [
    ("ScatterND", {}, 16, "route"),
    ("ScatterND", {"reduction": "none"}, 16, "route"),
    ("ScatterND", {"reduction": "add"}, 16, "linear"),
    ("ScatterElements", {}, 11, "route"),
    ("ScatterElements", {"reduction": "add"}, 18, "linear"),
]


@pytest.mark.parametrize("op_type, attrs, opset, kind", SCATTER_KINDS)
def test_scatter_kind_follows_its_reduction(op_type, attrs, opset, kind):
    from rulegraph.backward import ops as G

    idx = np.array([[1, 0]]) if op_type == "ScatterND" else np.array([[0, 1]])
    shape_u = [1] if op_type == "ScatterND" else [1, 2]
    m = model([node(op_type, ["x", "idx", "u"], "y", **attrs)], {"x": [3, 2], "u": shape_u}, {"idx": idx},
              opset=opset)
    (n,) = [n for n in G.load(m).nodes if n.op_type == op_type]
    assert n.kind == kind


def test_normalized_scatter_add_blames_constant_data():
    """``y = c + S(u)`` (ScatterND add): ``a(u) = u ⊙ gather(q)``, ``c`` takes ``c ⊙ q`` as a bias,
    ``q = a(y)/blip(y)``; conservative up to ε with the bias counted."""
    c, u = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(2, 2, 4))
    idx = np.array([[[0, 1], [0, 1]], [[1, 0], [1, 2]]])   # (sample, row) of each update row; a repeat
    y = c.copy()
    for i in np.ndindex(idx.shape[:2]):
        y[tuple(idx[i])] += u[i]
    g = RNG.normal(size=y.shape)
    m = model([node("ScatterND", ["c", "idx", "u"], "y", reduction="add")], {"u": [2, 2, 4]},
              {"c": c, "idx": idx}, opset=18)
    out = seeded(m, rules("linear -> normalized(eps = 1e-3)\n"), {"u": u}, g)
    q = g / blip(y, 1e-3)
    want = np.stack([u[i] * q[tuple(idx[i])] for i in np.ndindex(idx.shape[:2])]).reshape(u.shape)
    np.testing.assert_allclose(out["R"]["u"], want, rtol=1e-10)
    (share,) = out["bias"].values()
    np.testing.assert_allclose(share, (c * q).reshape(2, -1).sum(1), rtol=1e-10)
