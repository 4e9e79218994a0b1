"""The op table: every op rulegraph explains, its VJP and its kind, each declared once where the VJP
is registered (``vjp.py``: ``@vjp("Relu", kind=NONLINEAR)``; ops that exist only fused: ``fused.py``).

``load`` is the model reader given this table (``rulegraph.load``).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .. import graph
from ..graph.kinds import OpKinds
from ..graph.read import Graph
from . import contrib, fused  # noqa: F401  (declare the contrib ops' VJPs and the fused-only ops' kinds)
from . import attention, cumprod, einsum, elementwise, lp_pool, normalization  # noqa: F401  (their VJPs)
from . import routes, sampling  # noqa: F401  (their VJPs)
from .scatter import KIND_BY_ATTRIBUTE
from .vjp import BILINEAR_WHEN_ALL_ACTIVE, NONLINEAR_IN_FIRST_INPUT_ONLY, OP_KINDS, VJPS

#: every op's kind, for the model reader and the rule language
OPS = OpKinds(OP_KINDS, BILINEAR_WHEN_ALL_ACTIVE, NONLINEAR_IN_FIRST_INPUT_ONLY, KIND_BY_ATTRIBUTE)

__all__ = ["OPS", "OP_KINDS", "VJPS", "load"]


def load(model: str | Path | onnx.ModelProto, fuse: bool = True, precision: str = "fp32",
         ranks: dict[str, int] | None = None) -> Graph:
    """``graph.load`` with the op table: read a model, each node with its kind (see there)."""
    return graph.load(model, OPS, fuse=fuse, precision=precision, ranks=ranks)
