"""The backward's emitter (rulegraph/backward/emit.py): a node equal to one already emitted (op,
inputs, attributes) is not emitted again; Identity (a distinct output name) and the random ops always
are. Checked on the tape itself and on whole explainers: no two emitted nodes compute the same thing.
The answers are the suite's (every rule and VJP test runs through the shared nodes)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rulegraph import Explainer
from rulegraph.backward.emit import NOT_SHARED, Tape

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def test_the_same_node_twice_is_one_node():
    tape = Tape(17, set())
    shape = tape.shape("x", start=2)
    assert tape.shape("x", start=2) == shape
    assert tape.shape("x", start=1) != shape          # other attributes: another node
    assert tape.op("Add", "a", "b") != tape.op("Add", "b", "a")   # operands in another order
    assert tape.op("Mul", "a", tape.scalar(2.0)) == tape.op("Mul", "a", tape.scalar(2.0))
    assert len(tape.nodes) == 5


@pytest.mark.parametrize("op", sorted(NOT_SHARED))
def test_identity_and_random_ops_are_never_shared(op):
    tape = Tape(17, set())
    assert tape.op(op, "x") != tape.op(op, "x")
    assert len(tape.nodes) == 2


def test_multi_output_nodes_are_shared_whole():
    tape = Tape(17, set())
    first = tape.op("Split", "x", tape.ints([1, 1]), outputs=2, axis=0)
    assert tape.op("Split", "x", tape.ints([1, 1]), outputs=2, axis=0) == first
    assert tape.op("Split", "x", tape.ints([1, 1]), outputs=3, axis=0) != first


CASES = [("digits_cnn.onnx", "lrp-epsilon"), ("digits_cnn.onnx", "gradient"),
         ("digits_cnn.onnx", "lrp-composite"), ("digits_resnet.onnx", "lrp-epsilon"),
         ("digits_resnet.onnx", "deeplift-rescale"), ("mnist_lstm.onnx", "lrp-epsilon"),
         ("digits_mlp.onnx", "lrp-alpha2-beta1")]


@pytest.mark.parametrize(("model", "rules"), CASES, ids=[f"{m[:-5]}-{r}" for m, r in CASES])
def test_no_two_emitted_nodes_compute_the_same(model, rules):
    explainer = Explainer(MODELS / model, rules)
    compiled = explainer.compiled(node_sums=True)
    own = {n.name for n in explainer.graph.model.graph.node}
    keys = Counter((n.domain, n.op_type, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute))
                   for n in compiled.model.graph.node if n.name not in own and n.op_type not in NOT_SHARED)
    assert [k[1] for k, count in keys.items() if count > 1] == []
    x = np.load(MODELS / "digits_sample.npz")["x"][:2] if "lstm" not in model else \
        np.random.default_rng(0).random((2, 28, 28), dtype=np.float32)
    result = explainer.explain(x.astype(np.float32), target=[1, 2], node_sums=True, max_amplification=None)
    assert all(np.isfinite(v).all() for v in result.attribution.values())
