"""The rules on Einsum, the normalizations (Instance, Group, RMS) and Attention-23 against
closed-form numpy replicas (seeded pass on the ONNX reference evaluator, float64, ``start one``:
``a(y)`` is an arbitrary array)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from oracles import blip, run
from test_transformer import model, node, rules

from rulegraph.backward import ops as G
from rulegraph.compile.build import SEED, compile_explainer

RNG = np.random.default_rng(23)


def seeded(m: onnx.ModelProto, ruleset, feeds: dict, seed: np.ndarray) -> dict:
    """Attribution per input and bias share per node of one seeded pass, on the reference evaluator
    with its float64 kernels (``oracles.run``: GroupNormalization in the input's precision)."""
    compiled = compile_explainer(G.load(m), ruleset, seed_mode=True)
    names = [o.name for o in compiled.model.graph.output]
    values = run(compiled.model, {**feeds, SEED: seed}, names)
    return {"R": {x: values[o] for x, o in compiled.attribution.items()},
            "bias": {k: values[o] for k, o in compiled.bias_shares.items()}}


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


# layernorm_linear on Instance, Group and RMS normalization -----------------------------------------


def norm_replica(x, gamma, beta, groups, centered, g, eps, bias_policy, ln_eps=1e-5, per_group=False):
    """``layernorm_linear`` in numpy: the view ``[N, G, C/G, rest]`` (Instance: G = C; RMS: one group
    over the trailing axes, not centered), ``c = γ/σ`` constant; returns (a(x), bias share per sample, y)."""
    n, ch = x.shape[:2]
    v = x.reshape(n, groups, -1)
    mu = v.mean(axis=2, keepdims=True) if centered else 0.0
    sigma = np.sqrt(((v - mu) ** 2).mean(axis=2, keepdims=True) + ln_eps)
    shape = [ch] + [1] * (x.ndim - 2)
    repeat = ch // groups if per_group else 1
    gam = np.repeat(gamma, repeat).reshape(shape) if gamma.ndim == 1 and x.ndim > 2 else gamma
    bet = 0.0 if beta is None else (np.repeat(beta, repeat).reshape(shape) if x.ndim > 2 else beta)
    z = ((v - mu) / sigma).reshape(x.shape) * gam
    y = z + bet
    q = g / blip(z if bias_policy == "ignore" else y, eps)
    cq = (q * gam).reshape(n, groups, -1) / sigma
    if centered:
        cq = cq - cq.mean(axis=2, keepdims=True)
    share = (bet * q).reshape(n, -1).sum(1)
    return x * cq.reshape(x.shape), share, y


NORM_CASES = {
    # id: (op, shape, attrs, opset, groups, centered, scale size, bias size, per_group)
    "instance-2d": ("InstanceNormalization", [2, 3, 4, 3], {}, 17, 3, True, 3, 3, False),
    "group-21": ("GroupNormalization", [2, 6, 2, 2], {"num_groups": 2}, 21, 2, True, 6, 6, False),
    "group-18-per-group": ("GroupNormalization", [2, 6, 3], {"num_groups": 3}, 18, 3, True, 3, 3, True),
    "rms-last-axis": ("RMSNormalization", [2, 3, 5], {"axis": 1}, 23, 1, False, None, None, False),
}


@pytest.mark.parametrize("bias", ["blame", "ignore"])
@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_layernorm_linear_on_other_normalizations(case, bias):
    op_type, shape, attrs, opset, groups, centered, scale_n, bias_n, per_group = NORM_CASES[case]
    x, g = RNG.normal(size=shape), RNG.normal(size=shape)
    if op_type == "RMSNormalization":
        gamma, beta = RNG.uniform(0.5, 1.5, size=shape[1:]), None
        consts, args = {"gamma": gamma}, ["x", "gamma"]
    else:
        gamma, beta = RNG.uniform(0.5, 1.5, size=scale_n), RNG.normal(size=bias_n)
        consts, args = {"gamma": gamma, "beta": beta}, ["x", "gamma", "beta"]
    m = model([node(op_type, args, "y", epsilon=1e-5, **attrs)], {"x": shape}, consts, opset=opset)
    m.graph.ClearField("output")
    m.graph.output.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, shape))
    out = seeded(m, rules("normalizing -> layernorm_linear(eps = 1e-3)\n", bias=bias), {"x": x}, g)
    relevance, share, y = norm_replica(x, gamma, beta, groups, centered, g, 1e-3, bias, per_group=per_group)
    np.testing.assert_allclose(out["R"]["x"], relevance, rtol=1e-9, atol=1e-12)
    if beta is not None and bias == "blame":
        (got,) = out["bias"].values()
        np.testing.assert_allclose(got, share, rtol=1e-9)
        conserved = (g * y / blip(y, 1e-3)).reshape(len(x), -1).sum(1)
        np.testing.assert_allclose(relevance.reshape(len(x), -1).sum(1) + share, conserved, rtol=1e-9)


@pytest.mark.parametrize("axes", [None, [1]])
def test_layernorm_linear_on_mean_variance_normalization(axes):
    """``c = 1/(σ + 10⁻⁹)`` held constant over the axes (default 0, 2, 3), centered, no bias:
    ``a(x) = x ⊙ (c ⊙ q − mean(c ⊙ q))``, ``q = a(y)/blip(y)``; conserves up to ε."""
    shape = [2, 3, 4, 3]
    x, g = RNG.normal(size=shape), RNG.normal(size=shape)
    m = model([node("MeanVarianceNormalization", ["x"], "y", axes=[0, 2, 3] if axes is None else axes)],
              {"x": shape}, {}, opset=13)
    if axes is None:   # the default (onnx's strict shape inference needs the attribute written)
        del m.graph.node[0].attribute[:]
    m.graph.ClearField("output")
    m.graph.output.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, shape))
    out = seeded(m, rules("normalizing -> layernorm_linear(eps = 1e-3)\n"), {"x": x}, g)
    over = (0, 2, 3) if axes is None else tuple(axes)
    mu = x.mean(axis=over, keepdims=True)
    c = 1 / (np.sqrt(((x - mu) ** 2).mean(axis=over, keepdims=True)) + 1e-9)
    y = (x - mu) * c
    q = g / blip(y, 1e-3)
    want = x * (c * q - (c * q).mean(axis=over, keepdims=True))
    np.testing.assert_allclose(out["R"]["x"], want, rtol=1e-9, atol=1e-12)
    assert want.sum() == pytest.approx((q * y).sum(), rel=1e-9)


# cp_attention on the Attention op -------------------------------------------------------------------


def attention_weights(q, k, scale, causal, mask):
    """``softmax(scale · QKᵀ + mask)`` per head, kv heads repeated to the query heads (4-D inputs)."""
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    s = scale * q @ np.swapaxes(k, -1, -2) + (0.0 if mask is None else mask)
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


ATTENTION_CP = {
    # id: (Q, K, V shapes [B, H, S, d], attrs, constant float mask shape or None)
    "gqa-causal": ([2, 4, 3, 2], [2, 2, 3, 2], [2, 2, 3, 5], {"is_causal": 1}, None),
    "float-mask-scale": ([1, 2, 3, 4], [1, 2, 5, 4], [1, 2, 5, 3], {"scale": 0.6}, [3, 5]),
}


@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("case", sorted(ATTENTION_CP))
def test_cp_attention_gives_the_values_everything(case, eps):
    qs, ks, vs, attrs, mask_shape = ATTENTION_CP[case]
    q, k, v = RNG.normal(size=qs), RNG.normal(size=ks), RNG.normal(size=vs)
    mask = None if mask_shape is None else RNG.normal(size=mask_shape)
    args, consts = (["q", "k", "v"], {}) if mask is None else (["q", "k", "v", "m"], {"m": mask})
    m = model([node("Attention", args, "y", **attrs)], {"q": qs, "k": ks, "v": vs}, consts, opset=23)
    # a float attribute: the float32 value
    scale = float(np.float32(attrs["scale"])) if "scale" in attrs else 1 / np.sqrt(qs[-1])
    p = attention_weights(q, k, scale, attrs.get("is_causal"), mask)
    # the node's own Y divides (the reference takes √scale in float32: Y and P V differ by 1e-8)
    y = run(m, {"q": q, "k": k, "v": v})["y"]
    g = RNG.normal(size=y.shape)
    out = seeded(m, rules(f"normalizing -> cp_attention(eps = {eps})\n"), {"q": q, "k": k, "v": v}, g)
    s = g / blip(y, eps) if eps else g / y
    d_rep = np.swapaxes(p, -1, -2) @ s
    d_v = d_rep.reshape(vs[0], ks[1], qs[1] // ks[1], *vs[2:]).sum(2)
    np.testing.assert_allclose(out["R"]["v"], v * d_v, rtol=1e-9, atol=1e-12)
    assert not np.any(out["R"]["q"]) and not np.any(out["R"]["k"])
    values = p @ np.repeat(v, qs[1] // ks[1], axis=1)
    assert out["R"]["v"].sum() == pytest.approx((s * values).sum(), rel=1e-9)


@pytest.mark.parametrize("source, warned", [("lrp-epsilon", False), ("mine.rules", True)])
def test_unused_normalization_binding_is_warned_in_a_users_file_only(source, warned):
    """The CNN files bind GroupNorm and InstanceNorm, which most CNNs lack: no warning for a bundled
    file's binding; the same binding in the user's file is reported."""
    from rulegraph.check import check
    from rulegraph.run import rulefiles as dsl

    m = model([node("Gemm", ["x", "w"], "y")], {"x": [2, 3]}, {"w": RNG.normal(size=(3, 2))})
    text = 'rulegraph 1\ninclude "lrp-epsilon"\nGroupNormalization -> layernorm_linear\n'
    ruleset = dsl.load(source) if source == "lrp-epsilon" else dsl.parse(text, source=source)
    unused = [d for d in check(m, ruleset).diagnostics if d.code == "unused-binding"]
    assert [d.where.split(":")[0] for d in unused] == ([source] if warned else [])


# layernorm_linear on an L2 normalization, native LpNormalization and fused F.normalize ---------------

LP_CASES = {
    # id: (nodes, constants, opset, p)
    "native-p2": ([node("LpNormalization", ["x"], "y", axis=-1, p=2)], {}, 17, 2),
    "native-p1": ([node("LpNormalization", ["x"], "y", axis=-1, p=1)], {}, 17, 1),
    "fused-normalize": ([node("ReduceL2", ["x"], "n", axes=[-1], keepdims=1), node("Clip", ["n", "tiny"], "c"),
                         node("Div", ["x", "c"], "y")], {"tiny": np.array(1e-12)}, 17, 2),
}


@pytest.mark.parametrize("case", sorted(LP_CASES))
def test_layernorm_linear_on_an_lp_normalization(case):
    """``y = c ⊙ x``, ``c = 1/‖x‖_p`` held constant: ``a(x) = x ⊙ c ⊙ a(y)/blip(y)``; no bias."""
    nodes, consts, opset, p = LP_CASES[case]
    shape = [2, 3, 5]
    x, g = RNG.normal(size=shape), RNG.normal(size=shape)
    m = model(nodes, {"x": shape}, consts, opset=opset)
    out = seeded(m, rules("normalizing -> layernorm_linear(eps = 1e-3)\nlinear -> normalized(eps = 1e-3)\n"
                          "nonlinear -> ignore\nbilinear -> uniform\n"), {"x": x}, g)
    c = 1.0 / (np.abs(x) ** p).sum(-1, keepdims=True) ** (1.0 / p)
    np.testing.assert_allclose(out["R"]["x"], x * c * g / blip(x * c, 1e-3), rtol=1e-9, atol=1e-12)
    assert out["bias"] == {}
