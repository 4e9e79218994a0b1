"""Import Zennit (0.5.1) beside a torch that has no matching torchvision.

``zennit/__init__.py`` imports ``zennit/torchvision.py``, which imports ``BasicBlock`` and
``Bottleneck`` from ``torchvision.models.resnet`` for its ResNet canonizer, and nothing else from
torchvision. torchvision's wheels do not import beside the pinned CPU torch, so :func:`load_zennit`
imports zennit with a stand-in ``torchvision.models.resnet`` in ``sys.modules`` (removed again
right after). The stand-in's ``BasicBlock`` and ``Bottleneck`` are *registries*: ``isinstance(m,
BasicBlock)`` is true for instances of the classes given to :func:`load_zennit`
(``benchmarks/resnet.py``'s ``BasicBlock``, a copy of torchvision's with the same attribute names
``conv1 bn1 relu conv2 bn2 downsample``), so ``zennit.torchvision.ResNetCanonizer`` canonizes our
ResNet exactly as it canonizes torchvision's. Installed with ``pip install --no-deps zennit==0.5.1``.
"""

from __future__ import annotations

import sys
import types


class _Registry(type):
    """A class whose ``isinstance`` checks are against the classes registered with it."""

    def __instancecheck__(cls, instance) -> bool:
        return isinstance(instance, tuple(cls.members))

    def __subclasscheck__(cls, subclass) -> bool:
        return issubclass(subclass, tuple(cls.members))


class BasicBlock(metaclass=_Registry):
    members: list = []


class Bottleneck(metaclass=_Registry):
    members: list = []


def load_zennit(basic=(), bottleneck=()):
    """The ``zennit`` package, imported with the stand-in ``torchvision.models.resnet`` (see above);
    its ResNet canonizer treats instances of ``basic`` / ``bottleneck`` as torchvision's blocks.

    Raises ``ImportError`` where zennit is not installed."""
    if "zennit.torchvision" not in sys.modules:
        _import_with_stand_in()
    zennit = sys.modules["zennit"]
    for registry, classes in ((zennit.torchvision.ResNetBasicBlock, basic),
                              (zennit.torchvision.ResNetBottleneck, bottleneck)):
        if classes and not hasattr(registry, "members"):
            raise RuntimeError("zennit was imported with the real torchvision: its ResNet canonizer knows "
                               "only torchvision's blocks")
        registry.members.extend(c for c in classes if c not in registry.members)
    return zennit


def _import_with_stand_in() -> None:
    stand_in = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.models",
                                                          "torchvision.models.resnet")}
    stand_in["torchvision"].models = stand_in["torchvision.models"]
    stand_in["torchvision.models"].resnet = stand_in["torchvision.models.resnet"]
    stand_in["torchvision.models.resnet"].BasicBlock = BasicBlock
    stand_in["torchvision.models.resnet"].Bottleneck = Bottleneck
    saved = {name: sys.modules.get(name) for name in stand_in}
    sys.modules.update(stand_in)
    try:
        import zennit
        import zennit.attribution
        import zennit.composites
        import zennit.layer
        import zennit.torchvision  # noqa: F401
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def composite(kind: str, canonizers=()):
    """A Zennit composite by name: ``Epsilon`` (Epsilon(1e-6) on every Conv and Linear, Zennit's base
    map elsewhere: Norm on sums and average pooling, Pass on activations), ``EpsilonPlusFlat`` or
    ``EpsilonGammaBox`` (low -3, high 3: standardized pixels)."""
    zennit = load_zennit()
    composites, canonizers = zennit.composites, list(canonizers)
    if kind == "Epsilon":
        return composites.LayerMapComposite(
            composites.layer_map_base() + [(zennit.types.Linear, zennit.rules.Epsilon(epsilon=1e-6))],
            canonizers=canonizers)
    if kind == "EpsilonPlusFlat":
        return composites.EpsilonPlusFlat(canonizers=canonizers)
    if kind == "EpsilonGammaBox":
        return composites.EpsilonGammaBox(low=-3.0, high=3.0, canonizers=canonizers)
    raise ValueError(f"unknown composite {kind!r}: Epsilon, EpsilonPlusFlat or EpsilonGammaBox")
