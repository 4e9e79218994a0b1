"""Mixed precision: an fp16/bf16 model's forward in its own type, the relevance pass in float32.

``Explainer(precision="mixed")`` reads the model in its own type and emits the backward in float32.
The relevance arithmetic is where half precision fails first: ε = 1e-6 is below fp16's smallest
subnormal step around 1 (and flushes to 0 in bf16's 8-bit mantissa ratios), the denominators
``z + ε·sign(z)`` of small pre-activations underflow, and ratios of two small halves overflow
(fp16 ends at 65504). The forward, which the model was trained and deployed in, stays half: it is
the expensive part on a GPU and the activations it gives are exactly the model's.

After assembly the explainer holds the user's forward nodes (half) and the backward nodes the tape
emitted (float32 by construction, but reading forward tensors and sometimes constants that are half).
``keep_backward_in_float32`` makes the boundary explicit:

- every half tensor of the forward (activation, graph input or weight) that a backward node reads
  is read through one ``Cast`` to float32 (exact: every half value is a float32 value);
- the backward's own constants are float32 already (the tape upcasts a half weight it is given);
  ``Cast`` targets and any constant left in a half type become float32 (exact, as above);
- the explainer's outputs that the backward computes are declared float32.

Nothing is rounded but the forward itself; onnxruntime refuses any mixed-type node at session
creation, so a boundary missed here is an error, never a silently different answer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..graph import large

HALF_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _upcast_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(large.value(tensor).astype(np.float32), tensor.name)


def keep_backward_in_float32(model: onnx.ModelProto, backward_nodes: set[str], dtypes: dict[str, int],
                             fresh) -> int:
    """Rewrite ``model`` in place so that the nodes named in ``backward_nodes`` compute in float32.
    ``dtypes``: element types of the forward's tensors (the graph's); ``fresh(hint)``: a new unique
    name. Returns the number of Casts inserted at the boundary."""
    g = model.graph
    produced_by_backward = {o for n in g.node if n.name in backward_nodes for o in n.output if o}
    half_initializers = {i.name for i in g.initializer if i.data_type in HALF_TYPES}
    read_by_forward = {i for n in g.node if n.name not in backward_nodes for i in n.input if i}
    # the backward's own half constants: upcast in place (the forward does not read them)
    for k, init in enumerate(g.initializer):
        if init.name in half_initializers and init.name not in read_by_forward:
            g.initializer[k].CopyFrom(_upcast_tensor(init))
            half_initializers.discard(init.name)
    forward_half = {name for name, t in dtypes.items()
                    if t in HALF_TYPES and name not in produced_by_backward}
    forward_half |= half_initializers
    forward_half |= {i.name for i in g.input if i.type.tensor_type.elem_type in HALF_TYPES}
    casts: dict[str, str] = {}
    cast_nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.name not in backward_nodes:
            continue
        for k, name in enumerate(node.input):
            if name in forward_half:
                if name not in casts:
                    casts[name] = fresh("f32")
                    cast_nodes.append(onnx.helper.make_node("Cast", [name], [casts[name]], name=casts[name],
                                                            to=TensorProto.FLOAT))
                node.input[k] = casts[name]
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i in HALF_TYPES:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF_TYPES:
                attr.t.CopyFrom(_upcast_tensor(attr.t))
    # each Cast right after the tensor it reads exists: before the first backward node is enough,
    # since the forward comes first and graph inputs and initializers exist from the start
    first_backward = next((k for k, n in enumerate(g.node) if n.name in backward_nodes), len(g.node))
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes[:first_backward] + cast_nodes + nodes[first_backward:])
    for out in g.output:
        if out.name in produced_by_backward and out.type.tensor_type.elem_type in HALF_TYPES:
            out.type.tensor_type.elem_type = TensorProto.FLOAT
    return len(cast_nodes)
