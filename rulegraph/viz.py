"""Heatmaps: an attribution map as a PNG (red positive, blue negative), with Pillow only."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def heatmap_rgb(attribution: np.ndarray) -> np.ndarray:
    """[H, W] (or [C, H, W], summed over C) -> uint8 [H, W, 3]; white is 0, colour ∝ |value|."""
    a = np.asarray(attribution, dtype=np.float64)
    if a.ndim == 3:
        a = a.sum(axis=0)
    if a.ndim != 2:
        raise ValueError(f"a heatmap needs a [H, W] or [C, H, W] map, got shape {a.shape}")
    scale = np.abs(a).max() or 1.0
    v = a / scale
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def save_heatmap(attribution: np.ndarray, path: str | Path, size: int = 256) -> Path:
    """Write the heatmap of one sample's attribution, upscaled (nearest) to about ``size`` px."""
    from PIL import Image

    rgb = heatmap_rgb(attribution)
    h, w = rgb.shape[:2]
    factor = max(1, size // max(h, w))
    image = Image.fromarray(rgb).resize((w * factor, h * factor), Image.NEAREST)
    path = Path(path)
    image.save(path)
    return path


def load_image(path: str | Path, shape: list, scale: float = 1.0) -> np.ndarray:
    """An image file as a float32 [1, C, H, W] array in [0, scale], resized to the model's H, W."""
    from PIL import Image

    _, channels, height, width = shape
    image = Image.open(path).convert("L" if channels == 1 else "RGB")
    if isinstance(height, int) and isinstance(width, int):
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0 * scale
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return array[None]
