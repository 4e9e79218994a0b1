"""Stage 1, the model: ONNX -> Graph (read, check, fold constants, fuse patterns, op kinds).

Knows nothing of rules; imports only ``rulegraph.errors``.
"""

from .load import load
from .read import Graph, Node

__all__ = ["Graph", "Node", "load"]
