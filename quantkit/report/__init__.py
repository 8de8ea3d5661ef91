"""Reports: accuracy against speed for a set of evaluated engines.

``build_report(results, out)`` reads ``quantkit.results/1`` files (``quantkit eval``), merges them
when comparable, and writes ``report.md``, a self-contained ``report.html`` (inline images and
style, no network) and ``report.json`` (schema ``quantkit.report/1``). Importing this package is
cheap; matplotlib is imported when a plot is drawn.
"""

from quantkit.report.build import REPORT_SCHEMA, ReportOutput, build_report, report_data
from quantkit.report.pareto import dominates, pareto_front

__all__ = [
    "REPORT_SCHEMA",
    "ReportOutput",
    "build_report",
    "dominates",
    "pareto_front",
    "report_data",
]
