"""onnxruntime sessions: provider choice and a quiet CUDA probe on CPU machines.

The GPU is detected by creating the session and reading ``session.get_providers()``:
``get_available_providers()`` lists CUDA on machines without a GPU.
"""

from __future__ import annotations

import re

from ..errors import ModelError, RuntimeMissingError

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
    # silence the CUDA probe's warnings on machines without a GPU, and the error lines onnxruntime
    # logs before raising: the exception carries the same message, which rulegraph shows in full
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
    return rt.InferenceSession(model_bytes, sess_options=options, providers=list(providers))


def session(model_bytes: bytes, providers: list[str] | None = None, threads: int = 0,
            what: str = "the model"):
    """A session for a serialized model. The Explainer keeps its sessions for its lifetime; none
    is kept here, so a large model's memory goes with its Explainer. onnxruntime refusing the
    model is a ``ModelError`` naming ``what``, with onnxruntime's whole message."""
    providers = tuple(providers or default_providers())
    try:
        return _session(model_bytes, providers, threads)
    except RuntimeMissingError:
        raise
    except Exception as exc:  # noqa: BLE001 (onnxruntime's Fail, InvalidGraph, NotImplemented, ...)
        raise ModelError(f"onnxruntime refuses {what}: {str(exc).strip()}") from exc


def translate(message: str, origins: dict[str, str]) -> str:
    """onnxruntime's ``message`` with every name rulegraph made followed by what it stands for in
    the user's model (``Compiled.origins``): ``rg/conv/Mul_7 [the backward of node 'conv' (Conv)]``."""
    found = sorted((name for name in origins if name and name in message), key=len, reverse=True)
    if not found:
        return message
    pattern = re.compile("|".join(re.escape(name) for name in found))
    return pattern.sub(lambda m: f"{m.group(0)} [{origins[m.group(0)]}]" if origins[m.group(0)]
                       else m.group(0), message)


def device_of(sess) -> str:
    """'cuda' when the session really got the CUDA provider, else 'cpu'."""
    return "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
