"""Recurrent ops unrolled: every LSTM, GRU and RNN node becomes its per-timestep primitives
(Gather, Concat, Gemm, Add, Mul, Sigmoid, Tanh, Relu, Clip, Neg, Unsqueeze), so that every op rule
applies per step and no recurrent backward is needed (docs/kinds.md, recurrent ops).

The expansion writes the ONNX equations (onnx.ai operators LSTM-14, GRU-14, RNN-14) one step at a
time, for each direction (``forward``, ``reverse``; ``bidirectional`` is both), ``layout`` 0 or 1:

- the gate pre-activations are one linear map of ``[x_t, h_{t−1}]`` (Concat, then one Gemm by the
  stacked ``[W_k; R_k]`` with bias ``Wb_k + Rb_k``), the form of Arras et al. 2017, so that
  the ε-rule sees one sum per gate with the bias as its own term; at the first step without
  ``initial_h`` only ``x_t`` enters (the state is zero);
- LSTM: ``i, f, o = f(·)``, ``g = g(·)``, ``c_t = f ⊙ c_{t−1} + i ⊙ g``, ``h_t = o ⊙ h(c_t)``,
  peepholes ``P`` added to the i, f (on ``c_{t−1}``) and o (on ``c_t``) pre-activations;
- GRU: ``h_t = (1 − z) ⊙ ĥ + z ⊙ h_{t−1}``, with ``1 − z`` written ``f(−a_z)`` when ``f`` is
  Sigmoid (``1 − σ(a) = σ(−a)``: a gate by itself, which the LRP rules hold constant), the reset
  gate before (``linear_before_reset = 0``) or after (``= 1``) the recurrent map;
- ``clip`` clips every pre-activation before its activation;
- ``sequence_lens``: at step ``t`` the mask ``m = t < len`` (a constant when the lengths are, else
  computed) keeps the state, ``h_t = m ⊙ ĥ_t + (1 − m) ⊙ h_{t−1}``, and zeroes ``Y`` past the end;
  steps where every length covers ``t`` need no mask.

The outputs keep their names (``Y``, ``Y_h``, ``Y_c``), so every output is a path to the
explained one. Weights must be constants; the sequence length must be static (refused otherwise,
with the fix). Activations other than Sigmoid, Tanh and Relu, and LSTM's ``input_forget``, are
refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import ModelError, node_ref
from . import large

#: number of gates (blocks of ``hidden_size`` rows in W and R) per op, in ONNX's order
GATES = {"LSTM": "iofc", "GRU": "zrh", "RNN": "i"}
#: the default activations per direction
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
#: activations the expansion writes, by their lower-case name
ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}


class _Emitter:
    """Nodes and constants of one expansion, named under the node's name."""

    def __init__(self, node: onnx.NodeProto, constants: dict[str, np.ndarray], taken: set[str], dtype):
        self.prefix, self.constants, self.taken, self.dtype = node.name, constants, taken, dtype
        self.nodes: list[onnx.NodeProto] = []

    def name(self, label: str) -> str:
        name, i = f"{self.prefix}/{label}", 0
        while name in self.taken:
            i += 1
            name = f"{self.prefix}/{label}_{i}"
        self.taken.add(name)
        return name

    def const(self, label: str, value: np.ndarray) -> str:
        name = self.name(label)
        self.constants[name] = np.asarray(value)
        return name

    def op(self, op_type: str, inputs: list[str], label: str, output: str | None = None, **attrs) -> str:
        output = output or self.name(label)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self.name(label + "_" + op_type),
                                           **attrs))
        return output


@dataclass(frozen=True)
class Unrolled:
    """What one recurrent node became: per state (``"h"``, and ``"c"`` for an LSTM), per direction
    (``directions``, ONNX's order), per step ``t`` the tensor holding that state after step ``t``."""

    op: str
    directions: tuple[str, ...]
    steps: int
    hidden: int
    states: dict[str, tuple[tuple[str, ...], ...]]
    #: the node's outputs as exported (Y, Y_h, Y_c; "" where absent)
    outputs: tuple[str, ...] = ()


def expand_recurrent(proto: onnx.ModelProto, constants: dict[str, np.ndarray],
                     unrolled: dict[str, Unrolled] | None = None) -> bool:
    """Replace every LSTM, GRU and RNN node of ``proto`` by its unrolled primitives (new weights
    go into ``constants``); False when there is none. ``unrolled`` receives each node's per-step
    state tensors by node name."""
    if not any(n.op_type in GATES and n.domain in ("", "ai.onnx") for n in proto.graph.node):
        return False
    inferred = large.infer_shapes(proto, strict_mode=False, data_prop=True)
    shapes = {vi.name: vi.type.tensor_type.shape for vi in
              list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
    taken = {t for n in proto.graph.node for t in list(n.input) + list(n.output)} | set(constants)
    taken |= {n.name for n in proto.graph.node} | {i.name for i in proto.graph.input}
    nodes: list[onnx.NodeProto] = []
    for node in proto.graph.node:
        if node.op_type in GATES and node.domain in ("", "ai.onnx"):
            recurrent = _Recurrent(node, shapes, constants, taken)
            nodes.extend(recurrent.expand())
            if unrolled is not None:
                unrolled[node.name] = Unrolled(node.op_type, tuple(recurrent.dirs), recurrent.steps,
                                               recurrent.H, recurrent.states, tuple(node.output))
        else:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return True


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


class _Recurrent:
    """One recurrent node, read and checked; ``expand()`` returns its primitives."""

    def __init__(self, node: onnx.NodeProto, shapes, constants: dict[str, np.ndarray], taken: set[str]):
        self.node, self.op, self._constants = node, node.op_type, constants
        self.where = node_ref(node.name, node.op_type)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.direction = attrs.get("direction", b"forward")
        self.direction = self.direction.decode() if isinstance(self.direction, bytes) else self.direction
        self.layout = int(attrs.get("layout", 0))
        self.clip = attrs.get("clip")
        self.before_reset = int(attrs.get("linear_before_reset", 0))
        if self.op == "LSTM" and attrs.get("input_forget", 0):
            raise ModelError(f"{self.where} couples its input and forget gates (input_forget = 1), which "
                             "rulegraph does not expand; export the LSTM without input_forget")
        if self.direction not in ("forward", "reverse", "bidirectional"):
            raise ModelError(f"{self.where}: direction '{self.direction}' is none of forward, reverse, "
                             "bidirectional")
        self.dirs = ["forward", "reverse"] if self.direction == "bidirectional" else [self.direction]
        self.activations = self._activations(attrs)
        self.W, self.R = (self._weight(i, name) for i, name in ((1, "W"), (2, "R")))
        self.B = self._weight(3, "B", optional=True)
        self.P = self._weight(7, "P", optional=True) if self.op == "LSTM" else None
        self.H = self.R.shape[-1]
        self.x = node.input[0]
        self.seq_axis = 1 if self.layout else 0
        steps = self._dim(shapes, self.x, self.seq_axis)
        if not isinstance(steps, int):
            raise ModelError(
                f"{self.where}: the sequence length of its input '{self.x}' is {steps or 'unknown'}, not "
                "a number; rulegraph unrolls recurrent ops over a static length: export the model with a "
                "fixed sequence length (no dynamic axis on it), or fix that dimension in the model "
                "(onnx.tools.update_model_dims.update_inputs_outputs_dims)")
        self.steps = steps
        self.lens = _input(node, 4)
        self.emit = _Emitter(node, constants, taken, self.W.dtype)

    def _weight(self, index: int, name: str, optional: bool = False) -> np.ndarray | None:
        tensor = _input(self.node, index)
        if not tensor:
            if optional:
                return None
            raise ModelError(f"{self.where} has no {name} input")
        value = self._constants.get(tensor)
        if value is None:
            raise ModelError(f"{self.where}: its {name} ('{tensor}') is computed at run time; rulegraph "
                             "unrolls recurrent ops with constant weights: export them as initializers")
        return value

    def _dim(self, shapes, tensor: str, axis: int) -> int | str | None:
        if tensor in self._constants:
            return self._constants[tensor].shape[axis]
        shape = shapes.get(tensor)
        if shape is None or len(shape.dim) <= axis:
            return None
        d = shape.dim[axis]
        return int(d.dim_value) if d.HasField("dim_value") else (f"'{d.dim_param}'" if d.dim_param else None)

    def _activations(self, attrs) -> list[tuple[str, ...]]:
        default = DEFAULT_ACTIVATIONS[self.op]
        given = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
        if not given:
            return [default] * len(self.dirs)
        n = len(default)
        if len(given) == n and len(self.dirs) == 2:
            given = given * 2
        if len(given) != n * len(self.dirs):
            raise ModelError(f"{self.where} lists {len(given)} activations; {self.op} {self.direction} "
                             f"takes {n * len(self.dirs)}")
        unknown = [a for a in given if a.lower() not in ACTIVATIONS]
        if unknown:
            raise ModelError(f"{self.where} uses the activation '{unknown[0]}'; rulegraph unrolls recurrent "
                             f"ops with {', '.join(ACTIVATIONS.values())} only")
        names = [ACTIVATIONS[a.lower()] for a in given]
        return [tuple(names[d * n:(d + 1) * n]) for d in range(len(self.dirs))]

    # ----------------------------------------------------------------------------------------------

    def expand(self) -> list[onnx.NodeProto]:
        e = self.emit
        outputs = list(self.node.output)
        finals: dict[str, list[str]] = {"h": [], "c": []}
        per_step: list[list[str]] = [[] for _ in range(self.steps)]
        masks = self._masks()
        states: dict[str, list[list[str]]] = {"h": [[""] * self.steps for _ in self.dirs],
                                              "c": [[""] * self.steps for _ in self.dirs]}
        for d, direction in enumerate(self.dirs):
            h, c = self._initial(5, d, "h0"), self._initial(6, d, "c0") if self.op == "LSTM" else None
            order = range(self.steps) if direction == "forward" else range(self.steps - 1, -1, -1)
            for t in order:
                x = e.op("Gather", [self.x, e.const(f"t{t}", np.array(t, np.int64))], f"d{d}t{t}/x",
                         axis=self.seq_axis)
                h_new, c_new = self._step(d, t, x, h, c)
                y, h = self._carry(masks[t], h_new, h, f"d{d}t{t}/h")
                if c_new is not None:
                    _, c = self._carry(masks[t], c_new, c, f"d{d}t{t}/c")
                states["h"][d][t], states["c"][d][t] = h, c
                per_step[t].append(y)
            finals["h"].append(h)
            finals["c"].append(c)
        self.states = {k: tuple(map(tuple, v)) for k, v in states.items() if k == "h" or self.op == "LSTM"}
        time_axis, dir_axis = (1, 2) if self.layout else (0, 1)
        if _output(outputs, 0):
            steps = [self._stack(ys, [time_axis, dir_axis], dir_axis, f"t{t}/y")
                     for t, ys in enumerate(per_step)]
            e.op("Concat", steps, "y", output=outputs[0], axis=time_axis)
        state_axis = 1 if self.layout else 0
        for index, key in ((1, "h"), (2, "c")):
            if _output(outputs, index):
                self._stack(finals[key], [state_axis], state_axis, key, output=outputs[index])
        return e.nodes

    def _stack(self, tensors: list[str], unsqueeze: list[int], axis: int, label: str, output=None) -> str:
        e = self.emit
        axes = e.const(label + "/axes", np.array(unsqueeze, np.int64))
        parts = [e.op("Unsqueeze", [t, axes], f"{label}/d{d}") for d, t in enumerate(tensors)]
        return e.op("Concat", parts, label, output=output, axis=axis)

    def _initial(self, index: int, d: int, label: str) -> str | None:
        """Direction ``d``'s slice of initial_h (5) or initial_c (6), ``[batch, hidden]``; None if absent."""
        tensor = _input(self.node, index)
        if not tensor:
            return None
        axis = 1 if self.layout else 0
        if tensor in self._constants:
            if not np.any(self._constants[tensor]):  # a zero state is the absent one
                return None
            return self.emit.const(f"d{d}/{label}", np.take(self._constants[tensor], d, axis=axis))
        index = self.emit.const(f"d{d}", np.array(d, np.int64))
        return self.emit.op("Gather", [tensor, index], f"d{d}/{label}", axis=axis)

    def _masks(self) -> list[tuple[str, str] | None]:
        """Per step: (m, 1 − m) shaped ``[batch, 1]``, or None where no sequence ends before it."""
        e = self.emit
        if not self.lens:
            return [None] * self.steps
        dtype = self.W.dtype
        if self.lens in self._constants:
            lens = self._constants[self.lens].astype(np.int64)
            out: list[tuple[str, str] | None] = []
            for t in range(self.steps):
                m = (t < lens).astype(dtype)[:, None]
                out.append(None if m.all() else (e.const(f"t{t}/m", m), e.const(f"t{t}/1-m", 1 - m)))
            return out
        axes = e.const("mask_axes", np.array([1], np.int64))
        one = e.const("one", np.array(1, dtype))
        out = []
        for t in range(self.steps):
            valid = e.op("Less", [e.const(f"t{t}/step", np.array(t, np.int32)), self.lens], f"t{t}/valid")
            cast = e.op("Cast", [valid], f"t{t}/m1", to=helper.np_dtype_to_tensor_dtype(dtype))
            m = e.op("Unsqueeze", [cast, axes], f"t{t}/m")
            out.append((m, e.op("Sub", [one, m], f"t{t}/1-m")))
        return out

    def _carry(self, mask, new: str, old: str | None, label: str) -> tuple[str, str]:
        """(the step's output ``m ⊙ new``, the state carried on ``m ⊙ new + (1 − m) ⊙ old``)."""
        if mask is None:
            return new, new
        e = self.emit
        y = e.op("Mul", [new, mask[0]], label + "/y")
        if old is None:
            return y, y
        return y, e.op("Add", [y, e.op("Mul", [old, mask[1]], label + "/kept")], label + "/state")

    # the cells --------------------------------------------------------------------------------------

    def _block(self, matrix: np.ndarray, d: int, k: int) -> np.ndarray:
        return matrix[d, k * self.H:(k + 1) * self.H]

    def _bias(self, d: int, k: int, parts: str = "WR") -> np.ndarray | None:
        """``Wb_k + Rb_k`` (or one of them) of direction ``d``; None without B."""
        if self.B is None:
            return None
        n = len(GATES[self.op]) * self.H
        w, r = self.B[d, k * self.H:(k + 1) * self.H], self.B[d, n + k * self.H:n + (k + 1) * self.H]
        return (w if "W" in parts else 0) + (r if "R" in parts else 0)

    def _pre(self, d: int, t: int, k: int, xh: str, recurrent: bool, bias: np.ndarray | None,
             label: str) -> str:
        """``[x, h] [W_k; R_k]ᵀ + bias`` (``x W_kᵀ + bias`` without the recurrent part): one Gemm, so
        that the ε-rule divides by the whole pre-activation, bias included (Arras et al. 2017)."""
        e = self.emit
        w = self._block(self.W, d, k)
        if recurrent:
            w = np.concatenate([w, self._block(self.R, d, k)], axis=1)
        inputs = [xh, e.const(f"d{d}t{t}/{label}_w", w)]
        if bias is not None:
            inputs.append(e.const(f"d{d}t{t}/{label}_b", bias))
        return e.op("Gemm", inputs, f"d{d}t{t}/{label}_z", transB=1)

    def _act(self, name: str, z: str, label: str) -> str:
        e = self.emit
        if self.clip is not None:
            bound = float(self.clip)
            z = e.op("Clip", [z, e.const(label + "_lo", np.array(-bound, self.W.dtype)),
                              e.const(label + "_hi", np.array(bound, self.W.dtype))], label + "_clip")
        return e.op(name, [z], label)

    def _xh(self, d: int, t: int, x: str, h: str | None, label: str = "xh") -> str:
        return x if h is None else self.emit.op("Concat", [x, h], f"d{d}t{t}/{label}", axis=-1)

    def _step(self, d: int, t: int, x: str, h: str | None, c: str | None) -> tuple[str, str | None]:
        return {"LSTM": self._lstm, "GRU": self._gru, "RNN": self._rnn}[self.op](d, t, x, h, c)

    def _rnn(self, d, t, x, h, c):
        (f,) = self.activations[d]
        z = self._pre(d, t, 0, self._xh(d, t, x, h), h is not None, self._bias(d, 0), "i")
        return self._act(f, z, f"d{d}t{t}/h"), None

    def _peephole(self, d: int, t: int, z: str, k: int, c: str | None, label: str) -> str:
        """``z + P_k ⊙ c`` (P's blocks are i, o, f)."""
        if self.P is None or c is None:
            return z
        e = self.emit
        p = e.const(f"d{d}t{t}/{label}_p", self.P[d, k * self.H:(k + 1) * self.H])
        return e.op("Add", [z, e.op("Mul", [c, p], f"d{d}t{t}/{label}_pc")], f"d{d}t{t}/{label}_zp")

    def _lstm(self, d, t, x, h, c):
        e = self.emit
        f, g, act_h = self.activations[d]
        xh, rec = self._xh(d, t, x, h), h is not None
        label = f"d{d}t{t}"
        pre = {k: self._pre(d, t, i, xh, rec, self._bias(d, i), k) for i, k in enumerate("iofc")}
        gate_i = self._act(f, self._peephole(d, t, pre["i"], 0, c, "i"), f"{label}/i")
        cand = self._act(g, pre["c"], f"{label}/g")
        c_new = e.op("Mul", [gate_i, cand], f"{label}/ig")
        if c is not None:
            gate_f = self._act(f, self._peephole(d, t, pre["f"], 2, c, "f"), f"{label}/f")
            c_new = e.op("Add", [e.op("Mul", [gate_f, c], f"{label}/fc"), c_new], f"{label}/c")
        gate_o = self._act(f, self._peephole(d, t, pre["o"], 1, c_new, "o"), f"{label}/o")
        return e.op("Mul", [gate_o, e.op(act_h, [c_new], f"{label}/hc")], f"{label}/h"), c_new

    def _gru(self, d, t, x, h, c):
        e = self.emit
        f, g = self.activations[d]
        label = f"d{d}t{t}"
        rec = h is not None
        xh = self._xh(d, t, x, h)
        pre_z = self._pre(d, t, 0, xh, rec, self._bias(d, 0), "z")
        if self.before_reset:  # ĥ = g(x Whᵀ + Wbh + r ⊙ (h Rhᵀ + Rbh))
            gate_r = self._act(f, self._pre(d, t, 1, xh, rec, self._bias(d, 1), "r"), f"{label}/r")
            z = self._pre(d, t, 2, x, False, self._bias(d, 2, "W"), "h")
            rb = self._bias(d, 2, "R")
            if rec:
                hr_inputs = [h, e.const(f"{label}/rh_w", self._block(self.R, d, 2))]
                if rb is not None:
                    hr_inputs.append(e.const(f"{label}/rh_b", rb))
                hr = e.op("Gemm", hr_inputs, f"{label}/hr", transB=1)
                z = e.op("Add", [z, e.op("Mul", [gate_r, hr], f"{label}/rhr")], f"{label}/h_z")
            elif rb is not None:
                z = e.op("Add", [z, e.op("Mul", [gate_r, e.const(f"{label}/rh_b", rb)], f"{label}/rhr")],
                         f"{label}/h_z")
        elif rec:  # ĥ = g([x, r ⊙ h] [Wh; Rh]ᵀ + Wbh + Rbh)
            gate_r = self._act(f, self._pre(d, t, 1, xh, rec, self._bias(d, 1), "r"), f"{label}/r")
            rh = e.op("Mul", [gate_r, h], f"{label}/rh")
            z = self._pre(d, t, 2, self._xh(d, t, x, rh, "xrh"), True, self._bias(d, 2), "h")
        else:
            z = self._pre(d, t, 2, x, False, self._bias(d, 2), "h")
        cand = self._act(g, z, f"{label}/hh")
        if f == "Sigmoid":  # 1 − σ(a) = σ(−a): the update's complement is a gate itself
            neg = e.op("Neg", [pre_z], f"{label}/-z")
            keep_new = self._act(f, neg, f"{label}/1-z")
        else:
            keep_new = e.op("Sub", [e.const(f"{label}/one", np.array(1, self.W.dtype)),
                                    self._act(f, pre_z, f"{label}/z")], f"{label}/1-z")
        h_new = e.op("Mul", [keep_new, cand], f"{label}/zh")
        if rec:
            gate_z = self._act(f, pre_z, f"{label}/z")
            h_new = e.op("Add", [h_new, e.op("Mul", [gate_z, h], f"{label}/zh0")], f"{label}/h")
        return h_new, None


def _output(outputs: list[str], index: int) -> str:
    return outputs[index] if index < len(outputs) else ""
