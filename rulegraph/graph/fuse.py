"""Pattern fusion: a few nodes that together compute one elementwise or normalizing op become one
*fused node* (docs/kinds.md, fused nodes), so that a rule bound to the op (``Gelu -> slope``,
``nonlinear -> ...``) applies whichever exporter wrote the model.

``PATTERNS`` is the table: one matcher per pattern, registered with ``@pattern`` under the op type
it fuses to and the op types it is anchored at (the node every form has: the Erf of a GELU, the
first ReduceMean of a LayerNorm). A matcher returns a ``Match`` or raises ``NoMatch(reason)``. A
match must

- have its constants right to within ``TOLERANCE`` (``Erf(x/1.5)`` is no GELU), and
- be self-contained: every intermediate tensor is used only inside the pattern and is not a graph
  output (a number it carried elsewhere would be lost to the backward).

The elementwise patterns are checked algebraically rather than node by node: the pattern's tensors
are read as polynomials in its input ``x`` and in the output ``e`` of its one nonlinear node (Add,
Sub, Mul, Neg, Div by a constant, Pow by a small integer), so that every ordering an exporter may
choose (``0.5`` first or last, Div by √2 or Mul by 1/√2, ``x·x·x`` or ``Pow(x, 3)``) is the same
polynomial.

A fused node replaces its members in ``Graph.nodes``; the model proto, and so the forward pass of
the compiled explainer, keeps the members. The backward of a fused node is ``backward/fused.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from onnx import helper

from .kinds import OpKinds
from .read import Graph, Node, link

#: largest difference allowed between a pattern's constant and the expected one (relative to it
#: when it is larger than 1); float32 stores √2, 1/6 and 0.044715 to within 1e-7
TOLERANCE = 1e-6
#: ops the polynomial reader walks through
ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Pow"})


class NoMatch(Exception):
    """Why the nodes around an anchor are not the pattern."""


@dataclass
class Match:
    """A pattern found: the fused node's op type, its members (topological order), its inputs (the
    activation input first, then constant inputs), its output and attributes."""

    pattern: str
    op_type: str
    members: list[Node]
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pattern:
    name: str
    op_type: str
    anchors: frozenset[str]
    find: Callable[[Graph, Node], Match]
    doc: str


PATTERNS: dict[str, Pattern] = {}


def pattern(name: str, op_type: str, *anchors: str):
    """Register the decorated matcher ``find(graph, anchor) -> Match`` as pattern ``name``; its
    docstring's first line names the identity and the exporters that write it."""

    def register(fn: Callable[[Graph, Node], Match]):
        doc = (fn.__doc__ or "").strip().splitlines()
        if not doc:
            raise AssertionError(f"pattern '{name}' needs a docstring naming its identity and exporters")
        PATTERNS[name] = Pattern(name, op_type, frozenset(anchors), fn, doc[0].strip())
        return fn

    return register


# --------------------------------------------------------------------------------------------------
# polynomials in a few tensors: {monomial: coefficient}, a monomial a sorted ((tensor, power), ...)

Monomial = tuple[tuple[str, int], ...]
Poly = dict[Monomial, float]


def _variable(t: str) -> Poly:
    return {((t, 1),): 1.0}


def _plus(p: Poly, q: Poly, sign: float = 1.0) -> Poly:
    out = dict(p)
    for m, c in q.items():
        out[m] = out.get(m, 0.0) + sign * c
    return out


def _times(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            powers = dict(m1)
            for v, k in m2:
                powers[v] = powers.get(v, 0) + k
            m = tuple(sorted(powers.items()))
            out[m] = out.get(m, 0.0) + c1 * c2
    return out


def _constant_of(p: Poly) -> float | None:
    """The value of a polynomial without variables, else None."""
    if any(m and c != 0 for m, c in p.items()):
        return None
    return p.get((), 0.0)


def _users(graph: Graph, tensor: str) -> list[Node]:
    """The distinct nodes reading ``tensor`` (Mul(d, d) reads it once)."""
    seen: dict[str, Node] = {}
    for n in graph.consumers.get(tensor, []):
        seen.setdefault(n.name, n)
    return list(seen.values())


def _scalar(graph: Graph, tensor: str) -> float | None:
    """The value of a constant float scalar (any shape of size 1), else None."""
    value = graph.constants.get(tensor) if tensor else None
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


class _Reader:
    """Reads tensors as polynomials over ``variables`` through arithmetic nodes. With
    ``variables=None`` (the nonlinear node's argument, whose input ``x`` is still unknown) it walks
    only through tensors used once, and every other leaf becomes a variable, listed in ``found``;
    with known variables it walks through any arithmetic (``0.5·x`` may feed two terms), and
    ``_check_contained`` rejects what is also used outside."""

    def __init__(self, graph: Graph, variables: tuple[str, ...] | None):
        self.graph = graph
        self.variables = variables
        self.found: list[str] = []
        self.members: dict[str, Node] = {}
        self._read: dict[str, Poly] = {}  # a tensor read twice (0.5·x in two terms) is read once

    def read_root(self, tensor: str) -> Poly:
        """``tensor`` itself may be used anywhere: it is the pattern's output."""
        node = self.graph.producer.get(tensor)
        if node is None or node.op_type not in ARITHMETIC:
            raise NoMatch(f"'{tensor}' is not computed by arithmetic")
        return self._node(node)

    def read(self, tensor: str) -> Poly:
        graph = self.graph
        if self.variables is not None and tensor in self.variables:
            return _variable(tensor)
        if tensor in graph.constants:
            value = _scalar(graph, tensor)
            if value is None:
                raise NoMatch(f"constant '{tensor}' has shape {list(graph.constants[tensor].shape)}; "
                              "the pattern needs scalars")
            return {(): value}
        node = graph.producer.get(tensor)
        once = tensor not in graph.outputs and len(_users(graph, tensor)) == 1
        if node is not None and node.op_type in ARITHMETIC and (self.variables is not None or once):
            if tensor not in self._read:
                self._read[tensor] = self._node(node)
            return self._read[tensor]
        if self.variables is None:
            if tensor not in self.found:
                self.found.append(tensor)
            return _variable(tensor)
        raise NoMatch(f"'{tensor}' is not arithmetic on {' and '.join(repr(v) for v in self.variables)}")

    def _node(self, node: Node) -> Poly:
        self.members[node.name] = node
        if node.op_type == "Neg":
            return _times(self.read(node.inputs[0]), {(): -1.0})
        if node.op_type == "Pow":
            exponent = _scalar(self.graph, node.inputs[1])
            if exponent not in (1.0, 2.0, 3.0, 4.0):
                raise NoMatch(f"{node}: only Pow by a constant 1, 2, 3 or 4 is read as a product")
            base, out = self.read(node.inputs[0]), {(): 1.0}
            for _ in range(int(exponent)):
                out = _times(out, base)
            return out
        a, b = (self.read(t) for t in node.inputs)
        if node.op_type == "Add":
            return _plus(a, b)
        if node.op_type == "Sub":
            return _plus(a, b, -1.0)
        if node.op_type == "Mul":
            return _times(a, b)
        divisor = _constant_of(b)  # Div
        if not divisor:
            raise NoMatch(f"{node} divides by something other than a nonzero constant")
        return _times(a, {(): 1.0 / divisor})


def _powers(p: Poly, x: str, e: str | None = None) -> dict[tuple[int, int], float]:
    """``p`` as {(power of x, power of e): coefficient}, dropping zero terms."""
    out: dict[tuple[int, int], float] = {}
    for m, c in p.items():
        if c == 0:
            continue
        powers = dict(m)
        key = (powers.pop(x, 0), powers.pop(e, 0) if e else 0)
        if powers:
            raise NoMatch(f"depends on {', '.join(repr(v) for v in powers)} besides the pattern's input")
        out[key] = out.get(key, 0.0) + c
    return out


def _show(terms: dict[tuple[int, int], float]) -> str:
    def monomial(i: int, j: int) -> str:
        factors = [f"{v}^{k}" if k > 1 else v for v, k in (("x", i), ("e", j)) if k]
        return "·".join(factors)

    parts = [monomial(*k) if c == 1 and any(k) else f"{c:.7g}" + ("·" + monomial(*k) if any(k) else "")
             for k, c in sorted(terms.items())]
    return " + ".join(parts) or "0"


def _close(got: dict[tuple[int, int], float], want: dict[tuple[int, int], float]) -> bool:
    keys = {k for k, c in got.items() if abs(c) > 1e-12} | set(want)
    return all(abs(got.get(k, 0.0) - want.get(k, 0.0)) <= TOLERANCE * max(1.0, abs(want.get(k, 0.0)))
               for k in keys)


def _expect_value(what: str, got: float | None, want: float) -> None:
    if got is None or abs(got - want) > TOLERANCE * max(1.0, abs(want)):
        raise NoMatch(f"{what} is {got}, not {want:.7g}")


# --------------------------------------------------------------------------------------------------
# the elementwise patterns: y = outer(x, e) with e = atom(argument(x))


def _elementwise(graph: Graph, pattern_name: str, op_type: str, atom: Node, argument: dict[int, float],
                 outer: dict[tuple[int, int], float], **attrs) -> Match:
    """Match ``outer(x, e)`` (terms {(power of x, power of e): c}) over the atom's output ``e``,
    where the atom's input is the polynomial ``argument`` ({power of x: c}) of one tensor ``x``."""
    inner = _Reader(graph, None)
    arg = inner.read(atom.inputs[0])
    if len(inner.found) != 1:
        raise NoMatch(f"the input of {atom} depends on {len(inner.found)} tensors, not on one")
    x = inner.found[0]
    if x not in graph.active:
        raise NoMatch(f"'{x}' is not an activation")
    want_arg = {(k, 0): c for k, c in argument.items()}
    found = _powers(arg, x)
    if not _close(found, want_arg):
        raise NoMatch(f"the input of {atom} is {_show(found)}, not {_show(want_arg)}")
    e = atom.outputs[0]
    tensor, last = e, f"'{e}'"
    while True:  # the candidates for the output: the tensors after e, up to where e's chain branches
        users = _users(graph, tensor)
        stop = ("is a graph output" if tensor in graph.outputs else f"is used by {len(users)} nodes"
                if len(users) != 1 else f"feeds {users[0]}" if users[0].op_type not in ARITHMETIC else None)
        if stop:
            break
        tensor = users[0].outputs[0]
        reader = _Reader(graph, (x, e))
        try:
            found = _powers(reader.read_root(tensor), x, e)
        except NoMatch as exc:
            last = f"'{tensor}' ({exc})"
            continue
        if _close(found, outer):
            members = list(inner.members.values()) + [atom] + list(reader.members.values())
            if not _same_shape(graph, tensor, x):
                raise NoMatch(f"'{tensor}' has shape {graph.shapes.get(tensor)}, its input "
                              f"{graph.shapes.get(x)}: not elementwise")
            return Match(pattern_name, op_type, _ordered(members), [x], tensor, attrs)
        last = f"'{tensor}' = {_show(found)}"
    raise NoMatch(f"nothing after {atom} computes {_show(outer)} (x: '{x}', e: '{e}'): {last} {stop}")


def _same_shape(graph: Graph, a: str, b: str) -> bool:
    """False only where the shapes are known to differ (a constant broadcast the output)."""
    sa, sb = graph.shapes.get(a), graph.shapes.get(b)
    if sa is None or sb is None:
        return True
    return len(sa) == len(sb) and all(i is None or j is None or i == j for i, j in zip(sa, sb))


def _ordered(nodes: list[Node]) -> list[Node]:
    unique = {n.name: n for n in nodes}
    return sorted(unique.values(), key=lambda n: n.index)


GELU = {(1, 0): 0.5, (1, 1): 0.5}  # 0.5·x·(1 + e)


@pattern("gelu_erf", "Gelu", "Erf")
def _gelu_erf(graph: Graph, erf: Node) -> Match:
    """Gelu(x) = 0.5·x·(1 + Erf(x/√2)): torch.onnx TorchScript and dynamo before opset 20, tf2onnx."""
    return _elementwise(graph, "gelu_erf", "Gelu", erf, {1: 1 / math.sqrt(2)}, GELU)


@pattern("gelu_tanh", "Gelu", "Tanh")
def _gelu_tanh(graph: Graph, tanh: Node) -> Match:
    """Gelu(x, tanh) = 0.5·x·(1 + Tanh(√(2/π)·(x + 0.044715·x³))): torch TorchScript and dynamo, tf2onnx.

    TorchScript writes x³ as x·(x·x), dynamo as Pow(x, 3); tf2onnx for gelu(approximate=True).
    """
    k = math.sqrt(2 / math.pi)
    return _elementwise(graph, "gelu_tanh", "Gelu", tanh, {1: k, 3: k * 0.044715}, GELU, approximate="tanh")


@pattern("silu", "SiLU", "Sigmoid")
def _silu(graph: Graph, sigmoid: Node) -> Match:
    """SiLU(x) = x·Sigmoid(x) (Swish, β = 1): torch SiLU, TorchScript and dynamo; tf2onnx swish."""
    return _elementwise(graph, "silu", "SiLU", sigmoid, {1: 1.0}, {(1, 1): 1.0})


@pattern("hardswish", "HardSwish", "Clip", "HardSigmoid")
def _hardswish(graph: Graph, node: Node) -> Match:
    """HardSwish(x) = x·Clip(x + 3, 0, 6)/6 = x·HardSigmoid(x; 1/6, ½): torch before opset 14, tf2onnx.

    torch's TorchScript exporter below opset 14 writes HardSigmoid and Mul; tf2onnx and hand-written
    MobileNetV3 code write Add, Clip (Relu6), Div and Mul. From opset 14 torch writes HardSwish.
    """
    if node.op_type == "HardSigmoid":
        _expect_value(f"alpha of {node}", node.attr("alpha", 0.2), 1 / 6)
        _expect_value(f"beta of {node}", node.attr("beta", 0.5), 0.5)
        return _elementwise(graph, "hardswish", "HardSwish", node, {1: 1.0}, {(1, 1): 1.0})
    for index, bound, want in ((1, "min", 0.0), (2, "max", 6.0)):
        value = _scalar(graph, node.inputs[index]) if index < len(node.inputs) else None
        _expect_value(f"the {bound} of {node}", value, want)
    return _elementwise(graph, "hardswish", "HardSwish", node, {0: 3.0, 1: 1.0}, {(1, 1): 1 / 6})


# --------------------------------------------------------------------------------------------------
# LayerNorm decomposed


def _only_user(graph: Graph, tensor: str, *op_types: str) -> Node:
    users = _users(graph, tensor)
    if tensor in graph.outputs or len(users) != 1 or users[0].op_type not in op_types:
        found = ", ".join(str(u) for u in users) or "nothing"
        raise NoMatch(f"'{tensor}' should feed only a {' or '.join(op_types)}; it feeds {found}"
                      + (" and is a graph output" if tensor in graph.outputs else ""))
    return users[0]


def _other(node: Node, tensor: str) -> str:
    """The operand of a binary node that is not ``tensor``."""
    a, b = node.inputs[:2]
    return b if a == tensor else a


def _mean_axes(graph: Graph, node: Node, rank: int) -> list[int]:
    """The normalised axes of a ReduceMean that keeps its dims (attribute, or input from opset 18)."""
    if not node.attr("keepdims", 1):
        raise NoMatch(f"{node} drops the reduced axes (keepdims = 0)")
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        value = graph.constants.get(node.inputs[1])
        axes = None if value is None else value.tolist()
    if not axes:
        raise NoMatch(f"{node} has no constant axes")
    return sorted(int(a) % rank for a in axes)


def _root_mean_square(graph: Graph, square: Node, rank: int, axes: list[int] | None = None):
    """The nodes ReduceMean, Add(ε), Sqrt after ``square`` (σ = √(mean(square) + ε) over trailing
    axes, or over ``axes`` where given), with ε and the axes."""
    mean = _only_user(graph, square.outputs[0], "ReduceMean")
    found = _mean_axes(graph, mean, rank)
    want = axes if axes is not None else list(range(rank - len(found), rank))
    if mean.inputs[0] != square.outputs[0] or found != want:
        raise NoMatch(f"{mean} does not average the squares over the axes {want}")
    add = _only_user(graph, mean.outputs[0], "Add")
    eps = _scalar(graph, _other(add, mean.outputs[0]))
    if eps is None or eps < 0:
        raise NoMatch(f"{add} does not add a constant ε >= 0 to the mean square")
    return (mean, add, _only_user(graph, add.outputs[0], "Sqrt")), eps, found


@pattern("layernorm", "LayerNormalization", "ReduceMean")
def _layernorm(graph: Graph, mean: Node) -> Match:
    """LayerNormalization(x, γ, β) = (x − mean x)/√(var x + ε)·γ + β: torch before opset 17, tf2onnx.

    Written as ReduceMean, Sub, Pow(2) (or Mul(d, d)), ReduceMean, Add(ε), Sqrt, Div (or Reciprocal
    and Mul), then Mul γ and Add β where present; the means over trailing axes, keeping dims.
    """
    x = mean.inputs[0]
    rank = graph.rank(x)
    if rank is None or x not in graph.active:
        raise NoMatch(f"'{x}' is not an activation of known rank")
    axes = _mean_axes(graph, mean, rank)
    if axes != list(range(rank - len(axes), rank)):
        raise NoMatch(f"{mean} averages axes {axes}, not trailing axes as LayerNormalization does")
    sub = _only_user(graph, mean.outputs[0], "Sub")
    if sub.inputs != [x, mean.outputs[0]]:
        raise NoMatch(f"{sub} is not '{x}' minus its mean")
    d = sub.outputs[0]
    users = _users(graph, d)
    squares = [u for u in users if (u.op_type == "Pow" and _scalar(graph, u.inputs[1]) == 2.0)
               or (u.op_type == "Mul" and u.inputs == [d, d])]
    if d in graph.outputs or len(users) != 2 or len(squares) != 1:
        raise NoMatch(f"'{d}' should feed its square and the division; it feeds "
                      f"{', '.join(str(u) for u in users)}")
    square = squares[0]
    (var, add, sqrt), eps, _ = _root_mean_square(graph, square, rank, axes)
    scale = _only_user(graph, sqrt.outputs[0], "Div", "Reciprocal")
    members = [mean, sub, square, var, add, sqrt, scale]
    if scale.op_type == "Reciprocal":
        scale = _only_user(graph, scale.outputs[0], "Mul")
        members.append(scale)
        if sorted(scale.inputs) != sorted([d, members[-2].outputs[0]]):
            raise NoMatch(f"{scale} does not multiply '{d}' by 1/σ")
    elif scale.inputs != [d, sqrt.outputs[0]]:
        raise NoMatch(f"{scale} does not divide '{d}' by σ")
    out = scale.outputs[0]
    affine: dict[str, str] = {}
    for op, name in (("Mul", "scale"), ("Add", "bias")):
        users = _users(graph, out)
        if out in graph.outputs or len(users) != 1 or users[0].op_type != op:
            continue
        operand = _other(users[0], out)
        value = graph.constants.get(operand)
        if value is None or value.dtype.kind != "f" or value.ndim > len(axes):
            continue  # not γ (β) of the normalized axes: the fused node ends before it
        affine[name] = operand
        members.append(users[0])
        out = users[0].outputs[0]
    inputs = [x, affine.get("scale", ""), affine.get("bias", "")]
    while not inputs[-1]:
        inputs.pop()
    return Match("layernorm", "LayerNormalization", _ordered(members), inputs, out,
                 {"axis": -len(axes), "epsilon": eps})


@pattern("rmsnorm", "RMSNormalization", "Pow", "Mul")
def _rmsnorm(graph: Graph, square: Node) -> Match:
    """RMSNormalization(x, γ) = x / √(mean(x²) + ε) · γ: torch's export of Llama-style RMSNorm (and
    T5's LayerNorm), which has no centering.

    Written as Pow(x, 2) (or Mul(x, x)), ReduceMean over trailing axes keeping dims, Add(ε), Sqrt,
    then Div(x, σ), or Reciprocal (or Div(1, σ)) and Mul with x; then Mul γ where present.
    """
    x = square.inputs[0]
    if not ((square.op_type == "Pow" and _scalar(graph, square.inputs[1]) == 2.0)
            or (square.op_type == "Mul" and square.inputs == [x, x])):
        raise NoMatch(f"{square} is not the square of '{x}'")
    rank = graph.rank(x)
    if rank is None or x not in graph.active:
        raise NoMatch(f"'{x}' is not an activation of known rank")
    (mean, add, sqrt), eps, axes = _root_mean_square(graph, square, rank)
    sigma = sqrt.outputs[0]
    scale = _only_user(graph, sigma, "Div", "Reciprocal")
    members = [square, mean, add, sqrt, scale]
    if scale.op_type == "Div" and scale.inputs == [x, sigma]:
        out = scale.outputs[0]
    else:
        if scale.op_type == "Div" and not (scale.inputs[1] == sigma and _scalar(graph, scale.inputs[0]) == 1.0):
            raise NoMatch(f"{scale} divides neither '{x}' nor 1 by σ")
        mul = _only_user(graph, scale.outputs[0], "Mul")
        if sorted(mul.inputs) != sorted([x, scale.outputs[0]]):
            raise NoMatch(f"{mul} does not multiply '{x}' by 1/σ")
        members.append(mul)
        out = mul.outputs[0]
    inputs = [x]
    users = _users(graph, out)
    if out not in graph.outputs and len(users) == 1 and users[0].op_type == "Mul":
        gamma = _other(users[0], out)
        value = graph.constants.get(gamma)
        if value is not None and value.dtype.kind == "f" and value.ndim <= len(axes):
            inputs.append(gamma)
            members.append(users[0])
            out = users[0].outputs[0]
    return Match("rmsnorm", "RMSNormalization", _ordered(members), inputs, out,
                 {"axis": -len(axes), "epsilon": eps})


@pattern("l2norm", "LpNormalization", "ReduceL2")
def _l2norm(graph: Graph, norm: Node) -> Match:
    """LpNormalization(x, p = 2) = x / max(‖x‖₂, ε) over one axis: torch's F.normalize (XCiT's and
    EdgeNeXt's cross-covariance attention), both exporters.

    Written as ReduceL2 keeping dims, Clip(min = ε) (or Max with a constant ε), Expand where
    present, then Div(x, ·).
    """
    x = norm.inputs[0]
    rank = graph.rank(x)
    if rank is None or x not in graph.active:
        raise NoMatch(f"'{x}' is not an activation of known rank")
    axes = _mean_axes(graph, norm, rank)
    if len(axes) != 1:
        raise NoMatch(f"{norm} reduces axes {axes}, not one axis as LpNormalization does")
    clamp = _only_user(graph, norm.outputs[0], "Clip", "Max")
    bounds = clamp.inputs[1:] if clamp.op_type == "Clip" else [_other(clamp, norm.outputs[0])]
    eps = _scalar(graph, bounds[0]) if bounds and bounds[0] else None
    if eps is None or eps < 0 or (clamp.op_type == "Clip" and len(bounds) > 1 and bounds[1]):
        raise NoMatch(f"{clamp} does not bound the norm below by a constant ε >= 0 only")
    members = [norm, clamp]
    divisor = _only_user(graph, clamp.outputs[0], "Expand", "Div")
    if divisor.op_type == "Expand":
        members.append(divisor)
        divisor = _only_user(graph, divisor.outputs[0], "Div")
    if divisor.inputs != [x, members[-1].outputs[0]]:
        raise NoMatch(f"{divisor} does not divide '{x}' by its norm")
    members.append(divisor)
    return Match("l2norm", "LpNormalization", members, [x], divisor.outputs[0],
                 {"axis": axes[0], "p": 2})


# --------------------------------------------------------------------------------------------------
# Softmax with a NaN guard


@pattern("safe_softmax", "Softmax", "Softmax")
def _safe_softmax(graph: Graph, softmax: Node) -> Match:
    """Softmax(x) with rows of NaN set to 0, Where(IsNaN(s), 0, s): torch dynamo's _safe_softmax
    (scaled_dot_product_attention), whose fully masked rows would otherwise be NaN."""
    s = softmax.outputs[0]
    users = _users(graph, s)
    isnan = [u for u in users if u.op_type == "IsNaN"]
    where = [u for u in users if u.op_type == "Where"]
    if s in graph.outputs or len(users) != 2 or len(isnan) != 1 or len(where) != 1:
        raise NoMatch(f"'{s}' should feed one IsNaN and one Where; it feeds {', '.join(str(u) for u in users)}")
    isnan, where = isnan[0], where[0]
    if where.inputs[0] != isnan.outputs[0] or where.inputs[2] != s or _scalar(graph, where.inputs[1]) != 0.0:
        raise NoMatch(f"{where} is not Where(IsNaN('{s}'), 0, '{s}')")
    return Match("safe_softmax", "Softmax", [softmax, isnan, where], [softmax.inputs[0]], where.outputs[0],
                 {"axis": softmax.attr("axis", -1)})


# --------------------------------------------------------------------------------------------------
# quantize-dequantize pairs (QDQ models)


@pattern("qdq", "QuantizeDequantize", "QuantizeLinear")
def _qdq(graph: Graph, quantize: Node) -> Match:
    """DequantizeLinear(QuantizeLinear(x)): x rounded to the quantization grid, onnxruntime.quantization's
    QDQ format (per tensor, per axis, block-wise; any integer type); read in float, straight-through."""
    q = quantize.outputs[0]
    if quantize.inputs[0] not in graph.active:
        raise NoMatch(f"'{quantize.inputs[0]}' is not an activation")
    dequantize = _only_user(graph, q, "DequantizeLinear")
    if dequantize.inputs[0] != q:
        raise NoMatch(f"{dequantize} does not dequantize '{q}'")
    return Match("qdq", "QuantizeDequantize", [quantize, dequantize], [quantize.inputs[0]],
                 dequantize.outputs[0])


# a reciprocal written as a quotient


@pattern("reciprocal", "Reciprocal", "Div")
def _reciprocal(graph: Graph, div: Node) -> Match:
    """1 / s as Div(1, s): torch's TorchScript exporter (rsqrt in Llama's RMSNorm); nonlinear in s,
    where a Div with a constant operand would read as linear (and the ε-rule flip the sign)."""
    if _scalar(graph, div.inputs[0]) != 1.0 or div.inputs[1] not in graph.active:
        raise NoMatch(f"{div} is not Div(1, s) of an activation s")
    return Match("reciprocal", "Reciprocal", [div], [div.inputs[1]], div.outputs[0])


# --------------------------------------------------------------------------------------------------
# finding and fusing


def _check_contained(graph: Graph, match: Match) -> None:
    """Every tensor a member computes, but the pattern's output, is used only by members."""
    names = {m.name for m in match.members}
    for m in match.members:
        for o in m.outputs:
            if not o or o == match.output:
                continue
            if o in graph.outputs:
                raise NoMatch(f"'{o}' inside the pattern is a graph output")
            outside = [u for u in _users(graph, o) if u.name not in names]
            if outside:
                raise NoMatch(f"'{o}' inside the pattern is also used by {outside[0]}")
    if match.members[-1].outputs[0] != match.output:
        raise AssertionError(f"pattern '{match.pattern}': its last member does not compute its output")


def find_matches(graph: Graph) -> tuple[list[Match], dict[str, list[str]]]:
    """The patterns in ``graph``, in topological order, and for every anchor node that matched none,
    why (``{node name: ["pattern: reason", ...]}``)."""
    matches: list[Match] = []
    misses: dict[str, list[str]] = {}
    used: set[str] = set()
    for node in graph.nodes:
        if node.members or node.name in used:
            continue
        reasons = []
        for p in PATTERNS.values():
            if node.op_type not in p.anchors:
                continue
            try:
                match = p.find(graph, node)
                _check_contained(graph, match)
                if any(m.name in used for m in match.members):
                    raise NoMatch("it overlaps a pattern found before")
            except NoMatch as exc:
                reasons.append(f"{p.name}: {exc}")
                continue
            matches.append(match)
            used.update(m.name for m in match.members)
            break
        else:
            if reasons:
                misses[node.name] = reasons
    return matches, misses


def _fresh_name(members: list[Node], op_type: str, taken: set[str]) -> str:
    """The members' common scope (``/mlp/act/``) and the op type; a suffix where that is taken."""
    prefix = members[0].name
    for m in members[1:]:
        while not m.name.startswith(prefix):
            prefix = prefix[:-1]
    scope = prefix[:prefix.rfind("/") + 1]
    name, i = scope + op_type, 0
    while name in taken:
        i += 1
        name = f"{scope}{op_type}_{i}"
    taken.add(name)
    return name


def fuse_patterns(graph: Graph, op_kinds: OpKinds) -> list[Node]:
    """Replace every pattern in ``graph.nodes`` by one fused node (at its output's place in the
    topological order); returns the fused nodes. The model proto is not touched."""
    matches, _ = find_matches(graph)
    if not matches:
        return []
    taken = {n.name for n in graph.nodes}
    at_output: dict[str, Node] = {}
    for m in matches:
        attribute_protos = [helper.make_attribute(k, v) for k, v in m.attrs.items()]
        kind = op_kinds.of(m.op_type, [t in graph.active for t in m.inputs])
        at_output[m.members[-1].name] = Node(_fresh_name(m.members, m.op_type, taken), m.op_type, list(m.inputs),
                                             [m.output], dict(m.attrs), attribute_protos, kind=kind,
                                             members=list(m.members))
    member_names = {n.name for m in matches for n in m.members}
    nodes = [at_output.get(n.name, n) for n in graph.nodes if n.name in at_output or n.name not in member_names]
    for i, n in enumerate(nodes):
        n.index = i
    graph.nodes = nodes
    graph.nx, graph.producer, graph.consumers = link(nodes)
    return list(at_output.values())
