"""`from oprd.run_report import ...` as README's API showed it before the run folder's code moved
into `oprd.runs`: the same functions, from their home, `oprd.runs.report`."""

from oprd.runs.report import comparison_series, plot_lines, report_series, write_comparison, write_report

__all__ = ["comparison_series", "plot_lines", "report_series", "write_comparison", "write_report"]
