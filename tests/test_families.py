"""A fast subset of the README's architecture table (benchmarks/architectures.py): a few of its
families, built as the table builds them (tiny configs, random weights, seed 0), exported by the
legacy exporter, explained end to end.

Oracles, one per row: torch.autograd on the same module (the `gradient` file, max error relative to
the largest entry; for token ids Σ_e emb ⊙ ∂y/∂emb at the token embeddings) and the conservation
identity of the family's LRP file (Σ attribution + Σ bias shares = the explained value, biases
blamed). The table's README-keeping rule is checked on a two-layout README.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from rulegraph import Explainer

torch = pytest.importorskip("torch", reason="needs the [crosscheck] extra (torch)")

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load("rulegraph_test_architecture_table", ROOT / "benchmarks" / "architectures.py")

#: (family in the table, the library it needs, exported by dynamo): the T5 encoder from dynamo, as
#: the legacy exporter's T5 RMSNorm leaks (the README table)
FAMILIES = [
    ("t5 encoder (transformers)", "transformers", True),
    ("clip vision (transformers)", "transformers", False),
    ("wav2vec2 (transformers)", "transformers", False),
    ("whisper encoder (transformers)", "transformers", False),
    ("u-net (torch)", "torch", False),
    ("gru classifier (torch)", "torch", False),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name: str, library: str, dynamo: bool):
        if name not in cache:
            pytest.importorskip(library, reason=f"the {name} family needs {library}")
            family = bench.ARCHITECTURES[name]
            net, inputs, embeddings = family.build()
            path = tmp_path_factory.mktemp("families") / "model.onnx"
            bench.export(net, inputs, path, dynamo=dynamo)
            cache[name] = family, net, inputs, embeddings, path
        return cache[name]

    return get


@pytest.mark.parametrize("name, library, dynamo", FAMILIES)
def test_gradient_file_matches_autograd(exported, name, library, dynamo):
    family, net, inputs, embeddings, path = exported(name, library, dynamo)
    input_name, want = bench.autograd_gradient(net, inputs, embeddings, family.target(net, inputs))
    result = Explainer(path, "gradient").explain({k: v.numpy() for k, v in inputs.items()},
                                                 target=family.explained(net, inputs))
    got = result.saliency.get(input_name, result.attribution.get(input_name))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("name, library, dynamo", FAMILIES)
def test_lrp_file_conserves_with_biases_blamed(exported, name, library, dynamo):
    family, net, inputs, _, path = exported(name, library, dynamo)
    result = Explainer(path, family.lrp).explain({k: v.numpy() for k, v in inputs.items()},
                                                 target=family.explained(net, inputs))
    assert np.all(np.isfinite(result.map))
    assert np.all(result.bias_total != 0)
    assert np.abs(result.relative_delta).max() <= 1e-3


#: (family, library, input elements probed): families without kinks (tanh, sigmoid, GELU; not T5,
#: whose RMSNorm computes its variance in float32 whatever the module's dtype)
TWINS = [
    ("gru classifier (torch)", "torch", 6),
    ("bidirectional gru classifier (torch)", "torch", 6),
    ("bert (transformers)", "transformers", 4),
]


@pytest.mark.parametrize("name, library, probes", TWINS)
def test_float64_twin_gradient_matches_float64_central_differences(name, library, probes):
    """The table's float64 column: the twin's gradient of the same target against central
    differences of the twin (float inputs: ∂y/∂x_i; token ids: Σ_e emb ⊙ ∂y/∂emb per token, the
    difference taken along the token's own embedding, a step of h·emb); the float32 module stays
    float32."""
    pytest.importorskip(library)
    family = bench.ARCHITECTURES[name]
    net, inputs, embeddings = family.build()
    target = family.target(net, inputs)
    twin, doubled, twin_embeddings = bench.float64_twin(net, inputs, embeddings)
    _, got = bench.autograd_gradient(twin, doubled, twin_embeddings, target)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(p.dtype == torch.float64 for p in twin.parameters())
    rows = torch.arange(len(target)), torch.as_tensor(target)
    h, rng = 1e-6, np.random.default_rng(0)
    for flat in rng.choice(got.size, probes, replace=False):
        index = np.unravel_index(flat, got.shape)

        def value(step):
            if twin_embeddings is None:
                x = {k: v.clone() for k, v in doubled.items()}
                name_in = next(k for k, v in x.items() if v.is_floating_point())
                x[name_in][index] += step
                with torch.no_grad():
                    return float(twin(*x.values())[rows].sum())

            def scale(module, args, output):
                output = output.clone()
                output[index] *= 1 + step
                return output

            handle = twin_embeddings.register_forward_hook(scale)
            try:
                with torch.no_grad():
                    return float(twin(*doubled.values())[rows].sum())
            finally:
                handle.remove()

        want = (value(h) - value(-h)) / (2 * h)
        assert abs(got[index] - want) <= 1e-6 * max(1.0, np.abs(got).max()), (index, got[index], want)


def test_float64_twin_of_a_module_that_caches_tensors_computed_from_its_parameters():
    """timm's LeViT and EfficientFormer cache their attention biases (computed from parameters) in
    eval mode: the twin drops the cache (a deep copy refuses non-leaf tensors) and computes it again
    in float64. Oracle: ∂(x W)[n, t]/∂x = W[:, t] with W = w[idx]."""

    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
            self.register_buffer("idx", torch.tensor([2, 0, 1, 3]))
            self.cache = {}

        def forward(self, x):
            if "w" not in self.cache:
                self.cache["w"] = self.w[self.idx]
            return x @ self.cache["w"]

    net, inputs, target = Cached().eval(), {"input": torch.randn(2, 4)}, [0, 2]
    bench.autograd_gradient(net, inputs, None, target)   # fills the cache with a non-leaf tensor
    twin, doubled, _ = bench.float64_twin(net, inputs, None)
    _, got = bench.autograd_gradient(twin, doubled, None, target)
    assert twin.cache["w"].dtype == torch.float64
    want = net.w.detach().double()[net.idx][:, target].T.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-15)


OLD_README = f"""text
{bench.MARK_BEGIN}
| architecture | exporter | opset | nodes | rules on the path (LRP file) | gradient vs autograd \
| LRP conservation | same at ε = 0 | smallest \\|logit\\| |
|---|---|---|---|---|---|---|---|---|
| resnet18 | torchscript | 17 | 65 | gradient 2, normalized 30 | 9.1e-07 | 1.4e-05 | 1.7e-07 | 6.7e-01 |
| vgg11_bn | dynamo | 18 | 28 | gradient 6, normalized 12 | 1.3e-06 | 1.0e-04 | 5.6e-06 | 1.4e-02 |
{bench.MARK_END}
"""

NEW_README = f"""{bench.MARK_BEGIN}
| {" | ".join(bench.COLUMNS)} |
|{"---|" * len(bench.COLUMNS)}
| resnet18 | dynamo | 18 | 49 | gradient 2 | 9.1e-07 | 4.0e-02 | 1.3e-05 | 2.6e-07 | 6.7e-01 | – \
| 2026-12-01, torchvision 0.24.0 |
{bench.MARK_END}
"""

KEPT = [
    (OLD_README, "resnet18", [["resnet18", "torchscript", "17", "65", "gradient 2, normalized 30", "9.1e-07",
                               "–", "1.4e-05", "1.7e-07", "6.7e-01", "–", bench.LEGACY]]),
    (OLD_README, "densenet121", []),
    (NEW_README, "resnet18", [["resnet18", "dynamo", "18", "49", "gradient 2", "9.1e-07", "4.0e-02",
                               "1.3e-05", "2.6e-07", "6.7e-01", "–",
                               "2026-12-01, torchvision 0.24.0; kept: not installed here"]]),
    (NEW_README.replace("0.24.0 |", "0.24.0; kept: not installed here |"), "resnet18",
     [["resnet18", "dynamo", "18", "49", "gradient 2", "9.1e-07", "4.0e-02", "1.3e-05", "2.6e-07", "6.7e-01",
       "–", "2026-12-01, torchvision 0.24.0; kept: not installed here"]]),
]


@pytest.mark.parametrize("readme, name, rows", KEPT)
def test_rows_of_a_missing_library_are_kept_with_what_they_were_measured_with(readme, name, rows):
    assert bench.kept_rows(readme, name) == rows


MERGED = [
    ([], ""),
    (["export: AssertionError: no GQA"], "export: AssertionError: no GQA"),
    (["gradient: TargetError: lost", "lrp-epsilon: TargetError: lost"],
     "gradient, lrp-epsilon: TargetError: lost"),
    (["gradient: ModelError: Pad", "lrp-transformer: TargetError: lost"],
     "gradient: ModelError: Pad; lrp-transformer: TargetError: lost"),
    (["LRP leaks at ε = 0: most at Div node 'd' (Σ out − Σ in = 1.8)"],
     "LRP leaks at ε = 0: most at Div node 'd' (Σ out − Σ in = 1.8)"),
]


@pytest.mark.parametrize("fails, cell", MERGED)
def test_the_failures_of_a_row_are_one_phrase_per_cause(fails, cell):
    assert bench.merged(fails) == cell


SELECTED = [
    (None, "torchvision", ["resnet18", "vgg11_bn", "squeezenet1_1", "mobilenet_v3_small", "efficientnet_b0",
                           "densenet121", "fcn_resnet50", "deeplabv3_mobilenet_v3_large",
                           "lraspp_mobilenet_v3_large", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf",
                           "mnasnet0_5", "shufflenet_v2_x0_5", "googlenet", "mobilenet_v2", "convnext_tiny",
                           "swin_t", "maxvit_t"]),
    (None, "timm", [n for n in bench.ARCHITECTURES if n.endswith(" (timm)")]),
    (None, "onnx", [n for n, m in bench.THIRD_PARTY.items() if m.build is None]),
    (None, "onnxruntime", ["digits CNN int8 QDQ"]),
    ("resnet18,u-net (torch),bert (transformers)", "torchvision,torch", ["resnet18", "u-net (torch)"]),
    ("resnet18,bert (transformers)", None, ["resnet18", "bert (transformers)"]),
    (None, None, [*bench.ARCHITECTURES, *bench.THIRD_PARTY]),
]


@pytest.mark.parametrize("only, library, names", SELECTED)
def test_rows_are_selected_by_name_and_library(only, library, names):
    assert bench.selected({**bench.ARCHITECTURES, **bench.THIRD_PARTY}, only, library) == names
