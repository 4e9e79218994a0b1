"""Rematerialization (rulegraph/compile/remat.py): where the backward reads both ``z`` and
``x = Relu(z)`` (LRP's ``x ⊙ Wᵀ(s)`` and ``z + ε·sign(z)``), it reads a recomputed ``Relu(z)``, and the
forward's ``x`` is no longer kept for it. Oracle: the same explainer compiled without recomputing,
every output bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from rulegraph import Explainer
from rulegraph.compile import remat

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
X = np.load(MODELS / "digits_sample.npz")["x"][:3].astype(np.float32)


def _outputs(explainer) -> dict[str, np.ndarray]:
    compiled = explainer.compiled()
    sess = explainer.session()
    feeds = {explainer.graph.inputs[0]: X, compiled.target_input: np.array([1, 2, 3], np.int64)}
    feeds.update({name: np.zeros_like(X) for name in compiled.baseline_inputs.values()})
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _reads_of_forward_relus(explainer) -> list[str]:
    """Forward Relu outputs the backward reads although it reads their input too."""
    forward = explainer.graph.model.graph.node
    own = {n.name for n in forward}
    relu_of = {n.output[0]: n.input[0] for n in forward if n.op_type == "Relu"}
    backward = [n for n in explainer.compiled().model.graph.node if n.name not in own]
    read = {i for n in backward for i in n.input}
    return sorted(x for x, z in relu_of.items() if x in read and z in read)


CASES = [("digits_cnn.onnx", "lrp-epsilon"), ("digits_resnet.onnx", "lrp-epsilon"),
         ("digits_resnet.onnx", "lrp-composite"), ("digits_cnn.onnx", "lrp-zplus"),
         ("digits_resnet.onnx", "gradient"), ("digits_resnet.onnx", "deeplift-rescale")]


@pytest.mark.parametrize(("model", "rules"), CASES, ids=[f"{m[:-5]}-{r}" for m, r in CASES])
def test_recomputed_relus_give_the_same_outputs(model, rules, monkeypatch):
    explainer = Explainer(MODELS / model, rules)
    got = _outputs(explainer)
    assert _reads_of_forward_relus(explainer) == []
    monkeypatch.setattr(remat, "RECOMPUTED", frozenset())
    plain = Explainer(MODELS / model, rules)
    expected = _outputs(plain)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert np.array_equal(got[name], value, equal_nan=True), name


def test_lrp_epsilon_on_a_cnn_recomputes_its_relus():
    explainer = Explainer(MODELS / "digits_cnn.onnx", "lrp-epsilon")
    again = [n for n in explainer.compiled().model.graph.node if n.name.split("/")[-1].startswith("again_Relu")]
    assert len(again) == 2   # the two conv blocks' Relus, each read by the next layer's x ⊙ Wᵀ(s)


def _node(op, inputs, output):
    return helper.make_node(op, inputs, [output], name=output)


@pytest.mark.parametrize(("backward_reads", "kept", "recomputed"), [
    (["x", "z"], set(), True),     # z read anyway: x recomputed
    (["x"], set(), False),         # z not read: keeping x is cheaper than keeping z
    (["x", "z"], {"x"}, False),    # x is an output of the explainer: kept
])
def test_which_reads_are_recomputed(backward_reads, kept, recomputed):
    forward = [_node("Conv", ["a", "w"], "z"), _node("Relu", ["z"], "x")]
    backward = [_node("Mul", [t, "s"], f"b_{t}") for t in backward_reads]
    names = iter(f"fresh{i}" for i in range(9))
    out = remat.rematerialize(forward, [onnx.NodeProto.FromString(n.SerializeToString()) for n in backward],
                              kept, lambda hint: next(names))
    first = out[0]
    if recomputed:
        assert (first.op_type, list(first.input), list(first.output)) == ("Relu", ["z"], ["fresh0"])
        assert list(out[1].input) == ["fresh0", "s"]
    else:
        assert [list(n.input) for n in out] == [list(n.input) for n in backward]
