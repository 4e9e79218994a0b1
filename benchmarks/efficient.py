"""lrp-transformer in its Gradient × Input form (``form="gradient-x-input"``) beside its standard
compilation and the onnxruntime forward pass, on a BERT-base-sized encoder (12 layers, 768 wide,
random weights), the same batch and CPU threads.

One interleaved run (each round calls every contender once, so machine load hits all alike), after
a warm-up; medians in milliseconds and the ratio to the forward pass; then how far the two maps are
apart (the form is the rules at ε = 0; the bundled file's ε is 1e-6).

    python benchmarks/efficient.py [--threads 2] [--batch 8] [--tokens 64] [--repeat 5]

Needs torch and transformers (the [crosscheck] extra).
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


def bert_base(batch: int, tokens: int, path: Path) -> dict[str, np.ndarray]:
    """Export a BERT-base-shaped classifier (TorchScript exporter, opset 17); returns its feeds."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    net = BertForSequenceClassification(BertConfig(num_labels=3)).eval()
    ids = torch.randint(5, 30000, (batch, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes={"input_ids": {0: "N"}, "attention_mask": {0: "N"}, "logits": {0: "N"}})
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def interleaved(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds per contender over ``repeat`` rounds, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bert.onnx"
        feeds = bert_base(args.batch, args.tokens, path)
        cpu = {"providers": ["CPUExecutionProvider"], "threads": args.threads}
        forward = Explainer(path, "gradient", **cpu)
        standard = Explainer(path, "lrp-transformer", **cpu)
        efficient = Explainer(path, "lrp-transformer", form="gradient-x-input", **cpu)
        results = {}

        def run(label, explainer):
            def call():
                results[label] = explainer.explain(feeds, target=0, max_amplification=None)
            return call

        contenders = {"onnxruntime forward": lambda: forward.forward(feeds),
                      "lrp-transformer standard": run("standard", standard),
                      "lrp-transformer gradient-x-input": run("efficient", efficient)}
        times = interleaved(contenders, args.repeat)
    base = times["onnxruntime forward"]
    print(f"BERT-base-sized encoder, batch {args.batch}, {args.tokens} tokens, {args.threads} threads "
          f"(median of {args.repeat}, interleaved)")
    print(f"{'contender':<34} {'ms':>10} {'/ forward':>10}")
    for label, seconds in times.items():
        print(f"{label:<34} {seconds * 1e3:10.1f} {seconds / base:10.2f}")
    print(f"efficient / standard: {times['lrp-transformer gradient-x-input'] / times['lrp-transformer standard']:.2f}")
    a, b = results["efficient"].map, results["standard"].map
    print(f"max |efficient − standard| / max |standard| per map: {np.abs(a - b).max() / np.abs(b).max():.1e} "
          f"(the standard's ε = 1e-6); relative delta {np.abs(results['efficient'].relative_delta).max():.1e} "
          f"vs {np.abs(results['standard'].relative_delta).max():.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
