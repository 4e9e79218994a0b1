"""The CAM family against pytorch-grad-cam 1.5.7 on torchvision classifiers (random weights).

For each model and method: rulegraph's `Cam` on the ONNX export (default layer: the input of the
last global pooling) against grad-cam on the torch model with the module whose output that tensor
is, the same two classes; the largest absolute difference of the maps (both in [0, 1]).

torchvision has no wheel beside the CPU torch the project pins, so this runs where a matching pair is
installed, with grad-cam (`pip install --no-deps grad-cam==1.5.7 ttach opencv-python-headless scipy`):

    python benchmarks/cam_torchvision.py [--models resnet18 mobilenet_v3_small efficientnet_b0] [--size 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulegraph import Cam  # noqa: E402

METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
           "xgradcam": "XGradCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}
#: model -> the module whose output is the input of the global pooling
LAYERS = {"resnet18": lambda m: m.layer4, "resnet50": lambda m: m.layer4,
          "mobilenet_v3_small": lambda m: m.features, "efficientnet_b0": lambda m: m.features}
CLASSES = [1, 7]


def main() -> int:
    import torch
    import torchvision
    import pytorch_grad_cam as gc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small", "efficientnet_b0"],
                        choices=list(LAYERS))
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    # grad-cam's Eigen-CAM sign convention as rulegraph's (tests/test_cam.py does the same)
    sys.modules["pytorch_grad_cam.eigen_cam"].get_2d_projection = get_2d_projection_with_sign_correction
    x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    print(f"{'model':<20} " + " ".join(f"{m:>10}" for m in METHODS))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            net = getattr(torchvision.models, name)(weights=None).eval()
            path = Path(tmp) / f"{name}.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
            cells = []
            for method, cls in METHODS.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = Cam(str(path), method).explain(x.numpy(), CLASSES).map
                    with getattr(gc, cls)(net, [LAYERS[name](net)]) as cam:
                        if method == "scorecam":
                            cam.batch_size = 64
                        want = cam(x, [ClassifierOutputTarget(c) for c in CLASSES])
                diff = float(np.abs(got - want).max())
                worst = max(worst, diff)
                cells.append(f"{diff:>10.1e}")
            print(f"{name:<20} " + " ".join(cells), flush=True)
    print(f"largest difference: {worst:.1e} (tests/test_cam.py holds hand-built networks to 1e-5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
