"""Evaluation: the speed against Quantus 0.6, and the README's AOPC / ABPC table.

    python benchmarks/evaluate.py --speed [--threads 1] [--samples 64] [--repeats 3]
    python benchmarks/evaluate.py --table [--squeezenet PATH] [--write-readme]

``--speed``: each metric on the digits CNN (the torch module for Quantus, its ONNX export for
rulegraph; the same attributions, ``--threads`` CPU threads for both: ``torch.set_num_threads``
and onnxruntime's intra-op threads), Quantus and rulegraph run alternately ``--repeats`` times;
prints the median seconds of each and their ratio. Needs torch and quantus (crosscheck extra).

``--table``: AOPC (MoRF, LeRF) and ABPC, mean ± standard error, of every bundled rule file and of
random attributions: on the three digits models (the first ``--samples`` test images of the
models' split, scikit-learn's digits; pixels removed one at a time, all 64), and on SqueezeNet
1.1 (``--squeezenet``, default /work/shared/models; the kitten and cat photos next to it,
16×16 patches, 100 regions). With --write-readme the tables replace the blocks between the
``<!-- evaluation -->`` and ``<!-- evaluation-speed -->`` markers in README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulegraph import Explainer, evaluate  # noqa: E402
from rulegraph.run import perturbation as pert  # noqa: E402
from rulegraph.run.evaluate import RANDOM, Settings  # noqa: E402
from rulegraph.run.inputs import load_input  # noqa: E402

MODELS = ROOT / "models"
DIGITS = ("digits_mlp", "digits_cnn", "digits_resnet")
BUNDLED = sorted(p.stem for p in (ROOT / "rules").glob("*.rules"))
DIGITS_SETTINGS = Settings(patch_size=1, regions=64)
SQUEEZENET_SETTINGS = Settings(patch_size=16, regions=100)
MARKS = {"evaluation": ("<!-- evaluation -->", "<!-- /evaluation -->"),
         "speed": ("<!-- evaluation-speed -->", "<!-- /evaluation-speed -->")}


def digits(samples: int) -> tuple[np.ndarray, str]:
    """The first test images of the models' split (models/README.md), or the bundled sample."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        x = np.load(MODELS / "digits_sample.npz")["x"]
        return x[:samples], f"the {len(x[:samples])} bundled sample images (scikit-learn absent)"
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    _, x_test = train_test_split(x, test_size=0.2, random_state=0)
    return x_test[:samples], f"the first {samples} test images"


# ---- speed ----------------------------------------------------------------------------------------


def speed(threads: int, samples: int, repeats: int) -> list[tuple[str, float, float]]:
    import quantus
    import torch

    sys.path.insert(0, str(MODELS))
    import architectures

    torch.set_num_threads(threads)
    net = architectures.load_torch("digits_cnn").eval()
    x, _ = digits(samples)
    explainer = Explainer(MODELS / "digits_cnn.onnx", "lrp-epsilon", threads=threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = explainer.explain(x)
    a, y = result.map, result.target
    forward = Explainer(MODELS / "digits_cnn.onnx", "lrp-epsilon", threads=threads)

    def scorer():
        return pert.Scorer(lambda xs: forward.forward(xs)["logits"])

    def theirs(metric, **kw):
        return lambda: metric(model=net, x_batch=x, y_batch=y, a_batch=a, channel_first=True, **kw)

    rows = {
        "PixelFlipping (64 steps)": (theirs(quantus.PixelFlipping(disable_warnings=True)),
                                     lambda: pert.pixel_flipping(scorer(), x, a, y)),
        "RegionPerturbation (2×2, 16 regions)": (
            theirs(quantus.RegionPerturbation(patch_size=2, regions_evaluation=16, disable_warnings=True)),
            lambda: pert.region_perturbation(scorer(), x, a, y, 2, "morf", 16)),
        "ROAD (50 percentages)": (theirs(quantus.ROAD(disable_warnings=True)),
                                  lambda: pert.road(scorer(), x, a, y)),
        "FaithfulnessCorrelation (100 runs)": (
            theirs(quantus.FaithfulnessCorrelation(subset_size=16, return_aggregate=False,
                                                   disable_warnings=True), softmax=True),
            lambda: pert.faithfulness_correlation(scorer(), x, a, y, 100, 16)),
    }
    out = []
    for name, (quantus_run, rulegraph_run) in rows.items():
        times: dict[str, list[float]] = {"quantus": [], "rulegraph": []}
        for _ in range(repeats):  # interleaved, so that load on the machine hits both alike
            for who, run in (("quantus", quantus_run), ("rulegraph", rulegraph_run)):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run()
                times[who].append(time.perf_counter() - start)
        q, r = statistics.median(times["quantus"]), statistics.median(times["rulegraph"])
        out.append((name, q, r))
        print(f"{name}: Quantus {q:.3f} s, rulegraph {r:.3f} s, {q / r:.1f}x", flush=True)
    return out


def speed_table(rows, threads: int, samples: int) -> str:
    lines = [f"| metric ({samples} digits, CNN, {threads} CPU thread{'s' if threads > 1 else ''}) | Quantus 0.6 | "
             "rulegraph | speed-up |", "|---|---|---|---|"]
    lines += [f"| {name} | {q:.3f} s | {r:.3f} s | {q / r:.1f}× |" for name, q, r in rows]
    return "\n".join(lines)


# ---- the AOPC / ABPC table ------------------------------------------------------------------------


def _cell(ev, method: str, metric: str) -> str:
    mean, sem = ev.mean(method, metric)
    return f"{mean:.3f} ± {sem:.3f}"


def table_rows(model: Path, x: np.ndarray, settings: Settings, label: str) -> list[str]:
    rows, failed = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = None
        for rules in BUNDLED:
            try:
                one = evaluate(model, [rules], x, metrics=["region"], settings=settings, random=ev is None)
            except Exception as exc:  # noqa: BLE001 (a rule file that does not apply is listed as such)
                failed.append(f"{rules} ({type(exc).__name__})")
                continue
            ev = one if ev is None else ev
            if one is not ev:
                ev.methods.append(rules)
                ev.scores[rules] = one.scores[rules]
    for method in ev.ranking("abpc"):
        cells = [_cell(ev, method, k) for k in ("aopc_morf", "aopc_lerf", "abpc")]
        rows.append(f"| {label} | {'**random**' if method == RANDOM else method} | " + " | ".join(cells) + " |")
    if failed:
        print(f"{label}: not explained: {', '.join(failed)}", file=sys.stderr)
    return rows


def table(samples: int, squeezenet: Path | None) -> str:
    x, which = digits(samples)
    header = ["| model | method | AOPC MoRF ↑ | AOPC LeRF ↓ | ABPC ↑ |", "|---|---|---|---|---|"]
    rows = []
    for name in DIGITS:
        rows += table_rows(MODELS / f"{name}.onnx", x, DIGITS_SETTINGS, f"{name} ({which})")
        print(f"{name} done", file=sys.stderr, flush=True)
    if squeezenet is not None and squeezenet.is_file():
        reader = Explainer(squeezenet, "lrp-epsilon", preprocess="imagenet-caffe")
        photos = np.concatenate([load_input(squeezenet.parent / f, reader) for f in ("kitten_224.png", "cat.jpg")])
        rows += table_rows(squeezenet, photos, SQUEEZENET_SETTINGS, "SqueezeNet 1.1 (kitten, cat)")
    return "\n".join(header + rows)


def write_readme(key: str, text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text(encoding="utf-8")
    begin, end = MARKS[key]
    start, stop = content.index(begin) + len(begin), content.index(end)
    readme.write_text(content[:start] + "\n" + text + "\n" + content[stop:], encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--squeezenet", type=Path, default=Path("/work/shared/models/squeezenet1.1_fp32.onnx"))
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    if args.speed:
        text = speed_table(speed(args.threads, args.samples, args.repeats), args.threads, args.samples)
        print(text)
        if args.write_readme:
            write_readme("speed", text)
    if args.table:
        text = table(args.samples, args.squeezenet)
        print(text)
        if args.write_readme:
            write_readme("evaluation", text)


if __name__ == "__main__":
    main()
