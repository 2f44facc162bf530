"""The report's figures, drawn with matplotlib's object-oriented API (no pyplot state).

Each figure is built and saved inside its own ``rc_context`` with a fixed style, a fixed SVG
hash salt and no date, so the same data give byte-identical SVG. matplotlib is imported here
only, and only when a figure is drawn: ``import apfsim`` works without the ``report`` extra.
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from apfsim.report.data import LATENCIES, VCPU_CATEGORIES, ReportData, ReportError
from apfsim.stats import Estimate

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FIGURE_WIDTH_IN",
    "FORMATS",
    "RenderedFigure",
    "inline_svg",
    "render_figures",
    "require",
    "seed_note",
]

FORMATS = ("svg", "png")

FIGURE_WIDTH_IN = 10.0
"""Every figure's width: the page's text width, so that a figure fills it at a readable
font size (the HTML scales each SVG to the full width)."""

_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

# matplotlib's tab10, by protocol position: a protocol keeps its colour in every figure.
PROTOCOL_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_CATEGORY_COLOURS = {
    "task": "#2ca02c",
    "guest_kernel": "#98df8a",
    "idle": "#d9d9d9",
    "apf_halt": "#ff7f0e",
    "sync_fault": "#d62728",
    "host": "#9467bd",
}
_LATENCY_TITLES = {
    "fault_in_latency_us": "fault-in latency (the I/O)",
    "not_present_to_ready_us": "not-present to page-ready (what the guest sees)",
}
_INSTALL = "install the report extra: pip install 'apfsim[report]'"


def require(*modules: str) -> None:
    """Raise a one-line ReportError naming what to install if a module is missing."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ReportError(f"{' and '.join(missing)} not installed; {_INSTALL}")


@dataclass(frozen=True, slots=True)
class RenderedFigure:
    """One figure: its name (``data-figure``, file stem), title, caption and saved bytes."""

    name: str
    title: str
    caption: str
    outputs: dict[str, bytes]  # format ("svg", "png") -> file contents


def colour(data: ReportData, protocol: str) -> str:
    return PROTOCOL_COLOURS[data.protocols.index(protocol) % len(PROTOCOL_COLOURS)]


def seed_note(data: ReportData) -> str:
    """What the error bars are, and on how many seeds."""
    counts = {p: len(data.seeds(p)) for p in data.protocols}
    if all(n == 1 for n in counts.values()):
        return "1 seed: the points are that run's, without error bars."
    per = ", ".join(f"{p} {n}" for p, n in counts.items())
    return (
        "Error bars: 95 % confidence interval of the mean over seeds (Student t, n−1 "
        f"degrees of freedom); seeds per protocol: {per}."
    )


def context_line(data: ReportData) -> str:
    """Scenario, seeds and simulated time: the footer that keeps a pasted figure's context."""
    seeds = sorted({r.seed for r in data.runs})
    times = sorted({r.result.sim_time_s for r in data.runs})
    sim = f"{times[0]:g} s" if len(times) == 1 else f"{times[0]:g} to {times[-1]:g} s"
    return (
        f"apfsim · scenario {data.scenario.get('name', '?')} · seeds "
        f"{', '.join(map(str, seeds))} (n = {len(seeds)}) · {sim} simulated per run"
    )


def add_footer(fig: Figure, text: str) -> None:
    """Write ``text`` under the figure (laid out with it, so nothing overlaps)."""
    fig.supxlabel(text, fontsize=7.5, color="#555555")


def crosses_zero(ests: Sequence[Estimate | None]) -> bool:
    """Whether an interval of ``ests`` reaches 0 or below (a ratio the seeds cannot pin)."""
    return any(
        e is not None and e.mean is not None and e.ci95 is not None and e.mean - e.ci95 <= 0
        for e in ests
    )


def small_n_text(n: int) -> str:
    """The warning shown on a ratio figure whose interval crosses 0."""
    return (
        f"n = {n} seed{'s' if n != 1 else ''} is small: an interval crosses 0, "
        "so the ratio is not pinned down; run more seeds"
    )


def _mean(e: Estimate | None) -> float:
    return math.nan if e is None or e.mean is None else e.mean


def _ci(e: Estimate | None) -> float:
    return 0.0 if e is None or e.ci95 is None else e.ci95


def _has_ci(data: ReportData) -> bool:
    return any(len(data.seeds(p)) > 1 for p in data.protocols)


def _bars(
    ax: Axes, data: ReportData, x: list[float], width: float, protocol: str, ests: list[Estimate]
) -> None:
    ax.bar(
        x,
        [_mean(e) for e in ests],
        width,
        yerr=[_ci(e) for e in ests] if _has_ci(data) else None,
        capsize=3,
        color=colour(data, protocol),
        label=protocol,
        error_kw={"elinewidth": 1.0},
    )


# ------------------------------------------------------------------------------ figures


def _throughput(fig: Figure, data: ReportData) -> str:
    groups = data.groups()
    ncols = min(len(groups), 4)
    nrows = math.ceil(len(groups) / ncols)
    fig.set_size_inches(FIGURE_WIDTH_IN, 3.2 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    xs = list(range(len(data.protocols)))
    for i, group in enumerate(groups):
        ax = axes[i // ncols][i % ncols]
        for x, p in zip(xs, data.protocols, strict=True):
            est = data.metrics[p].get(group.rate_key, Estimate(None, None, 0))
            _bars(ax, data, [x], 0.7, p, [est])
        ax.set_title(group.label)
        ax.set_xticks(xs, data.protocols, rotation=30, ha="right")
        ax.set_ylim(bottom=0)
        ax.set_ylabel(_unit_label(group.unit))
    for j in range(len(groups), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    if data.per_task():
        shown = "per task"
    else:
        n = len(data.runs[0].result.tasks)
        shown = f"per task kind, summed over the kind's tasks (the scenario has {n} tasks)"
    add_footer(fig, context_line(data))
    return (
        "Throughput per simulated second (so runs that stop early compare fairly), "
        f"{shown}: a memory task's operations (writes, pages or accesses) per second, a "
        "compute task's CPU seconds per second; one bar per protocol. "
        f"{seed_note(data)}"
    )


def _unit_label(unit: str) -> str:
    """An axis label for a throughput unit."""
    return "CPU s per simulated s" if unit == "CPU s/s" else f"{unit} (simulated)"


def _speedup(fig: Figure, data: ReportData) -> str:
    groups = data.groups()
    others = [p for p in data.protocols if p != data.baseline]
    fig.set_size_inches(FIGURE_WIDTH_IN, 3.8)
    ax = fig.subplots()
    width = 0.8 / len(others)
    shown: list[Estimate | None] = []
    for k, p in enumerate(others):
        xs = [g + (k - (len(others) - 1) / 2) * width for g in range(len(groups))]
        ests = [data.ratios[p].get(g.rate_key, Estimate(None, None, 0)) for g in groups]
        shown += ests
        _bars(ax, data, xs, width * 0.9, p, ests)
    ax.axhline(1.0, color="#333333", linewidth=1.0, linestyle="--")
    ticks = [f"{g.label.replace(' (', chr(10) + '(')}\n{g.unit}" for g in groups]
    ax.set_xticks(list(range(len(groups))), ticks)
    ax.set_ylabel(f"throughput, ratio to {data.baseline}")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    text = (
        f"Speedup over {data.baseline}: each protocol's throughput (a memory task's "
        f"operations per second, a compute task's CPU seconds per second) divided by "
        f"{data.baseline}'s on the same seed, then averaged over seeds (above the dashed line "
        f"at 1 is better than {data.baseline}); a seed where {data.baseline} did no work has "
        f"no ratio. {seed_note(data)}"
    )
    n = min((len(data.seeds(p)) for p in others), default=0)
    if crosses_zero(shown):
        warning = small_n_text(n)
        ax.set_title(warning, fontsize=8.5, color="#b22222")
        text += f" Warning: {warning}."
    add_footer(fig, context_line(data))
    return text


def _vcpu_time(fig: Figure, data: ReportData) -> str:
    fig.set_size_inches(FIGURE_WIDTH_IN, 0.45 * len(data.protocols) + 1.8)
    ax = fig.subplots()
    ys = list(range(len(data.protocols)))
    shares: dict[str, list[float]] = {cat: [] for cat in VCPU_CATEGORIES}
    for p in data.protocols:
        means = {cat: _mean(data.metrics[p].get(f"vcpu_time_s.{cat}")) for cat in VCPU_CATEGORIES}
        total = math.fsum(v for v in means.values() if not math.isnan(v))
        for cat in VCPU_CATEGORIES:
            shares[cat].append(100.0 * means[cat] / total if total > 0 else math.nan)
    left = [0.0] * len(ys)
    for cat in VCPU_CATEGORIES:
        ax.barh(ys, shares[cat], 0.6, left=left, color=_CATEGORY_COLOURS[cat], label=cat)
        left = [a + (0.0 if math.isnan(b) else b) for a, b in zip(left, shares[cat], strict=True)]
    ax.set_yticks(ys, data.protocols)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of vCPU time (%)")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    vcpus = len(data.runs[0].result.vcpus)
    add_footer(fig, context_line(data))
    return (
        f"Where the vCPU time goes: each category's mean time over seeds, summed over the "
        f"{vcpus} vCPU{'s' if vcpus > 1 else ''}, as a share of their total. task: the guest "
        "runs a task; guest_kernel: guest handlers, the APF driver, context switches; idle: "
        "guest idle; apf_halt: the vCPU halted with a task parked on a fault; sync_fault: the "
        "vCPU thread blocked in a synchronous fault-in; host: exits, entries, stage-2 fault "
        "handling. The seconds are in the table below."
    )


def _latency_cdf(fig: Figure, data: ReportData) -> str:
    fig.set_size_inches(FIGURE_WIDTH_IN, 4.0)
    axes = fig.subplots(1, len(LATENCIES), squeeze=False)[0]
    notes = []
    for ax, lat in zip(axes, LATENCIES, strict=True):
        empty = []
        values: list[float] = []
        for p in data.protocols:
            cdf = data.mean_cdf(p, lat)
            if cdf is None:
                empty.append(p)
                continue
            levels = [i / (len(cdf) - 1) for i in range(len(cdf))]
            ax.plot(cdf, levels, label=p, **cdf_style(data, p))
            values += cdf
        ax.set_title(_LATENCY_TITLES[lat])
        ax.set_xlabel("latency (µs)")
        ax.set_ylim(0, 1)
        if values:
            if min(values) > 0:
                ax.set_xscale("log")
            ax.legend(loc="lower right", frameon=False)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        if empty:
            notes.append(f"no {lat} samples under {', '.join(empty)}")
        old = data.runs_without_cdf(lat)
        if old:
            names = sorted({r.source for r in old})
            notes.append(
                f"{len(old)} run(s) with {lat} samples have no quantiles in "
                f"{', '.join(names)} (written by an older apfsim; re-run it to plot them)"
            )
    axes[0].set_ylabel("fraction of faults")
    several = any(len(data.seeds(p)) > 1 for p in data.protocols)
    add_footer(fig, context_line(data))
    text = (
        "Latency CDFs, one line per protocol, through the 21 quantiles (0, 5, ..., 100 %) "
        "each run records: fault_in_latency_us is the I/O part of a fault (the synchronous "
        "stall or the worker's fault-in); not_present_to_ready_us is the time from the "
        "not-present injection to the page-ready injection. Each protocol has its own line "
        f"style and marker, and {data.baseline}'s solid line is drawn on top, so lines that "
        "coincide stay visible; the x axis is logarithmic when every latency is positive."
    )
    if several:
        text += " With several seeds each quantile is averaged over the seeds with samples."
    if notes:
        note = "; ".join(notes)
        text += f" {note[0].upper()}{note[1:]}."
    return text


def cdf_style(data: ReportData, protocol: str) -> dict[str, object]:
    """A CDF line's look: the protocol's colour, its own line style and marker; the
    baseline solid, thicker and on top, the others dashed, dotted... under it."""
    i = data.protocols.index(protocol)
    others = [p for p in data.protocols if p != data.baseline]
    base = protocol == data.baseline
    k = 0 if base else others.index(protocol) + 1
    return {
        "color": colour(data, protocol),
        "linestyle": _LINESTYLES[k % len(_LINESTYLES)],
        "marker": _MARKERS[i % len(_MARKERS)],
        "markersize": 4.0 if base else 3.0,
        "linewidth": 2.2 if base else 1.3,
        "markerfacecolor": colour(data, protocol) if base else "none",
        "zorder": 4 if base else 2,
    }


def _has_speedup(data: ReportData) -> bool:
    return any(
        e.mean is not None
        for p in data.protocols
        if p != data.baseline
        for g in data.groups()
        if (e := data.ratios[p].get(g.rate_key)) is not None
    )


_Builder = Callable[["Figure", ReportData], str]
_FIGURES: tuple[tuple[str, str, _Builder, Callable[[ReportData], bool]], ...] = (
    ("throughput", "Throughput", _throughput, lambda d: True),
    ("speedup", "Speedup over the baseline", _speedup, _has_speedup),
    ("vcpu-time", "vCPU time breakdown", _vcpu_time, lambda d: True),
    ("latency-cdf", "Fault latency CDFs", _latency_cdf, lambda d: True),
)


def render_figures(data: ReportData, formats: tuple[str, ...] = FORMATS) -> list[RenderedFigure]:
    """Draw every figure that applies to ``data`` and save it in each format."""
    require("matplotlib")
    out = []
    for name, title, build, applies in _FIGURES:
        if not applies(data):
            continue
        caption, outputs = draw_figure(name, functools.partial(_build_with, build, data), formats)
        out.append(RenderedFigure(name, title, caption, outputs))
    return out


def _build_with(build: Callable[[Figure, ReportData], str], data: ReportData, fig: Figure) -> str:
    return build(fig, data)


def draw_figure(
    name: str, build: Callable[[Figure], str], formats: Sequence[str]
) -> tuple[str, dict[str, bytes]]:
    """Draw one figure in the report's style and save it in each format, deterministically
    (fixed SVG hash salt per figure, no dates); returns (caption, bytes per format)."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context(
        {
            "font.size": 9.0,
            "font.family": "DejaVu Sans",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "axes.axisbelow": True,
            "grid.alpha": 0.35,
            "svg.fonttype": "none",  # text stays text: no glyph ids to clash between SVGs
            "svg.hashsalt": f"apfsim-{name}",  # fixed hash ids, unique to the figure
            "savefig.dpi": 150.0,
        }
    ):
        fig = Figure(layout="constrained")
        caption = build(fig)
        outputs = {}
        for fmt in formats:
            buf = io.BytesIO()
            metadata = {"Date": None} if fmt == "svg" else {"Software": None}
            fig.savefig(buf, format=fmt, metadata=metadata)
            outputs[fmt] = buf.getvalue()
    return caption, outputs


_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.DOTALL)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)
_IDS = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')


def inline_svg(svg: bytes, prefix: str) -> str:
    """An SVG file as an element to put in HTML: no XML declaration, DOCTYPE or metadata
    (they hold the only URLs besides the xmlns attributes), and every id and reference to
    one prefixed, so that several figures in a page have no id in common (matplotlib names
    its groups ``figure_1``, ``axes_1``, ... in every file)."""
    text = _METADATA.sub("", _PROLOG.sub("", svg.decode("utf-8"), count=1), count=1).strip()
    return _IDS.sub(lambda m: f"{m.group(1)}{prefix}{m.group(2)}", text)
