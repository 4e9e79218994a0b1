"""What a rule emitter may read and call (``RuleContext``), and the linear-op variants the LRP rules
build (``LinearVariant``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..backward.fused import apply_vjp, emit_copy, evaluate
from ..backward.vjp import LINEAR_BIAS, LINEAR_PARAMS, WINDOW_SUMS, VjpContext
from ..lang.ruleset import RuleSet


class RuleContext(VjpContext):
    """What a rule emitter may read and call (the rule families in backward/); extends the VJP context."""

    def __init__(self, base: VjpContext, a_out, params, ruleset: RuleSet, bias_sink, baseline_of=None):
        super().__init__(base.node, base.graph, base.tape, base.active, base.request_output)
        self.baseline_of = baseline_of or {}
        self.a_out = a_out
        self.params = params
        self.quantity = ruleset.quantity
        self.bias_policy = ruleset.bias
        self.kind = base.node.kind
        self._bias_sink = bias_sink

    def vjp(self, g: list[str | None]) -> list[str | None]:
        return apply_vjp(self, g)

    def baseline(self, tensor: str) -> str:
        """``t'``: the tensor computed on the baseline input (difference quantity only)."""
        if tensor not in self.baseline_of:
            raise self.fail(f"rule needs the baseline forward pass (quantity difference); "
                            f"'{tensor}' has none under quantity {self.quantity}")
        return self.baseline_of[tensor]

    def linear_bias(self) -> str | None:
        """The bias of a linear op as a tensor name, or None: its constant part, plus for Add, Sub and
        Sum the operands that are not activations (``inactive_operands``)."""
        fn = LINEAR_BIAS.get(self.node.op_type)
        value = None if fn is None else fn(self)
        constant = None
        if isinstance(value, str):   # a bias computed in the graph (a tensor name)
            constant = value
        elif value is not None and np.any(value):
            constant = self.tape.const(np.asarray(value, dtype=self.tape.float_dtype), hint="bias")
        runtime = self._runtime_bias()
        if runtime is None or constant is None:
            return constant if runtime is None else runtime
        return self.tape.op("Add", constant, runtime)

    def inactive_operands(self) -> list[int]:
        """Indices of float operands computed at run time without the explained inputs (a position
        embedding looked up by Range-derived ids, an attention mask): no number flows into them, so
        what they add is a bias."""
        return [i for i, (t, act) in enumerate(zip(self.node.inputs, self.active))
                if t and not act and t not in self.graph.constants and self.graph.is_float(t)]

    def parts_of_constants(self) -> list[tuple[str, str]]:
        """For a route op: (operand, its part of ``a(y)``) for every float operand that is not an
        activation (a constant, or an inactive operand), where the op's VJP gives it one (Concat)."""
        flags = [bool(t) and not act and self.graph.is_float(t) for t, act in zip(self.node.inputs, self.active)]
        if not any(flags):
            return []
        flipped = VjpContext(self.node, self.graph, self.tape, flags, self.request_output)
        parts = apply_vjp(flipped, self.a_out)
        return [(t, p) for t, p in zip(self.node.inputs, parts) if p is not None]

    def _runtime_bias(self) -> str | None:
        """The inactive operands of Add, Sub, Sum as one bias tensor; infinities (a mask's −∞) as 0."""
        t, node = self.tape, self.node
        indices = self.inactive_operands() if node.op_type in ("Add", "Sub", "Sum") else []
        if not indices:
            return None
        terms = [node.inputs[i] if node.op_type != "Sub" or i == 0 else t.op("Neg", node.inputs[i]) for i in indices]
        bias = t.sum(terms)
        return t.op("Where", t.is_inf(bias), t.scalar(0.0), bias)

    def report_bias(self, share: str) -> None:
        self._bias_sink(self.node, share)

    def value_at_zero(self) -> str | None:
        """``f(0)`` of an elementwise node (a fused one: its members) as a constant, or None when it is 0."""
        rank = self.graph.rank(self.x) or 1
        zero = np.zeros([1] * rank, dtype=self.tape.float_dtype)
        try:
            value = evaluate(self.graph, self.node, {self.x: zero})[0]
        except Exception as exc:
            raise self.fail(f"cannot evaluate f(0): {exc}") from exc
        if not np.all(np.isfinite(value)):
            op = self.node.op_type
            raise self.fail(f"f(0) = {np.ravel(value)[0]} is not finite, so a rule that blames f(0) cannot "
                            f"be applied; bind another rule to {op} (e.g. `{op} -> gradient`)")
        if not np.any(value):
            return None
        return self.tape.const(np.asarray(value, dtype=self.tape.float_dtype), hint="f0")

    def variant(self, weight_fn, bias_fn=None) -> LinearVariant:
        """This linear op with constant weights ``weight_fn(w)`` and bias ``bias_fn(b)`` (no bias
        when ``bias_fn`` is None): the building block of the LRP family (Montavon et al. 2019)."""
        entry = LINEAR_PARAMS.get(self.node.op_type)
        if entry is None:
            raise self.fail(f"rule needs a Conv, Gemm or MatMul with constant weights, not {self.node.op_type}")
        weight_index, bias_index = entry(self)
        inputs = list(self.node.inputs)
        constants: dict[str, np.ndarray] = {}
        dtype = self.tape.float_dtype

        def put(index: int, value: np.ndarray) -> None:
            value = np.asarray(value, dtype=dtype)
            inputs[index] = self.tape.const(value, hint="w_mod")
            constants[inputs[index]] = value

        put(weight_index, weight_fn(self.const(weight_index).astype(np.float64)))
        if bias_index is not None and bias_index < len(inputs) and inputs[bias_index]:
            if bias_fn is None:
                inputs[bias_index] = ""
            else:
                put(bias_index, bias_fn(self.const(bias_index).astype(np.float64)))
        graph = replace(self.graph, constants={**self.graph.constants, **constants},
                        shapes={**self.graph.shapes, **{k: list(v.shape) for k, v in constants.items()}})
        node = replace(self.node, inputs=inputs)
        return LinearVariant(VjpContext(node, graph, self.tape, self.active, self.request_output),
                             1 - weight_index if weight_index < 2 else 0)

    def apply_node_to(self, a: str) -> str:
        """``f(a)``: the node (a fused one: its members) emitted again on ``a``."""
        return emit_copy(self.tape, self.node, [a] + self.node.inputs[1:])[0]

    def window_sum(self, xs: list[str | None]) -> str:
        return self._window(0)(self, xs)

    def window_sum_vjp(self, g: str) -> list[str | None]:
        return self._window(1)(self, g)

    def _window(self, i: int):
        entry = WINDOW_SUMS.get(self.node.op_type)
        if entry is None:
            raise self.fail(f"the radial rule has no window for {self.node.op_type}; it supports "
                            f"{', '.join(sorted(WINDOW_SUMS))}")
        return entry[i]


@dataclass
class LinearVariant:
    """A linear op with modified weights: its forward on any input, and its VJP."""

    ctx: VjpContext
    activation_index: int

    def forward(self, x: str) -> str:
        """The modified op applied to ``x`` (no bias unless the variant kept one)."""
        inputs = list(self.ctx.node.inputs)
        inputs[self.activation_index] = x
        return self.ctx.tape.copy_node(self.ctx.node, inputs)

    def transpose(self, g: str) -> str:
        """``Lᵀg`` of the modified op with respect to its activation input."""
        return apply_vjp(self.ctx, [g] + [None] * (len(self.ctx.node.outputs) - 1))[self.activation_index]
