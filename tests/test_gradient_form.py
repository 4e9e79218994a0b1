"""The Gradient × Input form of a relevance rule set (``Explainer(form="gradient-x-input")``,
compile/form.py, backward/gradient_form.py; LXT's efficient AttnLRP, Arras et al. 2025).

1. A closed-form numpy replica (float64, onnx's reference evaluator) of ``lrp-transformer`` at ε = 0
   on a tiny attention block (projections, QKᵀ, Softmax held constant, P·V, residual, LayerNorm, a
   product of two activations, Tanh, mean over tokens, classifier): both forms equal it, and the
   bias shares are its.
2. What has no Gradient × Input form is refused, naming the node and the rule.
3. ``rulegraph explain --form gradient-x-input`` on a ReLU CNN under ``lrp-epsilon``: LRP-0.
4. Equality with the standard compilation of ``lrp-transformer`` at ε = 0 on BERT-, GPT-2- and
   Llama-style models from transformers configs with random weights, both exporters: token maps,
   bias shares and a latent relevance to 1e-5 relative; conservation to 1e-3. Against the bundled
   file's ε = 1e-6 the maps differ by that ε's effect (measured, printed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import rulegraph
from rulegraph.backward import ops as G
from rulegraph.compile.build import TARGET, compile_explainer
from rulegraph.errors import CoverageError, RulegraphError
from rulegraph.run import rulefiles as dsl

GXI = "gradient-x-input"
RNG = np.random.default_rng(3)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def transformer_rules(eps: str = "0") -> rulegraph.RuleSet:
    """The bundled ``lrp-transformer`` with every ε set to ``eps``."""
    text = (dsl.bundled_rules_dir() / "lrp-transformer.rules").read_text()
    assert text.count("eps = 1e-6") >= 5
    return dsl.parse(text.replace("eps = 1e-6", f"eps = {eps}"), source=f"lrp-transformer-eps{eps}.rules")


# --------------------------------------------------------------------------------------------------
# 1. a closed-form replica on a tiny attention block

N, T, D, H, C = 2, 4, 6, 5, 3
W = {"wq": RNG.normal(size=(D, D)), "wk": RNG.normal(size=(D, D)), "wv": RNG.normal(size=(D, D)),
     "gamma": RNG.uniform(0.5, 1.5, size=D), "beta": RNG.normal(size=D) * 0.1,
     "w1": RNG.normal(size=(D, H)), "b1": RNG.normal(size=H) * 0.1, "w3": RNG.normal(size=(D, H)),
     "w2": RNG.normal(size=(H, C)), "b2": RNG.normal(size=C) * 0.1, "scale": np.array(D ** -0.5)}


def block() -> onnx.ModelProto:
    """x [N, T, D] → attention (softmax(q kᵀ·scale) v) + x → LayerNorm → tanh(ln W1 + b1) ⊙ (ln W3)
    → mean over T → Gemm(W2, b2): float64, opset 17."""
    def n(op, inputs, out, **attrs):
        return helper.make_node(op, inputs, [out], name=out, **attrs)

    nodes = [n("MatMul", ["x", "wq"], "q"), n("MatMul", ["x", "wk"], "k"), n("MatMul", ["x", "wv"], "v"),
             n("Transpose", ["k"], "kt", perm=[0, 2, 1]), n("MatMul", ["q", "kt"], "qk"),
             n("Mul", ["qk", "scale"], "scores"), n("Softmax", ["scores"], "p", axis=-1),
             n("MatMul", ["p", "v"], "o"), n("Add", ["x", "o"], "h"),
             n("LayerNormalization", ["h", "gamma", "beta"], "ln", axis=-1),
             n("MatMul", ["ln", "w1"], "z1"), n("Add", ["z1", "b1"], "pre"), n("Tanh", ["pre"], "u"),
             n("MatMul", ["ln", "w3"], "r"), n("Mul", ["u", "r"], "w"),
             n("ReduceMean", ["w"], "m", axes=[1], keepdims=0), n("Gemm", ["m", "w2", "b2"], "logits")]
    d = TensorProto.DOUBLE
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", d, ["N", T, D])],
                              [helper.make_tensor_value_info("logits", d, ["N", C])],
                              [numpy_helper.from_array(v.astype(np.float64), k) for k, v in W.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def replica(x: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(R_x, bias share per node [N], the explained logit [N]) of ``lrp-transformer`` at ε = 0, bias
    blamed, in relevance form: ``R(in) = in ⊙ Mᵀ(R(out) / out)`` per linear map, ``P`` held constant
    (V takes all of P·V; q, k and the Softmax nothing), ``u ⊙ r`` half and half, Tanh passes R."""
    q = x @ W["wq"]
    k = x @ W["wk"]
    v = x @ W["wv"]
    scores = q @ np.swapaxes(k, 1, 2) * W["scale"]
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ v
    h = x + o
    mu, sigma = h.mean(-1, keepdims=True), np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    ln = (h - mu) / sigma * W["gamma"] + W["beta"]
    z1 = ln @ W["w1"]
    pre = z1 + W["b1"]
    u = np.tanh(pre)
    r = ln @ W["w3"]
    w = u * r
    m = w.mean(1)
    logits = m @ W["w2"] + W["b2"]
    onehot = np.eye(C)[target]
    bias = {}
    s = logits * onehot / logits
    bias["logits"] = (W["b2"] * s).sum(-1)
    r_w = np.repeat((m * (s @ W["w2"].T) / m)[:, None, :] / T, T, axis=1) * w   # ReduceMean, then R(w)
    r_u, r_r = r_w / 2, r_w / 2
    r_pre = r_u                                                        # Tanh: ignore
    bias["pre"] = (W["b1"] * r_pre / pre).sum((1, 2))
    r_z1 = z1 * r_pre / pre
    r_ln = ln * ((r_z1 / z1) @ W["w1"].T) + ln * ((r_r / r) @ W["w3"].T)
    cs = r_ln / ln * W["gamma"] / sigma
    bias["ln"] = (W["beta"] * r_ln / ln).sum((1, 2))
    r_h = h * (cs - cs.mean(-1, keepdims=True))
    r_x, r_o = x * r_h / h, o * r_h / h
    r_v = v * (np.swapaxes(p, 1, 2) @ (r_o / o))
    r_x = r_x + x * ((r_v / v) @ W["wv"].T)
    return r_x, bias, (logits * onehot).sum(-1)


@pytest.mark.parametrize("form", ["standard", GXI])
def test_both_forms_equal_the_closed_form_replica(form):
    x = RNG.normal(size=(N, T, D))
    target = np.array([2, 0])
    compiled = compile_explainer(G.load(block()), transformer_rules("0"), form=form)
    names = [o.name for o in compiled.model.graph.output]
    values = dict(zip(names, ReferenceEvaluator(compiled.model).run(None, {"x": x, TARGET: target})))
    want_x, want_bias, logit = replica(x, target)
    np.testing.assert_allclose(values[compiled.attribution["x"]], want_x, rtol=1e-9, atol=1e-12)
    shares = {name: values[output] for name, output in compiled.bias_shares.items()}
    assert sorted(shares) == sorted(want_bias)
    for name, share in want_bias.items():
        np.testing.assert_allclose(shares[name], share, rtol=1e-9, atol=1e-12)
    total = values[compiled.attribution["x"]].sum((1, 2)) + sum(shares.values())
    np.testing.assert_allclose(total, logit, rtol=1e-9)    # ε = 0, bias blamed: exact


#: form -> the nodes whose backward divides: the ε-rule's ``a(y) / blip(y)`` at every linear map and
#: the LayerNorm; in the form only ReduceMean's own Jacobian (1/T) and Tanh's ``f(x)/x``
DIVIDING = {"standard": {"logits", "m", "r", "pre", "z1", "ln", "h", "o", "v"}, GXI: {"m", "u"}}


@pytest.mark.parametrize("form", list(DIVIDING))
def test_the_form_saves_the_divisions_of_the_epsilon_rule(form):
    compiled = compile_explainer(G.load(block()), transformer_rules("1e-6"), form=form)
    dividing = {compiled.origins[n.output[0]].split("'")[1] for n in compiled.model.graph.node
                if n.op_type == "Div" and n.output[0] in compiled.origins}
    assert dividing == DIVIDING[form]


# --------------------------------------------------------------------------------------------------
# 1b. every rule's form against the standard compilation at ε = 0, op by op (onnxruntime, float32)

S, E, CLASSES = 5, 8, 3
F32 = TensorProto.FLOAT


def _w(*shape) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


#: row -> (nodes from x [N, S, E] to h [N, S, E], constants, extra opsets); each model then ends in
#: ReduceMean over S and a Gemm to CLASSES logits
OPS = {
    "attention-op": ([helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
                      helper.make_node("MatMul", ["x", "wv"], ["v"]),
                      helper.make_node("Attention", ["q", "k", "v"], ["h"], q_num_heads=4, kv_num_heads=2,
                                       is_causal=1)],
                     {"wq": _w(E, E), "wk": _w(E, 4), "wv": _w(E, 4)}, 23),
    "skip-layernorm": ([helper.make_node("MatMul", ["x", "w"], ["skip"]),
                        helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"],
                                         ["y", "", "", "s"], domain="com.microsoft"),
                        helper.make_node("Add", ["y", "s"], ["h"])],
                       {"w": _w(E, E), "gamma": _w(E), "beta": _w(E) * 0.1, "bias": _w(E) * 0.1}, 17),
    "simplified-layernorm": ([helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["h"], axis=-1)],
                             {"gamma": _w(E)}, 17),
    "rms-norm": ([helper.make_node("RMSNormalization", ["x", "gamma"], ["h"], axis=-1)], {"gamma": _w(E)}, 23),
    "group-norm": ([helper.make_node("GroupNormalization", ["x", "gamma", "beta"], ["h"], num_groups=1)],
                   {"gamma": _w(S), "beta": _w(S) * 0.1}, 21),
    "softmax": ([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "w2"], ["h"])], {"w": _w(E, E), "w2": _w(E, E)}, 17),
    "div": ([helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["z"]),
             helper.make_node("Exp", ["z"], ["b"]), helper.make_node("Div", ["a", "b"], ["h"])],
            {"w": _w(E, E), "w2": _w(E, E) * 0.3}, 17),
    "sigmoid-gate": ([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["g"]),
                      helper.make_node("Mul", ["x", "g"], ["h"])], {"w": _w(E, E)}, 17),
    "sigmoid": ([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["h"])],
                {"w": _w(E, E)}, 17),
}
HEAD = {"wc": _w(E, CLASSES), "bc": _w(CLASSES) * 0.1}


def op_model(row: str) -> onnx.ModelProto:
    nodes, consts, opset = OPS[row]
    nodes = nodes + [helper.make_node("ReduceMean", ["h", "axes"], ["m"], keepdims=0),
                     helper.make_node("Gemm", ["m", "wc", "bc"], ["logits"])]
    inits = [numpy_helper.from_array(v, k) for k, v in {**consts, **HEAD}.items()]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
    graph = helper.make_graph(nodes, row, [helper.make_tensor_value_info("x", F32, ["N", S, E])],
                              [helper.make_tensor_value_info("logits", F32, ["N", CLASSES])], inits)
    opsets = [helper.make_opsetid("", max(opset, 18)), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


@pytest.mark.parametrize("bias", ["blame", "ignore"])
@pytest.mark.parametrize("row", list(OPS))
def test_each_rule_in_the_form_equals_the_standard_at_epsilon_zero(row, bias):
    text = (dsl.bundled_rules_dir() / "lrp-transformer.rules").read_text().replace("eps = 1e-6", "eps = 0")
    ruleset = dsl.parse(text.replace("bias     blame", f"bias {bias}"), source=f"t-{bias}.rules")
    x = RNG.normal(size=(4, S, E)).astype(np.float32)
    target = [0, 1, 2, 0]
    quiet = {"target": target, "max_amplification": None}   # ε = 0 on random weights: large cancelling maps
    standard = rulegraph.Explainer(op_model(row), ruleset).explain(x, **quiet)
    form = rulegraph.Explainer(op_model(row), ruleset, form=GXI).explain(x, **quiet)
    assert np.isfinite(form.map).all() and np.abs(standard.map).max() > 0
    assert _relative(form.map, standard.map) < 1e-5
    assert sorted(form.bias_shares) == sorted(standard.bias_shares)
    for name, share in standard.bias_shares.items():
        np.testing.assert_allclose(form.bias_shares[name], share, rtol=1e-4, atol=1e-5 * np.abs(share).max())


# --------------------------------------------------------------------------------------------------
# 2. refusals

RELEVANCE_HEAD = "rulegraph 1\nquantity relevance\nbias blame\n"
REST = ("bilinear -> uniform(softmax_constant = 1)\nroute -> gradient\n"
        "LayerNormalization -> layernorm_linear\nSoftmax -> softmax_taylor\n")


@pytest.mark.parametrize(("rules", "error", "message"), [
    (RELEVANCE_HEAD + "linear -> zplus\nnonlinear -> ignore\n" + REST, CoverageError,
     r"form 'gradient-x-input': 10 node\(s\) cannot be compiled in it:\n  - node 'q' \(MatMul\): "
     r"'linear -> zplus\(eps = 1e-06\)' at t.rules:4:1 binds "
     r"rule 'zplus', which has no Gradient × Input form"),
    (RELEVANCE_HEAD + "linear -> normalized\nnonlinear -> gradient\n" + REST, CoverageError,
     r"(?s)1 node\(s\) .*node 'u' \(Tanh\).* binds rule 'gradient', which has no Gradient × Input form on a "
     r"nonlinear op \(only on max and route ops\)"),
    ("rulegraph 1\nquantity importance\nlinear -> gradient\nnonlinear -> gradient\n" + REST, RulegraphError,
     "rewrites a relevance rule file, but this one declares quantity importance"),
    (RELEVANCE_HEAD + "start one\nlinear -> normalized\nnonlinear -> ignore\n" + REST, RulegraphError,
     "'start one' has no Gradient × Input form"),
], ids=["weight-rule", "gradient-on-nonlinear", "importance", "start-one"])
def test_what_has_no_gradient_x_input_form_is_refused(rules, error, message):
    ruleset = dsl.parse(rules, source="t.rules")
    with pytest.raises(error, match=message):
        compile_explainer(G.load(block()), ruleset, form=GXI)


def test_an_unknown_form_is_named():
    with pytest.raises(RulegraphError, match="form 'efficient' is not one of 'standard', 'gradient-x-input'"):
        rulegraph.Explainer(block(), "lrp-transformer", form="efficient")


def test_the_docs_table_lists_every_rule_with_a_form():
    import re

    from rulegraph.backward.gradient_form import GRADIENT_FORMS

    page = (Path(__file__).resolve().parent.parent / "docs" / "rules.md").read_text()
    marker = "gradient-form-table"
    table = re.search(rf"<!-- {marker} -->\n(.*?)\n<!-- /{marker} -->", page, re.S).group(1)
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]]
    assert rows == list(GRADIENT_FORMS)


# --------------------------------------------------------------------------------------------------
# 3. the command line

ROOT = Path(__file__).resolve().parent.parent
CNN, SAMPLE = ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_sample.npz"


def test_cli_form_on_a_cnn_equals_lrp_epsilon_at_epsilon_zero(tmp_path):
    """ReLU CNN under lrp-epsilon: the form equals LRP-0 (the same file with ε = 0)."""
    from rulegraph.cli import main

    out = tmp_path / "r.npy"
    assert main(["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--target", "3",
                 "--form", GXI, "--out", str(out)]) == 0
    text = (dsl.bundled_rules_dir() / "lrp-epsilon.rules").read_text().replace("eps = 1e-6", "eps = 0")
    x = np.load(SAMPLE)["x"]
    want = rulegraph.Explainer(CNN, dsl.parse(text, source="lrp-0.rules")).explain(x, target=[3] * len(x)).map
    assert _relative(np.load(out), want) < 1e-5


def test_cli_refuses_the_form_with_ray(tmp_path, capsys):
    from rulegraph.cli import main

    assert main(["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(SAMPLE), "--form", GXI,
                 "--ray", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--form gradient-x-input compiles a rule file for one process: drop it with --ray" in err


# --------------------------------------------------------------------------------------------------
# 4. equal to the standard compilation on BERT-, GPT-2- and Llama-style models

torch = pytest.importorskip("torch", reason="the transformers models are built in torch ([crosscheck] extra)")
transformers = pytest.importorskip("transformers", reason="the BERT, GPT-2 and Llama configs")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_models as tm  # noqa: E402

VOCAB, LENGTH = 50, 7


class Classifier(torch.nn.Module):
    """A transformers sequence classifier as ``(ids, mask) -> logits [N, classes]``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids, attention_mask=mask).logits


def bert():
    return Classifier(transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3)))


def gpt2():
    return tm.CausalLM(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)))


def llama():
    return tm.CausalLM(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)))


#: family -> (builder, target)
FAMILIES = {"bert": (bert, [0, 2]), "gpt2": (gpt2, rulegraph.Target([3, 4], at=LENGTH - 1)),
            "llama": (llama, rulegraph.Target([3, 4], at=LENGTH - 1))}
EXPORTERS = {"torchscript": False, "dynamo": True}
CASES = [(family, exporter) for family in FAMILIES for exporter in EXPORTERS]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{(family, exporter): onnx path}, feeds."""
    transformers.logging.set_verbosity_error()
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    folder = tmp_path_factory.mktemp("gxi")
    paths = {}
    for family, (build, _) in FAMILIES.items():
        torch.manual_seed(0)
        net = build().eval()
        for exporter, dynamo in EXPORTERS.items():
            path = folder / f"{family}_{exporter}.onnx"
            paths[family, exporter] = tm.export_token_model(net, ids, mask, path, dynamo)
    return paths, {"ids": ids.numpy(), "mask": mask.numpy()}


def _latent(path) -> str:
    """A tensor in the middle of the model: the residual stream into the middle normalization."""
    graph = G.load(str(path))
    norms = [n.inputs[0] for n in graph.nodes if n.op_type in ("LayerNormalization", "RMSNormalization")]
    return norms[len(norms) // 2]


@pytest.mark.parametrize(("family", "exporter"), CASES)
def test_equal_to_the_standard_compilation_at_epsilon_zero(models, family, exporter):
    paths, feeds = models
    target = FAMILIES[family][1]
    latent = _latent(paths[family, exporter])
    standard = rulegraph.Explainer(paths[family, exporter], transformer_rules("0")).explain(
        feeds, target=target, at=latent)
    efficient = rulegraph.Explainer(paths[family, exporter], "lrp-transformer", form=GXI).explain(
        feeds, target=target, at=latent)
    bundled = rulegraph.Explainer(paths[family, exporter], "lrp-transformer").explain(feeds, target=target)
    assert efficient.map.shape == (2, LENGTH) and np.isfinite(efficient.map).all()
    error = _relative(efficient.map, standard.map)
    delta = np.abs(efficient.relative_delta).max()
    print(f"\n{family}/{exporter}: efficient vs standard at ε = 0 {error:.1e}, vs the bundled ε = 1e-6 "
          f"{_relative(efficient.map, bundled.map):.1e}; relative delta {delta:.1e}")
    assert error < 1e-5
    assert _relative(efficient.at[latent], standard.at[latent]) < 1e-5
    assert sorted(efficient.bias_shares) == sorted(standard.bias_shares)
    scale = max((np.abs(s).max() for s in standard.bias_shares.values()), default=0.0)  # Llama: no biases
    for name, share in standard.bias_shares.items():
        assert np.abs(efficient.bias_shares[name] - share).max() <= 1e-5 * scale, name
    assert np.abs(efficient.relative_delta).max() < 1e-3
