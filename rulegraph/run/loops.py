"""Attribution methods that are loops around a pass (docs/rules.md, loops): integrated
gradients, SmoothGrad, and occlusion. Each builds every point of its loop at once and runs them as
one batch through the compiled explainer (or, for occlusion, through the plain forward model), so
the loop costs one runtime call, not one per step.

What each loop computes around each quantity's pass (``a`` the pass's number at the input, ``R``
its attribution map, ``x'`` the baseline):

| loop | importance (gradient family) | relevance (LRP family) | difference (DeepLIFT) |
|---|---|---|---|
| integrated_gradients | ``(x − x') ⊙ Σ_k w_k a(x' + α_k(x − x'))`` | refused | refused |
| smoothgrad | ``mean_s R(x + ε_s)`` | ``mean_s R(x + ε_s)`` (SmoothLRP) | ``mean_s C(x + ε_s; x')`` |
| occlusion | forward only: the rules play no part | same | same |

``loopgraph.compile_loop`` writes each as one ONNX model (``rulegraph compile`` of a ``loop`` header).

``LOOPS`` maps a loop's name to its spec (parameters validated like a rule's); a rule file names
one with the ``loop`` header, e.g. ``loop integrated_gradients(steps = 64)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..backward.rules import Param, RuleSpec
from ..errors import InternalError, RulegraphError
from .baselines import make_baseline
from .results import Result, class_per_row

QUADRATURES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


@dataclass(frozen=True)
class LoopSpec:
    name: str
    run: Callable
    params: tuple[Param, ...] = ()
    doc: str = ""

    def resolve_params(self, given):
        """Fill defaults and validate, exactly as a rule's parameters are."""
        return RuleSpec(self.name, frozenset(), None, self.params).resolve_params(given)


LOOPS: dict[str, LoopSpec] = {}


def loop(name: str, params=()):
    if name in LOOPS:
        raise InternalError(f"loop {name} is registered twice")

    def register(fn):
        LOOPS[name] = LoopSpec(name, fn, tuple(params), (fn.__doc__ or "").strip())
        return fn

    return register


#: Bounds on the loop parameters, so that a loop's batch stays of a size a machine can run:
#: ``steps`` (integrated gradients) and ``samples`` (SmoothGrad) copy every input that many times;
#: Gauss-Legendre with 1000 points is exact for polynomials of degree 1999, and SmoothGrad's mean
#: over 1000 samples has 3% of one sample's spread.
MAX_STEPS = 1000
MAX_SAMPLES = 1000
#: σ = noise · (value range of the row): above 10 ranges the input is lost in the noise
MAX_NOISE = 10.0
#: patch side and stride of occlusion (the patch must also fit the input: checked when it runs)
MAX_PATCH = 2**16
#: the inputs a loop builds at once, in bytes (checked when it runs, against the actual inputs)
MAX_BATCH_BYTES = 2**31


def _whole(low: int, high: int) -> Callable[[float], str | None]:
    def check(v: float) -> str | None:
        if low <= v <= high and float(v).is_integer():
            return None
        return f"must be a whole number >= {low} and <= {high}, got {v:g}"

    return check


_patch_size = _whole(1, MAX_PATCH)


def _noise(v: float) -> str | None:
    if 0 <= v <= MAX_NOISE:
        return None
    return f"must be from 0 to {MAX_NOISE:g} (a fraction of the value range), got {v:g}"


def _check_batch(loop_name: str, feeds: dict[str, np.ndarray], copies: int, parameter: str) -> None:
    """Refuse a loop whose batch of ``copies`` copies of the inputs would exceed MAX_BATCH_BYTES."""
    size = copies * sum(v.nbytes for v in feeds.values())
    if size > MAX_BATCH_BYTES:
        raise RulegraphError(f"loop '{loop_name}' would build {copies} copies of the inputs "
                             f"({size / 2**30:.1f} GiB, more than the {MAX_BATCH_BYTES / 2**30:g} GiB a "
                             f"loop may build at once): lower {parameter} or explain fewer rows at a time")


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``α_k`` in [0, 1] and weights ``w_k`` with ``∫₀¹ g ≈ Σ w_k g(α_k)`` (Captum's names).

    ``riemann_trapezoid`` is the trapezoid rule proper (weights ``1/(n−1)``, halved at the ends);
    Captum's uses ``1/n``, so its result is ours times ``(n−1)/n``.
    """
    k = np.arange(steps, dtype=np.float64)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2
    if method == "riemann_trapezoid":
        if steps < 2:
            raise RulegraphError("riemann_trapezoid needs at least 2 steps")
        weights = np.full(steps, 1 / (steps - 1))
        weights[[0, -1]] /= 2
        return k / (steps - 1), weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return (k + offset) / steps, np.full(steps, 1 / steps)


def _rows(x, n_copies: int):
    """Repeat every input ``n_copies`` times along a new leading axis, flattened into the batch."""
    return {k: np.repeat(v[None], n_copies, axis=0).reshape(-1, *v.shape[1:]) for k, v in x.items()}


def _targets_for(explainer, feeds, target) -> np.ndarray:
    """Class per row; ``argmax`` (and a negative class, which means the same) is decided on the real
    input by one plain forward run, not per loop point."""
    n = next(iter(feeds.values())).shape[0]
    targets = class_per_row(target, n, explainer.spec)
    if (targets < 0).any():
        outputs = explainer.forward({k: v for k, v in feeds.items()})
        start = outputs[explainer.compiled().start_tensor]
        argmax = np.argmax(start, axis=explainer.spec.class_axis).reshape(n).astype(np.int64)
        targets = np.where(targets < 0, argmax, targets)
    return targets


#: Quantities integrated gradients has no meaning for, and what to use instead (a **decision**).
IG_REFUSED = {
    "relevance": "integrated gradients integrates a per-unit rate a(x) along the path (the importance "
                 "quantity's saliency); a relevance map R(x) has none (R/x is undefined at x = 0, and "
                 "zbox/flat maps are not x ⊙ anything). Use loop 'smoothgrad' around this file (SmoothLRP: "
                 "the mean LRP map over noisy copies), or an importance file ('integrated-gradients', "
                 "'gradient') for integrated gradients",
    "difference": "DeepLIFT already compares x with its baseline x' in one pass (Σ C = f(x) − f(x') "
                  "exactly); integrating its multipliers along the path from x' has no defined meaning. "
                  "Run this file without a loop, use loop 'smoothgrad' around it, or the importance file "
                  "'integrated-gradients' for integrated gradients",
}


def refuse_integrated_gradients(ruleset) -> None:
    """Raise for a rule file whose quantity integrated gradients cannot be taken of (``IG_REFUSED``)."""
    why = IG_REFUSED.get(ruleset.quantity)
    if why is not None:
        raise RulegraphError(f"{ruleset.source}: loop integrated_gradients around quantity "
                             f"{ruleset.quantity}: {why}")


@loop("integrated_gradients", params=[
    Param("steps", 50, _whole(1, MAX_STEPS), f"number of points on the path, at most {MAX_STEPS}"),
    Param("method", "gausslegendre", choices=QUADRATURES, doc="the quadrature rule")])
def integrated_gradients(explainer, x, target, params, baseline=None):
    """Integrated gradients (Sundararajan et al. 2017): ``(x − x') ⊙ Σ_k w_k a(x' + α_k(x − x'))``,
    the quadrature of ``(x − x') ⊙ ∫₀¹ a(x' + α(x − x')) dα``, with ``a`` the rule file's importance
    numbers (the gradient for ``gradient.rules``). Importance quantity only: relevance and
    difference files are refused (``IG_REFUSED`` says why and what to use). ``saliency`` is the
    integrated ``a``; ``start_value`` is ``f(x) − f(x')`` (completeness: ``delta → 0`` with more steps
    where ``a`` is the gradient)."""
    refuse_integrated_gradients(explainer.ruleset)
    feeds = explainer._feeds(x)
    floats = _float_inputs(explainer, feeds, "integrated_gradients")
    targets = _targets_for(explainer, feeds, target)
    alphas, weights = quadrature(params["method"], int(params["steps"]))
    _check_batch("integrated_gradients", feeds, len(alphas) + 2, "steps")
    base = {k: make_baseline(_baseline_choice(explainer, baseline, k), feeds[k]) for k in floats}
    k_steps = len(alphas)
    points, ends = {}, {}
    for k, v in feeds.items():  # the path; x and x' themselves need only the forward (completeness)
        if k in base:
            shape = (-1,) + (1,) * v.ndim
            path = base[k][None] + alphas.reshape(shape).astype(v.dtype) * (v - base[k])[None]
            points[k] = path.reshape(-1, *v.shape[1:])
            ends[k] = np.concatenate([v, base[k]])
        else:
            points[k] = _rows({k: v}, k_steps)[k]
            ends[k] = _rows({k: v}, 2)[k]
    result = explainer.explain(points, target=np.tile(targets, k_steps))
    n = len(targets)
    w = weights.reshape((-1, 1) + (1,) * (feeds[floats[0]].ndim - 1))
    # in the backward's type (float32 under precision="mixed", where the inputs are half)
    saliency = {k: (w * result.saliency[k].reshape(k_steps, n, *feeds[k].shape[1:])).sum(axis=0)
                .astype(result.saliency[k].dtype) for k in floats}
    attribution = {k: (feeds[k] - base[k]).astype(saliency[k].dtype) * saliency[k] for k in floats}
    ends = explainer.forward(ends)
    start = ends[explainer.compiled().start_tensor]
    flat = start.reshape(len(start), start.shape[1], -1)[:, :, 0]
    picked = flat[np.arange(2 * n), np.tile(targets, 2)]
    return _result(explainer, attribution, saliency, picked[:n] - picked[n:], ends, n, targets)


def _float_inputs(explainer, feeds, loop_name: str) -> list[str]:
    """The float inputs a loop moves along; a model with none (token ids only) is refused."""
    floats = [k for k in feeds if explainer.graph.is_float(k)]
    if not floats:
        raise RulegraphError(f"loop '{loop_name}' moves the model's float inputs, and this model has none "
                             f"(inputs: {', '.join(feeds)}); token ids cannot be interpolated or noised")
    return floats


def _baseline_choice(explainer, baseline, name):
    if isinstance(baseline, dict):
        return baseline.get(name)
    return baseline if baseline is not None else (explainer.ruleset.baseline or "zeros")


def smoothgrad_noise(feeds: dict, floats: list[str], samples: int, seed: int) -> dict[str, np.ndarray]:
    """The standard-normal draws of SmoothGrad, ``[samples, N, ...]`` float64 per float input (in
    ``floats`` order, from one ``numpy.random.default_rng(seed)``): what ``explain`` uses, and what
    the compiled loop takes as its ``rulegraph/noise/<input>`` inputs."""
    rng = np.random.default_rng(int(seed))
    return {k: rng.standard_normal((samples * len(feeds[k]), *feeds[k].shape[1:]))
            .reshape(samples, *feeds[k].shape) for k in floats}


def noise_sigma(v: np.ndarray, noise: float) -> np.ndarray:
    """σ per row: ``noise · (max x − min x)`` over the row, shaped to broadcast against ``v``."""
    flat = v.reshape(len(v), -1)
    return ((flat.max(axis=1) - flat.min(axis=1)) * noise).reshape((-1,) + (1,) * (v.ndim - 1))


@loop("smoothgrad", params=[
    Param("samples", 25, _whole(1, MAX_SAMPLES), f"noisy copies per input, at most {MAX_SAMPLES}"),
    Param("noise", 0.15, _noise, f"σ as a fraction of each row's value range, at most {MAX_NOISE:g}"),
    Param("seed", 0, _whole(0, 2**32 - 1), "seed of the noise")])
def smoothgrad(explainer, x, target, params, baseline=None):
    """SmoothGrad (Smilkov et al. 2017) around any pass: the mean over ``S`` copies ``x + ε_s`` of
    the input, ``ε_s ~ N(0, σ²)`` with ``σ = noise · (max x − min x)`` per row, of everything the
    pass gives: the attribution (``x_s ⊙ a(x_s)`` for importance; the LRP map for relevance, i.e.
    SmoothLRP; DeepLIFT's ``C`` for difference, every copy against the baseline ``x'`` of the real
    ``x``), the saliency and the bias shares. ``start_value`` is the mean start value of the copies
    (what the mean map accounts for), so ``delta`` is the mean of the copies' deltas: 0 where the
    pass conserves. ``outputs`` are the model's on ``x`` itself."""
    feeds = explainer._feeds(x)
    floats = _float_inputs(explainer, feeds, "smoothgrad")
    targets = _targets_for(explainer, feeds, target)
    samples = int(params["samples"])
    _check_batch("smoothgrad", feeds, samples + 1, "samples")
    draws = smoothgrad_noise(feeds, floats, samples, int(params["seed"]))
    noisy = _rows(feeds, samples)
    for k in floats:
        v = feeds[k]
        sigma = np.tile(noise_sigma(v, params["noise"]), (samples,) + (1,) * (v.ndim - 1))
        noisy[k] = noisy[k] + (draws[k].reshape(noisy[k].shape) * sigma).astype(v.dtype)
    batch = {k: np.concatenate([noisy[k], feeds[k]]) for k in feeds}  # and x itself, for its output
    bases = explainer.compiled().baseline_inputs
    inner_baseline = {k: _rows({k: make_baseline(_baseline_choice(explainer, baseline, k), feeds[k])},
                               samples + 1)[k] for k in bases}
    result = explainer.explain(batch, target=np.tile(targets, samples + 1), baseline=inner_baseline or None)
    n = len(targets)

    def mean(a):
        return a[: samples * n].reshape(samples, n, *a.shape[1:]).mean(axis=0)

    own = {name: value[samples * n:] for name, value in result.outputs.items()}
    own[explainer.compiled().start_tensor] = result.start[samples * n:]
    return _result(explainer, {k: mean(v) for k, v in result.attribution.items()},
                   {k: mean(v) for k, v in result.saliency.items()},
                   mean(result.start_value.astype(np.float64)), own, n, targets,
                   {k: mean(v) for k, v in result.bias_shares.items()},
                   None if result.bias_total is None else mean(result.bias_total))


@loop("occlusion", params=[
    Param("patch", 2, _patch_size, "side of the square patch (spatial axes)"),
    Param("stride", 1, _patch_size, "step between patches"),
    Param("value", 0.0, doc="what the patch is filled with")])
def occlusion(explainer, x, target, params, baseline=None):
    """Occlusion (Zeiler and Fergus 2014), forward only: each cell's attribution is the mean drop
    of the target output over the patches that cover it (Captum's definition). The rule file's
    rules and quantity play no part; ``start_value`` is ``f(x)``, and ``delta`` (Σ map − f(x)) is
    no conservation: occlusion promises none."""
    feeds = explainer._feeds(x)
    name = next(k for k in feeds if explainer.graph.is_float(k))
    v = feeds[name]
    if v.ndim < 3:
        raise RulegraphError(f"occlusion needs spatial axes; input '{name}' has shape {v.shape}")
    targets = _targets_for(explainer, feeds, target)
    patch, stride = int(params["patch"]), int(params["stride"])
    spatial = v.shape[2:]
    if patch > min(spatial):
        raise RulegraphError(f"occlusion patch = {patch} is larger than input '{name}' (shape {v.shape}, "
                             f"spatial sizes {spatial}): use patch <= {min(spatial)}")
    # as Captum: ceil((size − patch)/stride) + 1 patches per axis, the last one cut at the border
    starts = [range(0, -(-max(size - patch, 0) // stride) * stride + 1, stride) for size in spatial]
    corners = np.stack(np.meshgrid(*starts, indexing="ij"), axis=-1).reshape(-1, len(spatial))
    n, m = len(v), len(corners)
    _check_batch("occlusion", feeds, m + 1, "the number of patches (raise stride or patch)")
    copies = np.repeat(v[None], m, axis=0)
    masks = np.zeros((m, 1, 1, *spatial), dtype=bool)
    for i, corner in enumerate(corners):
        masks[(i, 0, 0) + tuple(slice(c, c + patch) for c in corner)] = True
    copies = np.where(masks, np.asarray(params["value"], dtype=v.dtype), copies)
    batch = _rows({k: u for k, u in feeds.items() if k != name}, m)
    batch[name] = copies.reshape(-1, *v.shape[1:])
    everything = {k: np.concatenate([feeds[k], batch[k]]) for k in feeds}
    outputs = explainer.forward(everything)
    start = outputs[explainer.compiled().start_tensor]
    flat = start.reshape(len(start), start.shape[1], -1)[:, :, 0]
    picked = flat[np.arange(n + n * m), np.concatenate([targets, np.tile(targets, m)])]
    drop = picked[:n][None] - picked[n:].reshape(m, n)
    covered = masks.sum(axis=0)[0]
    total = (drop.reshape(m, n, 1, *(1,) * len(spatial)) * masks[:, 0, None]).sum(axis=0)
    attribution = np.broadcast_to(total / np.maximum(covered, 1), v.shape).astype(v.dtype)
    own = {k: o[:n] for k, o in outputs.items()}
    return _result(explainer, {name: attribution.copy()}, {}, picked[:n], own, n, targets)


def _result(explainer, attribution, saliency, start_value, outputs, n, targets, bias_shares=None,
            bias_total=None):
    start = outputs[explainer.compiled().start_tensor][:n]
    spec = explainer.spec  # what was explained, as a plain pass says it (the class per row)
    return Result(attribution=attribution, saliency=saliency, bias_shares=bias_shares or {},
                  bias_total=bias_total,
                  start_value=np.asarray(start_value, dtype=np.float64), start=start,
                  outputs={o: outputs[o][:n] for o in explainer.graph.outputs if o in outputs},
                  target=targets, explained=spec.where(), class_axis=spec.class_axis)
