"""Torch definitions of the example digit classifiers in this folder.

The ``.onnx`` files next to this module were exported from these classes by
``models/make_models.py``; the matching trained weights are saved as
``models/<name>.pt`` state dicts, so tests can rebuild the exact torch module
with :func:`load_torch` and compare it against the ONNX graph.

All models take a batch of 8x8 grey digits, shape ``[N, 1, 8, 8]``, values in
0..1, and return ``[N, 10]`` logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MODELS_DIR = Path(__file__).resolve().parent


class MLP(nn.Module):
    """Flatten -> Linear(64,64) -> ReLU -> Linear(64,32) -> ReLU -> Linear(32,10)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two conv-bn-relu-maxpool stages, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a skip connection, ReLU after the add.

    The skip is the identity when shape is kept, otherwise a strided 1x1 conv
    followed by batch norm.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Stem conv, two identity residual blocks, one strided block, GAP, linear."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.block1 = BasicBlock(width, width)
        self.block2 = BasicBlock(width, width)
        self.block3 = BasicBlock(width, 2 * width, stride=2)  # 8x8 -> 4x4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        return self.fc(self.flatten(self.pool(x)))


#: model file stem -> torch class
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "digits_mlp": MLP,
    "digits_cnn": CNN,
    "digits_resnet": ResNetSmall,
}


def build(name: str) -> nn.Module:
    """A freshly initialised (untrained) module for ``name``."""
    key = name if name in ARCHITECTURES else f"digits_{name}"
    if key not in ARCHITECTURES:
        raise KeyError(f"unknown model {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[key]()


def load_torch(name: str, models_dir: str | Path | None = None) -> nn.Module:
    """Build the torch module ``name`` and load its trained weights.

    ``name`` is a model file stem (``"digits_mlp"``, ``"digits_cnn"``,
    ``"digits_resnet"``) or the short form (``"mlp"``, ``"cnn"``, ``"resnet"``).
    Weights come from ``<models_dir>/<name>.pt`` (default: this folder). The
    module is returned in eval mode.
    """
    key = name if name in ARCHITECTURES else f"digits_{name}"
    model = build(key)
    path = Path(models_dir) if models_dir is not None else MODELS_DIR
    state = torch.load(path / f"{key}.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model


def inline_initializer_identities(path: Path) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    The exporter deduplicates initializers with equal values and links the
    copies with Identity nodes. In the ResNet, the biases of the two batch
    norms feeding the strided block's Add get identical gradients, so they
    stay equal throughout training and would show up as a stray Identity.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
        onnx.save(model, str(path))
