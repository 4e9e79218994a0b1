"""``rulegraph evaluate`` on datasets (run/evaluate_dataset.py): streamed batch by batch.

Oracles: ``evaluate`` on the same arrays in memory, row by row: the whole array for the metrics
without random draws, each batch's array for those with draws (they draw per batch from the seed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rulegraph.errors import RulegraphError
from rulegraph.run.evaluate import Settings, evaluate
from rulegraph.run.evaluate_dataset import evaluate_dataset

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
X = np.load(ROOT / "models" / "digits_sample.npz")["x"][:10].astype(np.float32)
SETTINGS = Settings(patch_size=2, regions=6, features_in_step=16, deletion_steps=8,
                    road_percentages=(10, 50, 90), runs=5, subset=8)
RULES = ["lrp-epsilon", "gradient"]


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, row in enumerate(X):
        np.save(folder / f"s{i:02d}.npy", row[None])   # a .npy holds one sample per row
    return folder


def _sources(tmp_path: Path):
    """The same ten samples as a folder of .npy files, one .npy file, and a generator."""
    np.save(tmp_path / "x.npy", X)
    return {"folder": _folder(tmp_path), "npy": tmp_path / "x.npy", "iterable": (row for row in X)}


def _assert_rows_equal(got, expected, rows=slice(None)):
    assert got.methods == expected.methods
    assert np.array_equal(got.classes, expected.classes[rows])
    for method in expected.methods:
        assert got.scores[method].keys() == expected.scores[method].keys()
        for metric, values in expected.scores[method].items():
            assert np.array_equal(got.scores[method][metric], values[rows], equal_nan=True), (method, metric)


@pytest.mark.parametrize("source", ["folder", "npy", "iterable"])
@pytest.mark.parametrize("batch_size", [1, 4, 10])
def test_deterministic_metrics_equal_the_whole_array(source, batch_size, tmp_path):
    families = ["region", "pixel", "deletion"]
    expected = evaluate(MODEL, RULES, X, metrics=families, settings=SETTINGS, random=False)
    got = evaluate_dataset(MODEL, RULES, _sources(tmp_path)[source], metrics=families, settings=SETTINGS,
                           random=False, batch_size=batch_size, progress=False)
    _assert_rows_equal(got, expected)
    assert got.curves == {}
    assert got.text() == expected.text()


def test_random_draws_equal_each_batch_evaluated(tmp_path):
    families = ["road", "correlation", "random_logit", "mprt", "region"]
    got = evaluate_dataset(MODEL, ["lrp-epsilon"], _folder(tmp_path), metrics=families, settings=SETTINGS,
                           batch_size=4, progress=False)
    parts = [evaluate(MODEL, ["lrp-epsilon"], X[k:k + 4], metrics=families, settings=SETTINGS)
             for k in range(0, len(X), 4)]
    assert got.methods == parts[0].methods == ["lrp-epsilon", "random"]
    assert np.array_equal(got.classes, np.concatenate([p.classes for p in parts]))
    for method in got.methods:
        for metric in parts[0].scores[method]:
            expected = np.concatenate([p.scores[method][metric] for p in parts])
            assert np.array_equal(got.scores[method][metric], expected, equal_nan=True), (method, metric)
        names = [name for name, _ in parts[0].layers[method]]
        assert [name for name, _ in got.layers[method]] == names
        for i, (_, values) in enumerate(got.layers[method]):
            expected = np.concatenate([p.layers[method][i][1] for p in parts])
            assert np.array_equal(values, expected), (method, i)


def test_limit_reads_only_the_first_samples():
    pulled = []

    def samples():
        for i, row in enumerate(X):
            pulled.append(i)
            yield row

    expected = evaluate(MODEL, "lrp-epsilon", X, metrics=["region"], settings=SETTINGS, random=False)
    got = evaluate_dataset(MODEL, "lrp-epsilon", samples(), metrics=["region"], settings=SETTINGS,
                           random=False, batch_size=4, limit=6, progress=False)
    assert pulled == list(range(6))
    _assert_rows_equal(got, expected, slice(0, 6))


def test_cli_dataset_json_equals_the_api(tmp_path):
    from rulegraph.cli import main

    folder = _folder(tmp_path)
    out = tmp_path / "e.json"
    argv = ["evaluate", str(MODEL), "--rules", "lrp-epsilon", "--input", str(folder), "--metrics", "region",
            "--patch-size", "2", "--regions", "6", "--batch-size", "3", "--limit", "7", "--quiet",
            "--json", str(out)]
    assert main(argv) == 0
    written = json.loads(out.read_text())
    expected = evaluate(MODEL, "lrp-epsilon", X[:7], metrics=["region"],
                        settings=Settings(patch_size=2, regions=6))
    assert written["classes"] == expected.classes.tolist()
    for method in expected.methods:
        for metric, values in expected.scores[method].items():
            if method == "random":   # drawn per batch of 3
                continue
            assert written["methods"][method][metric]["values"] == values.tolist(), (method, metric)


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch size must be at least 1, got 0"),
    ({"limit": 0}, "--limit must be at least 1, got 0"),
    ({"target": [1, 2]}, "one target for all samples"),
])
def test_bad_options_are_refused(options, message, tmp_path):
    with pytest.raises(RulegraphError, match=message):
        evaluate_dataset(MODEL, "lrp-epsilon", _folder(tmp_path), progress=False, **options)


def test_empty_iterable_and_plot_are_refused(tmp_path):
    from rulegraph.cli import main

    with pytest.raises(RulegraphError, match="holds no samples"):
        evaluate_dataset(MODEL, "lrp-epsilon", iter([]), progress=False)
    argv = ["evaluate", str(MODEL), "--rules", "lrp-epsilon", "--input", str(_folder(tmp_path)),
            "--plot", str(tmp_path / "c.png")]
    assert main(argv) != 0
