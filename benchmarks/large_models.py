"""Compile time and peak memory of Llama-style models against their size (random weights, external data).

For each size (GB of float32 weights) builds a ``transformers`` Llama config of about that size (vocabulary
8,000, 4 layers, the hidden size solved for the size), exports it with the TorchScript exporter and
re-saves it with every weight in ``model.onnx.data`` beside it. Then, in a child process of its own, one
prompt of 16 tokens: read the model (``Explainer``), compile the gradient explainer, explain the last
token's top logit, save the explainer (external data); printed per size as a table with the child's peak
resident set size (``VmHWM``: ``ru_maxrss`` would carry the exporting parent's peak over ``exec``).
Every size holds its weights once as arrays (over ``graph.large.HOLD_BYTES``, 1 MiB), sessions given
them by reference; a model over ``graph.large.LARGE_BYTES`` (1 GiB) is also saved with external data;
``--large`` lowers that threshold to 0 so every size takes it; ``--no-prepack`` sets
``large.PREPACK = False`` (onnxruntime keeps no packed copy of the MatMul weights; answers then differ
from the in-memory path's by rounding).

    python benchmarks/large_models.py                     # 0.1, 0.25, 0.5 GB
    python benchmarks/large_models.py --sizes 0.5 1 3     # needs about 5x the largest size in RAM
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

VOCAB, LAYERS, T = 8000, 4, 16

#: the child: read, compile, explain one prompt, save; prints seconds per step and peak RSS (kB) as JSON
CHILD = """
import json, sys, time
import numpy as np
import rulegraph
from rulegraph.graph import large
model, out, lower, prepack = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
if lower:
    large.LARGE_BYTES = 0
large.PREPACK = prepack
times = {}
t = time.perf_counter(); e = rulegraph.Explainer(model, "gradient"); times["read"] = time.perf_counter() - t
t = time.perf_counter(); e.compiled(); times["compile"] = time.perf_counter() - t
ids = np.random.default_rng(0).integers(0, %d, (1, %d)).astype(np.int64)
t = time.perf_counter()
r = e.explain({"ids": ids, "mask": np.ones_like(ids)}, target=rulegraph.Target("argmax", at=%d))
times["explain"] = time.perf_counter() - t
t = time.perf_counter(); e.save(out); times["save"] = time.perf_counter() - t
# VmHWM: this process image's own peak (ru_maxrss carries the forking parent's over exec, and the
# parent holds the exported torch model)
times["rss_kb"] = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
times["finite"] = bool(np.isfinite(r.map).all())
print(json.dumps(times))
""" % (VOCAB, T, T - 1)


def hidden_for(gigabytes: float) -> int:
    """The hidden size h (a multiple of 64) whose model holds about ``gigabytes`` of float32 weights:
    embeddings and head 2·V·h, per layer 4·h² (attention) + 3·h·3h (gated MLP) = 13·h²."""
    target = gigabytes * 1e9 / 4
    a, b = 13 * LAYERS, 2 * VOCAB
    h = (-b + (b * b + 4 * a * target) ** 0.5) / (2 * a)
    return max(64, int(round(h / 64)) * 64)


def export(hidden: int, path: Path) -> int:
    """Export the Llama-style model of hidden size ``hidden`` to ``path`` with external data; its bytes."""
    import onnx
    import torch
    import transformers

    class CausalLM(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, ids, mask):
            return self.net(input_ids=ids, attention_mask=mask, use_cache=False).logits

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden,
                                      num_hidden_layers=LAYERS, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 64, max_position_embeddings=T,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    net = CausalLM(transformers.LlamaForCausalLM(config).eval())
    size = sum(p.numel() * p.element_size() for p in net.parameters())
    ids = torch.zeros((1, T), dtype=torch.int64)
    raw = path.parent.parent / "export" / "export.onnx"   # the exporter's own file(s), dropped after
    raw.parent.mkdir()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (ids, torch.ones_like(ids)), str(raw), input_names=["ids", "mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"ids": {0: "N"}, "mask": {0: "N"}, "logits": {0: "N"}})
    del net
    onnx.save(onnx.load(str(raw)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    shutil.rmtree(raw.parent)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="GB of weights")
    parser.add_argument("--large", action="store_true", help="every size takes the large-model path")
    parser.add_argument("--no-prepack", action="store_true",
                        help="large.PREPACK = False: no packed copy of the MatMul weights in onnxruntime")
    args = parser.parse_args()
    print(f"{'weights GB':>10} {'hidden':>6} {'read s':>7} {'compile s':>9} {'explain s':>9} {'save s':>7} "
          f"{'peak RSS GB':>11} {'RSS/weights':>11} {'saved data GB':>13}")
    for gigabytes in args.sizes:
        hidden = hidden_for(gigabytes)
        with tempfile.TemporaryDirectory() as folder:
            model = Path(folder) / "model" / "model.onnx"
            model.parent.mkdir()
            size = export(hidden, model)
            out = Path(folder) / "explainer.onnx"
            flags = ["1" if args.large else "0", "0" if args.no_prepack else "1"]
            done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), *flags],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{size / 1e9:>10.2f} {hidden:>6} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            m = json.loads(done.stdout.strip().splitlines()[-1])
            data = out.with_name(out.name + ".data")
            saved = data.stat().st_size / 1e9 if data.exists() else 0.0
            rss = m["rss_kb"] * 1024 / 1e9
            print(f"{size / 1e9:>10.2f} {hidden:>6} {m['read']:>7.1f} {m['compile']:>9.1f} {m['explain']:>9.1f} "
                  f"{m['save']:>7.1f} {rss:>11.2f} {rss / (size / 1e9):>11.1f} {saved:>13.2f}"
                  + ("" if m["finite"] else "  (non-finite map)"))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
