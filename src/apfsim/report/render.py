"""The HTML report (one self-contained file) and the figure files.

The page is a jinja2 template (``templates/report.html.j2``) with every figure inlined as
SVG, inline CSS and no script, no external reference: it works offline and renders the same
in any browser. Numbers that the figures show are also in tables under them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from apfsim.report.data import (
    LATENCIES,
    VCPU_CATEGORIES,
    ReportData,
    ReportError,
    load_results,
)
from apfsim.report.figures import FORMATS, inline_svg, render_figures, require
from apfsim.stats import Estimate

__all__ = ["format_estimate", "render_report", "write_plots", "write_report"]

_FAULT_ROWS = (
    ("faults.needs_io", "faults needing I/O"),
    ("faults.async", "handled asynchronously"),
    ("faults.sync", "handled synchronously"),
    ("faults.minor", "minor (swap-cache hit)"),
    ("faults.zero_fill", "zero-fill"),
    ("faults.repeated", "repeated-fault spins"),
    ("faults.per_s", "stage-2 faults per simulated second"),
    ("memory.pages_evicted", "pages evicted"),
    ("memory.swap_reads", "swap reads (requests)"),
    ("memory.swap_writes", "swap writes (requests)"),
    ("memory.context_switches", "guest context switches"),
    ("memory.ipis", "IPIs"),
)


@dataclass(frozen=True, slots=True)
class Table:
    title: str
    corner: str
    columns: list[str]
    rows: list[tuple[str, list[str]]]
    note: str = ""


@dataclass(frozen=True, slots=True)
class _Section:
    anchor: str
    heading: str
    table: Table


@dataclass(frozen=True, slots=True)
class FigureView:
    """A figure as the page shows it: inline SVG, caption and its tables of numbers."""

    name: str
    title: str
    caption: str
    svg: str
    tables: list[Table] = field(default_factory=list)


def _number(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.4g}"


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def format_estimate(e: Estimate | None) -> str:
    """``mean ± ci95`` rounded to the interval's precision (2 significant digits of the
    half-width), with a shared power of ten for tiny or huge values; the mean alone with one
    seed, ``–`` when there is no value."""
    if e is None or e.mean is None:
        return "–"
    if e.ci95 is None:
        return _number(e.mean)
    mean, ci = e.mean, abs(e.ci95)
    if ci == 0 or not math.isfinite(ci):
        return f"{_number(mean)} ± 0"
    decimals = 1 - math.floor(math.log10(ci))
    if not 1e-3 <= max(abs(mean), ci) < 1e6:
        power = math.floor(math.log10(max(abs(mean), ci)))
        m, c = mean / 10**power, ci / 10**power
        d = max(0, 1 - math.floor(math.log10(c)))
        return f"({m:.{d}f} ± {c:.{d}f}) × 10{str(power).translate(_SUPERSCRIPT)}"
    if decimals >= 0:
        return f"{mean:.{decimals}f} ± {ci:.{decimals}f}"
    return f"{round(mean, decimals):.0f} ± {round(ci, decimals):.0f}"


def _metric_table(
    data: ReportData,
    title: str,
    corner: str,
    rows: Sequence[tuple[str, str]],
    ratios: bool = False,
    protocols: Sequence[str] | None = None,
    note: str = "",
) -> Table:
    shown = list(protocols if protocols is not None else data.protocols)
    source = data.ratios if ratios else data.metrics
    return Table(
        title=title,
        corner=corner,
        columns=shown,
        rows=[(label, [format_estimate(source[p].get(key)) for p in shown]) for key, label in rows],
        note=note,
    )


def figure_tables(data: ReportData, name: str) -> list[Table]:
    groups = [(g.rate_key, f"{g.label}, {g.unit}") for g in data.groups()]
    if name == "throughput":
        return [_metric_table(data, "Throughput per simulated second", "task", groups)]
    if name == "speedup":
        others = [p for p in data.protocols if p != data.baseline]
        title = f"Throughput, ratio to {data.baseline}, paired by seed"
        return [_metric_table(data, title, "task", groups, ratios=True, protocols=others)]
    if name == "vcpu-time":
        rows = [(f"vcpu_time_s.{c}", c) for c in VCPU_CATEGORIES]
        return [_metric_table(data, "vCPU time, summed over vCPUs (s)", "category", rows)]
    if name == "latency-cdf":
        rows = [(f"{lat}.{q}", f"{lat} {q}") for lat in LATENCIES for q in ("count", "p50", "p99")]
        return [_metric_table(data, "Latency samples and percentiles (µs)", "statistic", rows)]
    raise ValueError(f"no tables for figure {name!r}")


def _sections(data: ReportData) -> list[_Section]:
    keys: list[str] = []
    for p in data.protocols:
        keys += [k for k in data.metrics[p] if k.startswith("apf.") and k not in keys]
    apf_rows = [(k, k.removeprefix("apf.")) for k in sorted(keys)]
    note = "A counter a protocol does not have is shown as –. " + _seed_text(data)
    return [
        _Section(
            "apf-counters",
            "APF counters",
            _metric_table(data, "Per run, mean over seeds", "counter", apf_rows, note=note),
        ),
        _Section(
            "faults",
            "Faults and memory",
            _metric_table(data, "Per run, mean over seeds", "count", _FAULT_ROWS),
        ),
    ]


def _seed_text(data: ReportData) -> str:
    if all(len(data.seeds(p)) == 1 for p in data.protocols):
        return "1 seed: one run's figures, no confidence interval."
    return "Cells are mean ± 95 % confidence half-width over seeds (Student t)."


def _sources_table(data: ReportData) -> Table:
    return Table(
        title="Inputs",
        corner="file",
        columns=["kind", "protocols", "seeds"],
        rows=[
            (s.name, [s.kind, ", ".join(s.protocols), ", ".join(str(x) for x in s.seeds)])
            for s in data.sources
        ],
    )


def _seeds_summary(data: ReportData) -> str:
    seeds = {p: data.seeds(p) for p in data.protocols}
    first = next(iter(seeds.values()))
    if all(s == first for s in seeds.values()):
        return f"{', '.join(map(str, first))} (n = {len(first)})"
    return "; ".join(f"{p}: {', '.join(map(str, s))}" for p, s in seeds.items())


def _sim_time(data: ReportData) -> str:
    times = sorted({r.result.sim_time_s for r in data.runs})
    if len(times) == 1:
        return f"{times[0]:g} s"
    return f"{times[0]:g} to {times[-1]:g} s (runs stop when every finite task is done)"


def _render(data: ReportData) -> str:
    require("matplotlib", "jinja2")
    import jinja2

    from apfsim.version import __version__

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("apfsim.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    figures = [
        FigureView(f.name, f.title, f.caption, inline_svg(f.outputs["svg"], f"{f.name}-"))
        for f in render_figures(data, ("svg",))
    ]
    for view in figures:
        view.tables.extend(figure_tables(data, view.name))
    scenario = data.scenario
    return env.get_template("report.html.j2").render(
        version=__version__,
        scenario_name=str(scenario["name"]),
        scenario_description=str(scenario.get("description", "")),
        protocols=data.protocols,
        baseline=data.baseline,
        seeds=_seeds_summary(data),
        sim_time=_sim_time(data),
        sources=_sources_table(data),
        figures=figures,
        sections=_sections(data),
        scenario_json=json.dumps(scenario, indent=2, sort_keys=True, ensure_ascii=False),
    )


def render_report(paths: Sequence[Path]) -> str:
    """The HTML report of results files of one scenario (raises ReportError)."""
    data = load_results(list(paths))
    return _render(data)


def _check_output_file(output: Path) -> None:
    shown = repr(str(output))
    if output.is_dir():
        raise ReportError(f"output {shown} is a directory; give a file name such as report.html")
    parent = output.parent
    if not parent.is_dir():
        raise ReportError(f"output directory {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ReportError(f"output directory {str(parent)!r} is not writable; choose another")


def write_report(paths: Sequence[Path], output: Path) -> Path:
    """Render the report of ``paths`` and write it to ``output`` (raises ReportError)."""
    _check_output_file(output)
    data = load_results(list(paths))
    html = _render(data)
    try:
        output.write_text(html, encoding="utf-8")
    except OSError as err:
        raise ReportError(
            f"cannot write {str(output)!r} ({err.strerror}); choose a writable location"
        ) from None
    return output


def write_plots(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Write every figure as ``<name>.png`` and ``<name>.svg`` in ``out_dir`` (created if
    missing); returns the files written (raises ReportError)."""
    shown = repr(str(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"output {shown} is a file, not a directory; give a directory")
    data = load_results(list(paths))
    require("matplotlib")  # before the directory is made
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(
            f"cannot create directory {shown} ({err.strerror}); choose a writable location"
        ) from None
    if not os.access(out_dir, os.W_OK):
        raise ReportError(f"output directory {shown} is not writable; choose another")
    figures = render_figures(data, FORMATS)
    written = []
    for figure in figures:
        for fmt in ("png", "svg"):
            path = out_dir / f"{figure.name}.{fmt}"
            try:
                path.write_bytes(figure.outputs[fmt])
            except OSError as err:
                raise ReportError(
                    f"cannot write {str(path)!r} ({err.strerror}); choose a writable location"
                ) from None
            written.append(path)
    return written
