"""The measured check: one run of the compiled explainer on given or sampled inputs, every node's
sums read from it (``Report.nodes``), non-finite inputs and outputs named."""

from __future__ import annotations

import numpy as np

from ..errors import RulegraphError
from ..graph.read import Graph
from ..run import amplification
from .report import COUNTED_BIAS, Report


def sample_inputs(graph: Graph, samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs (integers: zeros) for every model input."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in graph.inputs:
        shape = graph.shapes.get(name)
        if shape is None or not all(isinstance(d, int) for d in shape[1:]):
            raise RulegraphError(f"input '{name}' has shape {shape}: --samples needs static sizes "
                                 "beyond the batch axis; pass --input instead")
        dims = [samples] + list(shape[1:])
        dtype = np.float32 if graph.is_float(name) else np.int64
        feeds[name] = rng.normal(size=dims).astype(dtype) if graph.is_float(name) else np.zeros(dims, dtype)
    return feeds


def measure(explainer, x, report: Report, target="argmax") -> None:
    """Fill each node's measured leak and the end-to-end delta, from one compiled run."""
    result = explainer.without_loop().explain(x, target=explainer.whole_target(target), node_sums=True,
                                              max_amplification=None)
    scale = np.maximum(np.abs(result.start_value.astype(np.float64)), 1e-12)
    counted = explainer.ruleset.bias in COUNTED_BIAS
    by_name = {n.node: n for n in report.nodes}
    for node, (given, outs, bias) in result.node_sums.items():
        check = by_name.get(node)
        if check is None or outs is None:
            continue
        leak = outs.astype(np.float64) - (0 if given is None else given.astype(np.float64))
        if bias is not None:
            check.bias_share = float(np.max(np.abs(bias) / scale))
            if counted:
                leak = leak - bias
        check.leak = float(np.max(np.abs(leak) / scale))
    for node, gain in amplification.per_node(result).items():
        if node in by_name:
            by_name[node].amplification = float(np.max(gain))
    report.amplification = float(np.max(amplification.end_to_end(result)))
    report.measured = float(np.max(np.abs(result.relative_delta)))
    report.samples = len(result.start_value)
    report.nonfinite = _nonfinite(explainer._feeds(x), result.outputs)


def _nonfinite(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> list[str]:
    """Sentences naming NaN/Inf in the inputs, else in the model's outputs (for finite inputs)."""
    found = []
    for what, arrays in (("input", inputs), ("the model's output", outputs)):
        for name, value in arrays.items():
            value = np.asarray(value)
            if not np.issubdtype(value.dtype, np.floating):
                continue
            bad = ~np.isfinite(value)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                kinds = " and ".join(k for k, m in (("NaN", np.isnan(value)), ("Inf", np.isinf(value)))
                                     if m.any())
                found.append(f"{what} '{name}' holds {kinds} at {int(bad.sum())} of {value.size} values "
                             f"(first at index {first})")
        if found:
            break
    return found
