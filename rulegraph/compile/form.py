"""Which form a rule set compiles in (``compile_explainer(form=...)``, ``Explainer(form=...)``).

``"standard"``: the rules as written. ``"gradient-x-input"``: a relevance rule set compiled as
Gradient × Input with modified local Jacobians (``backward/gradient_form.py``; Arras et al. 2025,
LXT's efficient AttnLRP): the pass carries the importance number ``g`` with ``a = t ⊙ g``, so it
starts at ``onehot(target)``, finishes with ``x ⊙ g(x)`` and reports ``g(x)`` as the saliency. The
attribution is the rules' relevance at ε = 0, without their per-layer divisions.
"""

from __future__ import annotations

from dataclasses import replace

from ..backward.gradient_form import FORMS, GRADIENT_FORMS, GRADIENT_X_INPUT, STANDARD
from ..backward.rules import RULES
from ..graph.kinds import MAX, ROUTE
from ..errors import CoverageError, RulegraphError
from ..lang.ruleset import RuleSet

#: the kinds where the relevance quantity's ``gradient`` rule has a Gradient × Input form
GRADIENT_KINDS = frozenset({MAX, ROUTE})

__all__ = ["FORMS", "GRADIENT_X_INPUT", "STANDARD", "check_form", "emitter", "pass_ruleset"]


def check_form(form: str) -> str:
    """``form`` itself, or a RulegraphError naming the forms there are."""
    if form not in FORMS:
        raise RulegraphError(f"form {form!r} is not one of {', '.join(repr(f) for f in FORMS)}")
    return form


def pass_ruleset(ruleset: RuleSet, form: str, assignments) -> RuleSet:
    """The rule set the pass runs under: ``ruleset`` itself (standard), or for Gradient × Input the
    same bindings under the importance quantity. Refused, with every node whose rule has no such
    form, unless the file is a relevance file starting at the output."""
    if check_form(form) == STANDARD:
        return ruleset
    where = f"{ruleset.source}: form {GRADIENT_X_INPUT!r}"
    if ruleset.quantity != "relevance":
        raise RulegraphError(f"{where} rewrites a relevance rule file, but this one declares quantity "
                             f"{ruleset.quantity} (compile it with form {STANDARD!r})")
    if ruleset.start == "one":
        raise RulegraphError(f"{where} starts at the output's relevance y ⊙ onehot; 'start one' has no "
                             "Gradient × Input form (drop it, or compile with form 'standard')")
    problems = [f"{a.node}: '{a.binding.selector} -> {a.binding.rule}' at {a.binding.location} binds rule "
                f"'{a.binding.rule.name}', which has no Gradient × Input form"
                f"{_on(a.node.kind, a.binding.rule.name)}"
                for a in assignments if not _has_form(a.binding.rule.name, a.node.kind)]
    if problems:
        have = ", ".join(sorted(GRADIENT_FORMS))
        raise CoverageError(f"{where}: {len(problems)} node(s) cannot be compiled in it:\n  - "
                            + "\n  - ".join(problems) + f"\n(rules with one: {have}; or compile with form "
                            f"{STANDARD!r})")
    return replace(ruleset, quantity="importance", start=None)


def _has_form(name: str, kind: str) -> bool:
    """``gradient`` under relevance is ``a(x) = VJP(a(y))``: a Gradient × Input form on max and route
    ops only (a selection), not where the gradient is a map of ``a`` rather than of ``g``."""
    if RULES[name].starts_pass:
        return True
    return name in GRADIENT_FORMS and (name != "gradient" or kind in GRADIENT_KINDS)


def _on(kind: str, name: str) -> str:
    if name != "gradient":
        return ""
    return f" on a {kind} op (only on {' and '.join(sorted(GRADIENT_KINDS))} ops)"


def emitter(name: str, form: str):
    """The emitter of rule ``name`` in ``form``."""
    return RULES[name].emit if form == STANDARD else GRADIENT_FORMS[name]
