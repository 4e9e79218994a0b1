"""VJP rows of Einsum, ScatterND, ScatterElements, the normalizations (Instance, Group, RMS, LRN, Lp)
and Attention, against central finite differences (the oracle of tests/test_vjp.py: float64 on the
ONNX reference evaluator), one row per path through the VJP and per opset where the op's signature
changed; and the forms each op refuses, by name."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import as_float32, check_vjp, compile_seed, run
from test_vjp import Case, _shapes, distinct, nodes, op

from rulegraph import ModelError
from rulegraph.compile.build import SEED

#: constant operands, fixed at collection time (their own generator: other tables' draws stay as they were)
NW = np.random.default_rng(2026)


def w(*shape) -> np.ndarray:
    return NW.standard_normal(shape)


def ints(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


EINSUM = [
    op("Einsum-matmul-const-right", "Einsum", ["x", "c"], {"x": [3, 4]}, {"c": w(4, 5)}, opset=12,
       equation="ij,jk->ik"),
    op("Einsum-matmul-const-left", "Einsum", ["c", "x"], {"x": [4, 5]}, {"c": w(3, 4)}, equation="ij,jk->ik"),
    op("Einsum-batched-both-active", "Einsum", ["x", "x1"], {"x": [2, 3, 4], "x1": [2, 4, 5]},
       equation="bij,bjk->bik"),
    op("Einsum-implicit-output", "Einsum", ["x", "x1"], {"x": [3, 4], "x1": [4, 5]}, equation="ij,jk"),
    op("Einsum-spaces-transpose", "Einsum", ["x"], {"x": [3, 4, 2]}, equation="ijk -> kji"),
    op("Einsum-sum-an-axis", "Einsum", ["x"], {"x": [3, 4, 2]}, equation="ijk->ik"),
    op("Einsum-lonely-letter-with-other", "Einsum", ["x", "x1"], {"x": [3, 4], "x1": [3, 5]},
       equation="ij,ik->k"),
    op("Einsum-outer", "Einsum", ["x", "x1"], {"x": [3], "x1": [4]}, equation="i,j->ij"),
    op("Einsum-ellipsis-broadcast", "Einsum", ["x", "x1"], {"x": [2, 1, 3, 4], "x1": [1, 3, 4, 5]},
       equation="...ij,...jk->...ik"),
    op("Einsum-ellipsis-after-letter", "Einsum", ["x", "c"], {"x": [3, 2, 4]}, {"c": w(4, 5)},
       equation="b...j,jk->b...k"),
    op("Einsum-attention-scores", "Einsum", ["x", "x1"], {"x": [2, 3, 5, 4], "x1": [2, 3, 6, 4]},
       equation="bhqd,bhkd->bhqk"),
    op("Einsum-three-operands-middle-const", "Einsum", ["x", "c", "x1"], {"x": [3, 4], "x1": [5, 2]},
       {"c": w(4, 5)}, equation="ij,jk,kl->il"),
    op("Einsum-three-active", "Einsum", ["x", "x1", "x2"], {"x": [3, 4], "x1": [4], "x2": [4, 2]},
       equation="ij,j,jk->ik"),
    op("Einsum-diagonal-of-a-constant", "Einsum", ["c", "x"], {"x": [3, 4]}, {"c": w(3, 3)},
       equation="ii,ij->ij"),
    op("Einsum-opset28", "Einsum", ["x", "x1"], {"x": [2, 3, 4], "x1": [2, 4]}, opset=28,
       equation="bij,bj->bi"),
    # a repeated letter in an active operand: the cotangent written onto the diagonal
    op("Einsum-diagonal", "Einsum", ["x"], {"x": [3, 3]}, equation="ii->i"),
    op("Einsum-trace", "Einsum", ["x"], {"x": [4, 4]}, equation="ii"),
    op("Einsum-batch-diagonal-ellipsis", "Einsum", ["x"], {"x": [2, 3, 3]}, equation="...ii->...i"),
    op("Einsum-triple-diagonal", "Einsum", ["x"], {"x": [2, 2, 2]}, equation="iii->i"),
    op("Einsum-diagonal-times-active", "Einsum", ["x", "x1"], {"x": [3, 3, 2], "x1": [2, 4]},
       equation="iij,jk->ik"),
    op("Einsum-two-diagonals-broadcast-ellipsis", "Einsum", ["x", "x1"], {"x": [1, 3, 3, 2, 2], "x1": [4, 3]},
       equation="...iijj,...i->...ij"),
]

# indices with a repeat: without a reduction the runtime keeps one of the two updates, the other gets nothing
X3x4 = {"x": [3, 4]}
SCATTER = [
    op("ScatterND-opset11-both-active", "ScatterND", ["x", "idx", "x1"], {"x": [4, 3], "x1": [2, 3]},
       {"idx": ints(3, 0).reshape(2, 1)}, opset=11),
    op("ScatterND-opset13-elements-repeat", "ScatterND", ["x", "idx", "x1"], {"x": [3, 4], "x1": [3]},
       {"idx": np.array([[0, 1], [2, 3], [0, 1]])}, opset=13),
    op("ScatterND-opset16-add-repeat", "ScatterND", ["x", "idx", "x1"], {"x": [3, 4], "x1": [3]},
       {"idx": np.array([[0, 1], [2, 3], [0, 1]])}, opset=16, reduction="add"),
    op("ScatterND-opset18-add-const-data", "ScatterND", ["c", "idx", "x"], {"x": [2, 2, 4]},
       {"c": w(3, 2, 4), "idx": ints(2, 0).reshape(2, 1)}, opset=18, reduction="add"),
    op("ScatterND-opset18-const-updates", "ScatterND", ["x", "idx", "c"], X3x4,
       {"c": w(2), "idx": np.array([[1, 1], [0, 3]])}, opset=18),
    op("ScatterElements-opset11-axis1", "ScatterElements", ["x", "idx", "x1"], {"x": [3, 5], "x1": [3, 2]},
       {"idx": np.array([[0, 4], [2, 1], [3, 3]])}, opset=11, axis=1),
    op("ScatterElements-opset13-negative-indices", "ScatterElements", ["x", "idx", "x1"],
       {"x": [4, 3], "x1": [2, 3]}, {"idx": np.array([[-1, 0, 2], [1, -4, -2]])}, opset=13),
    op("ScatterElements-opset16-add-repeat", "ScatterElements", ["x", "idx", "x1"],
       {"x": [3, 5], "x1": [3, 2]}, {"idx": np.array([[0, 0], [2, 1], [4, 4]])}, opset=16, axis=1, reduction="add"),
    op("ScatterElements-opset18-add-const-updates", "ScatterElements", ["x", "idx", "c"], X3x4,
       {"c": w(2, 4), "idx": np.array([[2, 0, 1, 2], [2, 1, 1, 0]])}, opset=18, reduction="add"),
    nodes("ScatterElements-indices-computed", [
        helper.make_node("ArgMax", ["x1"], ["idx"], axis=1),
        helper.make_node("ScatterElements", ["x", "idx", "x2"], ["y"], axis=1)],
        {"x": [3, 5], "x1": [3, 4], "x2": [3, 1]}, opset=18, sample=distinct),
    # mul, max, min: a repeated index (two updates meet in one place), both operands active
    op("ScatterND-opset16-mul-repeat", "ScatterND", ["x", "idx", "x1"], {"x": [3, 4], "x1": [3]},
       {"idx": np.array([[0, 1], [2, 3], [0, 1]])}, opset=16, reduction="mul"),
    op("ScatterElements-opset18-mul-repeat-axis1", "ScatterElements", ["x", "idx", "x1"],
       {"x": [3, 5], "x1": [3, 2]}, {"idx": np.array([[0, 0], [2, 1], [4, 4]])}, opset=18, axis=1,
       reduction="mul"),
    # zero factors: an update times 0 where it meets another update (the others' product without
    # division) and where it is alone
    nodes("ScatterND-mul-zero-factors", [
        helper.make_node("Mul", ["x1", "m"], ["u"]),
        helper.make_node("ScatterND", ["x", "idx", "u"], ["y"], reduction="mul")],
        {"x": [3, 4], "x1": [4]}, {"idx": np.array([[0, 1], [2, 3], [0, 1], [1, 0]]),
                                   "m": np.array([1.0, 1.0, 0.0, 0.0])}, opset=18),
    op("ScatterND-opset18-max-repeat", "ScatterND", ["x", "idx", "x1"], {"x": [4, 3], "x1": [3, 3]},
       {"idx": ints(1, 3, 1).reshape(3, 1)}, opset=18, reduction="max", sample=distinct),
    op("ScatterND-opset18-min-const-data", "ScatterND", ["c", "idx", "x"], {"x": [3, 3]},
       {"c": w(4, 3), "idx": ints(1, 3, 1).reshape(3, 1)}, opset=18, reduction="min", sample=distinct),
    op("ScatterElements-opset18-max-repeat", "ScatterElements", ["x", "idx", "x1"],
       {"x": [3, 5], "x1": [3, 2]}, {"idx": np.array([[0, 0], [2, 1], [4, 4]])}, opset=18, axis=1,
       reduction="max", sample=distinct),
    op("ScatterElements-opset18-min-const-updates", "ScatterElements", ["x", "idx", "c"], X3x4,
       {"c": w(2, 4), "idx": np.array([[2, 0, 1, 2], [2, 1, 1, 0]])}, opset=18, reduction="min"),
]

def op_rows(op_type, args, inputs, consts, opset, **attrs) -> onnx.ModelProto:
    """A one-node float64 model whose output shape is given (``shaped``), not inferred: onnx infers
    no shapes through GroupNormalization."""
    node = helper.make_node(op_type, args, ["y"], name=f"the_{op_type}", **attrs)
    graph = helper.make_graph([node], "test", [helper.make_tensor_value_info(k, TensorProto.DOUBLE, v)
                                               for k, v in inputs.items()],
                              [], [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def nodes_model(node_list, inputs, consts, opset) -> onnx.ModelProto:
    """A few-node float64 model, its output shape given by ``shaped``."""
    graph = helper.make_graph(node_list, "test", [helper.make_tensor_value_info(k, TensorProto.DOUBLE, v)
                                                  for k, v in inputs.items()],
                              [], [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def shaped(model: onnx.ModelProto, id: str, shape: list[int]) -> Case:
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.DOUBLE, shape))
    return Case(id, model)


NORMS = [
    op("InstanceNormalization-opset6", "InstanceNormalization", ["x", "s", "b"], {"x": [2, 3, 4, 5]},
       {"s": w(3), "b": w(3)}, opset=6, epsilon=1e-3),
    op("InstanceNormalization-1d", "InstanceNormalization", ["x", "s", "b"], {"x": [2, 3, 7]},
       {"s": w(3), "b": w(3)}),
    op("InstanceNormalization-opset22", "InstanceNormalization", ["x", "s", "b"], {"x": [1, 2, 3, 3]},
       {"s": w(2), "b": w(2)}, opset=22),
    shaped(op_rows("GroupNormalization", ["x", "s", "b"], {"x": [2, 6, 3, 2]}, {"s": w(3), "b": w(3)},
                   opset=18, num_groups=3, epsilon=1e-3), "GroupNormalization-opset18-per-group", [2, 6, 3, 2]),
    shaped(op_rows("GroupNormalization", ["x", "s", "b"], {"x": [2, 6, 3, 2]}, {"s": w(6), "b": w(6)},
                   opset=21, num_groups=2), "GroupNormalization-opset21-per-channel", [2, 6, 3, 2]),
    shaped(op_rows("GroupNormalization", ["x", "s", "b"], {"x": [2, 4, 5]}, {"s": w(4), "b": w(4)}, opset=21,
                   num_groups=1), "GroupNormalization-opset21-rank3-one-group", [2, 4, 5]),
    shaped(op_rows("GroupNormalization", ["x", "s", "b"], {"x": [3, 8]}, {"s": w(8), "b": w(8)}, opset=21,
                   num_groups=2, stash_type=1), "GroupNormalization-opset21-rank2-stash", [3, 8]),
    # onnx infers no shape through GroupNormalization: the reader gives it its input's (ReduceMean
    # needs the rank)
    shaped(nodes_model([helper.make_node("GroupNormalization", ["x", "s", "b"], ["h"], num_groups=2),
                        helper.make_node("ReduceMean", ["h", "axes"], ["y"], keepdims=0)],
                       {"x": [2, 4, 3, 2]}, {"s": w(4), "b": w(4), "axes": ints(2, 3)}, opset=21),
           "GroupNormalization-then-ReduceMean", [2, 4]),
    op("RMSNormalization-last-axis", "RMSNormalization", ["x", "s"], {"x": [2, 3, 5]}, {"s": w(5)}, opset=23),
    op("RMSNormalization-axis1-broadcast-scale", "RMSNormalization", ["x", "s"], {"x": [2, 3, 4]},
       {"s": w(1, 4)}, opset=23, axis=1, epsilon=1e-3),
    op("RMSNormalization-opset24", "RMSNormalization", ["x", "s"], {"x": [2, 4]}, {"s": w(4)}, opset=24),
    op("LRN-size3", "LRN", ["x"], {"x": [2, 5, 3, 2]}, opset=12, size=3, alpha=0.5, beta=0.75, bias=1.5),
    op("LRN-size4-even", "LRN", ["x"], {"x": [2, 6, 3]}, opset=13, size=4, alpha=0.3, beta=0.6),
    op("LRN-size1", "LRN", ["x"], {"x": [1, 3, 2, 2]}, opset=13, size=1, alpha=0.2),
    op("LpNormalization-p2-last", "LpNormalization", ["x"], {"x": [2, 3, 4]}, opset=17, axis=-1, p=2),
    op("LpNormalization-p2-axis1", "LpNormalization", ["x"], {"x": [2, 3, 4]}, opset=17, axis=1, p=2),
    op("LpNormalization-p1-axis0", "LpNormalization", ["x"], {"x": [3, 4]}, opset=17, axis=0, p=1),
]

QKV4 = {"x": [2, 2, 3, 4], "x1": [2, 2, 5, 4], "x2": [2, 2, 5, 3]}   # Q, K, V: [B, H, S, d]
#: a boolean mask with one query row that sees no key (its output row is 0)
ROW_BLIND = np.array([[True, False, True, True, False], [False] * 5, [True] * 5])
ATTENTION = [
    op("Attention-4d", "Attention", ["x", "x1", "x2"], QKV4, opset=23),
    op("Attention-4d-causal-scale", "Attention", ["x", "x1", "x2"], {"x": [1, 2, 4, 3], "x1": [1, 2, 4, 3],
       "x2": [1, 2, 4, 3]}, opset=23, is_causal=1, scale=0.7),
    op("Attention-3d-gqa-softcap", "Attention", ["x", "x1", "x2"],
       {"x": [2, 3, 8], "x1": [2, 5, 4], "x2": [2, 5, 6]}, opset=23, q_num_heads=4, kv_num_heads=2, softcap=2.0),
    op("Attention-4d-gqa-bool-mask", "Attention", ["x", "x1", "x2", "m"],
       {"x": [1, 4, 3, 4], "x1": [1, 2, 5, 4], "x2": [1, 2, 5, 4]}, {"m": ROW_BLIND}, opset=23),
    op("Attention-float-mask-active", "Attention", ["x", "x1", "x2", "x3"], {**QKV4, "x3": [3, 5]}, opset=23),
    op("Attention-float-mask-const-causal", "Attention", ["x", "x1", "x2", "m"], {"x": [1, 2, 3, 4],
       "x1": [1, 2, 3, 4], "x2": [1, 2, 3, 2]}, {"m": w(1, 2, 3, 3)}, opset=23, is_causal=1),
    nodes("Attention-past-present-causal", [
        helper.make_node("Attention", ["x", "x1", "x2", "", "x3", "x4"], ["a", "pk", "pv"], is_causal=1),
        helper.make_node("Flatten", ["a"], ["fa"]), helper.make_node("Flatten", ["pk"], ["fk"]),
        helper.make_node("Flatten", ["pv"], ["fv"]),
        helper.make_node("Concat", ["fa", "fk", "fv"], ["y"], axis=1)],
        {"x": [2, 2, 2, 3], "x1": [2, 2, 2, 3], "x2": [2, 2, 2, 3], "x3": [2, 2, 3, 3], "x4": [2, 2, 3, 3]},
        opset=23),
    nodes("Attention-3d-past-const", [
        helper.make_node("Attention", ["x", "x1", "x2", "", "pk", "pv"], ["y"], q_num_heads=2,
                         kv_num_heads=1)],
        {"x": [1, 2, 6], "x1": [1, 2, 3], "x2": [1, 2, 3]}, {"pk": w(1, 1, 3, 3), "pv": w(1, 1, 3, 3)},
        opset=23),
    op("Attention-opset24", "Attention", ["x", "x1", "x2"], QKV4, opset=24, is_causal=1),
    op("Attention-opset25", "Attention", ["x", "x1", "x2"], QKV4, opset=25, softcap=3.0),
    # sliding windows (opset 25), nonpad_kv_seqlen (opset 24), masks shorter than the keys, and the
    # qk_matmul_output output explained in each of its modes
    op("Attention-window-left-causal", "Attention", ["x", "x1", "x2"], QKV4, opset=25, is_causal=1,
       left_window_size=1),
    op("Attention-window-bidirectional", "Attention", ["x", "x1", "x2"], QKV4, opset=25, left_window_size=1,
       right_window_size=2),
    op("Attention-3d-window-gqa", "Attention", ["x", "x1", "x2"], {"x": [2, 4, 8], "x1": [2, 4, 4],
       "x2": [2, 4, 6]}, opset=25, q_num_heads=4, kv_num_heads=2, right_window_size=0, left_window_size=2),
    nodes("Attention-window-past-causal", [
        helper.make_node("Attention", ["x", "x1", "x2", "", "pk", "pv"], ["y"], is_causal=1,
                         left_window_size=2)],
        {"x": [1, 2, 2, 3], "x1": [1, 2, 2, 3], "x2": [1, 2, 2, 3]},
        {"pk": w(1, 2, 3, 3), "pv": w(1, 2, 3, 3)},
        opset=25),
    op("Attention-nonpad-causal-offsets", "Attention", ["x", "x1", "x2", "", "", "", "n"], QKV4,
       {"n": ints(4, 2)}, opset=24, is_causal=1),
    op("Attention-nonpad-padding-only", "Attention", ["x", "x1", "x2", "", "", "", "n"], QKV4,
       {"n": ints(3, 5)}, opset=24),
    op("Attention-nonpad-window-short-float-mask", "Attention", ["x", "x1", "x2", "x3", "", "", "n"],
       {**QKV4, "x3": [2, 1, 3, 4]}, {"n": ints(4, 3)}, opset=25, is_causal=1, left_window_size=1),
    # onnxruntime takes a mask shorter than the keys only with nonpad_kv_seqlen
    op("Attention-nonpad-short-bool-mask", "Attention", ["x", "x1", "x2", "m", "", "", "n"], QKV4,
       {"m": np.array([[True, False, True], [False, True, True], [True, True, True]]), "n": ints(3, 2)},
       opset=24),
    # mode 0 without softcap: ONNX's reference evaluator returns the capped scores there, onnxruntime
    # and the operator's text the raw ones (what the VJP differentiates)
    *[nodes(f"Attention-qk-output-mode{mode}", [
        helper.make_node("Attention", ["x", "x1", "x2", "x3"], ["a", "", "", "qk"], softcap=cap,
                         qk_matmul_output_mode=mode),
        helper.make_node("Flatten", ["a"], ["fa"]), helper.make_node("Flatten", ["qk"], ["fq"]),
        helper.make_node("Concat", ["fa", "fq"], ["y"], axis=1)], {**QKV4, "x3": [3, 5]}, opset=24)
      for mode, cap in ((0, 0.0), (1, 2.5), (2, 2.5), (3, 2.5))],
    nodes("Attention-qk-output-alone-causal", [
        helper.make_node("Attention", ["x", "x1", "x2"], ["a", "", "", "y"], is_causal=1,
                         qk_matmul_output_mode=3)],
        QKV4, opset=23),
]

CASES = EINSUM + SCATTER + NORMS + ATTENTION


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_vjp_matches_finite_differences(case: Case):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    feeds = case.sample(rng, _shapes(case.model))
    check_vjp(case.model, feeds, rng)


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# refused by name: (row, what the message says) ------------------------------------------------------

REFUSED = [
    (op("Einsum-ellipsis-summed-out", "Einsum", ["x", "c"], {"x": [2, 3, 4]}, {"c": w(4)},
        equation="...j,j->"), "sums out the ellipsis"),
    (op("InstanceNormalization-activation-scale", "InstanceNormalization", ["x", "x1", "b"],
        {"x": [2, 3, 4], "x1": [3]}, {"b": w(3)}), "scale or bias computed from the input"),
]


@pytest.mark.parametrize("case, why", [pytest.param(c, why, id=c.id) for c, why in REFUSED])
def test_refused_by_name(case: Case, why: str):
    node = case.model.graph.node[0]
    with pytest.raises(ModelError, match=f"'{node.name}' \\({node.op_type}\\).*{why}"):
        compile_seed(case.model)


# the same compiled VJPs on onnxruntime (float64) against the reference evaluator -----------------

#: op types onnxruntime runs in float32 only: their rows run there in float32, compared at float32 precision
FLOAT32_ONLY = {"InstanceNormalization", "LRN", "GroupNormalization"}


#: rows onnxruntime refuses, with the reason
NOT_ON_ORT = {"LRN-size4-even": "onnxruntime's LRN takes odd sizes only"}


@pytest.mark.parametrize("case", [c.param() for c in CASES if c.id not in NOT_ON_ORT])
def test_vjp_on_onnxruntime_equals_the_reference(case: Case):
    import onnxruntime as ort

    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    feeds = case.sample(rng, _shapes(case.model))
    compiled = compile_seed(case.model)
    y = run(case.model, feeds, ["y"])["y"]
    feeds = {**feeds, SEED: rng.standard_normal(y.shape)}
    names = list(compiled.saliency.values())
    want = run(compiled.model, feeds, names)
    single = case.model.graph.node[-1].op_type in FLOAT32_ONLY
    model = compile_seed(as_float32(case.model)).model if single else compiled.model
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v.astype(np.float32) if single and v.dtype == np.float64 else v for k, v in feeds.items()}
    for name, got in zip(names, session.run(names, feeds)):
        scale = np.max(np.abs(want[name]))
        np.testing.assert_allclose(got, want[name], rtol=0, atol=(1e-5 if single else 1e-12) * scale)


# Scatter reductions at zeros and ties: a closed-form numpy replica (finite differences do not reach
# them: a tie is a kink, an exact zero factor is not drawn) ------------------------------------------

def _replica(data, idx, updates, g, reduction):
    """(a(data), a(updates)) of 1-D ScatterElements by the definition: each place's factors (or
    candidates) ``[data_k, u_i for i in order]``; mul: each factor gets ``g_k`` times the product of
    the others; max/min: the first candidate equal to ``y_k`` gets ``g_k``."""
    d_data, d_updates = np.zeros_like(data), np.zeros_like(updates)
    for k in range(data.size):
        mine = [i for i in range(idx.size) if idx[i] == k]
        values = [data[k]] + [updates[i] for i in mine]
        if reduction == "mul":
            others = [np.prod(values[:j] + values[j + 1:]) for j in range(len(values))]
            shares = [g[k] * o for o in others]
        else:
            best = max(values) if reduction == "max" else min(values)
            first = values.index(best)
            shares = [g[k] if j == first else 0.0 for j in range(len(values))]
        d_data[k] = shares[0]
        for j, i in enumerate(mine):
            d_updates[i] = shares[j + 1]
    return d_data, d_updates


AT_ZEROS_AND_TIES = [
    # mul: a zero update alone with data, a zero update next to another, two zeros in one place, data 0
    ("mul", [2.0, 3.0, 0.0, 5.0, 1.5], [0, 1, 1, 2, 2, 3, 3, 4],
     [0.0, 0.0, 4.0, 0.0, 0.0, 2.0, -1.0, 3.0]),
    # max: data ties an update (data wins), two updates tie (the first wins), a tie below the max
    ("max", [2.0, 3.0, 1.0, 5.0], [0, 1, 1, 2, 2, 3], [2.0, 4.0, 4.0, 1.0, 0.5, 6.0]),
    ("min", [2.0, 3.0, 1.0, 5.0], [0, 1, 1, 2, 2, 3], [2.0, 1.0, 1.0, 1.0, 0.5, 6.0]),
]


@pytest.mark.parametrize("reduction, data, idx, updates", AT_ZEROS_AND_TIES,
                         ids=[r[0] for r in AT_ZEROS_AND_TIES])
def test_scatter_reduction_at_zeros_and_ties(reduction, data, idx, updates):
    data, updates, idx = np.array(data), np.array(updates), np.array(idx, dtype=np.int64)
    model = op(f"ScatterElements-{reduction}", "ScatterElements", ["x", "idx", "x1"],
               {"x": [data.size], "x1": [updates.size]}, {"idx": idx}, opset=18, reduction=reduction).model
    compiled = compile_seed(model)
    g = np.random.default_rng(zlib.crc32(reduction.encode())).standard_normal(data.size)
    got = run(compiled.model, {"x": data, "x1": updates, SEED: g}, list(compiled.saliency.values()))
    want = _replica(data, idx, updates, g, reduction)
    for x, expected in zip(("x", "x1"), want):
        np.testing.assert_allclose(got[compiled.saliency[x]], expected, rtol=1e-12, atol=0)
