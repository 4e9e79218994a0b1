"""``rulegraph units | represent | crp``: exit codes, the files written and what they hold, against the
Python interface (run/units.py, run/representation.py, run/cam.py ``crp``)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rulegraph import Explainer, crp
from rulegraph.cli import main
from rulegraph.run.representation import represent
from rulegraph.run.units import top_examples

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = str(MODELS / "digits_cnn.onnx")
MLP = str(MODELS / "digits_mlp.onnx")
LAYER = "/features/features.6/Relu_output_0"
SAMPLE = np.load(MODELS / "digits_sample.npz")


@pytest.fixture
def data(tmp_path):
    """40 digits as one .npy (the 8 bundled samples repeated with noise), their labels as .npy and .txt."""
    rng = np.random.default_rng(0)
    x = np.tile(SAMPLE["x"], (5, 1, 1, 1)) + rng.normal(0, 0.05, (40, 1, 8, 8))
    x = np.clip(x, 0, 1).astype(np.float32)
    y = np.tile(SAMPLE["y"], 5).astype(np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "y.txt").write_text("\n".join(str(v) for v in y) + "\n")
    return tmp_path, x, y


def is_png(path: Path) -> bool:
    with Image.open(path) as picture:
        return picture.format == "PNG" and picture.size[0] > 100


def test_units_writes_the_grid_and_the_examples(data, capsys):
    tmp, x, _ = data
    code = main(["units", CNN, "--layer", LAYER, "--input", str(tmp / "x.npy"), "-k", "4", "--units", "0-2,5",
                 "-o", str(tmp / "u.png"), "--json", str(tmp / "u.json"), "--batch-size", "7"])
    assert code == 0 and is_png(tmp / "u.png")
    doc = json.loads((tmp / "u.json").read_text())
    expected = top_examples(CNN, LAYER, list(x), k=4, units=[0, 1, 2, 5])
    assert [u["unit"] for u in doc["units"]] == [0, 1, 2, 5]
    assert [[e["index"] for e in u["examples"]] for u in doc["units"]] == expected.indices.tolist()
    assert [[e["id"] for e in u["examples"]] for u in doc["units"]][0][0] == f"x.npy:{expected.indices[0, 0]}"
    out = capsys.readouterr().out
    assert "receptive field: size 8x8, jump 2x2, start -3,-3" in out and "grid written to" in out


def test_units_dense_layer_warns_in_one_line(data, capsys):
    tmp, _, _ = data
    code = main(["units", MLP, "--layer", "/net/net.4/Relu_output_0", "--input", str(tmp / "x.npy"),
                 "-k", "2", "--units", "0-1", "-o", str(tmp / "u.png")])
    err = capsys.readouterr().err
    assert code == 0 and "rulegraph units: warning: the receptive field" in err and "whole inputs" in err


@pytest.mark.parametrize("args,message", [
    (["--layer", "nope"], "no tensor or node 'nope'"),
    (["--units", "99"], "unit 99 is not one of the 16 units"),
    (["--units", "a-b"], "--units: 'a-b' is not a channel or a range"),
    (["-k", "0"], "k must be a positive integer"),
    (["-o", "grid.txt"], "grid.txt"),
])
def test_units_bad_input_exits_2(data, capsys, args, message):
    tmp, _, _ = data
    base = {"--layer": LAYER, "-o": str(tmp / "u.png"), "-k": "3"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value if flag != "-o" else str(tmp / value)
    code = main(["units", CNN, "--input", str(tmp / "x.npy"), *[v for kv in base.items() for v in kv]])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp / "grid.txt").exists()


def test_represent_map_and_grid(data, capsys):
    tmp, x, y = data
    code = main(["represent", MLP, "--layer", "/net/net.2/Relu_output_0", "--input", str(tmp / "x.npy"),
                 "--labels", str(tmp / "y.txt"), "--method", "pca", "-o", str(tmp / "map.png"),
                 "--grid", str(tmp / "grid.png"), "--quiet"])
    assert code == 0 and is_png(tmp / "map.png") and is_png(tmp / "grid.png")
    out = capsys.readouterr().out
    assert "map of 40 samples written" in out and "unit grid (64 units on 8x8, 8 classes)" in out


@pytest.mark.parametrize("args,message", [
    (["--labels", "short.npy"], "39 labels for 40 samples"),
    (["--labels", "bad.txt"], "bad.txt:2: expected one integer class per line"),
    (["--colour", "label"], "no labels were given"),
    ([], None),
])
def test_represent_exit_codes(data, capsys, args, message):
    tmp, _, y = data
    np.save(tmp / "short.npy", y[:39])
    (tmp / "bad.txt").write_text("1\nseven\n")
    args = [str(tmp / a) if a.endswith((".npy", ".txt")) else a for a in args]
    code = main(["represent", MLP, "--layer", "/net/net.4/Relu_output_0", "--input", str(tmp / "x.npy"),
                 "--method", "pca", "-o", str(tmp / "m.png"), *args])
    assert code == (0 if message is None else 2)
    if message:
        assert message in capsys.readouterr().err
    else:
        assert "coloured by" not in capsys.readouterr().err and is_png(tmp / "m.png")


def test_represent_needs_an_output(data, capsys):
    tmp, _, _ = data
    assert main(["represent", MLP, "--layer", "/net/net.4/Relu_output_0", "--input", str(tmp / "x.npy")]) == 2
    assert "give -o map.png" in capsys.readouterr().err


def test_represent_colours_the_points_it_was_asked_to(data):
    """The map's points are the API's: same embedding for the same data and method."""
    tmp, x, y = data
    found = represent(MLP, "/net/net.4/Relu_output_0", str(tmp / "x.npy"), labels=y, method="pca")
    again = represent(MLP, "/net/net.4/Relu_output_0", list(x), labels=y, method="pca")
    np.testing.assert_array_equal(found.embedding, again.embedding)
    assert found.ids[3] == "x.npy:3" and again.ids[3] == "3"


def test_crp_maps_sum_to_the_full_map(data, capsys):
    tmp, x, _ = data
    np.save(tmp / "two.npy", x[:2])
    code = main(["crp", CNN, "lrp-epsilon", "--input", str(tmp / "two.npy"), "--layer", LAYER,
                 "--channels", "0-15", "-o", str(tmp / "crp.png"), "--out", str(tmp / "crp.npz")])
    assert code == 0 and is_png(tmp / "crp.png")
    with np.load(tmp / "crp.npz") as saved:
        maps, full, channels = saved["maps"], saved["full"], saved["channels"]
    assert maps.shape == (2, 16, 1, 8, 8) and channels.tolist() == list(range(16))
    # every path from the input to the logits crosses the layer: the 16 channels' maps sum to the full map
    np.testing.assert_allclose(maps.sum(axis=1), full, rtol=1e-4, atol=1e-5)
    reference = crp(Explainer(CNN, "lrp-epsilon"), x[:2], LAYER, channels=range(16))
    np.testing.assert_allclose(maps, reference.maps, rtol=1e-6, atol=1e-7)
    out = capsys.readouterr().out
    assert out.count("row ") == 2 and "channel 15" in out


@pytest.mark.parametrize("args,message", [
    (["--channels", "16"], "channel 16 is not one of the 16 channels"),
    (["--layer", "nope"], "no tensor or node 'nope'"),
    (["--out", "maps.npy"], "maps.npy"),
    (["--target", "12"], "12"),
])
def test_crp_bad_input_exits_2(data, capsys, args, message):
    tmp, x, _ = data
    np.save(tmp / "two.npy", x[:2])
    base = {"--layer": LAYER, "--channels": "0-3"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = str(tmp / value) if flag == "--out" else value
    code = main(["crp", CNN, "lrp-epsilon", "--input", str(tmp / "two.npy"), "-o", str(tmp / "c.png"),
                 *[v for kv in base.items() for v in kv]])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp / "c.png").exists()


def test_units_of_a_sequence_model_draw_whole_sequences(tmp_path, capsys):
    """A [N, T, F] input: no spatial field to cut, each tile the whole [T, F] sample in grey."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).normal(0, 1, (4, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Tanh", ["m"], ["h"])]
    graph = helper.make_graph(nodes, "seq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 6, 5])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "seq.onnx")
    np.save(tmp_path / "s.npy", np.random.default_rng(2).normal(0, 1, (12, 6, 4)).astype(np.float32))
    code = main(["units", str(tmp_path / "seq.onnx"), "--layer", "h", "--input", str(tmp_path / "s.npy"),
                 "-k", "3", "-o", str(tmp_path / "u.png")])
    captured = capsys.readouterr()
    assert code == 0 and is_png(tmp_path / "u.png") and "for 5 units (axis 2)" in captured.out
    assert "whole inputs are shown" in captured.err
