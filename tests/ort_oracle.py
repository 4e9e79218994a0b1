"""An onnxruntime oracle for ops that are affine in their activation input (ConvTranspose, Resize).

onnxruntime runs these ops in float32 only, so the float64 reference cannot stand in for it. For a
map affine in ``x`` the Jacobian's column ``j`` is ``f(e_j) − f(0)`` exactly (every central difference
``(f(x + h e_j) − f(x − h e_j)) / 2h`` equals it), so the full Jacobian comes from one onnxruntime run
per input element, taken in float64. The compiled explainer (gradient rule, seed mode) runs
on onnxruntime too; ``J(x)ᵀ s`` must agree elementwise within float32 accumulation error,
``1e-5 · (|J|ᵀ |s|)``, so that no cancellation can hide an error.
"""

from __future__ import annotations

import numpy as np
import onnx

from rulegraph import Explainer


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def ort_jacobian(model: onnx.ModelProto, shape) -> np.ndarray:
    """``J [out.size, in.size]`` of a float32 model with one input, affine in it, on onnxruntime."""
    session = _session(model)
    name = session.get_inputs()[0].name
    size = int(np.prod(shape))
    zero = session.run(None, {name: np.zeros(shape, dtype=np.float32)})[0].astype(np.float64).ravel()
    columns = []
    for j in range(size):
        e = np.zeros(size, dtype=np.float32)
        e[j] = 1.0
        columns.append(session.run(None, {name: e.reshape(shape)})[0].astype(np.float64).ravel() - zero)
    return np.stack(columns, axis=1)


def ort_forward(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = _session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check_linear_vjp(model: onnx.ModelProto, x: np.ndarray, rng: np.random.Generator,
                     static: onnx.ModelProto | None = None, rules=None) -> np.ndarray:
    """Assert the explainer's ``J(x)ᵀ s`` of ``model`` on onnxruntime equals the Jacobian of
    ``static`` (default: ``model``) built from onnxruntime's forward; returns the saliency."""
    from oracles import GRADIENT

    jac = ort_jacobian(static or model, x.shape)
    y = ort_forward(static or model, x)
    assert jac.shape[0] == y.size
    seed = rng.standard_normal(y.shape).astype(np.float32)
    want = (jac.T @ seed.astype(np.float64).ravel()).reshape(x.shape)
    bound = (np.abs(jac).T @ np.abs(seed.astype(np.float64)).ravel()).reshape(x.shape)
    got = Explainer(model, rules or GRADIENT).explain(x, target=seed).saliency
    value = got[next(iter(got))]
    assert value.shape == x.shape
    err = np.abs(value - want)
    worst = np.unravel_index(np.argmax(err - 1e-5 * bound), x.shape)
    assert np.all(err <= 1e-5 * bound + 1e-30), (
        f"J^T s differs at {worst}: got {value[worst]!r}, want {want[worst]!r} (bound {bound[worst]:.3g})")
    return value
