"""Explain time / forward time, measured in one run on the same threads.

For each model: the plain forward pass on onnxruntime, and rulegraph's compiled explainer (forward
+ relevance pass in one session) on the same batch. The physical floor of one backward pass is
about 2 (the backward of a layer costs about its forward). When torch and captum are installed,
the same model's Captum Saliency time is printed too, as rulegraph / Captum on the same threads.

    python benchmarks/speed.py [--threads 2] [--batch 8] [--repeat 20] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulegraph import Explainer
from rulegraph.compile.build import TARGET
from rulegraph.run import runtime


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns, repeat: int) -> list[float]:
    """Median time of each function, the calls interleaved so machine load hits all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(name: str, model_path: Path, x: np.ndarray, rules: str, threads: int, repeat: int) -> dict:
    model = onnx.load(str(model_path))
    forward = runtime.session(model.SerializeToString(), ["CPUExecutionProvider"], threads)
    input_name = forward.get_inputs()[0].name
    explainer = Explainer(model_path, rules, providers=["CPUExecutionProvider"], threads=threads)
    compiled = explainer.compiled()
    session = runtime.session(compiled.model.SerializeToString(), ["CPUExecutionProvider"], threads)
    feeds = {input_name: x, TARGET: np.full(len(x), -1, dtype=np.int64)}
    outputs = list(compiled.attribution.values())
    t_forward, t_explain, t_api = interleaved(
        [lambda: forward.run(None, {input_name: x}), lambda: session.run(outputs, feeds),
         lambda: explainer.explain(x)], repeat)
    row = {"model": name, "rules": rules, "batch": len(x), "forward_ms": 1e3 * t_forward,
           "explain_ms": 1e3 * t_explain, "ratio": t_explain / t_forward, "api_ms": 1e3 * t_api}
    return row


def captum_saliency_time(torch_model, x: np.ndarray, threads: int, repeat: int) -> float | None:
    """Captum's Saliency (abs=False): autograd's input gradient, the same quantity as `gradient`."""
    try:
        import torch
        from captum.attr import Saliency
    except ImportError:
        return None
    torch.set_num_threads(threads)
    xt = torch.from_numpy(x)
    saliency = Saliency(torch_model.eval())
    target = torch_model(xt).argmax(dim=1)
    return median_time(lambda: saliency.attribute(xt, target=target, abs=False), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    digits = np.load(ROOT / "models" / "digits_sample.npz")["x"]
    digits = np.concatenate([digits] * (args.batch // len(digits) + 1))[: args.batch]
    for name in ("digits_cnn", "digits_resnet"):
        for rules in ("gradient", "lrp-epsilon"):
            rows.append(measure(name, ROOT / "models" / f"{name}.onnx", digits, rules, args.threads, args.repeat))
    captum_row = None
    try:
        sys.path.insert(0, str(ROOT / "models"))
        from architectures import load_torch

        t = captum_saliency_time(load_torch("digits_cnn"), digits, args.threads, args.repeat)
        if t is not None:
            captum_row = ("digits_cnn", t, next(r for r in rows if r["model"] == "digits_cnn" and r["rules"] == "gradient"))
    except ImportError:
        pass
    if not args.skip_resnet:
        try:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from resnet import export_resnet18
        except ImportError:
            print("resnet18 skipped: needs torch (the [crosscheck] extra)")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "resnet18.onnx"
                export_resnet18(path, batch=args.batch)
                x = rng.normal(size=(args.batch, 3, 224, 224)).astype(np.float32)
                for rules in ("gradient", "lrp-epsilon"):
                    rows.append(measure("resnet18", path, x, rules, args.threads, max(3, args.repeat // 4)))
    print(f"threads {args.threads}, batch {args.batch}, CPU onnxruntime; median of repeated runs")
    print(f"{'model':<14} {'rules':<12} {'forward ms':>10} {'explain ms':>10} {'explain/forward':>16} {'explain() ms':>12}")
    for r in rows:
        print(f"{r['model']:<14} {r['rules']:<12} {r['forward_ms']:>10.2f} {r['explain_ms']:>10.2f} "
              f"{r['ratio']:>16.2f} {r['api_ms']:>12.2f}")
    if captum_row:
        name, t, row = captum_row
        print(f"{name}: rulegraph gradient {row['explain_ms']:.2f} ms vs Captum Saliency (torch autograd, "
              f"forward + backward) {1e3 * t:.2f} ms -> rulegraph / Captum = {row['explain_ms'] / (1e3 * t):.3f}")


if __name__ == "__main__":
    main()
