"""Op kinds (RULES.md §2): the classes of ops that rules are defined for.

``OP_KINDS`` maps an ONNX op type to its kind. Mul, Div and MatMul are *linear* when one operand
is a constant and *bilinear* when both are activations; ``kind_of`` decides that from the node.

A fused node (``fusion.py``: several nodes recognised as one op) takes the kind of its op type:
Gelu, SiLU and HardSwish are nonlinear, LayerNormalization is normalizing. ``SiLU`` is not an ONNX
op: it names the pattern ``x·Sigmoid(x)`` (SiLU, Swish), so that a rule file can bind it.
"""

from __future__ import annotations

LINEAR = "linear"
NONLINEAR = "nonlinear"
MAX = "max"
ROUTE = "route"
BILINEAR = "bilinear"
NORMALIZING = "normalizing"

OP_KINDS: dict[str, str] = {
    # linear: affine maps of the activations; weights and biases constant
    "Gemm": LINEAR, "MatMul": LINEAR, "Conv": LINEAR, "BatchNormalization": LINEAR,
    "AveragePool": LINEAR, "GlobalAveragePool": LINEAR, "ReduceMean": LINEAR, "ReduceSum": LINEAR,
    "Add": LINEAR, "Sub": LINEAR, "Mul": LINEAR, "Div": LINEAR, "Neg": LINEAR, "Sum": LINEAR,
    "ConvTranspose": LINEAR, "Resize": LINEAR,
    # nonlinear: elementwise y = f(x)
    "Relu": NONLINEAR, "LeakyRelu": NONLINEAR, "PRelu": NONLINEAR, "Elu": NONLINEAR,
    "Selu": NONLINEAR, "Sigmoid": NONLINEAR, "Tanh": NONLINEAR, "Softplus": NONLINEAR,
    "Erf": NONLINEAR, "Gelu": NONLINEAR, "HardSigmoid": NONLINEAR, "HardSwish": NONLINEAR,
    "Clip": NONLINEAR, "Abs": NONLINEAR, "SiLU": NONLINEAR,
    # max: b = max of a window or of operands
    "MaxPool": MAX, "GlobalMaxPool": MAX, "ReduceMax": MAX, "Max": MAX,
    # route: move values without arithmetic
    "Reshape": ROUTE, "Flatten": ROUTE, "Transpose": ROUTE, "Squeeze": ROUTE, "Unsqueeze": ROUTE,
    "Identity": ROUTE, "Dropout": ROUTE, "Concat": ROUTE, "Split": ROUTE, "Slice": ROUTE,
    "Pad": ROUTE, "Gather": ROUTE, "Expand": ROUTE,
    # normalizing: need an explicit rule
    "Softmax": NORMALIZING, "LogSoftmax": NORMALIZING, "LayerNormalization": NORMALIZING,
}

#: Ops whose kind is bilinear when every float operand is an activation.
BILINEAR_WHEN_ALL_ACTIVE = frozenset({"Mul", "Div", "MatMul"})


def kind_of(op_type: str, active_inputs: list[bool]) -> str | None:
    """The node's kind, or None for an op type rulegraph does not know.

    ``active_inputs[i]`` tells whether input ``i`` carries an activation (not a constant).
    """
    kind = OP_KINDS.get(op_type)
    if op_type in BILINEAR_WHEN_ALL_ACTIVE and sum(active_inputs[:2]) >= 2:
        return BILINEAR
    return kind
