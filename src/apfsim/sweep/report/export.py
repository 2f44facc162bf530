"""The sweep report as a table: text, CSV and Parquet (through DuckDB); and
:func:`write_output`, which picks the format from the file's suffix."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from apfsim.report.render import format_estimate
from apfsim.sweep.report.aggregate import SweepAggregate
from apfsim.sweep.report.files import DUCKDB_MISSING, SweepReportError, check_output, write_bytes
from apfsim.sweep.report.labels import format_value


def table(agg: SweepAggregate) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the CSV and Parquet outputs, one row per group (values typed:
    axis values as stored, counts as int, estimates as float or None)."""
    columns = [*agg.by, "protocol", "n", "n_paired"]
    for m in agg.metrics:
        columns += [f"{m}.mean", f"{m}.ci95"]
    for m in agg.ratio_metrics:
        columns += [f"ratio.{m}.mean", f"ratio.{m}.ci95"]
    rows: list[list[Any]] = []
    for g in agg.groups:
        row: list[Any] = [*g.values, g.protocol, g.n, g.n_paired]
        for m in agg.metrics:
            row += [g.metrics[m].mean, g.metrics[m].ci95]
        for m in agg.ratio_metrics:
            row += [g.ratios[m].mean, g.ratios[m].ci95]
        rows.append(row)
    return columns, rows


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return json.dumps(value, sort_keys=True)  # true/false, lists, tables
    return str(value)


def _csv_text(agg: SweepAggregate) -> str:
    columns, rows = table(agg)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_csv_cell(v) for v in row] for row in rows)
    return buf.getvalue()


def write_csv(agg: SweepAggregate, output: Path) -> Path:
    """The table as CSV: empty cells for missing values, floats at full (repr) precision."""
    write_bytes(output, _csv_text(agg).encode("utf-8"))
    return output


def _sql_type(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "BIGINT"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return "DOUBLE"
    if all(isinstance(v, bool) for v in present):
        return "BOOLEAN"
    return "VARCHAR"


def write_parquet(agg: SweepAggregate, output: Path) -> Path:
    """The table as Parquet, written by DuckDB (``pip install 'apfsim[parquet]'``)."""
    try:
        import duckdb
    except ImportError:
        raise SweepReportError(DUCKDB_MISSING) from None
    columns, rows = table(agg)
    axes = len(agg.by)
    types = [_sql_type([row[i] for row in rows]) for i in range(axes)]
    types += ["VARCHAR", "BIGINT", "BIGINT"] + ["DOUBLE"] * (len(columns) - axes - 3)
    for row in rows:
        for i, kind in enumerate(types[:axes]):
            if kind == "VARCHAR" and row[i] is not None and not isinstance(row[i], str):
                row[i] = json.dumps(row[i], sort_keys=True)  # lists, tables, mixed types
            elif kind == "DOUBLE" and row[i] is not None:
                row[i] = float(row[i])
    con = duckdb.connect()
    try:
        spec = ", ".join(
            f'"{c.replace(chr(34), chr(34) * 2)}" {t}' for c, t in zip(columns, types, strict=True)
        )
        con.execute(f"CREATE TABLE sweep_report ({spec})")
        if rows:
            marks = ", ".join("?" for _ in columns)
            con.executemany(f"INSERT INTO sweep_report VALUES ({marks})", rows)
        try:
            con.table("sweep_report").write_parquet(str(output))
        except (duckdb.IOException, OSError) as err:
            raise SweepReportError(
                f"cannot write {str(output)!r} ({err}); choose a writable location"
            ) from None
    finally:
        con.close()
    return output


def text_table(agg: SweepAggregate, metric: str) -> str:
    """The compact table printed without ``-o``: grouped axes, protocol, n, the metric's
    mean ± CI and (for a work rate) its paired ratio to the baseline ± CI."""
    is_rate = metric in agg.ratio_metrics
    header = [*agg.by, "protocol", "n", metric]
    if is_rate:
        header.append(f"ratio to {agg.baseline}")
    lines = [header]
    for g in agg.groups:
        row = [*(format_value(v) for v in g.values), g.protocol, str(g.n)]
        row.append(format_estimate(g.metrics[metric]))
        if is_rate:
            row.append(format_estimate(g.ratios[metric]))
        lines.append(row)
    text_columns = len(agg.by) + 1  # left-aligned: the axes' values and the protocol
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [
            c.ljust(w) if i < text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    runs = sum(agg.info.counts.values())
    failed = agg.info.counts.get("error", 0)
    note = (
        f"sweep {agg.info.name}: {len(agg.runs)} completed runs of {runs}"
        + (f" ({failed} failed)" if failed else "")
        + "; mean ± 95 % CI"
        + (f"; ratios paired with {agg.baseline} by point and seed" if is_rate else "")
    )
    return "\n".join([*out, note])


def write_output(agg: SweepAggregate, output: Path, metric: str | None = None) -> Path:
    """Write the report in the format of ``output``'s suffix (.html, .csv or .parquet)."""
    kind = check_output(output)
    if kind == ".csv":
        return write_csv(agg, output)
    if kind == ".parquet":
        return write_parquet(agg, output)
    from apfsim.sweep.report.html import render_sweep_html

    write_bytes(output, render_sweep_html(agg, metric).encode("utf-8"))
    return output
