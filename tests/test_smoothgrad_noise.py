"""SmoothGrad's noise scale, pinned by a closed-form replica (Smilkov et al. 2017).

The copies are ``x + σ ε_s`` with ``σ = noise · (max x − min x)`` per row and ``ε`` the standard
normal draws of ``numpy.random.default_rng(seed)``, shaped ``[samples · N, ...]`` (the documented
draw order). Under gradient × input the map of one copy of ``y = x W`` is ``x_s ⊙ W[:, t]``, of
``y = relu(x W)`` it is ``x_s ⊙ W[:, t] · 1[(x_s W)_t > 0]``; the loop's answer is the mean over the
copies. The replica is written here from that definition alone (no helper of the loop), so a σ
scaled by any factor, or taken over the wrong axis, changes the map element by element.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from oracles import make_model

from rulegraph import Explainer

F = TensorProto.FLOAT
RNG = np.random.default_rng(5)
W = RNG.normal(size=(4, 3))
#: rows of very different value ranges, so that a σ not taken per row shows
X = (RNG.normal(size=(3, 4)) * np.array([[0.1], [1.0], [10.0]])).astype(np.float32)
TARGETS = np.array([0, 2, 1])


def model(relu: bool):
    """``y = x W`` (MatMul), or ``y = relu(x W)``; float32, symbolic batch."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z" if relu else "y"], name="mm")]
    if relu:
        nodes.append(helper.make_node("Relu", ["z"], ["y"], name="relu"))
    return make_model(nodes, {"x": ["N", 4]}, {"W": W.astype(np.float32)}, elem=F)


def replica(relu: bool, samples: int, noise: float, seed: int) -> np.ndarray:
    """The mean gradient × input map over the noisy copies of X (float64 from the float32 copies)."""
    n, rows = len(X), np.arange(len(X))
    sigma = noise * (X.max(axis=1) - X.min(axis=1))   # one σ per row
    eps = np.random.default_rng(seed).standard_normal((samples * n, X.shape[1])).reshape(samples, n, -1)
    w_t = W[:, TARGETS].T                              # [N, 4]: each row's target column
    maps = []
    for s in range(samples):
        copy = (X + (eps[s] * sigma[:, None]).astype(np.float32)).astype(np.float64)
        gate = (copy @ W)[rows, TARGETS] > 0 if relu else np.ones(n, bool)
        maps.append(copy * w_t * gate[:, None])
    return np.mean(maps, axis=0)


#: (model with Relu, noise, samples, seed)
CASES = [
    (False, 0.15, 5, 0),
    (False, 0.5, 3, 7),
    (True, 0.15, 6, 0),
    (True, 1.0, 8, 123),
    (True, 2.0, 4, 2**31),
]


@pytest.mark.parametrize("relu,noise,samples,seed", CASES,
                         ids=[f"{'relu' if c[0] else 'linear'}-noise{c[1]}-seed{c[3]}" for c in CASES])
def test_smoothgrad_map_is_the_mean_over_copies_with_sigma_per_row(relu, noise, samples, seed):
    result = Explainer(model(relu), "gradient-x-input").explain(X, target=TARGETS, loop="smoothgrad",
                                                                samples=samples, noise=noise, seed=seed)
    expected = replica(relu, samples, noise, seed)
    np.testing.assert_allclose(result.map, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
