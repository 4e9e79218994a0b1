"""The issue's check of feature visualization on the real ImageNet SqueezeNet: for each channel, the
objective at the optimized image (the channel's mean activation, the image run as it is, with no
jitter or scaling) against the channel's largest mean activation over the real photos that come with
the project's dependencies and models (scikit-learn's china.jpg and flower.jpg, the kitten and cat
of ../shared/models/), and that no value is NaN.

    python benchmarks/featviz_check.py [--model ../shared/models/squeezenet1.1_fp32.onnx]
        [--layer fire5/concat_1] [--channels 0-7] [--steps 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulegraph import Explainer, preprocess, visualize  # noqa: E402
from rulegraph.run.featviz import parse_channels, preprocess_affine, to_model  # noqa: E402


def photos(shared: Path) -> list[Path]:
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    return [images / "china.jpg", images / "flower.jpg", shared / "kitten_224.png", shared / "cat.jpg"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "squeezenet1.1_fp32.onnx"))
    parser.add_argument("--layer", default="fire5/concat_1")
    parser.add_argument("--channels", default="0-7")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--preprocess", default="imagenet-caffe")
    args = parser.parse_args()
    channels = parse_channels(args.channels)
    reader = Explainer(args.model, "gradient", start=args.layer, preprocess=args.preprocess)
    spec = reader.preprocess
    start = reader.compiled().start_tensor

    def channel_means(x: np.ndarray) -> np.ndarray:
        act = reader.forward(x)[start].astype(np.float64)
        return act.reshape(act.shape[0], act.shape[1], -1).mean(axis=2)[:, channels]

    photo_means = np.concatenate([channel_means(preprocess(p, spec))
                                  for p in photos(Path(args.model).parent)])
    result = visualize(args.model, args.layer, channels, preprocess=args.preprocess, steps=args.steps, seed=0)
    inputs = to_model(result.images.astype(np.float32), preprocess_affine(spec, 3), "NCHW").astype(np.float32)
    at_result = np.array([channel_means(inputs[i:i + 1])[0, i] for i in range(len(channels))])
    best_photo = photo_means.max(axis=0)
    print(f"{'channel':>8} {'objective':>10} {'best photo':>11} {'ratio':>7}")
    for c, got, ref in zip(channels, at_result, best_photo):
        print(f"{c:>8} {got:>10.3f} {ref:>11.3f} {got / ref if ref > 0 else float('inf'):>7.2f}")
    finite = bool(np.isfinite(result.images).all() and np.isfinite(result.history).all())
    above = int((at_result > best_photo).sum())
    print(f"{above} of {len(channels)} channels above the best photo; all finite: {finite}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
