"""The bundled ``lrp-composite`` against Zennit's ``EpsilonPlusFlat`` (the [zennit] extra) on a
small residual network written in torch with its residual sums as ``zennit.layer.Sum`` modules
(what Zennit's ResNet canonizer makes of them), exported by the TorchScript exporter.

Zennit's composite: Flat on the first Conv, ZPlus on the other convolutions, Epsilon on Linear,
Norm on Sum and average pooling, Pass on activations; every stabilizer 1e-6. Its rules keep each
bias in the denominators and drop its share; rulegraph (``bias blame``) reports the share apart,
so the input relevance is the same number. ZPlus also gives ``x⁻w⁻`` a share, which is 0 here:
every convolution but the first (Flat) reads a Relu output. The network has no BatchNorm: without
a canonizer Zennit passes relevance through BatchNorm unchanged, where rulegraph applies ε.

Zennit imports torchvision at import time, for its ResNet canonizer only; torchvision does not
import beside this torch, so the ``zennit`` fixture imports it through ``benchmarks/zennit_shim.py``
(a stand-in ``torchvision.models.resnet`` in ``sys.modules`` while zennit imports). Without zennit
(``pip install --no-deps zennit==0.5.1``, as ``.ci/run`` does) these rows skip.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from test_crosscheck import row_errors

import rulegraph

#: against Zennit, relative to the row's max |reference| (float32 both sides)
ZENNIT_RTOL = 1e-4
TARGETS = [3, 7]
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zennit(torch):
    if importlib.util.find_spec("zennit") is None:
        pytest.skip("zennit is not installed (pip install --no-deps zennit==0.5.1: it requires torchvision, "
                    "so it is not in the crosscheck extra)")
    return _load("rulegraph_test_zennit_shim", BENCHMARKS / "zennit_shim.py").load_zennit()


def test_the_torchvision_stand_in_is_gone_once_zennit_is_imported(zennit):
    """The stand-in lives in ``sys.modules`` only while zennit imports (the dynamo exporter looks
    for torchvision itself): every ``torchvision`` module left there is a real one, with a spec."""
    assert zennit.torchvision.ResNetCanonizer is not None
    left = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "torchvision"}
    assert all(getattr(module, "__spec__", None) is not None for module in left.values()), sorted(left)


def _residual_net(torch, zennit):
    nn = torch.nn

    class Block(nn.Module):
        """conv-relu-conv (+ a strided 1x1 shortcut where the shape changes), Sum, relu."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
            self.shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
            self.sum = zennit.layer.Sum()
            self.relu2 = nn.ReLU()

        def forward(self, x):
            out = self.conv2(self.relu1(self.conv1(x)))
            return self.relu2(self.sum(torch.stack([out, self.shortcut(x)], dim=-1)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, 1, 1)
            self.relu = nn.ReLU()
            self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 8, 1), Block(8, 16, 2))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.blocks(self.relu(self.stem(x)))), 1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20)
        net = Net()
        for m in net.modules():  # biases of the size a folded BatchNorm leaves
            if isinstance(m, nn.Conv2d):
                m.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


def test_composite_matches_zennit_epsilon_plus_flat(torch, zennit, tm, tmp_path):
    net = _residual_net(torch, zennit)
    x = np.random.default_rng(3).uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    onehot = torch.eye(10)[TARGETS]
    with zennit.attribution.Gradient(model=net, composite=zennit.composites.EpsilonPlusFlat()) as attributor:
        _, reference = attributor(xt, lambda out: out * onehot)
    reference = reference.detach().numpy()
    path = tm.export_onnx(net, torch.tensor(x), tmp_path / "residual.onnx", dynamo=False)
    result = rulegraph.Explainer(path, "lrp-composite").explain(x, target=TARGETS)
    err = row_errors(result.map, reference)
    amplification = np.abs(result.map).reshape(2, -1).sum(1) / np.abs(result.start_value)
    print(f"\n[crosscheck] lrp-composite vs zennit EpsilonPlusFlat: max rel err {err.max():.2e}; "
          f"relative delta {np.abs(result.relative_delta).max():.1e}; "
          f"amplification {amplification.max():.2f}")
    assert err.max() <= ZENNIT_RTOL


#: (bundled rule file, composite of ``benchmarks/zennit_shim.py``): pairs that benchmarks/compare.py times
RESNET_ROWS = [("lrp-composite", "EpsilonPlusFlat"), ("lrp-epsilon", "Epsilon")]


@pytest.mark.parametrize(("rules", "kind"), RESNET_ROWS)
def test_rules_match_zennit_on_resnet18_with_its_canonizer(torch, zennit, tm, tmp_path, rules, kind):
    """``benchmarks/resnet.py``'s ResNet-18 (torchvision's layout and attribute names) with Zennit's
    own ``ResNetCanonizer`` (BatchNorm merged, each residual ``+`` a Sum): the shim's stand-in block
    class lets it canonize our BasicBlock as torchvision's. BatchNorm statistics are random, so the
    folded biases are not 0; the exporter folds the same BatchNorms into the convolutions.

    BatchNorm eps is 0 here: Zennit's merge leaves each BatchNorm as an "identity" that keeps its
    eps, ``x / sqrt(1 + eps)``, a factor 1 - 5e-6 per BatchNorm (eps 1e-5) that its relevance and
    its logits pass through; over ResNet-18's BatchNorms that is 3e-4 of the ε row's max (3e-5 of
    the composite's), while with eps 0 both sides compute the same function (8e-7 and 3e-5)."""
    bench = _load("rulegraph_test_zennit_resnet", BENCHMARKS / "resnet.py")
    shim = _load("rulegraph_test_zennit_shim", BENCHMARKS / "zennit_shim.py")
    zennit = shim.load_zennit(basic=(bench.BasicBlock,))
    net = bench.resnet18(num_classes=10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
                m.eps = 0.0  # see the docstring
    x = np.random.default_rng(4).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    path = tm.export_onnx(net, torch.tensor(x), tmp_path / "resnet18.onnx", dynamo=False)
    composite = shim.composite(kind, [zennit.torchvision.ResNetCanonizer()])
    with zennit.attribution.Gradient(model=net, composite=composite) as attributor:
        assert any(hasattr(m, "canonizer_sum") for m in net.modules()), "the canonizer did not apply"
        _, reference = attributor(torch.tensor(x), lambda out: out * torch.eye(10)[TARGETS])
    reference = reference.detach().numpy()
    result = rulegraph.Explainer(path, rules).explain(x, target=TARGETS, max_amplification=None)
    err = row_errors(result.map, reference)
    print(f"\n[crosscheck] {rules} vs zennit {kind} + ResNetCanonizer on ResNet-18: "
          f"max rel err {err.max():.2e}; relative delta {np.abs(result.relative_delta).max():.1e}")
    assert err.max() <= ZENNIT_RTOL
