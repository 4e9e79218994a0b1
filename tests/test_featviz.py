"""Feature visualization (run/featviz.py): exact gradients of the host pipeline and the whole pipeline
against float64 finite differences, a rising objective, determinism, errors naming the bad layer/channel."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rulegraph.cli import main
from rulegraph.errors import RulegraphError
from rulegraph.run import featviz
from rulegraph.run.preprocess import Preprocess

DIGITS = str(Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx")


def tiny_model(dtype=TensorProto.DOUBLE, channels=3, size=8) -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> flatten -> MatMul -> Tanh -> reshape to t [1, 4, 2, 2] (onnxruntime has float64
    MatMul and Tanh kernels, not float64 Conv); smooth, so central differences are exact to O(h²)."""
    rng = np.random.default_rng(3)
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (channels * size * size, 16)).astype(np_type), "w"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, 4, 2, 2], np.int64), "shape")]
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w"], ["m"], name="matmul"),
             helper.make_node("Tanh", ["m"], ["h"], name="tanh"),
             helper.make_node("Reshape", ["h", "shape"], ["t"], name="unflatten")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", dtype, [1, channels, size, size])],
                              [helper.make_tensor_value_info("t", dtype, [1, 4, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


TRANSFORMS = [featviz.Transform(), featviz.Transform(pad=2), featviz.Transform(dy=1, dx=-2),
              featviz.Transform(zoom=1.1), featviz.Transform(angle=7.0),
              featviz.Transform(pad=3, dy=-1, dx=2, zoom=0.93, angle=-4.0)]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transform_adjoint(transform):
    """<T(x) - T(0.5), g> == <x - 0.5, T*(g)>: apply is affine (constant 0.5 outside) and adjoint its linear part."""
    rng = np.random.default_rng(0)
    x, g = rng.normal(size=(2, 3, 9, 7)), rng.normal(size=(2, 3, 9, 7))
    lhs = np.sum((transform.apply(x) - transform.apply(np.full_like(x, 0.5))) * g)
    rhs = np.sum((x - 0.5) * transform.adjoint(g))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("channels,height,width", [(3, 8, 8), (3, 7, 9), (1, 6, 5)])
def test_parameterization_gradient(channels, height, width):
    """backward(image, g) against central differences of <forward(p), g> in float64."""
    param = featviz.Parameterization(channels, height, width)
    rng = np.random.default_rng(1)
    p = param.init(2, rng, std=0.3)
    g = rng.normal(size=(2, channels, height, width))
    image, cache = param.forward(p)
    analytic = param.backward(cache, g)
    numeric = np.zeros_like(p)
    h = 1e-6
    for index in np.ndindex(p.shape):
        d = np.zeros_like(p)
        d[index] = h
        numeric[index] = (np.sum(param.forward(p + d)[0] * g) - np.sum(param.forward(p - d)[0] * g)) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


PREPROCESS = [None, Preprocess(scale=255.0, mean=(103.9, 116.8, 123.7), order="BGR"),
              Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]


@pytest.mark.parametrize("spec", PREPROCESS)
@pytest.mark.parametrize("kind", ["channel", "neuron"])
def test_whole_pipeline_gradient(spec, kind):
    """Parameterization + transform + preprocessing + the float64 model (one explainer run) against
    central differences of the objective in float64."""
    vis = featviz.Visualizer(tiny_model(), "t", preprocess=spec)
    seed = featviz.seeds((4, 2, 2), [1, 3], kind, layer="t")
    transform = featviz.Transform(pad=2, dy=1, dx=-1, zoom=1.05, angle=3.0)
    rng = np.random.default_rng(2)
    p = vis.param.init(2, rng, std=0.3)
    objective, grad = vis.objective_and_gradient(p, seed, transform)
    h = 1e-5
    for index in [tuple(rng.integers(0, n) for n in p.shape) for _ in range(12)]:
        d = np.zeros_like(p)
        d[index] = h
        up = vis.objective_and_gradient(p + d, seed, transform)[0].sum()
        down = vis.objective_and_gradient(p - d, seed, transform)[0].sum()
        assert grad[index] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_objective_rises_on_digits():
    """Adam from noise on the digits CNN: every channel's objective ends well above where it began."""
    vis = featviz.Visualizer(DIGITS, _first_relu(DIGITS))
    result = vis.run([0, 1, 2], steps=40, pad=1, jitter=1)
    first, last = result.history[:3].mean(axis=0), result.history[-3:].mean(axis=0)
    assert np.all(last > first + 0.5 * np.abs(first) + 0.1)


def _first_relu(path) -> str:
    model = onnx.load(path)
    return next(n.output[0] for n in model.graph.node if n.op_type == "Relu")


def test_seeded_runs_are_deterministic():
    one = featviz.visualize(tiny_model(TensorProto.FLOAT), "t", [0, 2], steps=5, seed=7)
    two = featviz.visualize(tiny_model(TensorProto.FLOAT), "t", [0, 2], steps=5, seed=7)
    other = featviz.visualize(tiny_model(TensorProto.FLOAT), "t", [0, 2], steps=5, seed=8)
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.history, two.history)
    assert not np.array_equal(one.images, other.images)


def test_direction_seed_is_the_position_mean():
    """A direction d over channels: seed[c, y, x] = d[c] / (h·w), so Σ seed · T = mean over positions of d·T."""
    d = np.array([1.0, -2.0, 0.5, 3.0])
    seed = featviz.seeds((4, 2, 3), None, "direction", d, "t")
    np.testing.assert_array_equal(seed[0], np.broadcast_to(d[:, None, None] / 6, (4, 2, 3)))


ERRORS = [
    (lambda: featviz.Visualizer(tiny_model(TensorProto.FLOAT), "nope"), "no tensor or node 'nope'"),
    (lambda: featviz.visualize(tiny_model(TensorProto.FLOAT), "t", [4]),
     "channel 4 is out of range for tensor 't' with 4 channels"),
    (lambda: featviz.visualize(tiny_model(TensorProto.FLOAT), "t", [0], kind="blob"), "unknown objective 'blob'"),
    (lambda: featviz.visualize(tiny_model(TensorProto.FLOAT), "t", [0], kind="direction", direction=[1.0, 2.0]),
     "a direction for tensor 't' is a vector of its 4 channels"),
    (lambda: featviz.parse_channels("0-x"), "'0-x' is not a channel or a range"),
]


@pytest.mark.parametrize("call,message", ERRORS)
def test_errors_name_the_problem(call, message):
    with pytest.raises(RulegraphError, match=message):
        call()


@pytest.mark.parametrize("text,expected", [("0-3", [0, 1, 2, 3]), ("3,5,9", [3, 5, 9]), ("0-1,8", [0, 1, 8])])
def test_parse_channels(text, expected):
    assert featviz.parse_channels(text) == expected


def test_cli_writes_a_grid(tmp_path, capsys):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(TensorProto.FLOAT), model)
    out = tmp_path / "grid.png"
    assert main(["visualize", str(model), "--layer", "t", "--channels", "0-3", "--steps", "3", "-o", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size[0] > 0
    assert "t channel 3: objective" in capsys.readouterr().out
    assert main(["visualize", str(model), "--layer", "t", "--channels", "9", "--steps", "3", "-o", str(out)]) == 2
    assert "channel 9 is out of range" in capsys.readouterr().err
