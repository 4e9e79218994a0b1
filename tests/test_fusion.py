"""Pattern fusion (rulegraph/fusion.py): several nodes that compute one elementwise or normalizing op
become one fused node, so that a rule binds to the op whichever exporter wrote it (docs/kinds.md).

Tables:

1. ``FUSED``: decomposed forms written with onnx.helper in float64, several orderings per pattern
   (the exporters' and others). Each row pins the groups found (op type, member names); its fused
   VJP against central differences (tests/oracles.py); the gradient rule on the fused graph against
   the same graph loaded without fusion, where every op of that one has a kind.
2. ``NEAR_MISSES``: one wrong constant or one intermediate used outside: not fused, and the reason
   says what is wrong.
3. ``ELEMENTWISE``: on fused Gelu (erf, tanh), SiLU and HardSwish, ``slope``, ``repeat`` and ``ignore``
   against their closed forms, and against the ONNX op where there is one.
4. The LayerNormalization VJP row (vjp.py) against central differences; its float32 path (the node's
   own Mean and InvStdDev outputs) against the float64 one.
5. Real exports: torch's GELU, GELU(tanh), SiLU, Hardswish and LayerNorm through TorchScript
   (opset 13 and 17) and dynamo (opset 18): the groups found, and the gradient = autograd; a
   TransformerEncoderLayer (opset 14) with two decomposed LayerNorms and a GELU.

Also: bindings by op type and by the fused node's name, ``rulegraph ops``, the difference
quantity's baseline pass and ``rulegraph check`` on a fused node.
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from oracles import GRADIENT, check_vjp, make_model, one_node, reference_vjp, run
from test_qdq import PAIRS as QDQ_PAIRS
from test_qdq import pair_model

from rulegraph import Explainer
from rulegraph.backward import ops as G
from rulegraph.check import check
from rulegraph.cli import main
from rulegraph.compile.build import SEED, compile_explainer
from rulegraph.graph.fuse import PATTERNS, find_matches
from rulegraph.run import rulefiles as dsl

SQRT2, K = math.sqrt(2.0), math.sqrt(2.0 / math.pi)
X = [2, 5]


def n(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    """A node named after its output."""
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def c(value) -> np.ndarray:
    return np.array(value, dtype=np.float64)


def erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


FUNCTIONS = {
    "gelu": lambda x: 0.5 * x * (1 + erf(x / SQRT2)),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(K * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "hardswish": lambda x: x * np.clip(x + 3, 0, 6) / 6,
}

# (id, nodes, constants, opset, x shape, expected groups [(op type, member names)])
GELU_CONSTS = {"sqrt2": c(SQRT2), "rsqrt2": c(1 / SQRT2), "one": c(1.0), "half": c(0.5), "two": c(2.0)}
TANH_CONSTS = {"c3": c(0.044715), "k": c(K), "kc": c(K * 0.044715), "three": c(3.0), "one": c(1.0),
               "half": c(0.5)}
HS_CONSTS = {"three": c(3.0), "zero": c(0.0), "six": c(6.0), "sixth": c(1 / 6)}
LN_CONSTS = {"eps": c(1e-5), "two": c(2.0), "gamma": np.linspace(0.5, 1.5, 5), "beta": np.linspace(-1, 1, 5),
             "axes": np.array([-1], dtype=np.int64), "gamma34": np.linspace(0.5, 2.0, 12).reshape(3, 4)}
GELU_MEMBERS = ["d", "e", "e1", "m", "y"]

FUSED = [
    ("gelu-torchscript",
     [n("Div", ["x", "sqrt2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "e1"),
      n("Mul", ["x", "e1"], "m"), n("Mul", ["m", "half"], "y")], GELU_CONSTS, 17, X, [("Gelu", GELU_MEMBERS)]),
    ("gelu-dynamo",
     [n("Div", ["x", "sqrt2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "e1"),
      n("Mul", ["half", "e1"], "m"), n("Mul", ["x", "m"], "y")], GELU_CONSTS, 18, X, [("Gelu", GELU_MEMBERS)]),
    ("gelu-half-first-mul-rsqrt2",
     [n("Mul", ["x", "half"], "h"), n("Mul", ["rsqrt2", "x"], "d"), n("Erf", ["d"], "e"),
      n("Add", ["one", "e"], "e1"), n("Mul", ["h", "e1"], "y")], GELU_CONSTS, 17, X,
     [("Gelu", ["h", "d", "e", "e1", "y"])]),
    ("gelu-div-by-two",
     [n("Mul", ["x", "rsqrt2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "e1"),
      n("Mul", ["e1", "x"], "m"), n("Div", ["m", "two"], "y")], GELU_CONSTS, 17, X, [("Gelu", GELU_MEMBERS)]),
    ("gelu-expanded-sum",  # 0.5·x + 0.5·x·Erf: the term 0.5·x feeds two nodes
     [n("Mul", ["x", "half"], "h"), n("Div", ["x", "sqrt2"], "d"), n("Erf", ["d"], "e"),
      n("Mul", ["h", "e"], "he"), n("Add", ["h", "he"], "y")], GELU_CONSTS, 17, X,
     [("Gelu", ["h", "d", "e", "he", "y"])]),
    ("gelu-then-scaled",  # the Mul by 2 after the GELU stays a linear node of its own
     [n("Div", ["x", "sqrt2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "e1"),
      n("Mul", ["x", "e1"], "m"), n("Mul", ["m", "half"], "g"), n("Mul", ["g", "two"], "y")], GELU_CONSTS, 17, X,
     [("Gelu", ["d", "e", "e1", "m", "g"])]),
    ("gelu-twice",
     [n("Div", ["x", "sqrt2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "e1"),
      n("Mul", ["x", "e1"], "m"), n("Mul", ["m", "half"], "g"),
      n("Div", ["g", "sqrt2"], "d2"), n("Erf", ["d2"], "e2"), n("Add", ["e2", "one"], "f1"),
      n("Mul", ["g", "f1"], "m2"), n("Mul", ["m2", "half"], "y")], GELU_CONSTS, 17, X,
     [("Gelu", ["d", "e", "e1", "m", "g"]), ("Gelu", ["d2", "e2", "f1", "m2", "y"])]),
    ("gelu_tanh-torchscript",
     [n("Mul", ["x", "x"], "x2"), n("Mul", ["x", "x2"], "x3"), n("Mul", ["c3", "x3"], "cx3"),
      n("Add", ["x", "cx3"], "s"), n("Mul", ["k", "s"], "u"), n("Tanh", ["u"], "t"), n("Add", ["one", "t"], "t1"),
      n("Mul", ["x", "t1"], "m"), n("Mul", ["half", "m"], "y")], TANH_CONSTS, 17, X,
     [("Gelu", ["x2", "x3", "cx3", "s", "u", "t", "t1", "m", "y"])]),
    ("gelu_tanh-dynamo",
     [n("Pow", ["x", "three"], "x3"), n("Mul", ["c3", "x3"], "cx3"), n("Add", ["x", "cx3"], "s"),
      n("Mul", ["k", "s"], "u"), n("Tanh", ["u"], "t"), n("Add", ["t", "one"], "t1"), n("Mul", ["half", "t1"], "m"),
      n("Mul", ["x", "m"], "y")], TANH_CONSTS, 18, X, [("Gelu", ["x3", "cx3", "s", "u", "t", "t1", "m", "y"])]),
    ("gelu_tanh-expanded-argument",
     [n("Mul", ["x", "k"], "kx"), n("Pow", ["x", "three"], "x3"), n("Mul", ["x3", "kc"], "kcx3"),
      n("Add", ["kx", "kcx3"], "u"), n("Tanh", ["u"], "t"), n("Mul", ["x", "half"], "h"),
      n("Add", ["t", "one"], "t1"), n("Mul", ["h", "t1"], "y")], TANH_CONSTS, 17, X,
     [("Gelu", ["kx", "x3", "kcx3", "u", "t", "h", "t1", "y"])]),
    ("silu-x-first", [n("Sigmoid", ["x"], "s"), n("Mul", ["x", "s"], "y")], {}, 17, X, [("SiLU", ["s", "y"])]),
    ("silu-sigmoid-first", [n("Sigmoid", ["x"], "s"), n("Mul", ["s", "x"], "y")], {}, 17, X, [("SiLU", ["s", "y"])]),
    ("hardswish-add-clip-div-mul",
     [n("Add", ["x", "three"], "a"), n("Clip", ["a", "zero", "six"], "r"), n("Div", ["r", "six"], "q"),
      n("Mul", ["x", "q"], "y")], HS_CONSTS, 17, X, [("HardSwish", ["a", "r", "q", "y"])]),
    ("hardswish-mul-then-div",
     [n("Add", ["three", "x"], "a"), n("Clip", ["a", "zero", "six"], "r"), n("Mul", ["r", "x"], "m"),
      n("Div", ["m", "six"], "y")], HS_CONSTS, 17, X, [("HardSwish", ["a", "r", "m", "y"])]),
    ("hardswish-times-sixth",
     [n("Mul", ["x", "sixth"], "h"), n("Add", ["x", "three"], "a"), n("Clip", ["a", "zero", "six"], "r"),
      n("Mul", ["h", "r"], "y")], HS_CONSTS, 17, X, [("HardSwish", ["h", "a", "r", "y"])]),
    ("hardswish-hardsigmoid",  # torch TorchScript before opset 14
     [n("HardSigmoid", ["x"], "s", alpha=1 / 6), n("Mul", ["x", "s"], "y")], {}, 17, X, [("HardSwish", ["s", "y"])]),
    ("layernorm-torchscript",
     [n("ReduceMean", ["x"], "mu", axes=[-1]), n("Sub", ["x", "mu"], "d"), n("Pow", ["d", "two"], "d2"),
      n("ReduceMean", ["d2"], "var", axes=[-1]), n("Add", ["var", "eps"], "ve"), n("Sqrt", ["ve"], "sd"),
      n("Div", ["d", "sd"], "xn"), n("Mul", ["xn", "gamma"], "xg"), n("Add", ["xg", "beta"], "y")], LN_CONSTS, 17, X,
     [("LayerNormalization", ["mu", "d", "d2", "var", "ve", "sd", "xn", "xg", "y"])]),
    ("layernorm-opset18-no-affine",
     [n("ReduceMean", ["x", "axes"], "mu"), n("Sub", ["x", "mu"], "d"), n("Pow", ["d", "two"], "d2"),
      n("ReduceMean", ["d2", "axes"], "var"), n("Add", ["eps", "var"], "ve"), n("Sqrt", ["ve"], "sd"),
      n("Div", ["d", "sd"], "y")], LN_CONSTS, 18, X, [("LayerNormalization", ["mu", "d", "d2", "var", "ve", "sd", "y"])]),
    ("layernorm-square-reciprocal-two-axes",
     [n("ReduceMean", ["x"], "mu", axes=[1, 2]), n("Sub", ["x", "mu"], "d"), n("Mul", ["d", "d"], "d2"),
      n("ReduceMean", ["d2"], "var", axes=[2, 1]), n("Add", ["var", "eps"], "ve"), n("Sqrt", ["ve"], "sd"),
      n("Reciprocal", ["sd"], "inv"), n("Mul", ["inv", "d"], "xn"), n("Mul", ["gamma34", "xn"], "y")],
     LN_CONSTS, 17, [2, 3, 4], [("LayerNormalization", ["mu", "d", "d2", "var", "ve", "sd", "inv", "xn", "y"])]),
    ("safe_softmax-dynamo",  # torch's _safe_softmax in scaled_dot_product_attention
     [n("Softmax", ["x"], "s", axis=-1), n("IsNaN", ["s"], "nan"), n("Where", ["nan", "zero", "s"], "y")],
     {"zero": c(0.0)}, 18, X, [("Softmax", ["s", "nan", "y"])]),
    ("reciprocal-torchscript",  # 1 / s as Div(1, s): rsqrt in a TorchScript-exported RMSNorm
     [n("Div", ["one", "x"], "y")], {"one": c(1.0)}, 17, X, [("Reciprocal", ["y"])]),
    ("rmsnorm-torchscript",  # Llama's RMSNorm: x · (1 / √(mean x² + ε)) · γ, rsqrt as Div(1, s)
     [n("Pow", ["x", "two"], "x2"), n("ReduceMean", ["x2"], "ms", axes=[-1]), n("Add", ["ms", "eps"], "mse"),
      n("Sqrt", ["mse"], "r"), n("Div", ["one", "r"], "inv"), n("Mul", ["x", "inv"], "xn"),
      n("Mul", ["gamma", "xn"], "y")], {**LN_CONSTS, "one": c(1.0)}, 17, X,
     [("RMSNormalization", ["x2", "ms", "mse", "r", "inv", "xn", "y"])]),
    ("rmsnorm-dynamo-reciprocal-two-axes",
     [n("Mul", ["x", "x"], "x2"), n("ReduceMean", ["x2", "axes12"], "ms"), n("Add", ["eps", "ms"], "mse"),
      n("Sqrt", ["mse"], "r"), n("Reciprocal", ["r"], "inv"), n("Mul", ["inv", "x"], "y")],
     {**LN_CONSTS, "axes12": np.array([1, 2], dtype=np.int64)}, 18, [2, 3, 4],
     [("RMSNormalization", ["x2", "ms", "mse", "r", "inv", "y"])]),
    ("rmsnorm-divide-no-scale",  # T5's LayerNorm form x / √(mean x² + ε)
     [n("Pow", ["x", "two"], "x2"), n("ReduceMean", ["x2"], "ms", axes=[-1]), n("Add", ["ms", "eps"], "mse"),
      n("Sqrt", ["mse"], "r"), n("Div", ["x", "r"], "y")], LN_CONSTS, 17, X,
     [("RMSNormalization", ["x2", "ms", "mse", "r", "y"])]),
    ("l2norm-torchscript",  # F.normalize(x, dim=-1): ReduceL2, Clip(min = ε), Expand to x's shape, Div
     [n("ReduceL2", ["x"], "nrm", axes=[-1], keepdims=1), n("Clip", ["nrm", "tiny"], "cl"),
      n("Expand", ["cl", "shape"], "ex"), n("Div", ["x", "ex"], "y")],
     {"tiny": c(1e-12), "shape": np.array(X, dtype=np.int64)}, 17, X,
     [("LpNormalization", ["nrm", "cl", "ex", "y"])]),
    ("l2norm-opset18-max-no-expand",
     [n("ReduceL2", ["x", "axes0"], "nrm", keepdims=1), n("Max", ["tiny", "nrm"], "cl"), n("Div", ["x", "cl"], "y")],
     {"tiny": c(1e-12), "axes0": np.array([0], dtype=np.int64)}, 18, X, [("LpNormalization", ["nrm", "cl", "y"])]),
]

# patterns whose decomposed form has an op without a kind (Pow, Sqrt): only the fused graph compiles
NEEDS_FUSION_TO_COMPILE = {"gelu_tanh-dynamo", "gelu_tanh-expanded-argument", "layernorm-torchscript",
                           "layernorm-opset18-no-affine", "layernorm-square-reciprocal-two-axes",
                           "safe_softmax-dynamo", "rmsnorm-torchscript", "rmsnorm-dynamo-reciprocal-two-axes",
                           "rmsnorm-divide-no-scale"}


def build(nodes, consts, opset, x_shape, outputs=("y",), elem=TensorProto.DOUBLE) -> onnx.ModelProto:
    used = {i for node in nodes for i in node.input}
    consts = {k: (v.astype(np.float32) if elem == TensorProto.FLOAT and v.dtype.kind == "f" else v)
              for k, v in consts.items() if k in used}
    return make_model(nodes, {"x": x_shape}, consts, outputs=outputs, opset=opset, elem=elem)


def row(name: str) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray], int, list]:
    """(nodes, constants, opset, x shape) of the FUSED row ``name``."""
    _, nodes, consts, opset, shape, _ = next(r for r in FUSED if r[0] == name)
    return nodes, consts, opset, shape


def groups(graph) -> list[tuple[str, list[str]]]:
    return [(node.op_type, [m.name for m in node.members]) for node in graph.nodes if node.members]


def feeds_for(name: str, shape, rng) -> dict[str, np.ndarray]:
    x = 2.0 * rng.standard_normal(shape)
    if name.startswith("hardswish"):  # away from the kinks at ±3 of Clip(x + 3, 0, 6)
        x = np.where(np.abs(np.abs(x) - 3) < 0.05, x + 0.1, x)
    if name.startswith("reciprocal"):  # away from the pole at 0
        x = np.sign(x) * (np.abs(x) + 0.5)
    return {"x": x}


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def saliency(model: onnx.ModelProto, x: np.ndarray, seed: np.ndarray, rules=GRADIENT, fuse: bool = True):
    """``a(x)`` in seed mode, on the reference evaluator (float64)."""
    compiled = compile_explainer(G.load(model, fuse=fuse), rules, seed_mode=True)
    (name,) = (compiled.saliency or compiled.attribution).values()
    return run(compiled.model, {"x": x, SEED: seed}, [name])[name]


@pytest.mark.parametrize("name, nodes, consts, opset, shape, expected", FUSED, ids=[r[0] for r in FUSED])
def test_fused(name, nodes, consts, opset, shape, expected):
    model = build(nodes, consts, opset, shape)
    graph = G.load(model)
    assert groups(graph) == expected
    fused = [node for node in graph.nodes if node.members]
    normalizing = ("LayerNormalization", "RMSNormalization", "Softmax", "LpNormalization")
    assert all(node.kind == ("normalizing" if node.op_type in normalizing else "nonlinear") for node in fused)
    assert [o.name for o in graph.model.graph.node] == [node.name for node in nodes]  # the proto keeps them
    rng = rng_for(name)
    feeds = feeds_for(name, shape, rng)
    check_vjp(model, feeds, rng)  # the members' VJPs chained, against central differences
    if name not in NEEDS_FUSION_TO_COMPILE:
        seed = rng.standard_normal(shape)
        unfused = saliency(model, feeds["x"], seed, fuse=False)
        np.testing.assert_allclose(saliency(model, feeds["x"], seed), unfused, rtol=1e-12, atol=1e-12)


def test_every_pattern_has_rows():
    covered = {m.pattern for name, nodes, consts, opset, shape, _ in FUSED
               for m in find_matches(G.load(build(nodes, consts, opset, shape), fuse=False))[0]}
    qdq_models = [pair_model(*row[1:]) for row in QDQ_PAIRS]  # rows in test_qdq.py
    covered |= {m.pattern for model in qdq_models for m in find_matches(G.load(model, fuse=False))[0]}
    assert covered == set(PATTERNS)
    for p in PATTERNS.values():
        assert p.doc and ":" in p.doc, p.name  # identity, then the exporters that write it


def test_layernorm_fused_equals_the_onnx_op():
    """The gradient through the decomposed LayerNorm's members = the LayerNormalization row."""
    rng = np.random.default_rng(7)
    nodes, consts, opset, shape = row("layernorm-torchscript")
    decomposed = build(nodes, consts, opset, shape)
    native = one_node("LayerNormalization", ["x", "gamma", "beta"], {"x": shape},
                      {"gamma": consts["gamma"], "beta": consts["beta"]}, epsilon=1e-5)
    graph = G.load(decomposed)
    assert graph.nodes[0].attrs == {"axis": -1, "epsilon": 1e-5}
    assert graph.nodes[0].inputs == ["x", "gamma", "beta"]
    x, seed = rng.standard_normal(shape), rng.standard_normal(shape)
    np.testing.assert_allclose(run(decomposed, {"x": x})["y"], run(native, {"x": x})["y"], rtol=1e-10)
    np.testing.assert_allclose(saliency(decomposed, x, seed), saliency(native, x, seed), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# near misses: not fused, and why


def _gelu(div="sqrt2", half="half", extra=(), outputs=("y",)):
    return [n("Div", ["x", div], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "e1"),
            n("Mul", ["x", "e1"], "m"), n("Mul", ["m", half], "y"), *extra], outputs


def _layernorm(power="two", first_axes=(-1,), second_axes=(-1,), sub=("x", "mu"), keepdims=1):
    return [n("ReduceMean", ["x"], "mu", axes=list(first_axes), keepdims=keepdims), n("Sub", list(sub), "d"),
            n("Pow", ["d", power], "d2"), n("ReduceMean", ["d2"], "var", axes=list(second_axes), keepdims=keepdims),
            n("Add", ["var", "eps"], "ve"), n("Sqrt", ["ve"], "sd"), n("Div", ["d", "sd"], "y")], ("y",)


NEAR_CONSTS = {**GELU_CONSTS, **HS_CONSTS, **LN_CONSTS, "wrong": c(1.5), "almost_half": c(0.5 + 1e-4),
               "five": c(5.0), "three_ln": c(3.0), "c04": c(0.04), "k": c(K)}

# (id, (nodes, outputs), x shape, anchor node, words of the reason)
NEAR_MISSES = [
    ("gelu-wrong-sqrt2", _gelu(div="wrong"), X, "e", "the input of node 'e' (Erf) is 0.6666667·x, not 0.7071068·x"),
    ("gelu-half-off-by-1e-4", _gelu(half="almost_half"), X, "e",
     "nothing after node 'e' (Erf) computes 0.5·x + 0.5·x·e (x: 'x', e: 'e'): 'y' = 0.5001·x + 0.5001·x·e is a graph"),
    ("gelu-intermediate-used-outside", _gelu(extra=[n("Relu", ["e1"], "z")], outputs=("y", "z")), X, "e",
     "'e1' = 1 + e is used by 2 nodes"),
    ("gelu-intermediate-is-output", _gelu(outputs=("y", "m")), X, "e", "'m' = x + x·e is a graph output"),
    ("gelu-half-x-used-outside",  # 0.5·x + 0.5·x·Erf, and 0.5·x also feeds a Relu
     ([n("Mul", ["x", "half"], "h"), n("Div", ["x", "sqrt2"], "d"), n("Erf", ["d"], "e"), n("Mul", ["h", "e"], "he"),
       n("Add", ["h", "he"], "y"), n("Relu", ["h"], "z")], ("y", "z")), X, "e",
     "'h' inside the pattern is also used by node 'z' (Relu)"),
    ("silu-of-another-tensor",
     ([n("Mul", ["x", "two"], "x2"), n("Sigmoid", ["x2"], "s"), n("Mul", ["x", "s"], "y")], ("y",)), X, "s",
     "the input of node 's' (Sigmoid) is 2·x, not x"),
    ("silu-sigmoid-used-outside",
     ([n("Sigmoid", ["x"], "s"), n("Mul", ["x", "s"], "p"), n("Add", ["p", "s"], "y")], ("y",)), X, "s",
     "'s' is used by 2 nodes"),
    ("hardswish-clip-at-5",
     ([n("Add", ["x", "three"], "a"), n("Clip", ["a", "zero", "five"], "r"), n("Div", ["r", "six"], "q"),
       n("Mul", ["x", "q"], "y")], ("y",)), X, "r", "the max of node 'r' (Clip) is 5.0, not 6"),
    ("hardswish-hardsigmoid-defaults",
     ([n("HardSigmoid", ["x"], "s"), n("Mul", ["x", "s"], "y")], ("y",)), X, "s",
     "alpha of node 's' (HardSigmoid) is 0.2"),
    ("gelu_tanh-wrong-cubic",
     ([n("Pow", ["x", "three"], "x3"), n("Mul", ["c04", "x3"], "cx3"), n("Add", ["x", "cx3"], "s"),
       n("Mul", ["k", "s"], "u"), n("Tanh", ["u"], "t"), n("Add", ["t", "one"], "t1"),
       n("Mul", ["half", "t1"], "m"), n("Mul", ["x", "m"], "y")], ("y",)), X, "t",
     "the input of node 't' (Tanh) is 0.7978846·x + 0.03191538·x^3, not 0.7978846·x + 0.03567741·x^3"),
    ("layernorm-cube", _layernorm(power="three_ln"), X, "mu", "should feed its square"),
    ("layernorm-axes-differ", _layernorm(second_axes=(1,)), [2, 3, 4], "mu", "does not average the squares"),
    ("layernorm-not-trailing", _layernorm(first_axes=(1,), second_axes=(1,)), [2, 3, 4], "mu",
     "averages axes [1], not trailing axes"),
    ("layernorm-mean-minus-x", _layernorm(sub=("mu", "x")), X, "mu", "is not 'x' minus its mean"),
    ("layernorm-keepdims-0", _layernorm(keepdims=0), [5, 5], "mu", "drops the reduced axes"),
]


#: near misses of one pattern that are exactly another: (μ − x) / √(mean (μ − x)² + ε) is the RMS
#: normalization of μ − x, fused as one (its members from the square on)
OTHER_GROUPS = {"layernorm-mean-minus-x": [("RMSNormalization", ["d2", "var", "ve", "sd", "y"])]}


@pytest.mark.parametrize("name, spec, shape, anchor, why", NEAR_MISSES, ids=[r[0] for r in NEAR_MISSES])
def test_near_miss_is_not_fused(name, spec, shape, anchor, why):
    nodes, outputs = spec
    model = build(nodes, NEAR_CONSTS, 17, shape, outputs=outputs)
    assert groups(G.load(model)) == OTHER_GROUPS.get(name, [])
    matches, misses = find_matches(G.load(model, fuse=False))
    assert [m for m in matches if m.pattern == "layernorm"] == []
    assert any(why in reason for reason in misses[anchor]), misses[anchor]


# --------------------------------------------------------------------------------------------------
# the nonlinear rules on fused nodes: closed forms


def rules(nonlinear: str, quantity: str = "importance"):
    """``a(y)`` is the seed itself (``start one``), under either quantity."""
    return dsl.parse(f"rulegraph 1\nquantity {quantity}\nstart one\nlinear -> gradient\nnonlinear -> {nonlinear}\n",
                     source="fusion.rules")


ELEMENTWISE = [
    ("gelu", "gelu-torchscript", ("Gelu", {}, 20)),
    ("gelu", "gelu-half-first-mul-rsqrt2", ("Gelu", {}, 20)),
    ("gelu_tanh", "gelu_tanh-dynamo", ("Gelu", {"approximate": "tanh"}, 20)),
    ("gelu_tanh", "gelu_tanh-torchscript", ("Gelu", {"approximate": "tanh"}, 20)),
    ("silu", "silu-x-first", None),
    ("hardswish", "hardswish-add-clip-div-mul", ("HardSwish", {}, 17)),
    ("hardswish", "hardswish-hardsigmoid", ("HardSwish", {}, 17)),
]


@pytest.mark.parametrize("function, name, native", ELEMENTWISE, ids=[r[1] for r in ELEMENTWISE])
def test_nonlinear_rules_on_fused_nodes(function, name, native):
    """slope: ``a(y)·(f(x) − f(0))/x`` (f(0) = 0 for all four); repeat: ``f(a(y))``; ignore: ``a(y)``."""
    f = FUNCTIONS[function]
    nodes, consts, opset, shape = row(name)
    model = build(nodes, consts, opset, shape)
    rng = rng_for(name)
    x = feeds_for(name, shape, rng)["x"]
    x[0, 0] = 0.0  # slope takes f'(0) there
    seed = rng.standard_normal(shape)
    slope = saliency(model, x, seed, rules("slope"))
    expected = seed * np.divide(f(x), x, out=np.zeros_like(x), where=x != 0)
    expected[0, 0] = seed[0, 0] * {"gelu": 0.5, "gelu_tanh": 0.5, "silu": 0.5, "hardswish": 0.5}[function]
    np.testing.assert_allclose(slope, expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(saliency(model, x, seed, rules("repeat")), f(seed), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(saliency(model, x, seed, rules("ignore", "relevance")), seed, rtol=0, atol=0)
    if native is not None:
        op, attrs, native_opset = native
        single = one_node(op, ["x"], {"x": shape}, opset=native_opset, **attrs)
        np.testing.assert_allclose(saliency(single, x, seed, rules("slope")), slope, rtol=1e-6, atol=1e-12)


def test_bindings_by_op_type_and_by_fused_name(tmp_path, capsys):
    """``Gelu -> slope`` and ``node "/mlp/Gelu"`` select the fused node; ``rulegraph ops`` names its members."""
    nodes = [n("Div", ["x", "sqrt2"], "d"), n("Erf", ["d"], "e"), n("Add", ["e", "one"], "e1"),
             n("Mul", ["x", "e1"], "m"), n("Mul", ["m", "half"], "y")]
    for node, name in zip(nodes, ["/mlp/Div", "/mlp/Erf", "/mlp/Add", "/mlp/Mul", "/mlp/Mul_1"]):
        node.name = name
    model = build(nodes, GELU_CONSTS, 17, X)
    path = tmp_path / "gelu.onnx"
    onnx.save(model, path)
    graph = G.load(model)
    assert [(node.name, node.op_type) for node in graph.nodes] == [("/mlp/Gelu", "Gelu")]
    x, seed = np.linspace(-2, 2, 10).reshape(X), np.ones(X)
    expected = FUNCTIONS["gelu"](x) / x
    for bindings in ("nonlinear -> gradient\nGelu -> slope", 'nonlinear -> gradient\nnode "/mlp/Gelu" -> slope',
                     "nonlinear -> slope"):
        ruleset = dsl.parse(f"rulegraph 1\nquantity importance\n{bindings}\n", source="b.rules")
        np.testing.assert_allclose(saliency(model, x, seed, ruleset), expected, rtol=1e-9)
    rules_file = tmp_path / "g.rules"
    rules_file.write_text("rulegraph 1\nquantity importance\nGelu -> slope\n")
    assert main(["ops", str(path), "--rules", str(rules_file)]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("/mlp/Gelu  Gelu [fused: /mlp/Div, /mlp/Erf, /mlp/Add, /mlp/Mul, /mlp/Mul_1] nonlinear")
    assert "slope" in line and "(Gelu at" in line


def _mlp(pattern_nodes, consts, opset=17, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    """x [N, 4] -> Gemm -> the pattern on 'h' (its input renamed) -> Gemm -> y [N, 3]."""
    rng = np.random.default_rng(3)
    renamed = []
    for node in pattern_nodes:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        node.input[:] = ["h" if i == "x" else i for i in node.input]
        node.output[:] = ["g" if o == "y" else o for o in node.output]
        renamed.append(node)
    consts = {**consts, "w1": rng.standard_normal((5, 4)), "b1": 0.3 * rng.standard_normal(5),
              "w2": rng.standard_normal((3, 5)), "b2": 0.3 * rng.standard_normal(3)}
    nodes = [n("Gemm", ["x", "w1", "b1"], "h", transB=1), *renamed, n("Gemm", ["g", "w2", "b2"], "y", transB=1)]
    used = {i for node in nodes for i in node.input}
    consts = {k: v.astype(np.float32 if elem == TensorProto.FLOAT else np.float64) for k, v in consts.items()
              if k in used}
    return make_model(nodes, {"x": ["N", 4]}, consts, opset=opset, elem=elem)


def test_difference_quantity_runs_the_members_on_the_baseline():
    """DeepLIFT's baseline pass copies the fused node's members; summation-to-delta holds."""
    nodes, consts, _, _ = row("gelu-torchscript")
    model = _mlp(nodes, consts)
    ruleset = dsl.parse("rulegraph 1\nquantity difference\nbaseline zeros\nlinear -> baseline_difference\n"
                        "nonlinear -> baseline_difference\n", source="d.rules")
    x = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32)
    result = Explainer(model, ruleset).explain(x, target=[0, 1, 2, 0, 1, 2])
    assert np.abs(result.relative_delta).max() < 1e-5


def test_check_measures_a_fused_node():
    """``rulegraph check``: slope on a fused Gelu conserves the importance view, node by node."""
    nodes, consts, _, _ = row("gelu-torchscript")
    report = check(_mlp(nodes, consts), "gradient-x-input", samples=3)
    assert report.ok, report.to_text()
    (gelu,) = [node for node in report.nodes if node.op_type == "Gelu"]
    assert gelu.rule == "slope" and gelu.predicted == "exact" and gelu.leak < 1e-5


# --------------------------------------------------------------------------------------------------
# the LayerNormalization VJP row


LN_ROWS = [
    ("last-axis", [2, 3, 4], -1, True),
    ("axis-1-no-bias", [2, 3, 4], 1, False),
    ("2d", [3, 6], -1, True),
]


@pytest.mark.parametrize("name, shape, axis, bias", LN_ROWS, ids=[r[0] for r in LN_ROWS])
def test_layer_normalization_vjp(name, shape, axis, bias):
    rng = rng_for(name)
    normalized = shape[axis % len(shape):]
    consts = {"scale": 0.5 + rng.random(normalized), "bias": rng.standard_normal(normalized)}
    args = ["x", "scale", "bias"] if bias else ["x", "scale"]
    model = one_node("LayerNormalization", args, {"x": shape}, {k: consts[k] for k in args[1:]}, axis=axis,
                     epsilon=1e-3)
    check_vjp(model, {"x": rng.standard_normal(shape)}, rng)


def test_layer_normalization_float32_uses_the_nodes_mean_and_inv_std():
    """Float32: the row asks the forward node for Mean and InvStdDev; it agrees with the float64 row."""
    rng = np.random.default_rng(11)
    consts = {"scale": 0.5 + rng.random(6), "bias": rng.standard_normal(6)}
    models = {elem: one_node("LayerNormalization", ["x", "scale", "bias"], {"x": ["N", 6]},
                             {k: v.astype(dtype) for k, v in consts.items()}, elem=elem)
              for elem, dtype in ((TensorProto.FLOAT, np.float32), (TensorProto.DOUBLE, np.float64))}
    compiled = compile_explainer(G.load(models[TensorProto.FLOAT]), GRADIENT, seed_mode=True)
    (ln,) = [node for node in compiled.model.graph.node if node.op_type == "LayerNormalization"]
    assert len(ln.output) == 3 and all(ln.output)
    x, seed = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    got = Explainer(models[TensorProto.FLOAT], GRADIENT).explain(x.astype(np.float32),
                                                                 target=seed.astype(np.float32)).saliency["x"]
    want = reference_vjp(models[TensorProto.DOUBLE], {"x": x}, seed)["x"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# --------------------------------------------------------------------------------------------------
# real exports: torch, TorchScript (opset 13, 17) and dynamo (opset 18)

EXPORTERS = [("torchscript", 13), ("torchscript", 17), ("dynamo", 18)]
#: module -> exporter -> the groups' op types (members are checked by op type), or the native op
EXPECTED = {
    "GELU": {13: [("Gelu", ["Div", "Erf", "Add", "Mul", "Mul"])], 17: [("Gelu", ["Div", "Erf", "Add", "Mul", "Mul"])],
             18: [("Gelu", ["Div", "Erf", "Add", "Mul", "Mul"])]},
    "GELU-tanh": {13: [("Gelu", ["Mul", "Mul", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"])],
                  17: [("Gelu", ["Mul", "Mul", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"])],
                  18: [("Gelu", ["Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"])]},
    "SiLU": {13: [("SiLU", ["Sigmoid", "Mul"])], 17: [("SiLU", ["Sigmoid", "Mul"])], 18: [("SiLU", ["Sigmoid", "Mul"])]},
    "Hardswish": {13: [("HardSwish", ["HardSigmoid", "Mul"])], 17: "HardSwish", 18: "HardSwish"},
    "LayerNorm": {13: [("LayerNormalization", ["ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul",
                                               "Add"])], 17: "LayerNormalization", 18: "LayerNormalization"},
}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="the export rows need torch (the [crosscheck] extra)")


def _module(torch, name: str):
    nn = torch.nn
    act = {"GELU": nn.GELU(), "GELU-tanh": nn.GELU(approximate="tanh"), "SiLU": nn.SiLU(),
           "Hardswish": nn.Hardswish(), "LayerNorm": nn.LayerNorm(6)}[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    net = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 3)).eval()
    if name == "LayerNorm":  # a γ and β that are not 1 and 0
        with torch.no_grad():
            act.weight.uniform_(0.5, 1.5)
            act.bias.uniform_(-0.5, 0.5)
    return net


@pytest.fixture(scope="module")
def exports(torch, tmp_path_factory):
    """(module name, exporter, opset) -> (torch module, ONNX path)."""
    folder = tmp_path_factory.mktemp("exports")
    out = {}
    for name in EXPECTED:
        net = _module(torch, name)
        for exporter, opset in EXPORTERS:
            path = folder / f"{name}-{exporter}-{opset}.onnx"
            kwargs: dict = {"input_names": ["x"], "output_names": ["y"], "opset_version": opset,
                            "dynamo": exporter == "dynamo"}
            if exporter == "dynamo":
                kwargs.update(external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("N", min=1, max=64)},))
            else:
                kwargs.update(dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    torch.onnx.export(net, (torch.zeros(2, 4),), str(path), **kwargs)
            out[name, exporter, opset] = net, path
    return out


ROWS = [(name, exporter, opset) for name in EXPECTED for exporter, opset in EXPORTERS]


@pytest.mark.parametrize("name, exporter, opset", ROWS, ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in ROWS])
def test_torch_export(name, exporter, opset, exports, torch, capsys):
    net, path = exports[name, exporter, opset]
    graph = G.load(path)
    expected = EXPECTED[name][opset]
    if isinstance(expected, str):  # the exporter wrote the op itself: nothing to fuse
        assert groups(graph) == [] and expected in [node.op_type for node in graph.nodes]
    else:
        assert [(node.op_type, [m.op_type for m in node.members]) for node in graph.nodes if node.members] == expected
    assert [node.kind for node in graph.nodes][1] == ("normalizing" if name == "LayerNorm" else "nonlinear")

    x = np.random.default_rng(zlib.crc32(name.encode())).standard_normal((5, 4)).astype(np.float32)
    targets = [0, 1, 2, 1, 0]
    ruleset = dsl.parse("rulegraph 1\nquantity importance\nlinear -> gradient\nnonlinear -> gradient\n"
                        "normalizing -> gradient\n", source="g.rules")
    result = Explainer(path, ruleset).explain(x, target=targets)
    xt = torch.tensor(x, requires_grad=True)
    logits = net(xt)
    logits[range(5), targets].sum().backward()
    grad = xt.grad.numpy()
    np.testing.assert_allclose(result.outputs["y"], logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    error = np.abs(result.saliency["x"] - grad).max() / np.abs(grad).max()
    assert error < 1e-5, error


def test_torch_transformer_layer(torch, tmp_path):
    """A TransformerEncoderLayer (GELU) through TorchScript at opset 14: two decomposed LayerNorms and
    a GELU fused among attention's MatMuls, Softmax and shape arithmetic; the gradient = autograd."""
    torch.manual_seed(0)
    nn = torch.nn
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True)
    net = nn.Sequential(layer, nn.Flatten(), nn.Linear(80, 3)).eval()
    path = tmp_path / "transformer.onnx"
    with warnings.catch_warnings():  # not under no_grad: that takes the fused fast path, which has no export
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 5, 16),), str(path), dynamo=False, opset_version=14,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    assert [(node.op_type, len(node.members)) for node in G.load(path).nodes if node.members] == [
        ("LayerNormalization", 9), ("Gelu", 5), ("LayerNormalization", 9)]
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
    ruleset = dsl.parse("rulegraph 1\nquantity importance\nlinear -> gradient\nnonlinear -> gradient\n"
                        "normalizing -> gradient\nbilinear -> gradient\nroute -> gradient\n", source="g.rules")
    result = Explainer(path, ruleset).explain(x, target=[0, 1, 2])
    xt = torch.tensor(x, requires_grad=True)
    net(xt)[range(3), [0, 1, 2]].sum().backward()
    grad = xt.grad.numpy()
    assert np.abs(result.saliency["x"] - grad).max() / np.abs(grad).max() < 1e-5
