"""``load``: a model file or ModelProto -> Graph, read (``read.py``) and fused (``fuse.py``)."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..errors import ModelError
from . import large
from .fuse import fuse_patterns
from .kinds import OpKinds
from .read import Graph, load_proto, read_model


def load(model: str | Path | onnx.ModelProto, op_kinds: OpKinds, fuse: bool = True, precision: str = "fp32",
         ranks: dict[str, int] | None = None) -> Graph:
    """Read a model from a path or a ModelProto (which is copied, never modified), each node's kind
    from ``op_kinds`` (``rulegraph.load`` gives the backward's op table); ``fuse=False``
    keeps multi-node patterns as their separate nodes. ``precision="fp32"`` computes an fp16 or
    bf16 model in float32 (its weights upcast exactly); ``"native"`` (and ``"mixed"``, whose backward
    the compiler keeps in float32) keeps its own type. ``ranks``
    gives inputs declared without a shape their rank (the first run's arrays;
    ``model_check.declare_missing_ranks``). Every ``ModelError`` names the file."""
    if precision not in ("fp32", "native", "mixed"):
        raise ValueError(f"precision must be 'fp32', 'mixed' or 'native', got {precision!r}")
    if precision == "mixed":   # the graph in its own type; the compiler keeps the backward in float32
        precision = "native"
    where = "" if isinstance(model, onnx.ModelProto) else f"{model}: "
    with large.pinned():   # a large model's weights: held arrays, kept by the graph's constants after
        proto = read_model(model)
        try:
            graph = load_proto(proto, precision, ranks, op_kinds)
        except ModelError as exc:
            raise ModelError(f"{where}{exc}") from exc
    if fuse:
        fuse_patterns(graph, op_kinds)
    return graph
