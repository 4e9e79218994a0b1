"""The CAM family against pytorch-grad-cam (``grad-cam`` 1.5.7) on hand-built torch networks
exported both ways; the compiled CAM model run by plain onnxruntime; the CLI; the refusals.

pytorch-grad-cam imports torchvision at import time (``utils/image.py``: ``Compose``,
``Normalize``, ``ToTensor``; ``utils/model_targets.py``; ``sess.py``: ``resize``), for image
preprocessing and detection targets that these tests never call. torchvision cannot be installed
beside this torch, so the ``gradcam`` fixture puts a minimal stand-in module holding those names
into ``sys.modules`` only while it imports pytorch_grad_cam, after the models are exported (the
dynamo exporter looks for torchvision itself). grad-cam is not in the ``crosscheck`` extra (it
requires torchvision); without it (and ttach, opencv-python-headless) these rows skip.

Eigen-CAM's sign is the arbitrary sign of an SVD vector; rulegraph makes the larger |value|
positive, which is grad-cam's own ``get_2d_projection_with_sign_correction``: the rows patch that
function into grad-cam's EigenCAM.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import rulegraph
from rulegraph.cli import main
from rulegraph.compile.targets import Target, TargetError
from rulegraph.errors import ModelError, RulegraphError
from rulegraph.run.cam import Cam

torch = pytest.importorskip("torch", reason="torch comes with the [crosscheck] extra")
from torch import nn  # noqa: E402

from tests.torch_models import export_onnx, seeded  # noqa: E402

GRADCAM_DEPS = ("pytorch_grad_cam", "ttach", "cv2", "scipy", "tqdm")
HAVE_GRADCAM = all(importlib.util.find_spec(m) is not None for m in GRADCAM_DEPS)
needs_gradcam = pytest.mark.skipif(not HAVE_GRADCAM, reason="grad-cam 1.5.7 is not installed (pip install --no-deps "
                                   "grad-cam==1.5.7 ttach opencv-python-headless; it requires torchvision, so it is "
                                   "not in the crosscheck extra)")
TOLERANCE = 1e-5


class PoolNet(nn.Module):
    """conv-BN-relu-maxpool-conv-relu-GAP-fc; input [N, 3, 20, 20], 5 classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def layer(self):
        return self.features[-1]

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class ResNet(nn.Module):
    """A residual block (conv-BN-relu-conv-BN + skip, relu), GAP, fc; input [N, 3, 16, 16]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.out = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def layer(self):
        return self.out

    def forward(self, x):
        h = self.stem(x)
        return self.fc(self.out(h + self.body(h)).mean(dim=(2, 3)))


class SegNet(nn.Module):
    """A segmenter: [N, 3, 12, 12] -> [N, 4, 12, 12]; the CAM layer is the second relu."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def layer(self):
        return self.a[-1]

    def forward(self, x):
        return self.head(self.a(x))


class DetNet(nn.Module):
    """A detector's head: [N, 3, 12, 12] -> [N, 3 boxes, 4 classes]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 12)

    def layer(self):
        return self.a[-1]

    def forward(self, x):
        return self.fc(self.a(x).mean(dim=(2, 3))).reshape(-1, 3, 4)


class TokenNet(nn.Module):
    """ViT-style: patch embedding (4x4 patches of [N, 3, 16, 16]), a class token, a token MLP
    block (the CAM layer, [N, 17, 8]), mean over tokens, head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def layer(self):
        return self.block

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.block(tokens).mean(dim=1))


NETS = {"pool": (PoolNet, (3, 20, 20)), "resnet": (ResNet, (3, 16, 16)), "seg": (SegNet, (3, 12, 12)),
        "det": (DetNet, (3, 12, 12)), "token": (TokenNet, (3, 16, 16))}
SEG_MASK = np.zeros((12, 12), dtype=np.float32)
SEG_MASK[2:7, 3:9] = 1


def inputs(net: str, n: int = 3) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((n, *NETS[net][1])).astype(np.float32)


def model(net: str) -> nn.Module:
    return seeded(NETS[net][0], 0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """net -> exporter -> ONNX path (both exporters)."""
    folder = tmp_path_factory.mktemp("cam")
    return {net: {name: export_onnx(model(net), torch.from_numpy(inputs(net)), folder / f"{net}_{name}.onnx",
                                    dynamo=name == "dynamo")
                  for name in ("torchscript", "dynamo")} for net in NETS}


@pytest.fixture(scope="module")
def gradcam(exported):
    """pytorch_grad_cam, imported with the torchvision stand-in (module docstring)."""
    if not HAVE_GRADCAM:
        pytest.skip("grad-cam 1.5.7 is not installed")
    stub = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms.Compose = transforms.Normalize = transforms.ToTensor = object
    functional.resize = None
    stub.transforms, transforms.functional = transforms, functional
    with pytest.MonkeyPatch.context() as patch:
        for name, module in (("torchvision", stub), ("torchvision.transforms", transforms),
                             ("torchvision.transforms.functional", functional)):
            patch.setitem(sys.modules, name, module)
        import pytorch_grad_cam
        import pytorch_grad_cam.utils.image
        import pytorch_grad_cam.utils.model_targets
        import pytorch_grad_cam.utils.reshape_transforms
        import pytorch_grad_cam.utils.svd_on_activations  # noqa: F401
    return pytorch_grad_cam


def relu_output(path: Path, index: int) -> str:
    """The output tensor of the index-th Relu node of the ONNX file (the CAM layer by position)."""
    relus = [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Relu"]
    return relus[index]


#: net -> (which Relu is the CAM layer, or None for the default; rulegraph target; grad-cam target
#: per row as a function of the row's class; reshape transform)
TARGETS = {
    "pool": (None, [2, 0, 4], lambda c: lambda o: o[c], None),
    "resnet": (None, [1, 3, 0], lambda c: lambda o: o[c], None),
    "seg": (1, Target([1, 3, 0], mask=SEG_MASK), lambda c: lambda o: (o[c] * torch.from_numpy(SEG_MASK)).sum(), None),
    "det": (1, Target([2, 0, 3], at=1), lambda c: lambda o: o[1, c], None),
    "token": (0, [4, 1, 2], lambda c: lambda o: o[c], "vit"),
}
CLASSES = {"pool": [2, 0, 4], "resnet": [1, 3, 0], "seg": [1, 3, 0], "det": [2, 0, 3], "token": [4, 1, 2]}
GRADCAM_CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
                   "xgradcam": "XGradCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}
#: every method on the classifiers; the target forms (mask, box, token grid) with a gradient, a
#: second-order, a forward-only and a gradient-free method
ROWS = [(net, method, exporter) for net in NETS for method in GRADCAM_CLASSES
        for exporter in ("torchscript", "dynamo")
        if net in ("pool", "resnet") or method in ("gradcam", "gradcam++", "scorecam", "eigencam")]


def reference(gc, net: str, method: str, x: np.ndarray) -> np.ndarray:
    """grad-cam's map for the rows' targets on a fresh copy of the torch network."""
    torch_model = model(net)
    _, _, make_target, transform = TARGETS[net]
    reshape = None
    if transform == "vit":
        reshape = lambda t: gc.utils.reshape_transforms.vit_reshape_transform(t, 4, 4)  # noqa: E731
    cls = getattr(gc, GRADCAM_CLASSES[method])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules["pytorch_grad_cam.eigen_cam"], "get_2d_projection",
                      gc.utils.svd_on_activations.get_2d_projection_with_sign_correction)
        with cls(torch_model, [torch_model.layer()], reshape_transform=reshape) as cam:
            if method == "scorecam":
                cam.batch_size = 64
            return cam(torch.from_numpy(x), [make_target(c) for c in CLASSES[net]])


@needs_gradcam
@pytest.mark.parametrize(("net", "method", "exporter"), ROWS)
def test_cam_matches_pytorch_grad_cam(gradcam, exported, net, method, exporter):
    x = inputs(net)
    index, target, _, _ = TARGETS[net]
    path = exported[net][exporter]
    layer = None if index is None else relu_output(path, index)
    got = Cam(str(path), method, layer).explain(x, target)
    want = reference(gradcam, net, method, x)
    assert got.map.shape == want.shape == (len(x), *x.shape[2:])
    np.testing.assert_allclose(got.map, want, rtol=0, atol=TOLERANCE)
    np.testing.assert_array_equal(got.target, CLASSES[net])


@needs_gradcam
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("net", ["pool", "resnet"])
def test_guided_gradcam_is_guided_backprop_times_gradcam(gradcam, exported, net, exporter):
    x = inputs(net)
    got = Cam(str(exported[net][exporter]), "guided-gradcam").explain(x, CLASSES[net])
    cam = reference(gradcam, net, "gradcam", x)
    guided = gradcam.GuidedBackpropReLUModel(model(net), device="cpu")
    for i, c in enumerate(CLASSES[net]):
        gb = guided(torch.from_numpy(x[i:i + 1]), target_category=c).transpose(2, 0, 1)   # grad-cam gives HWC
        scale = np.abs(gb).max()
        np.testing.assert_allclose(got.guided[i], gb * cam[i][None], rtol=0, atol=TOLERANCE * scale)
    np.testing.assert_allclose(got.map, cam, rtol=0, atol=TOLERANCE)


@needs_gradcam
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("net", ["pool", "resnet"])
def test_cam_is_the_class_weights_behind_the_pooling(gradcam, exported, net, exporter):
    """CAM (Zhou et al.): Σ_k W[c, k] A_k, normalized with grad-cam's own ``scale_cam_image``."""
    x = inputs(net)
    torch_model = model(net)
    seen = {}

    def keep(module, args, out):
        seen["a"] = out.detach().numpy()

    handle = torch_model.layer().register_forward_hook(keep)
    with torch.no_grad():
        torch_model(torch.from_numpy(x))
    handle.remove()
    weights = torch_model.fc.weight.detach().numpy()[CLASSES[net]]                       # [N, K]
    raw = np.maximum(np.einsum("nk,nkhw->nhw", weights, seen["a"]), 0)
    scale = gradcam.utils.image.scale_cam_image
    want = scale(np.maximum(scale(raw, (x.shape[3], x.shape[2])), 0))
    got = Cam(str(exported[net][exporter]), "cam").explain(x, CLASSES[net])
    np.testing.assert_allclose(got.map, want, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "eigencam", "guided-gradcam"])
def test_the_saved_cam_model_runs_in_plain_onnxruntime(exported, tmp_path, method):
    path = exported["pool"]["dynamo"]
    cam = Cam(str(path), method)
    x = inputs("pool")
    want = cam.explain(x, CLASSES["pool"])
    saved = cam.save(tmp_path / "cam.onnx")
    session = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"input": x, "rulegraph/target": np.array(CLASSES["pool"])})))
    np.testing.assert_array_equal(values["rulegraph/cam"], want.map)
    assert set(names) == {"logits", "rulegraph/class", "rulegraph/cam"} | (
        {"rulegraph/guided_cam"} if method == "guided-gradcam" else set())
    assert [i.name for i in session.get_inputs()] == ["input", "rulegraph/target"]


def test_the_default_layer_is_the_last_4d_activation_before_the_pooling(exported):
    for exporter in ("torchscript", "dynamo"):
        path = exported["resnet"][exporter]
        assert Cam(str(path), "gradcam").layer == relu_output(path, -1)


def test_gradcam_from_the_layer_gradient_of_explain_at(exported):
    """Grad-CAM's pieces from ``explain(at=)``: the gradient file's number at the layer is ∂y_c/∂A."""
    path = exported["pool"]["torchscript"]
    layer = relu_output(path, -1)
    x = inputs("pool")
    result = rulegraph.Explainer(str(path), "gradient").explain(x, CLASSES["pool"], at=layer)
    torch_model = model("pool")
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["a"] = out

    torch_model.layer().register_forward_hook(keep)
    logits = torch_model(torch.from_numpy(x))
    logits[np.arange(len(x)), CLASSES["pool"]].sum().backward()
    want = seen["a"].grad.numpy()
    np.testing.assert_allclose(result.at_numbers[layer], want, rtol=0, atol=1e-6 * np.abs(want).max())


CLI_ROWS = [
    (["--method", "gradcam"], 0, "gradcam at"),
    (["--method", "layercam", "--layer", "LAYER"], 0, "layercam at 'LAYER'"),
    (["--method", "gradcam", "--rules", "gradient"], 2, "drop --rules"),
    ([], 2, "--rules is required"),
    (["--method", "gradcam", "--layer", "nowhere"], 2, "no tensor or node 'nowhere'"),
]


@pytest.mark.parametrize(("args", "code", "text"), CLI_ROWS)
def test_cli_explain_draws_the_cam(exported, tmp_path, capsys, args, code, text):
    path = exported["pool"]["torchscript"]
    layer = relu_output(path, 1)
    np.save(tmp_path / "x.npy", inputs("pool", 2))
    picture = tmp_path / "cam.png"
    args = [a.replace("LAYER", layer) for a in args]
    returned = main(["explain", str(path), "--input", str(tmp_path / "x.npy"), "--target", "2,0", "--heatmap",
                     str(picture), "--out", str(tmp_path / "m.npy"), *args])
    printed = capsys.readouterr()
    assert returned == code, printed.err
    assert text.replace("LAYER", layer) in printed.out + printed.err
    if code == 0:
        assert picture.stat().st_size > 0
        assert np.load(tmp_path / "m.npy").shape == (2, 20, 20)


def test_cli_compile_writes_the_standalone_cam_model(exported, tmp_path):
    path = exported["pool"]["dynamo"]
    layer = relu_output(path, 1)
    assert main(["compile", str(path), "--method", "gradcam++", "--layer", layer, "-o", str(tmp_path / "cam.onnx")]) == 0
    x = inputs("pool")
    session = ort.InferenceSession(str(tmp_path / "cam.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["rulegraph/cam"], {"input": x, "rulegraph/target": np.array(CLASSES["pool"])})
    np.testing.assert_array_equal(got, Cam(str(path), "gradcam++", layer).explain(x, CLASSES["pool"]).map)


def test_cli_explain_layer_writes_the_attribution_at_the_layer(exported, tmp_path):
    path = exported["pool"]["torchscript"]
    layer = relu_output(path, 1)
    x = inputs("pool", 2)
    np.save(tmp_path / "x.npy", x)
    assert main(["explain", str(path), "--rules", "lrp-epsilon", "--input", str(tmp_path / "x.npy"), "--layer", layer,
                 "--layer-out", str(tmp_path / "l.npy")]) == 0
    want = rulegraph.Explainer(str(path), "lrp-epsilon").explain(x, at=layer).at[layer]
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), want)


ERRORS = [
    (dict(method="gradcam-9000"), RulegraphError, "unknown CAM method 'gradcam-9000'"),
    (dict(method="gradcam", layer="fc.weight"), ModelError, "is not on the relevance path"),
    (dict(method="gradcam", layer="logits"), ModelError, "neither a 4-D activation"),
]


@pytest.mark.parametrize(("options", "error", "message"), ERRORS)
def test_cam_refusals_name_the_cause(exported, options, error, message):
    with pytest.raises(error, match=message):
        Cam(str(exported["pool"]["torchscript"]), **options).explain(inputs("pool"), CLASSES["pool"])


def test_a_cam_explains_a_class_not_a_seed(exported):
    with pytest.raises(TargetError, match="not a seed array"):
        Cam(str(exported["pool"]["torchscript"]), "gradcam").explain(inputs("pool"), Target(1, versus=2))
