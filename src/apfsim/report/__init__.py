"""HTML reports and figure files from results JSON (``apfsim report``, ``apfsim plot``).

Example::

    from pathlib import Path
    from apfsim.report import write_plots, write_report
    write_report([Path("seed0.json"), Path("seed1.json")], Path("report.html"))
    write_plots([Path("compare.json")], Path("plots"))

Inputs are the files of ``apfsim run --json`` (one per seed; several seeds of one scenario are
merged) and ``apfsim compare --json``; see docs/report.md. Drawing needs the ``report`` extra
(matplotlib, jinja2), imported only when a figure is drawn: a missing one is a ReportError
naming the install command, like every bad input.
"""

from apfsim.report.data import ReportData, ReportError, load_results
from apfsim.report.figures import RenderedFigure, render_figures
from apfsim.report.render import render_report, write_plots, write_report

__all__ = [
    "RenderedFigure",
    "ReportData",
    "ReportError",
    "load_results",
    "render_figures",
    "render_report",
    "write_plots",
    "write_report",
]
