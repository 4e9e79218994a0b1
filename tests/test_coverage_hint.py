"""The coverage hint (a node without a rule): the suggested binding comes from the rule table, for
the node's own op type and the file's quantity.

Each row is a one-node model with no binding at all; the oracle is the rule the table names for
that (kind, op type, quantity): the first accepting rule (registration order) that conserves the
quantity exactly or up to ε with its default parameters, else one that conserves it once biases are
counted (the message says so), else none (the message says that no rule conserves it).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto
from oracles import one_node

import rulegraph
from rulegraph.backward.rules import APPROXIMATE, EXACT, LEAKS_BIAS, RULES
from rulegraph.run import rulefiles as dsl

F = TensorProto.FLOAT
W = np.ones((3, 4), np.float32)

#: (kind, op type, inputs of the node, quantity, suggested rule or None, its class in the table)
HINTS = [
    ("nonlinear", "Relu", ["x"], "relevance", "ignore", EXACT),
    ("nonlinear", "Relu", ["x"], "importance", "gradient", EXACT),
    ("nonlinear", "Sigmoid", ["x"], "importance", "slope", EXACT),   # gradient does not conserve it
    ("nonlinear", "Tanh", ["x"], "importance", "slope", EXACT),
    ("nonlinear", "Abs", ["x"], "importance", "gradient", EXACT),    # positively homogeneous
    ("nonlinear", "Sigmoid", ["x"], "difference", "baseline_difference", EXACT),
    ("linear", "Gemm", ["x", "w"], "relevance", "normalized", APPROXIMATE),
    ("linear", "Gemm", ["x", "w"], "importance", "gradient", LEAKS_BIAS),
    ("linear", "Gemm", ["x", "w"], "difference", "gradient", EXACT),
    ("max", "ReduceMax", ["x"], "relevance", "gradient", EXACT),
    ("max", "ReduceMax", ["x"], "difference", "baseline_difference", EXACT),
    ("route", "Flatten", ["x"], "importance", "gradient", EXACT),
    ("bilinear", "Mul", ["x", "x"], "relevance", "uniform", EXACT),
    ("bilinear", "Mul", ["x", "x"], "importance", None, None),
    ("normalizing", "Softmax", ["x"], "relevance", "softmax_taylor", LEAKS_BIAS),
    ("normalizing", "Softmax", ["x"], "importance", None, None),
]


def _model(op_type: str, args: list[str]):
    attrs = {"Gemm": {"transB": 1}, "ReduceMax": {"axes": [1]}}.get(op_type, {})
    consts = {"w": W} if "w" in args else None
    return one_node(op_type, args, {"x": ["N", 4]}, consts, elem=F, **attrs)


@pytest.mark.parametrize("kind,op_type,args,quantity,rule,cls", HINTS,
                         ids=[f"{r[1]}-{r[3]}" for r in HINTS])
def test_hint_names_a_rule_that_conserves_the_quantity(kind, op_type, args, quantity, rule, cls):
    text = f"rulegraph 1\nquantity {quantity}\n" + ('baseline zeros\n' if quantity == "difference" else "")
    explainer = rulegraph.Explainer(_model(op_type, args), dsl.parse(text, source="t.rules"))
    with pytest.raises(rulegraph.CoverageError) as caught:
        explainer.compiled()
    message = str(caught.value)
    assert f"kind {kind}, has no rule" in message
    if rule is None:
        assert f"no rule conserves {quantity} on {op_type} ({kind}) ops" in message
        assert "binding such as" not in message
        return
    assert f"add a binding such as `{op_type} -> {rule}`" in message
    spec = RULES[rule]
    assert kind in spec.kinds
    assert spec.conservation_of(quantity, kind, op_type, spec.resolve_params({})[0]) == cls
    assert ("once biases are counted" in message) == (cls == LEAKS_BIAS)
