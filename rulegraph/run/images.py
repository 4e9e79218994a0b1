"""Opening image files (Pillow) safely, and the 16-bit / float modes read as floats."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import RulegraphError, RulegraphWarning

#: image mode -> the divisor that maps its values to [0, 1] (None: stored as is)
HIGH_DEPTH_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0,
                    "F": None}


def open_image(path: Path):
    """A Pillow image, loaded; decompression bombs, truncated and corrupt files refused by name."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RulegraphError(f"{path}: {exc} (raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine)") \
            from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise RulegraphError(f"{path} is not a readable image ({exc}); is it truncated or corrupt?") from None
    return image


def high_depth(path: Path, image, size) -> np.ndarray:
    """A 16-bit or float single-channel image as float32 [H, W], in [0, 1] (16-bit) or as stored (F)."""
    from PIL import Image

    raw = np.asarray(image).astype(np.float64)
    divisor = HIGH_DEPTH_MODES[image.mode]
    if divisor is None:
        warnings.warn(f"{path}: a float image (mode F) is read as stored, not scaled to [0, 1]",
                      RulegraphWarning, stacklevel=3)
        if not np.isfinite(raw).all():
            raise RulegraphError(f"{path}: the float image holds NaN or infinite pixels")
    else:
        if raw.size and (raw.min() < 0 or raw.max() > divisor):
            raise RulegraphError(f"{path}: mode {image.mode} pixels span [{raw.min():g}, {raw.max():g}], "
                                 f"outside the 16-bit range [0, 65535] this reader scales by")
        raw = raw / divisor
    array = raw.astype(np.float32)
    if size is not None and array.shape[::-1] != size:
        array = np.asarray(Image.fromarray(array, mode="F").resize(size, Image.BILINEAR), dtype=np.float32)
    return array
