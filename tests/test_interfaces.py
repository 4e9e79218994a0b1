"""Model import and the Python interface: Constant-node weights, old opsets, several inputs and
outputs, integer inputs, seed-array targets, intermediate start tensors, clear model errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph import Explainer, ModelError, RulegraphError
from rulegraph.backward import ops as G

F = TensorProto.FLOAT
RNG = np.random.default_rng(7)
W1 = RNG.normal(size=(6, 4)).astype(np.float32)
W2 = RNG.normal(size=(3, 6)).astype(np.float32)


def mlp(weights_as_constant_nodes=False, opset=17):
    """x[N,4] -> MatMul W1ᵀ -> Relu -> MatMul W2ᵀ -> y[N,3]; named intermediate 'h'."""
    consts = {"w1t": W1.T.copy(), "w2t": W2.T.copy()}
    nodes = [helper.make_node("MatMul", ["x", "w1t"], ["z"], name="fc1"),
             helper.make_node("Relu", ["z"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w2t"], ["y"], name="fc2")]
    inits = []
    if weights_as_constant_nodes:
        nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v)) for k, v in consts.items()] + nodes
    else:
        inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F, ["N", 4])],
                              [helper.make_tensor_value_info("y", F, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def gradient(x, target):
    z = x @ W1.T
    return ((z > 0) * (np.eye(3)[target] @ W2)) @ W1


X = RNG.normal(size=(5, 4)).astype(np.float32)


@pytest.mark.parametrize("constant_nodes", [False, True])
@pytest.mark.parametrize("opset", [9, 13, 17])
def test_gradient_on_constant_nodes_and_old_opsets(constant_nodes, opset):
    result = Explainer(mlp(constant_nodes, opset), "gradient").explain(X, target=[0, 1, 2, 0, 1])
    np.testing.assert_allclose(result.saliency["x"], gradient(X, [0, 1, 2, 0, 1]), rtol=1e-5, atol=1e-6)


def test_user_model_is_not_modified():
    model = mlp()
    before = model.SerializeToString()
    Explainer(model, "gradient").explain(X)
    assert model.SerializeToString() == before


def test_seed_array_target_and_intermediate_start():
    seed = RNG.normal(size=(5, 6)).astype(np.float32)
    result = Explainer(mlp(), "gradient", start="h").explain(X, target=seed)
    z = X @ W1.T
    np.testing.assert_allclose(result.saliency["x"], ((z > 0) * seed) @ W1, rtol=1e-5, atol=1e-6)
    with pytest.raises(RulegraphError, match="cannot start at tensor 'nope'"):
        Explainer(mlp(), "gradient", start="nope").explain(X)


def two_inputs_two_outputs():
    """y1 = (a + Gather(E, ids).sum(1)) W; y2 = Relu(a); ids is int64: a token input (graph.py)."""
    emb = RNG.normal(size=(10, 4)).astype(np.float32)
    w = RNG.normal(size=(4, 3)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
             helper.make_node("ReduceSum", ["e", "axis1"], ["es"], keepdims=0, name="pool"),
             helper.make_node("Add", ["a", "es"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "w"], ["y1"], name="fc"),
             helper.make_node("Relu", ["a"], ["y2"], name="relu")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", F, ["N", 4]),
                                            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2])],
                              [helper.make_tensor_value_info("y1", F, ["N", 3]),
                               helper.make_tensor_value_info("y2", F, ["N", 4])],
                              [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), w


def test_several_inputs_and_outputs_by_name():
    model, w = two_inputs_two_outputs()
    a = RNG.normal(size=(2, 4)).astype(np.float32)
    ids = np.array([[1, 2], [3, 3]], dtype=np.int64)
    result = Explainer(model, "gradient", output="y1").explain({"a": a, "ids": ids}, target=[2, 0])
    assert set(result.saliency) == {"a"}  # integer inputs are never differentiated
    np.testing.assert_allclose(result.saliency["a"], w.T[[2, 0]], rtol=1e-6)
    # token ids: gradient × input per token, summed over the embedding axis
    emb = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "emb"))
    per_token = (emb[ids] * w.T[[2, 0]][:, None, :]).sum(-1)
    assert result.attribution["ids"].shape == ids.shape
    np.testing.assert_allclose(result.attribution["ids"], per_token, rtol=1e-5)
    assert set(result.outputs) == {"y1", "y2"}
    with pytest.raises(RulegraphError, match="pass a dict"):
        Explainer(model, "gradient").explain(a)


def test_custom_domain_is_refused_naming_the_node():
    model = mlp()
    model.graph.node[1].domain = "com.example"
    model.graph.node[1].op_type = "FancyRelu"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelError, match=r"node 'relu' \(FancyRelu\) is in domain 'com.example'"):
        G.load(model)


def test_unknown_op_is_named():
    model = mlp()
    model.graph.node[1].op_type = "Det"
    from rulegraph import CoverageError

    with pytest.raises(CoverageError, match=r"node 'relu' \(Det\): rulegraph does not know op type"):
        Explainer(model, "gradient").explain(X)


def test_bad_model_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot read the ONNX model"):
        G.load(bad)


def test_wrong_rank_input_is_explained():
    with pytest.raises(RulegraphError, match=r"input 'x' must have rank 2"):
        Explainer(mlp(), "gradient").explain(np.zeros((1, 2, 3, 4), np.float32))


def test_external_data_loads_from_the_model_folder_only(tmp_path):
    model = mlp()
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    result = Explainer(folder / "m.onnx", "gradient").explain(X, target=[0, 1, 2, 0, 1])
    np.testing.assert_allclose(result.saliency["x"], gradient(X, [0, 1, 2, 0, 1]), rtol=1e-5, atol=1e-6)
    # the same model pointing outside its folder is refused, naming the tensor
    escaped = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in escaped.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes((folder / "weights.bin").read_bytes())
    onnx.save(escaped, str(folder / "escaped.onnx"))
    with pytest.raises(ModelError, match=r"keeps its data at '\.\./secret\.bin', outside the model's folder"):
        G.load(folder / "escaped.onnx")


def half_weights(model: onnx.ModelProto, to_fp16: bool) -> onnx.ModelProto:
    """The model with its weights rounded to fp16: stored as fp16 (with fp16 inputs and outputs)
    when ``to_fp16``, else stored back in float32."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        value = numpy_helper.to_array(init)
        if value.dtype == np.float32:
            half = value.astype(np.float16)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(half if to_fp16 else half.astype(np.float32),
                                                                      init.name))
    if to_fp16:
        for vi in list(out.graph.input) + list(out.graph.output):
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return out


@pytest.mark.parametrize("rules", ["gradient", "lrp-epsilon"])
def test_fp16_model_is_explained_in_float32(rules):
    from pathlib import Path

    cnn = onnx.load(str(Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"))
    x = np.load(Path(__file__).resolve().parent.parent / "models" / "digits_sample.npz")["x"]
    half = Explainer(half_weights(cnn, True), rules).explain(x.astype(np.float16), target=[1] * 8)
    reference = Explainer(half_weights(cnn, False), rules).explain(x.astype(np.float16).astype(np.float32),
                                                                     target=[1] * 8)
    assert half.map.dtype == np.float32
    np.testing.assert_allclose(half.map, reference.map, rtol=1e-5, atol=1e-6 * np.abs(reference.map).max())


def test_native_fp16_without_kernels_says_what_to_do():
    """onnxruntime's CPU lacks fp16 ScatterElements(add): a clear error, not a runtime traceback."""
    from pathlib import Path

    cnn = onnx.load(str(Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"))
    x = np.load(Path(__file__).resolve().parent.parent / "models" / "digits_sample.npz")["x"]
    explainer = Explainer(half_weights(cnn, True), "gradient", precision="native", providers=["CPUExecutionProvider"])
    with pytest.raises(RulegraphError, match="precision='fp32'"):
        explainer.explain(x.astype(np.float16))


def tf2onnx_style():
    """What tf2onnx writes for a Keras CNN: NHWC input, Transposes around a Conv with its bias as a
    separate Add, Relu, Reshape with a -1, MatMul + Add (bias), opset 13."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=(1, 4, 1, 1)).astype(np.float32) * 0.1
    dense = rng.normal(size=(4 * 6 * 6, 5)).astype(np.float32) * 0.1
    dense_b = rng.normal(size=5).astype(np.float32) * 0.1
    nodes = [helper.make_node("Transpose", ["input:0"], ["nchw"], perm=[0, 3, 1, 2], name="conv/transpose"),
             helper.make_node("Conv", ["nchw", "conv/kernel"], ["conv"], pads=[1, 1, 1, 1], name="conv/Conv2D"),
             helper.make_node("Add", ["conv", "conv/bias"], ["conv_b"], name="conv/BiasAdd"),
             helper.make_node("Relu", ["conv_b"], ["relu"], name="conv/Relu"),
             helper.make_node("Transpose", ["relu"], ["nhwc"], perm=[0, 2, 3, 1], name="conv/transpose_1"),
             helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"], name="flatten/Reshape"),
             helper.make_node("MatMul", ["flat", "dense/kernel"], ["mm"], name="dense/MatMul"),
             helper.make_node("Add", ["mm", "dense/bias"], ["logits"], name="dense/BiasAdd")]
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "conv/kernel": w, "conv/bias": b, "dense/kernel": dense, "dense/bias": dense_b,
        "flat_shape": np.array([-1, 4 * 6 * 6], dtype=np.int64)}.items()]
    graph = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info("input:0", F, ["unk__1", 6, 6, 3])],
                              [helper.make_tensor_value_info("logits", F, ["unk__1", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_tf2onnx_style_graph():
    model = tf2onnx_style()
    x = RNG.normal(size=(3, 6, 6, 3)).astype(np.float32)
    lrp = Explainer(model, "lrp-epsilon").explain(x)
    assert lrp.map.shape == x.shape and np.abs(lrp.relative_delta).max() < 1e-4
    grad = Explainer(model, "gradient").explain(x, target=lrp.target)
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    direction = RNG.normal(size=x.shape).astype(np.float32)
    h = 1e-3  # small enough not to cross a Relu kink on these inputs

    def logit(v):
        return session.run(None, {"input:0": v})[0][np.arange(3), lrp.target].astype(np.float64)

    slope = (logit(x + h * direction) - logit(x - h * direction)) / (2 * h)
    np.testing.assert_allclose((grad.saliency["input:0"] * direction).reshape(3, -1).sum(axis=1), slope, rtol=1e-2)
