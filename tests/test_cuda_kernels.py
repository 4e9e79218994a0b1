"""GPU by construction: every node rulegraph emits has a CUDA kernel in onnxruntime's registry.

The registry is data (``rulegraph/data/onnxruntime-cuda-kernels.csv``), so this runs on machines
without a GPU. The explainers checked: every row of the VJP table (tests/test_vjp.py) in float32,
in seed mode and with a class target, and every bundled model and real model in tests/data under
every bundled rule file (the IG and SmoothGrad loop models included). A node may fall back only
if it is the user's own forward node and CUDA has no kernel for its op: those are listed in
``FORWARD_FALLBACKS``, with the op's backward still on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import test_contrib
import test_recurrent
import test_vjp
import test_vjp_norms
from onnx import TensorProto, helper, numpy_helper
from oracles import GRADIENT, as_float32

from rulegraph import Explainer
from rulegraph.compile.targets import TargetError
from rulegraph.run import kernels

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((ROOT / "rules").glob("*.rules"))
MODELS = [ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_mlp.onnx",
          ROOT / "models" / "digits_resnet.onnx", ROOT / "tests" / "data" / "mnist-8.onnx",
          ROOT / "tests" / "data" / "resnet20_cifar10.onnx", ROOT / "models" / "mnist_lstm.onnx"]

#: op types that CUDA has no float kernel for at any opset the table's rows use (the user's forward
#: node stays on the CPU, or, for a function op such as CastLike or Swish, runs as its body where
#: onnxruntime inlines it; rulegraph's backward of it is made of ops CUDA has)
FORWARD_FALLBACKS = {"Acos", "Acosh", "AffineGrid", "Asin", "Asinh", "Atan", "Atanh", "CastLike", "Celu",
                     "CenterCropPad", "Col2Im", "Cosh", "CumProd", "DFT", "GlobalLpPool",
                     "GroupNormalization", "Hardmax", "LpNormalization", "LpPool", "MaxUnpool", "Mean",
                     "MeanVarianceNormalization", "Mish", "Sinh", "Swish", "Tan"}


# the registry as data ---------------------------------------------------------------------------


@pytest.mark.parametrize("domain, op, opset, dtype, has", [
    ("ai.onnx", "Conv", 17, "float", True),
    ("ai.onnx", "Conv", 17, "float16", True),
    ("ai.onnx", "Conv", 1, "float", True),           # the opset 1-10 range
    ("ai.onnx", "Resize", 19, "bfloat16", False),    # CUDA Resize takes double, float, float16
    ("ai.onnx", "Mish", 18, "float", None),          # no CUDA kernel at all
    ("com.microsoft", "FastGelu", 1, "float", True),
    ("ai.onnx", "Where", 16, "bfloat16", True),
    ("ai.onnx", "Where", 15, "bfloat16", False),     # 9-15 had no bfloat16
])
def test_registry_rows(domain, op, opset, dtype, has):
    types = kernels.kernel_types(domain, op, opset)
    assert (None if types is None else dtype in types) == has


def one_node(op_type: str, dtype: int, opset: int, **attrs) -> onnx.ModelProto:
    node = helper.make_node(op_type, ["x"], ["y"], name="n", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", dtype, [2, 3])],
                              [helper.make_tensor_value_info("y", dtype, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("op_type, dtype, opset, reason", [
    ("Relu", TensorProto.FLOAT, 17, None),
    ("Mish", TensorProto.FLOAT, 18, "CUDA has no kernel for this op at this opset"),
    ("Celu", TensorProto.DOUBLE, 17, "CUDA has no kernel for this op at this opset"),
    ("Relu", TensorProto.INT64, 14, None),           # integers are not checked (shape arithmetic)
])
def test_fallbacks_name_node_and_reason(op_type, dtype, opset, reason):
    found = kernels.cuda_fallbacks(one_node(op_type, dtype, opset))
    assert [f.reason for f in found] == ([] if reason is None else [reason])
    if found:
        assert found[0].line().startswith(f"node 'n' ({op_type}, opset {opset}, ")


def test_a_type_the_kernel_lacks_is_named():
    model = one_node("Resize", TensorProto.BFLOAT16, 19)
    model.graph.node[0].input.extend(["", "scales"])
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 2], np.float32), "scales"))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 6
    (found,) = kernels.cuda_fallbacks(model)
    assert (found.dtype, found.reason) == ("bfloat16", "CUDA's kernel takes double, float, float16")


# every explainer rulegraph emits ------------------------------------------------------------------


def emitted_fallbacks(compiled: onnx.ModelProto) -> list[str]:
    """Fallbacks other than the user's own forward nodes of an op in ``FORWARD_FALLBACKS`` (the
    nodes rulegraph emits are named ``rg/...`` and ``rulegraph/...``; an unnamed user node gets a name
    when the model is read)."""
    def emitted(name: str) -> bool:
        return name.startswith(("rg/", "rulegraph/"))

    return [f.line() for f in kernels.cuda_fallbacks(compiled)
            if emitted(f.node) or f.op_type not in FORWARD_FALLBACKS]


@pytest.mark.parametrize("case", [c.param() for c in test_vjp.CASES + test_vjp_norms.CASES])
def test_every_vjp_row_emits_only_cuda_ops(case):
    model = as_float32(case.model)
    explainer = Explainer(model, GRADIENT)
    assert emitted_fallbacks(explainer.compiled(seed_mode=True).model) == []
    try:
        compiled = explainer.compiled()
    except TargetError:    # rows whose output has no class axis are explained by a seed only
        return
    assert emitted_fallbacks(compiled.model) == []


@pytest.mark.parametrize("model_path", MODELS, ids=lambda p: p.stem)
@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.stem)
def test_bundled_and_real_models_emit_only_cuda_ops(model_path, rules):
    explainer = Explainer(model_path, rules)
    user = onnx.load(model_path)
    assert emitted_fallbacks(explainer.compiled().model) == []
    fixed_batch = user.graph.input[0].type.tensor_type.shape.dim[0].dim_value > 0
    if not fixed_batch:   # a loop model needs a dynamic batch (mnist-8's is fixed at 1)
        assert emitted_fallbacks(explainer.saved().model) == []


PPOCR = sorted((ROOT / "tests" / "data" / "ppocr").glob("*.onnx"))


@pytest.mark.parametrize("model_path", PPOCR, ids=lambda p: p.stem)
@pytest.mark.parametrize("rules", ["gradient", "lrp-transformer"])   # rec has attention
def test_ppocr_explainers_emit_only_cuda_ops(model_path, rules):
    compiled = Explainer(model_path, ROOT / "rules" / f"{rules}.rules").compiled(seed_mode=True)
    assert emitted_fallbacks(compiled.model) == []


@pytest.mark.parametrize("case", test_recurrent.CASES[::6], ids=lambda c: c.id)
def test_unrolled_recurrent_nodes_emit_only_cuda_ops(case):
    """LSTM/GRU/RNN are unrolled into primitives when read (graph/recurrent.py): one in six of
    the option × direction rows, in float32."""
    model = test_recurrent.recurrent_model(case, elem=TensorProto.FLOAT)
    assert emitted_fallbacks(Explainer(model, GRADIENT).compiled(seed_mode=True).model) == []


@pytest.mark.parametrize("row", test_contrib.ROWS, ids=lambda r: r.id)
def test_contrib_rows_emit_only_cuda_ops(row):
    """onnxruntime's contrib ops (com.microsoft and its standard-domain SimplifiedLayerNormalization)."""
    assert emitted_fallbacks(Explainer(test_contrib.build(row), GRADIENT).compiled(seed_mode=True).model) == []
