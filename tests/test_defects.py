"""Defects found on an architecture corpus (issue 10, item 6), each reproduced on the smallest torch
model that shows it, exported by both torch exporters (``dynamo=False``: TorchScript, opset 17;
``dynamo=True``: torch.export, opset 18), batch 2.

1. LeViT: BatchNorm on tokens flattened to ``[N·T, C]`` (BatchNorm1d after a reshape, Linear + BN);
   LRP-ε with the biases blamed conserves per row (the per-row bias sums are taken over ``[N, -1]``
   with ``N`` from the input, not over axis 0 of the BN's output), and a reduction whose axes are
   an input (opset 18) keeps the batch when it does not reduce axis 0.
2. Swin: the window padding's amounts come from ``Shape`` of an activation whose shape is static
   but for the batch; the reader folds that shape arithmetic to constants (``graph/static_shapes``),
   except downstream of sequence ops, whose inferred shapes onnx and onnxruntime disagree on
   (Longformer). Amounts that stay computed at run time (Longformer's number of global tokens) are
   sliced off by the amounts onnxruntime computes.
   The legacy export used to be refused (``Pad amounts computed at run time``), the dynamo export
   lost the batch at a Slice with axes as an input and at torch's ``as_strided`` pooling.
3. GPT-2 with a left-padded row (sdpa and eager attention): the NaN-guarded Softmax of a fully
   masked query row differentiates through its own VJP on the guarded output (its members' chain
   multiplied by the raw, NaN, Softmax); the gradient × input per token equals autograd and
   lrp-transformer conserves. Any NaN/Inf answer for finite inputs is named (``Result.nonfinite``)
   and warned about, with its cause (the forward, or the backward).
4. A MobileNetV2 in small (26 convolutions, 18 ReLU6): rulegraph's float32 gradient equals float64
   autograd with the ReLU6 masks pinned to onnxruntime's float32 forward; unpinned they differ where
   masks flip between the two precisions (counted and printed; README, "Comparing gradients with
   other tools").
5. EfficientViT's linear attention pads its values with a row of ones: a Pad whose constant value is
   not 0 is a bias at the padded elements (their relevance is its share, reported per row), not a
   leak; LRP-0 conserves, the gradient is autograd's, and ``Pad(h, value=c)`` explains as
   ``Pad(h, 0) + frame`` does.
6. A fill value (``masked_fill(mask, c)``: ``Where`` with a constant branch) is a bias at the filled
   elements, reported per row: its share was summed to the fill's own shape (a scalar, over the
   batch too) and onnxruntime refused the explainer. Found on timm's VGG-11, whose
   ``adaptive_avg_pool2d`` to a size that does not divide the input is decomposed by the dynamo
   exporter into Gathers and ``Where`` fills. And a Pad in ``reflect`` or ``edge`` mode (TResNet's
   anti-aliasing blur, ``ReflectionPad2d``, ``ReplicationPad2d``) was refused: it is a route whose
   border elements are copies, their gradient added back to the elements copied.
7. ResNeSt's and SKNet's split attention: a Softmax over the branches weighs them, as a Sigmoid
   weighs a squeeze-excitation gate. The CNN files hold that weight constant (``uniform(
   softmax_constant = 1)``), so no relevance reaches the Softmax, but they were refused for it
   ("does not explain normalizing ops"). Nodes that only held operands read now need no rule
   (``rulegraph ops`` shows them held); LRP-0 is Gradient × Input of the model with the branch
   weights detached.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import rulegraph
from rulegraph.backward import ops as G
from rulegraph.compile import targets
from rulegraph.errors import RulegraphWarning

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
    """The batch dimension is never a constant: the pads stay computed (by 5 for a batch of 2), and the
    Pad's VJP slices by the amounts onnxruntime computes."""
    graph = G.load(padding_model(0))
    assert "Shape" in [n.op_type for n in graph.nodes]
    x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
    result = rulegraph.Explainer(padding_model(0), "gradient").explain(x, target=np.ones((2, 5, 11)))
    np.testing.assert_array_equal(result.saliency["x"], (x > 0).astype(np.float32))


def sequence_shape_model():
    """x [N, 4] -> the indices of its entries (NonZero, [2, k]) split into columns by SplitToSequence
    with a scalar ``split`` of 1 and ``keepdims = 0`` -> ``Shape(Shape(SequenceAt(·, 0)))`` -> x times
    the number of entries of that rank (1). onnx infers the element as [k, 1] (its spec ignores ``keepdims`` where
    ``split`` is given), onnxruntime gives [k]: rank 1 at run time, 2 by inference (Longformer's
    global-attention indices, as torch exports ``unbind``)."""
    nodes = [helper.make_node("Greater", ["x", "low"], ["all"]),
             helper.make_node("NonZero", ["all"], ["where"]),
             helper.make_node("Transpose", ["where"], ["pairs"], perm=[1, 0]),
             helper.make_node("SplitToSequence", ["pairs", "split"], ["columns"], axis=1, keepdims=0),
             helper.make_node("SequenceAt", ["columns", "first"], ["rows"]),
             helper.make_node("Shape", ["rows"], ["size"]),
             helper.make_node("Shape", ["size"], ["rank"]),
             helper.make_node("ConstantOfShape", ["rank"], ["ones"],
                              value=numpy_helper.from_array(np.ones(1, np.float32))),
             helper.make_node("ReduceSum", ["ones"], ["count"], keepdims=0),
             helper.make_node("Mul", ["x", "count"], ["y"])]
    consts = {"low": np.array(-np.inf, np.float32), "split": np.array(1, np.int64),
              "first": np.array(0, np.int64)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_shapes_onnx_and_onnxruntime_disagree_on_are_not_folded():
    """A shape inferred downstream of a sequence op is not folded into a constant: folded, the rank 2
    doubled the explainer's forward and gradient without a word (and made Longformer's fail)."""
    model = sequence_shape_model()
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    expected = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    result = rulegraph.Explainer(model, "gradient").explain(x, target=np.ones((2, 4)))
    np.testing.assert_array_equal(result.outputs["y"], expected)
    np.testing.assert_array_equal(result.outputs["y"], x)
    np.testing.assert_array_equal(result.saliency["x"], np.ones((2, 4), np.float32))


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


# --------------------------------------------------------------------------------------------------
# 3. GPT-2 with sdpa attention: the NaN-guarded Softmax of a fully masked row


GPT2_CASES = [(attention, exporter) for attention in ("sdpa", "eager") for exporter in EXPORTERS]
VOCAB, NEXT = 50, [3, 4]  # the next-token class explained per row, at the last position


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """{attention: torch model}, ids [2, 7], mask (row 1 padded on the left, 3 tokens), {case: path}."""
    transformers = pytest.importorskip("transformers", reason="GPT-2 comes from transformers")
    transformers.logging.set_verbosity_error()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    folder = tmp_path_factory.mktemp("gpt2")
    nets, paths = {}, {}
    for attention in ("sdpa", "eager"):
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                         bos_token_id=0, eos_token_id=0, attn_implementation=attention)
        torch.manual_seed(0)
        nets[attention] = tm.CausalLM(transformers.GPT2LMHeadModel(config).eval())
        for exporter, dynamo in EXPORTERS.items():
            paths[attention, exporter] = tm.export_token_model(nets[attention], ids, mask,
                                                               folder / f"{attention}_{exporter}.onnx", dynamo)
    return nets, ids, mask, paths


@pytest.mark.parametrize(("attention", "exporter"), GPT2_CASES)
def test_gpt2_padded_row_gradient_is_finite_and_equals_autograd(gpt2, attention, exporter):
    nets, ids, mask, paths = gpt2
    feeds = {"ids": ids.numpy(), "mask": mask.numpy()}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "not finite", RulegraphWarning)  # a NaN answer warns
        result = rulegraph.Explainer(paths[attention, exporter], "gradient").explain(
            feeds, target=rulegraph.Target(NEXT, at=6))
    session = onnxruntime.InferenceSession(str(paths[attention, exporter]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(result.outputs["logits"], session.run(["logits"], feeds)[0], rtol=1e-5, atol=1e-6)
    real = mask.numpy() == 1  # torch's own values at padded queries differ by exporter; the next token's agree
    np.testing.assert_allclose(result.outputs["logits"][real], nets[attention](ids, mask).detach().numpy()[real],
                               rtol=1e-4, atol=1e-5)
    expected = tm.token_gradient_x_input(nets[attention], ids, mask, NEXT)
    assert np.isfinite(result.map).all() and not result.nonfinite
    np.testing.assert_array_equal(result.map[expected == 0], 0.0)  # the padded tokens
    error = np.abs(result.map - expected).max() / np.abs(expected).max()
    print(f"\n{attention}/{exporter}: gradient × input per token vs autograd, max relative error {error:.1e}")
    assert error < 1e-4


@pytest.mark.parametrize(("attention", "exporter"), GPT2_CASES)
def test_gpt2_padded_row_lrp_transformer_conserves(gpt2, attention, exporter):
    _, ids, mask, paths = gpt2
    feeds = {"ids": ids.numpy(), "mask": mask.numpy()}
    result = rulegraph.Explainer(paths[attention, exporter], "lrp-transformer").explain(
        feeds, target=rulegraph.Target(NEXT, at=6))
    assert np.isfinite(result.map).all() and not result.nonfinite
    np.testing.assert_array_equal(result.map[1, :3], 0.0)  # the padded tokens
    assert np.abs(result.relative_delta).max() < 1e-3


# --------------------------------------------------------------------------------------------------
# 3b. a NaN or Inf answer is never returned silently


def sqrt_model():
    """y = Sqrt(x) @ I: finite at x = 0 while dy/dx = 1 / (2√x) is not; NaN for x < 0."""
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["s"]), helper.make_node("MatMul", ["s", "v"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32), "v")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


NONFINITE = [  # (x, rules, what is named, the cause's words)
    ([[4.0, 0.0], [1.0, 1.0]], "gradient-x-input", "the attribution of input 'x' holds NaN in row 0 (1 of 4 entries)",
     "the start value is finite there, so the backward pass made them"),
    ([[4.0, 0.0], [1.0, 1.0]], "gradient", "the saliency of input 'x' holds Inf in row 0 (1 of 4 entries)",
     "the backward pass made them"),
    ([[1.0, 1.0], [1.0, -1.0]], "gradient-x-input", "the attribution of input 'x' holds NaN in row 1 (1 of 4 entries)",
     "is not finite in row 1: the model's forward overflowed or divided by zero"),
]


@pytest.mark.parametrize(("x", "rules", "named", "cause"), NONFINITE)
def test_a_nonfinite_answer_for_finite_inputs_is_named_and_warned(x, rules, named, cause):
    with pytest.warns(RulegraphWarning, match="not finite") as caught:
        result = rulegraph.Explainer(sqrt_model(), rules).explain(np.array(x, np.float32), target=[1, 1])
    text = str(caught[0].message)
    assert named in text and cause in text
    assert any(named in sentence and cause in sentence for sentence in result.nonfinite)


def test_nonfinite_inputs_allowed_give_nonfinite_answers_without_a_warning():
    explainer = rulegraph.Explainer(sqrt_model(), "gradient-x-input")
    explainer.allow_nonfinite = True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "not finite", RulegraphWarning)
        result = explainer.explain(np.array([[np.nan, 0.0], [1.0, 1.0]], np.float32), target=[1, 1])
    assert not np.isfinite(result.map).all() and result.nonfinite == []


# --------------------------------------------------------------------------------------------------
# 4. deep ReLU6 CNNs: float32 against float64 differ by mask flips, not by the rules


def conv_bn(i: int, o: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(i, o, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(o)] + (
        [nn.ReLU6()] if act else [])


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand, 3×3 depthwise, 1×1 project (Conv-BN-ReLU6, no ReLU6 last);
    a residual where the shapes allow."""

    def __init__(self, i: int, o: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        h = i * expand
        self.body = nn.Sequential(*conv_bn(i, h), *conv_bn(h, h, 3, stride, h), *conv_bn(h, o, act=False))
        self.residual = stride == 1 and i == o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MiniMobileNet(nn.Module):
    """26 convolutions, 18 ReLU6 (a MobileNetV2 in small): stem, 8 inverted residual blocks, a 1×1
    head, mean pooling, a Linear classifier."""

    BLOCKS = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1), (32, 32, 1), (32, 48, 2), (48, 48, 1)]

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_bn(3, 16, 3, 2), *[InvertedResidual(*b) for b in self.BLOCKS],
                                      *conv_bn(48, 96))
        self.head = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def calibrated_mobilenet() -> nn.Module:
    """Random weights; BatchNorm statistics measured on random inputs (so each BN centres its
    output, as trained ones do, which puts many pre-activations near the ReLU6 kink at 0), then
    random affine parameters."""
    net = tm.seeded(MiniMobileNet)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        net.train()
        for _ in range(2):
            net(torch.randn(8, 3, 64, 64, generator=generator))
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=generator) * 2 + 0.5)
            m.bias.zero_()
    return net.eval()


def clip_inputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """onnxruntime's float32 forward: the input of every Clip node (the ReLU6), in graph order."""
    model = onnx.load(str(path))
    names = [n.input[0] for n in model.graph.node if n.op_type == "Clip"]
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"input": x})


def float64_gradient(net: nn.Module, x: torch.Tensor, target: list[int], masks: list[np.ndarray] | None = None):
    """∂logit[n, target[n]]/∂x in float64 and the ReLU6 masks (0 ≤ z ≤ 6) of its forward; with
    ``masks``, each ReLU6 passes the gradient where the given mask says (its value is still the
    float64 clamp): autograd with the masks pinned."""
    double = MiniMobileNet()
    double.load_state_dict(net.state_dict())
    double = double.double().eval()
    relus = [m for m in double.modules() if isinstance(m, nn.ReLU6)]
    seen = []

    def hook(module, inputs, output):
        z = inputs[0]
        seen.append(((z >= 0) & (z <= 6)).numpy())
        if masks is None:
            return None
        mask = torch.from_numpy(masks[relus.index(module)]).to(z.dtype)
        return z * mask + (output - z * mask).detach()

    handles = [m.register_forward_hook(hook) for m in relus]
    try:
        xd = x.double().requires_grad_(True)
        double(xd)[range(len(target)), target].sum().backward()
    finally:
        for h in handles:
            h.remove()
    return xd.grad.numpy(), seen


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    net = calibrated_mobilenet()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp("mobilenet")
    return net, x, {name: tm.export_onnx(net, x, folder / f"{name}.onnx", dynamo)
                    for name, dynamo in EXPORTERS.items()}


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_deep_relu6_gradient_equals_float64_autograd_with_the_masks_pinned(mobilenet, exporter):
    """rulegraph's float32 gradient against float64 autograd: with the ReLU6 masks pinned to
    onnxruntime's float32 forward they agree to 1e-5 of the largest entry; unpinned, they differ
    where a pre-activation within rounding of 0 or 6 flips its mask (counted), as torch's own
    float32 gradient does."""
    net, x, paths = mobilenet
    target = [0, 3]
    result = rulegraph.Explainer(paths[exporter], "gradient").explain(x.numpy(), target=target)
    ours = result.saliency["input"]
    masks32 = [(z >= 0) & (z <= 6) for z in clip_inputs(paths[exporter], x.numpy())]
    free, masks64 = float64_gradient(net, x, target)
    pinned, _ = float64_gradient(net, x, target, masks32)
    assert [m.shape for m in masks32] == [m.shape for m in masks64] and len(masks32) == 18
    flips = sum(int((a != b).sum()) for a, b in zip(masks32, masks64))
    xf = x.clone().requires_grad_(True)
    net(xf)[range(2), target].sum().backward()

    def error(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    print(f"\n{exporter}: {flips} of {sum(m.size for m in masks32)} ReLU6 mask entries flip between the float32 "
          f"and the float64 forward; max |difference| / max |float64 gradient|: rulegraph unpinned "
          f"{error(ours, free):.1e}, pinned {error(ours, pinned):.1e}; torch float32 {error(xf.grad.numpy(), free):.1e}")
    assert error(ours, pinned) < 1e-5
    if flips == 0:  # no flip: nothing else can differ
        assert error(ours, free) < 1e-5


# --------------------------------------------------------------------------------------------------
# 5. a constant pad value that is not 0: EfficientViT's linear attention pads its values with ones


class OnesPaddedAttention(nn.Module):
    """EfficientViT's LiteMLA in small: ReLU linear attention over the tokens of a strided Conv, the
    values padded with a row of ones (``F.pad(v, (0, 0, 0, 1), value=1)``), so that one product
    ``[v; 1] kᵀ q`` gives the numerators and, in its last row, the normalizer they are divided by."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.qkv = nn.Conv2d(8, 24, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(torch.relu(self.embed(x))).flatten(2).chunk(3, dim=1)   # [N, 8, T] each
        v = nn.functional.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)          # [N, 9, T]
        out = (v @ k.transpose(-1, -2)) @ torch.relu(q)
        out = out[:, :-1] / (out[:, -1:] + 1e-3)
        return self.head(out.mean(-1))


class FramePadded(nn.Module):
    """Conv -> a frame of ``value`` around the feature map -> Conv -> mean -> Linear. With ``pad``
    the frame is ``F.pad(h, value=value)``; without, the same function as a zero pad plus a constant
    frame added (an Add with a constant: a bias under the linear rules)."""

    def __init__(self, pad: bool, value: float = 0.5) -> None:
        super().__init__()
        self.pad, self.value = pad, value
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3)
        self.head = nn.Linear(4, 3)
        frame = nn.functional.pad(torch.zeros(1, 6, 6, 6), (1, 1, 1, 1), value=value)
        self.register_buffer("frame", frame)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))                                                  # [N, 6, 6, 6]
        if self.pad:
            h = nn.functional.pad(h, (1, 1, 1, 1), value=self.value)
        else:
            h = nn.functional.pad(h, (1, 1, 1, 1)) + self.frame
        return self.head(torch.relu(self.conv2(h)).mean((2, 3)))


@pytest.fixture(scope="module")
def ones_padded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ones_padded")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    nets = {"attention": tm.seeded(OnesPaddedAttention), "frame": tm.seeded(FramePadded, pad=True)}
    nets["frame as a bias"] = tm.seeded(FramePadded, pad=False)
    paths = {(name, exporter): tm.export_onnx(net, x, folder / f"{name}-{exporter}.onnx", dynamo)
             for name, net in nets.items() for exporter, dynamo in EXPORTERS.items()}
    return nets, x, paths


PADDED = [(name, exporter) for name in ("attention", "frame") for exporter in EXPORTERS]


@pytest.mark.parametrize(("name", "exporter"), PADDED)
def test_a_nonzero_pad_value_is_a_bias_and_lrp_0_conserves(ones_padded, name, exporter):
    """LRP-0 with the biases blamed: Σ attribution + Σ bias shares = the logit (the padded elements'
    relevance is the Pad's bias share, not a leak)."""
    nets, x, paths = ones_padded
    explainer = rulegraph.Explainer(paths[name, exporter], "lrp-0")
    result = explainer.explain(x.numpy(), target=[0, 2])
    np.testing.assert_allclose(result.outputs["logits"], nets[name](x).detach().numpy(), rtol=1e-4, atol=1e-5)
    pads = {n.name for n in explainer.graph.nodes if n.op_type == "Pad"}
    assert any(node in pads and np.abs(share).max() > 1e-3 for node, share in result.bias_shares.items())
    assert np.abs(result.relative_delta).max() < 1e-5


@pytest.mark.parametrize(("name", "exporter"), PADDED)
def test_a_nonzero_pad_value_leaves_the_gradient_as_autograd(ones_padded, name, exporter):
    nets, x, paths = ones_padded
    result = rulegraph.Explainer(paths[name, exporter], "gradient").explain(x.numpy(), target=[0, 2])
    xg = x.clone().requires_grad_(True)
    nets[name](xg)[[0, 1], [0, 2]].sum().backward()
    expected = xg.grad.numpy()
    assert np.abs(result.saliency["input"] - expected).max() / np.abs(expected).max() < 1e-5


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_a_pad_with_a_value_explains_as_a_zero_pad_plus_a_constant_frame(ones_padded, exporter):
    """Two graphs of one function (RULES.md §4): ``Pad(h, value=c)`` and ``Pad(h, 0) + frame``; under
    LRP-0 the frame's bias share is the relevance at the padded elements, so attribution and bias
    total are equal."""
    _, x, paths = ones_padded
    padded, added = (rulegraph.Explainer(paths[name, exporter], "lrp-0").explain(x.numpy(), target=[0, 2])
                     for name in ("frame", "frame as a bias"))
    np.testing.assert_allclose(padded.map, added.map, rtol=1e-5, atol=1e-7 * np.abs(added.map).max())
    np.testing.assert_allclose(sum(padded.bias_shares.values()), sum(added.bias_shares.values()), rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# 6. a constant fill (Where with a constant branch), non-dividing adaptive pooling, border-mode Pads


class Filled(nn.Module):
    """Conv -> ReLU -> a constant fill of the masked positions (``masked_fill(mask, value)``) ->
    ``adaptive_avg_pool2d`` from 6 × 6 to 4 × 4 (4 does not divide 6: overlapping windows) -> a
    reflect, then an edge Pad -> Conv -> mean -> Linear."""

    def __init__(self, value: float = 0.5) -> None:
        super().__init__()
        self.value = value
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3)
        self.head = nn.Linear(4, 3)
        self.register_buffer("mask", torch.rand(1, 6, 6, 6, generator=torch.Generator().manual_seed(2)) < 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x)).masked_fill(self.mask, self.value)              # [N, 6, 6, 6]
        h = nn.functional.adaptive_avg_pool2d(h, 4)                                    # [N, 6, 4, 4]
        h = nn.functional.pad(nn.functional.pad(h, (1, 1, 1, 1), mode="reflect"), (0, 1, 1, 0), mode="replicate")
        return self.head(torch.relu(self.conv2(h)).mean((2, 3)))


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """The dynamo export (the legacy exporter cannot export a non-dividing adaptive pooling)."""
    net = tm.seeded(Filled)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return net, x, tm.export_onnx(net, x, tmp_path_factory.mktemp("filled") / "filled.onnx", True)


def test_a_constant_fill_is_a_bias_per_row_and_lrp_0_is_gradient_x_input(filled):
    """LRP-0 with the biases blamed conserves per row, the fill's Where takes a bias share, and on this
    ReLU network LRP-0 equals Gradient × Input (RULES.md §6)."""
    net, x, path = filled
    explainer = rulegraph.Explainer(path, "lrp-0")
    assert {"Where", "Pad"} <= {n.op_type for n in explainer.graph.nodes}
    result = explainer.explain(x.numpy(), target=[0, 2])
    wheres = {n.name for n in explainer.graph.nodes if n.op_type == "Where"}
    assert any(node in wheres and np.abs(share).max() > 1e-3 for node, share in result.bias_shares.items())
    assert np.abs(result.relative_delta).max() < 1e-5
    xg = x.clone().requires_grad_(True)
    net(xg)[[0, 1], [0, 2]].sum().backward()
    expected = (x * xg.grad).numpy()
    assert np.abs(result.attribution["input"] - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_constant_fill_and_border_pads_leave_the_gradient_as_autograd(filled):
    net, x, path = filled
    result = rulegraph.Explainer(path, "gradient").explain(x.numpy(), target=[0, 2])
    xg = x.clone().requires_grad_(True)
    net(xg)[[0, 1], [0, 2]].sum().backward()
    expected = xg.grad.numpy()
    assert np.abs(result.saliency["input"] - expected).max() / np.abs(expected).max() < 1e-5


# --------------------------------------------------------------------------------------------------
# 7. split attention: a Softmax over branches, held constant by the CNN files


class SplitAttention(nn.Module):
    """ResNeSt's split attention in small: a grouped Conv gives 2 branches of 4 channels, their sum
    pooled -> Linear -> ReLU -> Linear -> a Softmax over the branches per channel weighs them ->
    mean -> Linear. ``held``: the branch weights detached (the model the CNN files explain)."""

    def __init__(self, held: bool = False) -> None:
        super().__init__()
        self.held = held
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.fc1, self.fc2, self.head = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 8, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))                                             # [N, 8, H, W]
        branches = h.reshape(h.shape[0], 2, 4, *h.shape[2:])                     # [N, 2, 4, H, W]
        pooled = branches.sum(1).mean((2, 3), keepdim=True)                      # [N, 4, 1, 1]
        logits = self.fc2(torch.relu(self.fc1(pooled))).reshape(h.shape[0], 2, 4, 1, 1)
        weights = torch.softmax(logits, dim=1)
        out = (branches * (weights.detach() if self.held else weights)).sum(1)   # [N, 4, H, W]
        return self.head(out.mean((2, 3)))


@pytest.fixture(scope="module")
def split_attention(tmp_path_factory):
    net = tm.seeded(SplitAttention)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp("split_attention")
    return net, x, {name: tm.export_onnx(net, x, folder / f"{name}.onnx", dynamo)
                    for name, dynamo in EXPORTERS.items()}


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_split_attention_softmax_is_held_and_lrp_0_is_gradient_x_input_of_the_held_model(split_attention,
                                                                                        exporter):
    net, x, paths = split_attention
    explainer = rulegraph.Explainer(paths[exporter], "lrp-0")
    result = explainer.explain(x.numpy(), target=[0, 2])
    assert np.abs(result.relative_delta).max() < 1e-5
    held = SplitAttention(held=True)
    held.load_state_dict(net.state_dict())
    xg = x.clone().requires_grad_(True)
    held.eval()(xg)[[0, 1], [0, 2]].sum().backward()
    expected = (x * xg.grad).numpy()
    assert np.abs(result.attribution["input"] - expected).max() <= 1e-5 * np.abs(expected).max()
    epsilon = rulegraph.Explainer(paths[exporter], "lrp-epsilon").explain(x.numpy(), target=[0, 2])
    assert np.abs(epsilon.relative_delta).max() < 1e-3


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_split_attention_softmax_shows_as_held_in_ops(split_attention, exporter):
    from rulegraph.compile.plan import HELD, assign, find_start, path_nodes
    _, _, paths = split_attention
    graph = G.load(paths[exporter])
    ruleset = rulegraph.run.rulefiles.load("lrp-epsilon")
    rows = assign(graph, ruleset, path_nodes(graph, find_start(graph, ruleset, None, None)))
    softmax = [r for r in rows if r.node.op_type == "Softmax"]
    assert softmax and all(r.held and r.problem is None for r in softmax)
    assert not any(r.problem for r in rows)
