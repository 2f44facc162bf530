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

The database is only read (``PRAGMA query_only``): a report never changes it, works on a file
it may not write, and can be made while the sweep is still running (of the runs finished so
far).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apfsim.metrics.results import InvalidResults
from apfsim.metrics.units import ops_unit, rate_unit
from apfsim.report.data import (
    ReportData,
    ReportError,
    RunRecord,
    Source,
    parse_protocol_result,
    run_estimates,
    run_ratios,
)
from apfsim.report.figures import (
    FIGURE_WIDTH_IN,
    PROTOCOL_COLOURS,
    add_footer,
    crosses_zero,
    draw_figure,
    inline_svg,
    render_figures,
    require,
    small_n_text,
)
from apfsim.report.render import FigureView, Table, figure_tables, format_estimate
from apfsim.stats import Estimate, estimate, paired_ratios
from apfsim.sweep.store import SCHEMA_VERSION, StoredRun

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MAX_PANELS",
    "OUTPUT_SUFFIXES",
    "GroupStats",
    "SweepAggregate",
    "SweepInfo",
    "SweepReportError",
    "aggregate",
    "aggregate_runs",
    "check_output",
    "choose_metric",
    "default_metric",
    "load_sweep_db",
    "point_results",
    "render_sweep_html",
    "speedup_figure",
    "table",
    "text_table",
    "write_csv",
    "write_output",
    "write_parquet",
]

MAX_PANELS = 12
"""At most this many panels (combinations of the grouped axes after the first) per figure."""

OUTPUT_SUFFIXES = (".html", ".csv", ".parquet")
_FIGURE_SUFFIXES = (".png", ".svg")
_LOG_SPAN = 20.0  # x values spanning more than this factor get a log scale
_LOG_Y_SPAN = 100.0  # positive means spanning more than this factor get a log y axis

_AXIS_LABELS = {
    "host.swap.mean_us": "swap mean latency (µs)",
    "host.memory_limit_mib": "host memory limit (MiB)",
    "guest.memory_mib": "guest memory (MiB)",
    "guest.vcpus": "vCPUs",
    "initial_memory.resident_fraction": "initially resident fraction",
    "initial_memory.swapped_fraction": "initially swapped fraction",
}
_UNIT_SUFFIXES = (("_us", "µs"), ("_ms", "ms"), ("_mib", "MiB"), ("_s", "s"), ("_pages", "pages"))


def axis_label(axis: str) -> str:
    """A sweep axis (a scenario key) as a reader names it: ``host.swap.mean_us`` ->
    ``swap mean latency (µs)``; unknown keys lose dots and underscores and gain a unit."""
    if axis in _AXIS_LABELS:
        return _AXIS_LABELS[axis]
    name = axis.split(".", 1)[-1] if "." in axis else axis
    for suffix, unit in _UNIT_SUFFIXES:
        if name.endswith(suffix):
            return f"{name.removesuffix(suffix).replace('.', ' ').replace('_', ' ')} ({unit})"
    return name.replace(".", " ").replace("_", " ")


def metric_label(metric: str) -> str:
    """A stored metric as a reader names it: ``kind.random_writer.ops_rate`` ->
    ``random_writer writes/s``, ``fault_in_latency_us.p50`` -> ``fault-in latency p50 (µs)``."""
    parts = metric.split(".")
    head, last = parts[0], parts[-1]
    name = ".".join(parts[1:-1])
    if head == "kind" and len(parts) >= 3:
        what = {
            "ops_rate": rate_unit(name),
            "work_rate": "CPU s/s" if ops_unit(name) is None else "work rate (CPU s/s)",
            "work_s": "work (s)",
        }.get(last, last.replace("_", " "))
        return f"{name} {what}"
    if head == "task" and len(parts) >= 3:
        what = {
            "ops_rate": "ops/s",
            "work_rate": "throughput (CPU s/s)",
            "work_s": "work (s)",
            "completion_s": "completion time (s)",
            "completion_speedup": "completion speedup",
        }.get(last, last.replace("_", " "))
        return f"task {name} {what}"
    if head == "vcpu_time_s":
        return f"vCPU time in {last} (s)"
    if head == "apf":
        return f"APF counter {last}"
    if head in ("fault_in_latency_us", "not_present_to_ready_us"):
        what = "fault-in latency" if head.startswith("fault") else "not-present to ready"
        return f"{what} {last} (µs)"
    if metric == "faults.per_s":
        return "stage-2 faults/s"
    if metric == "sim_time_s":
        return "simulated time (s)"
    return metric.replace("_", " ")


def ratio_label(metric: str, baseline: str) -> str:
    """The label of a metric's paired ratio: ``random_writer writes/s, ratio to sync``."""
    return f"{metric_label(metric)}, ratio to {baseline}"


def sweep_context(agg: SweepAggregate) -> str:
    """Scenario, seeds and duration: the footer that keeps a pasted figure's context."""
    info = agg.info
    seeds = ", ".join(map(str, info.seeds))
    duration = info.spec.get("duration_s")
    sim = "" if duration is None else f" · {duration:g} s simulated per run"
    return (
        f"apfsim sweep {info.name} · scenario {info.spec.get('scenario', '?')} · seeds "
        f"{seeds} (n = {len(info.seeds)}){sim}"
    )


_DUCKDB = "duckdb is not installed; pip install 'apfsim[parquet]' (or write .csv: no extra)"


class SweepReportError(Exception):
    """A database, option or output the report cannot use; the message is one line naming
    the problem and the fix."""


@dataclass(frozen=True, slots=True)
class SweepInfo:
    """One row of the database's ``sweeps`` table, and how many runs it has by status."""

    name: str
    description: str
    spec: dict[str, Any]  # the sweep file as parsed (TOML data)
    axes: tuple[str, ...]
    protocols: tuple[str, ...]
    seeds: tuple[int, ...]
    baseline: str
    counts: dict[str, int]  # status ("ok", "error") -> runs


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One group: the runs of one protocol whose grouped axes have these values."""

    values: tuple[Any, ...]  # the grouped axes' values, in ``SweepAggregate.by`` order
    protocol: str
    n: int  # runs in the group
    n_paired: int  # of them, runs with a baseline run of the same point and seed
    points: tuple[int, ...]  # the sweep points pooled into the group
    metrics: dict[str, Estimate]  # every metric -> its estimate over the group's runs
    ratios: dict[str, Estimate]  # every work rate -> estimate of the paired ratios


@dataclass(frozen=True, slots=True)
class SweepAggregate:
    """The groups of a sweep, ordered by the ``by`` axes in turn (each axis's values in the
    order the sweep lists them), then by the sweep's protocol order.

    ``runs`` are read without their full results (``result`` is None): the statistics need
    the metrics only, and a large sweep's results take memory. The HTML page reads the few
    it shows from ``db_path`` (:func:`point_results`).
    """

    info: SweepInfo
    by: tuple[str, ...]
    baseline: str
    metrics: tuple[str, ...]  # every metric with at least one value, sorted
    ratio_metrics: tuple[str, ...]  # the work rates among them
    groups: tuple[GroupStats, ...]
    runs: tuple[StoredRun, ...]  # the completed runs, by (point, protocol, seed)
    db_path: Path | None = None  # where the runs' full results can be read

    def group(self, values: Sequence[Any], protocol: str) -> GroupStats:
        wanted = _value_key(tuple(values))
        for g in self.groups:
            if g.protocol == protocol and _value_key(g.values) == wanted:
                return g
        raise KeyError((tuple(values), protocol))


# ------------------------------------------------------------------------------ reading


def _value_key(value: Any) -> str:
    """A hashable, exact identity for axis values (which may be lists or tables)."""
    return json.dumps(value, sort_keys=True)


def _connect(db_path: Path) -> sqlite3.Connection:
    """A read-only connection to an apfsim sweep database (raises SweepReportError)."""
    shown = repr(str(db_path))
    fix = "give the --db file of 'apfsim sweep'"
    if not db_path.exists():
        raise SweepReportError(f"sweep database {shown} does not exist; {fix}")
    if db_path.is_dir():
        raise SweepReportError(f"{shown} is a directory, not a sweep database; {fix}")
    try:
        # Not mode=ro: a read-only connection leaves -wal and -shm files behind. SQLite
        # falls back to read-only by itself for a file it may not write.
        db = sqlite3.connect(db_path)
    except sqlite3.Error as err:
        raise SweepReportError(f"cannot open {shown} ({err}); {fix}") from None
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA query_only = ON")  # a report never changes the database
        tables = {r["name"] for r in db.execute("SELECT name FROM sqlite_master")}
        if not {"meta", "sweeps", "runs"} <= tables:
            raise SweepReportError(
                f"{shown} is not an apfsim sweep database (no sweeps and runs tables); {fix}"
            )
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as err:
        db.close()
        raise SweepReportError(f"{shown} is not an apfsim sweep database ({err}); {fix}") from None
    except SweepReportError:
        db.close()
        raise
    if row is None or row["value"] != str(SCHEMA_VERSION):
        version = "none" if row is None else repr(row["value"])
        db.close()
        raise SweepReportError(
            f"{shown} has sweep schema version {version}, but this apfsim reads "
            f"{SCHEMA_VERSION}; run the sweep again with this apfsim"
        )
    return db


# The columns of ``runs`` but the full result (read on demand: point_results).
_RUN_COLUMNS = "key, point, params, protocol, seed, error, metrics, NULL AS result"


def load_sweep_db(db_path: Path, sweep: str | None = None) -> tuple[SweepInfo, list[StoredRun]]:
    """The sweep's description and its completed runs, by (point, protocol, seed), without
    their full results (``StoredRun.result`` is None; see :func:`point_results`).

    ``sweep`` may be omitted when the database holds exactly one sweep.
    """
    db = _connect(db_path)
    try:
        try:
            rows = db.execute("SELECT * FROM sweeps ORDER BY name").fetchall()
            names = [r["name"] for r in rows]
            if not names:
                raise SweepReportError(
                    f"{str(db_path)!r} holds no sweep; run one with 'apfsim sweep'"
                )
            if sweep is None:
                if len(names) > 1:
                    raise SweepReportError(
                        f"{str(db_path)!r} holds {len(names)} sweeps; choose one with "
                        f"--sweep: {', '.join(names)}"
                    )
                sweep = names[0]
            if sweep not in names:
                raise SweepReportError(
                    f"--sweep: no sweep {sweep!r} in {str(db_path)!r}; it holds: {', '.join(names)}"
                )
            r = rows[names.index(sweep)]
            counts = {
                c["status"]: c["n"]
                for c in db.execute(
                    "SELECT status, COUNT(*) AS n FROM runs WHERE sweep = ? GROUP BY status",
                    (sweep,),
                )
            }
            spec = json.loads(r["spec"])
            info = SweepInfo(
                name=r["name"],
                description=str(spec.get("description", "")) if isinstance(spec, dict) else "",
                spec=spec if isinstance(spec, dict) else {},
                axes=tuple(json.loads(r["axes"])),
                protocols=tuple(json.loads(r["protocols"])),
                seeds=tuple(json.loads(r["seeds"])),
                baseline=r["baseline"],
                counts=counts,
            )
            runs = [
                StoredRun(row)
                for row in db.execute(
                    f"SELECT {_RUN_COLUMNS} FROM runs WHERE sweep = ? AND status = 'ok' "
                    "ORDER BY point, protocol, seed",
                    (sweep,),
                )
            ]
        except (sqlite3.DatabaseError, ValueError, KeyError, IndexError) as err:
            raise SweepReportError(
                f"{str(db_path)!r} is not a readable apfsim sweep database ({err}); "
                "run the sweep again"
            ) from None
    finally:
        db.close()
    return info, runs


# -------------------------------------------------------------------------- aggregation


def point_results(db_path: Path, sweep: str, point: int) -> dict[str, dict[str, Any]]:
    """The full results (docs/results-schema.md) of a point's completed runs, by run key."""
    db = _connect(db_path)
    try:
        rows = db.execute(
            "SELECT key, result FROM runs WHERE sweep = ? AND point = ? AND status = 'ok' "
            "AND result IS NOT NULL",
            (sweep, point),
        ).fetchall()
        return {r["key"]: json.loads(r["result"]) for r in rows}
    except (sqlite3.DatabaseError, ValueError) as err:
        raise SweepReportError(
            f"{str(db_path)!r}: cannot read the results of point {point} ({err}); "
            "run the sweep again"
        ) from None
    finally:
        db.close()


def aggregate(
    db_path: Path,
    sweep: str | None = None,
    by: Sequence[str] | None = None,
    baseline: str | None = None,
) -> SweepAggregate:
    """Read a sweep from its database and aggregate it (raises SweepReportError)."""
    info, runs = load_sweep_db(db_path, sweep)
    return replace(aggregate_runs(info, runs, by, baseline), db_path=db_path)


def aggregate_runs(
    info: SweepInfo,
    runs: Sequence[StoredRun],
    by: Sequence[str] | None = None,
    baseline: str | None = None,
) -> SweepAggregate:
    """Group ``runs`` by the ``by`` axes (default: all) and protocol; estimates per group."""
    axes = tuple(by) if by is not None else info.axes
    for axis in axes:
        if axis not in info.axes:
            known = ", ".join(info.axes) if info.axes else "none (the sweep has no axis)"
            raise SweepReportError(
                f"--by: {axis!r} is not an axis of sweep {info.name!r}; its axes: {known}"
            )
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:
        raise SweepReportError(f"--by: axis {repeated[0]!r} given more than once")
    base = info.baseline if baseline is None else baseline
    if base not in info.protocols:
        raise SweepReportError(
            f"--baseline: {base!r} is not a protocol of sweep {info.name!r}; "
            f"its protocols: {', '.join(info.protocols)}"
        )
    if not runs:
        failed = info.counts.get("error", 0)
        why = f" ({failed} failed; see their errors in the runs table)" if failed else ""
        raise SweepReportError(
            f"sweep {info.name!r} has no completed run{why}; run 'apfsim sweep' first"
        )
    found: dict[str, None] = {}
    for run in runs:
        found.update(dict.fromkeys(k for k, v in run.metrics.items() if v is not None))
    metrics = tuple(sorted(found))
    ratio_metrics = tuple(m for m in metrics if m.endswith((".work_rate", ".ops_rate")))
    baseline_runs = {(_value_key(r.params), r.seed): r for r in runs if r.protocol == base}
    members: dict[tuple[str, str], list[StoredRun]] = {}
    values: dict[str, tuple[Any, ...]] = {}
    ranks: list[dict[str, int]] = [{} for _ in axes]  # per axis: value -> first appearance
    for run in runs:  # in point order: each axis's values as the sweep file lists them
        group_values = tuple(run.params.get(a) for a in axes)
        for rank, value in zip(ranks, group_values, strict=True):
            rank.setdefault(_value_key(value), len(rank))
        key = _value_key(group_values)
        values.setdefault(key, group_values)
        members.setdefault((key, run.protocol), []).append(run)
    order = sorted(
        values,
        key=lambda k: [r[_value_key(v)] for r, v in zip(ranks, values[k], strict=True)],
    )
    protocol_order = list(info.protocols)
    protocol_order += sorted({r.protocol for r in runs} - set(protocol_order))
    groups = []
    for key in order:
        group_values = values[key]
        for protocol in protocol_order:
            group_runs = members.get((key, protocol))
            if group_runs is None:
                continue
            pairs = [
                (r, b)
                for r in group_runs
                if (b := baseline_runs.get((_value_key(r.params), r.seed))) is not None
            ]
            groups.append(
                GroupStats(
                    values=group_values,
                    protocol=protocol,
                    n=len(group_runs),
                    n_paired=len(pairs),
                    points=tuple(sorted({r.point for r in group_runs})),
                    metrics={m: estimate([r.metrics.get(m) for r in group_runs]) for m in metrics},
                    ratios={
                        m: estimate(
                            paired_ratios(
                                [r.metrics.get(m) for r, _ in pairs],
                                [b.metrics.get(m) for _, b in pairs],
                            )
                        )
                        for m in ratio_metrics
                    },
                )
            )
    return SweepAggregate(info, axes, base, metrics, ratio_metrics, tuple(groups), tuple(runs))


def default_metric(agg: SweepAggregate) -> str:
    """``kind.compute.work_rate`` if the sweep has it, else its first work rate."""
    if "kind.compute.work_rate" in agg.ratio_metrics:
        return "kind.compute.work_rate"
    if agg.ratio_metrics:
        return agg.ratio_metrics[0]
    raise SweepReportError(
        f"sweep {agg.info.name!r} has no work rate metric; choose one with --metric: "
        f"{', '.join(agg.metrics)}"
    )


def choose_metric(agg: SweepAggregate, metric: str | None) -> str:
    """``metric`` if the sweep has it (raises SweepReportError), else the default."""
    if metric is None:
        return default_metric(agg)
    if metric not in agg.metrics:
        raise SweepReportError(
            f"--metric: sweep {agg.info.name!r} has no metric {metric!r}; it has: "
            f"{', '.join(agg.metrics)}"
        )
    return metric


# ------------------------------------------------------------------------------- tables


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


def _write_bytes(output: Path, data: bytes) -> None:
    try:
        output.write_bytes(data)
    except OSError as err:
        raise SweepReportError(
            f"cannot write {str(output)!r} ({err.strerror}); choose a writable location"
        ) from None


def write_csv(agg: SweepAggregate, output: Path) -> Path:
    """The table as CSV: empty cells for missing values, floats at full (repr) precision."""
    _write_bytes(output, _csv_text(agg).encode("utf-8"))
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
        raise SweepReportError(_DUCKDB) from None
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


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _point_label(axes: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{a}={_fmt_value(v)}" for a, v in zip(axes, values, strict=True))


def text_table(agg: SweepAggregate, metric: str) -> str:
    """The compact table printed without ``-o``: grouped axes, protocol, n, the metric's
    mean ± CI and (for a work rate) its paired ratio to the baseline ± CI."""
    is_rate = metric in agg.ratio_metrics
    header = [*agg.by, "protocol", "n", metric]
    if is_rate:
        header.append(f"ratio to {agg.baseline}")
    lines = [header]
    for g in agg.groups:
        row = [*(_fmt_value(v) for v in g.values), g.protocol, str(g.n)]
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


# ------------------------------------------------------------------------------ figures


def _draw(
    name: str, build: Callable[[Figure], str], formats: Sequence[str]
) -> tuple[str, dict[str, bytes]]:
    """Build one figure in the report's style; its caption and the saved bytes per format."""
    try:
        require("matplotlib")
    except ReportError as err:
        raise SweepReportError(str(err)) from None
    return draw_figure(name, build, formats)


def _colour(agg: SweepAggregate, protocol: str) -> str:
    order = list(agg.info.protocols)
    index = order.index(protocol) if protocol in order else len(order)
    return PROTOCOL_COLOURS[index % len(PROTOCOL_COLOURS)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class _Panels:
    """The groups laid out for line plots: x values along the first axis, one panel per
    combination of the other grouped axes (the first MAX_PANELS of them)."""

    x_axis: str
    xs: list[Any]  # distinct x values, sorted when numeric
    numeric: bool
    log: bool
    panel_axes: tuple[str, ...]
    panels: list[tuple[Any, ...]]  # shown combinations of the other axes
    total_panels: int


def _panels(agg: SweepAggregate) -> _Panels:
    if not agg.by:
        raise SweepReportError(
            f"sweep {agg.info.name!r} has no axis to plot along; write .csv or .parquet, "
            "or print the table (no -o)"
        )
    seen: dict[str, Any] = {}
    combos: dict[str, tuple[Any, ...]] = {}
    for g in agg.groups:
        seen.setdefault(_value_key(g.values[0]), g.values[0])
        combos.setdefault(_value_key(g.values[1:]), g.values[1:])
    xs = list(seen.values())
    numeric = all(_is_number(x) for x in xs)
    if numeric:
        xs.sort()
    log = numeric and xs[0] > 0 and xs[-1] / xs[0] > _LOG_SPAN
    panels = list(combos.values())
    return _Panels(agg.by[0], xs, numeric, log, agg.by[1:], panels[:MAX_PANELS], len(panels))


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _line_figure(
    fig: Figure, agg: SweepAggregate, metric: str, ratio: bool, title: str | None = None
) -> str:
    """Lines along the first grouped axis, one per protocol (the baseline left out of a
    ratio plot: it is the dashed line at 1), 95 % CI error bars, one panel per combination
    of the other grouped axes. Returns the caption."""
    layout = _panels(agg)
    protocols = list(dict.fromkeys(g.protocol for g in agg.groups))
    if ratio:
        protocols = [p for p in protocols if p != agg.baseline]
    n = len(layout.panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig.set_size_inches(FIGURE_WIDTH_IN, 3.4 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    by_key = {(_value_key(g.values), g.protocol): g for g in agg.groups}
    positions = layout.xs if layout.numeric else list(range(len(layout.xs)))
    estimates: list[Estimate | None] = []
    plotted: list[float] = []
    for i, combo in enumerate(layout.panels):
        ax = axes[i // ncols][i % ncols]
        for protocol in protocols:
            ests = []
            for x in layout.xs:
                g = by_key.get((_value_key((x, *combo)), protocol))
                table_ = None if g is None else (g.ratios if ratio else g.metrics)
                ests.append(None if table_ is None else table_.get(metric))
            ys = [_nan(None if e is None else e.mean) for e in ests]
            if all(math.isnan(y) for y in ys):
                continue
            estimates += ests
            plotted += [y for y in ys if not math.isnan(y)]
            errs = [0.0 if e is None or e.ci95 is None else e.ci95 for e in ests]
            ax.errorbar(
                positions,
                ys,
                yerr=errs,
                color=_colour(agg, protocol),
                label=protocol,
                marker="o",
                markersize=3.5,
                capsize=3,
                elinewidth=1.0,
                linewidth=1.4,
            )
        if ratio:
            ax.axhline(1.0, color="#333333", linewidth=1.0, linestyle="--")
        if layout.log:
            ax.set_xscale("log")
        if not layout.numeric:
            ax.set_xticks(positions, [_fmt_value(x) for x in layout.xs])
        if layout.panel_axes:
            ax.set_title(_point_label(layout.panel_axes, combo), fontsize=8.5)
        if i + ncols >= n:  # no panel below this one
            ax.set_xlabel(axis_label(layout.x_axis))
        if i % ncols == 0:
            ax.set_ylabel(ratio_label(metric, agg.baseline) if ratio else metric_label(metric))
    log_y = not ratio and bool(plotted) and min(plotted) > 0
    log_y = log_y and max(plotted) / min(plotted) > _LOG_Y_SPAN
    for row in axes:
        for ax in row:
            if log_y and ax.get_visible():
                ax.set_yscale("log")
    for j in range(n, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    legend: dict[str, Any] = {}  # label -> handle, from every panel (one may lack a line)
    for row in axes:
        for ax in row:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
    if legend:
        shown = [p for p in protocols if p in legend]
        fig.legend([legend[p] for p in shown], shown, loc="outside right upper", frameon=False)
    pooled = [a for a in agg.info.axes if a not in agg.by]
    seeds = len(agg.info.seeds)
    warning = small_n_text(seeds) if ratio and crosses_zero(estimates) else ""
    if title is not None or warning:
        heading = "\n".join(t for t in (title, warning) if t)
        fig.suptitle(heading, color="#b22222" if warning and title is None else "black")
    add_footer(fig, sweep_context(agg))
    parts = []
    if ratio:
        parts.append(
            f"{metric_label(metric)} ({metric}) of each run divided by {agg.baseline}'s on "
            "the same point and seed, "
            f"then the mean of those ratios over the group (above the dashed line at 1 is "
            f"better than {agg.baseline})"
        )
    else:
        parts.append(f"Mean {metric_label(metric)} ({metric}) over the group's runs")
    parts.append(
        f"along {axis_label(layout.x_axis)} ({layout.x_axis}"
        f"{', log scale' if layout.log else ''}), one line per protocol"
    )
    if log_y:
        parts.append("log y axis: the means span more than two orders of magnitude")
    if layout.panel_axes:
        parts.append(f"one panel per {', '.join(layout.panel_axes)}")
    text = "; ".join(parts) + ". "
    text += (
        "Error bars: 95 % confidence interval of the mean (Student t, n−1 degrees of "
        f"freedom) over the {seeds} seed{'s' if seeds != 1 else ''}"
    )
    text += f" and the values of {', '.join(pooled)} (pooled)." if pooled else "."
    if layout.total_panels > len(layout.panels):
        text += (
            f" Only the first {len(layout.panels)} of {layout.total_panels} panels are shown; "
            "choose fewer axes with --by."
        )
    if warning:
        text += f" Warning: {warning}."
    return text


# --------------------------------------------------------------------------------- HTML

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="apfsim {{ version }}">
<title>apfsim sweep report: {{ name }}</title>
{{ style | safe }}
</head>
<body>
{%- macro render_table(table) %}
<table>
  <caption>{{ table.title }}</caption>
  <thead><tr><th>{{ table.corner }}</th>
    {%- for column in table.columns %}<th>{{ column }}</th>{% endfor %}</tr></thead>
  <tbody>
  {%- for label, cells in table.rows %}
    <tr><td class="label">{{ label }}</td>
      {%- for cell in cells %}<td class="num">{{ cell }}</td>{% endfor %}</tr>
  {%- endfor %}
  </tbody>
</table>
{%- if table.note %}<p class="lead">{{ table.note }}</p>{% endif %}
{%- endmacro %}
{%- macro render_figure(figure) %}
<figure class="figure" data-figure="{{ figure.name }}">
{{ figure.svg | safe }}
<figcaption>{{ figure.caption }}</figcaption>
</figure>
{%- for table in figure.tables %}
{{ render_table(table) }}
{%- endfor %}
{%- endmacro %}
<header>
<h1>apfsim sweep report: {{ name }}</h1>
<p class="lead">{{ description }}</p>
<dl>
{%- for term, value in facts %}
  <dt>{{ term }}</dt><dd>{{ value }}</dd>
{%- endfor %}
</dl>
</header>
<main>
{%- for figure in figures %}
<section id="{{ figure.name }}">
<h2>{{ figure.title }}</h2>
{{ render_figure(figure) }}
</section>
{%- endfor %}
{%- if note %}
<p class="lead">{{ note }}</p>
{%- endif %}
{%- for detail in details %}
<section id="{{ detail.anchor }}">
<h2>{{ detail.heading }}</h2>
<p class="lead">{{ detail.lead }}</p>
{%- for figure in detail.figures %}
<h3>{{ figure.title }}</h3>
{{ render_figure(figure) }}
{%- endfor %}
</section>
{%- endfor %}
<section id="sweep-file">
<h2>Sweep file</h2>
<p class="lead">The sweep as it was run (the sweep file's content), from the database.</p>
<pre>{{ spec_json }}</pre>
</section>
</main>
</body>
</html>
"""


@dataclass(frozen=True, slots=True)
class _Detail:
    anchor: str
    heading: str
    lead: str
    figures: list[FigureView]


def _style() -> str:
    """The ``<style>`` element of apfsim's report template: the same look."""
    text = (resources.files("apfsim.report") / "templates" / "report.html.j2").read_text("utf-8")
    match = re.search(r"<style>.*?</style>", text, re.DOTALL)
    if match is None:  # the package's own file: a broken install
        raise SweepReportError("apfsim's report template has no <style>; reinstall apfsim")
    return match.group(0).replace("</style>", "  h3 { font-size: 1.05em; }\n</style>")


def _estimate_table(
    agg: SweepAggregate, metric: str, ratio: bool, title: str, note: str = ""
) -> Table:
    protocols = list(dict.fromkeys(g.protocol for g in agg.groups))
    if ratio:
        protocols = [p for p in protocols if p != agg.baseline]
    by_key = {(_value_key(g.values), g.protocol): g for g in agg.groups}
    rows = []
    for key, values in dict.fromkeys((_value_key(g.values), g.values) for g in agg.groups):
        cells = []
        for p in protocols:
            g = by_key.get((key, p))
            source = None if g is None else (g.ratios if ratio else g.metrics)
            cells.append(format_estimate(None if source is None else source.get(metric)))
        rows.append((_point_label(agg.by, values) or "all runs", cells))
    return Table(title, "group", protocols, rows, note)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _small_n_note(agg: SweepAggregate, metric: str) -> str:
    """A table note when a ratio's interval crosses 0 (too few seeds to pin it down)."""
    ests = [g.ratios.get(metric) for g in agg.groups if g.protocol != agg.baseline]
    if not crosses_zero(ests):
        return ""
    return f"Warning: {small_n_text(len(agg.info.seeds))}."


def _sweep_figures(agg: SweepAggregate, metric: str) -> list[FigureView]:
    x_axis = agg.by[0]
    n_note = "n per cell: " + ", ".join(sorted({str(g.n) for g in agg.groups}, key=int)) + " runs."
    out = []
    if metric in agg.ratio_metrics and any(
        g.ratios[metric].mean is not None for g in agg.groups if g.protocol != agg.baseline
    ):
        caption, outputs = _draw(
            "sweep-ratio", lambda fig: _line_figure(fig, agg, metric, ratio=True), ("svg",)
        )
        table_title = f"{ratio_label(metric, agg.baseline)}, paired by point and seed"
        out.append(
            FigureView(
                "sweep-ratio",
                f"Ratio to {agg.baseline} along {axis_label(x_axis)}",
                caption,
                inline_svg(outputs["svg"], "sweep-ratio-"),
                [_estimate_table(agg, metric, True, table_title, _small_n_note(agg, metric))],
            )
        )
    caption, outputs = _draw(
        "sweep-mean", lambda fig: _line_figure(fig, agg, metric, ratio=False), ("svg",)
    )
    out.append(
        FigureView(
            "sweep-mean",
            f"{metric_label(metric)} along {axis_label(x_axis)}",
            caption,
            inline_svg(outputs["svg"], "sweep-mean-"),
            [_estimate_table(agg, metric, False, f"Mean {metric_label(metric)}", n_note)],
        )
    )
    return out


def _report_data(agg: SweepAggregate, point: int) -> ReportData | None:
    """The runs of one sweep point as the report's data (every protocol and seed)."""
    runs = [r for r in agg.runs if r.point == point]
    results = {r.key: r.result for r in runs if r.result is not None}
    if len(results) < len(runs) and agg.db_path is not None:
        results.update(point_results(agg.db_path, agg.info.name, point))
    runs = [r for r in runs if r.key in results]
    if not runs:
        return None
    order = {p: i for i, p in enumerate(dict.fromkeys(g.protocol for g in agg.groups))}
    runs.sort(key=lambda r: (order.get(r.protocol, len(order)), r.seed))
    records = []
    for r in runs:
        try:
            result, cdfs = parse_protocol_result(results[r.key], f"run {r.key}")
        except InvalidResults as err:
            raise SweepReportError(
                f"sweep {agg.info.name!r}: stored result is damaged ({err}); "
                "delete the run's row and run the sweep again"
            ) from None
        records.append(RunRecord(r.seed, result, cdfs, f"point {point}"))
    protocols = list(dict.fromkeys(r.result.protocol for r in records))
    baseline = agg.baseline if agg.baseline in protocols else protocols[0]
    by_protocol = {p: [r for r in records if r.result.protocol == p] for p in protocols}
    return ReportData(
        scenario={"name": agg.info.name},
        sources=[
            Source(
                f"point {point}", "sweep", tuple(protocols), tuple(sorted({r.seed for r in runs}))
            )
        ],
        protocols=protocols,
        baseline=baseline,
        runs=records,
        metrics={p: run_estimates(by_protocol[p]) for p in protocols},
        ratios={p: run_ratios(by_protocol[p], by_protocol[baseline]) for p in protocols},
    )


def _detail_points(agg: SweepAggregate) -> list[int]:
    """The sweep points at the two ends of the x axis, the other axes as in the first run."""
    layout = _panels(agg)
    x_axis = agg.by[0]
    first = agg.runs[0].params
    candidates: dict[int, Any] = {}
    for r in agg.runs:
        if all(
            _value_key(r.params.get(a)) == _value_key(first.get(a)) for a in first if a != x_axis
        ):
            candidates.setdefault(r.point, r.params.get(x_axis))
    rank = {_value_key(x): i for i, x in enumerate(layout.xs)}
    ordered = sorted(candidates, key=lambda p: rank.get(_value_key(candidates[p]), len(rank)))
    return list(dict.fromkeys([ordered[0], ordered[-1]]))


def _details(agg: SweepAggregate) -> list[_Detail]:
    out = []
    points = _detail_points(agg)
    for i, point in enumerate(points):
        data = _report_data(agg, point)
        if data is None:
            continue
        params = next(r.params for r in agg.runs if r.point == point)
        label = _point_label(agg.info.axes, [params.get(a) for a in agg.info.axes])
        try:
            rendered = render_figures(data, ("svg",))
        except ReportError as err:
            raise SweepReportError(str(err)) from None
        figures = []
        for f in rendered:
            name = f"point{point}-{f.name}"
            figures.append(
                FigureView(
                    name,
                    f.title,
                    f.caption,
                    inline_svg(f.outputs["svg"], f"{name}-"),
                    figure_tables(data, f.name),
                )
            )
        end = "" if len(points) == 1 else ("lowest " if i == 0 else "highest ")
        seeds = ", ".join(str(s) for s in sorted({r.seed for r in data.runs}))
        out.append(
            _Detail(
                f"point{point}",
                f"Point {point}: {label}",
                f"The figures of 'apfsim report' for one point of the sweep, the {end}"
                f"{agg.by[0]} with the other axes as in the sweep's first point (every "
                f"protocol; seeds {seeds}).",
                figures,
            )
        )
    return out


def render_sweep_html(agg: SweepAggregate, metric: str | None = None) -> str:
    """The HTML page: the line plots along ``agg.by[0]`` of the metric's paired ratio and
    mean, their numbers in tables, the report's figures for the two end points of that axis,
    and the sweep file. One self-contained file: inline SVG and CSS, no script, no URL."""
    chosen = choose_metric(agg, metric)
    _panels(agg)  # an axis to plot along
    try:
        require("matplotlib", "jinja2")
    except ReportError as err:
        raise SweepReportError(str(err)) from None
    import jinja2

    from apfsim.version import __version__

    figures = _sweep_figures(agg, chosen)
    note = ""
    if not any(f.name == "sweep-ratio" for f in figures):
        note = (
            f"No ratio plot: {chosen} is not a work rate (ratios are computed for *.work_rate "
            f"metrics) or no run has a {agg.baseline} run of the same point and seed."
            if chosen not in agg.ratio_metrics
            else f"No ratio plot: no run has a {agg.baseline} run of the same point and seed."
        )
    info = agg.info
    total = sum(info.counts.values())
    failed = info.counts.get("error", 0)
    pooled = [a for a in info.axes if a not in agg.by]
    facts = [
        ("scenario", str(info.spec.get("scenario", "?"))),
        ("protocols", ", ".join(info.protocols)),
        ("baseline", agg.baseline),
        ("seeds", f"{', '.join(map(str, info.seeds))} (n = {len(info.seeds)})"),
        ("axes", ", ".join(info.axes) or "none"),
        ("grouped by", ", ".join(agg.by) or "protocol only"),
        ("pooled", ", ".join(pooled) or "none"),
        (
            "runs",
            f"{len(agg.runs)} completed of {total}" + (f", {failed} failed" if failed else ""),
        ),
        ("metric", chosen),
    ]
    if "duration_s" in info.spec:
        facts.insert(1, ("simulated time", f"{info.spec['duration_s']:g} s per run"))
    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    return env.from_string(_TEMPLATE).render(
        version=__version__,
        name=info.name,
        description=info.description,
        style=_style(),
        facts=facts,
        figures=figures,
        note=note,
        details=_details(agg),
        spec_json=json.dumps(info.spec, indent=2, sort_keys=True, ensure_ascii=False),
    )


# ------------------------------------------------------------------------------ outputs


def check_output(output: Path, suffixes: Sequence[str] = OUTPUT_SUFFIXES) -> str:
    """The output's kind (its lower-case suffix) if it can be written; else raise."""
    shown = repr(str(output))
    suffix = output.suffix.lower()
    if suffix not in suffixes:
        raise SweepReportError(
            f"-o: cannot tell the format of {shown}; give a file ending in "
            f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"
        )
    if output.is_dir():
        raise SweepReportError(f"-o: {shown} is a directory; give a file name")
    if not output.parent.is_dir():
        raise SweepReportError(
            f"-o: directory {str(output.parent)!r} does not exist; create it first"
        )
    # What the format needs, before any work.
    if suffix == ".parquet":
        try:
            import duckdb  # noqa: F401
        except ImportError:
            raise SweepReportError(_DUCKDB) from None
    elif suffix in (".html", *_FIGURE_SUFFIXES):
        try:
            require(*(("matplotlib", "jinja2") if suffix == ".html" else ("matplotlib",)))
        except ReportError as err:
            raise SweepReportError(str(err)) from None
    return suffix


def write_output(agg: SweepAggregate, output: Path, metric: str | None = None) -> Path:
    """Write the report in the format of ``output``'s suffix (.html, .csv or .parquet)."""
    kind = check_output(output)
    if kind == ".csv":
        return write_csv(agg, output)
    if kind == ".parquet":
        return write_parquet(agg, output)
    _write_bytes(output, render_sweep_html(agg, metric).encode("utf-8"))
    return output


def speedup_figure(
    db_path: Path,
    sweep: str | None,
    axis: str,
    metric: str | None,
    output: Path,
    by: Sequence[str] | None = None,
    baseline: str | None = None,
    title: str | None = None,
) -> Path:
    """Write the ratio line plot of ``metric`` (a work rate; default as the CLI's) along
    ``axis`` as a PNG or SVG file (the suffix chooses). ``by`` defaults to ``axis`` then the
    sweep's other axes (one panel per combination of those)."""
    kind = check_output(output, _FIGURE_SUFFIXES)
    info, runs = load_sweep_db(db_path, sweep)
    if axis not in info.axes:
        known = ", ".join(info.axes) if info.axes else "none"
        raise SweepReportError(
            f"axis {axis!r} is not an axis of sweep {info.name!r}; its axes: {known}"
        )
    group_by = list(by) if by is not None else [axis, *(a for a in info.axes if a != axis)]
    if not group_by or group_by[0] != axis:
        raise SweepReportError(f"by must start with the plotted axis {axis!r}")
    agg = aggregate_runs(info, runs, group_by, baseline)
    chosen = choose_metric(agg, metric)
    if chosen not in agg.ratio_metrics:
        raise SweepReportError(
            f"--metric: {chosen!r} is not a work rate; a speedup needs one of: "
            f"{', '.join(agg.ratio_metrics)}"
        )
    _, outputs = _draw(
        f"speedup-{_slug(axis)}",
        lambda fig: _line_figure(fig, agg, chosen, ratio=True, title=title),
        (kind[1:],),
    )
    _write_bytes(output, outputs[kind[1:]])
    return output
