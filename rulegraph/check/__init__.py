"""Stage 6, checking a rule file against a model: static, measured, probes, reports.

``from rulegraph.check import check`` is public API.
"""

from .checks import check
from .report import Report
from .static import static

__all__ = ["Report", "check", "static"]
