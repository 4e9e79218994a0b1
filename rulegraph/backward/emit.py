"""The tape: the only user of ``onnx.helper``. Fresh names, constants, nodes.

VJPs and rules never build protobufs themselves; they call ``tape.op(...)`` and get tensor names
back. The tape knows the model's opset, so helpers such as ``reduce_sum`` and ``unsqueeze`` emit
the right form (axes as attribute or as input).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import large
from ..graph.kinds import onnx_op_type


def free_prefix(names, base: str = "rg") -> str:
    """``base`` (or ``base1``, ``base2``, ...): a prefix no name in ``names`` starts with, so that
    every name a tape makes is new in the user's model."""
    taken = {name.split("/", 1)[0] for name in names if "/" in name}
    k = 0
    while (prefix := base if k == 0 else f"{base}{k}") in taken:
        k += 1
    return prefix


def free_name(name: str, names) -> str:
    """``name``, or ``name_1``, ``name_2``, ... : the first not in ``names``."""
    k, candidate = 0, name
    while candidate in names:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


#: ops never shared between two requests: Identity names a distinct output (graph outputs, loop
#: values), the random ops draw anew
NOT_SHARED = frozenset({"Identity", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                        "Multinomial", "Bernoulli", "Dropout"})


class Tape:
    """Collects the nodes and constants of the backward pass."""

    def __init__(self, opset: int, taken_names: set[str], float_dtype=np.float32, prefix: str = "rg"):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.float_dtype = np.dtype(float_dtype)
        self._taken = set(taken_names)
        self._prefix = prefix
        self._counter = 0
        self._consts: dict[tuple, str] = {}
        #: (domain, op, inputs, outputs, attributes) -> the outputs of the node emitted for it
        self._emitted: dict[tuple, tuple[str, ...]] = {}
        self.scope = ""
        #: big constants as held stubs over their arrays (a large model's backward: ``graph/large.py``)
        self.hold = False
        #: the arrays behind those stubs (the stubs do not keep them: whoever keeps the model keeps these)
        self.held: list[np.ndarray] = []
        #: what the names made now stand for, in the user's terms (messages: "the backward of node ...")
        self.context = ""
        #: every name made -> its ``context`` then (to translate onnxruntime's messages)
        self.origins: dict[str, str] = {}
        #: each ``blip`` made: its output -> (the tensor stabilized, ε) (``compile/simplify.py``)
        self.blips: dict[str, tuple[str, float]] = {}

    @property
    def float_type(self) -> int:
        """The ONNX element type of the backward's floats (for Cast)."""
        return helper.np_dtype_to_tensor_dtype(self.float_dtype)

    # names ---------------------------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        while True:
            self._counter += 1
            name = f"{self._prefix}/{self.scope}{hint}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                self.origins[name] = self.context
                return name

    # constants -----------------------------------------------------------------------------------
    def const(self, value, dtype=None, hint: str = "c") -> str:
        """An initializer holding ``value``; small constants are shared."""
        array = np.asarray(value, dtype=dtype if dtype is not None else None)
        if dtype is None and array.dtype.kind == "f" and (
                array.dtype == np.float64 or array.dtype.itemsize < self.float_dtype.itemsize):
            # float64 from numpy arithmetic, or a half weight under a float32 backward (mixed
            # precision): the backward's type (a half value upcasts exactly)
            array = array.astype(self.float_dtype)
        key = None
        if array.size <= 16:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key in self._consts:
                return self._consts[key]
        name = self.fresh(hint)
        tensor = large.initializer(array, name, self.hold)
        if large.is_held(tensor):
            self.held.append(array)
        self.initializers.append(tensor)
        if key is not None:
            self._consts[key] = name
        return name

    def scalar(self, value: float) -> str:
        """A float scalar of the backward's dtype."""
        return self.const(np.array(value, dtype=self.float_dtype), hint="k")

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint="i")

    # nodes ---------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str | None, outputs: int = 1, domain: str = "", **attrs):
        """Emit one node; returns its output name (or a list when ``outputs > 1``). A node equal to one
        emitted before (op, inputs, attributes) is not emitted again: the earlier outputs are returned
        (the rules ask for the same shape, mask or reshape of one tensor many times; on small models
        onnxruntime's cost is per node)."""
        node = helper.make_node(op_type, ["" if i is None else i for i in inputs], ["?"] * outputs,
                                domain=domain, **{k: v for k, v in attrs.items() if v is not None})
        key = None
        if op_type not in NOT_SHARED:
            key = (domain, op_type, tuple(node.input), outputs,
                   tuple(a.SerializeToString() for a in node.attribute))
            if key in self._emitted:
                names = self._emitted[key]
                return names[0] if outputs == 1 else list(names)
        names = [self.fresh(op_type) for _ in range(outputs)]
        node.output[:] = names
        node.name = names[0]
        self.nodes.append(node)
        if key is not None:
            self._emitted[key] = tuple(names)
        return names[0] if outputs == 1 else names

    def copy_node(self, node, inputs: Sequence[str | None], outputs: int | None = None):
        """Emit ``node``'s op with its attributes on other inputs; returns the first output."""
        n_out = outputs if outputs is not None else 1
        names = [self.fresh(node.op_type) for _ in range(n_out)]
        op_type = onnx_op_type(node.op_type, node.domain)
        proto = helper.make_node(op_type, ["" if i is None else i for i in inputs], names, name=names[0],
                                 domain=node.domain)
        proto.attribute.extend(node.attribute_protos)
        self.nodes.append(proto)
        return names[0] if n_out == 1 else names

    # opset-aware helpers --------------------------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: Sequence[int] | str | None, keepdims: bool = True) -> str:
        """ReduceSum/ReduceMean/ReduceMax/... over ``axes`` (ints, or a tensor name of int64 axes)."""
        axes_as_input = op_type == "ReduceSum" or self.opset >= 18
        if axes is None:
            return self.op(op_type, x, keepdims=int(keepdims))
        if isinstance(axes, str):
            if not axes_as_input:
                raise ValueError(f"{op_type} at opset {self.opset} cannot take axes as a tensor")
            return self.op(op_type, x, axes, keepdims=int(keepdims), noop_with_empty_axes=1)
        if axes_as_input:
            return self.op(op_type, x, self.ints(axes), keepdims=int(keepdims))
        return self.op(op_type, x, keepdims=int(keepdims), axes=list(axes))

    def is_inf(self, x: str) -> str:
        """``IsInf(x)``; IsInf takes fp16/bf16 only from opset 20, so before that a half ``x`` is
        checked through a float32 cast (exact: the cast keeps ±∞)."""
        if self.opset < 20 and self.float_dtype.itemsize < 4:
            x = self.op("Cast", x, to=onnx.TensorProto.FLOAT)
        return self.op("IsInf", x)

    def reduce_sum(self, x: str, axes, keepdims: bool = True) -> str:
        return self.reduce("ReduceSum", x, axes, keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", x, self.ints(axes))

    def shape(self, x: str, start: int | None = None, end: int | None = None) -> str:
        return self.op("Shape", x, start=start, end=end)

    def reshape_like(self, g: str, x: str) -> str:
        return self.op("Reshape", g, self.shape(x))

    def zeros_like(self, x: str) -> str:
        zero = numpy_helper.from_array(np.zeros(1, dtype=self.float_dtype), "value")
        return self.op("ConstantOfShape", self.shape(x), value=zero)

    def sum(self, terms: Sequence[str]) -> str:
        terms = list(terms)
        if len(terms) == 1:
            return terms[0]
        return self.op("Sum", *terms)

    # arithmetic used by several rules -------------------------------------------------------------
    def indicator(self, cond: str) -> str:
        """``cond`` (boolean) as 0/1 floats of the backward's dtype."""
        return self.op("Cast", cond, to=self.float_type)

    def gate(self, cond: str, g: str) -> str:
        """``g`` where ``cond`` holds, 0 elsewhere: ``g ⊙ 1[cond]``. The same numbers as
        ``Where(cond, g, 0)`` for finite ``g`` (a non-finite ``g`` stays non-finite where the gate is
        shut, so it is reported rather than hidden), at the cost of two streaming passes: onnxruntime's
        Where is an order of magnitude slower than Cast and Mul on large tensors."""
        return self.op("Mul", g, self.indicator(cond))

    def blip(self, d: str, eps: float) -> str:
        """``d + ε·sign(d)`` with ``sign(0) = +1`` (docs/rules.md, the rules); ``d`` itself when ε = 0.
        The step is ``2ε·1[d ≥ 0] − ε``: exactly ``±ε`` (doubling and Sterbenz subtraction are exact),
        without onnxruntime's slow Where."""
        if eps == 0:
            return d
        nonneg = self.indicator(self.op("GreaterOrEqual", d, self.scalar(0.0)))
        step = self.op("Sub", self.op("Mul", nonneg, self.scalar(2 * eps)), self.scalar(eps))
        out = self.op("Add", d, step)
        self.blips[out] = (d, eps)
        return out

    def safe_div(self, a: str, d: str) -> str:
        """``a / d`` with 0 where ``d = 0`` (a zero denominator carries nothing): ``a / (d + z) · (1 − z)``
        with ``z = 1[d = 0]``, which is exactly ``a / d`` elsewhere (adding 0 and scaling by 1 are exact)."""
        zero = self.indicator(self.op("Equal", d, self.scalar(0.0)))
        quotient = self.op("Div", a, self.op("Add", d, zero))
        return self.op("Mul", quotient, self.op("Sub", self.scalar(1.0), zero))
