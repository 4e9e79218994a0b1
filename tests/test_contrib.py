"""onnxruntime's contrib ops (com.microsoft, and SimplifiedLayerNormalization in the standard
domain) and ONNX's RotaryEmbedding: the op table keyed by domain, a VJP row per op form, refusals.

onnxruntime has no float64 kernel for these ops, so each row runs in float32 and is compared with a
float64 numpy replica of the op's math: the replica's forward must match onnxruntime's (it is the
op), and the oracle of the VJP is ``J(x)ᵀ s`` built from the replica by central differences, one
element at a time, in float64 (h = 1e-6: error ~1e-10). Tolerance: the explainer computes in
float32 (unit roundoff 6e-8) through a few dozen ops, amplified by at most 1/σ ≈ 3 in the
normalizations, so its error is below 1e-6 of the largest element; rows assert 1e-5 of it (and the
forward 1e-5), ten times that bound.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import rulegraph.backward.ops as G
from rulegraph import ModelError
from rulegraph.compile.build import SEED, compile_explainer
from rulegraph.run import rulefiles

MS = "com.microsoft"
GRADIENT = rulefiles.load("gradient")
W = np.random.default_rng(4321)


def weight(*shape) -> np.ndarray:
    return W.standard_normal(shape)


# numpy replicas, float64 ----------------------------------------------------------------------------


erf = np.vectorize(math.erf)


def norm(s, gamma, beta=None, eps=1e-5, axes=(-1,), centered=True):
    mean = s.mean(axis=axes, keepdims=True) if centered else 0.0
    d = s - mean
    y = d / np.sqrt((d * d).mean(axis=axes, keepdims=True) + eps) * gamma
    return y if beta is None else y + beta


def gelu(z, tanh=False):
    if tanh:
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    return 0.5 * z * (1 + erf(z / np.sqrt(2)))


def swap(x):
    return np.swapaxes(x, -1, -2)


def rotate(x, cos, sin, interleaved=False, dim=None):
    """Rotate pairs of the last axis of ``x`` (first ``dim`` features) by the angles of cos/sin
    (broadcast over x's leading axes, shape [..., seq, dim/2])."""
    dim = dim or x.shape[-1]
    head, rest = x[..., :dim], x[..., dim:]
    if interleaved:
        a, b = head[..., 0::2], head[..., 1::2]
        out = np.empty_like(head)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = head[..., :dim // 2], head[..., dim // 2:]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return np.concatenate([out, rest], axis=-1)


def heads(x, n):
    """[B, S, n·H] -> [B, n, S, H] and back (``heads(x, -n)``)."""
    if n > 0:
        b, s, h = x.shape
        return x.reshape(b, s, n, h // n).transpose(0, 2, 1, 3)
    b, n_, s, h = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n_ * h)


POS = np.array([[0, 1, 2], [2, 3, 4]], dtype=np.int64)
COS_SIN = np.linspace(0.1, 2.9, 12).reshape(6, 2) * np.arange(1, 3)
COS, SIN = np.cos(COS_SIN), np.sin(COS_SIN)


# rows -----------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    nodes: list
    inputs: dict          # name -> shape (float32 activations)
    consts: dict          # name -> array (float64 ones stored as float32)
    replica: Callable     # (**inputs and consts as float64) -> y
    opset: int = 17
    ints: dict | None = None  # integer graph inputs: name -> array


N = helper.make_node
X = {"x": [2, 3, 4]}
XS = {"x": [2, 3, 4], "skip": [2, 3, 4]}
G4, B4, C4 = weight(4), weight(4), weight(4)

ROWS = [
    Row("SkipLayerNormalization", [N("SkipLayerNormalization", ["x", "skip", "g", "b", "c"], ["y"], domain=MS,
                                     epsilon=1e-5)], XS, {"g": G4, "b": B4, "c": C4},
        lambda x, skip, g, b, c: norm(x + skip + c, g, b)),
    Row("SkipLayerNormalization-no-beta-no-bias", [N("SkipLayerNormalization", ["x", "skip", "g"], ["y"],
                                                    domain=MS, epsilon=1e-3)], XS, {"g": G4},
        lambda x, skip, g: norm(x + skip, g, eps=1e-3)),
    Row("SkipLayerNormalization-skip-broadcast", [N("SkipLayerNormalization", ["x", "skip", "g", "b"], ["y"],
                                                   domain=MS)], {"x": [2, 3, 4], "skip": [3, 4]}, {"g": G4,
                                                                                                   "b": B4},
        lambda x, skip, g, b: norm(x + skip, g, b)),
    Row("SkipLayerNormalization-sum-output-used",
        [N("SkipLayerNormalization", ["x", "skip", "g", "b", "c"], ["n", "", "", "s"], domain=MS),
         N("Mul", ["s", "w"], ["ws"]), N("Add", ["n", "ws"], ["y"])], XS, {"g": G4, "b": B4, "c": C4,
                                                                           "w": weight(4)},
        lambda x, skip, g, b, c, w: norm(x + skip + c, g, b) + w * (x + skip + c)),
    Row("SkipSimplifiedLayerNormalization", [N("SkipSimplifiedLayerNormalization", ["x", "skip", "g", "c"],
                                               ["y"],
                                               domain=MS, epsilon=1e-6)], XS, {"g": G4, "c": C4},
        lambda x, skip, g, c: norm(x + skip + c, g, eps=1e-6, centered=False)),
    Row("SkipSimplifiedLayerNormalization-sum-output-used",
        [N("SkipSimplifiedLayerNormalization", ["x", "skip", "g"], ["n", "", "", "s"], domain=MS),
         N("Mul", ["n", "s"], ["y"])], XS, {"g": G4},
        lambda x, skip, g: norm(x + skip, g, eps=1e-5, centered=False) * (x + skip)),
    Row("SimplifiedLayerNormalization", [N("SimplifiedLayerNormalization", ["x", "g"], ["y"], epsilon=1e-5)],
        X,
        {"g": G4}, lambda x, g: norm(x, g, centered=False)),
    Row("SimplifiedLayerNormalization-axis-1", [N("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=1,
                                                  epsilon=1e-4)], X, {"g": weight(3, 4)},
        lambda x, g: norm(x, g, eps=1e-4, axes=(1, 2), centered=False)),
    Row("FastGelu-bias", [N("FastGelu", ["x", "b"], ["y"], domain=MS)], X, {"b": B4},
        lambda x, b: gelu(x + b, tanh=True)),
    Row("FastGelu", [N("FastGelu", ["x"], ["y"], domain=MS)], X, {}, lambda x: gelu(x, tanh=True)),
    Row("BiasGelu", [N("BiasGelu", ["x", "b"], ["y"], domain=MS)], X, {"b": B4}, lambda x, b: gelu(x + b)),
    Row("com.microsoft.Gelu", [N("Gelu", ["x"], ["y"], domain=MS)], X, {}, lambda x: gelu(x)),
    Row("FusedMatMul-const-B-transB-alpha", [N("FusedMatMul", ["x", "w"], ["y"], domain=MS, transB=1,
                                               alpha=0.7)],
        X, {"w": weight(5, 4)}, lambda x, w: 0.7 * x @ w.T),
    Row("FusedMatMul-transA-transB", [N("FusedMatMul", ["x", "w"], ["y"], domain=MS, transA=1, transB=1)],
        {"x": [2, 4, 3]}, {"w": weight(5, 4)}, lambda x, w: swap(x) @ w.T),
    Row("FusedMatMul-both-active-broadcast", [N("FusedMatMul", ["x", "x1"], ["y"], domain=MS, transB=1,
                                                alpha=1.5)],
        {"x": [2, 3, 4], "x1": [1, 5, 4]}, {}, lambda x, x1: 1.5 * x @ swap(x1)),
    Row("FusedMatMul-both-active-transA", [N("FusedMatMul", ["x", "x1"], ["y"], domain=MS, transA=1)],
        {"x": [2, 4, 3], "x1": [2, 4, 5]}, {}, lambda x, x1: swap(x) @ x1),
    Row("RotaryEmbedding-com.microsoft-4d", [N("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"],
                                               domain=MS)],
        {"x": [2, 2, 3, 4]}, {"cos": COS, "sin": SIN},
        lambda x, cos, sin: rotate(x, cos[POS][:, None], sin[POS][:, None]), ints={"pos": POS}),
    Row("RotaryEmbedding-com.microsoft-3d-interleaved",
        [N("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain=MS, interleaved=1, num_heads=2)],
        {"x": [2, 3, 8]}, {"cos": COS, "sin": SIN},
        lambda x, cos, sin: heads(rotate(heads(x, 2), cos[POS][:, None], sin[POS][:, None], True), -2),
        ints={"pos": POS}),
    Row("RotaryEmbedding-23", [N("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"])],
        {"x": [2, 2, 3, 4]}, {"cos": COS, "sin": SIN},
        lambda x, cos, sin: rotate(x, cos[POS][:, None], sin[POS][:, None]), opset=23, ints={"pos": POS}),
    Row("RotaryEmbedding-23-partial-interleaved",
        [N("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], num_heads=2, rotary_embedding_dim=2,
           interleaved=1)],
        {"x": [2, 3, 8]}, {"cos": COS[:, :1], "sin": SIN[:, :1]},
        lambda x, cos, sin: heads(rotate(heads(x, 2), cos[POS][:, None], sin[POS][:, None], True, 2), -2),
        opset=23, ints={"pos": POS}),
]


def build(row: Row) -> onnx.ModelProto:
    infos = [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in row.inputs.items()]
    infos += [helper.make_tensor_value_info(k, TensorProto.INT64, v.shape) for k,
              v in (row.ints or {}).items()]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in row.consts.items()]
    graph = helper.make_graph(row.nodes, "contrib", infos, [helper.make_tensor_value_info("y",
                                                                                          TensorProto.FLOAT,
                                                                                          None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", row.opset),
                                                    helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    return model


def replica_vjp(row: Row, feeds: dict, seed: np.ndarray, h: float = 1e-6) -> dict:
    """``J(x)ᵀ s`` of the replica for every activation input, by central differences per element."""
    consts = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in row.consts.items()}
    base = {k: v.astype(np.float64) for k, v in feeds.items()}
    out = {}
    for name in row.inputs:
        grad = np.zeros_like(base[name])
        for index in np.ndindex(grad.shape):
            plus, minus = dict(base), dict(base)
            plus[name], minus[name] = base[name].copy(), base[name].copy()
            plus[name][index] += h
            minus[name][index] -= h
            diff = row.replica(**plus, **consts) - row.replica(**minus, **consts)
            grad[index] = np.sum(seed * diff) / (2 * h)
        out[name] = grad
    return out


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_vjp_against_the_replica(row):
    rng = np.random.default_rng(zlib.crc32(row.id.encode()))
    model = build(row)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in row.inputs.items()}
    compiled = compile_explainer(G.load(model), GRADIENT, seed_mode=True)
    session = onnxruntime.InferenceSession(compiled.model.SerializeToString())
    y = onnxruntime.InferenceSession(model.SerializeToString()).run(["y"], {**feeds, **(row.ints or {})})[0]
    consts = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in row.consts.items()}
    expected_y = row.replica(**{k: v.astype(np.float64) for k, v in feeds.items()}, **consts)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5,
                               atol=1e-5 * np.abs(expected_y).max())  # the op's math
    seed = rng.standard_normal(y.shape).astype(np.float32)
    names = [compiled.saliency[k] for k in row.inputs]
    got = dict(zip(row.inputs, session.run(names, {**feeds, **(row.ints or {}), SEED: seed})))
    expected = replica_vjp(row, feeds, seed.astype(np.float64))
    for k in row.inputs:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-5 * np.abs(expected[k]).max(),
                                   err_msg=k)


KINDS = [  # op key, kind
    (f"{MS}.SkipLayerNormalization", "normalizing"), (f"{MS}.SkipSimplifiedLayerNormalization",
                                                      "normalizing"),
    ("SimplifiedLayerNormalization", "normalizing"), (f"{MS}.FastGelu", "nonlinear"), (f"{MS}.BiasGelu",
                                                                                       "nonlinear"),
    (f"{MS}.Gelu", "nonlinear"), ("Gelu", "nonlinear"), (f"{MS}.FusedMatMul", "linear"),
    (f"{MS}.RotaryEmbedding", "linear"), ("RotaryEmbedding", "linear"),
]


@pytest.mark.parametrize("key, kind", KINDS)
def test_op_table_is_keyed_by_domain(key, kind):
    assert G.OPS.table[key] == kind


def test_a_node_of_another_domain_is_read_under_its_key():
    graph = G.load(build(ROWS[0]))
    (node,) = graph.nodes
    assert (node.op_type, node.domain, node.kind) == (f"{MS}.SkipLayerNormalization", MS, "normalizing")


def _one(op_type: str, domain: str, inputs=("x",), **attrs) -> onnx.ModelProto:
    return build(Row("one", [N(op_type, list(inputs), ["y"], domain=domain, **attrs)], X, {}, None))


REFUSALS = [
    (_one("Attention", MS), "node 'n0' (Attention) (domain 'com.microsoft') is not supported: onnxruntime's "
     "transformer optimizer writes it; optimize with `FusionOptions(model_type)` and "
     "`options.enable_attention = False` (optimize_model(..., optimization_options=options)), which keeps "
     "the op "
     "by op (MatMul, Softmax, ...)"),
    (_one("EmbedLayerNormalization", MS), "`options.enable_embed_layer_norm = False`"),
    (_one("BiasAdd", MS), "`options.enable_bias_add = False`"),
    (_one("QLinearAdd", MS),
     "(QLinearAdd) (domain 'com.microsoft') is not supported: it is an integer op of a "
     "QOperator-format quantized model, whose path carries no float number; quantize with "
     "`quant_format=QuantFormat.QDQ`"),
    (_one("Inverse", MS),
     "node 'n0' (Inverse) is in domain 'com.microsoft', whose op 'Inverse' rulegraph does "
     "not explain (it knows com.microsoft.BiasGelu, com.microsoft.FastGelu, com.microsoft.FusedMatMul, "),
    (_one("Relu", "org.example"),
     "node 'n0' (Relu) is in domain 'org.example', whose op 'Relu' rulegraph does "
     "not explain; re-export without custom ops"),
]


@pytest.mark.parametrize("model, message", REFUSALS, ids=["Attention", "EmbedLayerNormalization", "BiasAdd",
                                                          "QLinearAdd", "unknown-contrib-op",
                                                          "unknown-domain"])
def test_refused_by_name_with_what_avoids_it(model, message):
    for node in model.graph.node:
        node.name = "n0"
    if not any(o.domain == "org.example" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("org.example", 1))
    with pytest.raises(ModelError) as err:
        G.load(model)
    assert message in str(err.value)


def test_rule_file_binds_an_op_of_another_domain():
    text = ("rulegraph 1\nquantity relevance\n"
            "com.microsoft.SkipLayerNormalization -> layernorm_linear(eps = 1e-6)\n")
    (binding,) = rulefiles.parse(text, source="t.rules").bindings
    assert (binding.selector.form, binding.selector.value, binding.rule.name) == (
        "op", f"{MS}.SkipLayerNormalization", "layernorm_linear")
