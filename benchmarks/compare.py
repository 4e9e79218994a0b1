"""rulegraph beside Zennit, Captum and torch autograd on the same model, batch and CPU threads.

Interleaved runs (each round calls every contender once, so machine load hits all alike), after a
warm-up; medians in milliseconds and the ratio to the onnxruntime forward pass. On the CNNs the
contenders run in groups (``CNN_GROUPS``: a rulegraph row beside the references computing the same
thing), each group interleaved with the forward and its ratios taken to that forward, one group's
models in memory at a time. The forward is a plain onnxruntime session on the exported file;
rulegraph runs its compiled explainer (forward + relevance pass in one onnxruntime session; the
whole ``explain()`` call); the others run the torch model the ONNX file was exported from.

Pairs computing the same thing (same rules, same batch, same threads) are printed as "rulegraph is
N× faster": LRP-ε against Zennit's ε composite (Epsilon on every linear layer, Norm on sums and
average pooling), ``lrp-composite`` against Zennit's EpsilonPlusFlat, ``epsilon-gamma-box.rules``
against Zennit's EpsilonGammaBox(-3, 3) and integrated gradients (32 Gauss-Legendre points, one
run per row: 34 images) against Captum's IG with 32 steps (internal batch = the batch). Zennit
runs as its documented use, ``with Gradient(model, composite)`` per call, with ``ResNetCanonizer`` on ResNet-18
(BatchNorm merged into the convolutions, as the exporter folds it for rulegraph).

``--peak-rss`` also measures each contender's peak resident memory in a process of its own (so
peaks do not mix): the process peak (imports, model, compile, the calls) and the peak while
calling (after setup; ``/proc/self/clear_refs``), each contender called twice at the same batch.

    python benchmarks/compare.py [--models resnet18,vgg16,bert] [--threads 2] [--batch 8] [--repeat 5]
                                 [--peak-rss | --peak-rss-only] [--skip "captum,rulegraph IG"]

Needs torch and captum (the [crosscheck] extra), transformers for the BERT row, zennit for its rows
(``pip install --no-deps zennit==0.5.1``; printed as missing otherwise). Zennit 0.5.1 has no rules
for attention or LayerNorm, so BERT has no Zennit rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rulegraph import Explainer
from rulegraph.run import runtime

GAMMA_BOX_RULES = ROOT / "benchmarks" / "epsilon-gamma-box.rules"
IG_STEPS = 32
#: rulegraph's rule file for each CNN row (a bundled name or a path)
CNN_RULES = {"gradient": "gradient", "lrp-epsilon": "lrp-epsilon", "lrp-composite": "lrp-composite",
             "epsilon-gamma-box": str(GAMMA_BOX_RULES)}
TOKEN_RULES = ["gradient", "lrp-transformer"]
#: (rulegraph row, the reference row computing the same thing, the issue's target speed-up or None)
SAME_THING = [("rulegraph lrp-epsilon", "zennit Epsilon", 3.0),
              ("rulegraph lrp-composite", "zennit EpsilonPlusFlat", None),
              ("rulegraph epsilon-gamma-box", "zennit EpsilonGammaBox", 5.0),
              (f"rulegraph IG-{IG_STEPS}", f"captum IG-{IG_STEPS}", 3.0)]
#: contenders timed together, each group interleaved beside the onnxruntime forward; one group lives
#: at a time (one rulegraph explainer: VGG-16 at batch 8 holds about 6 GB)
CNN_GROUPS = [["rulegraph gradient", "torch autograd", "captum Saliency"],
              ["rulegraph lrp-epsilon", "zennit Epsilon", "captum LRP"],
              ["rulegraph lrp-composite", "zennit EpsilonPlusFlat"],
              ["rulegraph epsilon-gamma-box", "zennit EpsilonGammaBox"],
              [f"rulegraph IG-{IG_STEPS}", f"captum IG-{IG_STEPS}"]]
#: integrated gradients on these only: a loop batch of 34 VGG-16 images does not fit a shared 23 GB machine
IG_MODELS = ("resnet18",)
#: contenders whose peak memory ``--peak-rss`` measures (rulegraph / Zennit is the issue's ratio, ≤ 0.5)
PEAK_ROWS = ["onnxruntime forward", "rulegraph lrp-epsilon", "rulegraph lrp-composite",
             "rulegraph epsilon-gamma-box", "torch autograd", "zennit Epsilon", "zennit EpsilonPlusFlat",
             "zennit EpsilonGammaBox"]


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


class ImageSetup:
    """A CNN's files in ``folder`` (ONNX export and input batch, written by :meth:`write`) and its
    torch model, each made on first use: a process measuring one rulegraph contender imports no torch."""

    def __init__(self, name: str, batch: int, threads: int, folder: Path):
        self.name, self.batch, self.threads, self.folder = name, batch, threads, folder
        self.path = folder / f"{name}.onnx"
        self.input_path = folder / f"{name}-b{batch}.npy"

    @cached_property
    def net(self):
        import torch

        torch.set_num_threads(self.threads)
        if self.name == "resnet18":
            from resnet import resnet18

            return resnet18()
        if self.name == "vgg16":
            return vgg16()
        raise SystemExit(f"unknown image model {self.name!r}: resnet18 or vgg16")

    @cached_property
    def xs(self) -> np.ndarray:
        return np.load(self.input_path)

    @cached_property
    def x(self):
        import torch

        return torch.from_numpy(self.xs)

    def write(self) -> None:
        import torch

        x = torch.randn(self.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        np.save(self.input_path, x.numpy())
        export(self.net, x, self.path)


def cnn_builders(s: ImageSetup) -> dict:
    """label -> a function that builds the contender (a function of no arguments) on ``s``."""
    target = [0] * s.batch

    def rulegraph_pass(rules):
        explainer = Explainer(s.path, rules, providers=["CPUExecutionProvider"], threads=s.threads)
        return lambda: explainer.explain(s.xs, target=target, max_amplification=None)

    def rulegraph_ig():
        explainer = Explainer(s.path, "integrated-gradients", providers=["CPUExecutionProvider"],
                              threads=s.threads)

        def run():  # row by row: a loop batch of IG_STEPS + 2 images (Captum: internal batch = the batch)
            for i in range(s.batch):
                explainer.explain(s.xs[i:i + 1], target=target[:1], loop="integrated_gradients",
                                  steps=IG_STEPS)
        return run

    def forward():
        import onnx

        model = onnx.load(str(s.path)).SerializeToString()
        session = runtime.session(model, ["CPUExecutionProvider"], s.threads)
        return lambda: session.run(None, {"input": s.xs})

    def autograd():
        def run():
            xi = s.x.clone().requires_grad_(True)
            s.net(xi)[:, 0].sum().backward()
        return run

    def captum(kind):
        from captum.attr import LRP, IntegratedGradients, Saliency

        net, x = s.net, s.x
        if kind == "Saliency":
            return lambda: Saliency(net).attribute(x, target=0)
        if kind == "LRP":
            return lambda: LRP(net).attribute(x, target=0)
        ig = IntegratedGradients(net)
        return lambda: ig.attribute(x, target=0, n_steps=IG_STEPS, internal_batch_size=s.batch)

    def zennit(kind):
        import torch
        from resnet import BasicBlock
        from zennit_shim import composite, load_zennit

        zennit = load_zennit(basic=(BasicBlock,))
        canonizers = [zennit.torchvision.ResNetCanonizer()] if s.name == "resnet18" else []
        rules = composite(kind, canonizers)
        net, x, onehot = s.net, s.x, torch.eye(1000)[target]

        def run():
            with zennit.attribution.Gradient(net, rules) as attributor:
                attributor(x, onehot)
        return run

    builders = {"onnxruntime forward": forward}
    builders.update({f"rulegraph {label}": (lambda rules=rules: rulegraph_pass(rules))
                     for label, rules in CNN_RULES.items()})
    builders[f"rulegraph IG-{IG_STEPS}"] = rulegraph_ig
    builders["torch autograd"] = autograd
    for kind in ("Saliency", "LRP", f"IG-{IG_STEPS}"):
        builders[f"captum {kind}"] = lambda kind=kind: captum(kind)
    for kind in ("Epsilon", "EpsilonPlusFlat", "EpsilonGammaBox"):
        builders[f"zennit {kind}"] = lambda kind=kind: zennit(kind)
    return builders


def have_zennit() -> bool:
    import importlib.util

    return importlib.util.find_spec("zennit") is not None


def cnn_times(name: str, batch: int, threads: int, folder: Path, repeat: int,
              skip: tuple[str, ...] = ()) -> dict[str, tuple[float, float]]:
    """label -> (median seconds, / the forward of its group), group by group (CNN_GROUPS)."""
    setup = ImageSetup(name, batch, threads, folder)
    setup.write()
    builders = cnn_builders(setup)
    if not have_zennit():
        print("(zennit not installed: no Zennit rows; pip install --no-deps zennit==0.5.1)")
        skip += ("zennit",)
    if name not in IG_MODELS:
        print(f"({name}: no integrated-gradients rows, see IG_MODELS)")
        skip += ("rulegraph IG", "captum IG")
    forward = builders["onnxruntime forward"]()
    out, forwards = {}, []
    for group in CNN_GROUPS:
        fns = {label: builders[label]() for label in group if not label.startswith(skip)}
        if not fns:
            continue
        times = interleaved({"onnxruntime forward": forward, **fns}, repeat)
        forwards.append(times["onnxruntime forward"])
        out.update({label: (times[label], times[label] / times["onnxruntime forward"]) for label in fns})
        del fns
        gc.collect()
    return {"onnxruntime forward": (statistics.median(forwards), 1.0), **out}


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
    print("(bert: Zennit 0.5.1 has no rules for attention or LayerNorm: no Zennit rows)")
    return out


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_child(label: str, name: str, batch: int, threads: int, folder: Path) -> None:
    """In a process of its own: build one contender, reset the peak, call it twice; print JSON.
    Peaks are the kernel's VmHWM of this process (``ru_maxrss`` carries the parent's across exec)."""
    warnings.simplefilter("ignore")
    fn = cnn_builders(ImageSetup(name, batch, threads, folder))[label]()
    setup_peak = _vm_hwm_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
        reset = True
    except OSError:
        reset = False
    fn()
    fn()
    peak = _vm_hwm_mb()
    print(json.dumps({"process_peak_mb": max(setup_peak, peak), "setup_peak_mb": setup_peak,
                      "calling_peak_mb": peak if reset else None}))


def peak_rss(name: str, batch: int, threads: int, folder: Path) -> dict[str, dict]:
    rows = [r for r in PEAK_ROWS if have_zennit() or not r.startswith("zennit")]
    out = {}
    for label in rows:
        done = subprocess.run([sys.executable, __file__, "--peak-child", label, "--models", name, "--batch",
                               str(batch), "--threads", str(threads), "--folder", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"({label}: its peak-RSS process failed: {done.stderr.strip().splitlines()[-1:]})")
            continue
        out[label] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def print_peaks(peaks: dict[str, dict]) -> None:
    print(f"{'contender (own process)':<30} {'process peak MB':>16} {'peak calling MB':>16}")
    for label, p in peaks.items():
        calling = "n/a" if p["calling_peak_mb"] is None else f"{p['calling_peak_mb']:.0f}"
        print(f"{label:<30} {p['process_peak_mb']:16.0f} {calling:>16}")
    for ours, theirs, _ in SAME_THING:
        if ours in peaks and theirs in peaks:
            a, b = peaks[ours], peaks[theirs]
            calling = ("" if a["calling_peak_mb"] is None or b["calling_peak_mb"] is None
                       else f", calling {a['calling_peak_mb'] / b['calling_peak_mb']:.2f}")
            print(f"peak RSS {ours} / {theirs}: process {a['process_peak_mb'] / b['process_peak_mb']:.2f}"
                  f"{calling} (target <= 0.5)")


def print_times(name: str, rows: dict[str, tuple[float, float]], batch: int, threads: int,
                repeat: int) -> None:
    print(f"\n{name}, batch {batch}, {threads} threads (median of {repeat}, interleaved with the forward)")
    print(f"{'contender':<30} {'ms':>10} {'/ forward':>10}")
    for label, (seconds, ratio) in rows.items():
        print(f"{label:<30} {seconds * 1e3:10.1f} {ratio:10.2f}")
    for ours, theirs, target in SAME_THING:
        if ours in rows and theirs in rows:
            goal = "" if target is None else f" (target >= {target:g}x)"
            print(f"{ours} is {rows[theirs][0] / rows[ours][0]:.2f}x faster than {theirs}{goal}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,bert")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip", default="", help="leave out the rows starting with these (comma-separated)")
    parser.add_argument("--peak-rss", action="store_true", help="also each contender's peak RSS, own process")
    parser.add_argument("--peak-rss-only", action="store_true",
                        help="only the peak RSS (no timing: memory does not suffer from a loaded machine)")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_child(args.peak_child, args.models, args.batch, args.threads, Path(args.folder))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # Captum's note that it set requires_grad on the input, every call
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if args.peak_rss_only:
                ImageSetup(name, args.batch, args.threads, Path(tmp)).write()
                print_peaks(peak_rss(name, args.batch, args.threads, Path(tmp)))
                continue
            if name == "bert":
                times = interleaved(bert_contenders(args.batch, args.threads, Path(tmp)), args.repeat)
                rows = {label: (t, t / times["onnxruntime forward"]) for label, t in times.items()}
            else:
                rows = cnn_times(name, args.batch, args.threads, Path(tmp), args.repeat,
                                 tuple(filter(None, args.skip.split(","))))
            print_times(name, rows, args.batch, args.threads, args.repeat)
            if args.peak_rss and name != "bert":
                print_peaks(peak_rss(name, args.batch, args.threads, Path(tmp)))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
