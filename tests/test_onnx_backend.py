"""The ONNX project's own backend node tests as a peer suite for the VJP table.

Every case of ``onnx.backend.test.case.node.collect_testcases`` (built in memory, nothing is
downloaded) whose model is one node of an op type in rulegraph's op table (read from the table, so
ops added later join by themselves) is checked on its own inputs: the explainer compiled with the
gradient rule in seed mode gives ``v = J(x)ᵀ s``, and ``Σ <v_x, d_x>`` is compared with the central
difference ``<s, (f(x + h d) − f(x − h d)) / 2h>`` along one random direction ``d`` that moves every
active input at once (``tests/oracles.py`` does the same on the reference evaluator). Both the
explainer and the forward run on onnxruntime.

* Runnable: onnxruntime runs the case's model (in float64 or float32, below). A case without a
  non-empty float input and a non-empty float output (integer ops, casts from 8-bit floats, empty
  tensors) has no number to check and is not counted.
* Active inputs: every float input, where the op allows it (rulegraph refuses e.g. a Conv whose
  weight is an activation); otherwise the float inputs after the first become constants. Integer
  and bool inputs are always constants (initializers). Input elements that are not finite (Cast's
  inf/NaN cases) stay fixed, output elements that are not finite get no seed.
* Precision: the model is converted to float64 (every float tensor type, and the float types named
  by Cast's ``to`` and by ``PRECISION_ATTRIBUTES``) where onnxruntime has
  double kernels for the op (and they compute in double: ``ROUNDS_TO_FLOAT32``); otherwise to
  float32, see ``FLOAT32`` for the step and tolerance.
* Several float outputs (Split) are all seeded: flattened and concatenated into one start tensor;
  where rulegraph refuses that (LayerNormalization's Mean and InvStdDev), the first output alone.
* Kinks: a case whose one-sided differences disagree by more than ``KINK`` of the scale (Relu at 0,
  ties of Max/MaxPool, Abs at 0, Clip at its bounds) sits on a kink; it is counted and listed as
  such, never checked with a looser bound. A case that would be a mismatch is a kink too where one
  output element's one-sided differences disagree by ``KINK`` of that element's scale (a tie at a
  few elements cancels in the sums). A case whose forward fails or is not finite next to its
  inputs sits on the edge of the op's domain ("domain edge"), also listed.

``EXCEPTIONS`` lists every runnable case that does not pass, with its reason; the test asserts it is
exact. ``python tests/test_onnx_backend.py --regenerate`` prints the table as it is now.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from oracles import GRADIENT

from rulegraph.backward import ops as G
from rulegraph.compile.build import compile_explainer
from rulegraph.errors import InternalError, RulegraphError

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Precision:
    """The element type a case runs in, the finite-difference step ``h`` (times the cube root of the
    largest |input|, at least 1: rounding the moved input costs u·|x|/h) and the tolerance ``rtol``
    on ``|<v, d> − <s, FD>|`` relative to ``Σ|s ⊙ FD| + Σ|v ⊙ d|`` (a scale cancellation cannot
    shrink)."""

    elem: int
    h: float
    rtol: float


#: float64: the step and tolerance of tests/oracles.py's check_vjp
FLOAT64 = Precision(TensorProto.DOUBLE, 1e-6, 1e-6)
#: float32, unit roundoff u = 2⁻²⁴: the central difference errs by ≈ u·|f|/h (rounding of f) plus
#: h²·|f'''|/6 (truncation); h = u^(1/3) ≈ 2.6e-3 balances both at ≈ u^(2/3) ≈ 6.9e-6 of the scale.
#: The VJP's own float32 sums and onnxruntime's float32 kernels (fast exp/tanh approximations) add
#: a few ulps per term: rtol = 64·u^(2/3) ≈ 4.4e-4.
U32 = 2.0 ** -24
FLOAT32 = Precision(TensorProto.FLOAT, U32 ** (1 / 3), 64 * U32 ** (2 / 3))
#: ops whose onnxruntime double kernel computes in float32 (measured: Shrink's slope at 2.0 comes
#: out 0.954 with h = 1e-6, a float32 rounding): run in float32
ROUNDS_TO_FLOAT32 = {"Shrink"}
#: one-sided differences that disagree by more than this share of their scale mark a kink
KINK = 1e-2

PASS, KINK_CASE, EDGE, MISMATCH, REFUSED, INTERNAL, NOT_FINITE = (
    "pass", "kink", "domain edge", "mismatch", "refused", "internal", "not finite")


# the cases ----------------------------------------------------------------------------------------


@functools.cache
def backend_cases() -> dict:
    """name -> onnx TestCase, for every one-node case whose op type is in rulegraph's op table."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return {c.name: c for c in cases
            if len(c.model.graph.node) == 1 and c.model.graph.node[0].domain in ("", "ai.onnx")
            and c.model.graph.node[0].op_type in G.OPS}


def _retype(model: onnx.ModelProto, elem: int) -> onnx.ModelProto:
    """A copy of ``model`` with every float tensor type (inputs, outputs, value infos, Cast's and
    CastLike's target) turned into ``elem``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type in FLOAT_TYPES:
            v.type.tensor_type.elem_type = elem
    for node in g.node:
        _set_precision_attributes(node, model.opset_import, elem)
        for a in node.attribute:
            if a.name == "to" and a.i in FLOAT_TYPES:
                a.i = elem
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in FLOAT_TYPES:
                value = numpy_helper.to_array(a.t).astype(helper.tensor_dtype_to_np_dtype(elem))
                a.t.CopyFrom(numpy_helper.from_array(value, a.t.name))
    return model


#: attributes that name the float type an op computes a stage in, FLOAT by default: onnxruntime
#: honours them, so a model converted to float64 with them left at FLOAT rounds to float32 inside
#: (GroupNormalization's stash_type: its mean and variance, 5e-8 in Y; Attention's softmax_precision:
#: its softmax, 5e-8 in Y), and the float64 central difference (h = 1e-6) reads that rounding as a
#: kink or a mismatch of 1e-4 of the scale. They follow the model's type, set where left at default.
PRECISION_ATTRIBUTES = ("stash_type", "softmax_precision")


def _set_precision_attributes(node: onnx.NodeProto, opsets, elem: int) -> None:
    version = next((o.version for o in opsets if o.domain in ("", "ai.onnx")), None)
    try:
        schema = onnx.defs.get_schema(node.op_type, version)
    except onnx.defs.SchemaError:
        return
    given = {a.name: a for a in node.attribute}
    for name in PRECISION_ATTRIBUTES:
        if name in given:
            if given[name].i in FLOAT_TYPES:
                given[name].i = elem
        elif name in schema.attributes and schema.attributes[name].default_value.i in FLOAT_TYPES:
            node.attribute.append(helper.make_attribute(name, elem))


def _is_float(value: np.ndarray) -> bool:
    return value.dtype.kind == "f" or value.dtype.name == "bfloat16"


def _array(value) -> np.ndarray | None:
    """A case's input as an array; None for sequences, optionals and strings."""
    if isinstance(value, onnx.TensorProto):
        value = numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) or not (value.dtype.kind in "fiub" or _is_float(value)):
        return None
    return value


@dataclass
class Prepared:
    """One case made ready: the model (constants as initializers, one float start output), its active
    feeds, and the precision it runs in."""

    model: onnx.ModelProto
    feeds: dict
    precision: Precision


def prepare(case, precision: Precision, all_inputs: bool = True, all_outputs: bool = True) -> Prepared | None:
    """The case's model in ``precision``: integer/bool inputs (and, unless ``all_inputs``, the float
    inputs after the first) as initializers; the first float output the start, or with
    ``all_outputs`` every float output, each flattened, concatenated into one start. Empty tensors
    have no number to check: None when the case has no non-empty float input or output."""
    model = _retype(case.model, precision.elem)
    dtype = helper.tensor_dtype_to_np_dtype(precision.elem)
    g = model.graph
    values = [_array(v) for v in case.data_sets[0][0]]
    if any(v is None for v in values):
        return None
    inputs = list(g.input)
    feeds, keep = {}, []
    for info, value in zip(inputs, values):
        if _is_float(value) and value.size and (all_inputs or not feeds):
            feeds[info.name] = value.astype(dtype)
            keep.append(info)
        else:
            value = value.astype(dtype) if _is_float(value) else value
            g.initializer.append(numpy_helper.from_array(value, info.name))
    outputs = [(o, _array(v)) for o, v in zip(g.output, case.data_sets[0][1])
               if o.type.tensor_type.elem_type == precision.elem and _array(v) is not None and _array(v).size]
    if not feeds or not outputs:
        return None
    g.ClearField("input")
    g.input.extend(keep)
    if not all_outputs or len(outputs) == 1:
        g.ClearField("output")
        g.output.append(outputs[0][0])
    else:   # sizes from the case's expected outputs: a reshape to [-1] of an empty tensor has no shape
        flat = []
        for o, value in outputs:
            flat.append(f"{o.name}__flat")
            g.initializer.append(numpy_helper.from_array(np.array([value.size], np.int64), f"{o.name}__size"))
            g.node.append(helper.make_node("Reshape", [o.name, f"{o.name}__size"], [flat[-1]]))
        g.node.append(helper.make_node("Concat", flat, ["__outputs"], axis=0))
        g.ClearField("output")
        size = sum(v.size for _, v in outputs)
        g.output.append(helper.make_tensor_value_info("__outputs", precision.elem, [size]))
    return Prepared(model, feeds, precision)


# one check ----------------------------------------------------------------------------------------


def _session(model: onnx.ModelProto):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = options.inter_op_num_threads = 1   # tiny models: no thread pools
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def _running(model: onnx.ModelProto, feeds: dict):
    """An onnxruntime session of ``model`` that has run on ``feeds``, or None where it cannot."""
    try:
        session = _session(model)
        session.run(None, feeds)
        return session
    except Exception:  # noqa: BLE001 (onnxruntime raises its own classes for a missing kernel)
        return None


@dataclass
class Outcome:
    name: str
    status: str
    note: str = ""
    precision: str = ""


def check_case(name: str, case) -> Outcome | None:
    """The outcome of one case; None when onnxruntime cannot run it (or it has no float path)."""
    first = prepare(case, FLOAT64)
    if first is None:
        return None
    rounds = first.model.graph.node[0].op_type in ROUNDS_TO_FLOAT32
    session64 = None if rounds else _running(first.model, first.feeds)
    precision = FLOAT64 if session64 is not None else FLOAT32
    prepared, error = None, None
    for all_outputs, all_inputs in ((True, True), (True, False), (False, True), (False, False)):
        reuse = session64 is not None and all_outputs and all_inputs
        p = first if reuse else prepare(case, precision, all_inputs, all_outputs)
        forward = session64 if reuse else p and _running(p.model, p.feeds)
        if p is None or forward is None:
            return None
        try:
            compiled = compile_explainer(G.load(p.model), GRADIENT, seed_mode=True)
        except InternalError as e:
            return Outcome(name, INTERNAL, _first_line(e), _label(precision))
        except RulegraphError as e:
            error = error or e
            continue
        prepared = p
        break
    if prepared is None:
        return Outcome(name, REFUSED, _first_line(error), _label(precision))
    return _compare(name, prepared, compiled, forward)


def _short(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [""]
    return lines[0][:150]


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {_short(e)}"


def _label(p: Precision) -> str:
    return "float64" if p is FLOAT64 else "float32"


def _compare(name: str, p: Prepared, compiled, forward) -> Outcome:
    """Compare ``Σ <v_x, d_x>`` with ``<s, FD>``. Input elements that are not finite (Cast's inf and
    NaN cases) stay fixed (d = 0 there) and output elements that are not finite get no seed."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    dtype = helper.tensor_dtype_to_np_dtype(p.precision.elem)
    label = _label(p.precision)
    out = p.model.graph.output[0].name
    y = forward.run([out], p.feeds)[0].astype(np.float64)
    finite_y = np.isfinite(y)
    if y.size and not finite_y.any():
        return Outcome(name, EDGE, "the forward is not finite at the case's inputs", label)
    seed = np.where(finite_y, rng.standard_normal(y.shape), 0.0)
    direction = {k: np.where(np.isfinite(v), rng.standard_normal(v.shape), 0.0) for k, v in p.feeds.items()}
    try:
        explainer = _session(compiled.model)
        names = [compiled.saliency[x] for x in p.feeds]
        got = explainer.run(names, {**p.feeds, compiled.seed_input: seed.astype(dtype)})
    except Exception as e:  # noqa: BLE001 (onnxruntime's own classes)
        return Outcome(name, INTERNAL, f"onnxruntime fails on the explainer: {_short(e)}", label)
    vjps = {k: np.where(direction[k] != 0, v.astype(np.float64), 0.0) for k, v in zip(p.feeds, got)}
    if not all(np.all(np.isfinite(v)) for v in vjps.values()):
        return Outcome(name, NOT_FINITE, "the VJP has non-finite values", label)
    size = max(1.0, max(float(np.max(np.abs(np.where(np.isfinite(v), v, 0)), initial=0.0))
                        for v in p.feeds.values()))
    h = p.precision.h * size ** (1 / 3)

    def f(t):
        moved = {k: np.asarray(v.astype(np.float64) + t * direction[k]).astype(dtype)
                 for k, v in p.feeds.items()}
        return np.where(finite_y, forward.run([out], moved)[0].astype(np.float64), 0.0)

    try:
        plus, minus, here = f(h), f(-h), np.where(finite_y, y, 0.0)
    except Exception as e:  # noqa: BLE001
        return Outcome(name, EDGE, f"the forward fails next to the case's inputs: {_short(e)}", label)
    if not (np.all(np.isfinite(plus)) and np.all(np.isfinite(minus))):
        return Outcome(name, EDGE, "the forward is not finite next to the case's inputs", label)
    fd = (plus - minus) / (2 * h)
    lhs = sum(float(np.sum(vjps[k] * direction[k])) for k in p.feeds)
    rhs = float(np.sum(seed * fd))
    scale = float(np.sum(np.abs(seed * fd))) + sum(float(np.sum(np.abs(vjps[k] * direction[k])))
                                                   for k in p.feeds)
    right, left = float(np.sum(seed * (plus - here))) / h, float(np.sum(seed * (here - minus))) / h
    if abs(right - left) > KINK * max(scale, 1e-12):
        return Outcome(name, KINK_CASE, f"one-sided differences {left:.4g} and {right:.4g}", label)
    if abs(lhs - rhs) > p.precision.rtol * max(scale, 1e-12):
        # ties at a few elements can cancel in the sums above (ScatterND min, data tied to an
        # update in integers): a mismatch where one element's one-sided differences disagree by
        # KINK of that element's own scale (above the rounding floor) sits on a kink too
        right_k, left_k = seed * (plus - here) / h, seed * (here - minus) / h
        floor = p.precision.rtol * max(scale, 1e-12)
        kinked = np.abs(right_k - left_k) > KINK * (np.abs(right_k) + np.abs(left_k)) + floor
        if np.any(kinked):
            k = int(np.argmax(np.where(kinked, np.abs(right_k - left_k), -1.0)))
            return Outcome(name, KINK_CASE, f"one-sided differences {left_k.flat[k]:.4g} and "
                           f"{right_k.flat[k]:.4g} at output element {k}", label)
        return Outcome(name, MISMATCH, f"<v, d> = {lhs:.6g}, <s, FD> = {rhs:.6g} (scale {scale:.3g})", label)
    return Outcome(name, PASS, "", label)


@functools.cache
def outcomes() -> dict[str, Outcome]:
    """name -> outcome of every runnable case."""
    found = {}
    for name, case in sorted(backend_cases().items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = check_case(name, case)
        if o is not None:
            found[name] = o
    return found


#: every runnable case that does not pass: name -> (status, why); ``--regenerate`` prints it as it is now
EXCEPTIONS = {
    # x = 1 is the end of Acosh's domain: its slope 1/√(x² − 1) is infinite there
    "test_acosh_example": ("not finite", "the VJP has non-finite values"),
    # x up to 0.988 (float32: no double kernel): the step crosses toward the pole at 1
    "test_atanh": ("kink", "one-sided differences 29.6 and 41.65 at output element 52"),
    "test_batchnorm_epsilon_training_mode": ("refused", "BatchNormalization in training mode; export..."),
    "test_batchnorm_example_training_mode": ("refused", "BatchNormalization in training mode; export..."),
    "test_dft_irfft": ("refused", "an inverse onesided DFT (irfft) is not supported"),
    "test_dft_irfft_opset19": ("refused", "an inverse onesided DFT (irfft) is not supported"),
    "test_elu_example": ("kink", "one-sided differences 1.901 and 1.611"),
    # x = 2 sits on a jump of Floor
    "test_floor_example": ("kink", "one-sided differences -3.995e+05 and 0"),
    # two values of one row 0.0014 apart (float32: no double kernel): the step swaps the maximum
    "test_hardmax_axis_1": ("kink", "one-sided differences 0 and -561.9"),
    # x = [3, 3, 3, 1]: a tie of the maximum, where Hardmax jumps
    "test_hardmax_one_hot": ("kink", "one-sided differences 216.4 and -491.6"),
    "test_l1normalization_axis_last": ("kink", "one-sided differences -0.07843 and 0.09327"),
    "test_l2normalization_axis_0": ("not finite", "the VJP has non-finite values"),
    "test_leakyrelu_example": ("kink", "one-sided differences -2.031 and -0.1942"),
    "test_maxpool_3d_dilations": ("kink", "one-sided differences 5.06 and 1.076"),
    "test_maxpool_3d_dilations_use_ref_impl": ("kink", "one-sided differences -2.39 and -1.574"),
    # a divisor 0 or an infinite dividend: the forward is NaN there, and so is −⌊a/b⌋
    "test_mod_float_edge_cases_fmod_0_float16": ("not finite", "the VJP has non-finite values"),
    # a divisor 0 or an infinite dividend: the forward is NaN there, and so is −⌊a/b⌋
    "test_mod_float_edge_cases_fmod_0_float32": ("not finite", "the VJP has non-finite values"),
    # a divisor 0 or an infinite dividend: the forward is NaN there, and so is −⌊a/b⌋
    "test_mod_float_edge_cases_fmod_0_float64": ("not finite", "the VJP has non-finite values"),
    "test_pow": ("domain edge", "the forward is not finite next to the case's inputs"),
    "test_reduce_min_default_axes_keepdims_example": ("kink", "one-sided differences 0.7176 and -0.8342"),
    "test_resize_downsample_sizes_nearest_not_larger": ("refused", "keep_aspect_ratio_policy..."),
    "test_resize_downsample_sizes_nearest_not_smaller": ("refused", "keep_aspect_ratio_policy..."),
    "test_resize_upsample_sizes_nearest_not_larger": ("refused", "keep_aspect_ratio_policy..."),
    "test_resize_upsample_sizes_nearest_not_smaller": ("refused", "keep_aspect_ratio_policy..."),
    # x = 0.5, 1.5, 2.5, -1.5: on jumps of Round
    "test_round": ("kink", "one-sided differences 4.055e+05 and 5.351e+05"),
    "test_scatternd_max": ("kink", "one-sided differences -8.283 and -7.221"),
    "test_scatternd_min": ("kink", "one-sided differences 1.307 and 0.5838 at output element 12"),
    "test_selu_example": ("kink", "one-sided differences -5.404 and -5.525"),
    # x = 0 sits on Sign's jump, whose one-sided differences agree (both 1/h)
    "test_sign": ("mismatch", "<v, d> = 0, <s, FD> = 172892 (scale 1.73e+05)"),
    # x = 1.53 (float32: no double kernel) is 0.04 from Tan's pole at π/2
    "test_tan": ("kink", "one-sided differences -877.4 and -1692"),
    "test_thresholdedrelu_example": ("kink", "one-sided differences -0.7367 and 10.54"),
    "test_training_dropout": ("refused", "Dropout in training mode drops random elements; export the..."),
    "test_training_dropout_default": ("refused", "Dropout in training mode drops random elements;..."),
    "test_training_dropout_default_mask": ("refused", "Dropout in training mode drops random elements;..."),
    "test_training_dropout_mask": ("refused", "Dropout in training mode drops random elements; export..."),
}


def test_exceptions_are_exact():
    """A case that starts passing, or a new case that does not pass, changes the table."""
    found = {n: o.status for n, o in outcomes().items() if o.status != PASS}
    assert found == {n: status for n, (status, _) in EXCEPTIONS.items()}, (
        "the table EXCEPTIONS is out of date: python tests/test_onnx_backend.py --regenerate")


def test_pass_share():
    found = outcomes()
    passed = sum(o.status == PASS for o in found.values())
    assert len(found) >= 400, f"only {len(found)} runnable backend cases: the collection changed"
    assert passed >= 0.95 * len(found), f"{passed} of {len(found)} runnable backend cases pass"


def _note(o: Outcome) -> str:
    note = o.note.split("): ", 1)[1] if o.status == REFUSED and "): " in o.note else o.note
    room = 110 - len(o.name) - len(o.status) - 18
    return note if len(note) <= room else note[:room - 3].rsplit(" ", 1)[0] + "..."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regenerate", action="store_true", help="print the table EXCEPTIONS as it is now")
    parser.parse_args(argv)
    found = outcomes()
    print("EXCEPTIONS = {")
    for n, o in found.items():
        if o.status != PASS:
            print(f"    {json.dumps(n)}: ({json.dumps(o.status)}, {json.dumps(_note(o))}),")
    print("}")
    passed = sum(o.status == PASS for o in found.values())
    share = 100 * passed / len(found)
    print(f"# {len(backend_cases())} cases, {len(found)} runnable, {passed} pass ({share:.1f} %)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
