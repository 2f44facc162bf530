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

from apfsim.compare import Estimate
from apfsim.report.data import LATENCIES, VCPU_CATEGORIES, ReportData, ReportError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FORMATS",
    "RenderedFigure",
    "inline_svg",
    "render_figures",
    "require",
    "seed_note",
]

FORMATS = ("svg", "png")

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
    fig.set_size_inches(max(4.5, 2.4 * ncols + 0.6), 2.9 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    xs = list(range(len(data.protocols)))
    for i, group in enumerate(groups):
        ax = axes[i // ncols][i % ncols]
        for x, p in zip(xs, data.protocols, strict=True):
            _bars(ax, data, [x], 0.7, p, [data.metrics[p][f"{group.key}.work_rate"]])
        ax.set_title(group.label)
        ax.set_xticks(xs, data.protocols, rotation=30, ha="right")
        ax.set_ylim(bottom=0)
        if i % ncols == 0:
            ax.set_ylabel("work (s) per simulated second")
    for j in range(len(groups), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    if data.per_task():
        shown = "per task"
    else:
        n = len(data.runs[0].result.tasks)
        shown = f"per task kind, summed over the kind's tasks (the scenario has {n} tasks)"
    return (
        "Throughput: work done per simulated second (work_s / sim_time_s, so runs that "
        f"stop early compare fairly), {shown}; one bar per protocol. {seed_note(data)}"
    )


def _speedup(fig: Figure, data: ReportData) -> str:
    groups = data.groups()
    others = [p for p in data.protocols if p != data.baseline]
    fig.set_size_inches(2.5 + len(groups) * (0.6 + 0.55 * len(others)), 3.4)
    ax = fig.subplots()
    width = 0.8 / len(others)
    for k, p in enumerate(others):
        xs = [g + (k - (len(others) - 1) / 2) * width for g in range(len(groups))]
        ests = [data.ratios[p].get(f"{g.key}.work_rate", Estimate(None, None, 0)) for g in groups]
        _bars(ax, data, xs, width * 0.9, p, ests)
    ax.axhline(1.0, color="#333333", linewidth=1.0, linestyle="--")
    ax.set_xticks(list(range(len(groups))), [g.label.replace(" (", "\n(") for g in groups])
    ax.set_ylabel(f"work rate / {data.baseline}'s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return (
        f"Speedup over {data.baseline}: each protocol's work rate divided by {data.baseline}'s "
        "on the same seed, then averaged over seeds (above the dashed line at 1 is better "
        f"than {data.baseline}); a seed where {data.baseline} did no work has no ratio. "
        f"{seed_note(data)}"
    )


def _vcpu_time(fig: Figure, data: ReportData) -> str:
    fig.set_size_inches(7.0, 0.45 * len(data.protocols) + 1.4)
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
    return (
        f"Where the vCPU time goes: each category's mean time over seeds, summed over the "
        f"{vcpus} vCPU{'s' if vcpus > 1 else ''}, as a share of their total. task: the guest "
        "runs a task; guest_kernel: guest handlers, the APF driver, context switches; idle: "
        "guest idle; apf_halt: the vCPU halted with a task parked on a fault; sync_fault: the "
        "vCPU thread blocked in a synchronous fault-in; host: exits, entries, stage-2 fault "
        "handling. The seconds are in the table below."
    )


def _latency_cdf(fig: Figure, data: ReportData) -> str:
    fig.set_size_inches(9.0, 3.4)
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
            ax.plot(cdf, levels, color=colour(data, p), label=p, marker="o", markersize=2.5)
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
    text = (
        "Latency CDFs, one line per protocol, through the 21 quantiles (0, 5, ..., 100 %) "
        "each run records: fault_in_latency_us is the I/O part of a fault (the synchronous "
        "stall or the worker's fault-in); not_present_to_ready_us is the time from the "
        "not-present injection to the page-ready injection."
    )
    if several:
        text += " With several seeds each quantile is averaged over the seeds with samples."
    if notes:
        note = "; ".join(notes)
        text += f" {note[0].upper()}{note[1:]}."
    return text


def _has_speedup(data: ReportData) -> bool:
    return any(
        e.mean is not None
        for p in data.protocols
        if p != data.baseline
        for g in data.groups()
        if (e := data.ratios[p].get(f"{g.key}.work_rate")) is not None
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
