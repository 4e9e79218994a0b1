"""Family "optimized": a BERT after onnxruntime's transformer optimizer (com.microsoft
SkipLayerNormalization and BiasGelu in place of the exported Add, LayerNorm, bias and GELU nodes),
explained end to end by the bundled gradient and lrp-transformer files.

Oracles: torch.autograd (gradient × input per token at the word embeddings) and the same model
before optimization, explained by the same file: the optimizer changes no math, so the token
relevance must agree to float32 rounding. The biases are drawn at random (BERT's initialization
zeroes them), so that a bias handled differently in the fused ops would show."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import rulegraph
from rulegraph.check import check
from rulegraph.lang.parse import bundled_rules_dir

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TARGETS = [2, 0]
MS = "com.microsoft"


@pytest.fixture(scope="module")
def optimized_bert(tmp_path_factory):
    """(torch model, ids, mask, {"exported": path, "optimized": path})."""
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    folder = tmp_path_factory.mktemp("optimized")
    paths = {"exported": folder / "bert.onnx", "optimized": folder / "bert_optimized.onnx"}
    torch.onnx.export(model, (ids, mask), str(paths["exported"]), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={name: {0: "batch", 1: "seq"} for name in ("input_ids", "attention_mask")})
    optimized = optimize_model(str(paths["exported"]), model_type="bert", num_heads=4, hidden_size=64,
                               opt_level=0)
    optimized.save_model_to_file(str(paths["optimized"]))
    return model, ids, mask, paths


def _feeds(ids, mask):
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def test_the_optimizer_wrote_contrib_ops(optimized_bert):
    import onnx

    *_, paths = optimized_bert
    ops = collections.Counter((n.domain, n.op_type) for n in onnx.load(str(paths["optimized"])).graph.node)
    assert ops[(MS, "SkipLayerNormalization")] == 4 and ops[(MS, "BiasGelu")] == 2, ops


def autograd_per_token(model, ids, mask) -> np.ndarray:
    """Σ_e emb ⊙ ∂y_target/∂emb at the word embeddings' output."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output

    handle = model.bert.embeddings.word_embeddings.register_forward_hook(keep)
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[range(len(TARGETS)), TARGETS].sum().backward()
    finally:
        handle.remove()
    emb = captured["emb"]
    return (emb * emb.grad).sum(-1).detach().numpy()


def test_gradient_equals_autograd_and_the_exported_model(optimized_bert):
    model, ids, mask, paths = optimized_bert
    result = rulegraph.Explainer(paths["optimized"], "gradient").explain(_feeds(ids, mask), target=TARGETS)
    logits = model(input_ids=ids, attention_mask=mask).logits.detach().numpy()
    np.testing.assert_allclose(result.outputs["logits"], logits, rtol=1e-4, atol=1e-4)
    expected = autograd_per_token(model, ids, mask)
    scale = np.abs(expected).max()
    assert np.abs(result.attribution["input_ids"] - expected).max() < 1e-4 * scale
    exported = rulegraph.Explainer(paths["exported"], "gradient").explain(_feeds(ids, mask), target=TARGETS)
    assert np.abs(result.attribution["input_ids"] - exported.attribution["input_ids"]).max() < 1e-5 * scale


def test_lrp_transformer_conserves_blames_biases_and_equals_the_exported_model(optimized_bert):
    _, ids, mask, paths = optimized_bert
    feeds = _feeds(ids, mask)
    report = check(paths["optimized"], "lrp-transformer", x=feeds)
    assert report.ok and report.predicted == "approximate", report.to_text()
    result = rulegraph.Explainer(paths["optimized"], "lrp-transformer").explain(feeds, target=TARGETS)
    assert np.abs(result.relative_delta).max() < 1e-3, result.relative_delta
    skip_norms = [name for name in result.bias_shares if "SkipLayerNorm" in name]
    # β and the bias of the sum are blamed
    assert len(skip_norms) == 4 and all(np.any(result.bias_shares[n] != 0) for n in skip_norms)


def test_lrp_transformer_without_stabilizer_equals_the_exported_model(optimized_bert, tmp_path):
    """With ε = 0 the two graphs are the same math: the optimized one only lacks the ε-rule steps of
    the Add nodes it fused (the residual sum, the dense biases), whose stabilizers ε = 1e-6 move a
    share by ε/|d|, up to 2e-4 of the largest token relevance at |d| ~ 1e-2."""
    _, ids, mask, paths = optimized_bert
    feeds = _feeds(ids, mask)
    text = (bundled_rules_dir() / "lrp-transformer.rules").read_text()
    (tmp_path / "no-eps.rules").write_text(text.replace("eps = 1e-6", "eps = 0"))
    results = [rulegraph.Explainer(paths[name], tmp_path / "no-eps.rules").explain(feeds, target=TARGETS)
               for name in ("optimized", "exported")]
    np.testing.assert_allclose(results[0].bias_total, results[1].bias_total, rtol=1e-5)
    got, expected = (r.attribution["input_ids"] for r in results)
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()


def test_gradient_x_input_equals_the_exported_model(optimized_bert):
    """The slope rule evaluates f(0) of com.microsoft.Gelu on onnxruntime (the reference has no such op)."""
    _, ids, mask, paths = optimized_bert
    results = [rulegraph.Explainer(paths[name], "gradient-x-input").explain(_feeds(ids, mask), target=TARGETS)
               for name in ("optimized", "exported")]
    got, expected = (r.attribution["input_ids"] for r in results)
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()


@pytest.fixture(scope="module")
def eager_bert(tmp_path_factory):
    """A BERT exported with eager attention, which the optimizer fuses into Attention and
    EmbedLayerNormalization by default: (torch model, ids, mask, {options: optimized path})."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3,
                        attn_implementation="eager")
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    folder = tmp_path_factory.mktemp("eager")
    torch.onnx.export(model, (ids, mask), str(folder / "bert.onnx"),
                      input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=17,
                      dynamo=False,
                      dynamic_axes={name: {0: "batch", 1: "seq"} for name in ("input_ids", "attention_mask")})
    paths = {}
    for name, off in (("default", ()), ("unfused", ("enable_attention", "enable_embed_layer_norm"))):
        options = FusionOptions("bert")
        for option in off:
            setattr(options, option, False)
        optimized = optimize_model(str(folder / "bert.onnx"), model_type="bert", num_heads=4, hidden_size=64,
                                   optimization_options=options, opt_level=0)
        paths[name] = folder / f"bert_{name}.onnx"
        optimized.save_model_to_file(str(paths[name]))
    return model, ids, mask, paths


def test_fused_attention_is_refused_with_the_options_that_avoid_it(eager_bert):
    *_, paths = eager_bert
    with pytest.raises(rulegraph.ModelError) as err:
        rulegraph.Explainer(paths["default"], "gradient")
    message = str(err.value)
    assert ("node 'EmbedLayerNormalization_0' (EmbedLayerNormalization) (domain 'com.microsoft') is not "
            "supported: onnxruntime's transformer optimizer writes it; optimize with "
            "`FusionOptions(model_type)` and `options.enable_embed_layer_norm = False`") in message
    assert ("node 'Attention_0' (Attention) (domain 'com.microsoft') (and 1 more) is not supported: "
            "onnxruntime's transformer optimizer writes it; optimize with `FusionOptions(model_type)` and "
            "`options.enable_attention = False`") in message


def test_with_those_options_the_gradient_equals_autograd(eager_bert):
    model, ids, mask, paths = eager_bert
    result = rulegraph.Explainer(paths["unfused"], "gradient").explain(_feeds(ids, mask), target=TARGETS)
    expected = autograd_per_token(model, ids, mask)
    assert np.abs(result.attribution["input_ids"] - expected).max() < 1e-4 * np.abs(expected).max()
