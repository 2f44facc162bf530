"""The sweep report's figures: lines along the first grouped axis, one per protocol, with
95 % CI bars and one panel per combination of the other grouped axes; and
:func:`speedup_figure`, the ratio plot as a PNG or SVG file."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apfsim.report.data import ReportError
from apfsim.report.figures import (
    FIGURE_WIDTH_IN,
    PROTOCOL_COLOURS,
    add_footer,
    crosses_zero,
    draw_figure,
    require,
    small_n_text,
)
from apfsim.stats import Estimate
from apfsim.sweep.report.aggregate import SweepAggregate, aggregate_runs, choose_metric, value_key
from apfsim.sweep.report.files import (
    FIGURE_SUFFIXES,
    SweepReportError,
    check_output,
    load_sweep_db,
    write_bytes,
)
from apfsim.sweep.report.labels import (
    axis_label,
    format_value,
    metric_label,
    point_label,
    ratio_label,
    sweep_context,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_PANELS = 12
"""At most this many panels (combinations of the grouped axes after the first) per figure."""
_LOG_SPAN = 20.0  # x values spanning more than this factor get a log scale
_LOG_Y_SPAN = 100.0  # positive means spanning more than this factor get a log y axis


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def draw(
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


def panels(agg: SweepAggregate) -> _Panels:
    if not agg.by:
        raise SweepReportError(
            f"sweep {agg.info.name!r} has no axis to plot along; write .csv or .parquet, "
            "or print the table (no -o)"
        )
    seen: dict[str, Any] = {}
    combos: dict[str, tuple[Any, ...]] = {}
    for g in agg.groups:
        seen.setdefault(value_key(g.values[0]), g.values[0])
        combos.setdefault(value_key(g.values[1:]), g.values[1:])
    xs = list(seen.values())
    numeric = all(_is_number(x) for x in xs)
    if numeric:
        xs.sort()
    log = numeric and xs[0] > 0 and xs[-1] / xs[0] > _LOG_SPAN
    panels = list(combos.values())
    return _Panels(agg.by[0], xs, numeric, log, agg.by[1:], panels[:MAX_PANELS], len(panels))


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def line_figure(
    fig: Figure, agg: SweepAggregate, metric: str, ratio: bool, title: str | None = None
) -> str:
    """Lines along the first grouped axis, one per protocol (the baseline left out of a
    ratio plot: it is the dashed line at 1), 95 % CI error bars, one panel per combination
    of the other grouped axes. Returns the caption."""
    layout = panels(agg)
    protocols = list(dict.fromkeys(g.protocol for g in agg.groups))
    if ratio:
        protocols = [p for p in protocols if p != agg.baseline]
    n = len(layout.panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig.set_size_inches(FIGURE_WIDTH_IN, 3.4 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    by_key = {(value_key(g.values), g.protocol): g for g in agg.groups}
    positions = layout.xs if layout.numeric else list(range(len(layout.xs)))
    estimates: list[Estimate | None] = []
    plotted: list[float] = []
    for i, combo in enumerate(layout.panels):
        ax = axes[i // ncols][i % ncols]
        for protocol in protocols:
            ests = []
            for x in layout.xs:
                g = by_key.get((value_key((x, *combo)), protocol))
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
            ax.set_xticks(positions, [format_value(x) for x in layout.xs])
        if layout.panel_axes:
            ax.set_title(point_label(layout.panel_axes, combo), fontsize=8.5)
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
    kind = check_output(output, FIGURE_SUFFIXES)
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
    _, outputs = draw(
        f"speedup-{slug(axis)}",
        lambda fig: line_figure(fig, agg, chosen, ratio=True, title=title),
        (kind[1:],),
    )
    write_bytes(output, outputs[kind[1:]])
    return output
