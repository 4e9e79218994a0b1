"""Regenerate the README's pictures: the ImageNet SqueezeNet 1.1 explained on two photos with four
rule files, one column per method; the first row the heat map, the second the overlay on the photo.

    python docs/pictures/make_pictures.py [path/to/shared/models]

SqueezeNet's input is BGR 0..255 minus (104, 117, 123), [1, 3, 224, 224]; its output is a Softmax,
and the bundled rule files start at its input (the logits). Maps are clipped at the 99.5th
percentile of |map|; the gradient column is the saliency a(x) (``viz.SALIENCY_METHODS``), drawn as
max |a| over channels (``viz.SHOW_DEFAULTS``).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from rulegraph import Explainer, viz

HERE = Path(__file__).resolve().parent
METHODS = ["lrp-epsilon", "lrp-composite", "gradient", "integrated-gradients"]
PHOTOS = {"kitten": "kitten_224.png", "cat": "cat.jpg"}


def squeezenet_input(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(RGB [224, 224, 3] in [0, 1], the model's input [1, 3, 224, 224])."""
    rgb = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.float32)
    bgr = rgb[:, :, ::-1] - np.array([104, 117, 123], dtype=np.float32)
    return rgb / 255, np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])


def main(models: Path) -> None:
    labels = viz.read_labels(models / "imagenet_labels.txt")
    explainers = {m: Explainer(str(models / "squeezenet1.1_fp32.onnx"), m) for m in METHODS}
    for name, photo in PHOTOS.items():
        rgb, x = squeezenet_input(models / photo)
        heat, over = [], []
        for method, explainer in explainers.items():
            result = explainer.explain(x)
            maps, show = viz.choose_maps(result, method)
            shown = method + (" (saliency)" if show == "saliency" else "")
            title = viz.title_of(result.target[0], labels, shown,
                                 None if show == "saliency" else float(result.delta[0]))
            sign, reduce = viz.show_defaults(show, None, None)
            heat.append(viz.image_panel(maps[0], sign=sign, reduce=reduce, title=title))
            over.append(viz.image_panel(maps[0], rgb, mode="overlay", sign=sign, reduce=reduce, title=title))
        out = HERE / f"squeezenet_{name}.png"
        buffer = io.BytesIO()
        viz.figure([heat, over], size=2.6).savefig(buffer, dpi=80, format="png")
        buffer.seek(0)
        # an 8-bit PNG, a third of the size of the 24-bit one
        Image.open(buffer).convert("RGB").quantize(256).save(out, optimize=True)
        print(f"{out}: {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent.parent / "shared" / "models")
