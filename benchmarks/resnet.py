"""ResNet-18 for benchmarks, re-implemented without torchvision.

torchvision cannot be installed here, so this is a faithful copy of
``torchvision.models.resnet18``: the same BasicBlock, layer layout
``[2, 2, 2, 2]``, module names and initialisation, so a torchvision
``state_dict`` loads into it unchanged (``model.load_state_dict(sd)``).
Weights are random (seeded), which is all a benchmark of graph size and
explanation speed needs.

Usage::

    python benchmarks/resnet.py /tmp/resnet18.onnx   # export and check vs onnxruntime

The exported file is about 45 MB: do not commit it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        distinct_relus: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=not distinct_relus)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        if distinct_relus:  # the ReLU after the residual sum gets its own module
            self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = getattr(self, "relu_out", self.relu)(out)
        return out


class Bottleneck(nn.Module):
    """torchvision's ResNet-50/101/152 block: 1×1 reduce, 3×3 (stride here, as torchvision's
    "ResNet V1.5"), 1×1 expand ×4, shortcut."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        distinct_relus: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock],
        layers: list[int],
        num_classes: int = 1000,
        distinct_relus: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.distinct_relus = distinct_relus
        self.conv1 = nn.Conv2d(
            3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=not distinct_relus)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [
            block(self.inplanes, planes, stride, downsample, self.distinct_relus)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, distinct_relus=self.distinct_relus)
            )
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18(
    num_classes: int = 1000, seed: int | None = 0, distinct_relus: bool = False
) -> nn.Module:
    """torchvision-compatible ResNet-18 with random weights, in eval mode.

    ``seed`` makes the initialisation reproducible without touching the
    caller's global RNG state; ``None`` uses the global RNG as it is.

    ``distinct_relus=True`` gives every use of a ReLU its own (not in-place)
    ``nn.ReLU`` module: each BasicBlock gets a second one, ``relu_out``, for
    the ReLU after the residual sum, where torchvision calls ``self.relu``
    twice. Captum's DeepLift, GuidedBackprop and Deconvolution hook ReLU
    modules and need one module per use. The function computed, the
    parameters, the initialisation (ReLUs have no parameters, so the RNG
    draws are the same) and the ``state_dict`` are unchanged, and so is the
    exported ONNX graph; the default keeps torchvision's layout exactly.
    """
    kwargs = {"num_classes": num_classes, "distinct_relus": distinct_relus}
    if seed is None:
        model = ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)
    return model.eval()


def resnet50(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """torchvision-compatible ResNet-50 (Bottleneck, ``[3, 4, 6, 3]``), random seeded weights, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
    return model.eval()


def export_resnet18(
    path: str | Path,
    batch: int = 8,
    dynamo: bool = False,
    opset: int = 17,
    inline_identities: bool = True,
) -> Path:
    """Export a seeded :func:`resnet18` to ONNX at ``path``; return the path.

    Eval mode, input ``input`` ``[N,3,224,224]``, output ``logits``
    ``[N,1000]``, dynamic batch axis ``N``; ``batch`` is the batch size of the
    example input used for tracing. Batch norm may be folded into the convs
    (the exporter's default).

    With random init every folded conv bias is all zeros, so the exporter
    deduplicates them into one initializer plus 16 ``Identity`` nodes that a
    real (trained) ResNet-18 export would not have; ``inline_identities``
    turns those back into plain initializers.

    The dynamo exporter has no implementations below opset 18 and cannot
    down-convert this graph (ReduceMean's ``axes`` input), so with
    ``dynamo=True`` the opset is raised to at least 18.
    """
    path = Path(path)
    model = resnet18().eval()
    dummy = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    kwargs: dict = {
        "opset_version": opset,
        "input_names": ["input"],
        "output_names": ["logits"],
        "dynamo": dynamo,
    }
    if dynamo:
        kwargs["opset_version"] = max(opset, 18)
        kwargs["verbose"] = False
        kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("N", min=1, max=1024)}}
        kwargs["external_data"] = False
    else:
        kwargs["dynamic_axes"] = {"input": {0: "N"}, "logits": {0: "N"}}
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript-based ONNX export"
        )
        with torch.no_grad():
            torch.onnx.export(model, (dummy,), str(path), **kwargs)
    if inline_identities:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
        from architectures import inline_initializer_identities

        inline_initializer_identities(path)
    return path


def check_export(path: str | Path, batch: int = 2) -> float:
    """Max abs difference between onnxruntime on ``path`` and the torch model."""
    import numpy as np
    import onnxruntime as ort

    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = resnet18()(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    return float(np.abs(ref - got).max())


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/resnet18.onnx")
    dynamo = "--dynamo" in sys.argv
    export_resnet18(out, dynamo=dynamo)
    print(
        f"{out}: {out.stat().st_size} bytes, max abs diff vs torch {check_export(out):.2e}"
    )
