"""onnxruntime sessions: provider choice and a quiet CUDA probe on CPU machines.

The GPU is detected by creating the session and reading ``session.get_providers()``:
``get_available_providers()`` lists CUDA on machines without a GPU.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

from ..errors import ModelError, RulegraphWarning, RuntimeMissingError
from ..graph import large

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


def _session(model_bytes, providers: tuple[str, ...], threads: int, strict: bool = False,
             profile: str | None = None):
    rt = ort()
    options = rt.SessionOptions()
    # silence the CUDA probe's warnings on machines without a GPU, and the error lines onnxruntime
    # logs before raising: the exception carries the same message, which rulegraph shows in full
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
    if "CUDAExecutionProvider" not in providers:
        # the memory pattern plans one block for every intermediate of a run; the explainer keeps the
        # forward's activations for its backward, and the planned block about doubled the peak while
        # calling (ResNet-18 b8: 481 -> 239 MB over the session's own), at no cost in time
        options.enable_mem_pattern = False
    if strict:   # a node without a kernel on the requested provider is an error, not a silent CPU copy
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    if "CUDAExecutionProvider" in providers:
        # onnxruntime-gpu logs two error lines on the default logger when CUDA's libraries or the GPU
        # are missing; rulegraph says it in one line instead (_tell_if_no_gpu)
        rt.set_default_logger_severity(4)
    if not isinstance(model_bytes, onnx.ModelProto):
        return rt.InferenceSession(model_bytes, sess_options=options, providers=list(providers))
    if large.holds(model_bytes):
        return _held_session(rt, model_bytes, options, providers)
    if not large.is_large(model_bytes):
        return rt.InferenceSession(model_bytes.SerializeToString(), sess_options=options, providers=list(providers))
    with tempfile.TemporaryDirectory(prefix="rulegraph-") as folder:   # protobuf's 2 GiB: external data
        path = Path(folder) / "model.onnx"
        large.write(model_bytes, path)
        return rt.InferenceSession(str(path), sess_options=options, providers=list(providers))


def _held_session(rt, model: onnx.ModelProto, options, providers: tuple[str, ...]):
    """A session of a model whose big weights are held arrays (``graph.large``): the MatMul, Gemm and
    embedding weights given by ``add_initializer`` over their own buffers (the session keeps their
    OrtValues alive), the others (Conv's, which onnxruntime's optimizers rewrite) read by onnxruntime
    from a temporary external-data file. onnxruntime copies no shared weight, except that its
    prepacking keeps a packed copy of each MatMul and Gemm weight; ``large.PREPACK = False`` turns
    that off (weights held once; MatMul then rounds differently, by about 1e-7 relative)."""
    if not large.PREPACK:
        options.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory(prefix="rulegraph-") as folder:
        path, arrays = large.session_parts(model, Path(folder))
        values = {name: rt.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        sess = rt.InferenceSession(str(path), sess_options=options, providers=list(providers))
    sess._rulegraph_weights = values
    return sess


_told_no_gpu = False


def _tell_if_no_gpu(sess, providers: tuple[str, ...]) -> None:
    """One line, once per process, when CUDA was asked for (or offered by onnxruntime-gpu) but the
    session runs on the CPU: no GPU, or CUDA's libraries missing."""
    global _told_no_gpu
    if "CUDAExecutionProvider" in providers and device_of(sess) == "cpu" and not _told_no_gpu:
        _told_no_gpu = True
        warnings.warn("onnxruntime offers CUDA but found no usable GPU (no device, or CUDA/cuDNN libraries "
                      "missing); running on the CPU", RulegraphWarning, stacklevel=3)


def session(model_bytes, providers: list[str] | None = None, threads: int = 0,
            what: str = "the model", strict: bool = False, profile: str | None = None):
    """A session for a serialized model (bytes), or for a ``ModelProto``: one whose weights are held
    arrays (``graph.large``) gets them by reference; another over ``large.LARGE_BYTES`` of weights is
    written with external data to a temporary folder that onnxruntime reads it from. The Explainer
    keeps its sessions for its lifetime; none
    is kept here, so a large model's memory goes with its Explainer. onnxruntime refusing the
    model is a ``ModelError`` naming ``what``, with onnxruntime's whole message. ``strict``:
    onnxruntime may not place a node on the CPU when another provider was asked for
    (``session.disable_cpu_ep_fallback``); ``profile``: a file prefix for onnxruntime's profile."""
    providers = tuple(providers or default_providers())
    if strict:   # onnxruntime refuses the CPU provider listed beside a disabled CPU fallback
        devices = tuple(p for p in providers if p != "CPUExecutionProvider")
        missing = [p for p in devices if p not in ort().get_available_providers()]
        if missing:
            raise ModelError(f"strict device placement asks for {', '.join(missing)}, which this onnxruntime "
                             f"does not have (it has {', '.join(ort().get_available_providers())}); install "
                             f"`rulegraph[gpu]` on a machine with a GPU, or run without strict")
        strict = bool(devices)
        providers = devices or providers
    try:
        sess = _session(model_bytes, providers, threads, strict, profile)
    except RuntimeMissingError:
        raise
    except Exception as exc:  # noqa: BLE001 (onnxruntime's Fail, InvalidGraph, NotImplemented, ...)
        hint = ("; strict device placement is on: a node has no kernel on the requested provider "
                "(`rulegraph ops` lists them), run without strict to let onnxruntime place it on the CPU"
                if strict else "")
        raise ModelError(f"onnxruntime refuses {what}: {str(exc).strip()}{hint}") from exc
    _tell_if_no_gpu(sess, providers)
    return sess


def host_array(value):
    """An input as a host array: numpy as itself, a DLPack tensor on the CPU (torch, jax) as a view
    without a copy, one on a device (a torch or cupy tensor on the GPU) copied to the host once,
    where every input is checked (rank, type, finite values) before it is bound for the run."""
    if isinstance(value, np.ndarray) or not hasattr(value, "__dlpack_device__"):
        return value
    if value.__dlpack_device__()[0] == 1:          # kDLCPU
        return np.from_dlpack(value)
    return ort().OrtValue.from_dlpack(value).numpy()


def run(sess, names: list[str], feeds: dict) -> list[np.ndarray]:
    """One run through IO binding: host arrays are copied to the session's device once, OrtValues
    are bound where they are, outputs are allocated on the session's device and copied back to the
    host once. The same path runs on the CPU provider."""
    binding = sess.io_binding()
    device = device_of(sess)
    for name, value in feeds.items():
        if isinstance(value, np.ndarray):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        else:
            binding.bind_ortvalue_input(name, value)
    for name in names:
        binding.bind_output(name, device)
    sess.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


def placement(profile_file: str) -> dict[str, int]:
    """Nodes run per execution provider, read from an onnxruntime profile (its JSON trace)."""
    import json

    with open(profile_file) as f:
        events = json.load(f)
    counts: dict[str, int] = {}
    for event in events:
        provider = event.get("args", {}).get("provider")
        if event.get("cat") == "Node" and provider and event.get("name", "").endswith("_kernel_time"):
            counts[provider] = counts.get(provider, 0) + 1
    return counts


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
