"""Relevance at any layer (``explain(x, at=...)``) and concept relevance per channel (``crp``):
closed-form numpy replicas on small hand-built models, and conservation over the channels."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import rulegraph
from rulegraph.errors import ModelError, RulegraphError
from rulegraph.run.cam import crp
from tests.oracles import make_model

RNG = np.random.default_rng(7)
W1, B1 = RNG.standard_normal((4, 6)), RNG.standard_normal(6) * 0.1
W2, B2 = RNG.standard_normal((6, 3)), RNG.standard_normal(3) * 0.1
X = RNG.standard_normal((5, 4)).astype(np.float32)
CLASSES = np.array([0, 2, 1, 1, 0])


def dense_model():
    """x [N, 4] -> Gemm -> z1 -> Relu -> h [N, 6] -> Gemm -> y [N, 3]."""
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["z1"], name="dense1"),
             helper.make_node("Relu", ["z1"], ["h"], name="act1"),
             helper.make_node("Gemm", ["h", "W2", "B2"], ["y"], name="dense2")]
    return make_model(nodes, {"x": ["N", 4]}, {"W1": W1, "B1": B1, "W2": W2, "B2": B2}, elem=TensorProto.FLOAT)


def forward(x):
    z1 = x.astype(np.float64) @ W1 + B1
    return z1, np.maximum(z1, 0)


def grad_at_h(x, c):
    return np.broadcast_to(W2[:, c].T, (len(x), 6))


def lrp0_at_h(x, c):
    """LRP-0, bias blamed: R(h_j) = h_j W2[j, c] / z_c · y_c = h_j W2[j, c] (z_c = y_c)."""
    return forward(x)[1] * W2[:, c].T


def lrp0_channel_maps(x, c):
    """R(x_i | unit k) = x_i W1[i, k] / z1_k · R(h_k) (Relu ignored), [N, 6 units, 4 inputs]."""
    z1, _ = forward(x)
    r_h = lrp0_at_h(x, c)
    return x[:, None, :].astype(np.float64) * W1.T[None] / z1[:, :, None] * r_h[:, :, None]


# rule file, tensor named, what is compared, the replica
AT_ROWS = [
    ("gradient", "h", "at_numbers", grad_at_h),
    ("gradient", "h", "at", lambda x, c: forward(x)[1] * grad_at_h(x, c)),
    ("gradient", "z1", "at_numbers", lambda x, c: grad_at_h(x, c) * (forward(x)[0] > 0)),
    ("gradient", "act1", "at_numbers", grad_at_h),          # a node: its output
    ("lrp-0", "h", "at", lrp0_at_h),
    ("lrp-0", "z1", "at", lrp0_at_h),                       # Relu -> ignore passes R(h) on
    ("lrp-0", "dense2", "at", lambda x, c: np.stack([forward(x[i:i + 1])[1][0] @ W2[:, ci] + B2[ci]
                                                     for i, ci in enumerate(c)])[:, None]
     * (np.arange(3) == np.asarray(c)[:, None])),           # the start itself: y ⊙ onehot
]


@pytest.mark.parametrize(("rules", "name", "field", "replica"), AT_ROWS)
def test_relevance_at_a_layer_matches_the_closed_form(rules, name, field, replica):
    result = rulegraph.Explainer(dense_model(), rules).explain(X, target=CLASSES, at=[name])
    (got,) = getattr(result, field).values()
    want = np.stack([replica(X[i:i + 1], c)[0] for i, c in enumerate(CLASSES)]) if name != "dense2" \
        else replica(X, CLASSES)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_relevance_at_the_input_is_the_map():
    result = rulegraph.Explainer(dense_model(), "lrp-epsilon").explain(X, target=CLASSES, at="x")
    np.testing.assert_allclose(result.at["x"], result.map, rtol=0, atol=0)


def test_the_layer_output_comes_from_the_same_run_as_the_map():
    explainer = rulegraph.Explainer(dense_model(), "lrp-epsilon")
    plain, with_at = explainer.explain(X, target=CLASSES), explainer.explain(X, target=CLASSES, at="h")
    np.testing.assert_array_equal(plain.map, with_at.map)
    assert set(with_at.at) == {"h"} and plain.at == {}


AT_ERRORS = [
    ("nowhere", ModelError, "no tensor or node 'nowhere'"),
    ("W1", ModelError, "'W1' is not on the relevance path"),
]


@pytest.mark.parametrize(("name", "error", "message"), AT_ERRORS)
def test_a_layer_the_pass_does_not_reach_is_refused_by_name(name, error, message):
    with pytest.raises(error, match=message):
        rulegraph.Explainer(dense_model(), "gradient").explain(X, target=CLASSES, at=name)


def test_concept_relevance_of_each_unit_matches_the_closed_form():
    concept = crp(rulegraph.Explainer(dense_model(), "lrp-0"), X, "h", target=CLASSES)
    want = np.stack([lrp0_channel_maps(X[i:i + 1], c)[0] for i, c in enumerate(CLASSES)])
    assert concept.maps.shape == (5, 6, 4) and concept.channels == list(range(6))
    np.testing.assert_allclose(concept.maps, want, rtol=1e-5, atol=1e-6)


def test_concept_relevance_of_chosen_channels_are_those_rows():
    explainer = rulegraph.Explainer(dense_model(), "lrp-0")
    every, some = crp(explainer, X, "h", target=CLASSES), crp(explainer, X, "h", [4, 1], target=CLASSES)
    np.testing.assert_allclose(some.maps, every.maps[:, [4, 1]], rtol=0, atol=1e-7)


def conv_model():
    """x [N, 2, 7, 7] -> Conv 4 -> Relu (r1) -> Conv 3 -> Relu -> MaxPool -> GAP -> Flatten -> Gemm [N, 5]."""
    rng = np.random.default_rng(3)
    consts = {"K1": rng.standard_normal((4, 2, 3, 3)), "C1": rng.standard_normal(4) * 0.1,
              "K2": rng.standard_normal((3, 4, 3, 3)), "C2": rng.standard_normal(3) * 0.1,
              "W": rng.standard_normal((5, 3)), "B": rng.standard_normal(5) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "K1", "C1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "K2", "C2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[1, 1], name="pool"),
             helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1, name="fc")]
    return make_model(nodes, {"x": ["N", 2, 7, 7]}, consts, elem=TensorProto.FLOAT)


@pytest.mark.parametrize("rules", ["lrp-epsilon", "lrp-0", "lrp-zplus", "gradient-x-input", "deeplift-rescale"])
@pytest.mark.parametrize("layer", ["r1", "c2", "relu2"])
def test_the_channel_maps_sum_to_the_unconditional_map(rules, layer):
    x = np.random.default_rng(11).standard_normal((3, 2, 7, 7)).astype(np.float32)
    concept = crp(rulegraph.Explainer(conv_model(), rules), x, layer, target=[1, 4, 0])
    full = concept.result.map
    scale = np.abs(full).max()
    np.testing.assert_allclose(concept.maps.sum(axis=1), full, rtol=0, atol=1e-5 * scale)
    # each channel's share of the layer's relevance is what its map carries (up to the leak of the rules)
    assert concept.maps.shape == (3, concept.relevance.shape[1], 2, 7, 7)


CRP_ERRORS = [
    (dict(channels=[6]), "channel 6 is not one of the 6 channels"),
    (dict(channels=[]), "channel \\(none\\) is not one of"),
    (dict(channel_axis=2), "channel_axis 2 does not fit"),
]


@pytest.mark.parametrize(("options", "message"), CRP_ERRORS)
def test_concept_relevance_refuses_channels_the_layer_lacks(options, message):
    with pytest.raises(RulegraphError, match=message):
        crp(rulegraph.Explainer(dense_model(), "lrp-0"), X, "h", target=CLASSES, **options)
