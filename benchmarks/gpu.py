"""Explain time / forward time on a CUDA GPU, and rulegraph against Zennit and Captum on the same GPU.

All timings come from one interleaved run (each round calls every contender once, so a load spike
hits all alike), after a warm-up; GPU work is synchronized before each clock read. rulegraph and the
forward both run through IO binding with the input already on the GPU and the outputs left there,
so the ratio measures the kernels, not host copies.

    python benchmarks/gpu.py [--model resnet18|resnet50|vgg16] [--batch 32] [--size 224] [--repeat 20]

Needs onnxruntime-gpu (`rulegraph[gpu]`), torch with CUDA and torchvision; zennit and captum rows
are printed when those are installed. On a machine without a GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulegraph import Explainer
from rulegraph.run import runtime

RULES = ["gradient", "lrp-epsilon", "lrp-composite", "deeplift-rescale"]


def interleaved(fns: dict, repeat: int, sync) -> dict[str, float]:
    """Median seconds of each callable, the calls interleaved round by round."""
    for fn in fns.values():
        fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bound_runner(sess, feeds_on_device: dict):
    """A run of ``sess`` with inputs bound on the GPU and outputs left there."""
    binding = sess.io_binding()
    for name, value in feeds_on_device.items():
        binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda")
    return lambda: sess.run_with_iobinding(binding)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    rt = runtime.ort()
    if "CUDAExecutionProvider" not in rt.get_available_providers():
        print("no CUDA provider in this onnxruntime (install rulegraph[gpu] on a GPU machine); nothing measured")
        return 2
    import numpy as np
    import onnx
    import torch
    import torchvision

    if not torch.cuda.is_available():
        print("torch sees no CUDA GPU; nothing measured")
        return 2
    cuda = ["CUDAExecutionProvider"]
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}.onnx"
        torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
        model = onnx.load(str(path))
        x_np = x.numpy()
        x_gpu = rt.OrtValue.ortvalue_from_numpy(x_np, "cuda", 0)
        forward = runtime.session(model.SerializeToString(), cuda, strict=True)
        contenders = {"onnxruntime forward": bound_runner(forward, {"input": x_gpu})}
        target = rt.OrtValue.ortvalue_from_numpy(np.zeros(args.batch, np.int64), "cuda", 0)
        for rules in RULES:
            explainer = Explainer(path, rules, providers=cuda, strict_device=True)
            compiled = explainer.compiled()
            feeds = {"input": x_gpu, compiled.target_input: target}
            for name in compiled.baseline_inputs.values():
                feeds[name] = rt.OrtValue.ortvalue_from_numpy(np.zeros_like(x_np), "cuda", 0)
            contenders[f"rulegraph {rules}"] = bound_runner(explainer.session(), feeds)

        gnet, gx = net.cuda(), x.cuda()

        def autograd():
            xi = gx.clone().requires_grad_(True)
            gnet(xi)[:, 0].sum().backward()

        contenders["torch autograd"] = autograd
        try:
            from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
            from zennit.attribution import Gradient

            for label, composite in (("zennit EpsilonPlusFlat", EpsilonPlusFlat()),
                                     ("zennit EpsilonGammaBox", EpsilonGammaBox(low=-3.0, high=3.0))):
                def run_zennit(composite=composite):
                    with Gradient(gnet, composite) as attributor:
                        attributor(gx, torch.eye(1000, device="cuda")[[0] * args.batch])
                contenders[label] = run_zennit
        except ImportError:
            print("(zennit not installed: no Zennit rows)")
        try:
            from captum.attr import IntegratedGradients

            ig = IntegratedGradients(gnet)
            contenders["captum IG-32"] = lambda: ig.attribute(gx, target=0, n_steps=32,
                                                              internal_batch_size=args.batch)
        except ImportError:
            print("(captum not installed: no Captum rows)")

        times = interleaved(contenders, args.repeat, torch.cuda.synchronize)
    base = times["onnxruntime forward"]
    print(f"{args.model} b{args.batch} {args.size}² on {torch.cuda.get_device_name()} "
          f"(median of {args.repeat}, interleaved)")
    print(f"{'contender':<28} {'ms':>9} {'/ forward':>10}")
    for name, seconds in times.items():
        print(f"{name:<28} {seconds * 1e3:9.2f} {seconds / base:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
