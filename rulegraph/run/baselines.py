"""Baselines ``x'`` (DeepLIFT's reference, integrated gradients' start): zeros, mean, blur, a file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import RulegraphError
from .inputs import convert, read_npy


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over every axis after the first two (reflecting borders)."""
    radius = max(1, round(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = x.astype(np.float64)
    for axis in range(2, x.ndim):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        out = sum(w * np.take(padded, range(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(taps))
    return out.astype(x.dtype)


def check_baseline_names(baseline, inputs: list[str]) -> None:
    """A dict baseline may only name the model's inputs."""
    if isinstance(baseline, Mapping):
        unknown = [k for k in baseline if k not in inputs]
        if unknown:
            raise RulegraphError(f"the baseline names {unknown}, which the model does not have; its inputs "
                                 f"are {inputs}")


def make_baseline(kind, x: np.ndarray) -> np.ndarray:
    """The baseline ``x'`` for input ``x`` (DeepLIFT's reference; docs/rules.md, baseline_difference).

    ``zeros``; ``mean`` (the batch mean, every row); ``blur`` (a Gaussian blur with σ = one tenth
    of the smallest spatial size, at least 1 pixel: a **decision**, the literature varies);
    ``file:<path>`` (a .npy broadcast to x's shape); or an array.
    """
    if isinstance(kind, (np.ndarray, list, tuple, float, int)):
        value = np.asarray(kind, dtype=x.dtype)
    elif kind in (None, "zeros"):
        value = np.zeros_like(x)
    elif kind == "mean":
        value = x.mean(axis=0, keepdims=True)
    elif kind == "blur":
        if x.ndim < 3:
            raise RulegraphError(f"baseline blur needs spatial axes; the input has shape {x.shape}")
        value = _gaussian_blur(x, max(1.0, min(x.shape[2:]) / 10))
    elif isinstance(kind, str) and kind.startswith("file:"):
        path = kind.removeprefix("file:")
        if not Path(path).is_file():
            raise RulegraphError(f"baseline file {path}: no such file")
        value = convert(f"baseline {path}", read_npy(path), x.dtype, allow_nonfinite=False)
    else:
        raise RulegraphError(f"unknown baseline {kind!r}: use zeros, mean, blur, file:<path> or an array")
    try:
        return np.ascontiguousarray(np.broadcast_to(value, x.shape).astype(x.dtype))
    except ValueError:
        raise RulegraphError(f"the baseline's shape {value.shape} does not fit the input's {x.shape}") from None
