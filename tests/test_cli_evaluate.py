"""``rulegraph evaluate``: the table, JSON, CSV and plot it writes agree with ``rulegraph.evaluate``;
bad arguments exit 2 with a message that names them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from rulegraph import evaluate
from rulegraph.cli import main
from rulegraph.run.evaluate import Settings

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN, SAMPLE = MODELS / "digits_cnn.onnx", MODELS / "digits_sample.npz"
FAST = ["--metrics", "region,pixel", "--patch-size", "2", "--regions", "4", "--step", "16"]


def test_evaluate_writes_table_json_csv_and_plot(tmp_path, capsys):
    out = {k: tmp_path / f"e.{k}" for k in ("json", "csv", "png")}
    code = main(["evaluate", str(CNN), "--rules", "lrp-epsilon,gradient", "--input", str(SAMPLE), *FAST,
                 "--json", str(out["json"]), "--csv", str(out["csv"]), "--plot", str(out["png"])])
    printed = capsys.readouterr().out
    assert code == 0
    x = np.load(SAMPLE)["x"]
    api = evaluate(CNN, ["lrp-epsilon", "gradient"], x, metrics=["region", "pixel"],
                   settings=Settings(patch_size=2, regions=4, features_in_step=16))
    data = json.loads(out["json"].read_text())
    for method in api.methods:
        for metric in api.metrics:
            np.testing.assert_allclose(data["methods"][method][metric]["values"], api.scores[method][metric])
    rows = list(csv.DictReader(out["csv"].open()))
    assert len(rows) == len(api.methods) * len(api.metrics) * len(x)
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"ranking: {' > '.join(api.ranking())}" in printed
    assert printed.splitlines()[0].split()[:4] == ["method", "aopc_morf", "aopc_lerf", "abpc"]


def test_evaluate_reads_several_image_files(tmp_path, capsys):
    png = MODELS / "digit_3.png"
    code = main(["evaluate", str(CNN), "--rules", "gradient", "--input", f"{png},{png}", "--scale", "1",
                 "--resize", "8", "--metrics", "region", "--patch-size", "4", "--no-random"])
    assert code == 0
    assert "2 samples; ranked by abpc" in capsys.readouterr().out


ERRORS = {
    "unknown family": (["--metrics", "regions"], "unknown metric family 'regions'; choose from region"),
    "seed target": (["--target", "SEED"], "evaluate scores classes: --target is argmax or class indices"),
    "json suffix": (["--json", "OUT.txt"], "--json"),
    "unknown rank metric": (["--metrics", "pixel", "--step", "16", "--rank-by", "abpc"],
                            "metric 'abpc' was not measured; measured: pf_morf_auc, pf_lerf_auc"),
}


@pytest.mark.parametrize("row", ERRORS)
def test_evaluate_errors(row, tmp_path, capsys):
    args, message = ERRORS[row]
    seed = tmp_path / "seed.npy"
    np.save(seed, np.zeros((8, 10), np.float32))
    args = [str(seed) if a == "SEED" else str(tmp_path / "out.txt") if a == "OUT.txt" else a for a in args]
    code = main(["evaluate", str(CNN), "--rules", "gradient", "--input", str(SAMPLE), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rulegraph evaluate: error: ") and message in err
