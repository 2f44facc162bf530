"""``apfsim sweep-report``: the groups' estimates and paired ratios against a hand
computation, pooling of axes left out of --by, the CSV, Parquet and HTML outputs, the figure
file, and a one-line error with exit code 2 for every bad input."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import re
import shutil
import sqlite3
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from apfsim.report.render import format_estimate
from apfsim.stats import estimate, t_quantile_975
from apfsim.sweep.report import (
    SweepInfo,
    SweepReportError,
    aggregate,
    aggregate_runs,
    render_sweep_html,
    speedup_figure,
    table,
    text_table,
    write_csv,
    write_output,
    write_parquet,
)
from apfsim.sweep.run import run_sweep
from apfsim.sweep.spec import parse_sweep
from apfsim.sweep.store import StoredRun, SweepStore
from cli_helpers import assert_one_line_error, cli
from page_checks import assert_offline_page

pytestmark = pytest.mark.slow  # every test reads a sweep run for it: the full tier

PLOTTING = all(importlib.util.find_spec(m) is not None for m in ("matplotlib", "jinja2"))
needs_plotting = pytest.mark.skipif(
    not PLOTTING, reason="the report extra is not installed: pip install -e '.[report]'"
)

MEAN = "host.swap.mean_us"
LIMIT = "host.memory_limit_mib"
RATE = "kind.compute.work_rate"
HOG = "kind.memory_hog.work_rate"
SWEEP = {
    "name": "t",
    "description": "a tiny sweep for the tests",
    "scenario": "rfcv2-2020",
    "duration_s": 0.3,
    "protocols": ["sync", "x86"],
    "seeds": 3,
    "set": {"host.swap.distribution": "exponential"},
    "grid": {MEAN: [36.0, 55000.0], LIMIT: [171, 128]},
}
# Two grid points of each end of the x axis, every protocol and seed.
FIGURES = ["sweep-ratio", "sweep-mean"] + [
    f"point{p}-{f}" for p in (0, 2) for f in ("throughput", "speedup", "vcpu-time", "latency-cdf")
]


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 runs: 2 swap latencies x 2 memory limits x {sync, x86} x 3 seeds (~4 s)."""
    path = tmp_path_factory.mktemp("sweep") / "t.sqlite"
    store = SweepStore(path)
    try:
        summary = run_sweep(parse_sweep(SWEEP, "t"), store, "serial")
    finally:
        store.close()
    assert (summary.done, summary.failed) == (24, 0)
    return path


@pytest.fixture(scope="module")
def stored(db: Path) -> list[StoredRun]:
    """The runs as the store returns them: the hand computation's input."""
    store = SweepStore(db)
    try:
        return store.runs("t")
    finally:
        store.close()


@pytest.fixture(scope="module")
def html(db: Path) -> str:
    if not PLOTTING:
        pytest.skip("the report extra is not installed")
    return render_sweep_html(aggregate(db))


def value(run: StoredRun, metric: str) -> float:
    x = run.metrics[metric]
    assert x is not None
    return x


def by_hand(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % CI half-width, written out (not through apfsim.compare.estimate)."""
    n = len(values)
    mean = math.fsum(values) / n
    return mean, t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)


# -------------------------------------------------------------------------- aggregation


def test_groups_are_every_point_and_protocol_in_sweep_order(db: Path) -> None:
    agg = aggregate(db)
    assert agg.by == (MEAN, LIMIT) and agg.baseline == "sync"
    assert [(g.values, g.protocol) for g in agg.groups] == [
        ((m, lim), p) for m in (36.0, 55000.0) for lim in (171, 128) for p in ("sync", "x86")
    ]
    assert all(g.n == g.n_paired == 3 and len(g.points) == 1 for g in agg.groups)
    assert RATE in agg.ratio_metrics and HOG in agg.ratio_metrics
    assert all(m.endswith((".work_rate", ".ops_rate")) for m in agg.ratio_metrics)
    assert "kind.memory_hog.ops_rate" in agg.ratio_metrics
    assert "task.compute.completion_s" not in agg.metrics  # None in every run: left out


def test_means_and_intervals_are_estimates_of_the_stored_values(
    db: Path, stored: list[StoredRun]
) -> None:
    agg = aggregate(db)
    for g in agg.groups:
        runs = [
            r
            for r in stored
            if r.protocol == g.protocol and (r.params[MEAN], r.params[LIMIT]) == g.values
        ]
        assert sorted(r.seed for r in runs) == [0, 1, 2]
        for metric in agg.metrics:
            assert g.metrics[metric] == estimate([r.metrics.get(metric) for r in runs]), metric
        mean, ci = by_hand([value(r, HOG) for r in runs])
        assert g.metrics[HOG].mean == pytest.approx(mean, rel=1e-12)
        assert g.metrics[HOG].ci95 == pytest.approx(ci, rel=1e-9)


def test_ratios_are_paired_by_point_and_seed(db: Path, stored: list[StoredRun]) -> None:
    agg = aggregate(db)
    checked = 0
    for g in agg.groups:
        runs = {
            (r.protocol, r.seed): r for r in stored if (r.params[MEAN], r.params[LIMIT]) == g.values
        }
        for metric in agg.ratio_metrics:
            ratios = [
                value(runs[(g.protocol, s)], metric) / value(runs[("sync", s)], metric)
                for s in (0, 1, 2)
            ]
            mean, ci = by_hand(ratios)
            assert g.ratios[metric].mean == pytest.approx(mean, rel=1e-12)
            assert g.ratios[metric].ci95 == pytest.approx(ci, rel=1e-9, abs=1e-15)
            assert g.ratios[metric].n == 3
            checked += 1
        if g.protocol == "sync":
            assert g.ratios[RATE].mean == 1.0 and g.ratios[RATE].ci95 == 0.0
    assert checked == len(agg.groups) * len(agg.ratio_metrics)
    # x86 does more memory-hog work than sync at the low latency: the ratios are not all 1.
    assert aggregate(db).group((36.0, 171), "x86").ratios[HOG].mean != 1.0


def test_an_axis_left_out_of_by_is_pooled(db: Path, stored: list[StoredRun]) -> None:
    agg = aggregate(db, by=[MEAN])
    assert [(g.values, g.protocol) for g in agg.groups] == [
        ((m,), p) for m in (36.0, 55000.0) for p in ("sync", "x86")
    ]
    for g in agg.groups:
        runs = [r for r in stored if r.protocol == g.protocol and r.params[MEAN] == g.values[0]]
        assert g.n == g.n_paired == 6 and len(g.points) == 2
        for metric in agg.metrics:
            assert g.metrics[metric] == estimate([r.metrics.get(metric) for r in runs])
        base = {
            (r.params[LIMIT], r.seed): r
            for r in stored
            if r.protocol == "sync" and r.params[MEAN] == g.values[0]
        }
        ratios = [value(r, HOG) / value(base[(r.params[LIMIT], r.seed)], HOG) for r in runs]
        assert g.ratios[HOG] == estimate(ratios)


def fake_run(point: int, params: dict[str, Any], protocol: str, seed: int, rate: float) -> Any:
    row = {
        "key": f"{point}-{protocol}-{seed}",
        "point": point,
        "params": json.dumps(params),
        "protocol": protocol,
        "seed": seed,
        "error": None,
        "metrics": json.dumps({RATE: rate, "apf.sync_fallbacks": None}),
        "result": None,
    }
    return StoredRun(row)  # type: ignore[arg-type]  # a dict stands in for a sqlite3.Row


def test_pooled_pairs_keep_their_own_point() -> None:
    info = SweepInfo("s", "", {}, ("a", "b"), ("sync", "x86"), (0, 1), "sync", {"ok": 7})
    runs = [
        fake_run(0, {"a": 1, "b": 1}, "sync", 0, 1.0),
        fake_run(0, {"a": 1, "b": 1}, "sync", 1, 2.0),
        fake_run(0, {"a": 1, "b": 1}, "x86", 0, 2.0),
        fake_run(0, {"a": 1, "b": 1}, "x86", 1, 6.0),
        fake_run(1, {"a": 1, "b": 2}, "sync", 0, 4.0),
        fake_run(1, {"a": 1, "b": 2}, "x86", 0, 2.0),
        fake_run(1, {"a": 1, "b": 2}, "x86", 1, 4.0),  # its sync run failed: no pair
    ]
    agg = aggregate_runs(info, runs, ["a"])
    x86 = agg.group((1,), "x86")
    assert (x86.n, x86.n_paired, x86.points) == (4, 3, (0, 1))
    assert x86.ratios[RATE] == estimate([2.0, 3.0, 0.5])
    assert x86.metrics[RATE] == estimate([2.0, 6.0, 2.0, 4.0])
    assert agg.metrics == (RATE,)  # a metric without any value is left out
    other = aggregate_runs(info, runs, ["a"], baseline="x86")
    assert other.group((1,), "sync").ratios[RATE] == estimate([0.5, 2.0 / 6.0, 2.0])


# ------------------------------------------------------------------------------ outputs


def test_csv_has_one_row_per_group_at_full_precision(db: Path, tmp_path: Path) -> None:
    agg = aggregate(db, by=[LIMIT, MEAN])
    path = write_csv(agg, tmp_path / "t.csv")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    assert header[:5] == [LIMIT, MEAN, "protocol", "n", "n_paired"]
    assert f"{RATE}.mean" in header and f"{RATE}.ci95" in header
    assert f"ratio.{RATE}.mean" in header and f"ratio.{HOG}.ci95" in header
    assert "ratio.sim_time_s.mean" not in header  # ratios of work rates only
    assert len(rows) == 1 + len(agg.groups)
    for row, g in zip(rows[1:], agg.groups, strict=True):
        cells = dict(zip(header, row, strict=True))
        assert (int(cells[LIMIT]), float(cells[MEAN])) == g.values
        assert (cells["protocol"], cells["n"]) == (g.protocol, "3")
        assert float(cells[f"{RATE}.mean"]) == g.metrics[RATE].mean  # repr: exact
        assert float(cells[f"{RATE}.ci95"]) == g.metrics[RATE].ci95
        assert float(cells[f"ratio.{HOG}.mean"]) == g.ratios[HOG].mean
    assert [r[0] for r in rows[1:5]] == ["171", "171", "171", "171"]  # the sweep's order
    again = write_csv(aggregate(db, by=[LIMIT, MEAN]), tmp_path / "again.csv")
    assert again.read_bytes() == path.read_bytes()


def test_parquet_round_trip(db: Path, tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    agg = aggregate(db)
    path = write_parquet(agg, tmp_path / "t.parquet")
    columns, rows = table(agg)
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{path}')")
    assert rel.columns == columns
    types = dict(zip(rel.columns, map(str, rel.types), strict=True))
    assert (types[MEAN], types[LIMIT], types["protocol"], types["n"]) == (
        "DOUBLE",
        "BIGINT",
        "VARCHAR",
        "BIGINT",
    )
    assert {types[c] for c in columns[5:]} == {"DOUBLE"}
    assert [list(r) for r in rel.fetchall()] == rows
    assert write_output(agg, tmp_path / "u.PARQUET") == tmp_path / "u.PARQUET"


def test_text_table(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["sweep-report", str(db), "--by", MEAN, "--metric", HOG], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [MEAN, "protocol", "n", HOG, "ratio", "to", "sync"]
    assert len(lines) == 1 + 4 + 1
    g = aggregate(db, by=[MEAN]).group((36.0,), "x86")
    assert lines[2].startswith("36 ") and " x86 " in lines[2] and " 6 " in lines[2]
    assert lines[2].count("±") == 2
    assert lines[-1].startswith("sweep t: 24 completed runs of 24")
    assert text_table(aggregate(db, by=[MEAN]), HOG).splitlines()[2] == lines[2]
    assert format_estimate(g.ratios[HOG]) in lines[2]  # rounded to the interval
    code, out, _ = cli(["sweep-report", str(db), "--metric", "sim_time_s"], capsys)
    assert code == 0 and "ratio" not in out.splitlines()[0]  # not a work rate: no ratio


def test_a_report_does_not_change_the_database(db: Path, tmp_path: Path) -> None:
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    write_csv(aggregate(db), tmp_path / "t.csv")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()


@needs_plotting
def test_html_is_one_offline_page_with_the_line_plots(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>")
    names = re.findall(r'<figure class="figure" data-figure="([^"]+)">', html)
    assert names == FIGURES
    assert_offline_page(html, FIGURES)
    ratio = html.split('data-figure="sweep-ratio">', 1)[1].split("</figure>", 1)[0]
    assert "x86" in ratio and ">sync<" not in ratio  # the baseline is the dashed line
    assert ", log scale)" in ratio and "one panel per host.memory_limit_mib" in ratio
    for needle in (
        "apfsim sweep report: t",
        "a tiny sweep for the tests",
        "compute CPU s/s, ratio to sync, paired by point and seed",
        "host.swap.mean_us=55000, host.memory_limit_mib=128",
        "Point 2: host.swap.mean_us=55000, host.memory_limit_mib=171",
        "24 completed of 24",
        "&#34;host.swap.distribution&#34;: &#34;exponential&#34;",
    ):
        assert needle in html, needle


@needs_plotting
def test_html_is_deterministic_and_pools_in_its_captions(db: Path, html: str) -> None:
    assert render_sweep_html(aggregate(db)) == html
    pooled = render_sweep_html(aggregate(db, by=[MEAN]), HOG)
    names = re.findall(r'data-figure="([^"]+)"', pooled)
    assert names[:2] == ["sweep-ratio", "sweep-mean"]
    assert "and the values of host.memory_limit_mib (pooled)" in pooled
    assert "one panel per" not in pooled.split('data-figure="sweep-mean">', 1)[1][:3000]


@needs_plotting
def test_cli_writes_html_and_a_speedup_figure(
    db: Path, html: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t.html"
    code, stdout, err = cli(["sweep-report", str(db), "--sweep", "t", "-o", str(out)], capsys)
    assert (code, stdout, err) == (0, f"{out}\n", "")
    assert out.read_text(encoding="utf-8") == html
    png = speedup_figure(db, None, MEAN, None, tmp_path / "s.png", title="APF speedup")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    svg = speedup_figure(db, "t", MEAN, HOG, tmp_path / "s.svg", by=[MEAN])
    text = svg.read_text(encoding="utf-8")
    assert "<svg" in text and "x86" in text
    assert "memory_hog work rate (CPU s/s), ratio to sync" in text
    with pytest.raises(SweepReportError, match="not a work rate"):
        speedup_figure(db, None, MEAN, "sim_time_s", tmp_path / "x.png")
    with pytest.raises(SweepReportError, match="not an axis"):
        speedup_figure(db, None, "guest.vcpus", None, tmp_path / "x.png")
    with pytest.raises(SweepReportError, match=r"ending in \.png or \.svg"):
        speedup_figure(db, None, MEAN, None, tmp_path / "x.pdf")


# ----------------------------------------------------------------------------- errors


def one_point_store(path: Path, name: str = "one") -> tuple[SweepStore, Any]:
    """A sweep without axes, registered but not run."""
    spec = parse_sweep(
        {"name": name, "scenario": "rfcv2-2020", "duration_s": 0.3, "protocols": ["sync"]}, name
    )
    store = SweepStore(path)
    store.register(spec)
    return store, spec


def test_cli_errors_about_the_database(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.sqlite"
    code, _, err = cli(["sweep-report", str(missing)], capsys)
    assert_one_line_error(code, err, f"sweep database {str(missing)!r} does not exist")
    assert not missing.exists()
    code, _, err = cli(["sweep-report", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "is a directory, not a sweep database")
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, but long enough to have a header\n" * 4)
    code, _, err = cli(["sweep-report", str(text)], capsys)
    assert_one_line_error(code, err, "is not an apfsim sweep database", "file is not a database")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE things(x)")
    con.close()
    code, _, err = cli(["sweep-report", str(other)], capsys)
    assert_one_line_error(code, err, "is not an apfsim sweep database (no sweeps and runs")
    newer = tmp_path / "newer.sqlite"
    SweepStore(newer).close()
    with sqlite3.connect(newer) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    code, _, err = cli(["sweep-report", str(newer)], capsys)
    assert_one_line_error(code, err, "schema version '99'", "this apfsim reads 1")
    empty = tmp_path / "empty.sqlite"
    SweepStore(empty).close()
    code, _, err = cli(["sweep-report", str(empty)], capsys)
    assert_one_line_error(code, err, "holds no sweep", "apfsim sweep")


def test_cli_errors_about_the_sweep(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(["sweep-report", str(db), "--sweep", "nope"], capsys)
    assert_one_line_error(code, err, "--sweep: no sweep 'nope'", "it holds: t")
    two = tmp_path / "two.sqlite"
    shutil.copy(db, two)
    store, spec = one_point_store(two)
    code, _, err = cli(["sweep-report", str(two)], capsys)
    assert_one_line_error(code, err, "holds 2 sweeps; choose one with --sweep: one, t")
    code, _, err = cli(["sweep-report", str(two), "--sweep", "one"], capsys)
    assert_one_line_error(code, err, "sweep 'one' has no completed run", "apfsim sweep")
    store.record("one", spec.runs[0], None, None, "RuntimeError: boom", 0.0, "serial")
    code, _, err = cli(["sweep-report", str(two), "--sweep", "one"], capsys)
    assert_one_line_error(code, err, "no completed run (1 failed;")
    store.record("one", spec.runs[0], None, {RATE: 1.0}, None, 0.0, "serial")
    store.close()
    code, out, err = cli(["sweep-report", str(two), "--sweep", "one"], capsys)
    assert (code, err) == (0, "") and out.splitlines()[1].split()[:2] == ["sync", "1"]
    if PLOTTING:
        out_html = tmp_path / "one.html"
        code, _, err = cli(
            ["sweep-report", str(two), "--sweep", "one", "-o", str(out_html)], capsys
        )
        assert_one_line_error(code, err, "has no axis to plot along", ".csv")
        assert not out_html.exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--by", "guest.vcpus"], ["--by: 'guest.vcpus' is not an axis of sweep 't'", LIMIT]),
        (["--by", f"{MEAN},{MEAN}"], [f"--by: axis {MEAN!r} given more than once"]),
        (["--by", f"{MEAN},"], ["--by: empty axis name"]),
        (["--metric", "kind.nothing"], ["--metric: sweep 't' has no metric 'kind.nothing'", RATE]),
        (["--baseline", "arm64-rfcv2"], ["'arm64-rfcv2' is not a protocol", "sync, x86"]),
        (["-o", "report.txt"], ["cannot tell the format of 'report.txt'", ".html, .csv or"]),
        (["-o", "no/such/dir/r.csv"], ["-o: directory 'no/such/dir' does not exist"]),
        (["-o", "."], ["-o: cannot tell the format of '.'"]),
        (["-o", "adir.csv"], ["-o: 'adir.csv' is a directory"]),
        (["--sweep"], ["--sweep"]),
    ],
)
def test_cli_errors_about_options(
    args: list[str],
    needles: list[str],
    db: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir.csv").mkdir()
    code, out, err = cli(["sweep-report", str(db), *args], capsys)
    assert out == ""
    assert_one_line_error(code, err, *needles)


def test_cli_without_duckdb_or_the_report_extra(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import raises ImportError
    out = tmp_path / "t.parquet"
    code, _, err = cli(["sweep-report", str(db), "-o", str(out)], capsys)
    assert_one_line_error(code, err, "duckdb is not installed; pip install 'apfsim[parquet]'")
    assert not out.exists()
    for module in ("matplotlib", "jinja2"):
        monkeypatch.setitem(sys.modules, module, None)
    code, _, err = cli(["sweep-report", str(db), "-o", str(tmp_path / "t.html")], capsys)
    assert_one_line_error(code, err, "not installed", "pip install 'apfsim[report]'")
    code, _, err = cli(["sweep-report", str(db), "-o", str(tmp_path / "t.csv")], capsys)
    assert (code, err) == (0, "")  # CSV needs nothing
