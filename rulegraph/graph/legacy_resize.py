"""Resize before opset 11 (Upsample 7 and 9, Resize 10) read at a newer opset.

onnx's version converter turns these nodes into a Resize that keeps only ``mode``, so the new node
takes the opset-11 defaults (coordinate_transformation_mode half_pixel, nearest_mode
round_prefer_floor) and computes another function than the model's (linear: another value at every
output between input pixels). This restores what onnxruntime computes for the old ops:
asymmetric coordinates (``x_in = x_out / scale``) and, for nearest, rounding down, or rounding up
when the node downsamples (no scale above 1, one below).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError, node_ref
from . import large

LEGACY_OPS = ("Upsample", "Resize")


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: large.value(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _set(node: onnx.NodeProto, name: str, value: str) -> None:
    kept = [a for a in node.attribute if a.name != name]
    node.ClearField("attribute")
    node.attribute.extend(kept + [helper.make_attribute(name, value)])


def nearest_mode(scales: np.ndarray) -> str:
    """onnxruntime's rounding for a pre-opset-11 nearest resize with these scales."""
    return "ceil" if scales.max() <= 1 and scales.min() < 1 else "floor"


def restore_legacy_resize(original: onnx.ModelProto, upgraded: onnx.ModelProto, version: int) -> None:
    """Give each Resize that ``upgraded`` (opset ≥ 11) made of an Upsample or Resize-10 of
    ``original`` (opset ``version``) the attributes that keep its function; in place."""
    if version >= 11:
        return
    old = [n for n in original.graph.node if n.op_type in LEGACY_OPS]
    new = [n for n in upgraded.graph.node if n.op_type == "Resize"]
    if len(old) != len(new):
        raise ModelError(f"the opset upgrade made {len(new)} Resize nodes of {len(old)} Upsample/Resize "
                         "nodes; export the model at opset 11 or later")
    constants = _constants(upgraded)
    for i, (before, after) in enumerate(zip(old, new)):
        _set(after, "coordinate_transformation_mode", "asymmetric")
        mode = helper.get_attribute_value(next((a for a in after.attribute if a.name == "mode"), None)
                                          or helper.make_attribute("mode", b"nearest"))
        if mode != b"nearest":
            continue
        scales = constants.get(after.input[2]) if len(after.input) > 2 else None
        if scales is None or scales.size == 0:
            raise ModelError(f"{node_ref(before.name or f'{before.op_type}_{i}', before.op_type)} (opset "
                             f"{version}) takes its scales from a computed tensor: its nearest rounding "
                             "depends on whether it downsamples; export the model at opset 11 or later")
        _set(after, "nearest_mode", nearest_mode(scales.astype(np.float64)))
