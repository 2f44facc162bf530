"""``apfsim report``, ``plot``, ``sweep-report`` and ``trace-stats``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from apfsim.cli.common import (
    _check_json_path,
    _fail,
    _write_json,
    app,
)
from apfsim.trace import read_trace
from apfsim.trace.stats import trace_stats_text

ResultsArgument = Annotated[
    list[Path],
    typer.Argument(
        help="Results JSON files: 'run --json' (one per seed) or 'compare --json'.",
        metavar="RESULTS.json",
        show_default=False,
    ),
]


@app.command("report")
def report_command(
    results: ResultsArgument,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The HTML file to write (one page, offline).")
    ] = Path("report.html"),
) -> None:
    """Write one self-contained HTML report (figures, tables, scenario) of results files."""
    _write_report(results, output, plots=False)


@app.command("plot")
def plot_command(
    results: ResultsArgument,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for the PNG and SVG files.")
    ] = Path("plots"),
) -> None:
    """Write the report's figures as PNG and SVG files into a directory."""
    _write_report(results, output, plots=True)


def _write_report(results: list[Path], output: Path, plots: bool) -> None:
    """``report`` (one HTML file) and ``plot`` (the figures' files): print what was written."""
    from apfsim.report import ReportError, write_plots, write_report

    try:
        written = write_plots(results, output) if plots else [write_report(results, output)]
    except ReportError as err:
        raise _fail(str(err)) from None
    for path in written:
        print(path)


@app.command("trace-stats")
def trace_stats_command(
    trace_file: Annotated[
        Path, typer.Argument(help="A text trace: apfsim --ftrace, trace-cmd report, perf script.")
    ],
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the statistics as JSON here.")
    ] = None,
) -> None:
    """Async PF statistics of a kernel-format text trace (ours or a real host's)."""
    _check_json_path(json_path)
    try:
        with trace_file.open(encoding="utf-8", errors="replace") as lines:
            stats = read_trace(lines)
    except FileNotFoundError:
        raise _fail(f"trace-stats: no file {str(trace_file)!r}; give a text trace") from None
    except IsADirectoryError:
        raise _fail(f"trace-stats: {str(trace_file)!r} is a directory; give a file") from None
    except OSError as err:
        raise _fail(f"trace-stats: cannot read {str(trace_file)!r} ({err.strerror})") from None
    if stats.kvm_events == 0:
        for bad in stats.malformed[:5]:
            print(f"apfsim: {trace_file}:{bad.line_no}: malformed: {bad.reason}", file=sys.stderr)
        if stats.malformed_count:
            raise _fail(
                f"trace-stats: all {stats.malformed_count} kvm async-PF lines of "
                f"{str(trace_file)!r} are malformed (see above); is it a trace-cmd report?"
            )
        if _only_headers(trace_file):
            raise _fail(
                f"trace-stats: {str(trace_file)!r} has no events at all, only its header; an "
                "apfsim --ftrace file is empty when its --trace-window held no events (a "
                "window after the run's end): give a window inside the run"
            )
        raise _fail(
            f"trace-stats: {str(trace_file)!r} has no kvm events in trace-cmd, ftrace or "
            "perf-script layout; record with: trace-cmd record -e kvm"
        )
    print(trace_stats_text(stats))
    for bad in stats.malformed:
        print(f"apfsim: {trace_file}:{bad.line_no}: malformed: {bad.reason}", file=sys.stderr)
    if stats.malformed_count > len(stats.malformed):
        print(
            f"apfsim: ... and {stats.malformed_count - len(stats.malformed)} more malformed lines",
            file=sys.stderr,
        )
    if json_path is not None:
        _write_json(json_path, stats.to_dict())


def _only_headers(path: Path) -> bool:
    """The file holds nothing but a ``cpus=N`` header and blank lines: the text trace of a
    window without events (ours, or a ``trace-cmd report`` of an empty recording)."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        return all(not line.strip() or line.startswith("cpus=") for line in lines)


@app.command("sweep-report")
def sweep_report_command(
    db: Annotated[Path, typer.Argument(help="The SQLite file of 'apfsim sweep'.")],
    sweep: Annotated[
        str | None, typer.Option(help="Sweep to report (needed if the file holds several).")
    ] = None,
    by: Annotated[
        list[str] | None,
        typer.Option(
            "--by",
            help="Group by these axes (repeatable or comma-separated; the first is the plots' "
            "x axis). Default: every axis; axes left out are pooled.",
        ),
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Protocol of the ratios (default: the sweep's baseline).")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(help="Metric of the table and plots (default: kind.compute.work_rate)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write .html, .csv or .parquet (DuckDB) instead of a table."
        ),
    ] = None,
) -> None:
    """Aggregate a sweep: mean ± 95 % CI per point and protocol, paired ratios to a baseline."""
    from apfsim.sweep.report import (
        SweepReportError,
        aggregate,
        check_output,
        choose_metric,
        text_table,
        write_output,
    )

    axes = None
    if by:
        axes = [a.strip() for value in by for a in value.split(",")]
        if not all(axes):
            raise _fail(f"--by: empty axis name in {', '.join(map(repr, by))}")
    try:
        if output is not None:
            check_output(output)
        agg = aggregate(db, sweep, axes, baseline)
        chosen = choose_metric(agg, metric)
        if output is None:
            print(text_table(agg, chosen))
            return
        written = write_output(agg, output, chosen)
    except SweepReportError as err:
        raise _fail(str(err)) from None
    print(written)
