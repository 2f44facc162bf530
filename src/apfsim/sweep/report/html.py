"""The sweep report as one offline HTML page in the look of ``apfsim report``: the line
plots, their numbers, the report's own figures for the two end points of the first axis,
and the sweep file (template: ``apfsim/report/templates/sweep.html.j2``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from apfsim.metrics.results import InvalidResults
from apfsim.report.data import (
    ReportData,
    ReportError,
    RunRecord,
    Source,
    parse_protocol_result,
    run_estimates,
    run_ratios,
)
from apfsim.report.figures import crosses_zero, inline_svg, render_figures, require, small_n_text
from apfsim.report.render import FigureView, Table, figure_tables, format_estimate
from apfsim.sweep.report.aggregate import SweepAggregate, choose_metric, value_key
from apfsim.sweep.report.figures import draw, line_figure, panels
from apfsim.sweep.report.files import SweepReportError, point_results
from apfsim.sweep.report.labels import axis_label, metric_label, point_label, ratio_label


@dataclass(frozen=True, slots=True)
class _Detail:
    anchor: str
    heading: str
    lead: str
    figures: list[FigureView]


def _template() -> str:
    return (resources.files("apfsim.report") / "templates" / "sweep.html.j2").read_text("utf-8")


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
    by_key = {(value_key(g.values), g.protocol): g for g in agg.groups}
    rows = []
    for key, values in dict.fromkeys((value_key(g.values), g.values) for g in agg.groups):
        cells = []
        for p in protocols:
            g = by_key.get((key, p))
            source = None if g is None else (g.ratios if ratio else g.metrics)
            cells.append(format_estimate(None if source is None else source.get(metric)))
        rows.append((point_label(agg.by, values) or "all runs", cells))
    return Table(title, "group", protocols, rows, note)


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
        caption, outputs = draw(
            "sweep-ratio", lambda fig: line_figure(fig, agg, metric, ratio=True), ("svg",)
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
    caption, outputs = draw(
        "sweep-mean", lambda fig: line_figure(fig, agg, metric, ratio=False), ("svg",)
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
    layout = panels(agg)
    x_axis = agg.by[0]
    first = agg.runs[0].params
    candidates: dict[int, Any] = {}
    for r in agg.runs:
        if all(value_key(r.params.get(a)) == value_key(first.get(a)) for a in first if a != x_axis):
            candidates.setdefault(r.point, r.params.get(x_axis))
    rank = {value_key(x): i for i, x in enumerate(layout.xs)}
    ordered = sorted(candidates, key=lambda p: rank.get(value_key(candidates[p]), len(rank)))
    return list(dict.fromkeys([ordered[0], ordered[-1]]))


def _details(agg: SweepAggregate) -> list[_Detail]:
    out = []
    points = _detail_points(agg)
    for i, point in enumerate(points):
        data = _report_data(agg, point)
        if data is None:
            continue
        params = next(r.params for r in agg.runs if r.point == point)
        label = point_label(agg.info.axes, [params.get(a) for a in agg.info.axes])
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
    panels(agg)  # an axis to plot along
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
    return env.from_string(_template()).render(
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
