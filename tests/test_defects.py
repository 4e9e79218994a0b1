"""Defects found on an architecture corpus (issue 10, item 6), each reproduced on the smallest torch
model that shows it, exported by both torch exporters (``dynamo=False``: TorchScript, opset 17;
``dynamo=True``: torch.export, opset 18), batch 2.

1. LeViT: BatchNorm on tokens flattened to ``[N·T, C]`` (BatchNorm1d after a reshape, Linear + BN);
   LRP-ε with the biases blamed conserves per row (the per-row bias sums are taken over ``[N, -1]``
   with ``N`` from the input, not over axis 0 of the BN's output), and a reduction whose axes are
   an input (opset 18) keeps the batch when it does not reduce axis 0.
2. Swin: the window padding's amounts come from ``Shape`` of an activation whose shape is static
   but for the batch; the reader folds that shape arithmetic to constants (``graph/static_shapes``).
   The legacy export used to be refused (``Pad amounts computed at run time``), the dynamo export
   lost the batch at a Slice with axes as an input and at torch's ``as_strided`` pooling.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rulegraph
from rulegraph.backward import ops as G
from rulegraph.compile import targets

torch = pytest.importorskip("torch", reason="the defects are reproduced on torch models ([crosscheck] extra)")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
nn = torch.nn
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_models as tm  # noqa: E402

EXPORTERS = {"torchscript": False, "dynamo": True}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from the identity, so that each BN has a bias."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
    return model


# --------------------------------------------------------------------------------------------------
# 1. LeViT: BatchNorm on flattened tokens


class LinearBN(nn.Module):
    """LeViT's ``Linear_BN``: a bias-free Linear on ``[N, T, C]``, BatchNorm1d on ``[N·T, C']``."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(a, b, bias=False), nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class TokenBN(nn.Module):
    """Conv patch embedding -> tokens ``[N, T, C]``; a residual MLP of Linear_BN blocks; BatchNorm1d
    on ``x.reshape(N·T, C)``; mean over the tokens; a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up, self.down = LinearBN(8, 16), LinearBN(16, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)
        h = h + self.down(torch.relu(self.up(h)))
        n, t, c = h.shape
        return self.head(self.norm(h.reshape(n * t, c)).reshape(n, t, c).mean(1))


@pytest.fixture(scope="module")
def token_bn(tmp_path_factory):
    net = randomize_batchnorm(tm.seeded(TokenBN))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp("token_bn")
    return net, x, {name: tm.export_onnx(net, x, folder / f"{name}.onnx", dynamo)
                    for name, dynamo in EXPORTERS.items()}


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_batchnorm_on_flattened_tokens_conserves_per_row(token_bn, exporter):
    net, x, paths = token_bn
    result = rulegraph.Explainer(paths[exporter], "lrp-epsilon").explain(x.numpy(), target=[0, 3])
    np.testing.assert_allclose(result.outputs["logits"], net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert result.map.shape == tuple(x.shape)
    bn_shares = [s for s in result.bias_shares.values() if s.shape == (2,) and np.abs(s).max() > 0]
    assert len(result.bias_shares) >= 3 and len(bn_shares) == len(result.bias_shares)  # one per row, blamed
    print(f"\n{exporter}: relative delta per row {result.relative_delta}")
    assert np.abs(result.relative_delta).max() < 1e-3


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_batchnorm_on_flattened_tokens_gradient_equals_autograd(token_bn, exporter):
    net, x, paths = token_bn
    result = rulegraph.Explainer(paths[exporter], "gradient").explain(x.numpy(), target=[0, 3])
    xg = x.clone().requires_grad_(True)
    net(xg)[[0, 1], [0, 3]].sum().backward()
    expected = xg.grad.numpy()
    assert np.abs(result.saliency["input"] - expected).max() / np.abs(expected).max() < 1e-5


def reduce_model(axes: list[int]):
    """x [N, 4, 3] -> Reshape to [-1, 4, 3] (shape inference loses the symbol N there) -> ReduceMean
    (axes as an input, opset 18) -> y."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("ReduceMean", ["r", "axes"], ["y"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes"),
         numpy_helper.from_array(np.array([-1, 4, 3], dtype=np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize(("axes", "state"), [([1], "folded"), ([-2], "folded"), ([0], "lost"), ([-3], "lost"),
                                             ([0, 1], "lost"), ([1, 2], "folded")])
def test_reduction_axes_given_as_an_input_keep_or_lose_the_batch(axes, state):
    graph = G.load(reduce_model(axes))
    assert graph.dim("y", 0) != "N" and targets.batch_state(graph, "y") == state


# --------------------------------------------------------------------------------------------------
# 2. Swin: shape arithmetic on static dims folds


def padding_model(axis_of_size: int):
    """x [N, 5, 6] -> y = Pad(x, pads) with pads = [0, 0, 0, 0, 0, (7 − size % 7) % 7] computed from
    ``Shape(x)[axis_of_size]`` (as torch traces Swin's ``maybe_pad``) -> Relu."""
    ints = {"axis": [axis_of_size], "seven": [7], "zeros": [0, 0, 0, 0, 0]}
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "axis"], ["size"], axis=0),
             helper.make_node("Mod", ["size", "seven"], ["rest"]),
             helper.make_node("Sub", ["seven", "rest"], ["gap"]),
             helper.make_node("Mod", ["gap", "seven"], ["amount"]),
             helper.make_node("Concat", ["zeros", "amount"], ["pads"], axis=0),
             helper.make_node("Pad", ["x", "pads"], ["padded"]),
             helper.make_node("Relu", ["padded"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in ints.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("axis", "pads"), [(1, [0, 0, 0, 0, 0, 2]), (2, [0, 0, 0, 0, 0, 1]),
                                            (-1, [0, 0, 0, 0, 0, 1])])
def test_shape_arithmetic_on_static_dims_folds_to_constants(axis, pads):
    graph = G.load(padding_model(axis))
    assert [n.op_type for n in graph.nodes] == ["Pad", "Relu"]
    np.testing.assert_array_equal(graph.constants[graph.nodes[0].inputs[1]], pads)
    x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
    result = rulegraph.Explainer(padding_model(axis), "gradient").explain(x, target=np.ones((2, 5, 6 + pads[-1])))
    np.testing.assert_array_equal(result.saliency["x"], (x > 0).astype(np.float32))


def test_shape_arithmetic_on_the_batch_is_not_folded():
    """The batch dimension is never a constant: the pads stay computed, and the Pad is refused."""
    graph = G.load(padding_model(0))
    assert "Shape" in [n.op_type for n in graph.nodes]
    with pytest.raises(rulegraph.RulegraphError, match="Pad amounts computed at run time"):
        rulegraph.Explainer(padding_model(0), "gradient").explain(np.ones((2, 5, 6), np.float32),
                                                                  target=np.ones((2, 5, 6)))


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    """A two-stage Swin (window 7 on 16×16 and 8×8 token grids: both pad), random weights."""
    transformers = pytest.importorskip("transformers", reason="Swin comes from transformers")
    config = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                     window_size=7, num_labels=5)
    torch.manual_seed(0)
    net = Logits(transformers.SwinForImageClassification(config).eval())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp("swin")
    return net, x, {name: tm.export_onnx(net, x, folder / f"{name}.onnx", dynamo)
                    for name, dynamo in EXPORTERS.items()}


class Logits(nn.Module):
    """A transformers image classifier as ``pixel_values -> logits``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_swin_gradient_equals_autograd(swin, exporter):
    net, x, paths = swin
    explainer = rulegraph.Explainer(paths[exporter], "gradient")
    pads = [n.inputs[1] for n in explainer.graph.nodes if n.op_type == "Pad"]
    assert pads and all(p in explainer.graph.constants for p in pads)  # the window padding, folded
    result = explainer.explain(x.numpy(), target=[0, 3])
    np.testing.assert_allclose(result.outputs["logits"], net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    net(xg)[[0, 1], [0, 3]].sum().backward()
    expected = xg.grad.numpy()
    error = np.abs(result.saliency["input"] - expected).max() / np.abs(expected).max()
    print(f"\n{exporter}: Swin gradient vs autograd, max relative error {error:.1e}")
    assert error < 1e-4


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_swin_lrp_transformer_conserves(swin, exporter):
    _, x, paths = swin
    result = rulegraph.Explainer(paths[exporter], "lrp-transformer").explain(x.numpy(), target=[0, 3])
    print(f"\n{exporter}: Swin lrp-transformer relative delta per row {result.relative_delta}")
    assert np.abs(result.relative_delta).max() < 1e-3
