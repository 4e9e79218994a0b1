"""Transformer support (rulegraph/transformer.py, token sources in graph.py and compile.py).

1. Each transformer rule against a closed-form numpy replica on a one- or few-node model in float64
   (seeded pass, ``start one``: ``a(y)`` is an arbitrary array), run on onnx's reference evaluator.
2. Token ids: a Gather of a constant table by an integer input is where the pass finishes; the ids
   get one number per token, position lookups and the attention-mask branch get nothing (their
   contributions are biases).
3. ``start`` by op type applies only at the end of the model, so a Softmax inside attention takes
   its own rule.
4. A small BERT-style encoder written in torch, exported by both exporters: the ``gradient`` file
   equals autograd per token, ``lrp-transformer`` conserves with the biases counted, the two
   exports agree. Skipped without torch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from oracles import blip
from tables import ATTENTION_CONSERVATION

import rulegraph
from rulegraph.backward import ops as G
from rulegraph.check import check, static
from rulegraph.compile.build import SEED, compile_explainer
from rulegraph.errors import ModelError
from rulegraph.run import rulefiles as dsl

D, F, I64 = TensorProto.DOUBLE, TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(7)


def rules(body: str, bias: str = "blame", start: str = "one") -> rulegraph.RuleSet:
    head = f"rulegraph 1\nquantity relevance\nbias {bias}\n" + (f"start {start}\n" if start else "")
    return dsl.parse(head + body, source="t.rules")


def model(nodes, inputs: dict[str, list], consts=None, outputs=("y",), opset=17, elem=D) -> onnx.ModelProto:
    """Inputs ``{name: shape}`` (float, or int64 where the name starts with ``ids`` or ``mask``)."""
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    values = [helper.make_tensor_value_info(n, I64 if n.startswith(("ids", "mask")) else elem, s)
              for n, s in inputs.items()]
    inits = [numpy_helper.from_array(v if v.dtype.kind != "f" else v.astype(np_dtype), k)
             for k, v in (consts or {}).items()]
    graph = helper.make_graph(nodes, "g", values, [helper.make_tensor_value_info(o, elem, None) for o in outputs],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def seeded(m: onnx.ModelProto, ruleset, feeds: dict[str, np.ndarray], seed: np.ndarray) -> dict:
    """Attribution per input, bias share per node and the start value, on the reference evaluator."""
    compiled = compile_explainer(G.load(m), ruleset, seed_mode=True)
    names = [o.name for o in compiled.model.graph.output]
    values = dict(zip(names, ReferenceEvaluator(compiled.model).run(None, {**feeds, SEED: seed})))
    return {"R": {x: values[o] for x, o in compiled.attribution.items()},
            "bias": {k: values[o] for k, o in compiled.bias_shares.items()},
            "start": values[compiled.start_value]}


# --------------------------------------------------------------------------------------------------
# 1. the rules against closed-form replicas


def test_uniform_mul_halves_and_sums_over_broadcast_axes():
    a, b, g = RNG.normal(size=(3, 4)), RNG.normal(size=(1, 4)), RNG.normal(size=(3, 4))
    out = seeded(model([node("Mul", ["a", "b"], "y")], {"a": [3, 4], "b": [1, 4]}),
                 rules("bilinear -> uniform\n"), {"a": a, "b": b}, g)
    np.testing.assert_allclose(out["R"]["a"], g / 2, rtol=1e-12)
    np.testing.assert_allclose(out["R"]["b"], g.sum(0, keepdims=True) / 2, rtol=1e-12)
    assert out["R"]["a"].sum() + out["R"]["b"].sum() == pytest.approx(g.sum(), rel=1e-12)  # exact


def test_uniform_div_halves():
    """**Decision**: a/b = a·(1/b), the reciprocal passing its number unchanged."""
    a, b, g = RNG.normal(size=(2, 3)), RNG.uniform(0.5, 2, size=(2, 3)), RNG.normal(size=(2, 3))
    out = seeded(model([node("Div", ["a", "b"], "y")], {"a": [2, 3], "b": [2, 3]}),
                 rules("bilinear -> uniform\n"), {"a": a, "b": b}, g)
    np.testing.assert_allclose(out["R"]["a"], g / 2, rtol=1e-12)
    np.testing.assert_allclose(out["R"]["b"], g / 2, rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("b_shape", [[2, 4, 5], [4, 5]], ids=["batched", "broadcast"])
def test_uniform_matmul(eps, b_shape):
    """ε-rule over the terms A_ik B_kj, then half to each factor."""
    a, b, g = RNG.normal(size=(2, 3, 4)), RNG.normal(size=b_shape), RNG.normal(size=(2, 3, 5))
    y = a @ b
    q = g / blip(y, eps) if eps else g / y
    out = seeded(model([node("MatMul", ["a", "b"], "y")], {"a": [2, 3, 4], "b": b_shape}),
                 rules(f"bilinear -> uniform(eps = {eps})\n"), {"a": a, "b": b}, g)
    np.testing.assert_allclose(out["R"]["a"], 0.5 * a * (q @ np.swapaxes(b, -1, -2)), rtol=1e-10)
    grad_b = np.swapaxes(a, -1, -2) @ q
    np.testing.assert_allclose(out["R"]["b"], 0.5 * b * (grad_b if b.ndim == 3 else grad_b.sum(0)), rtol=1e-10)
    total = out["R"]["a"].sum() + out["R"]["b"].sum()
    assert total == pytest.approx((g * y / (blip(y, eps) if eps else y)).sum(), rel=1e-10)


SOFTMAX_V = {"z": [2, 3, 3], "v": [2, 3, 4]}


@pytest.mark.parametrize("binding", ["uniform(softmax_constant = 1)", "gate(keep = 1)"])
def test_attention_weights_held_constant(binding):
    """CP-LRP on softmax(z)·V: V takes everything by the ε-rule; the Softmax (and z) nothing."""
    z, v, g = RNG.normal(size=(2, 3, 3)), RNG.normal(size=(2, 3, 4)), RNG.normal(size=(2, 3, 4))
    m = model([node("Softmax", ["z"], "s", axis=-1), node("MatMul", ["s", "v"], "y")], SOFTMAX_V)
    out = seeded(m, rules(f"bilinear -> {binding}\nSoftmax -> softmax_taylor\n"), {"z": z, "v": v}, g)
    s = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    y = s @ v
    np.testing.assert_allclose(out["R"]["v"], v * (np.swapaxes(s, -1, -2) @ (g / blip(y, 1e-6))), rtol=1e-10)
    np.testing.assert_array_equal(out["R"]["z"], 0.0)


def test_softmax_constant_through_a_transpose_and_uniform_elsewhere():
    """The Softmax operand is found through route ops; y = Vt·Sᵀ keeps Vt. Without a Softmax operand
    (QKᵀ) the rule stays uniform."""
    z, vt, g = RNG.normal(size=(2, 3, 3)), RNG.normal(size=(2, 4, 3)), RNG.normal(size=(2, 4, 3))
    m = model([node("Softmax", ["z"], "s", axis=-1), node("Transpose", ["s"], "st", perm=[0, 2, 1]),
               node("MatMul", ["vt", "st"], "y")], {"z": [2, 3, 3], "vt": [2, 4, 3]})
    out = seeded(m, rules("bilinear -> uniform(softmax_constant = 1)\nSoftmax -> block\nroute -> gradient\n"),
                 {"z": z, "vt": vt}, g)
    s = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    y = vt @ np.swapaxes(s, -1, -2)
    np.testing.assert_allclose(out["R"]["vt"], vt * ((g / blip(y, 1e-6)) @ s), rtol=1e-10)
    np.testing.assert_array_equal(out["R"]["z"], 0.0)
    q, k, g2 = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(2, 4, 3)), RNG.normal(size=(2, 3, 3))
    plain = seeded(model([node("MatMul", ["q", "k"], "y")], {"q": [2, 3, 4], "k": [2, 4, 3]}),
                   rules("bilinear -> uniform(softmax_constant = 1)\n"), {"q": q, "k": k}, g2)
    np.testing.assert_allclose(plain["R"]["q"], 0.5 * q * ((g2 / blip(q @ k, 1e-6)) @ np.swapaxes(k, -1, -2)),
                               rtol=1e-10)


def test_gate_keeps_one_operand():
    a, b, g = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    m = model([node("Mul", ["a", "b"], "y")], {"a": [3, 4], "b": [3, 4]})
    out = seeded(m, rules("bilinear -> gate(keep = 0, eps = 0.01)\n"), {"a": a, "b": b}, g)
    np.testing.assert_allclose(out["R"]["a"], a * b * g / blip(a * b, 0.01), rtol=1e-12)
    np.testing.assert_array_equal(out["R"]["b"], 0.0)
    with pytest.raises(ModelError, match="not linear in its divisor"):
        seeded(model([node("Div", ["a", "b"], "y")], {"a": [3, 4], "b": [3, 4]}),
               rules("bilinear -> gate(keep = 1)\n"), {"a": a, "b": b}, g)


def test_gate_needs_keep_zero_or_one():
    with pytest.raises(rulegraph.RuleSyntaxError, match="parameter 'keep' of rule 'gate': must be 0 or 1"):
        rules("bilinear -> gate(keep = 2)\n")
    with pytest.raises(rulegraph.RuleSyntaxError, match="rule 'gate' needs parameter 'keep'"):
        rules("bilinear -> gate\n")


def softmax_taylor_replica(x, g, eps, bias_policy):
    """(R_x, Σ bias share per row) of AttnLRP's Softmax rule, with masked (y = 0) positions at 0."""
    e = np.exp(x - x.max(-1, keepdims=True))
    y = e / e.sum(-1, keepdims=True)
    xs = np.where(y == 0, 0.0, x)
    mean = (y * xs).sum(-1, keepdims=True)
    linear = y * (xs - mean)  # Σ_i J_ji x_i
    d = linear if bias_policy == "ignore" else y
    q = g / blip(d, eps)
    relevance = xs * (q * y - y * (q * y).sum(-1, keepdims=True))
    return relevance, ((y - linear) * q).sum(-1), y


@pytest.mark.parametrize("bias", ["blame", "ignore"])
def test_softmax_taylor(bias):
    x, g = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 5))
    x[1, 2] = -np.inf  # a masked position: y = 0, gets nothing
    out = seeded(model([node("Softmax", ["x"], "y", axis=-1)], {"x": [3, 5]}),
                 rules("Softmax -> softmax_taylor(eps = 1e-3)\n", bias=bias), {"x": x}, g)
    relevance, share, y = softmax_taylor_replica(x, g, 1e-3, bias)
    np.testing.assert_allclose(out["R"]["x"], relevance, rtol=1e-10, atol=1e-14)
    assert out["R"]["x"][1, 2] == 0.0
    if bias == "blame":
        (got,) = out["bias"].values()
        np.testing.assert_allclose(got, share, rtol=1e-10)
        # ε-rule on the linearisation with the remainder as a bias: conserves up to ε
        np.testing.assert_allclose(relevance.sum(-1) + share, (g * y / blip(y, 1e-3)).sum(-1), rtol=1e-10)
    else:
        assert out["bias"] == {}
    # ε → 0: a(x_i) = x_i (a(y_i) − y_i Σ_j a(y_j)), over the outputs with y_j > 0 (J_ji = 0 where y_j = 0)
    limit, _, y = softmax_taylor_replica(x, g, 1e-12, "blame")
    xs, gs = np.where(y == 0, 0.0, x), np.where(y == 0, 0.0, g)
    np.testing.assert_allclose(limit, xs * (gs - y * gs.sum(-1, keepdims=True)), rtol=1e-8, atol=1e-12)


def test_block_passes_nothing():
    x, g = RNG.normal(size=(2, 4)), RNG.normal(size=(2, 4))
    out = seeded(model([node("Softmax", ["x"], "y", axis=-1)], {"x": [2, 4]}), rules("normalizing -> block\n"),
                 {"x": x}, g)
    np.testing.assert_array_equal(out["R"]["x"], 0.0)


def layernorm_replica(x, gamma, beta, axes, g, eps, bias_policy, ln_eps=1e-5):
    mu = x.mean(axis=axes, keepdims=True)
    sigma = np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + ln_eps)
    c = gamma / sigma
    z = (x - mu) * c
    y = z + beta
    q = g / blip(z if bias_policy == "ignore" else y, eps)
    cq = c * q
    return x * (cq - cq.mean(axis=axes, keepdims=True)), (beta * q).reshape(len(x), -1).sum(1), y


LN_CASES = {"last-axis": ([2, 3, 6], -1, [6]), "two-axes": ([2, 3, 4], -2, [3, 4])}


@pytest.mark.parametrize("bias", ["blame", "ignore"])
@pytest.mark.parametrize("case", sorted(LN_CASES))
def test_layernorm_linear_native(case, bias):
    shape, axis, affine = LN_CASES[case]
    x, g = RNG.normal(size=shape), RNG.normal(size=shape)
    gamma, beta = RNG.uniform(0.5, 1.5, size=affine), RNG.normal(size=affine)
    m = model([node("LayerNormalization", ["x", "gamma", "beta"], "y", axis=axis, epsilon=1e-5)], {"x": shape},
              {"gamma": gamma, "beta": beta})
    out = seeded(m, rules("normalizing -> layernorm_linear(eps = 1e-3)\n", bias=bias), {"x": x}, g)
    axes = tuple(range(axis % len(shape), len(shape)))
    relevance, share, y = layernorm_replica(x, gamma, beta, axes, g, 1e-3, bias)
    np.testing.assert_allclose(out["R"]["x"], relevance, rtol=1e-9, atol=1e-12)
    if bias == "blame":
        (got,) = out["bias"].values()
        np.testing.assert_allclose(got, share, rtol=1e-9)
        flat = (g * y / blip(y, 1e-3)).reshape(len(x), -1).sum(1)
        np.testing.assert_allclose(relevance.reshape(len(x), -1).sum(1) + share, flat, rtol=1e-9)


def test_layernorm_linear_fused_equals_native_and_float32_uses_the_nodes_statistics():
    """The LayerNorm written out (ReduceMean, Sub, Pow, ..., as torch before opset 17) is fused into
    one node and gets the same relevance; the float32 native node reads its own Mean and InvStdDev."""
    shape = [2, 3, 6]
    x, g = RNG.normal(size=shape), RNG.normal(size=shape)
    gamma, beta = RNG.uniform(0.5, 1.5, size=6), RNG.normal(size=6)
    consts = {"gamma": gamma, "beta": beta, "two": np.array(2.0), "eps": np.array(1e-5)}
    decomposed = [node("ReduceMean", ["x"], "mu", axes=[-1]), node("Sub", ["x", "mu"], "d"),
                  node("Pow", ["d", "two"], "d2"), node("ReduceMean", ["d2"], "var", axes=[-1]),
                  node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "sd"), node("Div", ["d", "sd"], "xn"),
                  node("Mul", ["xn", "gamma"], "xg"), node("Add", ["xg", "beta"], "y")]
    ruleset = rules("normalizing -> layernorm_linear(eps = 1e-3)\n")
    out = seeded(model(decomposed, {"x": shape}, consts), ruleset, {"x": x}, g)
    relevance, share, _ = layernorm_replica(x, gamma, beta, (2,), g, 1e-3, "blame")
    np.testing.assert_allclose(out["R"]["x"], relevance, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(next(iter(out["bias"].values())), share, rtol=1e-9)
    native = model([node("LayerNormalization", ["x", "gamma", "beta"], "y", axis=-1, epsilon=1e-5)], {"x": shape},
                   {"gamma": gamma, "beta": beta}, elem=F)
    result = rulegraph.Explainer(native, ruleset).explain(x.astype(np.float32), target=g.astype(np.float32))
    np.testing.assert_allclose(result.map, relevance, rtol=1e-4, atol=1e-5)


def test_wrong_op_is_named():
    m = model([node("LayerNormalization", ["x", "gamma"], "y")], {"x": [2, 3]}, {"gamma": np.ones(3)})
    with pytest.raises(rulegraph.CoverageError, match="rule 'softmax_taylor', which is defined for Softmax only; "
                                                      "rules accepting LayerNormalization: block, gradient, "
                                                      "layernorm_linear"):
        compile_explainer(G.load(m), rules("normalizing -> softmax_taylor\n"))
    with pytest.raises(rulegraph.CoverageError, match="add a binding such as `LayerNormalization -> layernorm_linear`"):
        compile_explainer(G.load(m), rules("route -> gradient\n"))


@pytest.mark.parametrize("rule, bias, predicted", ATTENTION_CONSERVATION)
def test_predicted_conservation_is_measured(rule, bias, predicted):
    """The checker's class for each rule (docs/rules.md, conservation classes), confirmed on a run:
    Softmax(a·b) then a
    LayerNorm, every other node bound to a conserving rule."""
    shape = [3, 5]
    m = model([node("Mul", ["a", "b"], "p"), node("Softmax", ["p"], "s", axis=-1),
               node("LayerNormalization", ["s", "gamma", "beta"], "y", axis=-1)], {"a": shape, "b": shape},
              {"gamma": RNG.uniform(0.5, 1.5, size=5), "beta": RNG.normal(size=5)})
    defaults = {"bilinear": "bilinear -> uniform", "Softmax": "Softmax -> softmax_taylor(eps = 0)",
                "LayerNormalization": "LayerNormalization -> layernorm_linear(eps = 0)"}
    defaults[rule.split(" ")[0]] = rule
    ruleset = rules("\n".join(defaults.values()) + "\n", bias=bias, start="output")
    _, nodes, _ = static(G.load(m), ruleset)
    assert {n.node: n.predicted for n in nodes}[{"bilinear": "p", "Softmax": "s"}.get(rule.split(" ")[0], "y")] \
        == predicted
    a, b = RNG.normal(size=shape), RNG.normal(size=shape)
    report = check(m, ruleset, x={"a": a, "b": b})
    if predicted in ("exact", "approximate"):
        assert report.measured < (1e-9 if predicted == "exact" else 1e-4), report.to_text()


# --------------------------------------------------------------------------------------------------
# 2. token ids


V, T, E, C = 11, 4, 6, 3


def token_model(elem=F) -> onnx.ModelProto:
    """One attention layer over token embeddings: h = E[ids] + P[range(T)] (position ids computed
    from the ids' shape), scores = h hᵀ + (1 − mask)·(−1e4), y = W mean_t(softmax(scores) h) + c."""
    rng = np.random.default_rng(3)
    consts = {"E": rng.normal(size=(V, E)), "P": rng.normal(size=(T, E)), "W": rng.normal(size=(E, C)),
              "c": rng.normal(size=C), "zero": np.array(0, dtype=np.int64), "one_i": np.array(1, dtype=np.int64),
              "one": np.array(1.0), "big": np.array(-1e4), "axis1": np.array([1], dtype=np.int64)}
    nodes = [node("Gather", ["E", "ids"], "emb"),
             node("Shape", ["ids"], "shape", start=1, end=2), node("Squeeze", ["shape"], "t"),
             node("Range", ["zero", "t", "one_i"], "pos_ids"), node("Gather", ["P", "pos_ids"], "pos"),
             node("Add", ["emb", "pos"], "h"),
             node("Transpose", ["h"], "ht", perm=[0, 2, 1]), node("MatMul", ["h", "ht"], "raw"),
             node("Cast", ["mask"], "maskf", to=elem), node("Sub", ["one", "maskf"], "off"),
             node("Mul", ["off", "big"], "neg"), node("Unsqueeze", ["neg", "axis1"], "neg3"),
             node("Add", ["raw", "neg3"], "scores"), node("Softmax", ["scores"], "att", axis=-1),
             node("MatMul", ["att", "h"], "ctx"), node("ReduceMean", ["ctx"], "pooled", axes=[1], keepdims=0),
             node("MatMul", ["pooled", "W"], "z"), node("Add", ["z", "c"], "y")]
    return model(nodes, {"ids": ["N", T], "mask": ["N", T]}, consts, elem=elem)


def token_forward(emb, mask):
    """The token model in numpy float64 from the token embeddings on."""
    rng = np.random.default_rng(3)
    _, p, w, c = rng.normal(size=(V, E)), rng.normal(size=(T, E)), rng.normal(size=(E, C)), rng.normal(size=C)
    h = emb + p
    scores = h @ np.swapaxes(h, 1, 2) + ((1.0 - mask) * -1e4)[:, None, :]
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    return (att @ h).mean(1) @ w + c


IDS = np.array([[1, 5, 2, 9], [3, 3, 7, 0]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])


def test_token_ids_are_a_source():
    graph = G.load(token_model())
    assert graph.sources == {"emb": "ids"}  # the position lookup (Range-derived ids) is none
    assert "emb" in graph.active and "pos" not in graph.active and "maskf" not in graph.active


def test_gradient_per_token_is_gradient_times_embedding():
    """``gradient``: attribution[ids] = Σ_e emb ⊙ ∂y_t/∂emb, against central differences in float64."""
    result = rulegraph.Explainer(token_model(D), "gradient").explain({"ids": IDS, "mask": MASK}, target=[0, 2])
    emb = np.random.default_rng(3).normal(size=(V, E))[IDS]
    np.testing.assert_allclose(result.outputs["y"], token_forward(emb, MASK), rtol=1e-10)
    grad, h = np.zeros_like(emb), 1e-6
    for index in np.ndindex(emb.shape):
        step = np.zeros_like(emb)
        step[index] = h
        diff = token_forward(emb + step, MASK) - token_forward(emb - step, MASK)
        grad[index] = diff[index[0], [0, 2][index[0]]] / (2 * h)
    assert set(result.attribution) == {"ids"} and result.saliency == {}
    np.testing.assert_allclose(result.attribution["ids"], (emb * grad).sum(-1), rtol=1e-6, atol=1e-8)


def test_lrp_transformer_on_tokens_conserves_and_leaves_the_mask_out():
    result = rulegraph.Explainer(token_model(), "lrp-transformer").explain({"ids": IDS, "mask": MASK},
                                                                          target=[0, 2])
    assert set(result.attribution) == {"ids"} and result.map.shape == IDS.shape
    assert np.abs(result.relative_delta).max() < 1e-4
    # the position embedding (computed from the ids' shape) is a bias of its Add, blamed
    assert abs(result.bias_shares["h"]).max() > 0
    # a masked token is attended by nobody: nothing reaches it
    assert result.map[1, 3] == 0.0 and np.all(result.map[:, :3] != 0)


@pytest.mark.parametrize("loop_name", ["integrated-gradients", "smoothgrad"])
def test_loops_refuse_a_model_without_float_inputs(loop_name):
    with pytest.raises(rulegraph.RulegraphError, match="token ids cannot be interpolated or noised"):
        rulegraph.Explainer(token_model(), loop_name).explain({"ids": IDS, "mask": MASK}, target=[0, 2])


def test_difference_quantity_takes_the_zero_embedding_as_baseline():
    """**Decision**: under the difference quantity a token's baseline is the zero embedding, so the
    attributions sum to y − y(zero embeddings)."""
    m = model([node("Gather", ["E", "ids"], "emb"), node("ReduceSum", ["emb", "axis1"], "s", keepdims=0),
               node("Gemm", ["s", "W", "c"], "y")], {"ids": ["N", T]},
              {"E": RNG.normal(size=(V, E)), "W": RNG.normal(size=(E, C)), "c": RNG.normal(size=C),
               "axis1": np.array([1], dtype=np.int64)})
    result = rulegraph.Explainer(m, "deeplift-rescale").explain({"ids": IDS}, target=[1, 1])
    c = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "c"))
    np.testing.assert_allclose(result.map.sum(1), result.outputs["y"][:, 1] - c[1], rtol=1e-9)


def test_concat_with_a_class_token_blames_its_share():
    """ViT's class token, a constant expanded to the batch: its part of the relevance is a bias."""
    cls, w = RNG.normal(size=(1, 1, E)), RNG.normal(size=((T + 1) * E, C))
    m = model([node("Shape", ["x"], "n", start=0, end=1), node("Concat", ["n", "tail"], "shape", axis=0),
               node("Expand", ["cls", "shape"], "cls_n"), node("Concat", ["cls_n", "x"], "seq", axis=1),
               node("Flatten", ["seq"], "flat"), node("MatMul", ["flat", "w"], "y")], {"x": ["N", T, E]},
              {"cls": cls, "tail": np.array([1, E], dtype=np.int64), "w": w})
    x = RNG.normal(size=(2, T, E))
    result = rulegraph.Explainer(m, "lrp-epsilon").explain(x, target=[0, 1])
    share = result.bias_shares["seq"]
    z = result.outputs["y"][[0, 1], [0, 1]]
    contribution = (cls.reshape(-1) * w[:E, [0, 1]].T).sum(1)  # the class token's x·w
    np.testing.assert_allclose(share, contribution * z / blip(z, 1e-6), rtol=1e-9)
    assert np.abs(result.relative_delta).max() < 1e-5  # ε = 1e-6 in the denominator


# --------------------------------------------------------------------------------------------------
# 3. start only at the end


def test_start_by_op_type_applies_only_at_the_end():
    """A Softmax inside the model (attention) takes ``normalizing -> gradient``; the last one, at the
    output, starts the pass. ``node "..." -> start`` starts wherever the node is."""
    w = RNG.normal(size=(4, 4))
    m = model([node("Softmax", ["x"], "mid", axis=-1), node("MatMul", ["mid", "w"], "z"),
               node("Softmax", ["z"], "y", axis=-1)], {"x": ["N", 4]}, {"w": w})
    graph = G.load(m)
    assert compile_explainer(graph, dsl.load("gradient")).start_tensor == "z"
    explicit = dsl.parse("rulegraph 1\nquantity importance\nnode \"mid\" -> start\n", source="t.rules")
    assert compile_explainer(graph, explicit).start_tensor == "x"
    x = RNG.normal(size=(2, 4))
    result = rulegraph.Explainer(m, "gradient").explain(x, target=[1, 3])
    s = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    g = w.T[[1, 3]]
    np.testing.assert_allclose(result.saliency["x"], s * (g - (g * s).sum(-1, keepdims=True)), rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# 4. a BERT-style encoder from torch, both exporters


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(torch model, ids, mask, {exporter: onnx path})."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from torch_models import TinyBert, export_token_model, seeded

    net = seeded(TinyBert, 0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    folder = tmp_path_factory.mktemp("bert")
    paths = {name: export_token_model(net, ids, mask, folder / f"{name}.onnx", dynamo)
             for name, dynamo in (("torchscript", False), ("dynamo", True))}
    return net, ids, mask, paths


TARGETS = [0, 2, 1]


def autograd_per_token(net, ids, mask) -> np.ndarray:
    """Σ_e emb ⊙ ∂y_target/∂emb at the token embeddings' output (gradient × input per token)."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output

    handle = net.tokens.register_forward_hook(keep)
    try:
        logits = net(ids, mask)
        logits[range(len(TARGETS)), TARGETS].sum().backward()
    finally:
        handle.remove()
    emb = captured["emb"]
    return (emb * emb.grad).sum(-1).detach().numpy()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_bert_gradient_equals_autograd(bert, exporter):
    net, ids, mask, paths = bert
    feeds = {"ids": ids.numpy(), "mask": mask.numpy()}
    result = rulegraph.Explainer(paths[exporter], "gradient").explain(feeds, target=TARGETS)
    np.testing.assert_allclose(result.outputs["logits"], net(ids, mask).detach().numpy(), rtol=1e-4, atol=1e-5)
    expected = autograd_per_token(net, ids, mask)
    assert result.attribution["ids"].shape == tuple(ids.shape)
    error = np.abs(result.attribution["ids"] - expected).max() / np.abs(expected).max()
    print(f"\n{exporter}: gradient × input per token vs autograd, max relative error {error:.1e}")
    assert error < 1e-4


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_bert_lrp_transformer_conserves_per_token(bert, exporter):
    _, ids, mask, paths = bert
    feeds = {"ids": ids.numpy(), "mask": mask.numpy()}
    report = check(paths[exporter], "lrp-transformer", x=feeds)
    assert report.ok and report.predicted == "approximate", report.to_text()
    result = rulegraph.Explainer(paths[exporter], "lrp-transformer").explain(feeds, target=TARGETS)
    print(f"\n{exporter}: lrp-transformer max relative delta {np.abs(result.relative_delta).max():.1e}")
    assert np.abs(result.relative_delta).max() < 1e-3
    assert set(result.attribution) == {"ids"} and result.map.shape == tuple(ids.shape)  # the mask: nothing
    np.testing.assert_allclose(result.map[1, 5:], 0.0, atol=1e-6 * np.abs(result.map).max())  # masked out


def test_bert_both_exports_agree(bert):
    _, ids, mask, paths = bert
    feeds = {"ids": ids.numpy(), "mask": mask.numpy()}
    for rules_name in ("gradient", "lrp-transformer"):
        maps = [rulegraph.Explainer(p, rules_name).explain(feeds, target=TARGETS).map for p in paths.values()]
        error = np.abs(maps[0] - maps[1]).max() / np.abs(maps[0]).max()
        assert error < 1e-4, (rules_name, error)
