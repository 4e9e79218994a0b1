"""Any model onnxruntime runs is explained, any other is refused by name.

Legal exports rulegraph used to refuse (inputs without a declared shape, nodes out of topological
order, names that clash with rulegraph's own) are explained, each row checked against the closed
form of the gradient of ``y = relu(x W)``. Malformed files (bad external data, missing tensors,
unknown ops, domains and opsets, truncated bytes) and models onnxruntime refuses give a
``ModelError`` naming the file and the node or tensor; onnxruntime's messages come in full.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph import Explainer, Target
from rulegraph.compile.build import BASELINE_PREFIX, SEED, TARGET
from rulegraph.errors import InternalError, ModelError, RulegraphError
from rulegraph.run import runtime
from rulegraph.run.runtime import translate

W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5) / 4
X = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
CLASSES = np.array([0, 1, 2, 0, 1])


def mlp(x_shape=("N", 4), y_shape=("N", 3), reverse=False, names=None, opset=17):
    """``y = relu(x W)``; ``names`` renames tensors/nodes (keys x, h, y, W, mm, relu)."""
    n = {"x": "x", "h": "h", "y": "y", "W": "W", "mm": "mm", "relu": "relu", **(names or {})}
    nodes = [helper.make_node("MatMul", [n["x"], n["W"]], [n["h"]], name=n["mm"]),
             helper.make_node("Relu", [n["h"]], [n["y"]], name=n["relu"])]
    graph = helper.make_graph(nodes[::-1] if reverse else nodes, "mlp",
                              [helper.make_tensor_value_info(n["x"], TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(n["y"], TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(W, n["W"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def gradient_oracle(x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """∂y_c/∂x of ``relu(x W)``: ``W[:, c]`` where ``(x W)_c > 0``, else 0 (float64)."""
    h = x.astype(np.float64) @ W.astype(np.float64)
    return np.stack([W[:, c] * (h[i, c] > 0) for i, c in enumerate(classes)])


def in_domain(domain: str) -> onnx.ModelProto:
    model = mlp()
    model.graph.node[1].domain = domain
    return model


CLASH = {"h": "rg/relu/Relu_1", "mm": "rg/mm/MatMul_2", "relu": "rg/relu/t_3", "W": "rg/k_4"}
LEGAL = [
    ("input without shape", mlp(x_shape=None), "x"),
    ("output without shape", mlp(y_shape=None), "x"),
    ("input and output without shape", mlp(x_shape=None, y_shape=None), "x"),
    ("nodes in reverse order", mlp(reverse=True), "x"),
    ("node in domain ai.onnx", in_domain("ai.onnx"), "x"),
    ("names under rulegraph's prefix", mlp(names=CLASH), "x"),
    ("tensor named rulegraph/target", mlp(names={"h": TARGET, "relu": SEED}), "x"),
    ("input named rulegraph/seed", mlp(names={"x": SEED + "/x", "mm": TARGET}), SEED + "/x"),
]


@pytest.mark.parametrize("model,x_name", [r[1:] for r in LEGAL], ids=[r[0] for r in LEGAL])
def test_legal_models_are_explained(model, x_name):
    onnxruntime.InferenceSession(model.SerializeToString())  # onnxruntime runs it
    result = Explainer(model, "gradient").explain(X, target=CLASSES)
    np.testing.assert_allclose(result.saliency[x_name], gradient_oracle(X, CLASSES), rtol=1e-6, atol=1e-7)


def test_clashing_public_names_get_a_suffix_the_explainer_uses():
    model = mlp(names={"h": TARGET})
    compiled = Explainer(model, "gradient").compiled()
    assert compiled.target_input == TARGET + "_1"
    session = onnxruntime.InferenceSession(compiled.model.SerializeToString())
    names = [compiled.saliency["x"]]
    (saliency,) = session.run(names, {"x": X, compiled.target_input: CLASSES.astype(np.int64)})
    np.testing.assert_allclose(saliency, gradient_oracle(X, CLASSES), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rules", ["gradient", "lrp-epsilon", "deeplift-rescale"])
def test_added_names_are_new_in_the_users_model(rules):
    """Every node, tensor and initializer the explainer adds starts with the free prefix ``rg1/``,
    but for the public inputs and their suffixed names."""
    model = mlp(names={**CLASH, "h": BASELINE_PREFIX + "x"})
    compiled = Explainer(model, rules).compiled(node_sums=True)
    g = compiled.model.graph
    users = {t for n in model.graph.node for t in [*n.input, *n.output, n.name]}
    added = {t for n in g.node for t in [*n.output, n.name]} | {i.name for i in g.initializer}
    public = {compiled.target_input, *compiled.baseline_inputs.values()}
    assert public.isdisjoint(users) and compiled.class_output not in users
    assert {i.name for i in g.input} - users == public
    added -= users | {compiled.class_output}  # the public output of the class explained per row
    assert added and all(name.startswith("rg1/") for name in added)


def test_rank_comes_from_a_conv_consumer_for_compile():
    """An input without shape feeding a Conv gets the weight's rank, so `compile` needs no array."""
    w = np.ones((2, 1, 3, 3), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    explainer = Explainer(model, "gradient")
    assert explainer.graph.rank("x") == 4
    x = np.random.default_rng(1).normal(size=(2, 1, 5, 5)).astype(np.float32)
    result = explainer.explain(x, target=Target([0, 1], all_positions=True))
    # ∂ Σ y_c / ∂x of a 3×3 all-ones kernel, valid padding: how many windows cover each pixel
    cover = np.convolve(np.ones(3), np.ones(3))[:, None] * np.convolve(np.ones(3), np.ones(3))[None, :]
    np.testing.assert_allclose(result.saliency["x"], np.broadcast_to(cover, (2, 1, 5, 5)), rtol=1e-6)


def test_compile_without_a_known_rank_asks_for_an_array():
    with pytest.raises(ModelError, match=r"input 'x' is declared without a shape .* re-export"):
        Explainer(mlp(x_shape=None), "gradient").compiled()


# --------------------------------------------------------------------------------------------------
# refused by name


def with_node(op_type="Relu", domain="", inputs=("h",)):
    model = mlp()
    model.graph.node[1].CopyFrom(helper.make_node(op_type, list(inputs), ["y"], name="relu", domain=domain))
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


def newer_opset():
    model = mlp()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    return model


def compiled_again():
    return Explainer(mlp(), "gradient").compiled().model


def compiled_again_without_metadata():
    model = compiled_again()
    del model.metadata_props[:]
    return model


def resized_initializer(dims):
    model = mlp()
    del model.graph.initializer[0].dims[:]
    model.graph.initializer[0].dims.extend(dims)
    return model


def typed_initializer():
    """W stored in float_data with one value missing."""
    model = mlp()
    model.graph.initializer[0].CopyFrom(TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 3],
                                                    float_data=W.ravel()[:11].tolist()))
    return model


def wrong_dims():
    return mlp(x_shape=("N", 5))


def with_a_branch():
    """The Relu inside an If whose branches both compute it (control flow, as a TorchScript export of
    scripted code writes it)."""
    model = mlp()
    branch = helper.make_graph([helper.make_node("Relu", ["h"], ["r"])], "branch", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node[1].CopyFrom(helper.make_node("If", ["cond"], ["y"], name="relu", then_branch=branch,
                                                  else_branch=branch))
    return model


REFUSED = [
    ("missing initializer", with_node(inputs=("h_missing",)),
     r"node 'relu' \(Relu\) reads tensor 'h_missing'"),
    ("unknown op type", with_node("Reluu"), r"node 'relu' \(Reluu\).*did you mean 'Relu'"),
    ("unknown domain", with_node("Relu", domain="com.example"),
     r"node 'relu' \(Relu\) is in domain 'com.example'"),
    ("newer opset", newer_opset(), r"opset \d+, newer than the installed onnx"),
    ("compiled explainer", compiled_again(), r"already a rulegraph explainer .*'y' are the original model's"),
    ("explainer without metadata", compiled_again_without_metadata(), r"already a rulegraph explainer"),
    ("dims onnxruntime rejects", wrong_dims(), r"onnxruntime refuses .*mm"),
    ("control flow", with_a_branch(), r"node 'relu' \(If\) has a subgraph .*dynamo=True"),
    ("initializer as a scalar", resized_initializer([]),
     r"initializer 'W' holds 48 bytes, but its shape \[\] needs 4"),
    ("initializer too large", resized_initializer([4, 4]), r"'W'.* 48 bytes.*64"),
    ("typed data too short", typed_initializer(),
     r"initializer 'W' holds 11 values, but its shape \[4, 3\] needs 12"),
]


@pytest.mark.parametrize("model,pattern", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_models_name_the_node(tmp_path, model, pattern):
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match=pattern) as info:
        Explainer(str(path), "gradient").explain(X, target=CLASSES)
    assert "model.onnx" in str(info.value)


# --------------------------------------------------------------------------------------------------
# external data


def external(tmp_path: Path, **entries) -> Path:
    """The MLP saved with W in ``w.bin``, then its external-data entries overwritten by ``entries``."""
    model = mlp()
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    init = proto.graph.initializer[0]
    values = {e.key: e.value for e in init.external_data} | entries
    del init.external_data[:]
    for key, value in values.items():
        init.external_data.add(key=key, value=value)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    return tmp_path / "m.onnx"


def symlink_outside(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    (tmp_path / "in").mkdir()
    path = external(tmp_path / "in")
    os.replace(tmp_path / "in" / "w.bin", tmp_path / "outside" / "w.bin")
    (tmp_path / "in" / "w.bin").symlink_to(tmp_path / "outside" / "w.bin")
    return path


EXTERNAL = [
    ("offset past the end", lambda p: external(p, offset="4096"), r"tensor 'W'.*offset 4096"),
    ("length past the end", lambda p: external(p, length="4096"), r"tensor 'W'.*length 4096"),
    ("length of another shape", lambda p: external(p, length="40"), r"tensor 'W'.*40 bytes.*48"),
    ("negative offset", lambda p: external(p, offset="-8"), r"tensor 'W'.*offset '-8'"),
    ("offset not a number", lambda p: external(p, offset="eight"), r"tensor 'W'.*offset 'eight'"),
    ("NUL in the location", lambda p: external(p, location="w\0.bin"), r"tensor 'W'.*NUL"),
    ("location outside the folder", lambda p: external(p, location="../w.bin"), r"tensor 'W'.*outside"),
    ("absolute location", lambda p: external(p, location="/etc/passwd"), r"tensor 'W'.*outside"),
    ("missing file", lambda p: external(p, location="v.bin"), r"tensor 'W'.*'v.bin', which is missing"),
    ("symlink leaving the folder", symlink_outside, r"tensor 'W'.*outside"),
]


@pytest.mark.parametrize("make,pattern", [r[1:] for r in EXTERNAL], ids=[r[0] for r in EXTERNAL])
def test_bad_external_data_is_refused_by_name(tmp_path, make, pattern):
    path = make(tmp_path)
    with pytest.raises(ModelError, match=pattern) as info:
        Explainer(str(path), "gradient")
    assert str(path) in str(info.value)


def test_good_external_data_is_read(tmp_path):
    result = Explainer(str(external(tmp_path)), "gradient").explain(X, target=CLASSES)
    np.testing.assert_allclose(result.saliency["x"], gradient_oracle(X, CLASSES), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("keep", [0, 10, 40, 100], ids=lambda k: f"first {k} bytes")
def test_truncated_file_names_the_file(tmp_path, keep):
    path = tmp_path / "cut.onnx"
    path.write_bytes(mlp().SerializeToString()[:keep])
    with pytest.raises(ModelError, match="cut.onnx"):
        Explainer(str(path), "gradient")


# --------------------------------------------------------------------------------------------------
# onnxruntime's messages in full, in the user's terms


def test_run_failure_keeps_onnxruntimes_whole_message_and_the_input_shapes():
    model = mlp(x_shape=("N", "d"))
    bad = np.zeros((2, 5), dtype=np.float32)
    session = onnxruntime.InferenceSession(model.SerializeToString())
    with pytest.raises(Exception) as direct:   # the IO-binding run rulegraph's runs go through
        runtime.run(session, [o.name for o in session.get_outputs()], {"x": bad})
    with pytest.raises(RulegraphError) as info:
        Explainer(model, "gradient").explain(bad, target=[0, 1])
    assert str(direct.value).strip() in str(info.value)
    assert "'x' float32 [2, 5]" in str(info.value)


TRANSLATIONS = [
    ("Non-zero status code returned while running Mul node. Name:'rg/conv/Mul_7' Status Message: bad",
     {"rg/conv/Mul_7": "the backward of node 'conv' (Conv)"},
     "Name:'rg/conv/Mul_7 [the backward of node 'conv' (Conv)]' Status Message: bad"),
    ("rg/a/Add_12 and rg/a/Add_1", {"rg/a/Add_1": "A1", "rg/a/Add_12": "A12"},
     "rg/a/Add_12 [A12] and rg/a/Add_1 [A1]"),
    ("nothing of ours here: conv", {"rg/conv/Mul_7": "x"}, "nothing of ours here: conv"),
]


@pytest.mark.parametrize("message,origins,expected", TRANSLATIONS)
def test_translate_names_what_rulegraphs_tensors_stand_for(message, origins, expected):
    assert expected in translate(message, origins)


def test_origins_name_the_users_node_for_every_backward_tensor():
    compiled = Explainer(mlp(), "gradient").compiled()
    backward = {n.output[0]: compiled.origins[n.output[0]] for n in compiled.model.graph.node
                if n.output[0] in compiled.origins}
    assert "the backward of node 'mm' (MatMul)" in backward.values()
    assert "the backward of node 'relu' (Relu)" in backward.values()


SEED_MISFITS = [
    ("seed of the wrong width", np.ones((5, 4), np.float32),
     r"the seed array's shape \[5, 4\] does not fit the start tensor 'y' \[N, 3\]: expected \[5, 3\]"),
    ("seed of the wrong batch", np.ones((3, 3), np.float32),
     r"the seed array's shape \[3, 3\] does not fit the start tensor 'y' \[N, 3\]: expected \[5, 3\]"),
]


@pytest.mark.parametrize("seed,pattern", [r[1:] for r in SEED_MISFITS], ids=[r[0] for r in SEED_MISFITS])
def test_misfit_seed_is_the_users_error_with_the_whole_message(seed, pattern):
    with pytest.raises(RulegraphError, match=pattern) as info:
        Explainer(mlp(), "gradient").explain(X, target=seed)
    assert not isinstance(info.value, InternalError)


def broken_explainer(at_creation: bool) -> Explainer:
    """An explainer whose compiled model has one node of the Relu's backward (the mask's product) fed
    a [7] operand: a broadcast onnxruntime refuses at session creation (a constant) or only at run
    time (an input of unknown length)."""
    explainer = Explainer(mlp(), "gradient")
    compiled = explainer.compiled()
    g = compiled.model.graph
    node = next(n for n in g.node if compiled.origins.get(n.output[0]) == "the backward of node 'relu' (Relu)"
                and n.op_type == "Mul")
    if at_creation:
        g.initializer.append(numpy_helper.from_array(np.ones(7, np.float32), "seven"))
    else:  # the first 7 entries of x, flattened: the length is known only when x is
        g.node.insert(0, helper.make_node("Flatten", ["x"], ["flat"], name="flat", axis=0))
        g.node.insert(1, helper.make_node("Slice", ["flat", "zero", "seven_end", "one"], ["cut"], name="cut"))
        g.node.insert(2, helper.make_node("Squeeze", ["cut", "zero"], ["seven"], name="squeeze"))
        g.initializer.extend([numpy_helper.from_array(np.array([0]), "zero"),
                              numpy_helper.from_array(np.array([1]), "one"),
                              numpy_helper.from_array(np.array([7]), "seven_end")])
    node.input[1] = "seven"
    return explainer


@pytest.mark.parametrize("at_creation", [True, False], ids=["at session creation", "at run time"])
def test_explainer_failing_where_the_model_runs_is_a_bug_named_in_the_users_terms(at_creation):
    explainer = broken_explainer(at_creation)
    with pytest.raises(InternalError, match=r"\[the backward of node 'relu' \(Relu\)\]") as info:
        explainer.explain(X, target=CLASSES)
    assert "bug in rulegraph" in str(info.value)


@pytest.mark.parametrize("old,new", [(b"relux", b"\xff\xfeelu"), (b"W", b"\xc3")],
                         ids=["node name", "tensor"])
def test_names_that_are_not_utf8_are_refused(tmp_path, old, new):
    data = mlp(names={"relu": "relux"}).SerializeToString()
    path = tmp_path / "damaged.onnx"
    path.write_bytes(data.replace(old, new))
    with pytest.raises(ModelError, match=r"damaged.onnx: .* is not UTF-8 text"):
        Explainer(str(path), "gradient")


CLI_REFUSALS = [
    ("damaged file", lambda p: p.write_bytes(mlp().SerializeToString()[:40]), "compile", "cannot read"),
    ("input without shape", lambda p: onnx.save(mlp(x_shape=None), str(p)), "compile",
     "input 'x' is declared without a shape"),
    ("explainer given again", lambda p: onnx.save(compiled_again(), str(p)), "ops",
     "already a rulegraph explainer"),
]


@pytest.mark.parametrize("write,command,text", [r[1:] for r in CLI_REFUSALS],
                         ids=[r[0] for r in CLI_REFUSALS])
def test_cli_refuses_with_exit_2_and_one_message(tmp_path, capsys, write, command, text):
    from rulegraph.cli import main

    path = tmp_path / "model.onnx"
    write(path)
    extra = ["-o", str(tmp_path / "e.onnx")] if command == "compile" else []
    assert main([command, str(path), "--rules", "gradient", *extra]) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


def masked_fp16() -> onnx.ModelProto:
    """``y = (x + float(mask)) W`` stored in fp16: the mask is an inactive operand, a bias of the Add."""
    w = numpy_helper.from_array(W.astype(np.float16), "W")
    nodes = [helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT16, name="cast"),
             helper.make_node("Add", ["x", "mf"], ["a"], name="add"),
             helper.make_node("MatMul", ["a", "W"], ["y"], name="mm")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 4])]
    graph = helper.make_graph(nodes, "masked", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("precision", ["native", "fp32"])
def test_fp16_model_with_a_mask_is_explained_in_its_own_precision(precision):
    """LRP-ε, bias blamed: the Add's bias share is Σ_i m_i · R(a_i) / (a_i + ε·sign a_i) with
    R(a_i) = a_i W_ic · y_c / (y_c + ε·sign y_c) (float64 replica on the fp16 values)."""
    x = (np.abs(X[:2]) + 0.5).astype(np.float16)
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=np.int64)
    result = Explainer(masked_fp16(), "lrp-epsilon", precision=precision,
                       providers=["CPUExecutionProvider"]).explain({"x": x, "mask": mask}, target=[1, 2])
    eps, w = 1e-6, W.astype(np.float16).astype(np.float64)
    a = x.astype(np.float64) + mask
    expected = []
    for row, c in enumerate([1, 2]):
        y = a[row] @ w[:, c]
        r_a = a[row] * w[:, c] * y / (y + eps * np.sign(y))
        expected.append(np.sum(mask[row] * r_a / (a[row] + eps)))
    np.testing.assert_allclose(result.bias_total, expected, rtol=3e-3)
