"""The CAM family as an interface (``Cam(model, "gradcam", layer=...).explain(x, target)``,
``rulegraph.cam(...)``) and concept relevance (``crp``): the input map of each channel's share of
the relevance at a layer, all channels in one batched run.

CRP (Achtibat et al. 2023): with ``a(L)`` the number the pass gives the layer ``L`` for the
target, channel ``k``'s conditional map is the pass from ``L`` down to the input seeded with
``a(L)`` masked to channel ``k`` (rows = channels, one run). The rules are linear in the number
they pass back, so the channel maps sum to the map of the unmasked ``a(L)``: the unconditional
map wherever every path from the input to the start crosses ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from ..compile.cam import GRADIENT_FREE, METHODS, CamModel, compile_cam
from ..compile.layers import resolve_tensor
from ..compile.targets import TargetError
from ..errors import RulegraphError
from ..graph import large
from . import rulefiles as dsl
from . import runtime
from .explainer import Explainer, _run_in_chunks
from .files import check_output, model_files, write_with
from .results import Result


@dataclass
class CamResult:
    """``map`` [N, H, W] in [0, 1] (per-image min-max, as pytorch-grad-cam); ``guided`` [N, C, H, W]
    (Guided Grad-CAM) or None; ``target`` [N] the class per row; ``layer``, ``method``; ``outputs``:
    the model's own outputs."""

    map: np.ndarray
    guided: np.ndarray | None
    target: np.ndarray
    layer: str
    method: str
    outputs: dict[str, np.ndarray]


class Cam:
    """``method`` (``compile.cam.METHODS``) at ``layer`` (a tensor or node name; default: the last
    4-D activation before the global pooling), compiled once into one ONNX model."""

    def __init__(self, model, method: str = "gradcam", layer: str | None = None, output: str | None = None,
                 start: str | None = None, class_axis: int | None = None, providers=None, threads: int = 0,
                 preprocess=None):
        if method not in METHODS:
            raise RulegraphError(f"unknown CAM method '{method}'; methods: {', '.join(METHODS)}")
        self.explainer = Explainer(model, "gradient", providers, output, start, threads,
                                   class_axis=class_axis, preprocess=preprocess)
        self.method, self._layer, self._model = method, layer, model
        self._compiled: CamModel | None = None
        self._session = None

    @property
    def graph(self):
        return self.explainer.graph

    @property
    def preprocess(self):
        return self.explainer.preprocess

    def compiled(self) -> CamModel:
        if self._compiled is None:
            e = self.explainer
            guided = dsl.load("guided-backprop") if self.method == "guided-gradcam" else None
            self._compiled = compile_cam(e.graph, e.ruleset, self.method, self._layer, e.output, e.start,
                                         e.class_axis, guided)
        return self._compiled

    @property
    def layer(self) -> str:
        return self.compiled().layer

    def explain(self, x, target="argmax") -> CamResult:
        """The map for ``target`` (a class, one per row, ``argmax`` or a ``Target`` with a position
        form, as ``Explainer.explain``; Eigen-CAM ignores it)."""
        e = self.explainer
        feeds = e._feeds(x)
        n = next(iter(feeds.values())).shape[0]
        seed, resolved = e._target_feeds(target, feeds, e.spec, n)
        if seed is not None:
            raise TargetError("a CAM explains a class (at positions), not a seed array or a contrast "
                              "(versus=)")
        cam = self.compiled()
        compiled = cam.compiled
        feeds[compiled.target_input] = resolved.classes
        if resolved.weights is not None:
            feeds[compiled.positions_input] = resolved.weights.astype(np.float32)
        if self._session is None:
            self._session = runtime.session(cam.model, e.providers, e.threads,
                                            what=f"the {self.method} model")
        values = _run_in_chunks(self._session, feeds, e._static_batch(), n, None)
        return CamResult(values[cam.cam_output], values[cam.guided_output] if cam.guided_output else None,
                         values[compiled.class_output], cam.layer, self.method,
                         {o: values[o] for o in e.graph.outputs})

    def save(self, path) -> Path:
        """Write the CAM model (standalone ONNX; any ONNX runtime runs it)."""
        model_path = self._model if isinstance(self._model, (str, Path)) else None
        path = check_output(path, model_files(model_path, [path]) if model_path else [], what="CAM model")
        model = self.compiled().model   # held weights: written into the file one by one
        if self.preprocess is not None:
            from . import preprocess as preprocessing

            model = preprocessing.to_metadata(model, self.preprocess)
        save = large.write_whole if large.holds(model) else lambda m, tmp: onnx.save(m, str(tmp))
        return write_with(path, lambda tmp: save(model, tmp), "CAM model")


def cam(model, x, method: str = "gradcam", layer: str | None = None, target="argmax", **options) -> CamResult:
    """One CAM: ``Cam(model, method, layer, **options).explain(x, target)``."""
    return Cam(model, method, layer, **options).explain(x, target)


@dataclass
class ConceptResult:
    """``maps`` [N, M, ...input shape]: the input attribution of each of the M ``channels``' share
    of the relevance at ``layer``; ``relevance`` [N, K, ...]: the attribution at the layer;
    ``result``: the unconditional run (its ``map`` is the full input attribution)."""

    maps: np.ndarray
    channels: list[int]
    layer: str
    relevance: np.ndarray
    result: Result


def crp(explainer: Explainer, x, layer: str, channels=None, target="argmax", channel_axis: int = 1,
        **explain_options) -> ConceptResult:
    """Concept relevance (module docstring): one run for ``a(layer)``, one batched run with a row
    per (input row, channel). ``channels``: indices along ``channel_axis`` of the layer (default: all)."""
    tensor = resolve_tensor(explainer.graph, layer)
    full = explainer.explain(x, target=target, at=[tensor], **explain_options)
    number = full.at_numbers[tensor]
    if number.ndim < 2 or not 0 < channel_axis < number.ndim:
        raise RulegraphError(f"channel_axis {channel_axis} does not fit the layer '{tensor}' "
                             f"{list(number.shape)}")
    count = number.shape[channel_axis]
    chosen = list(range(count)) if channels is None else [int(c) for c in channels]
    wrong = [c for c in chosen if not 0 <= c < count]
    if wrong or not chosen:
        raise RulegraphError(f"channel {wrong[0] if wrong else '(none)'} is not one of the {count} channels "
                             f"of '{tensor}' {list(number.shape)} (axis {channel_axis})")
    n, m = number.shape[0], len(chosen)
    masks = np.zeros((m, count), dtype=number.dtype)
    masks[np.arange(m), chosen] = 1
    shape = [1] * number.ndim
    shape[channel_axis] = count
    seeds = number[:, None] * masks.reshape(1, m, *shape[1:])           # [N, M, ...]
    lower = Explainer(explainer._model, replace(explainer.ruleset, start="one"), explainer.providers,
                      start=tensor, threads=explainer.threads, precision=explainer._precision)
    feeds = explainer._feeds(x)
    tiled = {k: np.repeat(v, m, axis=0) for k, v in feeds.items()}
    options = {k: v for k, v in explain_options.items() if k == "baseline"}
    if isinstance(options.get("baseline"), np.ndarray):
        options["baseline"] = np.repeat(options["baseline"], m, axis=0)
    rows = lower.explain(tiled if len(tiled) > 1 else next(iter(tiled.values())),
                         target=np.ascontiguousarray(seeds.reshape(n * m, *number.shape[1:])),
                         max_amplification=None, **options)
    maps = rows.map.reshape(n, m, *rows.map.shape[1:])
    return ConceptResult(maps, chosen, tensor, full.at[tensor], full)


__all__ = ["GRADIENT_FREE", "Cam", "CamResult", "ConceptResult", "cam", "crp"]
