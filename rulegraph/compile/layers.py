"""Layers named by the user: a tensor or a node of the model, the default CAM layer, and the
token grid of a ViT-style ``[N, T, D]`` tensor.

A name is a tensor of the model, else a node (its first output). The default CAM layer is the
last 4-D activation before the global pooling: walking back from the start, the input of the
first GlobalAveragePool / GlobalMaxPool / ReduceMean / ReduceMax / AveragePool over the spatial
axes of a 4-D tensor, else the last 4-D tensor on the path.
"""

from __future__ import annotations

import math

from ..errors import ModelError
from ..graph.read import Graph
from .plan import path_nodes

POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "AveragePool"})


def resolve_tensor(graph: Graph, name: str) -> str:
    """The tensor ``name`` names: a tensor of the model, else the first output of the node ``name``."""
    if name in graph.active or name in graph.shapes or name in graph.producer:
        return name
    for node in graph.nodes:
        for member in node.members or [node]:
            if member.name == name:
                return member.outputs[0]
    close = sorted(t for t in graph.active if name.lower() in t.lower())[:5]
    hint = f"; tensors with that in their name: {', '.join(close)}" if close else ""
    raise ModelError(f"the model has no tensor or node '{name}'{hint} (rulegraph ops MODEL lists the nodes)")


def default_cam_layer(graph: Graph, start: str) -> str:
    """The last 4-D activation before the global pooling on the way to ``start`` (module docstring)."""
    nodes = path_nodes(graph, start)
    for node in reversed(nodes):
        if node.op_type in POOLS:
            source = node.inputs[0]
            if graph.rank(source) == 4 and source in graph.active:
                return source
    for node in reversed(nodes):
        for out in node.outputs:
            if out in graph.active and graph.rank(out) == 4:
                return out
    raise ModelError(f"no 4-D activation [N, K, h, w] on the way to '{start}': name the layer (layer=..., "
                     "CLI --layer NAME); a token tensor [N, T, D] is read as a grid with the class token "
                     "dropped")


def token_grid(graph: Graph, tensor: str) -> tuple[int, int] | None:
    """``(h, w)`` of a token tensor ``[N, 1 + h·w, D]`` (the class token first, dropped): the square
    grid, else the spatial size of a 4-D tensor of the model with ``h·w`` positions (the patch
    embedding); None when ``T`` is unknown to shape inference: the square grid of the run's ``T``."""
    shape = graph.shapes.get(tensor)
    if shape is None or len(shape) != 3:
        raise ModelError(f"the layer '{tensor}' {shape} is not a token tensor [N, T, D]; name a 4-D "
                         "activation [N, K, h, w] or a token tensor")
    tokens = shape[1]
    if not isinstance(tokens, int):
        return None
    if tokens < 2:
        raise ModelError(f"the layer '{tensor}' {shape} has no tokens after the class token")
    cells = tokens - 1
    side = math.isqrt(cells)
    if side * side == cells:
        return side, side
    for other, dims in graph.shapes.items():
        if dims is not None and len(dims) == 4 and all(isinstance(d, int) for d in dims[2:]) \
                and dims[2] * dims[3] == cells and other in graph.active:
            return dims[2], dims[3]
    raise ModelError(f"the layer '{tensor}' has {cells} tokens after the class token, not a square grid, "
                     "and no 4-D tensor of the model has that many positions; name a 4-D activation instead")
