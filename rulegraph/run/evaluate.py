"""``evaluate(model, rules, x)``: how faithful each method's attributions are, per sample.

Each rule file (and ``"random"``, uniform noise as a reference) explains the same inputs and
classes; ``METRICS`` lists what is measured (``perturbation.py``, ``sanity.py``) and whether
higher is better. The answer (``Evaluation``) holds every per-sample value, the curves, the
MPRT layers, means ± standard errors, a text, JSON and CSV table and a ranking of the methods.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import RulegraphError
from . import perturbation as pert
from . import sanity

RANDOM = "random"  #: the reference method: uniform noise in [0, 1), seeded
SHOWS = ("attribution", "saliency")


@dataclass(frozen=True)
class Metric:
    family: str  #: the group that computes it (``--metrics`` names families)
    higher_is_better: bool
    what: str


METRICS = {
    "aopc_morf": Metric("region", True, "AOPC of region perturbation, most relevant first (Samek 2017)"),
    "aopc_lerf": Metric("region", False, "AOPC of region perturbation, least relevant first"),
    "abpc": Metric("region", True, "AUC(LeRF) − AUC(MoRF) of the region perturbation scores"),
    "pf_morf_auc": Metric("pixel", False, "area under the pixel-flipping curve, most relevant first"),
    "pf_lerf_auc": Metric("pixel", True, "area under the pixel-flipping curve, least relevant first"),
    "deletion_auc": Metric("deletion", False, "area under the deletion curve (Petsiuk 2018)"),
    "insertion_auc": Metric("deletion", True, "area under the insertion curve (Petsiuk 2018)"),
    "road_morf": Metric("road", False, "ROAD accuracy, most relevant imputed first, mean over percentages"),
    "road_lerf": Metric("road", True, "ROAD accuracy, least relevant imputed first, mean over percentages"),
    "faithfulness_correlation": Metric("correlation", True, "faithfulness correlation (Bhatt 2020)"),
    "random_logit": Metric("random_logit", False, "SSIM of the class's map with a random class's"),
    "mprt_last": Metric("mprt", False, "Spearman of |map| with all layers randomized (Adebayo 2018)"),
    "mprt_mean": Metric("mprt", False, "Spearman of |map| averaged over the randomization steps"),
}
FAMILIES = tuple(dict.fromkeys(m.family for m in METRICS.values()))


@dataclass
class Settings:
    """The metrics' parameters (Quantus's defaults where it has the metric)."""

    patch_size: int = 8
    regions: int = 100
    features_in_step: int = 1
    deletion_steps: int = 100
    baseline: object = "black"
    road_percentages: tuple = tuple(range(1, 100, 2))
    road_noise: float = 0.01
    runs: int = 100
    subset: int = 224
    seed: int = 42
    softmax: bool = True
    budget: int = pert.DEFAULT_BUDGET


@dataclass
class Evaluation:
    """``scores[method][metric]``: [N] per sample; ``curves[method][name]``: [N, K];
    ``layers[method]``: [(layer, [N] Spearman)] of the MPRT cascade; ``classes``: [N]."""

    methods: list[str]
    classes: np.ndarray
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    layers: dict[str, list] = field(default_factory=dict)
    runs: int = 0  #: model runs the perturbation metrics took

    @property
    def metrics(self) -> list[str]:
        return [m for m in METRICS if any(m in s for s in self.scores.values())]

    def mean(self, method: str, metric: str) -> tuple[float, float]:
        """(mean, standard error of the mean) over the samples (NaN ignored)."""
        values = self.scores[method][metric]
        values = values[np.isfinite(values)]
        if not len(values):
            return float("nan"), float("nan")
        sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        return float(values.mean()), sem

    def ranking(self, metric: str | None = None) -> list[str]:
        """The methods, best first, by ``metric`` (default: ABPC where measured, else the first)."""
        metric = metric or ("abpc" if "abpc" in self.metrics else self.metrics[0])
        if metric not in self.metrics:
            raise RulegraphError(f"metric {metric!r} was not measured; measured: {', '.join(self.metrics)}")
        sign = -1.0 if METRICS[metric].higher_is_better else 1.0
        return sorted(self.methods, key=lambda m: (np.nan_to_num(sign * self.mean(m, metric)[0], nan=np.inf)))

    def rows(self) -> list[dict]:
        """One row per method, sample and metric (the CSV)."""
        return [{"method": m, "sample": i, "class": int(self.classes[i]), "metric": k, "value": float(v)}
                for m in self.methods for k in self.metrics for i, v in enumerate(self.scores[m][k])]

    def text(self) -> str:
        """The table of means ± standard errors, one row per method, best first, then what each is."""
        metrics = self.metrics
        header = ["method", *metrics]
        body = [[m, *(f"{a:.4f} ± {s:.4f}" for a, s in (self.mean(m, k) for k in metrics))]
                for m in self.ranking()]
        widths = [max(len(r[j]) for r in [header, *body]) for j in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
        notes = [f"{k}: {METRICS[k].what} ({'higher' if METRICS[k].higher_is_better else 'lower'} is better)"
                 for k in metrics]
        return "\n".join([*lines, "", f"{len(self.classes)} samples; ranked by "
                          f"{'abpc' if 'abpc' in metrics else metrics[0]}", *notes])

    def to_json(self) -> str:
        return json.dumps({
            "classes": self.classes.tolist(),
            "ranking": self.ranking(),
            "metrics": {k: {"what": METRICS[k].what, "higher_is_better": METRICS[k].higher_is_better}
                        for k in self.metrics},
            "methods": {m: {k: {"mean": self.mean(m, k)[0], "sem": self.mean(m, k)[1],
                                "values": self.scores[m][k].tolist()} for k in self.metrics}
                        for m in self.methods},
            "mprt_layers": {m: [[layer, v.tolist()] for layer, v in layers]
                            for m, layers in self.layers.items()},
        }, indent=1, allow_nan=True)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, ["method", "sample", "class", "metric", "value"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return out.getvalue()


def _families(metrics) -> list[str]:
    names = list(FAMILIES) if metrics is None else list(metrics)
    unknown = [m for m in names if m not in FAMILIES]
    if unknown:
        raise RulegraphError(f"unknown metric family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    return names


def _input(explainer, x) -> np.ndarray:
    inputs = explainer.graph.inputs
    if isinstance(x, dict):
        if len(x) != 1:
            raise RulegraphError(f"evaluation perturbs one input; got {', '.join(x)}")
        x = next(iter(x.values()))
    if len(inputs) != 1:
        raise RulegraphError(f"evaluation perturbs one input; the model has {len(inputs)}: "
                             f"{', '.join(inputs)}")
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.ndim < 2:
        raise RulegraphError(f"evaluation needs a float input batch [N, ...] for '{inputs[0]}'; got "
                             f"{x.dtype} {list(x.shape)}")
    return x


def map_of(result, show: str = "attribution") -> np.ndarray:
    """The map evaluated: the attribution of the first input, or (``show="saliency"``) a(x) where
    the rule file's quantity is importance and gives it (the attribution otherwise)."""
    return next(iter(result.saliency.values())) if show == "saliency" and result.saliency else result.map


def evaluate(model, rules, x, target="argmax", metrics=None, settings: Settings | None = None,
             random: bool = True, output: str | None = None, show: str = "attribution") -> Evaluation:
    """Evaluate each rule file in ``rules`` (a name/path or a list) on the batch ``x`` [N, ...].

    ``target``: ``"argmax"`` (the model's class per row) or class indices; ``metrics``: the
    families to measure (``FAMILIES``; default all); ``random``: add uniform-noise attributions
    as the reference; ``output``: the model output explained (default: the first); ``show``:
    ``map_of``'s choice. The score is
    the softmax (``Settings.softmax``) of the tensor the rule files start at: the logits before a
    final Softmax."""
    explainers, first = explainers_for(model, rules, output, random)
    return evaluate_batch(model, explainers, first, x, target, metrics, settings, random, show)


def explainers_for(model, rules, output: str | None = None, random: bool = True):
    """(rule file -> its Explainer, the Explainer that scores: the first, or a gradient one)."""
    from .explainer import Explainer

    names = [rules] if isinstance(rules, str | Path) else list(rules)
    explainers = {str(r): Explainer(model, r, output=output) for r in names}
    if not explainers and not random:
        raise RulegraphError("nothing to evaluate: give a rule file (or random=True)")
    first = next(iter(explainers.values())) if explainers else Explainer(model, "gradient", output=output)
    return explainers, first


def evaluate_batch(model, explainers: dict, first, x, target="argmax", metrics=None,
                   settings: Settings | None = None, random: bool = True, show: str = "attribution",
                   graph_model: onnx.ModelProto | None = None) -> Evaluation:
    """``evaluate`` on the batch ``x`` with explainers made once (``explainers_for``); ``graph_model``:
    the model proto MPRT randomizes (read from ``model`` when not given)."""
    settings = settings or Settings()
    families = _families(metrics)
    x = _input(first, x)
    start = first.spec.tensor  # the tensor the rule files explain: the logits before a final Softmax
    scorer = pert.Scorer(lambda xs: first.forward(xs)[start], settings.softmax, settings.budget)
    logits = scorer.outputs(len(x), lambda s, e: x[s:e])
    classes = np.broadcast_to(logits.argmax(axis=1) if isinstance(target, str) and target == "argmax"
                              else np.asarray(target, dtype=np.int64), (len(x),)).copy()
    if np.any((classes < 0) | (classes >= logits.shape[1])):
        raise RulegraphError(f"target classes {classes.tolist()} are not all in 0..{logits.shape[1] - 1}")
    rng = np.random.RandomState(settings.seed)

    def random_maps(xs, _classes):
        return rng.uniform(size=xs.shape).astype(np.float32)

    if show not in SHOWS:
        raise RulegraphError(f"show {show!r} is not one of {', '.join(SHOWS)}")
    methods = {name: (lambda xs, cs, e=e: map_of(e.explain(xs, target=cs), show))
               for name, e in explainers.items()}
    if random:
        methods[RANDOM] = random_maps
    result = Evaluation(methods=list(methods), classes=classes)
    if graph_model is None:
        graph_model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    for name, explain in methods.items():
        a = explain(x, classes)
        result.scores[name], result.curves[name] = {}, {}
        for family in families:
            FAMILY_RUNS[family](result, name, scorer, x, a, classes, settings,
                                lambda xs, cs, f=explain: f(xs, cs), graph_model, explainers.get(name),
                                logits.shape[1], show)
    result.runs = scorer.runs
    return result


def _region(result, name, scorer, x, a, classes, s, *_):
    morf = pert.region_perturbation(scorer, x, a, classes, s.patch_size, "morf", s.regions, s.baseline)
    lerf = pert.region_perturbation(scorer, x, a, classes, s.patch_size, "lerf", s.regions, s.baseline)
    zero = np.zeros((len(x), 1))
    result.curves[name].update(region_morf=morf, region_lerf=lerf)
    result.scores[name].update(aopc_morf=pert.aopc(morf), aopc_lerf=pert.aopc(lerf),
                               abpc=pert.auc(np.hstack([zero, morf])) - pert.auc(np.hstack([zero, lerf])))


def _pixel(result, name, scorer, x, a, classes, s, *_):
    for order in pert.ORDERS:
        curve = pert.pixel_flipping(scorer, x, a, classes, s.features_in_step, order, s.baseline)
        result.curves[name][f"pixel_{order}"] = curve
        result.scores[name][f"pf_{order}_auc"] = pert.auc(curve) if curve.shape[1] > 1 else curve[:, 0]


def _deletion(result, name, scorer, x, a, classes, s, *_):
    curves = pert.deletion_insertion(scorer, x, a, classes, s.deletion_steps, s.baseline)
    result.curves[name].update(curves)
    result.scores[name].update(deletion_auc=pert.auc(curves["deletion"]),
                               insertion_auc=pert.auc(curves["insertion"]))


def _road(result, name, scorer, x, a, classes, s, *_):
    for order in pert.ORDERS:
        curve = pert.road(scorer, x, a, classes, s.road_percentages, s.road_noise, order, s.seed)
        result.curves[name][f"road_{order}"] = curve
        result.scores[name][f"road_{order}"] = curve.mean(axis=1)


def _correlation(result, name, scorer, x, a, classes, s, *_):
    subset = min(s.subset, pert.flat_attribution(a, x).shape[1] // 2)
    result.scores[name]["faithfulness_correlation"] = pert.faithfulness_correlation(
        scorer, x, a, classes, s.runs, subset, s.baseline, s.seed)


def _random_logit(result, name, scorer, x, a, classes, s, explain, model, explainer, n_classes, show):
    result.scores[name]["random_logit"] = sanity.random_logit(explain, x, a, classes, n_classes, s.seed)


def _mprt(result, name, scorer, x, a, classes, s, explain, model, explainer, n_classes, show):
    from .explainer import Explainer

    if explainer is None:  # the random reference does not depend on the model
        def explain_model(_model, xs, cs):
            return explain(xs, cs)
    else:
        def explain_model(copy, xs, cs):
            randomized = Explainer(copy, explainer.ruleset, output=explainer.output)
            # random weights amplify: no warning per step
            return map_of(randomized.explain(xs, target=cs, max_amplification=None), show)
    models = [("original", model), *sanity.randomized(model, s.seed)]
    steps = sanity.mprt(explain_model, models, x, a, classes)
    result.layers[name] = steps
    result.scores[name].update(mprt_last=steps[-1][1], mprt_mean=np.mean([v for _, v in steps[1:]], axis=0))


FAMILY_RUNS = {"region": _region, "pixel": _pixel, "deletion": _deletion, "road": _road,
               "correlation": _correlation, "random_logit": _random_logit, "mprt": _mprt}
