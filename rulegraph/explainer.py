"""The Python interface: ``Explainer(model, rules).explain(x, target=...)``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import graph as graph_mod
from . import runtime
from .compile import Compiled, compile_explainer
from .errors import InternalError, ModelError, RulegraphError
from .ruleset import RuleSet


@dataclass
class Result:
    """What one explain run gives, per batch row where it has a batch axis.

    ``attribution``: input name -> array shaped like that input (for the first float input also
    ``.map``); ``saliency``: ``a(x)`` itself (importance quantity); ``bias_shares``: bias node ->
    [N] share; ``bias_total`` [N]; ``start_value`` [N]: Σ of the conserved view at the start;
    ``delta`` [N]: Σ attribution + Σ bias shares − start_value (0 when the rules conserve);
    ``outputs``: the model's own outputs; ``target`` [N]: the class explained per row;
    ``node_sums``: node -> (Σ view given to its inputs, Σ view of its outputs, Σ bias shares), [N]
    each (None where empty), when asked for.
    """

    attribution: dict[str, np.ndarray]
    saliency: dict[str, np.ndarray]
    bias_shares: dict[str, np.ndarray]
    bias_total: np.ndarray | None
    start_value: np.ndarray
    outputs: dict[str, np.ndarray]
    start: np.ndarray
    target: np.ndarray | None = None
    device: str = "cpu"
    node_sums: dict[str, tuple] = field(default_factory=dict)  # node -> (inputs, outputs, bias) [N]

    @property
    def map(self) -> np.ndarray:
        """The attribution of the first float input (of the first token-id input where there is none)."""
        return next(iter(self.attribution.values()))

    @property
    def delta(self) -> np.ndarray:
        """End-to-end conservation error per row (RULES.md §5)."""
        total = sum(a.reshape(len(a), -1).sum(axis=1).astype(np.float64) for a in self.attribution.values())
        if self.bias_total is not None:
            total = total + self.bias_total.astype(np.float64)
        return total - self.start_value.astype(np.float64)

    @property
    def relative_delta(self) -> np.ndarray:
        scale = np.maximum(np.abs(self.start_value.astype(np.float64)), 1e-12)
        return self.delta / scale


def _load_rules(rules: str | Path | RuleSet) -> RuleSet:
    if isinstance(rules, RuleSet):
        return rules
    from . import dsl

    return dsl.load(rules)


class Explainer:
    """Model + rule file, compiled once into one ONNX explainer and run with onnxruntime.

    ``model``: a path or a ModelProto; ``rules``: a rule file path, a bundled rule file's name
    (``"lrp-epsilon"``) or a RuleSet. ``output`` names the model output to explain (default: the
    first); ``start`` names any intermediate tensor to start at instead. An fp16/bf16 model is
    explained in float32 (``precision="fp32"``, its weights upcast exactly, the attribution in
    float32) unless ``precision="native"`` asks for its own type throughout.
    """

    def __init__(self, model: str | Path | onnx.ModelProto, rules: str | Path | RuleSet,
                 providers: list[str] | None = None, output: str | None = None,
                 start: str | None = None, threads: int = 0, precision: str = "fp32"):
        self.graph = graph_mod.load(model, precision=precision)
        self._model, self._precision = model, precision
        self._where = "the model" if isinstance(model, onnx.ModelProto) else f"model {model}"
        self.ruleset = _load_rules(rules)
        self.providers = providers
        self.output = output
        self.start = start
        self.threads = threads
        self._compiled: dict[tuple[bool, bool], Compiled] = {}
        self._sessions: dict = {}

    def compiled(self, seed_mode: bool = False, node_sums: bool = False) -> Compiled:
        """The explainer model; ``node_sums`` adds per-node conservation sums (rulegraph check)."""
        key = (seed_mode, node_sums)
        if key not in self._compiled:
            self._compiled[key] = compile_explainer(self.graph, self.ruleset, self.output, self.start,
                                                    seed_mode, node_sums)
        return self._compiled[key]

    def session(self, seed_mode: bool = False, node_sums: bool = False):
        """The onnxruntime session of the compiled explainer (created once). onnxruntime refusing
        the model is a ``ModelError``; refusing the explainer of a model it accepts, a bug."""
        key = (seed_mode, node_sums)
        if key not in self._sessions:
            compiled = self.compiled(seed_mode, node_sums)
            try:
                self._sessions[key] = runtime.session(compiled.model.SerializeToString(), self.providers,
                                                      self.threads, what="the compiled explainer")
            except ModelError as exc:
                self._forward_session()
                raise InternalError(f"{runtime.translate(str(exc), compiled.origins)}; onnxruntime accepts "
                                    f"{self._where} itself, so this is a bug in rulegraph") from exc
        return self._sessions[key]

    def _forward_session(self):
        """The session of the model alone, with the start tensor as an extra output."""
        if "forward" not in self._sessions:
            model = onnx.ModelProto()
            model.CopyFrom(self.graph.model)
            start = self.compiled().start_tensor
            if start not in {o.name for o in model.graph.output}:
                model.graph.output.append(onnx.helper.make_tensor_value_info(
                    start, self.graph.dtypes.get(start, onnx.TensorProto.FLOAT), self.graph.shapes.get(start)))
            self._sessions["forward"] = runtime.session(model.SerializeToString(), self.providers,
                                                        self.threads, what=self._where)
        return self._sessions["forward"]

    def forward(self, x) -> dict[str, np.ndarray]:
        """The model alone on ``x``: its outputs and the start tensor (loops and argmax use it)."""
        feeds = self._feeds(x)
        sess = self._forward_session()
        n = next(iter(feeds.values())).shape[0]
        return _run_in_chunks(sess, feeds, self._static_batch(), n, self._run_failure(None))

    def _run_failure(self, compiled: Compiled | None):
        """What a failed run raises: the model's own failure on these inputs is the user's (a
        ``RulegraphError``); the explainer failing where the model runs is a bug, unless one of
        rulegraph's public inputs does not fit (a seed not shaped like the start tensor, a baseline
        not shaped like its input, targets not one per row) or the message names one."""

        def failure(exc: Exception, feeds: dict[str, np.ndarray]) -> Exception:
            shapes = "; inputs fed: " + ", ".join(f"'{k}' {v.dtype} {list(v.shape)}"
                                                  for k, v in feeds.items())
            message = str(exc).strip()
            if compiled is None:
                return RulegraphError(f"onnxruntime could not run {self._where}: {message}{shapes}")
            own = {k: v for k, v in feeds.items() if k in self.graph.inputs}
            try:
                rows = len(next(iter(own.values())))
                values = _run_in_chunks(self._forward_session(), own, self._static_batch(), rows,
                                        self._run_failure(None))
            except RulegraphError as model_failure:
                return model_failure
            text = runtime.translate(message, compiled.origins)
            expected = {compiled.seed_input: values[compiled.start_tensor].shape,
                        compiled.target_input: (rows,),
                        **{b: feeds[x].shape for x, b in compiled.baseline_inputs.items()}}
            misfits = [f"'{k}' has shape {list(feeds[k].shape)} where these inputs need {list(shape)}"
                       for k, shape in expected.items() if k in feeds and feeds[k].shape != tuple(shape)]
            if misfits:
                return RulegraphError(f"{'; '.join(misfits)}: onnxruntime could not run the explainer: "
                                      f"{text}{shapes}")
            if any(name in message for name in expected):
                return RulegraphError(f"onnxruntime could not run the explainer: {text}{shapes}")
            return InternalError(f"onnxruntime could not run the explainer where {self._where} runs (a bug "
                                 f"in rulegraph): {text}{shapes}")

        return failure

    def save(self, path: str | Path, seed_mode: bool = False) -> Path:
        """Write the explainer ONNX model; any ONNX runtime can run it without rulegraph."""
        path = Path(path)
        onnx.save(self.compiled(seed_mode).model, str(path))
        return path

    def _feeds(self, x) -> dict[str, np.ndarray]:
        inputs = self.graph.inputs
        if isinstance(x, Mapping):
            missing = [i for i in inputs if i not in x]
            unknown = [k for k in x if k not in inputs]
            if missing or unknown:
                raise RulegraphError(f"the model's inputs are {inputs}; missing {missing}, unknown {unknown}")
            feeds = dict(x)
        else:
            if len(inputs) != 1:
                raise RulegraphError(f"the model has {len(inputs)} inputs ({', '.join(inputs)}); "
                                     "pass a dict {name: array}")
            feeds = {inputs[0]: x}
        out = {}
        self._declare_ranks(feeds)
        for name, value in feeds.items():
            value = np.asarray(value)
            want = onnx.helper.tensor_dtype_to_np_dtype(self.graph.dtypes.get(name, onnx.TensorProto.FLOAT))
            rank = self.graph.rank(name)
            if rank is not None and value.ndim == rank - 1:
                value = value[None]
            if rank is not None and value.ndim != rank:
                raise RulegraphError(f"input '{name}' must have rank {rank} (shape "
                                     f"{self.graph.shapes.get(name)}), got shape {value.shape}")
            out[name] = np.ascontiguousarray(value.astype(want, copy=False))
        return out

    def _declare_ranks(self, feeds: Mapping) -> None:
        """Inputs declared without a shape take the rank of the first arrays fed (the model is read
        again with that rank; ``model_check.declare_missing_ranks``)."""
        unknown = {name: np.ndim(feeds[name]) for name in self.graph.inputs
                   if self.graph.rank(name) is None and name in feeds}
        if unknown:
            self.graph = graph_mod.load(self._model, precision=self._precision, ranks=unknown)
            self._compiled.clear()
            self._sessions.clear()

    def _loop(self, name: str | None, params: dict):
        """The loop to run: the one named here (with ``params``), else the rule file's, else None."""
        from .loops import LOOPS
        from .ruleset import RuleCall

        if name is None:
            return getattr(self.ruleset, "loop", None)
        if name not in LOOPS:
            raise RulegraphError(f"unknown loop '{name}'; loops: {', '.join(LOOPS)}")
        resolved, problems = LOOPS[name].resolve_params(params)
        if problems:
            raise RulegraphError("; ".join(problems))
        return RuleCall(name, resolved)

    def without_loop(self) -> Explainer:
        """This explainer, answering ``explain`` with the plain pass (what a loop runs inside, and
        what ``rulegraph check`` measures for a file with a loop)."""
        if getattr(self.ruleset, "loop", None) is None:
            return self
        inner = object.__new__(Explainer)
        inner.__dict__.update(self.__dict__)
        from dataclasses import replace

        inner.ruleset = replace(self.ruleset, loop=None)
        return inner

    def _static_batch(self) -> int | None:
        dims = [self.graph.dim(i, 0) for i in self.graph.inputs if self.graph.rank(i)]
        return dims[0] if dims and isinstance(dims[0], int) else None

    def explain(self, x, target: int | str | np.ndarray | list = "argmax", node_sums: bool = False,
                baseline=None, loop: str | None = None, **loop_params) -> Result:
        """Explain a batch. ``target``: a class index (one, or one per row), ``"argmax"``, or a seed
        array shaped like the start tensor (a neuron or channel objective). ``node_sums`` also
        returns each node's conservation sums (``Result.node_sums``) from the same run.
        ``baseline`` (difference quantity): an array, a dict per input, or a baseline name
        (``zeros``, ``mean``, ``blur``, ``file:<path>``); default: the rule file's ``baseline``.
        ``loop`` (``integrated_gradients``, ``smoothgrad``, ``occlusion``, with ``loop_params``)
        runs a loop around the pass as one batched run; default: the rule file's ``loop`` header."""
        loop_call = self._loop(loop, loop_params)
        if loop_call is not None:
            from .loops import LOOPS

            return LOOPS[loop_call.name].run(self.without_loop(), x, target, dict(loop_call.params), baseline)
        feeds = self._feeds(x)
        n = next(iter(feeds.values())).shape[0]
        seed_mode = isinstance(target, np.ndarray) and target.dtype.kind == "f"
        compiled = self.compiled(seed_mode, node_sums)
        if seed_mode:
            feeds[compiled.seed_input] = target.astype(onnx.helper.tensor_dtype_to_np_dtype(
                self.graph.dtypes.get(compiled.start_tensor, onnx.TensorProto.FLOAT)))
        else:
            feeds[compiled.target_input] = _targets(target, n)
        for name, baseline_input in compiled.baseline_inputs.items():
            given = baseline.get(name) if isinstance(baseline, Mapping) else baseline
            feeds[baseline_input] = make_baseline(self.ruleset.baseline if given is None else given, feeds[name])
        sess = self.session(seed_mode, node_sums)
        values = _run_in_chunks(sess, feeds, self._static_batch(), n, self._run_failure(compiled))
        start = values[compiled.start_tensor]
        chosen = None
        if not seed_mode:
            chosen = feeds[compiled.target_input].copy()
            if start.ndim >= 2:
                chosen = np.where(chosen < 0, start.reshape(n, start.shape[1], -1)[:, :, 0].argmax(axis=1), chosen)
        return Result(
            attribution={x: values[o] for x, o in compiled.attribution.items()},
            saliency={x: values[o] for x, o in compiled.saliency.items()},
            bias_shares={k: values[o] for k, o in compiled.bias_shares.items()},
            bias_total=values[compiled.bias_total] if compiled.bias_total else None,
            start_value=values[compiled.start_value],
            outputs={o: values[o] for o in self.graph.outputs},
            start=start,
            target=chosen,
            device=runtime.device_of(sess),
            node_sums={node: tuple(None if o is None else values[o] for o in names)
                       for node, names in compiled.node_sums.items()},
        )


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over every axis after the first two (reflecting borders)."""
    radius = max(1, round(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = x.astype(np.float64)
    for axis in range(2, x.ndim):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        out = sum(w * np.take(padded, range(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(taps))
    return out.astype(x.dtype)


def make_baseline(kind, x: np.ndarray) -> np.ndarray:
    """The baseline ``x'`` for input ``x`` (DeepLIFT's reference; RULES.md §3 baseline_difference).

    ``zeros``; ``mean`` (the batch mean, every row); ``blur`` (a Gaussian blur with σ = one tenth
    of the smallest spatial size, at least 1 pixel: a **decision**, the literature varies);
    ``file:<path>`` (a .npy broadcast to x's shape); or an array.
    """
    if isinstance(kind, (np.ndarray, list, tuple, float, int)):
        value = np.asarray(kind, dtype=x.dtype)
    elif kind in (None, "zeros"):
        value = np.zeros_like(x)
    elif kind == "mean":
        value = x.mean(axis=0, keepdims=True)
    elif kind == "blur":
        if x.ndim < 3:
            raise RulegraphError(f"baseline blur needs spatial axes; the input has shape {x.shape}")
        value = _gaussian_blur(x, max(1.0, min(x.shape[2:]) / 10))
    elif isinstance(kind, str) and kind.startswith("file:"):
        path = kind.removeprefix("file:")
        try:
            value = np.load(path).astype(x.dtype)
        except OSError as exc:
            raise RulegraphError(f"baseline file {path}: {exc}") from exc
    else:
        raise RulegraphError(f"unknown baseline {kind!r}: use zeros, mean, blur, file:<path> or an array")
    try:
        return np.ascontiguousarray(np.broadcast_to(value, x.shape).astype(x.dtype))
    except ValueError:
        raise RulegraphError(f"the baseline's shape {value.shape} does not fit the input's {x.shape}") from None


def _run_in_chunks(sess, feeds: dict[str, np.ndarray], static_batch: int | None, n: int,
                   failure=None) -> dict:
    """One run, or one per chunk when the model was exported with a fixed batch size. When
    onnxruntime fails, ``failure(exc, feeds)`` gives the error to raise (onnxruntime's whole
    message in it)."""
    names = [o.name for o in sess.get_outputs()]
    step = static_batch if static_batch and static_batch != n else n
    if n % step:
        raise RulegraphError(f"the model was exported with a fixed batch of {step}; a batch of {n} "
                             f"is not a multiple of it (re-export with a dynamic batch axis)")
    try:
        runs = [sess.run(names, {k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
    except Exception as exc:
        hint = ""
        if "MLFloat16" in str(exc) or "float16" in str(exc).lower():
            hint = ("; this runtime lacks a half-precision kernel the explainer needs: explain the model "
                    "with precision='fp32' (the default) or on a GPU provider")
        if failure is None or hint:  # a missing kernel is the runtime's limit, not a bug
            raise RulegraphError(f"onnxruntime could not run the model: {str(exc).strip()}{hint}") from exc
        raise failure(exc, feeds) from exc
    return {name: np.concatenate([r[j] for r in runs]) if runs[0][j].ndim else runs[0][j]
            for j, name in enumerate(names)}


def _targets(target, n: int) -> np.ndarray:
    if isinstance(target, str):
        if target != "argmax":
            raise RulegraphError(f"target must be a class index, 'argmax' or a seed array, got '{target}'")
        return np.full(n, -1, dtype=np.int64)
    t = np.asarray(target, dtype=np.int64).reshape(-1)
    if t.size == 1:
        return np.full(n, int(t[0]), dtype=np.int64)
    if t.size != n:
        raise RulegraphError(f"got {t.size} targets for a batch of {n}")
    return t
