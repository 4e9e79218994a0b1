"""The Python interface: ``Explainer(model, rules).explain(x, target=...)``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from ..backward import ops
from ..compile import targets as targets_mod
from ..compile.build import Compiled, compile_explainer
from ..compile.form import check_form
from ..compile.layers import resolve_tensor
from ..compile.plan import find_start
from ..compile.targets import Target, TargetError
from ..compile.unmatched import warn_unmatched
from ..errors import InternalError, ModelError, RulegraphError
from ..graph import large
from ..lang.ruleset import RuleCall, RuleSet
from . import preprocess as preprocessing
from . import rulefiles as dsl
from . import runtime
from .amplification import DEFAULT_MAX_AMPLIFICATION, quiet, warn_if_amplified
from .baselines import check_baseline_names, make_baseline
from .files import check_output, model_files, rule_files, write_with
from .inputs import convert
from .loopgraph import compile_loop
from .loops import LOOPS
from .nonfinite import warn_if_nonfinite
from .results import Result


def _load_rules(rules: str | Path | RuleSet) -> RuleSet:
    if isinstance(rules, RuleSet):
        return rules
    return dsl.load(rules)


def _preprocess_of(value, graph) -> preprocessing.Preprocess | None:
    """``Explainer(preprocess=...)`` resolved (preset name, .json file, dict) and checked against the
    model's first input when that is an image-shaped tensor."""
    spec = preprocessing.resolve(value)
    if spec is not None:
        name = graph.inputs[0]
        preprocessing.check_against(spec, graph.shapes.get(name), f"preprocess for input '{name}'")
    return spec


class Explainer:
    """Model + rule file, compiled once into one ONNX explainer and run with onnxruntime.

    ``model``: a path or a ModelProto; ``rules``: a rule file path, a bundled rule file's name
    (``"lrp-epsilon"``) or a RuleSet. ``output`` names the model output to explain (default: the
    first); ``start`` names any intermediate tensor to start at instead. An fp16/bf16 model is
    explained in float32 (``precision="fp32"``, its weights upcast exactly, the attribution in
    float32); ``precision="mixed"`` runs its forward in its own type and the relevance pass in float32
    (``compile/mixed.py``: the GPU's fast half forward, no underflow in ε, denominators and ratios);
    ``precision="native"`` asks for its own type throughout. ``class_axis``: the
    start tensor's class axis where the default (final Softmax's axis, else by rank) does not apply.
    ``strict_device``: a node without a kernel on the requested provider (CUDA) is an error rather
    than a silent run on the CPU with copies across the device boundary. ``form="gradient-x-input"``
    compiles a relevance rule file as Gradient × Input with modified local Jacobians (LXT's efficient
    AttnLRP; ``compile/form.py``): the same attribution at ε = 0, without the per-layer divisions.
    """

    def __init__(self, model: str | Path | onnx.ModelProto, rules: str | Path | RuleSet,
                 providers: list[str] | None = None, output: str | None = None,
                 start: str | None = None, threads: int = 0, precision: str = "fp32",
                 class_axis: int | None = None, preprocess=None, strict_device: bool = False,
                 form: str = "standard"):
        self.graph = ops.load(model, precision=precision)
        self._model, self._precision = model, precision
        self._where = "the model" if isinstance(model, onnx.ModelProto) else f"model {model}"
        self.ruleset = _load_rules(rules)
        self.form = check_form(form)
        self.providers = providers
        self.output = output
        self.start = start
        self.threads = threads
        #: refuse to place a node on the CPU when a GPU provider was asked for (``runtime.session``)
        self.strict_device = strict_device
        self._sources = (model, rules)  # the files read; ``save`` refuses to overwrite them
        self.class_axis = class_axis
        #: how images become this model's input (``preprocess.py``): used by ``load_input``, saved by ``save``
        self.preprocess = _preprocess_of(preprocess, self.graph)
        self._spec: targets_mod.StartSpec | None = None
        self._compiled: dict[tuple[bool, bool], Compiled] = {}
        self._sessions: dict = {}
        warn_unmatched(self.graph, self.ruleset, output, start)

    def compiled(self, seed_mode: bool = False, node_sums: bool = False,
                 at: tuple[str, ...] = ()) -> Compiled:
        """The explainer model; ``node_sums`` adds per-node conservation sums (rulegraph check);
        ``at``: tensors whose latent relevance is an extra output (``Compiled.at_attribution``)."""
        key = (seed_mode, node_sums) + ((at,) if at else ())
        if key not in self._compiled:
            self._compiled[key] = compile_explainer(
                self.graph, self.ruleset, self.output, self.start, seed_mode, node_sums, self.class_axis,
                at=at, form=self.form, relevance_dtype=np.float32 if self._precision == "mixed" else None)
        return self._compiled[key]

    @property
    def spec(self) -> targets_mod.StartSpec:
        """The start tensor's batch and class axes (``targets.py``), without compiling."""
        if self._spec is None:
            found = find_start(self.graph, self.ruleset, self.output, self.start)
            start = targets_mod.relocate(self.graph, found)
            self._spec = targets_mod.start_spec(self.graph, start, self.output, self.class_axis, found)
        return self._spec

    def whole_target(self, cls="argmax"):
        """``cls`` over all positions where the start tensor has position axes, else ``cls`` itself."""
        if isinstance(cls, Target) or (isinstance(cls, np.ndarray) and cls.dtype.kind == "f"):
            return cls
        spec = self.spec
        return Target(cls, all_positions=True) if spec.class_axis is not None and spec.position_axes else cls

    def session(self, seed_mode: bool = False, node_sums: bool = False, at: tuple[str, ...] = ()):
        """The onnxruntime session of the compiled explainer (created once). onnxruntime refusing
        the model is a ``ModelError``; refusing the explainer of a model it accepts, a bug."""
        key = (seed_mode, node_sums) + ((at,) if at else ())
        if key not in self._sessions:
            compiled = self.compiled(seed_mode, node_sums, at)
            try:
                self._sessions[key] = runtime.session(compiled.model, self.providers,
                                                      self.threads, what="the compiled explainer",
                                                      strict=self.strict_device)
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
            start = self.spec.tensor
            if start not in {o.name for o in model.graph.output}:
                model.graph.output.append(onnx.helper.make_tensor_value_info(
                    start, self.graph.dtypes.get(start, onnx.TensorProto.FLOAT), self.graph.shapes.get(start)))
            self._sessions["forward"] = runtime.session(model, self.providers,
                                                        self.threads, what=self._where, strict=self.strict_device)
        return self._sessions["forward"]

    def placement(self, x, target="argmax") -> dict[str, int]:
        """Where onnxruntime ran the explainer's nodes on ``x``: kernels run per execution provider,
        from onnxruntime's profile of one run in a session of its own (``rulegraph check --profile``)."""
        import tempfile

        feeds, compiled, _, _, _ = self._pass_feeds(x, target, None, False)
        with tempfile.TemporaryDirectory() as tmp:
            sess = runtime.session(compiled.model, self.providers, self.threads,
                                   what="the compiled explainer", strict=self.strict_device,
                                   profile=str(Path(tmp) / "profile"))
            runtime.run(sess, [o.name for o in sess.get_outputs()], feeds)
            return runtime.placement(sess.end_profiling())

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

    def save(self, path: str | Path, seed_mode: bool = False, external_data: bool | None = None) -> Path:
        """Write the explainer ONNX model (``saved``); any ONNX runtime can run it without rulegraph.
        The write is atomic and refuses to overwrite the model or rule file read (``files.check_output``).
        ``external_data``: the weights in ``<path>.data`` beside it (ONNX external data); by default
        when they exceed ``graph.large.LARGE_BYTES`` (protobuf cannot hold over 2 GiB in one file)."""
        model_path, rules_path = self._sources
        path = check_output(path, model_files(model_path, [path]) + rule_files(rules_path), what="explainer")
        model = self.saved(seed_mode).model
        if self.preprocess is not None:  # the file documents its own inputs (metadata_props)
            model = preprocessing.to_metadata(model, self.preprocess)
        if external_data is None:
            external_data = large.is_large(model)
        if not external_data:   # held weights written into the file, one tensor at a time
            save = large.write_whole if large.holds(model) else lambda m, tmp: onnx.save(m, str(tmp))
            return write_with(path, lambda tmp: save(model, tmp), "explainer")
        data = Path(path).with_name(Path(path).name + ".data")
        check_output(data, model_files(model_path, [path]) + rule_files(rules_path), what="explainer data")

        def write(tmp: Path) -> None:   # the data file is in place before the model that names it
            staged = tmp.with_name(tmp.name + ".data")
            try:
                large.write(model, tmp, staged, location=data.name)
                os.replace(staged, data)
            finally:
                if staged.exists():
                    staged.unlink()

        return write_with(path, write, "explainer")

    #: NaN or infinite values in a float input are refused unless this is set (``explainer.allow_nonfinite``)
    allow_nonfinite = False

    def saved(self, seed_mode: bool = False):
        """What ``save`` writes: the compiled pass (``Compiled``), or for a rule file with a ``loop``
        header the loop around it as one model (``loopgraph.LoopModel``; loops that cannot be a graph
        are refused). Both have ``model``, ``input_names`` and ``attribution``."""
        loop_call = getattr(self.ruleset, "loop", None)
        if loop_call is None:
            return self.compiled(seed_mode)
        if seed_mode:
            raise RulegraphError(f"{self.ruleset.source}: the loop model takes class targets "
                                 f"(rulegraph/target), not a seed array; save it without seed mode, or "
                                 f"use a rule file without a loop header")
        if "loop" not in self._compiled:
            self._compiled["loop"] = compile_loop(self, loop_call)
        return self._compiled["loop"]

    def _feeds(self, x) -> dict[str, np.ndarray]:
        """The arrays to feed, one per model input, each checked against the model's declared input:
        rank (a missing batch axis is added), dtype kind (inputs.py ``convert``), finite values,
        and one batch size N ≥ 1 shared by every input."""
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
            value = np.asarray(runtime.host_array(value))
            want = onnx.helper.tensor_dtype_to_np_dtype(self.graph.dtypes.get(name, onnx.TensorProto.FLOAT))
            rank = self.graph.rank(name)
            if rank is not None and value.ndim == rank - 1:
                value = value[None]
            if rank is not None and value.ndim != rank:
                raise RulegraphError(f"input '{name}' must have rank {rank} (shape "
                                     f"{self.graph.shapes.get(name)}), got shape {value.shape}")
            out[name] = np.ascontiguousarray(convert(name, value, np.dtype(want), self.allow_nonfinite))
        _check_batch(out)
        return out

    def _declare_ranks(self, feeds: Mapping) -> None:
        """Inputs declared without a shape take the rank of the first arrays fed (the model is read
        again with that rank; ``model_check.declare_missing_ranks``)."""
        unknown = {name: np.ndim(feeds[name]) for name in self.graph.inputs
                   if self.graph.rank(name) is None and name in feeds}
        if unknown:
            self.graph = ops.load(self._model, precision=self._precision, ranks=unknown)
            self._compiled.clear()
            self._sessions.clear()

    def _loop(self, name: str | None, params: dict):
        """The loop to run: the one named here (with ``params``), else the rule file's, else None."""
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
                baseline=None, loop: str | None = None,
                max_amplification: float | None = DEFAULT_MAX_AMPLIFICATION, at=None,
                **loop_params) -> Result:
        """Explain a batch. ``target``: a class index (one, or one per row), ``"argmax"``, or a seed
        array shaped like the start tensor (a neuron or channel objective). ``node_sums`` also
        returns each node's conservation sums (``Result.node_sums``) from the same run.
        ``baseline`` (difference quantity): an array, a dict per input, or a baseline name
        (``zeros``, ``mean``, ``blur``, ``file:<path>``); default: the rule file's ``baseline``.
        ``loop`` (``integrated_gradients``, ``smoothgrad``, ``occlusion``, with ``loop_params``)
        runs a loop around the pass as one batched run (integrated gradients: its two ends x and x′
        through the forward alone, a second run); default: the rule file's ``loop`` header.
        ``max_amplification``: warn (``RulegraphWarning``) when a row's Σ|attribution| / |start value|
        exceeds it (amplification.py; None: never; not for loops). ``at``: tensor or node names (one,
        or a list) whose latent relevance the same run also gives (``Result.at``, ``Result.at_numbers``)."""
        check_baseline_names(baseline, self.graph.inputs)
        at = tuple(resolve_tensor(self.graph, name) for name in ([at] if isinstance(at, str) else at or ()))
        loop_call = self._loop(loop, loop_params)
        if at and (loop_call is not None):
            raise RulegraphError("at= (latent relevance) is given by a plain pass; explain without the loop")
        if loop_call is not None:
            with quiet():
                return LOOPS[loop_call.name].run(self.without_loop(), x, target, dict(loop_call.params),
                                                 baseline)
        feeds, compiled, spec, n, resolved = self._pass_feeds(x, target, baseline, node_sums, at)
        seed_mode = compiled.seed_mode
        sess = self.session(seed_mode, node_sums, at)
        values = _run_in_chunks(sess, feeds, self._static_batch(), next(iter(feeds.values())).shape[0],
                                self._run_failure(compiled))
        start = values[compiled.start_tensor]
        _check_rows(spec, start, n)
        chosen = None if resolved is None else resolved.classes
        if not seed_mode:
            chosen = values[compiled.class_output]
            targets_mod.check_classes(chosen, spec, (start if spec.batched else start[None]).shape[spec.vclass],
                                      argmax_code=False)
        result = Result(
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
            node_abs_sums={node: tuple(None if o is None else values[o] for o in names)
                           for node, names in compiled.node_abs_sums.items()},
            versus=None if resolved is None else resolved.versus,
            explained=spec.where(),
            class_axis=spec.class_axis,
            where="" if resolved is None else resolved.where,
            at={t: values[o] for t, o in compiled.at_attribution.items()},
            at_numbers={t: values[o] for t, o in compiled.at_numbers.items()},
        )
        warn_if_amplified(result, max_amplification)
        if not self.allow_nonfinite:   # the inputs were checked finite by _feeds
            warn_if_nonfinite(result)
        return result

    def _pass_feeds(self, x, target, baseline, node_sums: bool, at: tuple[str, ...] = ()):
        """The feeds of one pass: the inputs, the target (classes and position weights) or the seed,
        the baselines; with the compiled explainer they are for, the start's spec, the batch size
        and the resolved target (None for a seed array given as is)."""
        feeds = self._feeds(x)
        spec = self.spec
        n = next(iter(feeds.values())).shape[0] if spec.batched else 1
        seed, resolved = self._target_feeds(target, feeds, spec, n)
        compiled = self.compiled(seed is not None, node_sums, at)
        if seed is not None:
            feeds[compiled.seed_input] = seed
        else:
            feeds[compiled.target_input] = resolved.classes
            if resolved.weights is not None:
                feeds[compiled.positions_input] = resolved.weights.astype(np.float32)
        for name, baseline_input in compiled.baseline_inputs.items():
            given = baseline.get(name) if isinstance(baseline, Mapping) else baseline
            feeds[baseline_input] = make_baseline(self.ruleset.baseline if given is None else given, feeds[name])
        return feeds, compiled, spec, n, resolved

    def explain_dataset(self, data, out, target="argmax", **options):
        """Explain every sample of a dataset (a folder, glob pattern, .npy/.npz/.parquet file, or an
        iterable of arrays) into shards in the folder ``out``, streamed, batched to a memory budget and
        resumable (``shards.run``: ``format``, ``shard_size``, ``batch_size``, ``memory_budget``,
        ``progress``, ``column``; the rest as for ``explain``). Returns a ``shards.Summary``."""
        from .shards import run

        return run(self, data, out, target=target, **options)

    def _target_feeds(self, target, feeds, spec, n: int):
        """(a seed array, or None) and the resolved target (None for a seed array given as is)."""
        if isinstance(target, np.ndarray) and target.dtype.kind in "fc":
            if target.dtype.kind == "c":
                raise TargetError(f"a seed array must be real, got {target.dtype} for {spec.where()}")
            targets_mod.check_seed(target, spec, n)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(self.graph.dtypes.get(spec.tensor, onnx.TensorProto.FLOAT))
            return np.ascontiguousarray(target.astype(dtype)), None
        if isinstance(target, float | complex | np.floating | np.complexfloating):
            raise TargetError(f"target {target!r} is not a class index for {spec.where()}; classes are integers "
                              "(a float array is a seed shaped like the start tensor)")

        def start_shape():
            start = self.forward(feeds)[spec.tensor]
            return start.shape if spec.batched else (1, *start.shape)

        resolved = targets_mod.resolve(targets_mod.as_target(target), spec, n, start_shape)
        if resolved.versus is None:
            return None, resolved
        start = self.forward(feeds)[spec.tensor]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.graph.dtypes.get(spec.tensor, onnx.TensorProto.FLOAT))
        seed = targets_mod.contrast_seed(spec, resolved, start if spec.batched else start[None], dtype)
        return seed, resolved


def _check_batch(feeds: dict[str, np.ndarray]) -> None:
    """Every input with a batch axis has the same number of rows, at least one."""
    sizes = {name: v.shape[0] for name, v in feeds.items() if v.ndim >= 1}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"'{k}': {n}" for k, n in sizes.items())
        raise RulegraphError(f"the inputs have different batch sizes ({listed}); give every input the same "
                             f"number of rows")
    empty = [name for name, n in sizes.items() if n == 0]
    if empty:
        raise RulegraphError(f"empty batch: input '{empty[0]}' has 0 rows (shape "
                             f"{list(feeds[empty[0]].shape)}); give at least one row")


def _run_in_chunks(sess, feeds: dict[str, np.ndarray], static_batch: int | None, n: int,
                   failure=None) -> dict:
    """One run, or one per chunk when the model was exported with a fixed batch size. When
    onnxruntime fails, ``failure(exc, feeds)`` gives the error to raise (onnxruntime's whole
    message in it)."""
    names = [o.name for o in sess.get_outputs()]
    step = static_batch if static_batch and static_batch != n else n
    if n % step:
        inputs = ", ".join(f"'{k}'" for k in feeds)
        raise RulegraphError(f"the model was exported with a fixed batch of {step} (input {inputs}); a batch "
                             f"of {n} is not a multiple of it (re-export with a dynamic batch axis)")
    try:
        runs = [runtime.run(sess, names, {k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
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


def _check_rows(spec, start: np.ndarray, n: int) -> None:
    """A start tensor whose first axis is not the batch at run time (the batch folded with another
    axis by an op rulegraph could not move the start over) is refused, naming it."""
    if spec.batched and start.ndim and start.shape[0] != n:
        raise TargetError(f"the start tensor {spec.where()} has {start.shape[0]} rows for a batch of {n}: an op "
                          "folded the batch with another axis; pass start= a tensor before the fold")
