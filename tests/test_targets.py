"""Target forms, class axes and batch axes as exporters write them (rulegraph/targets.py).

Every row: a tiny model built with onnx.helper, a target, and a float64 numpy replica of the
gradient of what the target selects (``gradient`` rules: the saliency is that gradient, the start
value the selected logit), or the exact error.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph import Explainer, Target
from rulegraph.cli import main
from rulegraph.compile.build import CLASS, POSITIONS, TARGET
from rulegraph.compile.targets import TargetError

F = TensorProto.FLOAT
RNG = np.random.default_rng(7)
W1 = RNG.normal(size=(4, 5))
W2 = RNG.normal(size=(5, 3))
CONV = RNG.normal(size=(3, 2, 1, 1))
TW = RNG.normal(size=(4, 5))


def _dim(value):
    """A dim as exporters write it: an int (also -1, 0), a symbol, or None (no value at all)."""
    d = onnx.TensorShapeProto.Dimension()
    if isinstance(value, int):
        d.dim_value = value
    elif isinstance(value, str):
        d.dim_param = value
    return d


def _info(name, dims):
    vi = helper.make_tensor_value_info(name, F, None)
    shape = vi.type.tensor_type.shape
    shape.SetInParent()
    shape.dim.extend(_dim(d) for d in dims)
    return vi


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "m", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f"
                                                                  else np.int64), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def mlp(batch):
    """x [batch, 4] -> MatMul -> Tanh -> MatMul -> y [batch, 3]."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    return _model(nodes, [_info("x", [batch, 4])], [_info("y", [batch, 3])], {"w1": W1, "w2": W2})


def mlp_grad(x, c):
    """d y_c / d x of ``mlp``, float64."""
    h = x.astype(np.float64) @ W1
    return ((1 - np.tanh(h) ** 2) * W2[:, c]) @ W1.T


def conv(batch="N"):
    """x [batch, 2, 4, 4] -> 1x1 Conv -> y [batch, 3, 4, 4] (class axis 1, positions (2, 3))."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    return _model(nodes, [_info("x", [batch, 2, 4, 4])], [_info("y", [batch, 3, 4, 4])], {"w": CONV})


def conv_grad(x, c, weights, versus=None):
    """d Σ_positions w ⊙ (y_c − y_versus) / d x of ``conv``: shape of x."""
    direction = CONV[c, :, 0, 0] - (0 if versus is None else CONV[versus, :, 0, 0])
    return direction[None, :, None, None] * weights[:, None]


def sequence(batch="N"):
    """x [batch, 3, 4] -> MatMul -> y [batch, 3, 5] (a CTC head: class axis 2, positions (1))."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return _model(nodes, [_info("x", [batch, 3, 4])], [_info("y", [batch, 3, 5])], {"w": TW})


def folded(batch="N", norm=False):
    """x [batch, 3, 4] -> MatMul -> [batch, 3, 5] -> Flatten(axis 2) -> [batch·3, 5] -> (BatchNorm) ->
    Softmax -> Reshape back: PP-OCRv4's head after the version converter."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Shape", ["z"], ["zs"]),
             helper.make_node("Flatten", ["z"], ["f"], axis=2)]
    inits = {"w": TW}
    last = "f"
    if norm:
        nodes.append(helper.make_node("BatchNormalization", ["f", "g", "b", "m", "v"], ["bn"]))
        inits.update(g=np.linspace(0.5, 2, 5), b=np.linspace(-1, 1, 5), m=np.linspace(-0.2, 0.3, 5),
                     v=np.linspace(0.5, 1.5, 5))
        last = "bn"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=1), helper.make_node("Reshape", ["p", "zs"], ["y"])]
    return _model(nodes, [_info("x", [batch, 3, 4])], [_info("y", [batch, None, 5])], inits)


X2 = RNG.normal(size=(3, 4)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# batch axes as exporters write them


@pytest.mark.parametrize("batch", ["N", "batch_size", -1, 0, None])
def test_dynamic_batch_spellings_explain_every_row(batch):
    result = Explainer(mlp(batch), "gradient").explain(X2, target=[0, 2, 1])
    for i, c in enumerate([0, 2, 1]):
        np.testing.assert_allclose(result.saliency["x"][i], mlp_grad(X2[i], c), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.target, [0, 2, 1])
    assert result.explained == f"tensor 'y' [{batch if isinstance(batch, str) else 'N'}, 3] (class axis 1)"


def test_fixed_batch_of_one():
    result = Explainer(mlp(1), "gradient").explain(X2[:1], target=2)
    np.testing.assert_allclose(result.saliency["x"][0], mlp_grad(X2[0], 2), rtol=1e-4, atol=1e-6)
    assert result.start_value.shape == (1,)


def no_batch(input_dims):
    """An input without batch axis ([3, 2, 2] or [1, 12]) -> Reshape [1, 12] -> MatMul -> Reshape [10]."""
    w = RNG.normal(size=(12, 10))
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "s2"], ["y"])]
    return _model(nodes, [_info("x", input_dims)], [_info("y", [10])], {"w": w, "s1": [1, 12], "s2": [10]}), w


@pytest.mark.parametrize("input_dims", [[3, 2, 2], [1, 12]])
def test_model_without_batch_axis_is_one_sample(input_dims):
    model, w = no_batch(input_dims)
    x = RNG.normal(size=input_dims).astype(np.float32)
    result = Explainer(model, "gradient").explain(x, target=4)
    np.testing.assert_allclose(result.saliency["x"], w[:, 4].reshape(input_dims), rtol=1e-5)
    np.testing.assert_allclose(result.start_value, [(x.reshape(1, 12) @ w)[0, 4]], rtol=1e-5)
    np.testing.assert_array_equal(result.target, [4])
    assert result.explained == "tensor 'y' [10] (class axis 0)"
    argmax = Explainer(model, "gradient").explain(x)
    assert argmax.target[0] == int(np.argmax(x.reshape(1, 12) @ w))


def test_batch_folded_by_flatten_starts_before_the_fold():
    x = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    explainer = Explainer(folded(), "gradient")
    assert explainer.spec.tensor == "z" and explainer.spec.class_axis == 2
    result = explainer.explain(x, target=Target([1, 4], at=2))
    for i, c in enumerate([1, 4]):
        expected = np.zeros((3, 4))
        expected[2] = TW[:, c]
        np.testing.assert_allclose(result.saliency["x"][i], expected, rtol=1e-5, atol=1e-7)
    z = x.astype(np.float64) @ TW
    np.testing.assert_allclose(result.start_value, [z[0, 2, 1], z[1, 2, 4]], rtol=1e-5)


def test_row_sums_of_a_folded_batchnorm():
    """BatchNorm on [N·T, C] inside the path (the start is the output, [N, T, C] again): its node
    sums are per row [N], against a float64 replica of the softmax-probability gradient."""
    from rulegraph.run import rulefiles as dsl

    rules = dsl.parse("rulegraph 1\nquantity importance\nbias blame\nlinear -> gradient\nroute -> gradient\n"
                      "normalizing -> gradient\n", source="t.rules")
    model = folded(norm=True)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.name = "bn"
    x = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    result = Explainer(model, rules).explain(x, target=Target([1, 3], at=1), node_sums=True)
    g, b, m, v = (np.asarray(numpy_helper.to_array(i), np.float64) for i in model.graph.initializer[1:5])
    scale = g / np.sqrt(v + 1e-5)
    z = x.astype(np.float64) @ TW
    out = (z - m) * scale + b
    p = np.exp(out) / np.exp(out).sum(axis=-1, keepdims=True)
    a_out = np.zeros_like(out)
    for i, c in enumerate([1, 3]):
        a_out[i, 1] = p[i, 1, c] * ((np.arange(5) == c) - p[i, 1])
    sums_in, sums_out, _ = result.node_sums["bn"]
    np.testing.assert_allclose(sums_out, (out * a_out).sum(axis=(1, 2)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(sums_in, (z * scale * a_out).sum(axis=(1, 2)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.saliency["x"], (a_out * scale) @ TW.T, rtol=1e-4, atol=1e-7)


def test_a_start_after_a_fold_it_cannot_move_over_is_refused():
    """Softmax -> start on [N·T, C] with a BatchNorm after the Flatten: refused before running."""
    with pytest.raises(TargetError, match=r"the start tensor 'bn' \[\?, 5\] carries the batch 'N' folded with "
                                          r"other axes \(since 'f' \[\?, 5\]\).* start= a tensor before 'f'"):
        _ = Explainer(folded(norm=True), "gradient").spec


# --------------------------------------------------------------------------------------------------
# position forms on [N, C, H, W] and [N, T, C]

XC = RNG.normal(size=(2, 2, 4, 4)).astype(np.float32)
YC = np.einsum("oc,nchw->nohw", CONV[:, :, 0, 0], XC.astype(np.float64))


def _weights(**where):
    w = np.zeros((2, 4, 4))
    if "at" in where:
        w[:, where["at"][0], where["at"][1]] = 1
    elif "region" in where:
        w[(slice(None), *where["region"])] = 1
    elif "mask" in where:
        w[:] = where["mask"]
    else:
        w[:] = 1
    return w


MASK = RNG.uniform(size=(4, 4))
POSITION_CASES = [  # (target, weights, class per row or None for argmax, versus, where)
    (Target(2, at=(1, 3)), _weights(at=(1, 3)), [2, 2], None, "at (y, x)=(1, 3)"),
    (Target([0, 1], region=(slice(1, 3), slice(0, 2))), _weights(region=(slice(1, 3), slice(0, 2))), [0, 1], None,
     "over region [1:3, 0:2]"),
    (Target(1, mask=MASK), _weights(mask=MASK), [1, 1], None, "over a mask"),
    (Target(0, all_positions=True), _weights(), [0, 0], None, "over all positions"),
    (Target("argmax", at=(2, 2)), _weights(at=(2, 2)), None, None, "at (y, x)=(2, 2)"),
    (Target("argmax", region=(slice(0, 2), slice(None))), _weights(region=(slice(0, 2), slice(None))), None, None,
     "over region [0:2, :]"),
    (Target(2, at=(0, 1), versus=0), _weights(at=(0, 1)), [2, 2], [0, 0], "at (y, x)=(0, 1)"),
    (Target("argmax", all_positions=True, versus=1), _weights(), None, [1, 1], "over all positions"),
]


@pytest.mark.parametrize("target, weights, classes, versus, where", POSITION_CASES,
                         ids=[c[-1] + ("" if c[3] is None else " versus") for c in POSITION_CASES])
def test_position_forms_on_nchw(target, weights, classes, versus, where):
    result = Explainer(conv(), "gradient").explain(XC, target=target)
    scores = np.einsum("nchw,nhw->nc", YC, weights)
    expected_classes = scores.argmax(axis=1) if classes is None else np.array(classes)
    np.testing.assert_array_equal(result.target, expected_classes)
    for i, c in enumerate(expected_classes):
        v = None if versus is None else versus[i]
        np.testing.assert_allclose(result.saliency["x"][i], conv_grad(XC, c, weights[i:i + 1], v)[0],
                                   rtol=1e-5, atol=1e-6)
        value = scores[i, c] - (0 if v is None else scores[i, v])
        np.testing.assert_allclose(result.start_value[i], value, rtol=1e-5, atol=1e-6)
    assert result.where == where and result.class_axis == 1
    if versus is not None:
        np.testing.assert_array_equal(result.versus, versus)


def test_sequence_argmax_at_a_time_step_is_that_steps_argmax():
    x = RNG.normal(size=(4, 3, 4)).astype(np.float32)
    y = x.astype(np.float64) @ TW
    result = Explainer(sequence(), "gradient").explain(x, target=Target("argmax", at=1))
    np.testing.assert_array_equal(result.target, y[:, 1].argmax(axis=1))
    assert result.explained == "tensor 'y' [N, 3, 5] (class axis 2)" and result.where == "at t=1"
    np.testing.assert_allclose(result.start_value, y[np.arange(4), 1, result.target], rtol=1e-5)


def test_class_axis_given_for_an_output_without_default():
    """y [N, 3, 2, 4, 4] (rank 5): no default class axis; class_axis=1 is used and reported."""
    w = RNG.normal(size=(3, 2, 1, 1, 1))
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_info("x", ["N", 2, 2, 4, 4])],
                   [_info("y", ["N", 3, 2, 4, 4])], {"w": w})
    x = RNG.normal(size=(1, 2, 2, 4, 4)).astype(np.float32)
    with pytest.raises(TargetError, match=r"which axis of the start tensor 'y' \[N, 3, 2, 4, 4\] holds the classes"):
        Explainer(model, "gradient").explain(x, target=Target(0, at=(0, 0, 0)))
    result = Explainer(model, "gradient", class_axis=1).explain(x, target=Target(2, at=(1, 0, 3)))
    expected = np.zeros((2, 2, 4, 4))
    expected[:, 1, 0, 3] = w[2, :, 0, 0, 0]
    np.testing.assert_allclose(result.saliency["x"][0], expected, rtol=1e-5)
    assert result.class_axis == 1 and result.where == "at (z, y, x)=(1, 0, 3)"


def test_seed_array_is_explained_as_given():
    seed = RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)
    result = Explainer(conv(), "gradient").explain(XC, target=seed)
    expected = np.einsum("oc,nohw->nchw", CONV[:, :, 0, 0], seed.astype(np.float64))
    np.testing.assert_allclose(result.saliency["x"], expected, rtol=1e-5, atol=1e-6)
    assert result.target is None


# --------------------------------------------------------------------------------------------------
# errors: each names the start tensor, its shape, the class axis and what would fit

ERRORS = [  # (model, x, target, message)
    (mlp("N"), X2, 15, r"target class 15 is out of range for tensor 'y' \[N, 3\] \(class axis 1\): valid classes are 0..2"),
    (mlp("N"), X2, [1, 99, 0], r"target class 99 is out of range for tensor 'y' \[N, 3\]"),
    (mlp("N"), X2, -3, r"target class -3 is out of range .* valid classes are 0..2 \(or -1 / 'argmax'\)"),
    (mlp("N"), X2, 3.7, r"target 3.7 is not a class index for tensor 'y' \[N, 3\] \(class axis 1\); classes are integers"),
    (mlp("N"), X2, True, r"target must be integer class indices for tensor 'y' \[N, 3\] \(class axis 1\); got True \(bool\)"),
    (mlp("N"), X2, [1.0, 2.0, 0.0], r"got 1.0 \(float\)"),
    (mlp("N"), X2, np.array([1, 2], dtype=np.int64), r"got 2 target classes for a batch of 3"),
    (mlp("N"), X2, "max", r"target must be a class index, one per row, 'argmax' or a seed array, got 'max'"),
    (mlp("N"), X2, 1 + 2j, r"target \(1\+2j\) is not a class index"),
    (mlp("N"), X2, np.zeros((3, 4), np.float32),
     r"the seed array's shape \[3, 4\] does not fit the start tensor 'y' \[N, 3\]: expected \[3, 3\]"),
    (mlp("N"), X2, Target(1, at=2), r"at needs position axes, but tensor 'y' \[N, 3\] \(class axis 1\) has only the batch"),
    (mlp("N"), X2, Target(1, versus=7), r"versus class 7 is out of range for tensor 'y' \[N, 3\]"),
    (conv(), XC, 1, (r"'y' \[N, 3, 4, 4\] \(class axis 1\) has position axes \(2, 3\): a class alone is "
                     r"ambiguous; say where with one of at=<position>, region=<slices>, mask=<array>, all_positions")),
    (conv(), XC, "argmax", r"has position axes \(2, 3\): a class alone is ambiguous"),
    (conv(), XC, Target(1, at=(4, 0)), r"at=\(4, 0\) is outside tensor 'y' \[N, 3, 4, 4\] \(class axis 1\): positions 4 x 4"),
    (conv(), XC, Target(1, at=3), r"at needs 2 integer index\(es\), one per position axis \(2, 3\)"),
    (conv(), XC, Target(1, region=(slice(2, 2), slice(0, 4))), r"region 2:2, 0:4 is outside or empty"),
    (conv(), XC, Target(1, region=(slice(0, 9), slice(0, 4))), r"region 0:9, 0:4 is outside or empty"),
    (conv(), XC, Target(1, mask=np.ones((3, 3))), r"the mask's shape \[3, 3\] does not fit .* expected \[4, 4\]"),
    (conv(), XC, Target(1, at=(0, 0), all_positions=True), r"give one position form, not at and all_positions"),
    (conv(), XC, Target(3, all_positions=True), r"target class 3 is out of range for tensor 'y' \[N, 3, 4, 4\]"),
]


@pytest.mark.parametrize("model, x, target, message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_targets_name_the_start_tensor(model, x, target, message):
    with pytest.raises(TargetError, match=message):
        Explainer(model, "gradient").explain(x, target=target)


def test_a_batch_moved_inward_before_a_fold_is_refused():
    """x [N, 3, 4] -> Transpose [3, N, 4] -> Flatten(axis 1) [3, N·4]: the batch is lost."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Flatten", ["t"], ["y"], axis=1)]
    model = _model(nodes, [_info("x", ["N", 3, 4])], [_info("y", [3, None])], {})
    with pytest.raises(TargetError, match=r"tensor 'y' \[3, \?\] has lost the batch axis 'N' of the model's inputs"
                                          r".* passing start= a tensor before it"):
        Explainer(model, "gradient").explain(RNG.normal(size=(2, 3, 4)).astype(np.float32), target=0)


# --------------------------------------------------------------------------------------------------
# the compiled explainer: invalid targets give NaN, never zeros


def _run_saved(model, rules, tmp_path, feeds):
    explainer = Explainer(model, rules)
    path = explainer.save(tmp_path / "e.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds)))
    return values, session, values[explainer.compiled().attribution["x"]]


def test_compiled_explainer_gives_nan_for_invalid_targets(tmp_path):
    values, session, attribution = _run_saved(mlp("N"), "lrp-epsilon", tmp_path,
                                              {"x": X2, TARGET: np.array([2, 15, -1], dtype=np.int64)})
    assert [i.name for i in session.get_inputs()] == ["x", TARGET]
    y = np.tanh(X2.astype(np.float64) @ W1) @ W2
    np.testing.assert_array_equal(values[CLASS], [2, 15, y[2].argmax()])
    assert np.all(np.isfinite(attribution[[0, 2]])) and np.all(np.isnan(attribution[1]))
    for bad in (-2, 3, np.iinfo(np.int64).max):
        _, _, attribution = _run_saved(mlp("N"), "lrp-epsilon", tmp_path, {"x": X2, TARGET: np.full(3, bad)})
        assert np.all(np.isnan(attribution))


def test_compiled_explainer_takes_position_weights(tmp_path):
    weights = _weights(at=(1, 2)).astype(np.float32)
    feeds = {"x": XC, TARGET: np.array([1, -1], dtype=np.int64), POSITIONS: weights}
    values, session, saliency = _run_saved(conv(), "gradient", tmp_path, feeds)
    assert [list(i.shape) for i in session.get_inputs() if i.name == POSITIONS] == [["N", 4, 4]]
    classes = [1, YC[1, :, 1, 2].argmax()]
    np.testing.assert_array_equal(values[CLASS], classes)
    for i, c in enumerate(classes):   # gradient: the attribution is x ⊙ a(x)
        np.testing.assert_allclose(saliency[i], XC[i] * conv_grad(XC, c, weights[i:i + 1])[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# the CLI


def test_cli_out_of_range_target_exits_2(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(mlp("N"), str(model))
    np.save(tmp_path / "x.npy", X2)
    assert main(["explain", str(model), "--rules", "gradient", "--input", str(tmp_path / "x.npy"), "--target", "15"]) == 2
    assert "target class 15 is out of range for tensor 'y' [N, 3] (class axis 1): valid classes are 0..2" in capsys.readouterr().err


def test_cli_summary_names_what_was_explained(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(sequence(), str(model))
    x = RNG.normal(size=(1, 3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    args = ["explain", str(model), "--rules", "gradient", "--input", str(tmp_path / "x.npy")]
    assert main(args + ["--target", "3", "--at", "2"]) == 0
    assert capsys.readouterr().out.startswith("row 0: class 3 of tensor 'y' [N, 3, 5] (class axis 2) at t=2: start ")
    assert main(args + ["--target", "3", "--region", "0:2", "--versus", "1"]) == 0
    assert capsys.readouterr().out.startswith("row 0: class 3 minus class 1 of tensor 'y' [N, 3, 5] (class axis 2) "
                                              "over region [0:2]: start ")
    assert main(args + ["--target", "3"]) == 2
    assert "a class alone is ambiguous" in capsys.readouterr().err
    assert main(args + ["--target", "0", "--all-positions", "--class-axis", "1"]) == 0
    assert capsys.readouterr().out.startswith("row 0: class 0 of tensor 'y' [N, 3, 5] (class axis 1) over all positions")


def test_cli_compile_takes_the_class_axis(tmp_path, capsys):
    w = RNG.normal(size=(3, 2, 1, 1, 1))
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_info("x", ["N", 2, 2, 4, 4])],
                   [_info("y", ["N", 3, 2, 4, 4])], {"w": w})
    onnx.save(model, str(tmp_path / "m.onnx"))
    args = ["compile", str(tmp_path / "m.onnx"), "--rules", "gradient", "-o", str(tmp_path / "e.onnx")]
    assert main(args) == 2
    assert "pass class_axis= (CLI: --class-axis)" in capsys.readouterr().err
    assert main(args + ["--class-axis", "1"]) == 0
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in onnx.load(str(tmp_path / "e.onnx")).graph.input}
    assert inputs[POSITIONS] == ["N", 2, 4, 4] and inputs[TARGET] == ["N"]


def test_loops_take_a_class_target_and_refuse_position_forms():
    explainer = Explainer(mlp("N"), "gradient")
    looped = explainer.explain(X2, target=Target([0, 2, 1]), loop="smoothgrad", samples=2, noise=0.0)
    np.testing.assert_array_equal(looped.target, [0, 2, 1])
    with pytest.raises(TargetError, match="loops explain a class per row; position forms and versus="):
        explainer.explain(X2, target=Target(1, versus=0), loop="smoothgrad", samples=2)


def test_forward_and_seed_need_no_class_axis():
    """A rank-5 start without class axis: forward runs and a seed array is explained as given."""
    w = RNG.normal(size=(3, 2, 1, 1, 1))
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_info("x", ["N", 2, 2, 4, 4])],
                   [_info("y", ["N", 3, 2, 4, 4])], {"w": w})
    x = RNG.normal(size=(1, 2, 2, 4, 4)).astype(np.float32)
    explainer = Explainer(model, "gradient")
    y = explainer.forward(x)["y"]
    np.testing.assert_allclose(y, np.einsum("oc,ncdhw->nodhw", w[:, :, 0, 0, 0], x), rtol=1e-5, atol=1e-6)
    seed = np.zeros(y.shape, np.float32)
    seed[0, 1, 0, 2, 3] = 1
    result = explainer.explain(x, target=seed)
    expected = np.zeros(x.shape)
    expected[0, :, 0, 2, 3] = w[1, :, 0, 0, 0]
    np.testing.assert_allclose(result.saliency["x"], expected, rtol=1e-5)


@pytest.mark.parametrize("batch", ["N", "batch_size"])
def test_the_target_input_is_declared_with_the_models_batch(batch):
    """``rulegraph/target`` is declared ``[batch]`` with the model's own batch symbol, like every
    per-row output of the explainer."""
    compiled = Explainer(mlp(batch), "gradient").compiled()
    target = next(i for i in compiled.model.graph.input if i.name == compiled.target_input)
    assert [d.dim_param for d in target.type.tensor_type.shape.dim] == [batch]
