"""lrp-transformer in its Gradient × Input form (``form="gradient-x-input"``) beside its standard
compilation and the onnxruntime forward pass, on a BERT-base-sized encoder (12 layers, 768 wide,
random weights), the same batch and CPU threads.

One interleaved run (each round calls every contender once, so machine load hits all alike), after
a warm-up; medians in milliseconds and the ratio to the forward pass; then how far the two maps are
apart: the form equals the standard compilation with ε = 0 (computed once more, untimed); the bundled
file's ε is 1e-6.

    python benchmarks/efficient.py [--threads 2] [--batch 8] [--tokens 64] [--repeat 5]

Needs torch and transformers (the [crosscheck] extra).
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from compare import interleaved  # noqa: E402  (one interleaved median for every benchmark)
from rulegraph import Explainer  # noqa: E402
from rulegraph.run import rulefiles as dsl  # noqa: E402


def bert_base(batch: int, tokens: int, layers: int, path: Path) -> dict[str, np.ndarray]:
    """Export a BERT-base-shaped classifier (TorchScript exporter, opset 17) to ``path`` and its feeds
    next to it (``.npz``); returns the feeds."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    net = BertForSequenceClassification(BertConfig(num_labels=3, num_hidden_layers=layers)).eval()
    ids = torch.randint(5, 30000, (batch, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes={name: {0: "N"} for name in ("input_ids", "attention_mask", "logits")})
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    np.savez(path.with_suffix(".npz"), **feeds)
    return feeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (BERT-base: 12)")
    parser.add_argument("--export", help=argparse.SUPPRESS)   # the child process that exports
    args = parser.parse_args()
    if args.export:
        bert_base(args.batch, args.tokens, args.layers, Path(args.export))
        return 0
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bert.onnx"
        # exported in a child process: torch's memory is gone before the three sessions load
        subprocess.run([sys.executable, __file__, "--export", str(path), "--batch", str(args.batch),
                        "--tokens", str(args.tokens), "--layers", str(args.layers)], check=True)
        feeds = dict(np.load(path.with_suffix(".npz")))
        cpu = {"providers": ["CPUExecutionProvider"], "threads": args.threads}
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads   # as rulegraph sets its sessions
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        standard = Explainer(path, "lrp-transformer", **cpu)
        efficient = Explainer(path, "lrp-transformer", form="gradient-x-input", **cpu)
        results = {}

        def run(label, explainer):
            def call():
                results[label] = explainer.explain(feeds, target=0, max_amplification=None)
            return call

        contenders = {"onnxruntime forward": lambda: session.run(None, feeds),
                      "lrp-transformer standard": run("standard", standard),
                      "lrp-transformer gradient-x-input": run("efficient", efficient)}
        times = interleaved(contenders, args.repeat)
        # untimed: the standard compilation with every ε = 0, which the form equals
        text = (ROOT / "rules" / "lrp-transformer.rules").read_text().replace("eps = 1e-6", "eps = 0")
        del standard, contenders
        gc.collect()
        zero = dsl.parse(text, source="lrp-transformer-eps0.rules")
        run("standard at ε = 0", Explainer(path, zero, **cpu))()
    base = times["onnxruntime forward"]
    print(f"BERT-base-sized encoder ({args.layers} layers), batch {args.batch}, {args.tokens} tokens, "
          f"{args.threads} threads (median of {args.repeat}, interleaved)")
    print(f"{'contender':<34} {'ms':>10} {'/ forward':>10}")
    for label, seconds in times.items():
        print(f"{label:<34} {seconds * 1e3:10.1f} {seconds / base:10.2f}")
    ratio = times["lrp-transformer gradient-x-input"] / times["lrp-transformer standard"]
    print(f"efficient / standard: {ratio:.2f}")
    a, b, c = (results[k].map for k in ("efficient", "standard", "standard at ε = 0"))
    deltas = [np.abs(results[k].relative_delta).max() for k in ("efficient", "standard")]
    apart = [np.abs(a - other).max() / np.abs(other).max() for other in (b, c)]
    print(f"max |efficient − standard| / max |standard|: {apart[0]:.1e} (ε = 1e-6), {apart[1]:.1e} (ε = 0); "
          f"relative delta {deltas[0]:.1e} vs {deltas[1]:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
