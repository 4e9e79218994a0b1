"""rulegraph beside Zennit, Captum and torch autograd on the same model, batch and CPU threads.

One interleaved run per model (each round calls every contender once, so machine load hits all
alike), after a warm-up; medians in milliseconds and the ratio to the onnxruntime forward pass.
rulegraph runs its compiled explainer (forward + relevance pass in one onnxruntime session);
the others run the torch model the ONNX file was exported from.

    python benchmarks/compare.py [--models resnet18,vgg16,bert] [--threads 2] [--batch 8] [--repeat 5]

Needs torch and captum (the [crosscheck] extra), transformers for the BERT row, zennit for its rows
(printed as missing otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rulegraph import Explainer

CNN_RULES = ["gradient", "lrp-epsilon", "lrp-composite"]
TOKEN_RULES = ["gradient", "lrp-transformer"]


def vgg16():
    """VGG-16 (configuration D, Simonyan & Zisserman 2015) without torchvision, random weights."""
    import torch
    from torch import nn

    layers, channels = [], 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    torch.manual_seed(0)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(512 * 49, 4096), nn.ReLU(),
                         nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000)).eval()


def image_model(name: str, batch: int):
    import torch

    if name == "resnet18":
        from resnet import resnet18

        torch.manual_seed(0)
        net = resnet18().eval()
    else:
        net = vgg16()
    return net, torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def export(net, x, path: Path) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False, opset_version=17)


def interleaved(fns: dict, repeat: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cnn_contenders(name: str, batch: int, threads: int, folder: Path) -> dict:
    import torch
    from captum.attr import IntegratedGradients, LRP, Saliency

    net, x = image_model(name, batch)
    path = folder / f"{name}.onnx"
    export(net, x, path)
    xs, target = x.numpy(), [0] * batch
    out: dict = {}
    for rules in CNN_RULES:
        explainer = Explainer(path, rules, providers=["CPUExecutionProvider"], threads=threads)
        out[f"rulegraph {rules}"] = lambda e=explainer: e.explain(xs, target=target, max_amplification=None)
    forward = Explainer(path, "gradient", providers=["CPUExecutionProvider"], threads=threads)
    out = {"onnxruntime forward": lambda: forward.forward(xs), **out}

    def autograd():
        xi = x.clone().requires_grad_(True)
        net(xi)[:, 0].sum().backward()

    out["torch autograd"] = autograd
    out["captum Saliency"] = lambda: Saliency(net).attribute(x, target=0)
    out["captum LRP"] = lambda: LRP(net).attribute(x, target=0)
    ig = IntegratedGradients(net)
    out["captum IG-32"] = lambda: ig.attribute(x, target=0, n_steps=32, internal_batch_size=batch)
    try:
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

        eye = torch.eye(1000)[[0] * batch]
        for label, composite in (("zennit EpsilonPlusFlat", EpsilonPlusFlat()),
                                 ("zennit EpsilonGammaBox", EpsilonGammaBox(low=-3.0, high=3.0))):
            def zennit(composite=composite):
                with Gradient(net, composite) as attributor:
                    attributor(x, eye)
            out[label] = zennit
    except ImportError:
        print("(zennit not installed: no Zennit rows)")
    return out


def bert_contenders(batch: int, threads: int, folder: Path) -> dict:
    import torch
    from captum.attr import LayerIntegratedGradients
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)   # a BERT-base-shaped encoder (12 layers, 768 wide), random weights, 64 tokens
    net = BertForSequenceClassification(BertConfig(num_labels=3)).eval()
    ids = torch.randint(5, 30000, (batch, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    path = folder / "bert.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes={"input_ids": {0: "N"}, "attention_mask": {0: "N"}, "logits": {0: "N"}})
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    forward = Explainer(path, "gradient", providers=["CPUExecutionProvider"], threads=threads)
    out: dict = {"onnxruntime forward": lambda: forward.forward(feeds)}
    for rules in TOKEN_RULES:
        explainer = Explainer(path, rules, providers=["CPUExecutionProvider"], threads=threads)
        out[f"rulegraph {rules}"] = lambda e=explainer: e.explain(feeds, target=0, max_amplification=None)
    embeddings = net.get_input_embeddings()

    def logits(i, m):
        return net(input_ids=i, attention_mask=m).logits

    def autograd():
        captured = {}
        handle = embeddings.register_forward_hook(lambda mod, inp, o: captured.setdefault("e", o))
        try:
            out_ = logits(ids, mask)
            torch.autograd.grad(out_[:, 0].sum(), captured["e"])
        finally:
            handle.remove()

    out["torch autograd"] = autograd
    lig = LayerIntegratedGradients(logits, embeddings)
    out["captum LayerIG-32"] = lambda: lig.attribute(ids, additional_forward_args=(mask,), target=0, n_steps=32,
                                                     internal_batch_size=batch)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,bert")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            contenders = (bert_contenders(args.batch, args.threads, Path(tmp)) if name == "bert"
                          else cnn_contenders(name, args.batch, args.threads, Path(tmp)))
            times = interleaved(contenders, args.repeat)
            base = times["onnxruntime forward"]
            print(f"\n{name}, batch {args.batch}, {args.threads} threads (median of {args.repeat}, interleaved)")
            print(f"{'contender':<26} {'ms':>10} {'/ forward':>10}")
            for label, seconds in times.items():
                print(f"{label:<26} {seconds * 1e3:10.1f} {seconds / base:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
