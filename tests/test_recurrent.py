"""LSTM, GRU and RNN (rulegraph/graph/recurrent.py): unrolled into per-step primitives when read.

Oracles, one per table:

- ``CASES`` x forward: the unrolled graph (the forward the explainer runs) equals onnxruntime's own
  LSTM/GRU/RNN kernel on the original node (float32); onnxruntime has no ``layout = 1``, so a
  ``layout = 1`` node is compared with the ``layout = 0`` node on the transposed input;
- ``CASES`` x each output (Y, Y_h, Y_c): the VJP of the unrolled graph against float64 central
  differences (tests/oracles.py ``check_vjp``);
- sequence lengths given at run time: the same VJP as the same lengths given as a constant;
- ``REFUSED``: what is not unrolled raises ModelError naming the node and the fix;
- Arras et al. 2017 LSTM-LRP: ``lrp-epsilon`` on a 1-layer 3-step LSTM equals a closed-form numpy
  replica;
- torch-exported classifiers and a regressor (nn.LSTM / nn.GRU, 2 layers, bidirectional,
  batch_first; both exporters): the gradient equals autograd, lrp-epsilon conserves to 1e-3.
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import blip, check_vjp, reference_vjp, run, seeded_pass

from rulegraph import Explainer, ModelError
from rulegraph.backward import ops as G
from rulegraph.graph.recurrent import GATES

ROOT = Path(__file__).resolve().parent.parent
T, B, I, H = 3, 2, 4, 3  # steps, batch, input size, hidden size
LENS = [3, 1]  # the second sequence ends after one step


@dataclass(frozen=True)
class Case:
    """One recurrent node: its op, direction and options."""

    op: str
    direction: str = "forward"
    layout: int = 0
    lens: str = ""  # "": none, "const": an initializer, "input": a graph input
    h0: bool = False
    c0: bool = False
    peepholes: bool = False
    clip: float | None = None
    before_reset: int = 0
    bias: bool = True
    activations: tuple[str, ...] = ()
    zero_h0: bool = False  # initial_h a constant zero (what torch writes): the absent state

    @property
    def id(self) -> str:
        shown = {k: v for k, v in self.__dict__.items() if v != Case.__dataclass_fields__[k].default}
        return "-".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in shown.items())

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("Y", "Y_h", "Y_c") if self.op == "LSTM" else ("Y", "Y_h")


OPTIONS: dict[str, list[dict]] = {  # op -> the option sets, each run in every direction
    "RNN": [{}, {"layout": 1}, {"lens": "const"}, {"h0": True}, {"lens": "const", "h0": True, "layout": 1},
            {"clip": 0.7}, {"bias": False}, {"activations": ("Relu",)}, {"zero_h0": True}],
    "GRU": [{}, {"layout": 1}, {"lens": "const"}, {"h0": True}, {"lens": "const", "h0": True, "layout": 1},
            {"clip": 0.7}, {"bias": False}, {"before_reset": 1}, {"before_reset": 1, "h0": True},
            {"before_reset": 1, "lens": "const", "bias": False}, {"activations": ("Sigmoid", "Relu")},
            {"activations": ("Tanh", "Tanh")}],
    "LSTM": [{}, {"layout": 1}, {"lens": "const"}, {"h0": True, "c0": True}, {"c0": True},
             {"lens": "const", "h0": True, "c0": True, "layout": 1}, {"clip": 0.7},
             {"bias": False}, {"peepholes": True}, {"peepholes": True, "h0": True, "c0": True},
             {"activations": ("Sigmoid", "Tanh", "Relu")}],
}
DIRECTIONS = ("forward", "reverse", "bidirectional")
CASES = [Case(op, d, **o) for op, options in OPTIONS.items() for d in DIRECTIONS for o in options]


def recurrent_model(case: Case, outputs=None, elem=TensorProto.DOUBLE) -> onnx.ModelProto:
    """One ``case.op`` node with seeded weights; graph inputs X (and h0, c0, lens where asked)."""
    rng = np.random.default_rng(zlib.crc32(f"{case.op} {case.direction}".encode()))  # one set per layout
    gates, dirs = len(GATES[case.op]), 2 if case.direction == "bidirectional" else 1
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    consts = {"W": rng.standard_normal((dirs, gates * H, I)), "R": rng.standard_normal((dirs, gates * H, H)),
              "B": rng.standard_normal((dirs, 2 * gates * H)), "P": rng.standard_normal((dirs, 3 * H))}
    state = [B, dirs, H] if case.layout else [dirs, B, H]
    inputs = {"X": [B, T, I] if case.layout else [T, B, I]}
    names = ["X", "W", "R", "B" if case.bias else "", "", "", "", ""]
    if case.lens:
        names[4] = "lens"
        consts["lens"] = np.array(LENS, np.int32)
    if case.h0:
        names[5], inputs["h0"] = "h0", state
    if case.zero_h0:
        names[5], consts["h0"] = "h0", np.zeros(state)
    if case.c0:
        names[6], inputs["c0"] = "c0", state
    if case.peepholes:
        names[7] = "P"
    names = names[:8 if case.op == "LSTM" else 6]
    while not names[-1]:
        names.pop()
    attrs = {"hidden_size": H, "direction": case.direction, "layout": case.layout}
    if case.clip is not None:
        attrs["clip"] = case.clip
    if case.before_reset:
        attrs["linear_before_reset"] = 1
    if case.activations:
        attrs["activations"] = list(case.activations) * dirs
    wanted = outputs or case.outputs
    node_outputs = [o if o in wanted else "" for o in case.outputs]
    node = helper.make_node(case.op, names, node_outputs, name=f"the_{case.op}", **attrs)
    used = {n for n in names if n}
    inits = [numpy_helper.from_array(v.astype(dtype) if v.dtype.kind == "f" else v, k)
             for k, v in consts.items() if k in used]
    graph_inputs = [helper.make_tensor_value_info(k, elem, s) for k, s in inputs.items()]
    if case.lens == "input":
        inits = [i for i in inits if i.name != "lens"]
        graph_inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [B]))
    graph_outputs = [helper.make_tensor_value_info(o, elem, None) for o in node_outputs if o]
    graph = helper.make_graph([node], "t", graph_inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model)
    return model


def feeds_of(model: onnx.ModelProto, rng, dtype=np.float64) -> dict[str, np.ndarray]:
    out = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = (np.array(LENS, np.int32) if vi.name == "lens"
                        else rng.standard_normal(shape).astype(dtype))
    return out


def ort_run(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(names, feeds)))


def onnxruntime_reference(case: Case, feeds) -> dict[str, np.ndarray]:
    """onnxruntime's kernel on the node; a ``layout = 1`` node as its ``layout = 0`` twin on the
    transposed inputs, the outputs transposed back."""
    if not case.layout:
        return ort_run(recurrent_model(case, elem=TensorProto.FLOAT), feeds)
    twin = recurrent_model(Case(**{**case.__dict__, "layout": 0}), elem=TensorProto.FLOAT)
    moved = {k: (v.transpose(1, 0, 2) if k in ("X", "h0", "c0") else v) for k, v in feeds.items()}
    out = ort_run(twin, moved)
    back = {"Y": (2, 0, 1, 3), "Y_h": (1, 0, 2), "Y_c": (1, 0, 2)}
    return {k: v.transpose(back[k]) for k, v in out.items()}


@pytest.mark.parametrize("case", CASES + [Case("LSTM", d, lens="input", h0=True) for d in DIRECTIONS]
                         + [Case("GRU", "bidirectional", lens="input", before_reset=1)], ids=lambda c: c.id)
def test_unrolled_forward_equals_onnxruntime(case):
    model = recurrent_model(case, elem=TensorProto.FLOAT)
    feeds = feeds_of(model, np.random.default_rng(0), np.float32)
    unrolled = G.load(model).model
    assert not {n.op_type for n in unrolled.graph.node} & set(GATES)
    got = ort_run(unrolled, feeds)
    want = onnxruntime_reference(case, feeds)
    assert set(got) == set(want) == set(case.outputs)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("case", [c for c in CASES if not c.lens], ids=lambda c: c.id)
def test_recorded_step_states_are_the_outputs(case):
    """``Graph.recurrent[node].states``: h after step t of direction d is onnxruntime's ``Y[t, d]``; the
    state after the direction's last step is ``Y_h[d]`` (and ``Y_c[d]``)."""
    model = recurrent_model(case, elem=TensorProto.FLOAT)
    feeds = feeds_of(model, np.random.default_rng(0), np.float32)
    graph = G.load(model)
    record = graph.recurrent[f"the_{case.op}"]
    assert (record.op, record.steps, record.hidden, record.outputs) == (case.op, T, H, case.outputs)
    both = case.direction == "bidirectional"
    assert record.directions == (("forward", "reverse") if both else (case.direction,))
    assert set(record.states) == ({"h", "c"} if case.op == "LSTM" else {"h"})
    probe = onnx.ModelProto()
    probe.CopyFrom(graph.model)
    names = [t for per_dir in record.states.values() for steps in per_dir for t in steps]
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in set(names))
    got = ort_run(probe, feeds)
    want = onnxruntime_reference(case, feeds)
    y = want["Y"] if not case.layout else want["Y"].transpose(1, 2, 0, 3)  # [T, D, B, H]
    finals = {"h": want["Y_h"], "c": want.get("Y_c")}
    for d, direction in enumerate(record.directions):
        last = T - 1 if direction == "forward" else 0
        for t in range(T):
            np.testing.assert_allclose(got[record.states["h"][d][t]], y[t, d], rtol=1e-5, atol=1e-6)
        for key, steps in record.states.items():
            final = finals[key] if not case.layout else finals[key].transpose(1, 0, 2)
            np.testing.assert_allclose(got[steps[d][last]], final[d], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("case, output", [(c, o) for c in CASES for o in c.outputs],
                         ids=[f"{c.id}-{o}" for c in CASES for o in c.outputs])
def test_unrolled_vjp_central_difference(case, output):
    model = G.load(recurrent_model(case, outputs=(output,))).model
    rng = np.random.default_rng(7)
    check_vjp(model, feeds_of(model, rng), rng)


@pytest.mark.parametrize("case", [Case("LSTM", d, lens="input", h0=True, c0=True) for d in DIRECTIONS]
                         + [Case("GRU", "bidirectional", lens="input", before_reset=1, layout=1)],
                         ids=lambda c: c.id)
def test_sequence_lengths_at_run_time_give_the_constant_lengths_vjp(case):
    constant = G.load(recurrent_model(Case(**{**case.__dict__, "lens": "const"}), outputs=("Y_h",))).model
    runtime = G.load(recurrent_model(case, outputs=("Y_h",))).model
    rng = np.random.default_rng(3)
    feeds = feeds_of(constant, rng)
    seed = rng.standard_normal(run(constant, feeds)["Y_h"].shape)
    want = reference_vjp(constant, feeds, seed)
    got = reference_vjp(runtime, {**feeds, "lens": np.array(LENS, np.int32)}, seed)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14)


LRP_EPSILON = (ROOT / "rules" / "lrp-epsilon.rules").read_text()


@pytest.mark.parametrize("case, output", [(c, o) for c in CASES for o in c.outputs[:2]],
                         ids=[f"{c.id}-{o}" for c in CASES for o in c.outputs[:2]])
def test_lrp_epsilon_conserves_with_biases_blamed(case, output):
    """Σ attribution (every float input) + Σ bias shares = Σ seed ⊙ y, to 1e-3 of Σ |seed ⊙ y|."""
    from rulegraph.compile.build import SEED, compile_explainer
    from rulegraph.run import rulefiles

    model = recurrent_model(case, outputs=(output,))
    rules = rulefiles.parse(LRP_EPSILON, source="t.rules")
    compiled = compile_explainer(G.load(model), rules, seed_mode=True)
    rng = np.random.default_rng(5)
    feeds = feeds_of(model, rng)
    y = run(G.load(model).model, feeds)[output]  # onnx.reference's LSTM/GRU/RNN are not the ONNX ones
    seed = rng.standard_normal(y.shape)
    names = list(compiled.attribution.values()) + ([compiled.bias_total] if case.bias else [])
    values = run(compiled.model, {**feeds, SEED: seed}, names)
    total = sum(values[n].sum() for n in names)
    assert (compiled.bias_total is not None) == case.bias
    assert abs(total - (seed * y).sum()) <= 1e-3 * np.abs(seed * y).sum()


def _symbolic_steps(model):
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "steps"
    return model


def _weights_as_input(model):
    w = next(i for i in model.graph.initializer if i.name == "W")
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.DOUBLE, list(w.dims)))
    model.graph.initializer.remove(w)
    return model


def _input_forget(model):
    model.graph.node[0].attribute.append(helper.make_attribute("input_forget", 1))
    return model


REFUSED = [  # (case, edit of the model, words the message must hold)
    (Case("LSTM"), _symbolic_steps, ["'the_LSTM'", "sequence length of its input 'X' is 'steps'",
                                     "export the model with a fixed sequence length"]),
    (Case("GRU"), _weights_as_input, ["'the_GRU'", "its W ('W') is computed at run time",
                                      "export them as initializers"]),
    (Case("RNN", activations=("LeakyRelu",)), None, ["'the_RNN'", "activation 'LeakyRelu'",
                                                     "Sigmoid, Tanh, Relu only"]),
    (Case("LSTM"), _input_forget, ["'the_LSTM'", "input_forget = 1", "export the LSTM without input_forget"]),
]


@pytest.mark.parametrize("case, edit, words", REFUSED, ids=[w[1] for _, _, w in REFUSED])
def test_refused_with_the_fix(case, edit, words):
    model = recurrent_model(case)
    if edit is not None:
        model = edit(model)
    with pytest.raises(ModelError) as info:
        G.load(model)
    for w in words:
        assert w in str(info.value)


def test_the_fix_for_a_symbolic_length_works():
    """The refusal's fix, update_inputs_outputs_dims on the input, makes the model explainable."""
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    model = _symbolic_steps(recurrent_model(Case("GRU", "bidirectional")))
    outputs = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
               for o in model.graph.output}
    fixed = update_inputs_outputs_dims(model, {"X": [T, B, I]}, outputs)
    rng = np.random.default_rng(2)
    want = run(G.load(recurrent_model(Case("GRU", "bidirectional"))).model, feeds := feeds_of(fixed, rng))
    got = run(G.load(fixed).model, feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


# Arras et al. 2017 LSTM-LRP ------------------------------------------------------------------------


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def arras_lstm_lrp(x, W, R, b, V, v, seed, eps):
    """Arras et al. 2017 ("Explaining Recurrent Neural Network Predictions in Sentiment Analysis")
    on a 1-layer forward LSTM (no initial state) read by a dense layer ``y = h_T V + v``:
    every linear map (gates' ``[x, h]`` map, the head, ``c = f⊙c' + i⊙g``) by the ε-rule with the
    bias taking its share (``lrp_linear`` with bias_factor 0: ``R_i = Σ_j z_ij / blip(z_j) R_j``),
    gate ⊙ signal products giving the signal everything (with the ε-rule's factor
    ``y / blip(y)`` of the map linear in the signal, 1 up to ε), tanh passing relevance through;
    the relevance of the output is ``seed ⊙ y``."""
    steps = x.shape[0]
    rows = {k: slice(i * H, (i + 1) * H) for i, k in enumerate("iofc")}
    blocks = {k: (W[r], R[r], b[:4 * H][r] + b[4 * H:][r]) for k, r in rows.items()}
    hs, cs, gates, xhs = [], [], [], []
    h = c = None
    for t in range(steps):
        xh = x[t] if h is None else np.concatenate([x[t], h], axis=-1)
        z = {k: xh @ (w if h is None else np.concatenate([w, r], axis=1)).T + bb
             for k, (w, r, bb) in blocks.items()}
        i, o, f, g = _sigmoid(z["i"]), _sigmoid(z["o"]), _sigmoid(z["f"]), np.tanh(z["c"])
        c = i * g if c is None else f * c + i * g
        h = o * np.tanh(c)
        hs.append(h), cs.append(c), gates.append((i, o, f, g, z)), xhs.append(xh)
    y = hs[-1] @ V + v

    def linear(inp, matrix, out, rel):  # ε-rule of out = inp @ matrix (+ bias)
        return inp * ((rel / blip(out, eps)) @ matrix.T)

    def kept(product, rel):  # the signal of gate ⊙ signal
        return product / blip(product, eps) * rel

    r_h = linear(hs[-1], V, y, seed * y)
    r_c = np.zeros_like(r_h)
    r_x = np.zeros_like(x)
    for t in range(steps - 1, -1, -1):
        i, o, f, g, z = gates[t]
        r_c = r_c + kept(hs[t], r_h)  # h = o ⊙ tanh(c); tanh passes it on
        ig = i * g
        if t > 0:
            fc = f * cs[t - 1]
            r_ig, r_fc = ig / blip(cs[t], eps) * r_c, fc / blip(cs[t], eps) * r_c
        else:
            r_ig, r_fc = r_c, None
        r_g = kept(ig, r_ig)
        w, r, _ = blocks["c"]
        r_xh = linear(xhs[t], (w if t == 0 else np.concatenate([w, r], axis=1)).T, z["c"], r_g)
        r_x[t] = r_xh[:, :I]
        r_h = r_xh[:, I:] if t > 0 else None
        r_c = kept(fc, r_fc) if t > 0 else None
    return r_x


def test_lstm_lrp_epsilon_is_arras_2017():
    """lrp-epsilon (uniform with gate_constant = 1 on products, normalized on linear maps) on an
    unrolled LSTM is the Arras et al. 2017 LSTM-LRP."""
    rng = np.random.default_rng(11)
    C = 2
    W, R = rng.standard_normal((1, 4 * H, I)), rng.standard_normal((1, 4 * H, H))
    b = rng.standard_normal((1, 8 * H))
    V, v = rng.standard_normal((H, C)), rng.standard_normal(C)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "h_all"], hidden_size=H),
             helper.make_node("Squeeze", ["h_all", "zero"], ["h"]),
             helper.make_node("Gemm", ["h", "V", "v"], ["y"])]
    x_info = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [T, B, I])
    graph = helper.make_graph(nodes, "arras", [x_info],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [B, C])],
                              [numpy_helper.from_array(a, n) for a, n in
                               ((W, "W"), (R, "R"), (b, "B"), (V, "V"), (v, "v"), (np.array([0]), "zero"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((T, B, I))
    seed = rng.standard_normal((B, C))
    rules = (ROOT / "rules" / "lrp-epsilon.rules").read_text()
    got = seeded_pass(model, rules, x, seed)["R"]
    want = arras_lstm_lrp(x, W[0], R[0], b[0], V, v, seed, eps=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# torch-exported recurrent models --------------------------------------------------------------------

torch = pytest.importorskip("torch", reason="the torch exports need the [crosscheck] extra (torch)")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_models as tm  # noqa: E402


class Recurrent(torch.nn.Module):
    """A 2-layer bidirectional batch_first LSTM or GRU, read at its last step by a dense head."""

    def __init__(self, cell: str, outputs: int) -> None:
        super().__init__()
        self.rnn = getattr(torch.nn, cell)(5, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(12, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


NETS = {"lstm_classifier": ("LSTM", 4), "gru_classifier": ("GRU", 4), "lstm_regressor": ("LSTM", 1)}


@dataclass
class Export:
    net: torch.nn.Module
    x: np.ndarray
    paths: dict[bool, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = {}
    for name, (cell, outputs) in NETS.items():
        net = tm.seeded(Recurrent, cell=cell, outputs=outputs).eval()
        x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(1))
        folder = tmp_path_factory.mktemp(name)
        out[name] = Export(net, x.numpy(), {d: tm.export_onnx(net, x, folder / f"{d}.onnx", dynamo=d)
                                            for d in (False, True)})
    return out


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("net", list(NETS))
def test_torch_gradient_equals_autograd(exports, net, dynamo):
    e = exports[net]
    target = 0 if NETS[net][1] == 1 else 2
    x = torch.from_numpy(e.x).requires_grad_(True)
    e.net(x)[:, target].sum().backward()
    explainer = Explainer(e.paths[dynamo], ROOT / "rules" / "gradient.rules")
    got = explainer.explain(e.x, target=target).saliency["input"]
    np.testing.assert_allclose(got, x.grad.numpy(), rtol=1e-4, atol=1e-5 * np.abs(x.grad.numpy()).max())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("net", list(NETS))
def test_torch_lrp_epsilon_conserves(exports, net, dynamo):
    e = exports[net]
    result = Explainer(e.paths[dynamo], ROOT / "rules" / "lrp-epsilon.rules").explain(e.x, target="argmax")
    assert result.bias_total is not None and np.abs(result.bias_total).max() > 0  # the biases are blamed
    assert np.abs(result.relative_delta).max() <= 1e-3


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_check_sums_time_major_tensors_per_row(exports, dynamo):
    """batch_first nets are transposed to time-major [T, N, ...] for the recurrent node: the per-node
    conservation sums of ``rulegraph check`` take each row along the batch axis, wherever it is."""
    from rulegraph.check import check

    e = exports["lstm_classifier"]
    report = check(e.paths[dynamo], ROOT / "rules" / "lrp-epsilon.rules", x=e.x, samples=0)
    assert report.ok, report.to_text()
