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
    target = family.target(net, inputs)
    input_name, want = bench.autograd_gradient(net, inputs, embeddings, target)
    result = Explainer(path, "gradient").explain({k: v.numpy() for k, v in inputs.items()}, target=target)
    got = result.saliency.get(input_name, result.attribution.get(input_name))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("name, library, dynamo", FAMILIES)
def test_lrp_file_conserves_with_biases_blamed(exported, name, library, dynamo):
    family, net, inputs, _, path = exported(name, library, dynamo)
    result = Explainer(path, family.lrp).explain({k: v.numpy() for k, v in inputs.items()},
                                                 target=family.target(net, inputs))
    assert np.all(np.isfinite(result.map))
    assert np.all(result.bias_total != 0)
    assert np.abs(result.relative_delta).max() <= 1e-3


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
| resnet18 | dynamo | 18 | 49 | gradient 2 | 9.1e-07 | 1.3e-05 | 2.6e-07 | 6.7e-01 | – \
| 2026-12-01, torchvision 0.24.0 |
{bench.MARK_END}
"""

KEPT = [
    (OLD_README, "resnet18", [["resnet18", "torchscript", "17", "65", "gradient 2, normalized 30", "9.1e-07",
                               "1.4e-05", "1.7e-07", "6.7e-01", "–", bench.LEGACY]]),
    (OLD_README, "densenet121", []),
    (NEW_README, "resnet18", [["resnet18", "dynamo", "18", "49", "gradient 2", "9.1e-07", "1.3e-05",
                               "2.6e-07", "6.7e-01", "–",
                               "2026-12-01, torchvision 0.24.0; kept: not installed here"]]),
    (NEW_README.replace("0.24.0 |", "0.24.0; kept: not installed here |"), "resnet18",
     [["resnet18", "dynamo", "18", "49", "gradient 2", "9.1e-07", "1.3e-05", "2.6e-07", "6.7e-01", "–",
       "2026-12-01, torchvision 0.24.0; kept: not installed here"]]),
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
