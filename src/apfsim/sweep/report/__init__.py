"""``apfsim sweep-report``: a sweep database aggregated per point and protocol.

Runs are grouped by the values of the chosen axes (``by``; default every axis of the sweep)
and the protocol. In each group every metric gets its mean and 95 % confidence half-width
(:func:`apfsim.stats.estimate`), and every work rate (``*.work_rate``) its ratio to the
baseline protocol, paired run by run: a run is divided by the baseline's run of the same
point (every axis value equal) and the same seed (:func:`apfsim.stats.paired_ratios`),
then those ratios are estimated the same way. Axes left out of ``by`` pool their runs as
extra samples; the pairing stays by full point and seed. See docs/sweep-report.md.

Outputs: a text table (:func:`text_table`), CSV (:func:`write_csv`), Parquet through DuckDB
(:func:`write_parquet`, optional) and one offline HTML page (:func:`render_sweep_html`) in
the look of ``apfsim report``, with line plots along the first grouped axis and the report's
own figures for the two end points of that axis. :func:`speedup_figure` writes the ratio plot
as a PNG or SVG file.

Example::

    from pathlib import Path
    from apfsim.sweep.report import aggregate, text_table, write_output
    agg = aggregate(Path("sweep.db"), by=["host.swap.mean_us"])
    print(text_table(agg, "kind.compute.work_rate"))
    write_output(agg, Path("sweep.html"), "kind.compute.work_rate")

The modules: :mod:`.files` (reading the database, output files), :mod:`.aggregate`,
:mod:`.labels`, :mod:`.export` (text, CSV, Parquet), :mod:`.figures` and :mod:`.html`.

The database is only read (``PRAGMA query_only``): a report never changes it, works on a file
it may not write, and can be made while the sweep is still running (of the runs finished so
far).
"""

from __future__ import annotations

from apfsim.sweep.report.aggregate import (
    GroupStats,
    SweepAggregate,
    aggregate,
    aggregate_runs,
    choose_metric,
    default_metric,
)
from apfsim.sweep.report.export import table, text_table, write_csv, write_output, write_parquet
from apfsim.sweep.report.figures import MAX_PANELS, speedup_figure
from apfsim.sweep.report.files import (
    OUTPUT_SUFFIXES,
    SweepInfo,
    SweepReportError,
    check_output,
    load_sweep_db,
    point_results,
)
from apfsim.sweep.report.html import render_sweep_html
from apfsim.sweep.report.labels import axis_label, metric_label, ratio_label, sweep_context

__all__ = [
    "MAX_PANELS",
    "OUTPUT_SUFFIXES",
    "GroupStats",
    "SweepAggregate",
    "SweepInfo",
    "SweepReportError",
    "aggregate",
    "aggregate_runs",
    "axis_label",
    "check_output",
    "choose_metric",
    "default_metric",
    "load_sweep_db",
    "metric_label",
    "point_results",
    "ratio_label",
    "render_sweep_html",
    "speedup_figure",
    "sweep_context",
    "table",
    "text_table",
    "write_csv",
    "write_output",
    "write_parquet",
]
