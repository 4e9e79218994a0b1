"""Model fuzz campaign: mutated ONNX files are explained or refused by name, never anything else.

Sources: the bundled digits MLP and CNN and a hand-built two-layer MLP. Mutations: truncated
bytes, flipped bytes, a dropped initializer, changed input or initializer dims, renamed op types and domains,
opset and IR versions from 1 to 30 and 0 to 13,
external data outside the folder, through a symbolic link or at bad offsets and lengths, shuffled
node order, and tensor/node names that clash with rulegraph's own. Oracle per example: the outcome
is a ``Result`` whose arrays are finite where the plain model's outputs are, or a ``RulegraphError``
whose message names the file, a node, a tensor or an input; never another exception, never a run
over ``TIME_LIMIT_S``; the user's files are byte-identical afterwards. Deterministic
(``derandomize=True``): the counts in the README's "Fuzzed" paragraph come from
``python -m pytest tests/test_fuzz_models.py -s`` (the ``fuzz models:`` line).
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from rulegraph import Explainer
from rulegraph.compile.build import BASELINE_PREFIX, SEED, TARGET
from rulegraph.errors import RulegraphError

ROOT = Path(__file__).resolve().parent.parent
DIGITS = np.load(ROOT / "models" / "digits_sample.npz")["x"][:2]
TIME_LIMIT_S = 20
FUZZ = settings(derandomize=True, deadline=None, max_examples=50, database=None,
                suppress_health_check=list(HealthCheck))
OUTCOMES: collections.Counter = collections.Counter()


def hand_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(rng.normal(size=(6, 64)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "hand",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


SOURCES = {
    "digits_mlp": (lambda: onnx.load(str(ROOT / "models" / "digits_mlp.onnx")), DIGITS),
    "digits_cnn": (lambda: onnx.load(str(ROOT / "models" / "digits_cnn.onnx")), DIGITS),
    "hand_mlp": (hand_mlp, DIGITS.reshape(2, 64)),
}
source_names = st.sampled_from(sorted(SOURCES))


class Hang(Exception):
    """An example ran past TIME_LIMIT_S."""


def _alarm(signum, frame):
    raise Hang(f"ran past {TIME_LIMIT_S} s")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink()}


def attempt(folder: Path, path: Path, x, kind: str) -> str:
    """Explain ``path`` on ``x``; check the oracle (module docstring); returns the outcome."""
    before = _digest(folder)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    try:
        try:
            explainer = Explainer(str(path), "gradient")
            feeds = x if len(explainer.graph.inputs) == 1 else {n: x for n in explainer.graph.inputs}
            result = explainer.explain(feeds)
            outcome = "explained"
            assert all(a.shape[0] == len(x) for a in result.attribution.values())
        except RulegraphError as exc:
            message = str(exc)
            named = [str(path), "node '", "tensor '", "input '", "output '"]
            assert any(n in message for n in named), f"{kind}: the error names nothing: {message}"
            assert "Traceback" not in message
            outcome = "refused"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert _digest(folder) == before, f"{kind}: rulegraph changed the user's files"
    OUTCOMES[(kind, outcome)] += 1
    return outcome


def save(tmp: Path, model: onnx.ModelProto | bytes) -> Path:
    path = tmp / "model.onnx"
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


@pytest.fixture
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def fresh(folder: Path) -> Path:
    """An empty folder per example (hypothesis reuses the fixture across examples)."""
    sub = folder / f"ex{len(list(folder.iterdir()))}"
    sub.mkdir()
    return sub


# byte-level mutations -----------------------------------------------------------------------------


@FUZZ
@given(source=source_names, cut=st.floats(0, 1, exclude_max=True))
def test_truncated_bytes(folder, source, cut):
    make, x = SOURCES[source]
    data = make().SerializeToString()
    tmp = fresh(folder)
    attempt(tmp, save(tmp, data[:int(len(data) * cut)]), x, "truncated")


@FUZZ
@given(source=source_names, flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                           min_size=1, max_size=4))
def test_flipped_bytes(folder, source, flips):
    make, x = SOURCES[source]
    data = bytearray(make().SerializeToString())
    for where, mask in flips:
        data[int(len(data) * where)] ^= mask
    tmp = fresh(folder)
    attempt(tmp, save(tmp, bytes(data)), x, "flipped")


# structural mutations -----------------------------------------------------------------------------


@FUZZ
@given(source=source_names, pick=st.integers(0, 1000))
def test_dropped_initializer(folder, source, pick):
    make, x = SOURCES[source]
    model = make()
    del model.graph.initializer[pick % len(model.graph.initializer)]
    tmp = fresh(folder)
    attempt(tmp, save(tmp, model), x, "dropped initializer")


@FUZZ
@given(source=source_names, dims=st.lists(st.one_of(st.integers(0, 70), st.just("N"), st.none()), max_size=5),
       shapeless=st.booleans())
def test_changed_input_dims(folder, source, dims, shapeless):
    make, x = SOURCES[source]
    model = make()
    tensor_type = model.graph.input[0].type.tensor_type
    tensor_type.ClearField("shape")
    if not shapeless:
        value_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
        tensor_type.shape.CopyFrom(value_info.type.tensor_type.shape)
    tmp = fresh(folder)
    attempt(tmp, save(tmp, model), x, "changed dims")


@FUZZ
@given(source=source_names, pick=st.integers(0, 1000), dims=st.lists(st.integers(0, 70), max_size=5))
def test_changed_initializer_dims(folder, source, pick, dims):
    make, x = SOURCES[source]
    model = make()
    init = model.graph.initializer[pick % len(model.graph.initializer)]
    del init.dims[:]
    init.dims.extend(dims)
    tmp = fresh(folder)
    attempt(tmp, save(tmp, model), x, "initializer dims")


OP_NAMES = ["Relu", "Sigmoid", "Conv", "MatMul", "Gemm", "Add", "Identity", "Softmax", "Reluu", "Foo", ""]


@FUZZ
@given(source=source_names, pick=st.integers(0, 1000), op=st.sampled_from(OP_NAMES),
       domain=st.sampled_from(["", "", "ai.onnx", "com.microsoft", "ai.onnx.ml", "custom.x"]))
def test_renamed_op_or_domain(folder, source, pick, op, domain):
    make, x = SOURCES[source]
    model = make()
    node = model.graph.node[pick % len(model.graph.node)]
    if op:
        node.op_type = op
    node.domain = domain
    tmp = fresh(folder)
    attempt(tmp, save(tmp, model), x, "renamed op")


@FUZZ
@given(source=source_names, opset=st.integers(1, 30), ir_version=st.integers(0, 13))
def test_changed_versions(folder, source, opset, ir_version):
    make, x = SOURCES[source]
    model = make()
    model.opset_import[0].version = opset
    model.ir_version = ir_version
    tmp = fresh(folder)
    attempt(tmp, save(tmp, model), x, "changed versions")


@FUZZ
@given(source=source_names, seed=st.integers(0, 2**16))
def test_shuffled_node_order(folder, source, seed):
    make, x = SOURCES[source]
    model = make()
    nodes = list(model.graph.node)
    random.Random(seed).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    tmp = fresh(folder)
    assert attempt(tmp, save(tmp, model), x, "shuffled") == "explained"


CLASHING = [TARGET, SEED, f"{BASELINE_PREFIX}input", "rg/t_1", "rg", "rg1/x", "rulegraph/target_1"]


@FUZZ
@given(source=source_names, picks=st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(CLASHING)),
                                           min_size=1, max_size=4))
def test_clashing_names(folder, source, picks):
    """Intermediate tensors and node names renamed to rulegraph's own names: always explained."""
    make, x = SOURCES[source]
    model = make()
    g = model.graph
    inner = [t for n in g.node for t in n.output if t not in {o.name for o in g.output}]
    for k, (pick, name) in enumerate(picks):
        old, new = inner[pick % len(inner)], f"{name}" if k == 0 else f"{name}{k}"
        if new in {t for n in g.node for t in list(n.input) + list(n.output)}:
            continue
        for n in g.node:
            n.input[:] = [new if t == old else t for t in n.input]
            n.output[:] = [new if t == old else t for t in n.output]
        inner = [new if t == old else t for t in inner]
        g.node[pick % len(g.node)].name = new
    tmp = fresh(folder)
    assert attempt(tmp, save(tmp, model), x, "clashing names") == "explained"


# external data ------------------------------------------------------------------------------------


def external_model(tmp: Path, model: onnx.ModelProto) -> Path:
    path = tmp / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path


EXTERNAL_EDITS = st.one_of(
    st.tuples(st.just("offset"), st.one_of(st.integers(-5, 10**6).map(str), st.text(max_size=4))),
    st.tuples(st.just("length"), st.one_of(st.integers(-5, 10**6).map(str), st.text(max_size=4))),
    st.tuples(st.just("location"), st.sampled_from(["../weights.bin", "/etc/hostname", "w\0.bin", "",
                                                    "link.bin", "sub/../weights.bin", "missing.bin", "."])),
)


@FUZZ
@given(source=source_names, pick=st.integers(0, 1000), edit=EXTERNAL_EDITS)
def test_external_data(folder, source, pick, edit):
    make, x = SOURCES[source]
    tmp = fresh(folder)
    outside = fresh(folder)
    (outside / "weights.bin").write_bytes(os.urandom(64))
    path = external_model(tmp, make())
    (tmp / "link.bin").symlink_to(outside / "weights.bin")
    proto = onnx.load(str(path), load_external_data=False)
    init = proto.graph.initializer[pick % len(proto.graph.initializer)]
    entries = {e.key: e.value for e in init.external_data} | {edit[0]: edit[1]}
    del init.external_data[:]
    for key, value in entries.items():
        init.external_data.add(key=key, value=value)
    path.write_bytes(proto.SerializeToString())
    outcome = attempt(tmp, path, x, "external data")
    if edit[1] in ("../weights.bin", "/etc/hostname", "link.bin"):
        assert outcome == "refused"


def test_report_counts():
    """Prints the campaign's counts (run after the campaign: ``-s`` shows them)."""
    if OUTCOMES:
        kinds = sorted({k for k, _ in OUTCOMES})
        per_kind = ", ".join(f"{k} {OUTCOMES[(k, 'explained')]}/{OUTCOMES[(k, 'refused')]}" for k in kinds)
        total = sum(OUTCOMES.values())
        print(f"\nfuzz models: {total} examples (explained/refused): {per_kind}")
