"""The README's evaluation table (written by ``benchmarks/evaluate.py --table --write-readme``) says
what the code computes, and shows what issue 11 asks of it on the digits CNN.

Oracles: the table's digits-CNN rows recomputed here (scikit-learn's digits, as the script reads
them); the MPRT cascade of the gradient's saliency on the bundled sample."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from rulegraph import evaluate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bench():
    spec = importlib.util.spec_from_file_location("rulegraph_bench_evaluate", ROOT / "benchmarks" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(marker: str) -> list[list[str]]:
    block = re.search(rf"<!-- {marker} -->\n(.*?)\n<!-- /{marker} -->", README, re.S)
    assert block, f"README.md has no <!-- {marker} --> block"
    lines = [line for line in block.group(1).splitlines() if line.startswith("|")][2:]
    return [[cell.strip().replace("*", "") for cell in line.strip("|").split(" | ")] for line in lines]


def _table() -> dict[tuple[str, str], list[tuple[float, float]]]:
    out = {}
    for model, method, *cells in _rows("evaluation"):
        out[(model.split(" (")[0], method)] = [tuple(float(v) for v in c.split(" ± ")) for c in cells]
    return out


def test_every_bundled_rule_file_and_random_has_a_row_per_digits_model():
    table, bench = _table(), _bench()
    for model in bench.DIGITS:
        assert sorted(m for (name, m) in table if name == model) == sorted([*bench.BUNDLED, "random"])


def test_digits_cnn_rows_are_what_the_code_computes():
    pytest.importorskip("sklearn", reason="the table's digits are scikit-learn's test split")
    bench = _bench()
    x, _ = bench.digits(64)
    methods = ["lrp-epsilon", "integrated-gradients"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = evaluate(ROOT / "models" / "digits_cnn.onnx", methods, x, metrics=["region"],
                      settings=bench.DIGITS_SETTINGS)
    table = _table()
    for method in [*methods, "random"]:
        expected = [bench._cell(ev, method, k) for k in ("aopc_morf", "aopc_lerf", "abpc")]
        assert [f"{m:.3f} ± {s:.3f}" for m, s in table[("digits_cnn", method)]] == expected


def test_digits_cnn_acceptance():
    """AOPC(MoRF) of LRP-ε, the composite and IG clearly above random attributions' (by more than
    three standard errors of the difference); random ABPC within two standard errors of 0."""
    table = _table()
    random_morf, random_abpc = table[("digits_cnn", "random")][0], table[("digits_cnn", "random")][2]
    for method in ("lrp-epsilon", "lrp-composite", "integrated-gradients"):
        mean, sem = table[("digits_cnn", method)][0]
        assert mean - random_morf[0] > 3 * np.hypot(sem, random_morf[1])
    assert abs(random_abpc[0]) < 2 * random_abpc[1]


def test_the_speed_table_names_each_compared_metric():
    names = [row[0] for row in _rows("evaluation-speed")]
    assert [n.split(" (")[0] for n in names] == ["PixelFlipping", "RegionPerturbation", "ROAD",
                                                  "FaithfulnessCorrelation"]


def test_randomizing_the_layers_decorrelates_the_gradient():
    """MPRT on the digits CNN: the gradient's saliency |∇| loses its rank correlation with the
    original as the layers are randomized from the top (below 0.3 at every step), where x ⊙ ∇
    keeps the input's pattern (Adebayo et al. 2018's observation for gradient ⊙ input)."""
    x = np.load(ROOT / "models" / "digits_sample.npz")["x"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saliency = evaluate(ROOT / "models" / "digits_cnn.onnx", ["gradient"], x, metrics=["mprt"],
                            show="saliency", random=False)
        product = evaluate(ROOT / "models" / "digits_cnn.onnx", ["gradient"], x, metrics=["mprt"], random=False)
    steps = [float(v.mean()) for _, v in saliency.layers["gradient"]]
    assert steps[0] == pytest.approx(1.0) and max(steps[1:]) < 0.3
    assert min(float(v.mean()) for _, v in product.layers["gradient"][1:]) > 0.8
