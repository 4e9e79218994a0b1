"""Loops written as one ONNX model (``rulegraph compile`` / ``Explainer.save`` of a rule file with a
``loop`` header): run by plain onnxruntime, each row equals ``Explainer.explain(x, loop=...)`` to
float32 rounding; loops that cannot be a graph are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from test_loop_compositions import X as MLP_X
from test_loop_compositions import tiny_mlp

from rulegraph import Explainer, RulegraphError
from rulegraph.cli import main
from rulegraph.compile.build import BASELINE_PREFIX, TARGET
from rulegraph.lang.ruleset import RuleCall
from rulegraph.run.baselines import make_baseline
from rulegraph.run.loopgraph import NOISE_PREFIX, compile_loop
from rulegraph.run.loops import IG_REFUSED, LOOPS, smoothgrad_noise

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"
X = np.load(ROOT / "models" / "digits_sample.npz")["x"]


def loop_call(name: str, **params) -> RuleCall:
    resolved, problems = LOOPS[name].resolve_params(params)
    assert not problems
    return RuleCall(name, resolved)


def run_loop_model(model: onnx.ModelProto, x: np.ndarray, target, baseline=None, noise=None) -> dict:
    """The loop model on plain onnxruntime; ``baseline``/``noise`` fill the inputs it declares."""
    name = model.graph.input[0].name
    feeds = {name: x, TARGET: np.asarray(target, dtype=np.int64)}
    for value in model.graph.input:
        if value.name.startswith(BASELINE_PREFIX):
            feeds[value.name] = baseline
        elif value.name.startswith(NOISE_PREFIX):
            feeds[value.name] = noise
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


CASES = [  # model, x, rules, loop, params, baseline given to both
    (CNN, X, "gradient", "integrated_gradients", {"steps": 16}, "zeros"),
    (CNN, X, "gradient", "integrated_gradients", {"steps": 7, "method": "riemann_trapezoid"}, "mean"),
    (CNN, X, "guided-backprop", "integrated_gradients", {"steps": 9, "method": "riemann_left"}, "zeros"),
    ("mlp", MLP_X, "gradient-x-input", "integrated_gradients", {"steps": 5, "method": "riemann_middle"},
     "mean"),
    (CNN, X, "gradient", "smoothgrad", {"samples": 5, "noise": 0.2, "seed": 4}, None),
    (CNN, X, "lrp-epsilon", "smoothgrad", {"samples": 4, "noise": 0.1, "seed": 1}, None),
    (CNN, X, "deeplift-rescale", "smoothgrad", {"samples": 3, "noise": 0.1, "seed": 2}, "mean"),
    ("mlp", MLP_X, "lrp-epsilon", "smoothgrad", {"samples": 6, "noise": 0.3, "seed": 3}, None),
    (CNN, X, "gradient", "occlusion", {"patch": 2, "stride": 1}, None),
    (CNN, X, "lrp-epsilon", "occlusion", {"patch": 3, "stride": 2, "value": 0.5}, None),
]


@pytest.mark.parametrize("model,x,rules,loop,params,baseline", CASES,
                         ids=[f"{c[2]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_loop_model_equals_explain(model, x, rules, loop, params, baseline):
    explainer = Explainer(tiny_mlp() if model == "mlp" else model, rules)
    name = explainer.graph.inputs[0]
    target = np.arange(len(x)) % 2 if model == "mlp" else np.array([3, -1, 5, 0, -1, 2, 7, 1])
    expected = explainer.explain(x, target=target, loop=loop, baseline=baseline, **params)
    built = compile_loop(explainer, loop_call(loop, **params))
    noise = None
    if loop == "smoothgrad":
        noise = smoothgrad_noise({name: x}, [name], params["samples"], params["seed"])[name]
    got = run_loop_model(built.model, x, target, make_baseline(baseline, x) if baseline else None, noise)
    scale = np.abs(expected.map).max()
    np.testing.assert_allclose(got[built.attribution[name]], expected.map, rtol=1e-5, atol=1e-6 * scale)
    for key, output in built.saliency.items():
        np.testing.assert_allclose(got[output], expected.saliency[key], rtol=1e-5,
                                   atol=1e-6 * np.abs(expected.saliency[key]).max())
    np.testing.assert_allclose(got[built.start_value], expected.start_value, rtol=1e-5, atol=1e-6)
    if expected.bias_total is not None:
        np.testing.assert_allclose(got[built.bias_total], expected.bias_total, rtol=1e-5, atol=1e-6 * scale)
    assert (built.bias_total is None) == (expected.bias_total is None)
    for output, value in expected.outputs.items():  # the model's own outputs, on x itself (another batch)
        np.testing.assert_allclose(got[output], value, rtol=1e-5, atol=1e-6 * np.abs(value).max())


@pytest.mark.parametrize("rules,loop,inputs,outputs", [
    ("integrated-gradients", "integrated_gradients", ["input", TARGET, BASELINE_PREFIX + "input"],
     ["logits", "rulegraph/loop/saliency/input", "rulegraph/loop/attribution/input",
      "rulegraph/loop/start_value"]),
    ("smoothgrad", "smoothgrad", ["input", TARGET, NOISE_PREFIX + "input"],
     ["logits", "rulegraph/loop/attribution/input", "rulegraph/loop/saliency/input",
      "rulegraph/loop/start_value"]),
])
def test_compile_writes_the_rule_files_loop(tmp_path, capsys, rules, loop, inputs, outputs):
    path = tmp_path / "e.onnx"
    assert main(["compile", str(CNN), "--rules", rules, "-o", str(path)]) == 0
    assert f"inputs {inputs}" in capsys.readouterr().out
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == inputs
    assert [o.name for o in model.graph.output] == outputs
    explainer = Explainer(CNN, rules)
    expected = explainer.explain(X, target=[3] * 8)  # the header's loop, with its parameters
    params = dict(explainer.ruleset.loop.params)
    noise = smoothgrad_noise({"input": X}, ["input"], int(params["samples"]), int(params["seed"]))["input"] \
        if loop == "smoothgrad" else None
    got = run_loop_model(model, X, [3] * 8, np.zeros_like(X), noise)
    np.testing.assert_allclose(got["rulegraph/loop/attribution/input"], expected.map, rtol=1e-5,
                               atol=1e-6 * np.abs(expected.map).max())
    # Explainer.save writes the same model
    saved = onnx.load(str(explainer.save(tmp_path / "saved.onnx")))
    assert saved.SerializeToString() == model.SerializeToString()


def _rules(tmp_path, text: str) -> str:
    path = tmp_path / "r.rules"
    path.write_text("rulegraph 1\n" + text + "linear -> normalized(eps = 1e-6)\nnonlinear -> ignore\n"
                    "max -> gradient\nroute -> gradient\nSoftmax, LogSoftmax -> start\n")
    return str(path)


def test_compile_refuses_integrated_gradients_around_relevance(tmp_path, capsys):
    rules = _rules(tmp_path, "quantity relevance\nbaseline zeros\nloop integrated_gradients(steps = 8)\n")
    path = tmp_path / "e.onnx"
    assert main(["compile", str(CNN), "--rules", rules, "-o", str(path)]) == 2
    assert capsys.readouterr().err == (f"rulegraph compile: error: {rules}: loop integrated_gradients around "
                                       f"quantity relevance: {IG_REFUSED['relevance']}\n")
    assert not path.exists()


def test_loop_models_refused_by_name(tmp_path):
    with pytest.raises(RulegraphError, match=r"occlusion as a graph needs the spatial size of input 'x' "
                                             r"fixed in the model \(its shape is \['N', 3\]\)"):
        compile_loop(Explainer(tiny_mlp(), "gradient"), loop_call("occlusion"))
    with pytest.raises(RulegraphError, match="the loop model takes class targets"):
        Explainer(CNN, "smoothgrad").save(tmp_path / "e.onnx", seed_mode=True)
    fixed = tiny_mlp()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    with pytest.raises(RulegraphError, match="the model was exported with a fixed batch of 4; the loop model "
                                             "runs all of a loop's rows as one batch"):
        compile_loop(Explainer(fixed, "gradient"), loop_call("smoothgrad"))


def test_plain_rule_files_still_save_the_plain_pass(tmp_path):
    explainer = Explainer(CNN, "lrp-epsilon")
    saved = onnx.load(str(explainer.save(tmp_path / "e.onnx")))
    assert saved.SerializeToString() == explainer.compiled().model.SerializeToString()


def token_model() -> onnx.ModelProto:
    """``y = Gemm(relu(Gemm(x + Σ_tokens E[ids])))``: a float input and an integer token-id input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in (("E", (5, 3)), ("W1", (3, 4)), ("B1", (4,)), ("W2", (4, 2)), ("B2", (2,)))]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"))
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], name="lookup"),
             helper.make_node("ReduceSum", ["emb", "axis"], ["pooled"], keepdims=0, name="pool"),
             helper.make_node("Add", ["x", "pooled"], ["h0"], name="add"),
             helper.make_node("Gemm", ["h0", "W1", "B1"], ["z1"], name="fc1"),
             helper.make_node("Relu", ["z1"], ["h1"], name="relu"),
             helper.make_node("Gemm", ["h1", "W2", "B2"], ["y"], name="fc2")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2])]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph(nodes, "tokens", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("rules,loop,params", [("gradient", "integrated_gradients", {"steps": 6}),
                                               ("lrp-epsilon", "smoothgrad", {"samples": 3, "seed": 5})])
def test_loop_model_tiles_token_ids(rules, loop, params):
    x = {"x": MLP_X, "ids": np.array([[0, 4], [2, 2], [1, 3], [4, 0]], dtype=np.int64)}
    explainer = Explainer(token_model(), rules)
    expected = explainer.explain(x, target="argmax", loop=loop, **params)
    built = compile_loop(explainer, loop_call(loop, **params))
    feeds = {**x, TARGET: np.full(4, -1, dtype=np.int64)}
    if loop == "integrated_gradients":
        feeds[BASELINE_PREFIX + "x"] = np.zeros_like(MLP_X)
    else:
        feeds[NOISE_PREFIX + "x"] = smoothgrad_noise(x, ["x"], params["samples"], params["seed"])["x"]
    session = onnxruntime.InferenceSession(built.model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert set(built.attribution) == set(expected.attribution)
    for name, output in built.attribution.items():
        np.testing.assert_allclose(got[output], expected.attribution[name], rtol=1e-5,
                                   atol=1e-6 * np.abs(expected.attribution[name]).max())


def test_loop_model_of_the_ppocr_classifier():
    """PP-OCR's text-direction classifier (batch axis written as -1, spatial axes free): SmoothGrad's
    loop model equals the mean of the plain compiled pass over the same noisy copies, both run by
    plain onnxruntime; occlusion, which needs a fixed spatial size, is refused by name."""
    from rulegraph.compile.build import TARGET as PLAIN_TARGET
    from rulegraph.run.loops import noise_sigma

    explainer = Explainer(ROOT / "tests" / "data" / "ppocr" / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                          "gradient")
    x = np.random.default_rng(0).uniform(0, 1, size=(2, 3, 48, 192)).astype(np.float32)
    samples, target = 2, np.array([0, 1], dtype=np.int64)
    built = compile_loop(explainer, loop_call("smoothgrad", samples=samples))
    draws = smoothgrad_noise({"x": x}, ["x"], samples, 0)["x"]
    got = run_loop_model(built.model, x, target, noise=draws)
    copies = (x[None] + (draws * noise_sigma(x, 0.15)).astype(np.float32)).reshape(-1, *x.shape[1:])
    plain = explainer.compiled()
    session = onnxruntime.InferenceSession(plain.model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    (maps,) = session.run([plain.attribution["x"]], {"x": copies, PLAIN_TARGET: np.tile(target, samples)})
    expected = maps.reshape(samples, *x.shape).mean(axis=0)
    np.testing.assert_allclose(got[built.attribution["x"]], expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())
    with pytest.raises(RulegraphError, match=r"occlusion as a graph needs the spatial size of input 'x' "
                                             r"fixed in the model \(its shape is \['N', 3, '\?', '\?'\]\)"):
        compile_loop(explainer, loop_call("occlusion"))


def test_the_loop_model_is_marked_as_an_explainer(tmp_path):
    """Like the compiled pass, the loop model carries ``rulegraph.explainer_of`` (the original
    outputs), so given again as a model it is refused by that mark."""
    from rulegraph.errors import ModelError

    path = tmp_path / "ig.onnx"
    Explainer(CNN, "integrated-gradients").save(path)
    marks = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert marks["rulegraph.explainer_of"] == '["logits"]'
    with pytest.raises(ModelError, match=r"already a rulegraph explainer"):
        Explainer(path, "gradient")
