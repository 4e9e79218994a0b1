"""Heatmaps: an attribution map as an image (red positive, blue negative), with Pillow only.

A map with spatial axes ([H, W], or [C, H, W] summed over C) is drawn as a grid of cells; a map
of a tabular or scalar input ([F] or []) as a bar per feature, up from the middle line for
positive values, down for negative ones. White is 0; colour and bar height ∝ |value|.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import RulegraphError
from .run.files import check_output, write_with
from .run.inputs import read_image

#: extensions a heatmap may be written with (each one Pillow can write)
HEATMAP_SUFFIXES = (".png", ".bmp", ".gif", ".tif", ".tiff", ".jpg", ".jpeg", ".webp")
BAR_HEIGHT = 64


def heatmap_suffixes() -> list[str]:
    """The heatmap extensions this installation's Pillow can write."""
    from PIL import Image

    registered = Image.registered_extensions()
    return [s for s in HEATMAP_SUFFIXES if registered.get(s) in Image.SAVE]


def _colours(v: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> RGB in [0, 1]: white at 0, red towards +1, blue towards -1."""
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    return np.clip(np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1), 0, 1)


def heatmap_rgb(attribution: np.ndarray) -> np.ndarray:
    """[H, W] (or [C, H, W], summed over C) -> uint8 [H, W, 3]; [F] or [] -> bars, uint8 [64, F, 3]."""
    a = np.asarray(attribution, dtype=np.float64)
    if a.ndim == 3:
        a = a.sum(axis=0)
    if a.ndim < 2:
        return bars_rgb(a.reshape(-1))
    if a.ndim != 2:
        raise RulegraphError(f"a heatmap needs a map of shape [H, W], [C, H, W], [F] or [] per row; "
                             f"this input's is {list(a.shape)}: save the attribution with --out and "
                             f"plot it yourself")
    if not np.isfinite(a).all():
        raise RulegraphError("the attribution holds NaN or infinite values; no heatmap is drawn")
    scale = np.abs(a).max() or 1.0
    return (_colours(a / scale) * 255).round().astype(np.uint8)


def bars_rgb(values: np.ndarray, height: int = BAR_HEIGHT) -> np.ndarray:
    """One bar per value, uint8 [height, F, 3]: a value v fills ``round(|v| / max|v| · height/2)``
    pixels up (v > 0) or down (v < 0) from the middle; the bar's colour is the heatmap's."""
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise RulegraphError("the attribution holds NaN or infinite values; no heatmap is drawn")
    scale = np.abs(v).max() if v.size else 0.0
    v = v / (scale or 1.0)
    half = height // 2
    fill = np.round(np.abs(v) * half).astype(int)
    rows = np.arange(height)[:, None]
    up = (rows < half) & (rows >= half - fill) & (v > 0)
    down = (rows >= half) & (rows < half + fill) & (v < 0)
    rgb = np.ones((height, len(v), 3))
    rgb[up | down] = np.broadcast_to(_colours(v), (height, len(v), 3))[up | down]
    return (rgb * 255).round().astype(np.uint8)


def save_heatmap(attribution: np.ndarray, path: str | Path, size: int = 256, inputs=()) -> Path:
    """Write the heatmap of one sample's attribution, upscaled (nearest) to about ``size`` px;
    the file is written atomically and may not be one of ``inputs`` (``files.check_output``)."""
    from PIL import Image

    path = check_output(path, inputs, heatmap_suffixes(), "heatmap")
    rgb = heatmap_rgb(attribution)
    h, w = rgb.shape[:2]
    factor = max(1, size // max(h, w))
    wide = factor if np.ndim(attribution) >= 2 else max(1, size // w)  # bars: about ``size`` px wide
    image = Image.fromarray(rgb).resize((w * wide, h * factor), Image.NEAREST)
    return write_with(path, image.save, "heatmap")


def load_image(path: str | Path, shape: list, scale: float = 1.0) -> np.ndarray:
    """An image file as a float32 [1, C, H, W] array in [0, scale] (``inputs.read_image``)."""
    return read_image(path, shape, scale)
