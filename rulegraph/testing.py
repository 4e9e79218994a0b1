"""Helpers for users' own test suites."""

from __future__ import annotations

from .check.checks import check


def assert_conserves(model, rules, inputs=None, tolerance: float = 1e-3, samples: int = 4) -> None:
    """Fail (AssertionError with the check report) unless ``rules`` conserve on ``model``.

    ``inputs``: an array or a dict of arrays; without it, ``samples`` seeded random inputs. Every
    node on the relevance path must have a rule, and every node's and the end-to-end leak must be
    at most ``tolerance`` relative to the start value (docs/rules.md, conservation classes).
    """
    report = check(model, rules, x=inputs, samples=0 if inputs is not None else samples, tolerance=tolerance)
    if not report.ok:
        raise AssertionError(report.to_text())
    if not report.conserves:  # a leak the rule table predicts passes `check`, but does not conserve
        raise AssertionError(f"conservation: end to end: max relative delta {report.measured:.2e} > "
                             f"tolerance {tolerance:g} (predicted {report.predicted})\n{report.to_text()}")
