"""Compile time: model + rule file -> the explainer's ONNX model, and the session that runs it.

Issue targets: ResNet-50 in <= 1 s, a 12-layer BERT-base in <= 3 s. Each row is the median of
``--repeat`` fresh compiles (a new ``Explainer`` each time, nothing cached), split into the
stages a user waits for: ``compile`` (read, check, plan, emit: ``Explainer.compiled()``) and
``session`` (onnxruntime's graph optimization and kernel set-up for the explainer). Wall and CPU
seconds are both printed; on a shared machine the CPU seconds are the steadier number.

    python benchmarks/compile_time.py [--models resnet50 bert] [--rules gradient lrp-epsilon]
        [--repeat 3] [--profile]

Needs torch (and transformers for BERT): the [crosscheck] extra. Weights are random.
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

from rulegraph import Explainer  # noqa: E402
from rulegraph.run import runtime  # noqa: E402

RULES = {"resnet50": ["gradient", "lrp-epsilon", "lrp-composite"],
         "bert": ["gradient", "lrp-transformer"]}


def export_resnet50(path: Path) -> Path:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from resnet import resnet50

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(resnet50(), (torch.randn(2, 3, 224, 224),), str(path), dynamo=False,
                          opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return path


def export_bert(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2, attn_implementation="eager")).eval()
    ids = torch.randint(0, 1000, (2, 32))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"},
                                        "logits": {0: "N"}})
    return path


EXPORTS = {"resnet50": export_resnet50, "bert": export_bert}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def measure(path: Path, rules: str, repeat: int) -> dict:
    stages = {"compile": [], "session": []}
    for _ in range(repeat):
        explainer = Explainer(path, rules, providers=["CPUExecutionProvider"], threads=2)
        compiled, wall, cpu = timed(explainer.compiled)
        stages["compile"].append((wall, cpu))
        proto = compiled.model   # a ModelProto: big weights may be held arrays (graph.large)
        _, wall, cpu = timed(lambda: runtime.session(proto, ["CPUExecutionProvider"], 2))
        stages["session"].append((wall, cpu))
    return {stage: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for stage, v in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(EXPORTS), choices=list(EXPORTS))
    parser.add_argument("--rules", nargs="+", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one compile of each row")
    args = parser.parse_args()
    print(f"{'model':<10} {'rules':<16} {'nodes':>6} {'compile s':>10} {'(cpu)':>7} "
          f"{'session s':>10} {'(cpu)':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = EXPORTS[name](Path(tmp) / f"{name}.onnx")
            import onnx

            nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
            for rules in args.rules or RULES[name]:
                if args.profile:
                    import cProfile
                    import pstats

                    profiler = cProfile.Profile()
                    profiler.runcall(
                        lambda: Explainer(path, rules, providers=["CPUExecutionProvider"]).compiled())
                    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
                row = measure(path, rules, args.repeat)
                (cw, cc), (sw, sc) = row["compile"], row["session"]
                print(f"{name:<10} {rules:<16} {nodes:>6} {cw:>10.2f} {cc:>7.2f} {sw:>10.2f} {sc:>7.2f}",
                      flush=True)
    np.random.seed(0)


if __name__ == "__main__":
    main()
