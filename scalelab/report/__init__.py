"""Reports on run folders: report.md for one pretraining run, and the report card (Markdown + HTML) over many."""

from scalelab.report.card import collect_run, collect_runs, write_report_card
from scalelab.report.run_report import write_report

__all__ = ["collect_run", "collect_runs", "write_report", "write_report_card"]
