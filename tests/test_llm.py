"""Decoder language models from transformers configs (random weights), exported by both torch
exporters: the relevance of every prompt token for the next-token logit, without and with a KV cache
(the cached keys and values as model inputs: the gradient reaches them as autograd's does, and the
new tokens and the cache share the relevance, conserving).

- GPT-2 (learned positions, GELU MLP, LayerNorm) and a Llama-style model (rotary embeddings,
  RMSNorm decomposed by the exporter into Pow/ReduceMean/Add/Sqrt/Div or Rsqrt/Mul, SiLU-gated
  MLP, grouped-query attention with fewer key/value heads than heads);
- the ``gradient`` file: gradient × input per token at the token embeddings equals autograd;
- ``lrp-transformer``: tokens plus bias shares add up to the next-token logit to 1e-3. The
  Llama-style model's decomposed RMSNorm ``x · (1 / sqrt(mean(x²) + ε)) · γ`` is fused into one
  RMSNormalization node (graph/fuse.py), so ``layernorm_linear`` holds the factor constant as
  AttnLRP does; read as a product of two activations it passed half the relevance into the factor,
  where the ε stabilizers leaked 1.2e-3 and 2.2e-3 per row;
- a chosen later token: the logit of the prompt's own next token at an earlier position. Causal
  attention gives the tokens after that position exactly nothing, under both files;
- Both exports get the same lrp-transformer map: the TorchScript export writes ``1 / sqrt`` as
  ``Div(1, s)``, read as a Reciprocal (nonlinear; as a Div with a constant operand it read as
  linear, and the ε-rule flipped the relevance's sign: deltas of about 1).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

import rulegraph

torch = pytest.importorskip("torch", reason="the language models are built in torch ([crosscheck] extra)")
transformers = pytest.importorskip("transformers", reason="GPT-2 and Llama configs come from transformers")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_models as tm  # noqa: E402

VOCAB, T, NEXT = 50, 7, [3, 4]  # vocabulary, prompt length, the next token explained per row
EXPORTERS = {"torchscript": False, "dynamo": True}


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0))


MODELS = {"gpt2": gpt2, "llama": llama}
CASES = [(model, exporter) for model in MODELS for exporter in EXPORTERS]


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    """{model: torch model}, ids [2, T], mask (all ones), {(model, exporter): onnx path}."""
    transformers.logging.set_verbosity_error()
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    folder = tmp_path_factory.mktemp("llm")
    nets, paths = {}, {}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        nets[name] = tm.CausalLM(build().eval())
        for exporter, dynamo in EXPORTERS.items():
            paths[name, exporter] = tm.export_token_model(nets[name], ids, mask, folder / f"{name}_{exporter}.onnx",
                                                          dynamo)
    return nets, ids, mask, paths


def explain(paths, model, exporter, rules, ids, mask):
    explainer = rulegraph.Explainer(paths[model, exporter], rules)
    return explainer.explain({"ids": ids.numpy(), "mask": mask.numpy()}, target=rulegraph.Target(NEXT, at=T - 1))


@pytest.mark.parametrize(("model", "exporter"), CASES)
def test_gradient_per_prompt_token_equals_autograd(llms, model, exporter):
    nets, ids, mask, paths = llms
    result = explain(paths, model, exporter, "gradient", ids, mask)
    np.testing.assert_allclose(result.outputs["logits"], nets[model](ids, mask).detach().numpy(), rtol=1e-4,
                               atol=1e-5)
    assert result.map.shape == (2, T) and result.explained.startswith("tensor 'logits'")
    expected = tm.token_gradient_x_input(nets[model], ids, mask, NEXT, position=T - 1)
    error = np.abs(result.map - expected).max() / np.abs(expected).max()
    print(f"\n{model}/{exporter}: gradient × input per token vs autograd, max relative error {error:.1e}")
    assert error < 1e-4


@pytest.mark.parametrize(("model", "exporter"), CASES)
def test_lrp_transformer_per_prompt_token_conserves(llms, model, exporter):
    _, ids, mask, paths = llms
    result = explain(paths, model, exporter, "lrp-transformer", ids, mask)
    assert set(result.attribution) == {"ids"} and np.isfinite(result.map).all()
    print(f"\n{model}/{exporter}: lrp-transformer relative delta per row {result.relative_delta}")
    assert np.abs(result.relative_delta).max() < 1e-3


@pytest.mark.parametrize("model", list(MODELS))
def test_both_exports_get_the_same_lrp_transformer_map(llms, model):
    _, ids, mask, paths = llms
    maps = [explain(paths, model, exporter, "lrp-transformer", ids, mask).map for exporter in EXPORTERS]
    assert np.abs(maps[0] - maps[1]).max() / np.abs(maps[1]).max() < 1e-4


LATER = 3   # explain, at position 3, the logit of the token the prompt has at position 4


@pytest.mark.parametrize(("model", "exporter"), CASES)
def test_a_chosen_later_token_gets_relevance_from_the_tokens_before_it_only(llms, model, exporter):
    nets, ids, mask, paths = llms
    chosen = ids[:, LATER + 1].tolist()
    target = rulegraph.Target(chosen, at=LATER)
    feeds = {"ids": ids.numpy(), "mask": mask.numpy()}
    gradient = rulegraph.Explainer(paths[model, exporter], "gradient").explain(feeds, target=target)
    expected = tm.token_gradient_x_input(nets[model], ids, mask, chosen, position=LATER)
    assert np.abs(gradient.map - expected).max() / np.abs(expected).max() < 1e-4
    lrp = rulegraph.Explainer(paths[model, exporter], "lrp-transformer").explain(feeds, target=target)
    assert np.abs(lrp.relative_delta).max() < 1e-3
    for result in (gradient, lrp):   # causal attention: the tokens after the position get nothing
        assert (result.map[:, LATER + 1:] == 0).all() and (result.map[:, :LATER + 1] != 0).any()


# with a KV cache: the prompt's earlier tokens come in as past keys and values ---------------------

PAST, NEW = 5, 3   # tokens already in the cache, new tokens


class WithCache(torch.nn.Module):
    """A causal LM of (ids, mask, k0, v0, k1, v1): the two layers' cached keys and values as inputs."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids, mask, k0, v0, k1, v1):
        cache = transformers.DynamicCache()
        cache.update(k0, v0, 0)
        cache.update(k1, v1, 1)
        # transformers 5 names it ``cache``; earlier releases ``past_key_values``
        name = "cache" if "cache" in inspect.signature(self.net.forward).parameters else "past_key_values"
        return self.net(input_ids=ids, attention_mask=mask, use_cache=True, **{name: cache}).logits


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """{model: (torch model, feeds, {exporter: onnx path})}."""
    import warnings

    transformers.logging.set_verbosity_error()
    out = {}
    folder = tmp_path_factory.mktemp("kv")
    for name, build in MODELS.items():
        torch.manual_seed(0)
        net = build().eval()
        prompt = torch.randint(0, VOCAB, (2, PAST), generator=torch.Generator().manual_seed(1))
        past = net(input_ids=prompt, use_cache=True).past_key_values
        kv = [t.detach() for layer in past.layers[:2] for t in (layer.keys, layer.values)]
        ids = torch.randint(0, VOCAB, (2, NEW), generator=torch.Generator().manual_seed(2))
        args = (ids, torch.ones(2, PAST + NEW, dtype=torch.long), *kv)
        model = WithCache(net).eval()
        names = ["ids", "mask", "k0", "v0", "k1", "v1"]
        paths = {}
        for exporter, dynamo in EXPORTERS.items():
            paths[exporter] = folder / f"{name}_{exporter}.onnx"
            options = ({"opset_version": 18, "external_data": False, "verbose": False} if dynamo
                       else {"opset_version": 17})
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, args, str(paths[exporter]), input_names=names, output_names=["logits"],
                                  dynamo=dynamo, **options)
        out[name] = (model, dict(zip(names, args)), paths)
    return out


@pytest.mark.parametrize(("model", "exporter"), CASES)
def test_with_a_kv_cache_the_gradient_reaches_the_cache_and_lrp_conserves(cached, model, exporter):
    net, args, paths = cached[model]
    feeds = {k: v.numpy() for k, v in args.items()}
    target = rulegraph.Target(NEXT, at=NEW - 1)
    gradient = rulegraph.Explainer(paths[exporter], "gradient").explain(feeds, target=target)
    kv = {k: args[k].clone().requires_grad_(True) for k in ("k0", "v0", "k1", "v1")}
    logits = net(args["ids"], args["mask"], *kv.values())
    logits[torch.arange(2), NEW - 1, torch.tensor(NEXT)].sum().backward()
    for name, tensor in kv.items():   # the gradient rule's saliency of each cached tensor is ∂logit/∂cache
        want = tensor.grad.numpy()
        assert np.abs(gradient.saliency[name] - want).max() <= 1e-4 * np.abs(want).max(), name
    lrp = rulegraph.Explainer(paths[exporter], "lrp-transformer").explain(feeds, target=target)
    assert set(lrp.attribution) == {"ids", "k0", "v0", "k1", "v1"}   # new tokens and the cache share it
    assert np.abs(lrp.relative_delta).max() < 1e-3
