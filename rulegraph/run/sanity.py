"""Sanity checks of an attribution method (definitions of Quantus 0.6):

- random logit: the similarity (SSIM over the flattened maps, window 7) of the map of the class
  with the map of a random other class, drawn as ``RandomState(seed).randint(0, classes − 1)``
  over the classes without the explained one;
- cascading model-parameter randomization (Adebayo et al. 2018, Quantus ``MPRT``): the layers'
  weights are randomized from the output down, one more layer each step, in a copy of the ONNX
  model (the user's is never changed); at each step the Spearman rank correlation of |map| with
  the original |map|. A layer is a node with float initializers; ``RANDOMIZED_INPUTS`` names the
  inputs randomized where not all (BatchNormalization: scale and bias, not the statistics).
  Each initializer becomes N(0, σ²), σ its own standard deviation (1/√size where that is 0).
Maps are divided by the largest |value| over the batch first (Quantus's ``normalise_by_max``; it
only matters for SSIM).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import RulegraphError
from ..graph import large

#: op type -> the input slots a randomization changes (other ops: every float initializer input)
RANDOMIZED_INPUTS = {"BatchNormalization": (1, 2), "InstanceNormalization": (1, 2),
                     "LayerNormalization": (1, 2), "GroupNormalization": (1, 2)}
SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03


def normalise(a: np.ndarray) -> np.ndarray:
    """``a`` divided by its largest |value| over the whole batch (unchanged when all zero)."""
    a = np.asarray(a)
    return a if np.all(a == 0) else a / np.max(np.abs(a))


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N]: Spearman rank correlation of each row pair (ties share their mean rank)."""
    from .perturbation import pearson

    return pearson(average_ranks(a), average_ranks(b))


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..F per row, tied values given the mean of their ranks."""
    out = np.empty(a.shape, dtype=np.float64)
    for i, row in enumerate(np.asarray(a, dtype=np.float64)):
        order = np.argsort(row, kind="stable")
        values = row[order]
        starts = np.r_[True, values[1:] != values[:-1]]
        group = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        counts = np.diff(np.r_[first, len(row)])
        out[i, order] = (first + (counts - 1) / 2.0 + 1)[group]
    return out


def ssim(a: np.ndarray, b: np.ndarray, window: int = SSIM_WINDOW) -> np.ndarray:
    """[N]: structural similarity of each row pair as 1-D signals (uniform window, sample
    covariance, data range max − min over both rows, the borders of half a window left out)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[1] < window:
        raise RulegraphError(f"SSIM needs at least {window} features per map; these have {a.shape[1]}")
    out = np.empty(len(a))
    kernel = np.ones(window) / window
    for i, (x, y) in enumerate(zip(a, b)):
        span = float(np.abs(max(x.max(), y.max()) - min(x.min(), y.min())))
        mean = [np.convolve(v, kernel, mode="valid") for v in (x, y, x * x, y * y, x * y)]
        ux, uy, uxx, uyy, uxy = mean
        scale = window / (window - 1)
        vx, vy, vxy = scale * (uxx - ux * ux), scale * (uyy - uy * uy), scale * (uxy - ux * uy)
        c1, c2 = (SSIM_K1 * span) ** 2, (SSIM_K2 * span) ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        out[i] = s.mean()
    return out


def off_classes(classes: np.ndarray, n_classes: int, seed: int = 42) -> np.ndarray:
    """[N]: a random class other than each row's, ``RandomState(seed).randint(0, n_classes − 1)``
    indexing the remaining classes in order."""
    pick = np.random.RandomState(seed).randint(0, n_classes - 1, len(classes))
    return pick + (pick >= classes)


def random_logit(explain: Callable, x, a, classes, n_classes: int, seed: int = 42) -> np.ndarray:
    """[N]: SSIM of the normalised map of each row's class with that of a random other class
    (``explain(x, classes)`` gives the maps)."""
    other = explain(x, off_classes(np.asarray(classes), n_classes, seed))
    n = len(x)
    return ssim(normalise(a).reshape(n, -1), normalise(other).reshape(n, -1))


def layers(model: onnx.ModelProto) -> list[tuple[str, list[str]]]:
    """(node name, the initializers it randomizes) of every layer, from the output down."""
    floats = {t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT,
                                                                          onnx.TensorProto.DOUBLE,
                                                                          onnx.TensorProto.FLOAT16)}
    found = []
    for k, node in enumerate(model.graph.node):
        slots = RANDOMIZED_INPUTS.get(node.op_type, range(len(node.input)))
        names = [node.input[s] for s in slots if s < len(node.input) and node.input[s] in floats]
        if names:
            found.append((node.name or f"{node.op_type} #{k}", names))
    return found[::-1]


def randomized(model: onnx.ModelProto, seed: int = 42):
    """Yield (layer, a copy of ``model`` with that layer and every one above it randomized)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    by_name = {t.name: t for t in copy.graph.initializer}
    rng = np.random.RandomState(seed)
    done: set[str] = set()
    for layer, names in layers(copy):
        for name in names:
            if name in done:
                continue
            done.add(name)
            value = large.value(by_name[name])
            sigma = float(value.std()) or 1.0 / np.sqrt(max(value.size, 1))
            by_name[name].CopyFrom(numpy_helper.from_array(
                rng.normal(0.0, sigma, value.shape).astype(value.dtype), name))
        step = onnx.ModelProto()
        step.CopyFrom(copy)
        yield layer, step


def mprt(explain_model: Callable, models, x, a, classes) -> list[tuple[str, np.ndarray]]:
    """[(layer, [N])]: Spearman correlation of |original map| with |map of the model randomized
    down to that layer|, first ``("original", ...)`` with the unchanged model's map.
    ``models``: (layer, model) pairs (``randomized``); ``explain_model(model, x, classes)`` gives
    the maps."""
    n = len(x)
    reference = normalise(np.abs(a)).reshape(n, -1)
    out = []
    for layer, model in models:
        maps = normalise(np.abs(explain_model(model, x, classes))).reshape(n, -1)
        out.append((layer, spearman(reference, maps)))
    return out
