"""Train and export the example digit classifiers in ``models/``.

Run from the repository root::

    python models/make_models.py

Uses scikit-learn's bundled digits data set (8x8 grey images, values 0..16,
no download), scaled to 0..1, split 80/20 with ``random_state=0``. Training is
seeded, single threaded and uses deterministic algorithms, so a rerun on the
same software versions gives the same weights.

Writes, next to this file:

* ``digits_mlp.onnx``, ``digits_cnn.onnx``, ``digits_resnet.onnx``
  (opset 17, input ``input`` ``[N,1,8,8]``, output ``logits`` ``[N,10]``,
  dynamic batch axis) and the matching ``.pt`` state dicts;
* ``digits_sample.npz``: ``x`` float32 ``[8,1,8,8]`` (first test image of each
  class 0..7) and ``y`` int64 labels;
* ``digit_3.png``: the first test "3", 64x64 grey (nearest-neighbour upscale);
* ``accuracy.json``: test accuracy of each model.
"""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from architectures import build, inline_initializer_identities

SEED = 0
OPSET = 17

#: name -> (epochs, learning rate)
TRAINING = {
    "digits_mlp": (60, 2e-3),
    "digits_cnn": (40, 3e-3),
    "digits_resnet": (30, 3e-3),
}
BATCH = 32


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/test split of digits: x float32 [N,1,8,8] in 0..1, y int64."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0
    )
    return x_train, x_test, y_train, y_test


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def train(name: str, x: np.ndarray, y: np.ndarray) -> nn.Module:
    epochs, lr = TRAINING[name]
    torch.manual_seed(SEED)
    model = build(name)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def export(model: nn.Module, path: Path) -> None:
    """TorchScript-based export, opset 17, dynamic batch axis.

    ``training=PRESERVE`` with the module in eval mode keeps
    BatchNormalization as its own node (the EVAL default would fold it into
    the preceding Conv), while still exporting inference-mode batch norm.
    """
    model.eval()
    dummy = torch.zeros(1, 1, 8, 8)
    with warnings.catch_warnings():
        # the legacy exporter is deprecated, and the constant-folding hint is
        # about modules exported in training mode, which ours are not
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript-based ONNX export"
        )
        warnings.filterwarnings("ignore", message=".*constant folding be turned off")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    inline_initializer_identities(path)


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def check_graph(name: str, path: Path) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = op_counts(path)
    if name == "digits_cnn":
        assert ops.get("BatchNormalization", 0) == 2, ops
        assert ops.get("MaxPool", 0) == 2, ops
    if name == "digits_resnet":
        assert ops.get("BatchNormalization", 0) >= 7, ops
        # every Add in the ResNet joins two computed activations (the skips)
        graph = model.graph
        inits = {i.name for i in graph.initializer}
        consts = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        adds = [n for n in graph.node if n.op_type == "Add"]
        assert len(adds) == 3, ops
        assert "Identity" not in ops, ops
        for n in adds:
            assert not any(i in inits or i in consts for i in n.input), n
    assert path.stat().st_size < 200_000, path.stat().st_size


def sample(x_test: np.ndarray, y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First test image of each class 0..7."""
    idx = [int(np.flatnonzero(y_test == c)[0]) for c in range(8)]
    return x_test[idx].copy(), y_test[idx].copy()


def max_diff_vs_onnx(model: nn.Module, path: Path, x: np.ndarray) -> float:
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    return float(np.abs(ref - got).max())


def main(out_dir: Path = HERE) -> dict[str, float]:
    seed_everything()
    x_train, x_test, y_train, y_test = load_data()
    xs, ys = sample(x_test, y_test)
    np.savez(out_dir / "digits_sample.npz", x=xs, y=ys)

    three = x_test[int(np.flatnonzero(y_test == 3)[0]), 0]
    img = Image.fromarray(np.round(three * 255).astype(np.uint8))
    img.resize((64, 64), Image.NEAREST).save(out_dir / "digit_3.png")

    accs: dict[str, float] = {}
    for name in TRAINING:
        model = train(name, x_train, y_train)
        acc = accuracy(model, x_test, y_test)
        accs[name] = round(acc, 4)
        torch.save(model.state_dict(), out_dir / f"{name}.pt")
        path = out_dir / f"{name}.onnx"
        export(model, path)
        check_graph(name, path)
        diff = max_diff_vs_onnx(model, path, xs)
        full_diff = max_diff_vs_onnx(model, path, x_test)
        assert diff < 1e-4 and full_diff < 1e-4, (diff, full_diff)
        print(
            f"{name}: test accuracy {acc:.4f}, onnxruntime vs torch max abs diff "
            f"{diff:.2e} (sample), {full_diff:.2e} (test set), "
            f"{path.stat().st_size} bytes, ops {op_counts(path)}"
        )

    table = out_dir / "accuracy.json"  # other scripts (make_mnist_lstm.py) keep their rows in it too
    table.write_text(json.dumps({**(json.loads(table.read_text()) if table.exists() else {}), **accs},
                                indent=2) + "\n")
    return accs


if __name__ == "__main__":
    main()
