"""onnxruntime sessions: provider choice and a quiet CUDA probe on CPU machines.

The GPU is detected by creating the session and reading ``session.get_providers()``:
``get_available_providers()`` lists CUDA on machines without a GPU.
"""

from __future__ import annotations

from .errors import RuntimeMissingError

INSTALL_HINT = ("rulegraph needs onnxruntime: install `rulegraph[cpu]` (onnxruntime) or "
                "`rulegraph[gpu]` (onnxruntime-gpu, CUDA 13); not both, they clobber each other")


def ort():
    """The onnxruntime module, or one clear error naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeMissingError(INSTALL_HINT) from exc
    return onnxruntime


def default_providers() -> list[str]:
    available = ort().get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
    return preferred + ["CPUExecutionProvider"]


def _session(model_bytes: bytes, providers: tuple[str, ...], threads: int):
    rt = ort()
    options = rt.SessionOptions()
    options.log_severity_level = 3  # silence the CUDA probe's warnings on machines without a GPU
    if threads:
        options.intra_op_num_threads = threads
    return rt.InferenceSession(model_bytes, sess_options=options, providers=list(providers))


def session(model_bytes: bytes, providers: list[str] | None = None, threads: int = 0):
    """A session for a serialized model. The Explainer keeps its sessions for its lifetime; none
    is kept here, so a large model's memory goes with its Explainer."""
    return _session(model_bytes, tuple(providers or default_providers()), threads)


def device_of(sess) -> str:
    """'cuda' when the session really got the CUDA provider, else 'cpu'."""
    return "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
