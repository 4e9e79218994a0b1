"""Encoder-decoder models from transformers configs (random weights): BART and T5 with the source ids,
their mask and the decoder's ids as three inputs, the logits of the decoder's last position
explained, exported by both torch exporters.

- the ``gradient`` file: gradient × input per token, for the source tokens and for the decoder's
  tokens, equals autograd's at the encoder's and the decoder's embedding lookups (one table shared
  by both: two token sources on one table);
- ``lrp-transformer``: source tokens, decoder tokens and bias shares add up to the explained logit.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import rulegraph

torch = pytest.importorskip("torch", reason="the models are built in torch ([crosscheck] extra)")
transformers = pytest.importorskip("transformers", reason="BART and T5 configs come from transformers")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB, TARGET = 60, [3, 7]
EXPORTERS = {"torchscript": False, "dynamo": True}
INPUTS = ("ids", "mask", "decoder_ids")


def bart():
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))


def t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


MODELS = {"bart": bart, "t5": t5}


class LastLogits(torch.nn.Module):
    """The next-token logits after the decoder's ids, [N, vocabulary]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask, decoder_ids):
        return self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits[:, -1]


def export(net, feeds: dict, path: Path, dynamo: bool) -> Path:
    kwargs: dict = {"input_names": list(INPUTS), "output_names": ["logits"], "dynamo": dynamo}
    if dynamo:
        batch = torch.export.Dim("N", min=1, max=64)
        kwargs.update(opset_version=18, external_data=False, dynamic_shapes=({0: batch},) * 3)
    else:
        kwargs.update(opset_version=17, dynamic_axes={name: {0: "N"} for name in (*INPUTS, "logits")})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, tuple(feeds.values()), str(path), **kwargs)
    return path


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    decoder_ids = torch.randint(3, VOCAB, (2, 5), generator=generator)
    feeds = {"ids": ids, "mask": torch.ones_like(ids), "decoder_ids": decoder_ids}
    folder = tmp_path_factory.mktemp("seq2seq")
    nets, paths = {}, {}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        nets[name] = LastLogits(build()).eval()
        for exporter, dynamo in EXPORTERS.items():
            paths[name, exporter] = export(nets[name], feeds, folder / f"{name}_{exporter}.onnx", dynamo)
    return nets, feeds, paths


def _per_token_autograd(net, feeds) -> dict[str, np.ndarray]:
    """Gradient × input per token at the encoder's and the decoder's embedding lookups."""
    lookups = net.model.get_encoder().embed_tokens, net.model.get_decoder().embed_tokens
    caught = {}

    def keep(key):
        def hook(module, args, output):
            output.retain_grad()
            caught[key] = output
        return hook

    handles = [module.register_forward_hook(keep(key)) for key, module in zip(("ids", "decoder_ids"), lookups)]
    try:
        with torch.enable_grad():
            net(*feeds.values())[[0, 1], TARGET].sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return {key: (e * e.grad).sum(-1).detach().numpy() for key, e in caught.items()}


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("model", list(MODELS))
def test_gradient_per_source_and_decoder_token_equals_autograd(seq2seq, model, exporter):
    nets, feeds, paths = seq2seq
    result = rulegraph.Explainer(paths[model, exporter], "gradient").explain(
        {k: v.numpy() for k, v in feeds.items()}, target=TARGET)
    for name, expected in _per_token_autograd(nets[model], feeds).items():
        assert result.attribution[name].shape == expected.shape
        assert np.abs(result.attribution[name] - expected).max() <= 1e-5 * np.abs(expected).max(), name


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("model", list(MODELS))
def test_lrp_transformer_conserves_over_both_token_inputs(seq2seq, model, exporter):
    """The predicted token of each row (its logit, not a random one of about 1e-3, where ε = 1e-6 of
    the rule file is not small)."""
    _, feeds, paths = seq2seq
    result = rulegraph.Explainer(paths[model, exporter], "lrp-transformer").explain(
        {k: v.numpy() for k, v in feeds.items()}, target="argmax")
    assert set(result.attribution) >= {"ids", "decoder_ids"}
    assert all(np.isfinite(a).all() for a in result.attribution.values())
    assert np.abs(result.relative_delta).max() < 1e-3
