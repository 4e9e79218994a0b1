"""Recurrent unit windows: for each hidden unit of a recurrent node, the average of the input windows
of L consecutive steps that drive it, each weighted by the unit's activation.

For a dataset of sequences (MNIST digits read row by row: 28 steps of 28 pixels), windows ``w`` of
``L`` consecutive steps are drawn (``per_sample`` start positions per sample, uniformly from
``0 .. T_s − L``, from one ``numpy`` generator seeded by ``seed`` and drawn sample by sample, or every
start with ``per_sample=None``). Each window is run through the model as a sequence of length L, and
the unit's activation ``a_k(w)`` read from the recurrent node's state (``h``; ``c`` for an LSTM's
cell) at the window's last step (``reduce="last"``, the default: the state after the unit has read
the whole window, so the weight speaks for all L steps) or the largest over its steps
(``reduce="max"``: a unit that fires on the window's first rows and forgets them counts too, at the
cost of not knowing where in the window it fired). With ``p_k(w) = max(a_k(w), 0)``:

    image_k = Σ_w p_k(w) · w / Σ_w p_k(w)        (an L × F image per unit)

The sums are running sums over batches (associative: the answer does not depend on the batch size),
so the memory is one batch whatever the dataset's size.

Running a window as a length-L sequence: the window fills steps ``0 .. L−1`` of one run of the
unrolled model (``graph/recurrent.py``), the remaining steps hold ``pad``; a forward recurrence's
state after step ``t`` depends on steps ``0 .. t`` only, so it is the state of the window run alone.
This is checked on the first batch (a second run with other padding must give the same states): a
reverse direction, or an op before the node that mixes steps, is refused.

Naming the state: ``layer`` is the recurrent node's name (``/lstm/LSTM``; the only one by default)
or one of its outputs (``Y``, ``Y_h``: the hidden state; ``Y_c``: the cell state); the per-step
tensors it became are ``Graph.recurrent[name].states[state][direction][t]``.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError, RulegraphError
from ..graph.recurrent import Unrolled
from . import runtime
from .dataset import open_source

#: how a unit's activation over the window's steps becomes one number
REDUCTIONS = {"last": lambda a: a[:, -1], "max": lambda a: a.max(axis=1)}
#: which output of a recurrent node (Y, Y_h, Y_c) holds which state
OUTPUT_STATES = ("h", "h", "c")


class WindowsError(RulegraphError):
    """A bad layer, state, window length or dataset for ``unit_windows``."""


@dataclass
class UnitWindows:
    """``images`` [K, L, F]: per unit, the activation-weighted average window (NaN where the unit
    was never positive); ``mean`` [L, F]: the plain average window; ``weights`` [K]: Σ p_k(w);
    ``windows``: how many windows were read; ``tensors``: the per-step tensors read (step order)."""

    images: np.ndarray
    mean: np.ndarray
    weights: np.ndarray
    windows: int
    layer: str
    state: str
    reduce: str
    window: int
    tensors: tuple[str, ...]

    def describe(self) -> str:
        silent = int(np.sum(self.weights <= 0))
        return (f"{len(self.weights)} units of {self.layer} (state {self.state}, {self.reduce} step), "
                f"{self.windows} windows of {self.window} steps" + (f"; {silent} units never positive"
                                                                     if silent else ""))


class WindowSums:
    """Running sums of ``unit_windows``: ``add`` a batch of windows [B, L, F] and their activations
    [B, K]; ``merge`` another's sums (associative); ``result`` divides."""

    def __init__(self, units: int, window: int, features: int):
        self.weighted = np.zeros((units, window * features))
        self.weights = np.zeros(units)
        self.total = np.zeros(window * features)
        self.count = 0
        self.shape = (window, features)

    def add(self, windows: np.ndarray, activations: np.ndarray) -> None:
        flat = windows.reshape(len(windows), -1).astype(np.float64)
        p = np.maximum(activations.astype(np.float64), 0.0)
        self.weighted += p.T @ flat
        self.weights += p.sum(axis=0)
        self.total += flat.sum(axis=0)
        self.count += len(windows)

    def merge(self, other: WindowSums) -> None:
        self.weighted += other.weighted
        self.weights += other.weights
        self.total += other.total
        self.count += other.count

    def averages(self) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            images = np.where(self.weights[:, None] > 0, self.weighted / self.weights[:, None], np.nan)
        return images.reshape(-1, *self.shape), (self.total / max(self.count, 1)).reshape(self.shape)


def _describe(name: str, u: Unrolled) -> str:
    states = ", ".join(u.states)
    return (f"'{name}' ({u.op}, {'/'.join(u.directions)}, {u.steps} steps, hidden size {u.hidden}; "
            f"states {states}; outputs {', '.join(repr(o) for o in u.outputs if o)})")


def resolve_layer(graph, layer: str | None, state: str | None) -> tuple[str, Unrolled, str]:
    """(node name, what it became, state) for ``layer`` (a recurrent node or one of its outputs)."""
    nodes: dict[str, Unrolled] = getattr(graph, "recurrent", {})
    if not nodes:
        raise WindowsError("the model has no LSTM, GRU or RNN node; unit windows read the per-step state "
                           "of one")
    listing = "; ".join(_describe(n, u) for n, u in nodes.items())
    if layer is None:
        if len(nodes) > 1:
            raise WindowsError(f"the model has {len(nodes)} recurrent nodes; name one (layer=..., CLI "
                               f"--layer): {listing}")
        layer = next(iter(nodes))
    named_state = None
    if layer in nodes:
        name = layer
    else:
        found = [(n, OUTPUT_STATES[i]) for n, u in nodes.items()
                 for i, o in enumerate(u.outputs) if o == layer]
        if not found:
            raise WindowsError(f"'{layer}' is no recurrent node of the model nor one of their outputs; "
                               f"the recurrent nodes: {listing}")
        name, named_state = found[0]
    unrolled = nodes[name]
    state = state or named_state or "h"
    if state not in unrolled.states:
        raise WindowsError(f"state '{state}' of {_describe(name, unrolled)}: it has "
                           f"{', '.join(unrolled.states)} (h: the hidden state; c: an LSTM's cell state)")
    if named_state is not None and state != named_state:
        raise WindowsError(f"'{layer}' is the {named_state} output of '{name}', but state '{state}' was "
                           f"asked for; name the node '{name}' with the state, or give one of them")
    if "forward" not in unrolled.directions:
        raise WindowsError(f"{_describe(name, unrolled)} runs in reverse only: its state at a step depends "
                           f"on the steps after it, so a window cannot be read from the start of a run; "
                           f"unit windows need a forward (or bidirectional: its forward half) recurrence")
    return name, unrolled, state


def _samples(data, reader) -> Iterator[tuple[str, np.ndarray]]:
    """(id, sample) of an array [S, T, F...] (a sample per row) or any ``open_source`` dataset."""
    if isinstance(data, np.ndarray):
        if data.ndim < 2:
            raise WindowsError(f"the data array has shape {list(data.shape)}; give samples as rows "
                               f"[S, T, ...] (T steps each)")
        for i, row in enumerate(data):
            yield str(i), row
        return
    for item in open_source(data, reader).items:
        value = item.load()
        if isinstance(value, dict):
            raise WindowsError(f"sample {item.id} is a dict of several inputs; unit windows read models "
                               f"with one input")
        yield item.id, np.asarray(value)


class _Runner:
    """The unrolled model with the chosen per-step states as outputs; runs windows padded to T."""

    def __init__(self, graph, tensors: tuple[str, ...], time_axis: int, window: int, pad: float,
                 providers, threads: int):
        import onnx

        if len(graph.inputs) != 1:
            raise WindowsError(f"the model has {len(graph.inputs)} inputs ({', '.join(graph.inputs)}); unit "
                               f"windows read models with one input, the sequence")
        self.input = graph.inputs[0]
        shape = graph.shapes.get(self.input)
        if shape is None or len(shape) < 2:
            raise WindowsError(f"the model input '{self.input}' has shape {shape}; unit windows need a "
                               f"sequence input [N, T, ...]")
        if not 1 <= time_axis < len(shape):
            raise WindowsError(f"time_axis {time_axis} is not an axis of the model input '{self.input}' "
                               f"{shape} other than the batch axis 0")
        steps = shape[time_axis]
        if not isinstance(steps, int):
            raise WindowsError(f"axis {time_axis} of the model input '{self.input}' {shape} is '{steps}', "
                               f"not a number of steps; give the time axis (time_axis=..., --time-axis)")
        if not 1 <= window <= steps:
            raise WindowsError(f"window length {window}: the model input '{self.input}' {shape} has {steps} "
                               f"steps on its time axis {time_axis}; choose 1 ≤ L ≤ {steps}")
        others = [d for a, d in enumerate(shape) if a not in (0, time_axis)]
        if not all(isinstance(d, int) for d in others):
            raise WindowsError(f"the model input '{self.input}' {shape} has a dynamic axis besides the batch "
                               f"and time axes; unit windows need the size of one step fixed")
        self.shape, self.time_axis, self.steps, self.window, self.pad = shape, time_axis, steps, window, pad
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes.get(self.input, 1))
        model = onnx.ModelProto()
        model.CopyFrom(graph.model)
        del model.graph.output[:]
        for t in tensors:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                t, graph.dtypes.get(t, onnx.TensorProto.FLOAT), graph.shapes.get(t)))
        self.tensors = tensors
        self.session = runtime.session(model, providers, threads, what="the model with its states as outputs")

    def feed(self, windows: np.ndarray, pad: float) -> np.ndarray:
        """Windows [B, L, *step] as the model's input: steps 0..L−1 along the time axis, then ``pad``."""
        full = np.full((len(windows), self.steps) + windows.shape[2:], pad, self.dtype)
        full[:, :self.window] = windows
        return np.moveaxis(full, 1, self.time_axis)

    def states(self, windows: np.ndarray, pad: float | None = None) -> np.ndarray:
        """The states [B, L', K] after each read step (L' = len(tensors))."""
        x = self.feed(windows, self.pad if pad is None else pad)
        n = len(x)
        chunk = self.batch or n
        parts = []
        for start in range(0, n, chunk):
            part = x[start:start + chunk]
            rows = len(part)
            if rows < chunk:
                part = np.concatenate([part, np.full((chunk - rows,) + part.shape[1:], self.pad, self.dtype)])
            try:
                values = runtime.run(self.session, list(self.tensors), {self.input: part})
            except Exception as exc:  # noqa: BLE001 (onnxruntime's own failure on these inputs)
                raise RulegraphError(f"onnxruntime could not run the model on windows fed as '{self.input}' "
                                     f"{list(part.shape)}: {str(exc).strip()}") from None
            parts.append(np.stack([v.reshape(chunk, -1)[:rows] for v in values], axis=1))
        return np.concatenate(parts)


def unit_windows(model, layer: str | None, data, window: int, state: str | None = None, reduce: str = "last",
                 per_sample: int | None = 4, seed: int = 0, batch_size: int = 256, time_axis: int = 1,
                 pad: float = 0.0, providers=None, threads: int = 0) -> UnitWindows:
    """The activation-weighted average window of every unit of a recurrent node (module docstring).

    ``model``: an ONNX path or ModelProto (or an ``Explainer``: its model); ``layer``: the recurrent node
    or one of its outputs (default: the only recurrent node); ``data``: an array of samples [S, T_s, ...]
    or a dataset (folder, glob, ``.npy``/``.npz``/``.parquet`` path, iterable of samples); ``window``:
    L; ``state``: ``h`` or ``c`` (LSTM); ``reduce``: ``last`` or ``max`` over the window's steps;
    ``per_sample``: windows drawn per sample (None: every start); ``time_axis``: the model input's
    time axis (``[N, T, F]``: 1); ``pad``: the value of the steps after the window."""
    from ..backward import ops

    if reduce not in REDUCTIONS:
        raise WindowsError(f"reduce '{reduce}' is none of {', '.join(REDUCTIONS)}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
        raise WindowsError(f"the window length is a number of steps, got {window!r}")
    window = int(window)
    counted = isinstance(per_sample, (int, np.integer)) and not isinstance(per_sample, bool)
    if per_sample is not None and (not counted or per_sample < 1):
        raise WindowsError(f"per_sample is a number of windows ≥ 1 per sample (or None: every start), "
                           f"got {per_sample!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise WindowsError(f"batch_size is a number of windows ≥ 1, got {batch_size!r}")
    graph = model.graph if hasattr(model, "graph") and hasattr(model, "ruleset") else ops.load(model)
    name, unrolled, state = resolve_layer(graph, layer, state)
    d = unrolled.directions.index("forward")
    if not 1 <= window <= unrolled.steps:
        raise WindowsError(f"window length {window}: '{name}' runs {unrolled.steps} steps; choose "
                           f"1 ≤ L ≤ {unrolled.steps}")
    read = range(window) if reduce == "max" else [window - 1]
    runner = _Runner(graph, tuple(unrolled.states[state][d][t] for t in read), time_axis, window, pad,
                     providers, threads)
    step_shape = tuple(d for a, d in enumerate(runner.shape) if a not in (0, time_axis))
    features = int(np.prod(step_shape, dtype=np.int64))
    sums = WindowSums(unrolled.hidden, window, features)
    rng = np.random.default_rng(seed)
    reader = types.SimpleNamespace(graph=graph, preprocess=None)
    checked = False
    for batch in _batches(_windows(_samples(data, reader), window, step_shape, per_sample, rng, time_axis),
                          batch_size):
        a = runner.states(batch)
        if not checked:
            _check_causal(runner, batch, a, name)
            checked = True
        sums.add(batch, REDUCTIONS[reduce](a))
    if sums.count == 0:
        raise WindowsError("the dataset holds no samples")
    images, mean = sums.averages()
    return UnitWindows(images, mean, sums.weights, sums.count, name, state, reduce, window, runner.tensors)


def _windows(samples, window: int, step_shape: tuple[int, ...], per_sample, rng, time_axis: int):
    """Windows [L, *step] of every sample, starts drawn sample by sample (module docstring)."""
    for sample_id, sample in samples:
        if sample.dtype.kind not in "fiu" or sample.dtype == bool:
            raise WindowsError(f"sample {sample_id} holds {sample.dtype} values; give numbers")
        sample = np.moveaxis(sample, time_axis - 1, 0) if sample.ndim == len(step_shape) + 1 else sample
        if sample.ndim != len(step_shape) + 1 or sample.shape[1:] != step_shape:
            raise WindowsError(f"sample {sample_id} has shape {list(sample.shape)}; the model reads steps "
                               f"of shape {list(step_shape)}, so a sample is "
                               f"[T, {', '.join(map(str, step_shape))}]")
        if len(sample) < window:
            raise WindowsError(f"sample {sample_id} has {len(sample)} steps, fewer than the window length "
                               f"{window}")
        starts = (np.arange(len(sample) - window + 1) if per_sample is None
                  else rng.integers(0, len(sample) - window + 1, size=per_sample))
        for s in starts:
            yield sample[s:s + window]


def _batches(windows, size: int) -> Iterator[np.ndarray]:
    batch = []
    for w in windows:
        batch.append(w)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def _check_causal(runner: _Runner, batch: np.ndarray, states: np.ndarray, name: str) -> None:
    """The states read must not depend on the padding after the window (module docstring)."""
    if runner.window == runner.steps:
        return
    other = runner.states(batch, pad=runner.pad + 1.0)
    scale = max(float(np.abs(states).max()), 1.0)
    if not np.allclose(states, other, rtol=0, atol=1e-5 * scale):
        raise ModelError(f"the state of '{name}' at the window's steps changes with the input after the "
                         f"window (steps {runner.window}..{runner.steps - 1} of axis {runner.time_axis} of "
                         f"'{runner.input}'): the model mixes steps before the recurrence, or the state is "
                         f"not a forward one; unit windows need the state after step t to depend on steps "
                         f"0..t only")


def tile_images(result: UnitWindows, stretch: bool = True) -> np.ndarray:
    """Per unit a grey tile [K, 1, L, F] in [0, 1]: the weighted average window, each stretched from its
    own minimum to its maximum (``stretch``) or as is (pixels in 0..1); a unit never positive is black."""
    images = np.nan_to_num(result.images.reshape(len(result.images), result.window, -1), nan=0.0)
    if stretch:
        lo = images.min(axis=(1, 2), keepdims=True)
        span = images.max(axis=(1, 2), keepdims=True) - lo
        images = np.where(span > 0, (images - lo) / np.where(span > 0, span, 1), 0.0)
    return np.clip(images, 0, 1)[:, None]


def save_npz(result: UnitWindows, path: str | os.PathLike) -> None:
    """The averages and weights as a .npz (``images``, ``mean``, ``weights``, ``windows``)."""
    from .files import write_with

    def write(tmp):
        with open(tmp, "wb") as handle:
            np.savez(handle, images=result.images, mean=result.mean, weights=result.weights,
                     windows=np.array(result.windows))

    write_with(path, write, "--npz")
