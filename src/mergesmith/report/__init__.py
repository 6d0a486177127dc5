"""Self-contained HTML reports of a merge: config, sources, analysis plots and evaluation (see html.py)."""

from __future__ import annotations

from mergesmith.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
