"""Issue 14: memory tasks in ops/s and faults/s; figures people paste (width, labels,
digits, overlapping CDF lines, small n, log axes, context footers)."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from apfsim.api import compare, compare_table, run
from apfsim.compare import summary_table
from apfsim.report import load_results, render_report
from apfsim.report.data import ReportData
from apfsim.report.render import format_estimate
from apfsim.scenario import load_scenario
from apfsim.stats import Estimate
from apfsim.sweep.report import SweepInfo, SweepReportError, aggregate_runs, choose_metric
from apfsim.sweep.store import StoredRun

PLOTTING = all(importlib.util.find_spec(m) is not None for m in ("matplotlib", "jinja2"))
needs_plotting = pytest.mark.skipif(not PLOTTING, reason="the report extra is not installed")

# One vCPU: a random writer and a compute thread, the guest twice the host limit (~0.1 s).
SMALL = """\
name = "small-units"
duration_s = 0.3

[guest]
vcpus = 1
memory_mib = 64
reserved_mib = 16

[host]
memory_limit_mib = 24

[initial_memory]
resident_fraction = 0.3
swapped_fraction = 0.7

[[tasks]]
kind = "random_writer"
name = "writer"
buffer_mib = 40

[[tasks]]
kind = "compute"
name = "compute"
"""
PROTOCOLS = ["sync", "x86", "halt-only"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Run files of seeds 0 and 1 under three protocols."""
    root = tmp_path_factory.mktemp("units")
    toml = root / "small.toml"
    toml.write_text(SMALL)
    scenario = load_scenario(toml)
    out = []
    for seed in (0, 1):
        path = root / f"seed{seed}.json"
        path.write_text(json.dumps(run(scenario, PROTOCOLS, seed=seed).to_dict()))
        out.append(path)
    return out


@pytest.fixture(scope="module")
def data(files: list[Path]) -> ReportData:
    return load_results(files)


# ----------------------------------------------------------------------------- A. units


def test_memory_tasks_report_ops_per_second_in_json_and_table(files: list[Path]) -> None:
    doc = json.loads(files[0].read_text())
    for r in doc["results"]:
        writer, cpu = r["tasks"]
        assert writer["ops_unit"] == "writes"
        assert writer["ops_per_s"] == round(writer["ops"] / r["sim_time_s"], 6)
        assert writer["ops_per_s"] > 0
        assert "work_s" in writer and "work_s" in cpu  # kept, not renamed
        assert cpu["ops_unit"] is None and cpu["ops_per_s"] is None
        f = r["faults"]
        expected = round((f["zero_fill"] + f["minor"] + f["needs_io"]) / r["sim_time_s"], 6)
        assert f["per_s"] == expected > 0
    result = run(load_scenario_text(files[0].parent), ["sync", "x86"], seed=0)
    table = compare_table(result)
    row = next(line for line in table.splitlines() if line.startswith("  writer (random_writer)"))
    assert "writes/s" in row and "0.000 /" not in row
    assert re.search(r"compute \(compute\)\s+\d\.\d{3} s / -", table)
    assert "stage-2 faults/s" in table
    assert re.search(r"x\d\.\d{3} \(writes/s\)", table)


def load_scenario_text(root: Path) -> Any:
    return load_scenario(root / "small.toml")


def test_compare_summary_shows_writes_per_second_and_faults_per_second(
    files: list[Path],
) -> None:
    result = compare(load_scenario_text(files[0].parent), ["sync", "x86"], 2, jobs=1)
    summary = result.summary["x86"]
    assert summary.metrics["task.writer.ops_rate"].mean is not None
    assert summary.metrics["faults.per_s"].mean is not None
    assert "task.writer.ops_rate" in summary.ratio_to_baseline
    text = summary_table(result)
    assert "writer (random_writer), writes/s" in text
    assert "compute (compute), work (s)" in text
    assert "stage-2 faults/s" in text
    assert "writer (writes/s)" in text


@needs_plotting
def test_throughput_figure_and_table_are_in_writes_per_second(data: ReportData) -> None:
    from matplotlib.figure import Figure

    from apfsim.report.figures import _throughput
    from apfsim.report.render import figure_tables

    fig = Figure()
    caption = _throughput(fig, data)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == ["writes/s (simulated)", "CPU s per simulated s"]
    assert "work (s) per simulated second" not in caption
    writer = data.metrics["sync"]["task.writer.ops_rate"].mean
    assert writer is not None and writer > 10  # writes/s, not seconds of work
    (table,) = figure_tables(data, "throughput")
    assert [label for label, _ in table.rows] == [
        "writer (random_writer), writes/s",
        "compute (compute), CPU s/s",
    ]


def fake_run(point: int, params: dict[str, Any], protocol: str, seed: int, m: Any) -> Any:
    row = {
        "key": f"{point}-{protocol}-{seed}",
        "point": point,
        "params": json.dumps(params),
        "protocol": protocol,
        "seed": seed,
        "error": None,
        "metrics": json.dumps(m),
        "result": None,
    }
    return StoredRun(row)  # type: ignore[arg-type]  # a dict stands in for a sqlite3.Row


OPS = "kind.random_writer.ops_rate"
MEAN = "host.swap.mean_us"


def fake_sweep(values: dict[tuple[int, str, int], float]) -> Any:
    """An aggregate over ``MEAN``: (x, protocol, seed) -> the writer's ops rate."""
    spec = {"scenario": "writer-compute", "duration_s": 5.0}
    info = SweepInfo("s", "", spec, (MEAN,), ("sync", "x86"), (0, 1), "sync", {"ok": 8})
    xs = sorted({x for x, _, _ in values})
    runs = [
        fake_run(xs.index(x), {MEAN: x}, p, s, {OPS: v, "kind.compute.work_rate": 0.5})
        for (x, p, s), v in values.items()
    ]
    return aggregate_runs(info, runs)


def test_sweep_ratios_cover_ops_rates() -> None:
    agg = fake_sweep(
        {
            (36, p, s): 100.0 * (s + 1) * (2 if p == "x86" else 1)
            for p in ("sync", "x86")
            for s in (0, 1)
        }
    )
    assert OPS in agg.ratio_metrics
    assert agg.group((36,), "x86").ratios[OPS].mean == pytest.approx(2.0)


# ----------------------------------------------------------------------------- B. figures


def test_intervals_are_rounded_to_their_precision() -> None:
    assert format_estimate(Estimate(9.949e-05, 5.656e-06, 2)) == "(9.95 ± 0.57) × 10⁻⁵"
    assert format_estimate(Estimate(1017.2, 457.3, 2)) == "1020 ± 460"
    assert format_estimate(Estimate(0.97061, 0.012763, 2)) == "0.971 ± 0.013"
    assert format_estimate(Estimate(496.83, 9.512, 2)) == "496.8 ± 9.5"
    assert format_estimate(Estimate(1.5, None, 1)) == "1.5"
    assert format_estimate(None) == "–"


def test_labels_are_human_readable() -> None:
    from apfsim.sweep.report import axis_label, metric_label

    assert axis_label("host.swap.mean_us") == "swap mean latency (µs)"
    assert axis_label("host.foo.bar_mib") == "foo bar (MiB)"
    assert metric_label(OPS) == "random_writer writes/s"
    assert metric_label("kind.compute.work_rate") == "compute CPU s/s"
    assert metric_label("fault_in_latency_us.p50") == "fault-in latency p50 (µs)"
    assert metric_label("faults.per_s") == "stage-2 faults/s"


@needs_plotting
def test_sweep_figures_have_readable_labels_small_n_warning_log_y_and_footer() -> None:
    from matplotlib.figure import Figure

    from apfsim.sweep.report.figures import line_figure

    # Two seeds disagreeing wildly at 55 ms: x86's ratio interval crosses 0.
    values = {}
    for x, base in ((36, 10000.0), (55000, 10.0)):
        for s in (0, 1):
            values[(x, "sync", s)] = base
            values[(x, "x86", s)] = base * (2.0 if x == 36 else (0.1 if s == 0 else 5.0))
    agg = fake_sweep(values)
    fig = Figure(layout="constrained")
    caption = line_figure(fig, agg, OPS, ratio=True)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "random_writer writes/s, ratio to sync"
    assert ax.get_xlabel() == "swap mean latency (µs)"
    assert "n = 2 seeds is small" in fig.get_suptitle()
    assert "n = 2 seeds is small" in caption
    footer = fig.get_supxlabel()
    assert "scenario writer-compute" in footer and "seeds 0, 1 (n = 2)" in footer
    assert "5 s simulated" in footer
    mean = Figure(layout="constrained")
    line_figure(mean, agg, OPS, ratio=False)
    assert mean.axes[0].get_yscale() == "log"  # 10 to 20000 writes/s
    assert mean.axes[0].get_ylabel() == "random_writer writes/s"
    calm = fake_sweep(
        {(x, p, s): 1.0 + s for x in (36, 55000) for p in ("sync", "x86") for s in (0, 1)}
    )
    flat = Figure(layout="constrained")
    line_figure(flat, calm, OPS, ratio=False)
    assert flat.axes[0].get_yscale() == "linear"
    ok = Figure(layout="constrained")
    line_figure(ok, calm, OPS, ratio=True)
    assert ok.get_suptitle() == ""


@needs_plotting
def test_cdf_lines_are_told_apart_and_the_baseline_is_on_top(data: ReportData) -> None:
    from matplotlib.figure import Figure

    from apfsim.report.figures import _latency_cdf

    fig = Figure()
    _latency_cdf(fig, data)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == set(PROTOCOLS)
    looks = {(line.get_linestyle(), line.get_marker()) for line in lines.values()}
    assert len(looks) == len(PROTOCOLS)
    assert lines["sync"].get_zorder() > max(lines[p].get_zorder() for p in ("x86", "halt-only"))
    assert fig.axes[0].get_xscale() == "log"


@needs_plotting
def test_report_figures_use_the_full_width_and_carry_their_context(
    data: ReportData, files: list[Path]
) -> None:
    from apfsim.report.figures import FIGURE_WIDTH_IN, render_figures

    for figure in render_figures(data, ("svg",)):
        svg = figure.outputs["svg"].decode()
        width = re.search(r'<svg[^>]*\bwidth="([\d.]+)pt"', svg)
        assert width is not None and float(width.group(1)) == FIGURE_WIDTH_IN * 72
        assert "scenario small-units · seeds 0, 1 (n = 2) · 0.3 s simulated" in svg
    html = render_report(files)
    assert re.search(r"figure\.figure svg \{[^}]*(?<!-)width: 100%", html)


@needs_plotting
def test_speedup_figure_says_when_n_is_too_small(data: ReportData) -> None:
    from matplotlib.figure import Figure

    from apfsim.report.figures import _speedup

    fig = Figure()
    _speedup(fig, data)
    assert fig.axes[0].get_ylabel() == "throughput, ratio to sync"
    assert "n = 2" not in fig.axes[0].get_title()
    wide = {p: dict(r) for p, r in data.ratios.items()}
    wide["x86"]["task.writer.ops_rate"] = Estimate(1.2, 3.0, 2)
    fig = Figure()
    caption = _speedup(fig, replace(data, ratios=wide))
    assert "n = 2 seeds is small" in fig.axes[0].get_title()
    assert "n = 2 seeds is small" in caption


def test_sweep_report_names_the_closest_axis_protocol_and_metric() -> None:
    """Unknown names in sweep-report's --by, --baseline and --metric end with a "did you
    mean" (issue 15)."""
    agg = fake_sweep({(100, "sync", 0): 1.0, (100, "x86", 0): 2.0})
    info, runs = agg.info, list(agg.runs)
    with pytest.raises(SweepReportError, match=r"did you mean 'host\.swap\.mean_us'\?$"):
        aggregate_runs(info, runs, by=["host.swap.mean_usx"])
    with pytest.raises(SweepReportError, match=r"did you mean 'x86'\?$"):
        aggregate_runs(info, runs, baseline="x68")
    with pytest.raises(SweepReportError, match=r"did you mean 'kind\.compute\.work_rate'\?$"):
        choose_metric(agg, "kind.compute.work_rat")
    with pytest.raises(SweepReportError, match=r"it has: [^;]*$"):
        choose_metric(agg, "nothing-like-it")
