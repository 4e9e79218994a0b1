"""Is a rule file sound for a model? Static checks, predicted and measured conservation, and the
consistency probes (docs/rules.md: consistency, conservation classes), gathered in one Report
(``report.py``)."""

from __future__ import annotations

from ..run import amplification
from ..run.explainer import Explainer
from .measured import measure, sample_inputs
from .probes import run_probes
from .report import Report
from .static import static


def check(model, rules, x=None, samples: int = 0, tolerance: float = 1e-3, probes: bool = False,
          output: str | None = None, start: str | None = None, providers=None,
          max_amplification: float = amplification.DEFAULT_MAX_AMPLIFICATION) -> Report:
    """Run every check that applies: static always, measured with inputs (``x`` or ``samples``):
    conservation and amplification (fails above ``max_amplification``); consistency probes when asked."""
    explainer = Explainer(model, rules, providers=providers, output=output, start=start)
    explainer.allow_nonfinite = True  # a NaN/Inf input is measured and named as the cause (Report.nonfinite)
    ruleset = explainer.ruleset
    diagnostics, nodes, predicted = static(explainer.graph, ruleset, output, start)
    report = Report(str(model) if not hasattr(model, "SerializeToString") else "<model>", ruleset.source,
                    ruleset.quantity, ruleset.bias, tolerance, diagnostics, nodes, predicted,
                    max_amplification=max_amplification)
    if not report.errors and (x is not None or samples):
        measure(explainer, x if x is not None else sample_inputs(explainer.graph, samples), report)
    if probes:
        report.probes = run_probes(ruleset)
    return report
