"""Regenerate the README's pictures of the unit and representation views, on the bundled digits models
and scikit-learn's digits (1,797 real 8x8 images, the models' own data):

- ``units_digits_cnn.png``: the top 8 digits of units 0-7 of the CNN's second conv block (ReLU), each
  cut to the unit's receptive field (8x8, jump 2) around its maximum;
- ``represent_digits_mlp.png``: t-SNE of the MLP's last hidden layer, coloured by the true digit;
- ``unitgrid_digits_mlp.png``: the MLP's first hidden layer (64 units) on an 8x8 grid, mean per digit;
- ``crp_digits_cnn.png``: LRP-ε relevance of two digits split over channels 0-7 of the same CNN layer.

    python docs/pictures/make_views.py      # needs scikit-learn and openTSNE (the views extra)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from rulegraph import Explainer, crp, represent, top_examples, unit_grid, viz

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent.parent / "models"
CNN_LAYER = "/features/features.6/Relu_output_0"


def save(fig, name: str) -> None:
    """An 8-bit PNG (a third of the size of the 24-bit one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    buffer.seek(0)
    out = HERE / name
    Image.open(buffer).convert("RGB").quantize(256).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KB")


def main() -> None:
    digits = load_digits()
    x = (digits.images / 16).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    cnn, mlp = str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_mlp.onnx")
    save(viz.unit_examples_figure(top_examples(cnn, CNN_LAYER, list(x), k=8, units=range(8))),
         "units_digits_cnn.png")
    found = represent(mlp, "/net/net.4/Relu_output_0", list(x), labels=y, method="tsne", seed=0)
    save(viz.embedding_figure(found.embedding, found.colours("label"),
                              f"t-SNE of the digits MLP's last hidden layer '{found.layer}' [N, 32], "
                              f"{len(y)} digits"), "represent_digits_mlp.png")
    save(viz.unit_grid_figure(unit_grid(mlp, "/net/net.2/Relu_output_0", list(x), labels=y)),
         "unitgrid_digits_mlp.png")
    concepts = crp(Explainer(cnn, "lrp-epsilon"), x[[0, 1]], CNN_LAYER, channels=range(8))
    rows = [viz.concept_panels(concepts.result.map[i], concepts.maps[i], concepts.channels) for i in range(2)]
    fig = viz.figure(rows, size=1.6)
    fig.suptitle(f"lrp-epsilon: each channel's share of the relevance at '{CNN_LAYER}' (the channels of a "
                 f"row on one colour scale)", fontsize=9)
    save(fig, "crp_digits_cnn.png")


if __name__ == "__main__":
    main()
