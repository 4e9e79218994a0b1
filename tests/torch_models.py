"""Torch helpers for the reference-implementation crosscheck (``tests/test_crosscheck.py``).

* small seeded networks that exercise what the exporters write for functional code, pooling and
  smooth activations (``FunctionalNet``, ``PoolNet``, ``ActNet``);
* ``export_onnx``: one ONNX file from either exporter (TorchScript ``dynamo=False`` opset 17, or
  ``dynamo=True`` opset 18), dynamic batch axis, weights inline (no external data);
* ``for_captum_lrp``: the same network rebuilt so that Captum's LRP accepts it (Captum's LRP needs a
  rule on every leaf module and has none for ``nn.Flatten``, so the flatten moves into ``forward``);
* ``gradient_max_rule``: a Captum ``PropagationRule`` that passes relevance through a max-pool to
  the arg-max unchanged, i.e. rulegraph's ``max -> gradient``;
* ``epsilon_lrp_replica``: an explicit layer-by-layer LRP-ε in float64 for sequential networks, with
  both treatments of max-pooling, used to pin down the one definitional difference between Captum's
  LRP and rulegraph's ``lrp-epsilon`` (see its docstring).

Everything here imports torch; the test module skips before importing this file when torch is
absent, and only ``gradient_max_rule`` needs Captum (imported when called).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def seeded(cls: type[nn.Module], seed: int = 0, **kwargs) -> nn.Module:
    """``cls(**kwargs)`` initialised from ``seed`` without touching the global RNG; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**kwargs)
        # give every BatchNorm non-trivial statistics so that it is not an identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# small networks for the exporter rows


class FunctionalNet(nn.Module):
    """Functional ops the exporters lower differently: F.relu, F.max_pool2d, torch.cat, a residual
    sum and ``x.view``. Input ``[N, 2, 12, 12]``, output ``[N, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.branch_a = nn.Conv2d(6, 4, 3, padding=1)
        self.branch_b = nn.Conv2d(6, 4, 1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(8 * 3 * 3, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)                        # 12 -> 6
        h = torch.cat([F.relu(self.branch_a(h)), F.relu(self.branch_b(h))], dim=1)
        h = F.relu(h + self.mix(h))                                       # residual sum
        h = F.max_pool2d(h, kernel_size=3, stride=2, padding=1)           # 6 -> 3
        h = h.view(h.size(0), -1)
        return self.fc2(F.relu(self.fc1(h)))


class PoolNet(nn.Module):
    """AvgPool2d (with and without padding, ``count_include_pad=False``) and AdaptiveAvgPool2d to
    a grid and to one cell. Input ``[N, 3, 12, 12]``, output ``[N, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool1 = nn.AvgPool2d(2)                                          # 12 -> 6
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool2 = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)  # 6 -> 3
        self.conv3 = nn.Conv2d(8, 12, 1)
        self.adapt = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)
        self.conv4 = nn.Conv2d(8, 4, 3, padding=1)
        self.grid = nn.AdaptiveAvgPool2d(3)                                   # 6 -> 3 (kernel 2)
        self.fc_grid = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool1(F.relu(self.conv1(x)))
        g = self.grid(F.relu(self.conv4(h)))
        h = self.pool2(F.relu(self.conv2(h)))
        h = self.adapt(F.relu(self.conv3(h)))
        return self.fc(torch.flatten(h, 1)) + self.fc_grid(torch.flatten(g, 1))


class ActNet(nn.Module):
    """LeakyReLU, Sigmoid and Tanh modules (conv and dense). Input ``[N, 1, 8, 8]``, output
    ``[N, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.Tanh(),               # 8 -> 4
            nn.Flatten(),
            nn.Linear(64, 32), nn.Sigmoid(),
            nn.Linear(32, 16), nn.LeakyReLU(0.2),
            nn.Linear(16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------------------------------
# export


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, dynamo: bool) -> Path:
    """Export ``model`` at ``path`` as one self-contained ONNX file; input ``input``, output
    ``logits``, dynamic batch axis. ``dynamo=False``: TorchScript exporter, opset 17 (it folds
    BatchNorm into the convolutions in eval mode); ``dynamo=True``: torch.export, opset 18."""
    path = Path(path)
    kwargs: dict = {"input_names": ["input"], "output_names": ["logits"], "dynamo": dynamo}
    if dynamo:
        kwargs.update(opset_version=18, external_data=False, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("N", min=1, max=1024)},))
    else:
        kwargs.update(opset_version=17, dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(model.eval(), (example,), str(path), **kwargs)
    return path


# --------------------------------------------------------------------------------------------------
# Captum LRP


class FlattenInForward(nn.Module):
    """``features`` -> ``torch.flatten(·, 1)`` -> ``classifier``, with no ``nn.Flatten`` module.

    Captum's LRP collects the leaf modules and refuses one without a rule; it has no rule for
    ``nn.Flatten`` (a route op, no arithmetic), so the flatten moves into ``forward``.
    """

    def __init__(self, features: Sequence[nn.Module], classifier: Sequence[nn.Module]) -> None:
        super().__init__()
        # an empty Sequential would be a leaf module without a rule: leave it out (the MLP)
        self.features = nn.Sequential(*features) if features else None
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features is not None:
            x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def sequential_layers(model: nn.Module) -> list[nn.Module]:
    """The leaf modules of the bundled MLP or CNN in forward order (both are plain chains)."""
    return [m for m in model.modules() if not list(m.children())]


def for_captum_lrp(model: nn.Module) -> FlattenInForward:
    """A deep copy of the bundled MLP or CNN (``models/architectures.py``) with the same weights,
    the ``nn.Flatten`` replaced by a functional flatten."""
    layers = [copy.deepcopy(m) for m in sequential_layers(model)]
    cut = next(i for i, m in enumerate(layers) if isinstance(m, nn.Flatten))
    return FlattenInForward(layers[:cut], layers[cut + 1:]).eval()


def gradient_max_rule():
    """A Captum ``PropagationRule`` for max-pooling that passes relevance to the arg-max unchanged.

    Captum's stock rule for MaxPool2d is ``EpsilonRule``: ``R_in = x ⊙ ∂maxpoolᵀ(R / blip(y))``,
    which sends ``R · y / blip(y)`` to the arg-max (``blip(y) = y + ε·sign(y)``), i.e. it leaks an
    ε-share at every pool. rulegraph's bundled ``max -> gradient`` sends all of ``R``. This rule is
    Captum's own hook machinery with the division and the multiplication left out.
    """
    from captum.attr._utils.lrp_rules import EpsilonRule

    class GradientMaxRule(EpsilonRule):
        def _create_backward_hook_input(self, inputs):
            def hook(grad):
                if self._has_single_input:
                    self.relevance_input[grad.device] = grad.data
                else:
                    self.relevance_input[grad.device].append(grad.data)
                grad.replace_out = grad
                return grad

            return hook

        def _create_backward_hook_output(self, outputs):
            def hook(grad):
                self.relevance_output[grad.device] = grad.data
                return grad

            return hook

    return GradientMaxRule()


def _blip(z: torch.Tensor, eps: float) -> torch.Tensor:
    sign = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    return z + eps * sign


def epsilon_lrp_replica(model: nn.Module, x: torch.Tensor, target: Sequence[int], eps: float,
                        maxpool: str) -> torch.Tensor:
    """LRP-ε of a sequential network, layer by layer, in float64 (Bach et al. 2015, Samek eq. 6).

    Start ``R = y ⊙ onehot(target)``. Linear, Conv2d, BatchNorm2d (Bach form, bias in the
    denominator, bias share dropped): ``R_in = x ⊙ ∂zᵀ(R / blip(z))`` where ``z`` is the layer's
    output including its bias, ``blip(z) = z + ε·sign(z)``, ``sign(0) = +1``. ReLU: ``R_in = R``.
    Flatten: reshape. MaxPool2d: ``maxpool="epsilon"`` treats it like a linear layer (Captum's
    stock rule, which sends ``R · y/blip(y)`` to the arg-max); ``maxpool="gradient"`` sends all of
    ``R`` to the arg-max (rulegraph's ``max -> gradient``).
    """
    assert maxpool in ("epsilon", "gradient")
    layers = [copy.deepcopy(m).double() for m in sequential_layers(model)]
    acts = [x.detach().double()]
    with torch.no_grad():
        for layer in layers:
            acts.append(layer(acts[-1]))
    out = acts[-1]
    onehot = F.one_hot(torch.as_tensor(list(target)), out.shape[1]).double()
    relevance = out * onehot
    for layer, a in zip(reversed(layers), reversed(acts[:-1])):
        if isinstance(layer, nn.ReLU):
            continue
        if isinstance(layer, nn.Flatten):
            relevance = relevance.reshape(a.shape)
            continue
        a = a.detach().requires_grad_(True)
        z = layer(a)
        if isinstance(layer, nn.MaxPool2d) and maxpool == "gradient":
            (relevance,) = torch.autograd.grad(z, a, relevance)
            continue
        if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)):
            raise TypeError(f"the replica has no rule for {type(layer).__name__}")
        (c,) = torch.autograd.grad(z, a, relevance / _blip(z.detach(), eps))
        relevance = a.detach() * c
    return relevance


# --------------------------------------------------------------------------------------------------
# Captum's DeepLift, GuidedBackprop, Deconvolution: one module per ReLU use


def relu_calls(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """How often each ``nn.ReLU`` module of ``model`` runs in one forward pass on ``example``.

    Captum's DeepLift (and the modified-ReLU methods, GuidedBackprop and Deconvolution) keep per-
    module state between the forward and the backward pass, so every ReLU use needs its own module:
    every count must be 1. A functional ``F.relu`` is not seen here (and not hooked by Captum)."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            counts[name] = 0
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: counts.__setitem__(name, counts[name] + 1)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return counts


class Clone(nn.Module):
    """``x.clone()``: the identity, as a new tensor (see ``separate_nonlinear_modules``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def separate_nonlinear_modules(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which every module Captum's DeepLift hooks (its
    ``SUPPORTED_NON_LINEAR``: ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus, MaxPool1d/2d/3d,
    Softmax) is followed by a ``Clone``: ``m`` becomes ``nn.Sequential(m, Clone())``. Same
    function, same weights.

    Why: captum 0.9 (``captum/_utils/common.py`` ``_register_backward_hook``) records a module's
    output gradient with a tensor hook on its output tensor and rewrites its input gradient with a
    tensor hook on its input tensor. When a hooked module's output goes straight into another hooked
    module (ReLU → MaxPool2d in the digits CNN, ResNet's stem ReLU → MaxPool2d), both hooks sit on
    the same tensor and run in registration order: the first module records the gradient *before*
    the second one rewrites it, so its DeepLift multiplier uses a stale gradient and the attribution
    no longer sums to ``y − y'`` (captum issue #1104; pull request #1843, "Fix DeepLift adjacent
    nonlinear hooks", after 0.9). A clone between the two gives each hook its own tensor;
    ``nn.Identity`` is not enough (it returns its input tensor itself).
    """
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    copy_ = copy.deepcopy(model)
    targets = [(parent, name, child) for parent in copy_.modules() for name, child in parent.named_children()
               if type(child) in SUPPORTED_NON_LINEAR]
    for parent, name, child in targets:
        setattr(parent, name, nn.Sequential(child, Clone()))
    return copy_.eval()


def deeplift_maxpool2d_accumulating(module, inputs, outputs, grad_input, grad_output, eps: float = 1e-10):
    """Captum 0.9's DeepLift rule for ``nn.MaxPool2d`` (``captum/attr/_core/deep_lift.py``
    ``maxpool``) with two defects fixed, to be put in ``deep_lift.SUPPORTED_NON_LINEAR[nn.MaxPool2d]``.

    The rule, unchanged: on the batch ``[x; x']``, with ``m = max(y, y')``, the output difference
    ``(m − y')·g`` goes to x's arg-max and ``(y − m)·g`` to x''s arg-max (one of the two is 0, so
    all of ``(y − y')·g`` goes to the arg-max of the side with the larger max), both halves get the
    sum, and the multiplier is that divided by ``Δx`` per input cell; where ``|Δx| < eps`` the plain
    gradient.

    1. Captum spreads the windows' values back with ``F.max_unpool2d``, which *assigns*: where
       windows overlap (kernel > stride, e.g. ResNet's 3×3 stride-2 pool) a cell that is the arg-max
       of several windows keeps only one window's value. Here a scatter-add accumulates them.
    2. Captum's fallback reads ``grad_input[0]``, the first *row* of the batch's gradient since
       ``grad_input`` became a tensor (captum issue #1276; pull request #1847). Here all of it.
    """
    with torch.no_grad():
        x, x_ref = inputs.chunk(2)
        y, y_ref = outputs.chunk(2)
        delta_in = torch.cat(2 * [x - x_ref])
        top = torch.max(y, y_ref)
        delta_out = torch.cat([top - y_ref, y - top])
        _, indices = F.max_pool2d(module.input, module.kernel_size, module.stride, module.padding,
                                  module.dilation, module.ceil_mode, True)
        values = (grad_output * delta_out).flatten(2)
        spread = torch.zeros_like(module.input).flatten(2).scatter_add_(2, indices.flatten(2), values)
        first, second = spread.view_as(module.input).chunk(2)
        spread = torch.cat(2 * [first + second])
    return torch.where(delta_in.abs() < eps, grad_input, spread / delta_in)


# --------------------------------------------------------------------------------------------------
# a small BERT-style encoder (tests/test_transformer.py)


class TinyBert(nn.Module):
    """Token and position embeddings, ``layers`` post-LayerNorm encoder layers (multi-head
    self-attention with an additive attention mask, GELU MLP, residuals), a classifier on the first
    token. Inputs: ``ids`` and ``mask`` (int64 ``[N, T]``, mask 1 = attend); output ``[N, classes]``.

    Written out by hand (no ``nn.MultiheadAttention``, whose fused fast path has no export), so that
    both exporters write plain MatMul, Softmax and LayerNormalization nodes."""

    def __init__(self, vocab: int = 50, hidden: int = 16, heads: int = 2, layers: int = 2, ffn: int = 32,
                 max_len: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "qkv": nn.Linear(hidden, 3 * hidden), "out": nn.Linear(hidden, hidden), "norm1": nn.LayerNorm(hidden),
            "up": nn.Linear(hidden, ffn), "down": nn.Linear(ffn, hidden), "norm2": nn.LayerNorm(hidden)})
            for _ in range(layers))
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        h = self.norm(self.tokens(ids) + self.positions(torch.arange(t)))
        bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
        for layer in self.layers:
            q, k, v = (part.reshape(n, t, self.heads, -1).transpose(1, 2) for part in layer["qkv"](h).chunk(3, -1))
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, -1)
            h = layer["norm1"](h + layer["out"](context))
            h = layer["norm2"](h + layer["down"](F.gelu(layer["up"](h))))
        return self.head(h[:, 0])


def export_token_model(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, path: str | Path,
                       dynamo: bool) -> Path:
    """As ``export_onnx`` for a model of (``ids``, ``mask``): inputs ``ids``, ``mask``, output ``logits``,
    dynamic batch axis."""
    path = Path(path)
    kwargs: dict = {"input_names": ["ids", "mask"], "output_names": ["logits"], "dynamo": dynamo}
    if dynamo:
        batch = torch.export.Dim("N", min=1, max=1024)
        kwargs.update(opset_version=18, external_data=False, verbose=False,
                      dynamic_shapes=({0: batch}, {0: batch}))
    else:
        kwargs.update(opset_version=17, dynamic_axes={"ids": {0: "N"}, "mask": {0: "N"}, "logits": {0: "N"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(model.eval(), (ids, mask), str(path), **kwargs)
    return path


# --------------------------------------------------------------------------------------------------
# transformers causal language models (tests/test_defects.py, tests/test_llm.py)


class CausalLM(nn.Module):
    """A transformers causal LM as ``(ids, mask) -> logits [N, T, vocab]`` (no KV cache)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids, attention_mask=mask, use_cache=False).logits


def token_gradient_x_input(net: CausalLM, ids: torch.Tensor, mask: torch.Tensor, classes: Sequence[int],
                           position: int = -1) -> np.ndarray:
    """Σ_e emb ⊙ ∂logit[n, position, classes[n]]/∂emb at the token embeddings' output, per token
    ``[N, T]`` (autograd, float32)."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output

    handle = net.net.get_input_embeddings().register_forward_hook(keep)
    try:
        net(ids, mask)[range(len(classes)), position, list(classes)].sum().backward()
    finally:
        handle.remove()
    emb = captured["emb"]
    return (emb * emb.grad).sum(-1).detach().numpy()
