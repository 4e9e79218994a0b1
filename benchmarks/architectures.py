"""The README's architecture table: real architectures with random weights, exported both ways,
explained end to end.

For each architecture and exporter: opset, node count, how many nodes on the relevance path each
rule kind covers, whether the `gradient` rule file matches torch.autograd (max error relative to
the largest gradient; for token models gradient × input per token at the token embeddings), the
end-to-end conservation error of the LRP file (bias blamed): `lrp-epsilon`, or `lrp-transformer`
for the transformers (and any model with LayerNorm or attention), and what fails and why where
something does. Families: torchvision and timm models (random weights), transformers models from
tiny configs, hand-built torch op families, and real third-party ONNX models (tests/data,
../shared/models; no torch twin, so no gradient oracle).

    python benchmarks/architectures.py [--only resnet18,vit] [--library torchvision,timm] [--write-readme]

Needs torch and transformers (torchvision and timm for their rows; none is part of the test extras). With
--write-readme the table replaces the block between the `<!-- architectures -->` markers in
README.md (with --only or --library, only those architectures' rows are replaced). The rows of an
architecture whose library is missing here are kept from the README, marked with what they were
measured with.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulegraph import Explainer
from rulegraph.compile.plan import assign, find_start, path_nodes

MARK_BEGIN, MARK_END = "<!-- architectures -->", "<!-- /architectures -->"


# ---------------------------------------------------------------------------------------------------
# builders: each returns (a torch module taking the inputs positionally and giving [N, K], the inputs,
# the token-embedding module whose output the gradient is read at, or None for float inputs)


def torchvision_model(name: str, size: int = 224, **kwargs):
    """A torchvision classifier (no weights; ``kwargs`` to its constructor) on 2 × 3 × size × size."""

    def build():
        import torch
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
        return model, {"input": torch.randn(2, 3, size, size)}, None

    return build


def timm_model(name: str, size: int = 64, **kwargs):
    """A timm classifier with random weights (seed 0) and 10 classes on 2 × 3 × size × size
    (``kwargs`` to ``timm.create_model``). A classifier that timm initializes to zero (MLP-Mixer,
    ResMLP, Sequencer's head) gets torch's own initialization instead, or every logit would be 0."""

    def build():
        import timm
        import torch

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
        for head in model.get_classifier().modules():   # a Linear, or one inside a ClassifierHead
            if isinstance(head, torch.nn.Linear) and not head.weight.any():
                head.reset_parameters()
        return model, {"input": torch.randn(2, 3, size, size)}, None

    return build


def torchvision_segmentation(name: str, size: int = 128, classes: int = 4):
    """A torchvision segmentation model (no weights, backbone included), its class map ``out``
    [N, classes, size, size]."""

    def build():
        import torch
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                               num_classes=classes).eval()
        return picked(model, lambda out: out["out"]), {"input": torch.randn(2, 3, size, size)}, None

    return build


def picked(model, pick, head=None):
    """``model``'s output reduced to [N, K] by ``pick`` (and a linear ``head``), as one module."""
    import torch

    class Picked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.head = model, head

        def forward(self, *args):
            y = pick(self.model(*args))
            return y if self.head is None else self.head(y)

    return Picked().eval()


def token_ids(n: int = 12, vocab: int = 1000, mask: bool = True) -> dict:
    import torch

    ids = torch.randint(5, vocab, (2, n))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if mask else {"input_ids": ids}


def hf(config_name: str, model_name: str, inputs, pick=lambda out: out.logits, head: int | None = None,
         embeddings=lambda model: model.get_input_embeddings(), init=None, **config):
    """A transformers model from a tiny config with random weights (seed 0); ``embeddings``: the
    module whose output the token embeddings are (for the gradient × input oracle); ``init``:
    applied to each module after construction."""

    def build():
        import torch
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()
        if init is not None:
            model.apply(init)
        feeds = inputs()
        linear = None if head is None else torch.nn.Linear(model.config.hidden_size, head)
        float_input = any(v.is_floating_point() for v in feeds.values())
        return picked(model, pick, linear), feeds, None if float_input else embeddings(model)

    return build


def ended(feeds: dict, eos: int = 2) -> dict:
    """Token ids whose last token is the end of sequence (BART's classifier reads the eos state)."""
    feeds["input_ids"][:, -1] = eos
    return feeds


def causal_lm(config_name: str, model_name: str, **config):
    """A decoder LLM: the next-token logits after the prompt (the last position), no KV cache."""
    tiny = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    return hf(config_name, model_name, lambda: token_ids(mask=False),
              pick=lambda out: out.logits[:, -1], **{**tiny, **config})


def image(size: int = 32):
    import torch

    return lambda: {"pixel_values": torch.randn(2, 3, size, size)}




def handmade(name: str, inputs):
    def build():
        import torch

        torch.manual_seed(0)
        return HANDMADE[name]().eval(), {"input": inputs()}, None

    return build


def _handmade_modules() -> dict:
    """The hand-built op families (torch modules, defined when torch is importable)."""
    import torch
    from torch import nn
    from torch.nn import functional

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    class UNet(nn.Module):
        """Two levels: max-pool down, ConvTranspose up with the skip concatenated, an Upsample
        (bilinear) of the bottleneck added; the class map [N, C, H, W]."""

        def __init__(self, classes=3):
            super().__init__()
            self.enc1, self.enc2 = block(3, 8), block(8, 16)
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.side = nn.Sequential(nn.Conv2d(16, 8, 1), nn.Upsample(scale_factor=2, mode="bilinear"))
            self.dec = block(16, 8)
            self.out = nn.Conv2d(8, classes, 1)

        def forward(self, x):
            e1 = self.enc1(x)
            e2 = self.enc2(functional.max_pool2d(e1, 2))
            d = self.dec(torch.cat([self.up(e2) + self.side(e2), e1], 1))
            return self.out(d)

    class Audio1d(nn.Module):
        """A 1-D CNN on a waveform [N, 1, T]: strided Conv1d, BatchNorm1d, ReLU, MaxPool1d, mean."""

        def __init__(self, classes=5):
            super().__init__()
            self.net = nn.Sequential(nn.Conv1d(1, 8, 16, stride=4), nn.BatchNorm1d(8), nn.ReLU(),
                                     nn.MaxPool1d(4),
                                     nn.Conv1d(8, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU())
            self.fc = nn.Linear(16, classes)

        def forward(self, x):
            return self.fc(self.net(x).mean(-1))

    class Yolo(nn.Module):
        """A YOLOv8-style decoupled head on a small backbone: box and class branches concatenated
        to [N, 4 + C, cells]; the class logits of one box (cell 5)."""

        def __init__(self, classes=6):
            super().__init__()
            self.backbone = nn.Sequential(block(3, 8), nn.MaxPool2d(2), block(8, 16), nn.MaxPool2d(2))
            self.box = nn.Sequential(block(16, 16), nn.Conv2d(16, 4, 1))
            self.cls = nn.Sequential(block(16, 16), nn.Conv2d(16, classes, 1))

        def forward(self, x):
            f = self.backbone(x)
            out = torch.cat([self.box(f), self.cls(f)], 1).flatten(2)
            return out[:, 4:, 5]

    class Recurrent(nn.Module):
        """An LSTM or GRU over [N, T, 8] (batch first), the last step's output through a Linear."""

        def __init__(self, cell=nn.LSTM, outputs=4, bidirectional=False):
            super().__init__()
            self.rnn = cell(8, 16, batch_first=True, bidirectional=bidirectional)
            self.fc = nn.Linear(32 if bidirectional else 16, outputs)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    class GroupNormCNN(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                     nn.MaxPool2d(2),
                                     nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU())
            self.fc = nn.Linear(32, classes)

        def forward(self, x):
            return self.fc(self.net(x).mean((2, 3)))

    class FCN(nn.Module):
        """An FCN-style segmentation head: strided backbone, 1 × 1 classifier, bilinear interpolation
        back to the input size."""

        def __init__(self, classes=4):
            super().__init__()
            self.backbone = nn.Sequential(block(3, 8), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                          nn.Conv2d(16, 16, 3, stride=2, padding=1, dilation=1), nn.ReLU())
            self.head = nn.Sequential(block(16, 16), nn.Dropout(0.1), nn.Conv2d(16, classes, 1))

        def forward(self, x):
            return functional.interpolate(self.head(self.backbone(x)), size=x.shape[-2:], mode="bilinear",
                                          align_corners=False)

    return {"unet": UNet, "audio-1d-cnn": Audio1d, "yolo-head": Yolo,
            "lstm-classifier": Recurrent, "gru-classifier": lambda: Recurrent(nn.GRU),
            "bigru-classifier": lambda: Recurrent(nn.GRU, bidirectional=True),
            "lstm-regressor": lambda: Recurrent(outputs=1), "groupnorm-cnn": GroupNormCNN, "fcn-head": FCN}


class _Handmade(dict):
    def __missing__(self, name):
        self.update(_handmade_modules())
        return self[name]


HANDMADE = _Handmade()


def torch_init(module) -> None:
    """torch's own initialization of convolutions and batch norms: transformers' MobileViT init
    (weights and BatchNorm scales ~ N(0, 0.02)) lets the activations underflow (logits ~1e-23)."""
    import torch

    if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
        module.reset_parameters()


def torch_init_linear(module) -> None:
    """torch's own initialization of linear layers too: LeViT's (weights ~ N(0, 0.02) through
    Linear + BatchNorm1d blocks) gives logits ~1e-9."""
    import torch

    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        module.reset_parameters()


def randn(*shape):
    def make():
        import torch

        return torch.randn(*shape)

    return make

@dataclass(frozen=True)
class Family:
    """A row family: a builder, the library it needs, its LRP file and its two targets, or for a
    segmentation map [N, C, H, W] one class over a region (class, rows, columns): a seed of ones."""

    build: Callable
    library: str
    lrp: str = "lrp-epsilon"
    targets: tuple = (1, 2)
    region: tuple | None = None

    def target(self, net, inputs: dict):
        """The target as the autograd oracle takes it: the classes, or the region's seed (the
        output's shape)."""
        if self.region is None:
            return list(self.targets)
        import torch

        with torch.no_grad():
            seed = np.zeros(tuple(net(*inputs.values()).shape), np.float32)
        seed[(slice(None),) + self.region] = 1.0
        return seed

    def explained(self, net, inputs: dict):
        """The same target in the explainer's own forms: the classes, or ``Target(class,
        region=...)`` for one class over a region (``target`` is its seed, the autograd oracle)."""
        if self.region is None:
            return self.target(net, inputs)
        from rulegraph import Target

        return Target(self.region[0], region=self.region[1:])


def _tf(build, **kw) -> Family:
    return Family(build, "transformers", "lrp-transformer", **kw)


IMAGE_TF = {"image_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}

TEXT_TF = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "max_position_embeddings": 64, "num_labels": 3}
AUDIO_TF = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3),
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 4, "classifier_proj_size": 16, "num_labels": 4}

#: the torchvision segmentation rows explain class 1 over a 32 × 32 region of the 128 × 128 map
TV_REGION = (1, slice(48, 80), slice(40, 72))

ARCHITECTURES = {
    "resnet18": Family(torchvision_model("resnet18"), "torchvision"),
    "vgg11_bn": Family(torchvision_model("vgg11_bn"), "torchvision"),
    "squeezenet1_1": Family(torchvision_model("squeezenet1_1"), "torchvision"),
    "mobilenet_v3_small": Family(torchvision_model("mobilenet_v3_small"), "torchvision"),
    "efficientnet_b0": Family(torchvision_model("efficientnet_b0"), "torchvision"),
    "densenet121": Family(torchvision_model("densenet121"), "torchvision"),
    "fcn_resnet50": Family(torchvision_segmentation("fcn_resnet50"), "torchvision", region=TV_REGION),
    "deeplabv3_mobilenet_v3_large": Family(torchvision_segmentation("deeplabv3_mobilenet_v3_large"),
                                           "torchvision", region=TV_REGION),
    "lraspp_mobilenet_v3_large": Family(torchvision_segmentation("lraspp_mobilenet_v3_large"), "torchvision",
                                        region=TV_REGION),
    "resnext50_32x4d": Family(torchvision_model("resnext50_32x4d", 64), "torchvision"),
    "wide_resnet50_2": Family(torchvision_model("wide_resnet50_2", 64), "torchvision"),
    "regnet_y_400mf": Family(torchvision_model("regnet_y_400mf", 64), "torchvision"),
    "mnasnet0_5": Family(torchvision_model("mnasnet0_5", 64), "torchvision"),
    "shufflenet_v2_x0_5": Family(torchvision_model("shufflenet_v2_x0_5", 64), "torchvision"),
    "googlenet": Family(torchvision_model("googlenet", 64, aux_logits=False, init_weights=True), "torchvision"),
    "mobilenet_v2": Family(torchvision_model("mobilenet_v2", 64), "torchvision"),
    "convnext_tiny": Family(torchvision_model("convnext_tiny", 64), "torchvision", "lrp-transformer"),
    "swin_t": Family(torchvision_model("swin_t"), "torchvision", "lrp-transformer"),
    "maxvit_t": Family(torchvision_model("maxvit_t"), "torchvision", "lrp-transformer"),
    "bert (transformers)": _tf(hf("BertConfig", "BertForSequenceClassification", token_ids, vocab_size=1000,
                                  hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=3)),
    "vit (transformers)": _tf(hf("ViTConfig", "ViTForImageClassification", image(), patch_size=8,
                                 hidden_size=64,
                                 num_labels=10, **IMAGE_TF)),
    "gpt2 (transformers)": _tf(hf("GPT2Config", "GPT2LMHeadModel", lambda: token_ids(mask=False),
                                  pick=lambda out: out.logits[:, -1], vocab_size=1000, n_positions=64,
                                  n_embd=64, n_layer=2, n_head=4)),
    "llama (transformers)": _tf(causal_lm("LlamaConfig", "LlamaForCausalLM")),
    "llama with eager attention (transformers)": _tf(causal_lm("LlamaConfig", "LlamaForCausalLM",
                                                               attn_implementation="eager")),
    "qwen2 (transformers)": _tf(causal_lm("Qwen2Config", "Qwen2ForCausalLM")),
    "qwen3 (transformers)": _tf(causal_lm("Qwen3Config", "Qwen3ForCausalLM", head_dim=16)),
    "mistral (transformers)": _tf(causal_lm("MistralConfig", "MistralForCausalLM", sliding_window=8)),
    "t5 encoder (transformers)": _tf(hf("T5Config", "T5EncoderModel", token_ids,
                                        pick=lambda out: out.last_hidden_state[:, 0], head=5,
                                        embeddings=lambda model: model.encoder.embed_tokens, vocab_size=1000,
                                        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)),
    "deit (transformers)": _tf(hf("DeiTConfig", "DeiTForImageClassification", image(), patch_size=8,
                                  hidden_size=64, num_labels=10, **IMAGE_TF)),
    "swin (transformers)": _tf(hf("SwinConfig", "SwinForImageClassification", image(), image_size=32,
                                  patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                                  num_labels=10)),
    "clip vision (transformers)": _tf(hf("CLIPVisionConfig", "CLIPVisionModelWithProjection", image(),
                                         pick=lambda out: out.image_embeds, patch_size=8, hidden_size=64,
                                         projection_dim=10, **IMAGE_TF)),
    "clip text (transformers)": _tf(hf("CLIPTextConfig", "CLIPTextModelWithProjection", token_ids,
                                       pick=lambda out: out.text_embeds, vocab_size=1000, hidden_size=64,
                                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=32, projection_dim=10)),
    "convnext (transformers)": _tf(hf("ConvNextConfig", "ConvNextForImageClassification", image(),
                                      hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)),
    "mobilevit (transformers)": _tf(hf("MobileViTConfig", "MobileViTForImageClassification", image(64),
                                       image_size=64, hidden_sizes=[32, 48, 64],
                                       neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2,
                                       num_labels=10, init=torch_init)),
    "whisper encoder (transformers)": _tf(hf("WhisperConfig", "WhisperForAudioClassification",
                                             lambda: {"input_features": randn(2, 16, 32)()}, num_mel_bins=16,
                                             d_model=64, encoder_layers=2, encoder_attention_heads=4,
                                             encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4,
                                             decoder_ffn_dim=128, max_source_positions=16,
                                             classifier_proj_size=16,
                                             num_labels=4)),
    "wav2vec2 (transformers)": _tf(hf("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification",
                                      lambda: {"input_values": randn(2, 800)()}, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                      classifier_proj_size=16, num_labels=4)),
    "segformer (transformers)": _tf(hf("SegformerConfig", "SegformerForSemanticSegmentation", image(),
                                       num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                       hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                                       num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
                                       num_labels=4), region=(1, slice(2, 6), slice(2, 6))),
    # more transformers families: encoders, decoders, vision and speech models from tiny configs
    "roberta (transformers)": _tf(hf("RobertaConfig", "RobertaForSequenceClassification", token_ids,
                                     **TEXT_TF)),
    "xlm-roberta (transformers)": _tf(hf("XLMRobertaConfig", "XLMRobertaForSequenceClassification", token_ids,
                                         **TEXT_TF)),
    "distilbert (transformers)": _tf(hf("DistilBertConfig", "DistilBertForSequenceClassification", token_ids,
                                        vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                        max_position_embeddings=64, num_labels=3)),
    "albert (transformers)": _tf(hf("AlbertConfig", "AlbertForSequenceClassification", token_ids,
                                    embedding_size=32, **TEXT_TF)),
    "electra (transformers)": _tf(hf("ElectraConfig", "ElectraForSequenceClassification", token_ids,
                                     embedding_size=32, **TEXT_TF)),
    "deberta-v2 (transformers)": _tf(hf("DebertaV2Config", "DebertaV2ForSequenceClassification", token_ids,
                                        relative_attention=True, pos_att_type=["p2c", "c2p"],
                                        position_buckets=8, **TEXT_TF)),
    "mpnet (transformers)": _tf(hf("MPNetConfig", "MPNetForSequenceClassification", token_ids, **TEXT_TF)),
    "mobilebert (transformers)": _tf(hf("MobileBertConfig", "MobileBertForSequenceClassification", token_ids,
                                        **{**TEXT_TF, "intermediate_size": 64}, embedding_size=32,
                                        intra_bottleneck_size=32, true_hidden_size=32,
                                        num_feedforward_networks=2)),
    "gpt-neo (transformers)": _tf(hf("GPTNeoConfig", "GPTNeoForCausalLM", lambda: token_ids(mask=False),
                                     pick=lambda out: out.logits[:, -1], vocab_size=1000,
                                     max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=4,
                                     intermediate_size=128, attention_types=[[["global", "local"], 1]],
                                     window_size=8)),
    "gpt-j (transformers)": _tf(hf("GPTJConfig", "GPTJForCausalLM", lambda: token_ids(mask=False),
                                   pick=lambda out: out.logits[:, -1], vocab_size=1000, n_positions=64,
                                   n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
    "opt (transformers)": _tf(causal_lm("OPTConfig", "OPTForCausalLM", ffn_dim=128, word_embed_proj_dim=64,
                                     pad_token_id=0)),
    "bloom (transformers)": _tf(hf("BloomConfig", "BloomForCausalLM", lambda: token_ids(mask=False),
                                   pick=lambda out: out.logits[:, -1], vocab_size=1000, hidden_size=64,
                                   n_layer=2, n_head=4)),
    "falcon (transformers)": _tf(causal_lm("FalconConfig", "FalconForCausalLM", num_kv_heads=1)),
    "phi (transformers)": _tf(causal_lm("PhiConfig", "PhiForCausalLM", num_key_value_heads=4)),
    "phi3 (transformers)": _tf(causal_lm("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=4,
                                         pad_token_id=0)),
    "gemma (transformers)": _tf(causal_lm("GemmaConfig", "GemmaForCausalLM", head_dim=16)),
    "gemma2 (transformers)": _tf(causal_lm("Gemma2Config", "Gemma2ForCausalLM", head_dim=16,
                                           sliding_window=8)),
    "gemma3 text (transformers)": _tf(causal_lm("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16,
                                                sliding_window=8)),
    "stablelm (transformers)": _tf(causal_lm("StableLmConfig", "StableLmForCausalLM")),
    "olmo (transformers)": _tf(causal_lm("OlmoConfig", "OlmoForCausalLM", pad_token_id=0, eos_token_id=1)),
    "granite (transformers)": _tf(causal_lm("GraniteConfig", "GraniteForCausalLM")),
    "mixtral (transformers)": _tf(causal_lm("MixtralConfig", "MixtralForCausalLM", num_local_experts=4,
                                            num_experts_per_tok=2)),
    "mixtral with eager experts and attention (transformers)": _tf(causal_lm(
        "MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
        experts_implementation="eager", attn_implementation="eager")),
    "qwen2-moe with eager experts and attention (transformers)": _tf(causal_lm(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64, experts_implementation="eager", attn_implementation="eager")),
    "beit (transformers)": _tf(hf("BeitConfig", "BeitForImageClassification", image(), patch_size=8,
                                  hidden_size=64, use_relative_position_bias=True, num_labels=10,
                                  **IMAGE_TF)),
    "dinov2 (transformers)": _tf(hf("Dinov2Config", "Dinov2ForImageClassification", image(), patch_size=8,
                                    hidden_size=64, mlp_ratio=2, num_labels=10,
                                    **{k: v for k, v in IMAGE_TF.items() if k != "intermediate_size"})),
    "levit (transformers)": _tf(hf("LevitConfig", "LevitForImageClassification", image(64), image_size=64,
                                   hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                                   key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2],
                                   num_labels=10, init=torch_init_linear)),
    "poolformer (transformers)": _tf(hf("PoolFormerConfig", "PoolFormerForImageClassification", image(),
                                        hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2,
                                        patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1], mlp_ratio=2.0,
                                        num_labels=10)),
    "regnet (transformers)": _tf(hf("RegNetConfig", "RegNetForImageClassification", image(),
                                    embedding_size=16,
                                    hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=10)),
    "resnet (transformers)": _tf(hf("ResNetConfig", "ResNetForImageClassification", image(),
                                    embedding_size=16,
                                    hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10)),
    "cvt (transformers)": _tf(hf("CvtConfig", "CvtForImageClassification", image(), embed_dim=[16, 32, 64],
                                 num_heads=[1, 2, 4], depth=[1, 2, 3], mlp_ratio=[2.0, 2.0, 2.0],
                                 num_labels=10)),
    "yolos (transformers)": _tf(hf("YolosConfig", "YolosForObjectDetection", image(), image_size=[32, 32],
                                   patch_size=8, hidden_size=64, num_detection_tokens=5, num_labels=6,
                                   pick=lambda out: out.logits[:, 0],
                                   **{k: v for k, v in IMAGE_TF.items() if k != "image_size"})),
    "hubert (transformers)": _tf(hf("HubertConfig", "HubertForSequenceClassification",
                                    lambda: {"input_values": randn(2, 800)()}, **AUDIO_TF)),
    "data2vec-audio (transformers)": _tf(hf("Data2VecAudioConfig", "Data2VecAudioForSequenceClassification",
                                            lambda: {"input_values": randn(2, 800)()}, **AUDIO_TF)),
    "wavlm (transformers)": _tf(hf("WavLMConfig", "WavLMForSequenceClassification",
                                   lambda: {"input_values": randn(2, 800)()}, num_buckets=16,
                                   max_bucket_distance=32, **AUDIO_TF)),
    "funnel (transformers)": _tf(hf("FunnelConfig", "FunnelForSequenceClassification", token_ids,
                                    vocab_size=1000,
                                    block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128,
                                    num_labels=3)),
    "convbert (transformers)": _tf(hf("ConvBertConfig", "ConvBertForSequenceClassification", token_ids,
                                      embedding_size=32, conv_kernel_size=3, **TEXT_TF)),
    "squeezebert (transformers)": _tf(hf("SqueezeBertConfig", "SqueezeBertForSequenceClassification",
                                         token_ids,
                                         embedding_size=64, **TEXT_TF)),
    "fnet (transformers)": _tf(hf("FNetConfig", "FNetForSequenceClassification",
                                  lambda: token_ids(mask=False),
                                  **{k: v for k, v in TEXT_TF.items() if k != "num_attention_heads"})),
    "xlnet (transformers)": _tf(hf("XLNetConfig", "XLNetForSequenceClassification", token_ids,
                                   vocab_size=1000,
                                   d_model=64, n_layer=2, n_head=4, d_inner=128, num_labels=3)),
    "nystromformer (transformers)": _tf(hf("NystromformerConfig", "NystromformerForSequenceClassification",
                                           lambda: token_ids(mask=False), num_landmarks=4,
                                           segment_means_seq_len=12,
                                           **TEXT_TF)),
    "modernbert (transformers)": _tf(hf("ModernBertConfig", "ModernBertForSequenceClassification", token_ids,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                        sep_token_id=2, local_attention=8, **TEXT_TF)),
    "bart (transformers)": _tf(hf("BartConfig", "BartForSequenceClassification", lambda: ended(token_ids()),
                                  vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128, max_position_embeddings=64, num_labels=3,
                                  embeddings=lambda model: model.model.encoder.embed_tokens)),
    "gpt-neox (transformers)": _tf(causal_lm("GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.25)),
    "gpt-bigcode (transformers)": _tf(hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                                         lambda: token_ids(mask=False),
                                         pick=lambda out: out.logits[:, -1], vocab_size=1000, n_positions=64,
                                         n_embd=64, n_layer=2, n_head=4)),
    "codegen (transformers)": _tf(hf("CodeGenConfig", "CodeGenForCausalLM", lambda: token_ids(mask=False),
                                     pick=lambda out: out.logits[:, -1], vocab_size=1000, n_positions=64,
                                     n_ctx=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
    "biogpt (transformers)": _tf(causal_lm("BioGptConfig", "BioGptForCausalLM", pad_token_id=0)),
    "cohere (transformers)": _tf(causal_lm("CohereConfig", "CohereForCausalLM", pad_token_id=0,
                                           bos_token_id=1,
                                           eos_token_id=2)),
    "starcoder2 (transformers)": _tf(causal_lm("Starcoder2Config", "Starcoder2ForCausalLM",
                                               sliding_window=8)),
    "nemotron (transformers)": _tf(causal_lm("NemotronConfig", "NemotronForCausalLM", head_dim=16,
                                             pad_token_id=0,
                                             bos_token_id=1, eos_token_id=2)),
    "mamba (transformers)": _tf(hf("MambaConfig", "MambaForCausalLM", lambda: token_ids(mask=False),
                                   pick=lambda out: out.logits[:, -1], vocab_size=1000, hidden_size=64,
                                   state_size=8, num_hidden_layers=2)),
    "rwkv (transformers)": _tf(hf("RwkvConfig", "RwkvForCausalLM", lambda: token_ids(mask=False),
                                  pick=lambda out: out.logits[:, -1], vocab_size=1000, hidden_size=64,
                                  attention_hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  context_length=64, use_cache=False)),
    "recurrent gemma (transformers)": _tf(causal_lm("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                                                    head_dim=16, lru_width=64, attention_window_size=8,
                                                    block_types=["recurrent", "attention"],
                                                    num_key_value_heads=1)),
    "swinv2 (transformers)": _tf(hf("Swinv2Config", "Swinv2ForImageClassification", image(), image_size=32,
                                    patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                    window_size=4,
                                    num_labels=10)),
    "convnextv2 (transformers)": _tf(hf("ConvNextV2Config", "ConvNextV2ForImageClassification", image(),
                                        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)),
    "pvt-v2 (transformers)": _tf(hf("PvtV2Config", "PvtV2ForImageClassification", image(), image_size=32,
                                    num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                    hidden_sizes=[16, 32],
                                    patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                    mlp_ratios=[2, 2], num_labels=10)),
    "mobilevitv2 (transformers)": _tf(hf("MobileViTV2Config", "MobileViTV2ForImageClassification", image(64),
                                         image_size=64, width_multiplier=0.25, num_labels=10,
                                         init=torch_init)),
    "bit (transformers)": _tf(hf("BitConfig", "BitForImageClassification", image(), embedding_size=32,
                                 hidden_sizes=[32, 64], depths=[1, 1], num_groups=4, global_padding="SAME",
                                 num_labels=10)),
    "focalnet (transformers)": _tf(hf("FocalNetConfig", "FocalNetForImageClassification", image(),
                                      image_size=32,
                                      patch_size=4, embed_dim=16, depths=[1, 1], focal_levels=[2, 2],
                                      focal_windows=[3, 3], num_labels=10)),
    "ast (transformers)": _tf(hf("ASTConfig", "ASTForAudioClassification",
                                 lambda: {"input_values": randn(2, 32, 16)()}, hidden_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 patch_size=8, frequency_stride=4, time_stride=4, max_length=32,
                                 num_mel_bins=16,
                                 num_labels=4)),
    "unispeech-sat (transformers)": _tf(hf("UniSpeechSatConfig", "UniSpeechSatForSequenceClassification",
                                           lambda: {"input_values": randn(2, 800)()}, **AUDIO_TF)),
    "sew (transformers)": _tf(hf("SEWConfig", "SEWForSequenceClassification",
                                 lambda: {"input_values": randn(2, 800)()}, squeeze_factor=2, **AUDIO_TF)),
    "sew-d (transformers)": _tf(hf("SEWDConfig", "SEWDForSequenceClassification",
                                   lambda: {"input_values": randn(2, 800)()}, squeeze_factor=2,
                                   position_buckets=8, max_position_embeddings=64, **AUDIO_TF)),
    "patchtst (transformers)": _tf(hf("PatchTSTConfig", "PatchTSTForClassification",
                                      lambda: {"past_values": randn(2, 32, 3)()}, num_input_channels=3,
                                      context_length=32, patch_length=8, patch_stride=8, d_model=32,
                                      num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, num_targets=4,
                                      pick=lambda out: out.prediction_logits)),
    "longformer (transformers)": _tf(hf("LongformerConfig", "LongformerForSequenceClassification", token_ids,
                                        attention_window=4, pad_token_id=1, **TEXT_TF)),
    "xlm (transformers)": _tf(hf("XLMConfig", "XLMForSequenceClassification", token_ids, vocab_size=1000,
                                 emb_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=3)),
    "esm (transformers)": _tf(hf("EsmConfig", "EsmForSequenceClassification", token_ids, pad_token_id=1,
                                 mask_token_id=2, position_embedding_type="rotary", **TEXT_TF)),
    "roformer (transformers)": _tf(hf("RoFormerConfig", "RoFormerForSequenceClassification", token_ids,
                                      **TEXT_TF)),
    "bigbird (transformers)": _tf(hf("BigBirdConfig", "BigBirdForSequenceClassification", token_ids,
                                     attention_type="original_full", **TEXT_TF)),
    "ctrl (transformers)": _tf(hf("CTRLConfig", "CTRLLMHeadModel", lambda: token_ids(mask=False),
                                  pick=lambda out: out.logits[:, -1], vocab_size=1000, n_positions=64, n_embd=64,
                                  n_layer=2, n_head=4, dff=128)),
    "mpt (transformers)": _tf(hf("MptConfig", "MptForCausalLM", lambda: token_ids(mask=False),
                                 pick=lambda out: out.logits[:, -1], vocab_size=1000, d_model=64, n_layers=2,
                                 n_heads=4, max_seq_len=64)),
    "persimmon (transformers)": _tf(causal_lm("PersimmonConfig", "PersimmonForCausalLM")),
    "mamba2 (transformers)": _tf(causal_lm("Mamba2Config", "Mamba2ForCausalLM", num_heads=4, head_dim=32,
                                           state_size=16, n_groups=1, expand=2, chunk_size=4)),
    "timesformer (transformers)": _tf(hf("TimesformerConfig", "TimesformerForVideoClassification",
                                         lambda: {"pixel_values": randn(2, 4, 3, 32, 32)()}, image_size=32,
                                         patch_size=8, num_frames=4, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128, num_labels=5)),
    "videomae (transformers)": _tf(hf("VideoMAEConfig", "VideoMAEForVideoClassification",
                                      lambda: {"pixel_values": randn(2, 4, 3, 32, 32)()}, image_size=32,
                                      patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                      num_labels=5)),
    "wav2vec2-conformer (transformers)": _tf(hf("Wav2Vec2ConformerConfig",
                                                "Wav2Vec2ConformerForSequenceClassification",
                                                lambda: {"input_values": randn(2, 1600)()},
                                                position_embeddings_type="rotary", conv_depthwise_kernel_size=7,
                                                **AUDIO_TF)),
    "siglip vision (transformers)": _tf(hf("SiglipVisionConfig", "SiglipVisionModel", image(),
                                           pick=lambda out: out.pooler_output, head=10, patch_size=8,
                                           hidden_size=64, **IMAGE_TF)),
    "swin2sr (transformers)": _tf(hf("Swin2SRConfig", "Swin2SRForImageSuperResolution", image(),
                                     pick=lambda out: out.reconstruction.flatten(1)[:, ::211], image_size=32,
                                     patch_size=1, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                                     upscale=2, upsampler="pixelshuffle")),
    "u-net (torch)": Family(handmade("unet", randn(2, 3, 16, 16)), "torch",
                            region=(1, slice(4, 8), slice(6, 10))),
    "1-d cnn on audio (torch)": Family(handmade("audio-1d-cnn", randn(2, 1, 1600)), "torch"),
    "yolo-style head (torch)": Family(handmade("yolo-head", randn(2, 3, 16, 16)), "torch"),
    "lstm classifier (torch)": Family(handmade("lstm-classifier", randn(2, 7, 8)), "torch"),
    "gru classifier (torch)": Family(handmade("gru-classifier", randn(2, 7, 8)), "torch"),
    "bidirectional gru classifier (torch)": Family(handmade("bigru-classifier", randn(2, 7, 8)), "torch"),
    "lstm regressor (torch)": Family(handmade("lstm-regressor", randn(2, 7, 8)), "torch", targets=(0, 0)),
    "groupnorm cnn (torch)": Family(handmade("groupnorm-cnn", randn(2, 3, 16, 16)), "torch"),
    "fcn head (torch)": Family(handmade("fcn-head", randn(2, 3, 24, 24)), "torch",
                               region=(2, slice(8, 16), slice(8, 16))),
    # timm
    "seresnext26t_32x4d (timm)": Family(timm_model("seresnext26t_32x4d"), "timm"),
    "regnety_002 (timm)": Family(timm_model("regnety_002"), "timm"),
    "mixnet_s (timm)": Family(timm_model("mixnet_s"), "timm"),
    "ghostnet_050 (timm)": Family(timm_model("ghostnet_050"), "timm"),
    "rexnet_100 (timm)": Family(timm_model("rexnet_100"), "timm"),
    "dla46_c (timm)": Family(timm_model("dla46_c"), "timm"),
    "hrnet_w18_small (timm)": Family(timm_model("hrnet_w18_small"), "timm"),
    "cspdarknet53 (timm)": Family(timm_model("cspdarknet53"), "timm"),
    "repvgg_a0 (timm)": Family(timm_model("repvgg_a0"), "timm"),
    "nf_resnet26 (timm)": Family(timm_model("nf_resnet26"), "timm"),
    "inception_v3 (timm)": Family(timm_model("inception_v3", 96), "timm"),
    "convnext_atto (timm)": Family(timm_model("convnext_atto"), "timm", "lrp-transformer"),
    "poolformer_s12 (timm)": Family(timm_model("poolformer_s12"), "timm", "lrp-transformer"),
    "resmlp_12_224 (timm)": Family(timm_model("resmlp_12_224", 224), "timm"),
    "vit_tiny_patch16_224 (timm)": Family(timm_model("vit_tiny_patch16_224", 224), "timm", "lrp-transformer"),
    "deit_tiny_distilled_patch16_224 (timm)": Family(timm_model("deit_tiny_distilled_patch16_224", 224), "timm",
                                                     "lrp-transformer"),
    "swin_tiny_patch4_window7_224 (timm)": Family(timm_model("swin_tiny_patch4_window7_224", 224), "timm",
                                                  "lrp-transformer"),
    "levit_128s (timm)": Family(timm_model("levit_128s", 224), "timm", "lrp-transformer"),
    "pvt_v2_b0 (timm)": Family(timm_model("pvt_v2_b0"), "timm", "lrp-transformer"),
    "maxvit_rmlp_pico_rw_256 (timm)": Family(timm_model("maxvit_rmlp_pico_rw_256", 256), "timm",
                                             "lrp-transformer"),
    "mobilevitv2_050 (timm)": Family(timm_model("mobilevitv2_050"), "timm", "lrp-transformer"),
    "efficientformer_l1 (timm)": Family(timm_model("efficientformer_l1", 224), "timm", "lrp-transformer"),
    "efficientvit_b0 (timm)": Family(timm_model("efficientvit_b0"), "timm", "lrp-transformer"),
    "edgenext_xx_small (timm)": Family(timm_model("edgenext_xx_small"), "timm", "lrp-transformer"),
    "xcit_nano_12_p16_224 (timm)": Family(timm_model("xcit_nano_12_p16_224", 224), "timm", "lrp-transformer"),
    "tresnet_m (timm)": Family(timm_model("tresnet_m"), "timm"),
    "resnest14d (timm)": Family(timm_model("resnest14d"), "timm"),
    "skresnet18 (timm)": Family(timm_model("skresnet18"), "timm"),
    "vgg11 (timm)": Family(timm_model("vgg11"), "timm"),
    "ecaresnet26t (timm)": Family(timm_model("ecaresnet26t"), "timm"),
    "botnet26t_256 (timm)": Family(timm_model("botnet26t_256", 256), "timm", "lrp-transformer"),
    "crossvit_tiny_240 (timm)": Family(timm_model("crossvit_tiny_240", 240), "timm", "lrp-transformer"),
    "cait_xxs24_224 (timm)": Family(timm_model("cait_xxs24_224", 224), "timm", "lrp-transformer"),
    "sequencer2d_s (timm)": Family(timm_model("sequencer2d_s"), "timm", "lrp-transformer"),
}


@dataclass(frozen=True)
class ThirdParty:
    """A real exported model (no torch twin): its file, a batch of 2 and what is explained. A model
    that an ONNX tool makes from another (quantization, onnxruntime's transformer optimizer) has
    ``build(folder) -> (path, feeds)`` instead of a file, the tool as its ``exporter`` and the
    ``library`` it needs."""

    path: Path | None
    shape: tuple
    target: Callable = lambda: [1, 2]
    start: Callable | None = None
    lrp: str = "lrp-epsilon"
    build: Callable | None = None
    exporter: str = "third-party"
    library: str = "onnx"


def _pixel_seed():
    seed = np.zeros((2, 1, 32, 64), np.float32)
    seed[0, 0, 20, 30] = seed[1, 0, 5, 60] = 1.0
    return seed


def _before_sigmoid(proto) -> str:
    return next(n.input[0] for n in proto.graph.node if n.op_type == "Sigmoid")


def _rec_target():
    from rulegraph import Target

    return Target("argmax", at=5)


def _qdq_digits_cnn(folder: Path):
    """The bundled digits CNN quantized to int8 QDQ by ``onnxruntime.quantization.quantize_static``,
    calibrated on the bundled digits."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    digits = np.load(ROOT / "models" / "digits_sample.npz")["x"]

    class Digits(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{"input": digits[i:i + 1]} for i in range(len(digits))])

        def get_next(self):
            return next(self.rows, None)

    path = folder / "digits_cnn_qdq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(ROOT / "models" / "digits_cnn.onnx"), str(path), Digits(),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)
    return path, {"input": digits[:2]}


def _optimized_bert(folder: Path):
    """A 2-layer BERT (random weights) exported by torch, then fused by onnxruntime's transformer
    optimizer into its contrib ops (SkipLayerNormalization, FastGelu, ...)."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    exported, optimized = folder / "bert.onnx", folder / "bert_optimized.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, mask), str(exported), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask")})
        optimize_model(str(exported), model_type="bert", num_heads=4, hidden_size=64,
                       opt_level=0).save_model_to_file(str(optimized))
    return optimized, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


DATA = ROOT / "tests" / "data"
SHARED = ROOT.parent / "shared" / "models"   # ../shared/models beside the checkout
THIRD_PARTY = {
    "mnist-8 (ONNX model zoo)": ThirdParty(DATA / "mnist-8.onnx", (2, 1, 28, 28)),
    "resnet20 cifar10": ThirdParty(DATA / "resnet20_cifar10.onnx", (2, 3, 32, 32)),
    "squeezenet1.1 (ONNX model zoo)": ThirdParty(SHARED / "squeezenet1.1_fp32.onnx", (2, 3, 224, 224)),
    "PP-OCRv4 text detector": ThirdParty(DATA / "ppocr" / "ch_PP-OCRv4_det_infer.onnx", (2, 3, 32, 64),
                                         target=_pixel_seed, start=_before_sigmoid),
    "PP-OCRv4 recogniser": ThirdParty(DATA / "ppocr" / "ch_PP-OCRv4_rec_infer.onnx", (2, 3, 48, 80),
                                      target=_rec_target, lrp="lrp-transformer"),
    "PP-OCR direction classifier": ThirdParty(DATA / "ppocr" / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                                              (2, 3, 48, 192), target=lambda: [0, 1]),
    "digits CNN int8 QDQ": ThirdParty(None, (), build=_qdq_digits_cnn, exporter="quantize_static",
                                       library="onnxruntime"),
    "BERT optimized (onnxruntime)": ThirdParty(
        None, (), target=lambda: [0, 2], lrp="lrp-transformer", build=_optimized_bert,
        exporter="optimize_model", library="transformers"),
}

def logits_module(net, n_inputs: int):
    """``net`` with named positional inputs a (, b, c) for the exporters."""
    import torch

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, a):
            return self.net(a)

    class Two(One):
        def forward(self, a, b):
            return self.net(a, b)

    class Three(One):   # an encoder-decoder: ids, their mask, the decoder's ids
        def forward(self, a, b, c):
            return self.net(a, b, c)

    return {1: One, 2: Two, 3: Three}[n_inputs]().eval()


def export(net, inputs: dict, path: Path, dynamo: bool) -> None:
    import torch

    names = list(inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        kwargs = {"dynamo": dynamo, "input_names": names, "output_names": ["logits"]}
        if dynamo:
            kwargs["opset_version"] = 18
            batch = torch.export.Dim("batch", min=1, max=64)
            kwargs["dynamic_shapes"] = {arg: {0: batch} for arg in "abc"[: len(names)]}
            kwargs["external_data"] = False
        else:
            kwargs["opset_version"] = 17
            kwargs["dynamic_axes"] = {k: {0: "batch"} for k in names + ["logits"]}
        torch.onnx.export(logits_module(net, len(names)), tuple(inputs.values()), str(path), **kwargs)


def runs_in_onnxruntime(path: Path, feeds: dict) -> None:
    """The exported model's own forward in onnxruntime (raises where the exporter wrote an invalid
    model: the legacy export of Mamba gives Tile a 2-D ``repeats``)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def float64_twin(net, inputs: dict, embeddings):
    """A float64 copy of ``net``, its float inputs in float64, and the copy's embeddings module: the
    same target's gradient without float32 rounding (where a ReLU mask flips, the two differ)."""
    import torch

    memo: dict = {}
    drop_caches(net)
    net.train().eval()   # drops what modules cache in eval mode (LeViT's attention biases: not leaves)
    for module in net.modules():   # state a forward leaves behind (RecurrentGemma's recurrent_states)
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, key, value.detach())
    twin = copy.deepcopy(net, memo).double()
    doubled = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    return twin, doubled, None if embeddings is None else memo[id(embeddings)]


def drop_caches(net) -> None:
    """Empty the dicts of tensors a module computed from its parameters in a forward (timm's LeViT
    caches its attention biases in eval mode): they cannot be deep-copied, and a float64 copy must
    compute them again in float64."""
    for module in net.modules():
        for value in vars(module).values():
            if isinstance(value, dict) and value and all(getattr(t, "grad_fn", None) is not None
                                                         for t in value.values()):
                value.clear()


def autograd_gradient(net, inputs: dict, embeddings, targets):
    """(input name, what the `gradient` file should give for it): the saliency of a float input, or
    for token ids (no float input) Σ_e emb ⊙ ∂y/∂emb at the input embeddings' output. ``targets``:
    one class per row, or a seed shaped like the output."""
    import torch

    if isinstance(targets, np.ndarray):
        seed = torch.as_tensor(targets)
        rows = slice(None)
        picked_net = net
        net = lambda *args: picked_net(*args) * seed  # noqa: E731
    else:
        rows = torch.arange(len(targets)), torch.as_tensor(targets)
    if embeddings is not None:
        captured = {}

        def keep(module, args, output):
            output.retain_grad()
            captured["emb"] = output

        handle = embeddings.register_forward_hook(keep)
        try:
            net(*inputs.values())[rows].sum().backward()
        finally:
            handle.remove()
        emb, ids = captured["emb"], next(iter(inputs.values()))
        per_token = (emb * emb.grad).sum(-1).detach()
        if per_token.shape != ids.shape and per_token.T.shape == ids.shape:   # XLNet looks up time-major
            per_token = per_token.T
        return next(iter(inputs)), per_token.numpy()
    float_name = next(k for k, v in inputs.items() if v.is_floating_point())
    x = inputs[float_name].clone().requires_grad_(True)
    net(*[x if k == float_name else v for k, v in inputs.items()])[rows].sum().backward()
    return float_name, x.grad.numpy()


#: the note of a row whose gradient column compares ∂y/∂emb (``scale_invariant_tokens``)
SCALE_INVARIANT = ("gradient column: ∂y/∂emb at the token embeddings, which enter a LayerNorm directly "
                   "(there gradient × input per token is 0)")


def scale_invariant_tokens(net, inputs: dict, embeddings, targets, always: bool = False):
    """∂y/∂emb at the token embeddings [N, T, E] where they enter a LayerNorm directly (Funnel,
    ModernBERT): a LayerNorm is scale-invariant, so Σ_e emb ⊙ ∂y/∂emb = 0 for every token and the
    per-token gradient × input is float rounding on both sides. Detected as every per-token sum under
    1e-4 of the largest Σ_e |emb ⊙ ∂y/∂emb| (BLOOM's LayerNorm ε keeps its sums at a few percent:
    not caught); None elsewhere. ``always``: the gradient whatever the sums."""
    if embeddings is None:
        return None
    import torch

    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["emb"] = output

    rows = (torch.arange(len(targets)), torch.as_tensor(targets))
    handle = embeddings.register_forward_hook(keep)
    try:
        net(*inputs.values())[rows].sum().backward()
    finally:
        handle.remove()
    emb, grad = captured["emb"].detach(), captured["emb"].grad
    terms = (emb * grad).double()
    if always or terms.sum(-1).abs().max() < 1e-4 * terms.abs().sum(-1).max():
        return grad.numpy()
    return None


STAGES = ("build", "export", "gradient", "float64 autograd", "lrp-epsilon", "lrp-transformer")


def failure(stage: str, exc: BaseException) -> str:
    """What failed and why, in one short phrase."""
    lines = [line.strip() for line in str(exc).strip().splitlines()] or [""]
    detail = f" {lines[1][:90]}" if len(lines) > 1 else ""
    return f"{stage}: {type(exc).__name__}: {lines[0][:110]}{detail}"


def row(name: str, family: Family, dynamo: bool) -> dict:
    """One table row; the explainers of a row go before the next (vgg11's weights are 0.5 GB)."""
    import gc

    try:
        return _row(name, family, dynamo)
    finally:
        gc.collect()


def _row(name: str, family: Family, dynamo: bool) -> dict:
    import onnx

    net, inputs, embeddings = family.build()
    out = {"architecture": name, "exporter": "dynamo" if dynamo else "torchscript", "fails": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            export(net, inputs, path, dynamo)
        except Exception as exc:  # noqa: BLE001 (an exporter failure is a result, not a crash)
            out["fails"].append(failure("export", exc))
            return out
        proto = onnx.load(str(path))
        out["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        out["nodes"] = len(proto.graph.node)
        feeds = {k: v.numpy() for k, v in inputs.items()}
        try:
            runs_in_onnxruntime(path, feeds)
        except Exception as exc:  # noqa: BLE001 (an invalid export is a result, not a crash)
            prefix = r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Non-zero status code returned while )?"
            why = re.sub(prefix, "", str(exc))
            out["fails"].append(f"export: the exported model does not run in onnxruntime: {why[:160]}")
            return out
        targets, explained = family.target(net, inputs), family.explained(net, inputs)
        try:
            name_in, expected = autograd_gradient(net, inputs, embeddings, targets)
            raw = scale_invariant_tokens(net, inputs, embeddings, targets)
            gradient = Explainer(path, "gradient")
            if raw is None:
                result = gradient.explain(feeds, target=explained)
                got = result.saliency.get(name_in, result.attribution.get(name_in))
            else:
                lookup = next(o for o, i in gradient.graph.sources.items() if i == name_in)
                got, expected = gradient.explain(feeds, target=explained, at=lookup).at_numbers[lookup], raw
                out["fails"].append(SCALE_INVARIANT)
            out["gradient_error"] = float(np.abs(got - expected).max() / np.abs(expected).max())
            del gradient
        except Exception as exc:  # noqa: BLE001 (a failure is a row of the table)
            out["fails"].append(failure("gradient", exc))
        else:
            try:
                twin = float64_twin(net, inputs, embeddings)
                exact = autograd_gradient(*twin, targets)[1] if raw is None else scale_invariant_tokens(
                    *twin, targets, always=True)
                out["gradient_error64"] = float(np.abs(got - exact).max() / np.abs(exact).max())
            except Exception as exc:  # noqa: BLE001 (a failure is a row of the table)
                out["fails"].append(failure("float64 autograd", exc))
        lrp_row(out, path, family.lrp, feeds, explained, None)
    return out


def lrp_row(out: dict, path: Path, rules: str, feeds: dict, target, start) -> None:
    """The LRP columns of a row: rules on the path, conservation, and the same at ε = 0."""
    try:
        lrp = Explainer(path, rules, start=start)
        first = find_start(lrp.graph, lrp.ruleset, None, start)
        kinds = Counter(a.binding.rule.name if a.binding else "none"
                        for a in assign(lrp.graph, lrp.ruleset, path_nodes(lrp.graph, first)))
        out["rules"] = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = lrp.explain(feeds, target=target)
            out["conservation"] = float(np.abs(result.relative_delta).max())
            out["logit"] = float(np.abs(result.start_value).min())
            del lrp, result
            exact = Explainer(path, without_eps(rules == "lrp-transformer"), start=start)
            out["conservation_eps0"] = float(np.abs(exact.explain(feeds, target=target).relative_delta).max())
            if out["conservation_eps0"] > 1e-3:
                out["fails"].append(leak(exact, feeds, target))
    except Exception as exc:  # noqa: BLE001 (a failure is a row of the table)
        out["fails"].append(failure(rules, exc))


def leak(explainer, feeds, target) -> str:
    """Where an LRP file at ε = 0 does not conserve: the node whose relevance in and out differ most
    (its bias shares counted), from the per-node sums of one run."""
    sums = explainer.explain(feeds, target=target, node_sums=True).node_sums
    ops = {n.name: n.op_type for n in explainer.graph.nodes}
    gaps = {node: float(np.abs(o - i - (0 if b is None else b)).max())
            for node, (i, o, b) in sums.items() if i is not None and o is not None}
    node = max(gaps, key=gaps.get)
    where = f"{ops.get(node, '?')} node '{node}'"
    return f"LRP leaks at ε = 0: most at {where} (Σ out − Σ in = {gaps[node]:.2g})"


def third_party_row(name: str, model: ThirdParty) -> dict:
    """A real exported model, or one an ONNX tool made (``ThirdParty.build``): no torch twin, so the
    gradient column is "—" (the gradient file is still run; a failure of it is recorded); LRP file
    `lrp-epsilon` (`lrp-transformer` for the recogniser, an SVTR with LayerNorm and attention, and
    the optimized BERT)."""
    import onnx

    out = {"architecture": name, "exporter": model.exporter, "fails": [], "gradient_error": "—",
           "gradient_error64": "—"}
    folder = tempfile.TemporaryDirectory()
    if model.build is not None:
        path, feeds = model.build(Path(folder.name))
    else:
        path = model.path
        if not path.exists():
            raise ImportError(f"{path} is not here")
        feeds = np.random.default_rng(0).standard_normal(model.shape).astype(np.float32)
    proto = onnx.load(str(path))
    out["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    out["nodes"] = len(proto.graph.node)
    start = model.start(proto) if model.start else None
    try:
        Explainer(proto, "gradient", start=start).explain(feeds, target=model.target())
    except Exception as exc:  # noqa: BLE001 (a failure is a row of the table)
        out["fails"].append(failure("gradient", exc))
    lrp_row(out, proto, model.lrp, feeds, model.target(), start)
    return out

def without_eps(transformer: bool):
    """The LRP file with every ε set to 0 (LRP-0): what is left of a leak is float rounding."""
    from rulegraph.run import rulefiles as dsl

    if not transformer:
        return "lrp-0"
    return dsl.parse('rulegraph 1\ninclude "lrp-transformer"\nlinear -> normalized(eps = 0)\n'
                     "bilinear -> uniform(eps = 0, softmax_constant = 1, gate_constant = 1, "
                     "norm_constant = 1, exp_constant = 1)\n"
                     "LayerNormalization -> layernorm_linear(eps = 0)\nSoftmax -> softmax_taylor(eps = 0)\n",
                     source="lrp-transformer-eps0.rules")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.1e}"
    return str(value) if value is not None else "–"


COLUMNS = ("architecture", "exporter", "opset", "nodes", "rules on the path (LRP file)",
           "gradient vs autograd", "gradient vs float64 autograd",
           "LRP conservation", "same at ε = 0", "smallest \\|logit\\|", "what fails (why)", "measured with")
KEYS = ("architecture", "exporter", "opset", "nodes", "rules", "gradient_error", "gradient_error64",
        "conservation", "conservation_eps0", "logit", "fails", "measured")


def merged(fails: list[str]) -> str:
    """The failures of a row, one per cause: stages failing the same way share it ("gradient,
    lrp-epsilon: TargetError: ...")."""
    stages: dict[str, list[str]] = {}
    for fail in fails:
        stage, _, why = fail.partition(": ") if fail.split(":")[0] in STAGES else ("", "", fail)
        stages.setdefault(why, []).append(stage)
    return "; ".join(", ".join(s for s in names if s) + (": " if any(names) else "") + why
                     for why, names in stages.items())


def cells(r: dict) -> list[str]:
    values = dict(r, fails=merged(r.get("fails", [])).replace("|", "\\|") or "–")
    return [fmt(values.get(k)) for k in KEYS]


def table(rows: list) -> str:
    """Rows are dicts (measured now) or lists of cells (kept from the README)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r if isinstance(r, list) else cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def measured_with(library: str) -> str:
    import importlib
    import onnxruntime

    modules = ("onnx",) if library in ("onnx", "onnxruntime") else dict.fromkeys(("torch", library))
    versions = [f"{m} {importlib.import_module(m).__version__}" for m in modules]
    return f"{date.today().isoformat()}, " + ", ".join(versions + [f"onnxruntime {onnxruntime.__version__}"])


#: what the README rows from before the "measured with" column were measured with (commit d5d0b36)
KEPT = "; kept: not installed here"
LEGACY = "2026-11-22, torchvision (version not recorded)" + KEPT


def readme_rows(readme: str) -> list[dict]:
    """The rows of the README's table, as {column: cell} (any earlier column layout)."""
    begin, end = readme.index(MARK_BEGIN) + len(MARK_BEGIN), readme.index(MARK_END)
    lines = [line for line in readme[begin:end].strip().splitlines() if line.startswith("|")]
    if not lines:
        return []
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # noqa: E731
    return [dict(zip(split(lines[0]), split(line))) for line in lines[2:]]


def kept_rows(readme: str, name: str, library_missing: bool = True) -> list[list[str]]:
    """The README's rows of ``name`` in the current column layout; for a library missing here, the
    "measured with" cell says so."""
    kept = []
    for old in readme_rows(readme):
        if old.get("architecture") != name:
            continue
        new = [old.get(c, "–") for c in COLUMNS]
        measured = old.get("measured with", LEGACY)
        new[-1] = measured if measured.endswith(KEPT) or not library_missing else measured + KEPT
        kept.append(new)
    return kept


def library_of(family) -> str:
    return family.library


def selected(everything: dict, only: str | None, library: str | None) -> list[str]:
    """The rows measured: ``only``'s names (comma-separated), else all, kept to ``library``'s rows."""
    names = only.split(",") if only else list(everything)
    return [n for n in names if not library or library_of(everything[n]) in library.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architecture names")
    parser.add_argument("--library", help="comma-separated libraries whose rows are measured (torchvision, "
                        "timm, transformers, torch, onnx for the third-party models)")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    everything = {**ARCHITECTURES, **THIRD_PARTY}
    names = selected(everything, args.only, args.library)
    readme = ROOT / "README.md"
    rows = []
    for name in everything if (args.only or args.library) and args.write_readme else names:
        if name not in names:   # --only with --write-readme: the other rows stay as they are
            rows += kept_rows(readme.read_text(), name, library_missing=False)
            continue
        family = everything[name]
        library = library_of(family)
        try:
            importlib.import_module(library)
        except ImportError as exc:
            kept = kept_rows(readme.read_text(), name)
            print(f"{name}: {exc}; {len(kept)} rows kept from the README", file=sys.stderr)
            rows += kept
            continue
        for dynamo in (False, True) if isinstance(family, Family) else (None,):
            started = time.perf_counter()
            try:
                if dynamo is None:
                    measured = third_party_row(name, family)
                else:
                    measured = row(name, family, dynamo)
            except ImportError as exc:
                print(f"{name}: skipped ({exc})", file=sys.stderr)
                break
            except Exception as exc:  # noqa: BLE001 (a failure is a row of the table)
                measured = {"architecture": name, "exporter": "dynamo" if dynamo else "torchscript",
                            "fails": [failure("build", exc)]}
            measured["measured"] = measured_with(library)
            rows.append(measured)
            print(f"{time.perf_counter() - started:.0f} s", rows[-1], file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.write_readme:
        content = readme.read_text()
        begin, end = content.index(MARK_BEGIN) + len(MARK_BEGIN), content.index(MARK_END)
        readme.write_text(content[:begin] + "\n" + text + "\n" + content[end:])


if __name__ == "__main__":
    main()
