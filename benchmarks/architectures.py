"""The README's architecture table: real architectures with random weights, exported both ways,
explained end to end.

For each architecture and exporter: opset, node count, how many nodes on the relevance path each
rule kind covers, whether the `gradient` rule file matches torch.autograd (max error relative to
the largest gradient; for token models gradient × input per token at the token embeddings), and the
end-to-end conservation error of the LRP file (bias blamed): `lrp-epsilon`, or `lrp-transformer`
for the transformers.

    python benchmarks/architectures.py [--only resnet18,vit] [--write-readme]

Needs torch, torchvision and transformers (not part of the test extras); rows whose library is
missing are skipped. With --write-readme the table replaces the block between the
`<!-- architectures -->` markers in README.md.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulegraph import Explainer
from rulegraph.compile.plan import assign, find_start, path_nodes

MARK_BEGIN, MARK_END = "<!-- architectures -->", "<!-- /architectures -->"


def torchvision_model(name: str, size: int = 224):
    def build():
        import torch
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        return model, {"input": torch.randn(2, 3, size, size)}

    return build


def bert_encoder():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 1000, (2, 12))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def vit():
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10)
    return ViTForImageClassification(config).eval(), {"input": torch.randn(2, 3, 32, 32)}


ARCHITECTURES = {
    "resnet18": torchvision_model("resnet18"),
    "vgg11_bn": torchvision_model("vgg11_bn"),
    "squeezenet1_1": torchvision_model("squeezenet1_1"),
    "mobilenet_v3_small": torchvision_model("mobilenet_v3_small"),
    "efficientnet_b0": torchvision_model("efficientnet_b0"),
    "densenet121": torchvision_model("densenet121"),
    "bert (transformers)": bert_encoder,
    "vit (transformers)": vit,
}


def logits_module(model, n_inputs: int):
    """``model`` with one tensor output, 'logits', and named positional inputs a (, b)."""
    import torch

    def logits(out):
        return out.logits if hasattr(out, "logits") else out

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, a):
            return logits(self.model(a))

    class Two(One):
        def forward(self, a, b):
            return logits(self.model(a, b))

    return (One if n_inputs == 1 else Two)().eval()


def export(model, inputs: dict, path: Path, dynamo: bool) -> None:
    import torch

    names = list(inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        kwargs = {"dynamo": dynamo, "input_names": names, "output_names": ["logits"]}
        if dynamo:
            kwargs["opset_version"] = 18
            batch = torch.export.Dim("batch", min=1, max=64)
            kwargs["dynamic_shapes"] = {arg: {0: batch} for arg in "ab"[: len(names)]}
            kwargs["external_data"] = False
        else:
            kwargs["opset_version"] = 17
            kwargs["dynamic_axes"] = {k: {0: "batch"} for k in names + ["logits"]}
        torch.onnx.export(logits_module(model, len(names)), tuple(inputs.values()), str(path), **kwargs)


def autograd_gradient(model, inputs: dict, targets):
    """(input name, what the `gradient` file should give for it): the saliency of a float input, or
    for token ids (no float input) Σ_e emb ⊙ ∂y/∂emb at the input embeddings' output."""
    import torch

    float_name = next((k for k, v in inputs.items() if v.is_floating_point()), None)
    if float_name is None:
        captured = {}

        def keep(module, args, output):
            output.retain_grad()
            captured["emb"] = output

        handle = model.get_input_embeddings().register_forward_hook(keep)
        try:
            logits = logits_module(model, len(inputs))(*inputs.values())
            logits[torch.arange(len(targets)), torch.as_tensor(targets)].sum().backward()
        finally:
            handle.remove()
        emb = captured["emb"]
        return next(iter(inputs)), (emb * emb.grad).sum(-1).detach().numpy()
    x = inputs[float_name].clone().requires_grad_(True)
    args = [x if k == float_name else v for k, v in inputs.items()]
    logits = logits_module(model, len(args))(*args)
    logits[torch.arange(len(targets)), torch.as_tensor(targets)].sum().backward()
    return float_name, x.grad.numpy()


def row(name: str, build, dynamo: bool) -> dict:
    """One table row; the explainers of a row go before the next (vgg11's weights are 0.5 GB)."""
    import gc


    try:
        return _row(name, build, dynamo)
    finally:
        gc.collect()


def _row(name: str, build, dynamo: bool) -> dict:
    import onnx

    model, inputs = build()
    out = {"architecture": name, "exporter": "dynamo" if dynamo else "torchscript"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            export(model, inputs, path, dynamo)
        except Exception as exc:  # noqa: BLE001 (an exporter failure is a result, not a crash)
            out["error"] = f"export failed: {type(exc).__name__}"
            return out
        proto = onnx.load(str(path))
        out["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        out["nodes"] = len(proto.graph.node)
        feeds = {k: v.numpy() for k, v in inputs.items()}
        try:
            grad = Explainer(path, "gradient")
            targets = [1, 2]
            name_in, expected = autograd_gradient(model, inputs, targets)
            result = grad.explain(feeds, target=targets)
            got = result.saliency.get(name_in, result.attribution.get(name_in))
            out["gradient_error"] = float(np.abs(got - expected).max() / np.abs(expected).max())
            del grad, result
        except Exception as exc:  # noqa: BLE001 (a failure is a row of the table)
            out["gradient_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        try:
            lrp = Explainer(path, "lrp-transformer" if "transformers" in name else "lrp-epsilon")
            start = find_start(lrp.graph, lrp.ruleset, None, None)
            kinds = Counter(a.binding.rule.name if a.binding else "none"
                            for a in assign(lrp.graph, lrp.ruleset, path_nodes(lrp.graph, start)))
            out["rules"] = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            result = lrp.explain(feeds, target=[1, 2])
            out["conservation"] = float(np.abs(result.relative_delta).max())
            out["logit"] = float(np.abs(result.start_value).min())
            del lrp, result
            exact = Explainer(path, without_eps("transformers" in name)).explain(feeds, target=[1, 2])
            out["conservation_eps0"] = float(np.abs(exact.relative_delta).max())
        except Exception as exc:  # noqa: BLE001 (a failure is a row of the table)
            out["conservation"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return out


def without_eps(transformer: bool):
    """The LRP file with every ε set to 0 (LRP-0): what is left of a leak is float rounding."""
    from rulegraph.run import rulefiles as dsl

    if not transformer:
        return "lrp-0"
    return dsl.parse('rulegraph 1\ninclude "lrp-transformer"\nlinear -> normalized(eps = 0)\n'
                     "bilinear -> uniform(eps = 0, softmax_constant = 1, gate_constant = 1)\n"
                     "LayerNormalization -> layernorm_linear(eps = 0)\nSoftmax -> softmax_taylor(eps = 0)\n",
                     source="lrp-transformer-eps0.rules")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.1e}"
    return str(value) if value is not None else "–"


def table(rows: list[dict]) -> str:
    head = ("| architecture | exporter | opset | nodes | rules on the path (LRP file) | gradient vs autograd "
            "| LRP conservation | same at ε = 0 | smallest \\|logit\\| |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['architecture']} | {r['exporter']} | – | – | {r['error']} | – | – | – | – |")
            continue
        lines.append(f"| {r['architecture']} | {r['exporter']} | {r['opset']} | {r['nodes']} | {r.get('rules', '–')} "
                     f"| {fmt(r.get('gradient_error'))} | {fmt(r.get('conservation'))} "
                     f"| {fmt(r.get('conservation_eps0'))} | {fmt(r.get('logit'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architecture names")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(ARCHITECTURES)
    rows = []
    for name in names:
        for dynamo in (False, True):
            try:
                rows.append(row(name, ARCHITECTURES[name], dynamo))
            except ImportError as exc:
                print(f"{name}: skipped ({exc})", file=sys.stderr)
                break
            except Exception:  # noqa: BLE001 (a failure is a row of the table)
                buffer = io.StringIO()
                traceback.print_exc(file=buffer)
                rows.append({"architecture": name, "exporter": "dynamo" if dynamo else "torchscript",
                             "error": buffer.getvalue().strip().splitlines()[-1][:100]})
            print(rows[-1], file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.write_readme:
        readme = ROOT / "README.md"
        content = readme.read_text()
        begin, end = content.index(MARK_BEGIN) + len(MARK_BEGIN), content.index(MARK_END)
        readme.write_text(content[:begin] + "\n" + text + "\n" + content[end:])


if __name__ == "__main__":
    main()
