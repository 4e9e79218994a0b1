"""Op kinds (docs/kinds.md): the classes of ops that rules are defined for.

The model reader knows no op's kind itself: it is given an ``OpKinds`` (the backward's op table,
``backward/ops.py``, where each op's kind is declared with its VJP). Mul, Div and MatMul are
*linear* when one operand is a constant and *bilinear* when both are activations; Pow is *nonlinear*
in its base and *normalizing* (no rule assumed) once its exponent is an activation; ``OpKinds.of``
decides that from the node.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

LINEAR = "linear"
NONLINEAR = "nonlinear"
MAX = "max"
ROUTE = "route"
BILINEAR = "bilinear"
NORMALIZING = "normalizing"
KINDS = (LINEAR, NONLINEAR, MAX, ROUTE, BILINEAR, NORMALIZING)

#: the standard ONNX domain's two names (onnxruntime reads both)
DEFAULT_DOMAINS = ("", "ai.onnx")


def op_key(op_type: str, domain: str = "") -> str:
    """The op table's key of an op: its type in the standard domain, ``domain.op_type`` in any other
    (``com.microsoft.SkipLayerNormalization``), so that ops of the same name in two domains stay apart
    (onnxruntime's ``com.microsoft.Gelu`` and ONNX's ``Gelu``). ``Node.op_type`` holds this key."""
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}.{op_type}"


def onnx_op_type(key: str, domain: str = "") -> str:
    """The ONNX op type of a key, to emit the op again (``op_key``'s inverse)."""
    prefix = f"{domain}."
    return key[len(prefix):] if domain not in DEFAULT_DOMAINS and key.startswith(prefix) else key


@dataclass(frozen=True)
class OpKinds:
    """op type -> kind, the op types that are bilinear when every float operand is an activation, and
    the nonlinear op types that are normalizing when an input after the first is an activation."""

    table: Mapping[str, str]
    bilinear: Set[str] = frozenset()
    first_input_only: Set[str] = frozenset()
    #: op type -> (attribute, its default, {value: kind}): a kind that an attribute decides (Scatter's
    #: reduction); a value not listed keeps the table's kind
    by_attribute: Mapping[str, tuple[str, str, Mapping[str, str]]] | None = None

    def __contains__(self, op_type: str) -> bool:
        return op_type in self.table

    def of(self, op_type: str, active_inputs: list[bool], attrs: Mapping | None = None) -> str | None:
        """The node's kind, or None for an op type rulegraph does not know.

        ``active_inputs[i]`` tells whether input ``i`` carries an activation (not a constant);
        ``attrs`` are the node's attributes.
        """
        if op_type in self.bilinear and sum(active_inputs) >= 2:
            return BILINEAR
        if op_type in self.first_input_only and any(active_inputs[1:]):
            return NORMALIZING
        if self.by_attribute and op_type in self.by_attribute:
            name, default, kinds = self.by_attribute[op_type]
            value = (attrs or {}).get(name, default)
            value = value.decode() if isinstance(value, bytes) else value
            return kinds.get(value, self.table.get(op_type))
        return self.table.get(op_type)
