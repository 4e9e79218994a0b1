"""Models over protobuf's 2 GiB (graph/large.py): with ``large.LARGE_BYTES`` lowered, small models take
the large-model path end to end (external data read into held arrays, shape inference on a shell,
sessions given the held arrays by reference, the explainer saved with its weights beside it). Oracle:
the same model on the in-memory path, bit for bit; onnx's own shape inference; onnx's own external-data
reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from rulegraph import Explainer
from rulegraph.graph import large
from rulegraph.run import runtime

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

#: (model file, rule set)
MODELS = [
    (ROOT / "models" / "digits_cnn.onnx", "lrp-epsilon"),
    (ROOT / "models" / "digits_cnn.onnx", "gradient"),
    (DATA / "mnist-8.onnx", "lrp-epsilon"),
    (DATA / "resnet20_cifar10.onnx", "lrp-epsilon"),
    (DATA / "resnet20_cifar10.onnx", "gradient-x-input"),
]
IDS = [f"{m.stem}-{r}" for m, r in MODELS]


def _input(model: onnx.ModelProto, rows: int = 2) -> np.ndarray:
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    dims[0] = rows if not model.graph.input[0].type.tensor_type.shape.dim[0].dim_value else dims[0]
    return np.random.default_rng(0).standard_normal(dims).astype(np.float32)


def _external_copy(path: Path, folder: Path) -> Path:
    """``path`` re-saved by onnx with every tensor in one external-data file."""
    target = folder / "model.onnx"
    onnx.save(onnx.load(str(path)), str(target), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    return target


@pytest.fixture
def large_path(monkeypatch):
    """Every model is large; records the held arrays given to each session by reference."""
    monkeypatch.setattr(large, "LARGE_BYTES", 0)
    monkeypatch.setattr(large, "SHARE_BYTES", 0)
    shared = []
    real = large.session_parts

    def recording(proto, *args, **kwargs):
        path, arrays = real(proto, *args, **kwargs)
        shared.append(arrays)
        return path, arrays

    monkeypatch.setattr(large, "session_parts", recording)
    return shared


def _outputs(session, feeds: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.parametrize(("model", "rules"), MODELS, ids=IDS)
def test_large_path_equals_in_memory_path(model, rules, tmp_path, large_path, monkeypatch):
    proto = onnx.load(str(model))
    x = _input(proto)
    with monkeypatch.context() as small:
        small.setattr(large, "LARGE_BYTES", 1 << 40)
        small.setattr(large, "HOLD_BYTES", 1 << 40)
        reference = Explainer(model, rules)
        expected = reference.explain(x)
        feeds, compiled, _, _, _ = reference._pass_feeds(x, "argmax", None, False)
        expected_outputs = _outputs(reference.session(), feeds)
    assert not large_path

    explainer = Explainer(_external_copy(model, tmp_path), rules)
    got = explainer.explain(x)
    assert large_path, "no session was made from held weights"
    # the weights are held once: the sessions share the graph's own arrays (those MatMul and Gather
    # read), the model holds stubs for every big one
    constants = {id(v) for v in explainer.graph.constants.values()}
    held = {id(a) for a in explainer.compiled().held}
    assert any(large_path)
    for arrays in large_path:
        assert all(id(a) in constants | held for a in arrays.values())
    stubs = [t for t in explainer.compiled().model.graph.initializer if t.ByteSize() > large.INLINE_BYTES]
    assert stubs == [] and any(large.is_held(t) for t in explainer.compiled().model.graph.initializer)
    # onnxruntime runs on those arrays' own memory (OrtValues over their buffers)
    initializers = explainer.compiled().model.graph.initializer
    arrays = dict(explainer.graph.constants)
    arrays.update({t.name: large.value(t) for t in initializers if large.is_held(t)})
    shared = explainer.session()._rulegraph_weights
    assert all(value.data_ptr() == arrays[name].ctypes.data for name, value in shared.items())
    for field in ("attribution", "saliency", "outputs"):
        assert getattr(got, field).keys() == getattr(expected, field).keys()
        for name, value in getattr(expected, field).items():
            assert np.array_equal(getattr(got, field)[name], value), (field, name)
    assert np.array_equal(got.target, expected.target)
    assert np.array_equal(got.delta, expected.delta)

    (tmp_path / "out").mkdir()
    saved = explainer.save(tmp_path / "out" / "explainer.onnx")
    data = saved.with_name("explainer.onnx.data")
    assert data.is_file()
    shell = onnx.load(str(saved), load_external_data=False)
    inline = [t.name for t in shell.graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() > large.INLINE_BYTES]
    assert inline == []
    assert sorted(p.name for p in saved.parent.iterdir()) == ["explainer.onnx", "explainer.onnx.data"]
    # the saved file with its data: same weights as the compiled explainer in memory (onnx's reader)
    full = onnx.load(str(saved))
    weights = {t.name: numpy_helper.to_array(t) for t in compiled.model.graph.initializer}
    weights = {t.name: large.value(t) for t in explainer.compiled().model.graph.initializer} | weights
    assert {t.name for t in full.graph.initializer} == set(weights)
    for t in full.graph.initializer:
        assert np.array_equal(numpy_helper.to_array(t), weights[t.name], equal_nan=True), t.name
    # and plain onnxruntime runs it to the same numbers
    plain = onnxruntime.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    got_outputs = _outputs(plain, feeds)
    assert set(got_outputs) == set(expected_outputs)
    for name, value in expected_outputs.items():
        assert np.array_equal(got_outputs[name], value), name


@pytest.mark.parametrize(("model", "rules"), MODELS[::2], ids=IDS[::2])
def test_shell_inference_equals_onnx_inference(model, rules, monkeypatch):
    proto = onnx.load(str(model))
    expected = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    monkeypatch.setattr(large, "LARGE_BYTES", 0)
    got = large.infer_shapes(proto, strict_mode=False, data_prop=True)
    assert [vi.SerializeToString() for vi in got.graph.value_info] == \
        [vi.SerializeToString() for vi in expected.graph.value_info]
    assert list(got.graph.output) == list(expected.graph.output)
    big = {t.name for t in proto.graph.initializer if t.ByteSize() > large.INLINE_BYTES}
    assert big and big.isdisjoint(t.name for t in got.graph.initializer)


@pytest.mark.parametrize("typed", [False, True], ids=["raw_data", "float_data"])
def test_write_leaves_the_model_unchanged_and_reads_back(typed, tmp_path):
    rng = np.random.default_rng(1)
    weights = {f"w{i}": rng.standard_normal((40, 9 + i)).astype(np.float32) for i in range(3)}
    small = np.arange(4, dtype=np.int64)
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    if typed:
        inits = [onnx.helper.make_tensor(t.name, t.data_type, t.dims, numpy_helper.to_array(t).ravel())
                 for t in inits]
    nodes = [onnx.helper.make_node("MatMul", ["x", "w0"], ["y"])]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [2, 40])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [2, 9])],
                                   inits + [numpy_helper.from_array(small, "s")])
    proto = onnx.helper.make_model(graph)
    before = proto.SerializeToString()
    large.write(proto, tmp_path / "m.onnx")
    assert proto.SerializeToString() == before
    assert (tmp_path / "m.onnx.data").stat().st_size == sum(w.nbytes for w in weights.values())
    back = onnx.load(str(tmp_path / "m.onnx"))
    values = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    assert set(values) == set(weights) | {"s"}
    for name, w in weights.items():
        assert np.array_equal(values[name], w)
    assert np.array_equal(values["s"], small)


@pytest.mark.parametrize("external", [True, False])
def test_save_external_data_on_request(external, tmp_path):
    model = ROOT / "models" / "digits_cnn.onnx"
    explainer = Explainer(model, "lrp-epsilon")
    path = explainer.save(tmp_path / "e.onnx", external_data=external)
    assert (tmp_path / "e.onnx.data").is_file() == external
    plain = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _input(onnx.load(str(model)))
    feeds, _, _, _, _ = explainer._pass_feeds(x, "argmax", None, False)
    expected = _outputs(explainer.session(), feeds)
    got = _outputs(plain, feeds)
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name


def test_session_of_a_large_proto_equals_bytes_session(monkeypatch):
    proto = onnx.load(str(ROOT / "models" / "digits_cnn.onnx"))
    x = _input(proto)
    feeds = {proto.graph.input[0].name: x}
    expected = _outputs(runtime.session(proto.SerializeToString()), feeds)
    monkeypatch.setattr(large, "LARGE_BYTES", 0)
    got = _outputs(runtime.session(proto), feeds)
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name


def test_checker_and_digest_never_take_the_whole_large_model(monkeypatch):
    """onnx.checker refuses a proto over 2 GiB, and SerializeToString fails: both see pieces."""
    monkeypatch.setattr(large, "LARGE_BYTES", 0)
    checked = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: checked.append(m) or real(m, *a, **k))
    explainer = Explainer(ROOT / "models" / "digits_cnn.onnx", "lrp-epsilon")
    compiled = explainer.compiled()
    big = {t.name for t in compiled.model.graph.initializer if large.is_held(t)}
    assert big and checked
    for model in checked:
        assert big.isdisjoint(t.name for t in model.graph.initializer)
    pieces = list(large.serialized(compiled.model))
    assert len(pieces) == 1 + len(compiled.model.graph.initializer)
    # the digest's pieces are those of the model with its values in it (held or not, one digest)
    whole = large.inline(compiled.model)
    assert not large.holds(whole)
    assert pieces == list(large.serialized(whole))
    assert max(len(p) for p in pieces) < whole.ByteSize()


@pytest.mark.parametrize(("flag", "external"), [([], False), (["--external-data"], True)])
def test_cli_compile_external_data(flag, external, tmp_path):
    from rulegraph.cli import main

    model = ROOT / "models" / "digits_cnn.onnx"
    argv = ["compile", str(model), "--rules", "lrp-epsilon", "-o", str(tmp_path / "e.onnx"), *flag]
    assert main(argv) == 0
    assert (tmp_path / "e.onnx.data").is_file() == external
    plain = onnxruntime.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    explainer = Explainer(model, "lrp-epsilon")
    feeds, _, _, _, _ = explainer._pass_feeds(_input(onnx.load(str(model))), "argmax", None, False)
    expected = _outputs(explainer.session(), feeds)
    got = _outputs(plain, feeds)
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name


@pytest.mark.parametrize("source", ["proto", "file"])
def test_large_model_with_weights_inside_is_held(source, tmp_path, large_path):
    """A large model whose weights are inside the protobuf (a ModelProto, or one file) is held too."""
    model = ROOT / "models" / "digits_cnn.onnx"
    x = _input(onnx.load(str(model)))
    with pytest.MonkeyPatch.context() as small:
        small.setattr(large, "LARGE_BYTES", 1 << 40)
        expected = Explainer(model, "lrp-epsilon").explain(x)
    explainer = Explainer(onnx.load(str(model)) if source == "proto" else model, "lrp-epsilon")
    assert large.holds(explainer.graph.model) and large.holds(explainer.compiled().model)
    got = explainer.explain(x)
    assert any(large_path)
    for name, value in expected.attribution.items():
        assert np.array_equal(got.attribution[name], value), name
    assert np.array_equal(got.delta, expected.delta)
    # saved without external data: the held values are written into the one file
    path = explainer.save(tmp_path / "e.onnx", external_data=False)
    assert not (tmp_path / "e.onnx.data").exists()
    plain = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds, _, _, _, _ = explainer._pass_feeds(x, "argmax", None, False)
    for name, value in _outputs(explainer.session(), feeds).items():
        assert np.array_equal(_outputs(plain, feeds)[name], value), name


SMOOTHGRAD = 'rulegraph 1\ninclude "lrp-epsilon"\nloop smoothgrad(samples = 4)\n'


@pytest.mark.parametrize("what", ["explainer", "loop", "cam"])
def test_held_below_the_large_size(what, tmp_path, monkeypatch):
    """Over ``HOLD_BYTES`` (lowered) but under ``LARGE_BYTES``: weights held, one file saved, the same
    numbers as the in-memory path, and the explainer's digest unchanged (its pieces' bytes)."""
    from rulegraph.run.cam import Cam

    model = ROOT / "models" / "digits_cnn.onnx"
    rules = tmp_path / "smooth.rules"
    rules.write_text(SMOOTHGRAD)
    x = _input(onnx.load(str(model)))

    def build():
        if what == "cam":
            return Cam(model, "gradcam")
        return Explainer(model, rules if what == "loop" else "lrp-epsilon")

    def outputs(built, folder):
        folder.mkdir()
        if what == "cam":
            path = built.save(folder / "m.onnx")
            compiled = built.compiled()
        else:
            path = built.save(folder / "m.onnx")
            compiled = built.saved()
        assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]
        plain = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in plain.get_inputs()]
        feeds = {names[0]: x, names[1]: np.array([1, 0], dtype=np.int64)}
        if len(names) > 2:   # SmoothGrad's noise [S, N, ...], float64
            feeds[names[2]] = np.random.default_rng(2).standard_normal((4, *x.shape))
        return compiled, _outputs(plain, feeds)

    reference = build()
    expected_model, expected = outputs(reference, tmp_path / "memory")
    monkeypatch.setattr(large, "HOLD_BYTES", 0)
    monkeypatch.setattr(large, "SHARE_BYTES", 0)
    held = build()
    got_model, got = outputs(held, tmp_path / "held")
    assert large.holds(got_model.model) and not large.is_large(got_model.model)
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name
    if what == "explainer":
        assert list(large.serialized(got_model.model)) == list(large.serialized(expected_model.model))
        # the file written tensor by tensor reads back as the model with its values (onnx's reader)
        back = onnx.load(str(tmp_path / "held" / "m.onnx"))
        values = {t.name: large.value(t) for t in got_model.model.graph.initializer}
        assert sorted(t.name for t in back.graph.initializer) == sorted(values)
        for t in back.graph.initializer:
            assert np.array_equal(numpy_helper.to_array(t), values[t.name], equal_nan=True), t.name
        assert [n.SerializeToString() for n in back.graph.node] == \
            [n.SerializeToString() for n in got_model.model.graph.node]
        assert np.array_equal(held.explain(x).map, reference.explain(x).map)


def test_a_model_of_a_few_megabytes_holds_its_weights_once(tmp_path, monkeypatch):
    """Over ``HOLD_BYTES`` (1 MiB) of weights, any model holds them as arrays: the graph's constants
    are the arrays, the compiled explainer's big initializers are stubs over them, and the answers
    equal those of the same model read into protobufs."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((256, 1024)).astype(np.float32)   # 1 MiB
    w2 = rng.standard_normal((1024, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((3, 256)).astype(np.float32)
    explainer = Explainer(path, "lrp-epsilon")
    got = explainer.explain(x, target=[0, 1, 2])
    assert large.holds(explainer.compiled().model) and not large.is_large(explainer.compiled().model)
    assert explainer.graph.constants["w1"] is large.value(
        next(t for t in explainer.compiled().model.graph.initializer if t.name == "w1"))
    monkeypatch.setattr(large, "HOLD_BYTES", 1 << 40)
    in_protobuf = Explainer(path, "lrp-epsilon")
    assert not large.holds(in_protobuf.compiled().model)
    expected = in_protobuf.explain(x, target=[0, 1, 2])
    np.testing.assert_array_equal(got.attribution["x"], expected.attribution["x"])
    np.testing.assert_array_equal(got.delta, expected.delta)
