"""Explain time / forward time, measured in one run on the same threads.

For each model: the plain forward pass on onnxruntime, and rulegraph's compiled explainer (forward
+ relevance pass in one session) on the same batch. The physical floor of one backward pass is
about 2 (the backward of a layer costs about its forward). When torch and captum are installed,
the same model's Captum Saliency time is printed too, as rulegraph / Captum on the same threads.
When zennit is installed (``pip install --no-deps zennit==0.5.1``), resnet18's sessions for LRP-ε,
``lrp-composite`` and ``benchmarks/epsilon-gamma-box.rules`` run interleaved with Zennit's ε,
EpsilonPlusFlat and EpsilonGammaBox on the torch model the ONNX file was exported from (same
threads, ResNetCanonizer; see benchmarks/compare.py), printed as ratios to the forward and as
"rulegraph is N× faster than Zennit".

    python benchmarks/speed.py [--threads 2] [--batch 8] [--repeat 20] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import importlib.util
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


def forward_runner(model_path: Path, x: np.ndarray, threads: int):
    """The plain forward pass of the model on ``x``, one onnxruntime session."""
    forward = runtime.session(onnx.load(str(model_path)).SerializeToString(), ["CPUExecutionProvider"], threads)
    feeds = {forward.get_inputs()[0].name: x}
    return lambda: forward.run(None, feeds)


def session_runner(model_path: Path, x: np.ndarray, rules: str, threads: int):
    """(the compiled explainer's session run on ``x``, arg-max targets, attributions only; the Explainer)."""
    explainer = Explainer(model_path, rules, providers=["CPUExecutionProvider"], threads=threads)
    compiled = explainer.compiled()
    session = runtime.session(compiled.model, ["CPUExecutionProvider"], threads)  # held weights: a proto
    feeds = {explainer.graph.inputs[0]: x, TARGET: np.full(len(x), -1, dtype=np.int64)}
    outputs = list(compiled.attribution.values())
    return (lambda: session.run(outputs, feeds)), explainer


def measure(name: str, model_path: Path, x: np.ndarray, rules: str, threads: int, repeat: int) -> dict:
    run, explainer = session_runner(model_path, x, rules, threads)
    t_forward, t_explain, t_api = interleaved(
        [forward_runner(model_path, x, threads), run, lambda: explainer.explain(x)], repeat)
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


#: (rulegraph rule file, Zennit composite computing the same rules, the issue's target speed-up or None)
ZENNIT_PAIRS = [("lrp-epsilon", "Epsilon", 3.0), ("lrp-composite", "EpsilonPlusFlat", None),
                (str(ROOT / "benchmarks" / "epsilon-gamma-box.rules"), "EpsilonGammaBox", 5.0)]


def zennit_comparison(model_path: Path, x: np.ndarray, threads: int, repeat: int) -> list[str]:
    """resnet18's explainer sessions interleaved with Zennit on the same torch model; printable lines."""
    if importlib.util.find_spec("zennit") is None or importlib.util.find_spec("torch") is None:
        return ["resnet18 vs Zennit skipped: needs torch and zennit (pip install --no-deps zennit==0.5.1)"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import ImageSetup, cnn_builders

    setup = ImageSetup("resnet18", len(x), threads, model_path.parent)
    setup.path, setup.__dict__["xs"] = model_path, x  # the ONNX file and input measured here
    builders = cnn_builders(setup)
    fns = {"forward": forward_runner(model_path, x, threads)}
    for rules, kind, _ in ZENNIT_PAIRS:
        fns[f"rulegraph {Path(rules).stem}"] = session_runner(model_path, x, rules, threads)[0]
        fns[f"zennit {kind}"] = builders[f"zennit {kind}"]()
    times = dict(zip(fns, interleaved(list(fns.values()), repeat)))
    lines = [f"resnet18 b{len(x)} vs Zennit (same threads, interleaved, median of {repeat}; ms, / forward):"]
    lines += [f"  {label:<30} {1e3 * t:10.1f} {t / times['forward']:8.2f}" for label, t in times.items()]
    for rules, kind, target in ZENNIT_PAIRS:
        speedup = times[f"zennit {kind}"] / times[f"rulegraph {Path(rules).stem}"]
        goal = "" if target is None else f" (target >= {target:g}x)"
        lines.append(f"  rulegraph {Path(rules).stem} is {speedup:.2f}x faster than Zennit {kind}{goal}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, zennit_lines = [], []
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
                zennit_lines = zennit_comparison(path, x, args.threads, max(3, args.repeat // 4))
    print(f"threads {args.threads}, batch {args.batch}, CPU onnxruntime; median of repeated runs")
    print(f"{'model':<14} {'rules':<12} {'forward ms':>10} {'explain ms':>10} {'explain/forward':>16} {'explain() ms':>12}")
    for r in rows:
        print(f"{r['model']:<14} {r['rules']:<12} {r['forward_ms']:>10.2f} {r['explain_ms']:>10.2f} "
              f"{r['ratio']:>16.2f} {r['api_ms']:>12.2f}")
    if captum_row:
        name, t, row = captum_row
        print(f"{name}: rulegraph gradient {row['explain_ms']:.2f} ms vs Captum Saliency (torch autograd, "
              f"forward + backward) {1e3 * t:.2f} ms -> rulegraph / Captum = {row['explain_ms'] / (1e3 * t):.3f}")
    print("\n".join(zennit_lines))


if __name__ == "__main__":
    main()
