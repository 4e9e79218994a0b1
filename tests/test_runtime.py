"""Sessions and runs (rulegraph/run/runtime.py): IO binding, inputs through DLPack, strict device
placement, the one line on a machine without a GPU, and where nodes ran (onnxruntime's profile).

These are the GPU code paths exercised on the CPU provider: the same binding calls, the device
being ``cpu``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from rulegraph import Explainer, ModelError
from rulegraph.errors import RulegraphWarning
from rulegraph.run import runtime

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"
X = np.load(ROOT / "models" / "digits_sample.npz")["x"][:4].astype(np.float32)


def test_io_binding_run_equals_plain_run():
    sess = runtime.session(CNN.read_bytes())
    names = [o.name for o in sess.get_outputs()]
    feeds = {sess.get_inputs()[0].name: X}
    for bound, plain in zip(runtime.run(sess, names, feeds), sess.run(names, feeds)):
        np.testing.assert_array_equal(bound, plain)


def test_a_torch_tensor_is_taken_through_dlpack(torch):
    explainer = Explainer(CNN, "lrp-epsilon")
    from_numpy = explainer.explain(X, target=3).attribution["input"]
    from_torch = explainer.explain(torch.from_numpy(X.copy()), target=3).attribution["input"]
    np.testing.assert_array_equal(from_torch, from_numpy)


def test_host_array_is_a_view_for_cpu_dlpack(torch):
    tensor = torch.arange(6, dtype=torch.float32)
    view = runtime.host_array(tensor)
    tensor[0] = 42.0
    assert view[0] == 42.0


def test_strict_on_the_cpu_alone_is_a_plain_session():
    sess = runtime.session(CNN.read_bytes(), providers=["CPUExecutionProvider"], strict=True)
    assert sess.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this onnxruntime has CUDA")
def test_strict_asking_for_a_provider_onnxruntime_lacks_says_so():
    with pytest.raises(ModelError, match="strict device placement asks for CUDAExecutionProvider, which "
                                         "this onnxruntime does not have"):
        Explainer(CNN, "gradient", providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                  strict_device=True).explain(X, target=1)


class _CpuSession:
    """A session that asked for CUDA and got the CPU (onnxruntime-gpu on a machine without a GPU)."""

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_no_gpu_is_one_line_once(monkeypatch):
    monkeypatch.setattr(runtime, "_told_no_gpu", False)
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime._tell_if_no_gpu(_CpuSession(), providers)
        runtime._tell_if_no_gpu(_CpuSession(), providers)
        runtime._tell_if_no_gpu(_CpuSession(), ("CPUExecutionProvider",))
    lines = [str(w.message) for w in caught if issubclass(w.category, RulegraphWarning)]
    assert lines == ["onnxruntime offers CUDA but found no usable GPU (no device, or CUDA/cuDNN libraries "
                     "missing); running on the CPU"]


def test_placement_counts_every_kernel_run_per_provider(tmp_path):
    sess = runtime.session(CNN.read_bytes(), profile=str(tmp_path / "profile"))
    runtime.run(sess, [o.name for o in sess.get_outputs()], {sess.get_inputs()[0].name: X})
    counts = runtime.placement(sess.end_profiling())
    kernels = sum(1 for n in onnx.load(CNN).graph.node if n.op_type not in ("Constant",))
    assert set(counts) == {"CPUExecutionProvider"}
    assert 0 < counts["CPUExecutionProvider"] <= kernels


def celu_model(tmp_path) -> str:
    """x·W then Celu, an op CUDA has no kernel for."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
         helper.make_node("Celu", ["h"], ["y"], name="the_celu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.linspace(-1, 1, 12))])
    path = tmp_path / "celu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


CELU_LINE = "node 'the_celu' (Celu, opset 17, float): CUDA has no kernel for this op at this opset"


def test_check_profile_names_where_nodes_ran_and_the_cuda_fallbacks(tmp_path, capsys):
    from rulegraph.cli import main

    assert main(["check", celu_model(tmp_path), "--rules", "gradient", "--samples", "2", "--profile"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    head, cuda = last.split("; ", 1)
    assert head.startswith("profile: kernels run per provider: CPUExecutionProvider ")
    assert cuda == "1 node(s) have no CUDA kernel and would run on the CPU under CUDA: " + CELU_LINE


@pytest.mark.parametrize("summary", [[], ["--summary"]])
def test_ops_names_the_nodes_cuda_has_no_kernel_for(tmp_path, capsys, summary):
    from rulegraph.cli import main

    assert main(["ops", celu_model(tmp_path), "--rules", "gradient", *summary]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "CUDA: 1 node(s) of the model have no CUDA kernel and run on the CPU under CUDA (onnxruntime copies "
        "across the device boundary): " + CELU_LINE)


def test_cpu_sessions_plan_no_memory_pattern():
    """The memory pattern (one planned block for every intermediate) about doubled the explainer's
    peak while calling; CPU sessions run without it, a session asking for CUDA keeps onnxruntime's
    default."""
    assert not runtime.session(CNN.read_bytes(), ["CPUExecutionProvider"]).get_session_options().enable_mem_pattern
    assert not Explainer(CNN, "gradient", providers=["CPUExecutionProvider"]).session() \
        .get_session_options().enable_mem_pattern
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cuda = runtime._session(CNN.read_bytes(), ("CUDAExecutionProvider", "CPUExecutionProvider"), 0)
    assert cuda.get_session_options().enable_mem_pattern
