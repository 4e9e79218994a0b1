"""Every bundled rule file on a small hand-built model of each kind the README's architecture table
has: a squeeze-excitation gate (``x·σ(·)``, MobileNetV3 / EfficientNet), a residual Add (ResNet), a
BatchNormalization (VGG-BN), a MaxPool, a Softmax at the end, and an attention block with
LayerNorm (BERT / ViT). Each file compiles there and conserves as its README row says, or, where
its header states it is for CNNs, refuses the transformer with a sentence naming that statement
and the bundled files that do explain those ops."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tables import BUNDLED

import rulegraph
from rulegraph.check import check
from rulegraph.errors import CoverageError, RulegraphWarning
from rulegraph.run import rulefiles as dsl

F = TensorProto.FLOAT
RNG = np.random.default_rng(11)
C, S, CLASSES = 4, 6, 5  # channels, spatial size, classes


def _w(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def _model(nodes, inputs: dict[str, list], consts: dict[str, np.ndarray], output="y") -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ins, [out], name=out, **attrs) for op, ins, out, attrs in nodes], "g",
        [helper.make_tensor_value_info(k, F, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(output, F, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _stem_and_head(body, body_consts, last="b", softmax=False):
    """Conv+bias -> Relu -> body -> GlobalAveragePool -> Flatten -> Gemm (-> Softmax)."""
    nodes = [("Conv", ["x", "w0", "b0"], "c0", {"pads": [1, 1, 1, 1]}), ("Relu", ["c0"], "a", {})]
    nodes += body
    nodes += [("GlobalAveragePool", [last], "gap", {}), ("Flatten", ["gap"], "flat", {}),
              ("Gemm", ["flat", "wf", "bf"], "logits" if softmax else "y", {"transB": 1})]
    if softmax:
        nodes.append(("Softmax", ["logits"], "y", {"axis": 1}))
    consts = {"w0": _w(C, 3, 3, 3), "b0": _w(C, scale=0.1), "wf": _w(CLASSES, C),
              "bf": _w(CLASSES, scale=0.1), **body_consts}
    return _model(nodes, {"x": ["N", 3, S, S]}, consts)


def se_gate(gate_op="Sigmoid"):
    """h ⊙ σ(conv1x1(gap(h))): the squeeze-excitation product of two activations."""
    return _stem_and_head([("GlobalAveragePool", ["a"], "sq", {}), ("Conv", ["sq", "ws", "bs"], "ex", {}),
                           (gate_op, ["ex"], "gate", {}), ("Mul", ["a", "gate"], "b", {})],
                          {"ws": _w(C, C, 1, 1), "bs": _w(C, scale=0.1)})


def _conv(out: str) -> tuple:
    return ("Conv", ["a", "w1", "b1"], out, {"pads": [1, 1, 1, 1]})


def _conv_consts() -> dict:
    return {"w1": _w(C, C, 3, 3), "b1": _w(C, scale=0.1)}


def residual():
    body = [_conv("c1"), ("Add", ["c1", "a"], "s", {}), ("Relu", ["s"], "b", {})]
    return _stem_and_head(body, _conv_consts())


def batchnorm():
    stats = {"g": RNG.uniform(0.5, 1.5, C).astype(np.float32), "beta": _w(C, scale=0.2),
             "mu": _w(C, scale=0.2), "var": RNG.uniform(0.5, 2, C).astype(np.float32)}
    return _stem_and_head([_conv("c1"), ("BatchNormalization", ["c1", "g", "beta", "mu", "var"], "bn", {}),
                           ("Relu", ["bn"], "b", {})], {**_conv_consts(), **stats})


def maxpool():
    return _stem_and_head([("MaxPool", ["a"], "b", {"kernel_shape": [2, 2], "strides": [2, 2]})], {})


def softmax_end():
    return _stem_and_head([_conv("c1"), ("Relu", ["c1"], "b", {})], _conv_consts(), softmax=True)


T, E = 3, 4  # tokens, embedding width


def attention():
    """LayerNorm -> single-head self-attention softmax(QKᵀ/√E)·V -> ReduceMean over tokens -> Gemm."""
    nodes = [("LayerNormalization", ["x", "ln_g", "ln_b"], "ln", {"axis": -1}),
             ("MatMul", ["ln", "wq"], "q", {}), ("MatMul", ["ln", "wk"], "k", {}),
             ("MatMul", ["ln", "wv"], "v", {}),
             ("Transpose", ["k"], "kt", {"perm": [0, 2, 1]}), ("MatMul", ["q", "kt"], "qk", {}),
             ("Mul", ["qk", "scale"], "scores", {}), ("Softmax", ["scores"], "att", {"axis": -1}),
             ("MatMul", ["att", "v"], "ctx", {}), ("Add", ["ctx", "x"], "res", {}),
             ("ReduceMean", ["res"], "pooled", {"axes": [1], "keepdims": 0}),
             ("Gemm", ["pooled", "wf", "bf"], "y", {"transB": 1})]
    consts = {"ln_g": RNG.uniform(0.5, 1.5, E).astype(np.float32), "ln_b": _w(E, scale=0.1), "wq": _w(E, E),
              "wk": _w(E, E), "wv": _w(E, E), "scale": np.array(1 / np.sqrt(E), np.float32),
              "wf": _w(CLASSES, E), "bf": _w(CLASSES, scale=0.1)}
    return _model(nodes, {"x": ["N", T, E]}, consts)


CNN_MODELS = {"se_gate": se_gate, "se_hardsigmoid": lambda: se_gate("HardSigmoid"), "residual": residual,
              "batchnorm": batchnorm, "maxpool": maxpool, "softmax_end": softmax_end}
MODELS = {**CNN_MODELS, "attention": attention}

#: bundled file -> (the README's "conserves" column as a bound on the relative delta on these
#: models, or None for "none" / "leaks bias"; does it explain transformers?): tests/tables.py
FILES = {name: (facts.conserves, facts.transformers) for name, facts in BUNDLED.items()}


def test_the_table_lists_every_bundled_file():
    assert sorted(FILES) == dsl.bundled_rule_names()


def _input(name: str) -> np.ndarray:
    shape = (2, T, E) if name == "attention" else (2, 3, S, S)
    return np.random.default_rng(5).uniform(0, 1, shape).astype(np.float32)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("rules", list(FILES))
def test_bundled_file_on_each_kind(rules, model_name):
    bound, transformers = FILES[rules]
    model, x = MODELS[model_name](), _input(model_name)
    explainer = rulegraph.Explainer(model, rules)
    if model_name == "attention" and not transformers:
        with pytest.raises(CoverageError) as info:
            explainer.explain(x)
        message = str(info.value)
        statement = f"rules/{rules}.rules does not explain normalizing ops ('normalizing -> unsupported' at "
        assert statement in message
        assert "bundled files that explain it: " in message and "lrp-transformer" in message
        assert "node 'ln' (LayerNormalization)" in message
        # a file whose products hold the attention weights constant (CP-LRP) sends nothing to the
        # Softmax; where its MatMul rule is a linear one (refused on a product), the hold does not apply
        holds = ("softmax_constant = 1" in (dsl.bundled_rules_dir() / f"{rules}.rules").read_text()
                 and "rules accepting bilinear" not in message)
        assert ("node 'att' (Softmax)" in message) is not holds
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RulegraphWarning)  # amplification is measured elsewhere
        result = explainer.explain(x)
    assert all(np.isfinite(a).all() for a in result.attribution.values())
    if bound is not None:
        report = check(model, rules, x=x, tolerance=bound, max_amplification=np.inf)
        assert report.ok, report.to_text()


def test_deeplift_product_is_the_shapley_split():
    """``y = x ⊙ z`` (two inputs): DeepLIFT's product rule gives ``Δx ⊙ ½(z + z')`` and
    ``½(x + x') ⊙ Δz`` at the target (seed one-hot), summing to ``Δy`` exactly."""
    model = _model([("Mul", ["x", "z"], "y", {})], {"x": ["N", 3], "z": ["N", 3]}, {})
    rng = np.random.default_rng(2)
    x, z, xb, zb = (rng.normal(size=(2, 3)).astype(np.float32) for _ in range(4))
    target = np.array([0, 2])
    result = rulegraph.Explainer(model, "deeplift-rescale").explain({"x": x, "z": z}, target=target,
                                                                   baseline={"x": xb, "z": zb})
    onehot = np.eye(3)[target]
    x64, z64, xb64, zb64 = (v.astype(np.float64) for v in (x, z, xb, zb))
    expected = {"x": onehot * (x64 - xb64) * (z64 + zb64) / 2, "z": onehot * (x64 + xb64) / 2 * (z64 - zb64)}
    for name, value in expected.items():
        np.testing.assert_allclose(result.attribution[name], value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.delta, 0, atol=1e-6)
