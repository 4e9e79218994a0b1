"""Rewrites of the assembled explainer that keep every value it computes, only with fewer passes.

**ε ratios.** The ε rule divides the relevance at a layer's output ``z`` by ``z + ε·sign(z)``
(``Tape.blip``, ``sign(0) = +1``). Where that relevance is a product with ``z`` itself or with
``a = Relu(z)`` (the rules of the layers reading it multiply by their input: ``x ⊙ Mᵀ(...)`` of
the ε, z⁺ and flat rules, the ε rule of a residual Add), the quotient is a ratio of the forward's
own numbers times the rest:

    (z ⊙ c) / (z + ε·sign z)  =  c ⊙ |z| / (|z| + ε)
    (a ⊙ c) / (z + ε·sign z)  =  c ⊙ a / (a + ε),       a = Relu(z),

the first as ``z`` and ``z + ε·sign z`` share their sign, the second as ``a = z`` where ``z > 0``
and ``a = 0`` elsewhere, where both sides are 0 (the denominator is ``z − ε`` or ``ε``, never 0).
A sum of such terms ``Σₖ a ⊙ cₖ`` becomes ``(Σₖ cₖ) ⊙ a / (a + ε)``. The pass then drops the
stabilizer (a compare, a cast and three arithmetic passes over ``z``), one product per term and
the quotient; in the ReLU case ``z`` is read by its ReLU alone, which onnxruntime then fuses into
the convolution before it. The ReLU case is the known form of LRP-ε on ReLU networks as a modified
gradient (the ReLU's derivative replaced by ``a / (a + ε)``); here both are identities applied to
the emitted graph, so every rule file gets them where the pattern holds and nothing changes where
it does not. The numbers differ from the unrewritten pass by rounding alone (the same real value,
the products and quotient taken in another order).

**ReLU denominators.** Where the relevance at ``z`` is not such a product but still vanishes
wherever ``a = Relu(z)`` does (MaxPool's backward scatters ``p ⊙ c`` onto the arg-max positions,
and ``p``, the pooled ``a``, is ``a`` there), the denominator alone is replaced:
``n / (z + ε·sign z) = n / (a + ε)``, one pass over ``a`` instead of the stabilizer's four over
``z`` (where ``a > 0`` both are ``z + ε``; elsewhere ``n = 0``).

The rewrite depends on the rules' graph alone, not on what else the explainer outputs: where a
term or the relevance itself is also read elsewhere (a per-node sum of ``rulegraph check``, an
``at=`` output), it is still computed for that reader, and the map is the same number for number
with or without those outputs.
"""

from __future__ import annotations

import onnx

from ..backward.emit import Tape


def epsilon_ratios(graph: onnx.GraphProto, tape: Tape) -> int:
    """Rewrite each ``(Σₖ f ⊙ cₖ) / blip(z, ε)`` in ``graph`` (the assembled explainer) with
    ``f = z`` or ``f = Relu(z)`` to ``(Σₖ cₖ) ⊙ |f| / (|f| + ε)`` (``Relu(z)`` needs no ``Abs``),
    and each ``n / blip(z, ε)`` whose ``n`` vanishes where ``a = Relu(z)`` does to ``n / (a + ε)``;
    returns how many were rewritten. The nodes left unread are dropped by ``build.prune``. A
    rewritten quotient may read a node the tape had made later (the tape shares equal nodes), so
    the caller sorts a rewritten graph (``read.sort_nodes``)."""
    if not tape.blips:
        return 0
    producer = {o: n for n in graph.node for o in n.output if o}
    relu_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Relu" and n.domain in ("", "ai.onnx")}
    relu_outputs = set(relu_of.values())

    rewritten, nodes, constants = 0, [], len(tape.initializers)
    for node in graph.node:
        found = _match(node, tape.blips, relu_of, producer)
        if found is None:
            nodes.append(node)
            continue
        f, eps, factors = found
        first, tape.context = len(tape.nodes), tape.origins.get(node.output[0], "")
        if factors is None:   # the denominator alone
            replaced = onnx.helper.make_node("Div", [node.input[0], tape.op("Add", f, tape.scalar(eps))],
                                             [node.output[0]], name=node.name)
        else:
            size = f if f in relu_outputs else tape.op("Abs", f)
            ratio = tape.op("Div", size, tape.op("Add", size, tape.scalar(eps)))
            replaced = onnx.helper.make_node("Mul", [tape.sum(factors), ratio], [node.output[0]], name=node.name)
        nodes.extend(tape.nodes[first:])
        nodes.append(replaced)
        rewritten += 1
    tape.context = ""
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(tape.initializers[constants:])
    return rewritten


def _match(node, blips, relu_of, producer):
    """``(f, ε, [c₁, ...])`` where ``node`` is ``Div(Σₖ f ⊙ cₖ, blip(z, ε))`` with ``f`` the same
    ``z`` or ``Relu(z)`` in every product (the sum a Sum or an Add of products, or one product);
    ``(a, ε, None)`` where each term is such a product with ``a = Relu(z)`` or MaxPool's scatter
    of a product with ``a``'s pooled values (``_pooled_product``); else None."""
    if node.op_type != "Div" or node.domain not in ("", "ai.onnx") or node.input[1] not in blips:
        return None
    z, eps = blips[node.input[1]]
    if eps <= 0:
        return None
    numerator = node.input[0]
    terms = [numerator]
    summed = producer.get(numerator)
    if summed is not None and summed.op_type in ("Sum", "Add"):
        terms = list(summed.input)
    a = relu_of.get(z)
    for f in (z, a) if a is not None else (z,):
        factors = [_other_factor(producer.get(term), f) for term in terms]
        if None not in factors:
            return f, eps, factors
    if a is not None and all(_other_factor(producer.get(term), a) is not None or _pooled_product(term, a, producer)
                             for term in terms):
        return a, eps, None
    return None


def _other_factor(product, f: str) -> str | None:
    """``c`` where ``product`` is ``Mul(f, c)`` or ``Mul(c, f)``; else None."""
    if product is None or product.op_type != "Mul" or product.domain not in ("", "ai.onnx") or f not in product.input:
        return None
    return product.input[1] if product.input[0] == f else product.input[0]


#: ops that change a tensor's shape and keep its elements in order (row-major)
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def _pooled_product(term: str, a: str, producer) -> bool:
    """Is ``term`` MaxPool's backward (``vjp.py``, ``_scatter_back``) of products ``q ⊙ c`` (or
    their sum) whose ``q`` is the pool's output ``p = MaxPool(a)`` (reshaped or not), scattered onto
    the flat arg-max indices of that same pool in a zero tensor? Then each number lands where ``a``
    equals its ``p``, and the result vanishes where ``a`` does."""
    scatter = producer.get(_through(term, producer))
    if scatter is None or scatter.op_type != "ScatterElements" or len(scatter.input) != 3:
        return False
    zeros = producer.get(_through(scatter.input[0], producer))
    if zeros is None or zeros.op_type != "ConstantOfShape" or not _zero_fill(zeros):
        return False
    pool = producer.get(_through(scatter.input[1], producer))
    if pool is None or pool.op_type != "MaxPool" or pool.input[0] != a or len(pool.output) < 2:
        return False
    if _through(scatter.input[1], producer) != pool.output[1]:
        return False
    return _times(scatter.input[2], pool.output[0], producer)


def _times(name: str, p: str, producer) -> bool:
    """Is ``name`` (through ``_RESHAPES``) a product with ``p`` (reshaped or not), or a sum of such?"""
    node = producer.get(_through(name, producer))
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Mul":
        return any(_through(q, producer) == p for q in node.input)
    return node.op_type in ("Sum", "Add") and all(_times(term, p, producer) for term in node.input)


def _through(name: str, producer) -> str:
    """``name`` followed back through ``_RESHAPES`` to the tensor they reshape."""
    node = producer.get(name)
    while node is not None and node.op_type in _RESHAPES and node.domain in ("", "ai.onnx"):
        name = node.input[0]
        node = producer.get(name)
    return name


def _zero_fill(node) -> bool:
    """Does this ConstantOfShape fill with 0 (its default)?"""
    for attr in node.attribute:
        if attr.name == "value":
            return not onnx.numpy_helper.to_array(attr.t).any()
    return True
