"""Perturbation metrics of an attribution, each computed by batched runs of the model.

Every curve stacks all its steps of all samples as rows of one batch, run in chunks of at most
``budget`` bytes of input (``Scorer``); no metric calls the model once per step. Definitions follow
Quantus 0.6 (same inputs and settings give the same numbers):

- order: the attribution broadcast to the input's shape, flattened per sample; most relevant first
  (MoRF) is ``argsort(-a)``, least relevant first (LeRF) ``argsort(a)``;
- baseline ``"black"``: the sample's minimum, ``"white"``: its maximum, or a number;
- pixel flipping: the class score after the first ``k·step`` features are set to the baseline,
  k = 1..⌈F/step⌉ (cumulative);
- region perturbation: the attribution summed over ``patch × patch`` blocks of all channels (the
  image padded to a multiple of the patch, split evenly, the last side the larger), blocks
  ordered by that sum; the curve is f(x) − f(x with the first k blocks at the baseline),
  k = 1..``regions``; AOPC = Σ_k curve_k / (regions + 1) (Samek et al. 2017);
- ROAD (Rong et al. 2022): the top ``int(H·W·p/100)`` pixels replaced by noisy linear imputation
  (each the weighted mean of its 8 neighbours, 1/6 direct and 1/12 diagonal, solved jointly, plus
  ``noise``·N(0, 1)); the score is 1 where the arg-max still is the class;
- faithfulness correlation (Bhatt et al. 2020): ``runs`` random subsets of ``subset`` features set
  to the baseline; Pearson correlation of the subset's attribution sum with the score's drop.
Scores are softmax probabilities of the class (``softmax=False``: the raw output).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import RulegraphError

DEFAULT_BUDGET = 256 * 2**20  #: bytes of perturbed input per model run
ORDERS = ("morf", "lerf")
DENSE_MAX = 400  #: ROAD: systems of at most this many pixels are solved dense
#: ROAD's neighbours: (row offset, column offset) -> weight
ROAD_NEIGHBOURS = {(1, 1): 1 / 12, (0, 1): 1 / 6, (-1, 1): 1 / 12, (1, -1): 1 / 12, (0, -1): 1 / 6,
                   (-1, -1): 1 / 12, (1, 0): 1 / 6, (-1, 0): 1 / 6}


class Scorer:
    """The model's score of one class per row for many rows: ``score(total, make, classes)`` runs
    the rows ``make(start, stop)`` in chunks of at most ``budget`` bytes; ``runs`` counts the runs."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], softmax: bool = True,
                 budget: int = DEFAULT_BUDGET):
        self.predict, self.softmax, self.budget, self.runs = predict, softmax, budget, 0

    def outputs(self, total: int, make: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """[total, classes]: the model's output (softmax of it) on every row."""
        parts, start = [], 0
        while start < total:
            first = make(start, start + 1)
            rows = max(1, int(self.budget // max(first.nbytes, 1)))
            stop = min(total, start + rows)
            xs = first if stop == start + 1 else make(start, stop)
            out = np.asarray(self.predict(xs))
            self.runs += 1
            if out.ndim > 2 and out.shape[0] == len(xs) and all(d == 1 for d in out.shape[2:]):
                out = out.reshape(len(xs), -1)  # [N, C, 1, 1] class maps of a global pooling
            if out.ndim != 2 or out.shape[0] != len(xs):
                raise RulegraphError(f"evaluation scores a class per row: the model's output is "
                                     f"{list(out.shape)} for {len(xs)} rows, not [rows, classes]; pass "
                                     f"output= the logits")
            if self.softmax:
                shifted = np.exp(out - out.max(axis=1, keepdims=True))
                out = shifted / shifted.sum(axis=1, keepdims=True)
            parts.append(out)
            start = stop
        return np.concatenate(parts)

    def score(self, total: int, make: Callable[[int, int], np.ndarray], classes: np.ndarray) -> np.ndarray:
        out = self.outputs(total, make)
        return out[np.arange(total), classes].astype(np.float64)


def flat_attribution(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[N, F]: ``a`` broadcast to ``x``'s shape (a channel axis of 1 repeats), flattened per sample."""
    if a.shape[0] != x.shape[0]:
        raise RulegraphError(f"the attribution has {a.shape[0]} rows for {x.shape[0]} inputs")
    if a.ndim < x.ndim:
        a = a.reshape(a.shape[:1] + (1,) * (x.ndim - a.ndim) + a.shape[1:])
    try:
        return np.broadcast_to(a, x.shape).reshape(len(x), -1)
    except ValueError:
        raise RulegraphError(f"the attribution {list(a.shape)} does not fit the input {list(x.shape)}: give "
                             f"it the input's shape, or one channel") from None


def order_of(a_flat: np.ndarray, order: str) -> np.ndarray:
    """[N, F] feature indices, most (``morf``) or least (``lerf``) relevant first."""
    if order not in ORDERS:
        raise RulegraphError(f"order {order!r} is not one of {', '.join(ORDERS)}")
    return np.argsort(-a_flat if order == "morf" else a_flat, axis=1)


def ranks(indices: np.ndarray) -> np.ndarray:
    """The inverse permutation per row: ``ranks[i, indices[i, j]] = j``."""
    out = np.empty_like(indices)
    np.put_along_axis(out, indices, np.arange(indices.shape[1])[None].repeat(len(indices), 0), axis=1)
    return out


def baseline_values(x: np.ndarray, baseline) -> np.ndarray:
    """[N]: the value perturbed features take, per sample."""
    flat = x.reshape(len(x), -1)
    table = {"black": lambda: flat.min(axis=1), "white": lambda: flat.max(axis=1)}
    if isinstance(baseline, str):
        if baseline not in table:
            raise RulegraphError(f"baseline {baseline!r} is not one of {', '.join(table)} or a number")
        return table[baseline]().astype(x.dtype)
    return np.full(len(x), baseline, dtype=x.dtype)


def masked_scores(scorer: Scorer, x: np.ndarray, classes: np.ndarray, rank: np.ndarray, cuts: np.ndarray,
                  base: np.ndarray, insert: bool = False) -> np.ndarray:
    """[N, K]: the score of row i with its features of rank < cuts[k] at the baseline (``insert``:
    those features kept and every other one at the baseline), all N·K rows in batched runs."""
    n, k = len(x), len(cuts)
    flat = x.reshape(n, -1)

    def make(start: int, stop: int) -> np.ndarray:
        i, j = np.divmod(np.arange(start, stop), k)
        hit = rank[i] < cuts[j][:, None]
        return np.where(hit != insert, base[i][:, None], flat[i]).reshape(stop - start, *x.shape[1:])

    return scorer.score(n * k, make, np.repeat(classes, k)).reshape(n, k)


def pixel_flipping(scorer: Scorer, x, a, classes, features_in_step: int = 1, order: str = "morf",
                   baseline="black") -> np.ndarray:
    """[N, ⌈F/step⌉]: the class score after each step of flipping (Quantus ``PixelFlipping``)."""
    a_flat = flat_attribution(a, x)
    n_features = a_flat.shape[1]
    if features_in_step < 1 or n_features % features_in_step:
        raise RulegraphError(f"features_in_step {features_in_step} does not divide the input's "
                             f"{n_features} features")
    cuts = np.minimum(np.arange(1, -(-n_features // features_in_step) + 1) * features_in_step, n_features)
    rank = ranks(order_of(a_flat, order))
    return masked_scores(scorer, x, classes, rank, cuts, baseline_values(x, baseline))


def _padding(size: int, patch: int) -> tuple[int, int]:
    extra = (patch - size % patch) % patch
    return extra // 2, extra - extra // 2


def region_perturbation(scorer: Scorer, x, a, classes, patch_size: int = 8, order: str = "morf",
                        regions: int = 100, baseline="black") -> np.ndarray:
    """[N, min(regions, blocks)]: f(x) − f(x with the first k blocks at the baseline) (Quantus
    ``RegionPerturbation``; the unperturbed row runs in the same batch)."""
    if x.ndim != 4:
        raise RulegraphError(f"region perturbation needs image inputs [N, C, H, W]; the input is "
                             f"{list(x.shape)}")
    n, c, h, w = x.shape
    a_full = flat_attribution(a, x).reshape(x.shape)
    (top, bottom), (left, right) = _padding(h, patch_size), _padding(w, patch_size)
    padded = np.pad(a_full, ((0, 0), (0, 0), (top, bottom), (left, right)))
    bh, bw = padded.shape[2] // patch_size, padded.shape[3] // patch_size
    blocks = padded.reshape(n, c, bh, patch_size, bw, patch_size).transpose(0, 2, 4, 1, 3, 5)
    sums = np.ascontiguousarray(blocks).reshape(n, bh * bw, -1).sum(axis=-1)
    block_rank = ranks(order_of(sums, order))
    rows, cols = np.meshgrid((np.arange(h) + top) // patch_size, (np.arange(w) + left) // patch_size,
                             indexing="ij")
    block_of = np.broadcast_to(rows * bw + cols, (c, h, w)).reshape(-1)
    rank = block_rank[:, block_of]
    cuts = np.arange(0, min(regions, bh * bw) + 1)
    scores = masked_scores(scorer, x, classes, rank, cuts, baseline_values(x, baseline))
    return scores[:, :1] - scores[:, 1:]


def aopc(drops: np.ndarray) -> np.ndarray:
    """[N]: the area over the perturbation curve, Σ_k (f(x) − f(x⁽ᵏ⁾)) / (K + 1), k = 0..K."""
    return drops.sum(axis=1) / (drops.shape[1] + 1)


def auc(curve: np.ndarray) -> np.ndarray:
    """[N]: trapezoidal area under each row, the steps spread over [0, 1]."""
    return np.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), axis=1)


def deletion_insertion(scorer: Scorer, x, a, classes, steps: int = 100, baseline="black") -> dict:
    """Petsiuk et al. 2018: the class score as the most relevant features are removed (deletion)
    or revealed on the baseline (insertion), ``steps + 1`` points from 0 to all features; the
    curves and their areas over [0, 1]."""
    a_flat = flat_attribution(a, x)
    n_features = a_flat.shape[1]
    steps = min(steps, n_features)
    cuts = np.round(np.linspace(0, n_features, steps + 1)).astype(int)
    rank, base = ranks(order_of(a_flat, "morf")), baseline_values(x, baseline)
    deletion = masked_scores(scorer, x, classes, rank, cuts, base)
    insertion = masked_scores(scorer, x, classes, rank, cuts, base, insert=True)
    return {"deletion": deletion, "insertion": insertion}


def _imputed(image: np.ndarray, pixels: np.ndarray, noise: float, rng) -> np.ndarray:
    """ROAD's noisy linear imputation of ``pixels`` (flat indices over H·W) in ``image`` [C, H, W]."""
    c, h, w = image.shape
    flat = image.reshape(c, -1)
    known = np.ones(h * w)
    known[pixels] = 0
    variable = np.zeros(h * w, dtype=int)
    variable[pixels] = np.arange(len(pixels))
    rows, cols, values = [np.arange(len(pixels))], [np.arange(len(pixels))], []
    rhs = np.zeros((len(pixels), c))
    total = np.ones(len(pixels))
    for (dr, dc), weight in ROAD_NEIGHBOURS.items():
        r, col = pixels // w + dr, pixels % w + dc
        valid = (r >= 0) & (col >= 0) & (r < h) & (col < w)
        ids, where = np.flatnonzero(valid), (pixels + dr * w + dc)[valid]
        seen = known[where] == 1
        rhs[ids[seen], :] -= weight * flat[:, where[seen]].T
        rows.append(ids[~seen])
        cols.append(variable[where[~seen]])
        values.append(np.full(len(rows[-1]), weight))
        total[~valid] -= weight
    entries = (np.concatenate([-total, *values]), (np.concatenate(rows), np.concatenate(cols)))
    if len(pixels) <= DENSE_MAX:  # small systems: LAPACK without scipy's per-call overhead
        lhs = np.zeros((len(pixels), len(pixels)))
        lhs[entries[1]] = entries[0]
        solved = np.linalg.solve(lhs, rhs).T
        solved = solved[0] if c == 1 else solved  # the shape spsolve gives, so the noise draws match
    else:
        try:
            from scipy.sparse import csc_matrix
            from scipy.sparse.linalg import spsolve
        except ImportError:
            raise RulegraphError(f"ROAD imputes {len(pixels)} pixels of an image with a sparse solver: install "
                                 f"scipy (rulegraph[evaluate])") from None
        solved = np.transpose(spsolve(csc_matrix(entries, shape=(len(pixels), len(pixels))), rhs))
    out = flat.copy()
    out[:, pixels] = solved + noise * rng.randn(*solved.shape)
    return out.reshape(image.shape)


def road(scorer: Scorer, x, a, classes, percentages=tuple(range(1, 100, 2)), noise: float = 0.01,
         order: str = "morf", seed: int | None = 0) -> np.ndarray:
    """[N, P]: 1 where the model still predicts the class after the top ``p`` % of pixels are
    imputed (Quantus ``ROAD``, which reports the mean over samples per percentage). Pixels are
    ranked by the attribution summed over channels (one channel: Quantus's order exactly); the
    noise is drawn percentage by percentage, sample by sample, from ``RandomState(seed)``."""
    if x.ndim != 4:
        raise RulegraphError(f"ROAD needs image inputs [N, C, H, W]; the input is {list(x.shape)}")
    n, c, h, w = x.shape
    a_flat = flat_attribution(a, x)
    pixel_a = a_flat if c == 1 else a_flat.reshape(n, c, h * w).sum(axis=1)
    ordered = order_of(pixel_a, order)
    rng = np.random.RandomState(seed)
    size = h * w
    images = np.empty((len(percentages), n, *x.shape[1:]), dtype=x.dtype)
    for p_ix, p in enumerate(percentages):
        for i in range(n):
            top = ordered[i, : int(size * p / 100)]
            images[p_ix, i] = _imputed(x[i], top, noise, rng) if len(top) else x[i]
    stacked = images.transpose(1, 0, 2, 3, 4).reshape(n * len(percentages), *x.shape[1:])
    out = scorer.outputs(len(stacked), lambda s, e: stacked[s:e])
    return (out.argmax(axis=1) == np.repeat(classes, len(percentages))).reshape(n, -1).astype(np.float64)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N]: Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def faithfulness_correlation(scorer: Scorer, x, a, classes, runs: int = 100, subset: int = 224,
                             baseline="black", seed: int | None = 0) -> np.ndarray:
    """[N]: Pearson correlation, over ``runs`` random subsets of ``subset`` features, of the subset's
    attribution sum with the score's drop when it is set to the baseline (Quantus
    ``FaithfulnessCorrelation``; subsets drawn run by run, sample by sample, from
    ``RandomState(seed).choice``, then N uniform draws per run, as Quantus's baseline lookup
    makes, so that a seeded Quantus run draws the same subsets)."""
    a_flat = flat_attribution(a, x).astype(np.float64)
    n, n_features = a_flat.shape
    if not 0 < subset <= n_features:
        raise RulegraphError(f"subset {subset} is not between 1 and the input's {n_features} features")
    rng = np.random.RandomState(seed)
    draws = []
    for _ in range(runs):
        # RandomState.choice without replacement is permutation(...)[:subset]: the same draws, faster
        draws.append(np.stack([rng.permutation(n_features)[:subset] for _ in range(n)]))
        rng.uniform(size=n)  # Quantus 0.6 draws an unused "uniform" baseline per run: keep in step
    chosen = np.stack(draws, axis=1)  # [N, runs, subset]
    base = baseline_values(x, baseline)
    flat = x.reshape(n, -1)

    def make(start: int, stop: int) -> np.ndarray:
        i, j = np.divmod(np.arange(start, stop), runs + 1)
        rows = flat[i].copy()
        hit = j > 0
        rows[np.flatnonzero(hit)[:, None], chosen[i[hit], j[hit] - 1]] = base[i[hit]][:, None]
        return rows.reshape(stop - start, *x.shape[1:])

    scores = scorer.score(n * (runs + 1), make, np.repeat(classes, runs + 1)).reshape(n, runs + 1)
    sums = np.take_along_axis(a_flat[:, None, :], chosen, axis=2).sum(axis=2)
    return pearson(sums, scores[:, :1] - scores[:, 1:])
