"""``apfsim report`` and ``apfsim plot``: the inputs accepted and merged, the statistics, a
self-contained deterministic HTML page, the figure files, and one-line CLI errors."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from apfsim.api import compare, run
from apfsim.report import ReportError, load_results, render_report, write_plots, write_report
from apfsim.scenario import load_scenario
from cli_helpers import assert_one_line_error, cli
from page_checks import assert_offline_page

PLOTTING = all(importlib.util.find_spec(m) is not None for m in ("matplotlib", "jinja2"))
needs_plotting = pytest.mark.skipif(
    not PLOTTING, reason="the report extra is not installed: pip install -e '.[report]'"
)

# Two vCPUs, five tasks (so throughput is shown per task kind), a buffer twice the host limit:
# about 0.1 s for three protocols.
TINY = """\
name = "tiny-report"
duration_s = 0.3

[guest]
vcpus = 2
memory_mib = 64
reserved_mib = 16

[host]
memory_limit_mib = 16

[initial_memory]
resident_fraction = 0.25
swapped_fraction = 0.75

[[tasks]]
kind = "random_writer"
buffer_mib = 32
count = 2

[[tasks]]
kind = "compute"
count = 2

[[tasks]]
kind = "compute"
name = "finite"
work_s = 0.01
"""
PROTOCOLS = ["sync", "x86", "arm64-rfcv2"]
FIGURES = ["throughput", "speedup", "vcpu-time", "latency-cdf"]


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """run files of seeds 0 and 1, the compare file of the same, one rfcv2-2020 run file."""
    root = tmp_path_factory.mktemp("inputs")
    toml = root / "tiny.toml"
    toml.write_text(TINY)
    scenario = load_scenario(toml)
    files = {}
    for seed in (0, 1):
        result = run(scenario, PROTOCOLS, seed=seed)
        files[f"seed{seed}"] = write_json(root / f"seed{seed}.json", result.to_dict())
    both = compare(scenario, PROTOCOLS, 2, jobs=1)
    files["compare"] = write_json(root / "compare.json", both.to_dict())
    single = run("rfcv2-2020", ["sync", "arm64-rfcv2"], seed=3, duration_s=0.5)
    files["single"] = write_json(root / "single.json", single.to_dict())
    return files


@pytest.fixture(scope="module")
def two_seeds(inputs: dict[str, Path]) -> list[Path]:
    return [inputs["seed0"], inputs["seed1"]]


@pytest.fixture(scope="module")
def report_html(two_seeds: list[Path]) -> str:
    if not PLOTTING:
        pytest.skip("the report extra is not installed")
    return render_report(two_seeds)


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# ------------------------------------------------------------------------- inputs, statistics


def test_run_files_merge_to_the_compare_files_statistics(
    inputs: dict[str, Path], two_seeds: list[Path]
) -> None:
    merged = load_results(two_seeds)
    from_compare = load_results([inputs["compare"]])
    assert merged.protocols == from_compare.protocols == PROTOCOLS
    assert merged.baseline == from_compare.baseline == "sync"
    assert [(r.result.protocol, r.seed) for r in merged.runs] == [
        (p, s) for p in PROTOCOLS for s in (0, 1)
    ]
    summary = load(inputs["compare"])["summary"]
    for p in PROTOCOLS:
        for key, own in summary[p].items():
            if key == "ratio_to_baseline":
                for rkey, r in own.items():
                    if not rkey.endswith(".work_rate"):
                        continue  # completion speedups: the report shows work rates
                    e = merged.ratios[p][rkey]
                    assert e.n == r["n"]
                    assert e.mean == pytest.approx(r["mean"], rel=1e-12), (p, rkey)
                continue
            e = merged.metrics[p][key]
            assert (e.mean is None) == (own["mean"] is None), (p, key)
            assert e.n == own["n"]
            if own["mean"] is not None:
                assert e.mean == pytest.approx(own["mean"], rel=1e-12), (p, key)
                assert e.ci95 == pytest.approx(own["ci95"], rel=1e-9, abs=1e-15), (p, key)


def test_a_compare_files_own_summary_is_used(inputs: dict[str, Path], tmp_path: Path) -> None:
    data = load(inputs["compare"])
    data["summary"]["x86"]["ratio_to_baseline"]["kind.compute.work_rate"]["mean"] = 42.0
    data["summary"]["x86"]["vcpu_time_s.host"] = {"mean": 7.0, "ci95": 0.5, "n": 2}
    report = load_results([write_json(tmp_path / "edited.json", data)])
    assert report.ratios["x86"]["kind.compute.work_rate"].mean == 42.0
    assert report.metrics["x86"]["vcpu_time_s.host"].mean == 7.0
    # What the summary does not have is computed from the runs.
    rates = [
        sum(t["work_s"] for t in r["tasks"] if t["kind"] == "compute") / r["sim_time_s"]
        for r in data["runs"]
        if r["protocol"] == "x86"
    ]
    assert report.metrics["x86"]["kind.compute.work_rate"].mean == pytest.approx(
        statistics.fmean(rates)
    )


def test_throughput_groups_per_task_or_per_kind(
    inputs: dict[str, Path], two_seeds: list[Path]
) -> None:
    many = load_results(two_seeds)  # five tasks
    assert [(g.key, g.label) for g in many.groups()] == [
        ("kind.random_writer", "all random_writer (2 tasks)"),
        ("kind.compute", "all compute (3 tasks)"),
    ]
    few = load_results([inputs["single"]])  # two tasks
    assert [g.key for g in few.groups()] == ["task.memhog", "task.compute"]
    assert few.seeds("sync") == [3]
    assert few.metrics["sync"]["task.compute.work_rate"].ci95 is None  # one seed, no interval


def test_latency_cdf_is_the_mean_of_the_seeds_quantiles(two_seeds: list[Path]) -> None:
    data = load_results(two_seeds)
    runs = [r for f in two_seeds for r in load(f)["results"] if r["protocol"] == "x86"]
    cdfs = [r["faults"]["not_present_to_ready_us"]["cdf_us"] for r in runs]
    assert all(len(c) == 21 for c in cdfs)
    mean = data.mean_cdf("x86", "not_present_to_ready_us")
    assert mean == pytest.approx([statistics.fmean(v) for v in zip(*cdfs, strict=True)])
    assert data.mean_cdf("sync", "not_present_to_ready_us") is None  # sync never injects
    assert data.mean_cdf("sync", "fault_in_latency_us") is not None


def test_sources_and_seeds_are_recorded(inputs: dict[str, Path], two_seeds: list[Path]) -> None:
    data = load_results([*two_seeds])
    assert [(s.name, s.kind, s.seeds) for s in data.sources] == [
        ("seed0.json", "run", (0,)),
        ("seed1.json", "run", (1,)),
    ]
    data = load_results([inputs["compare"]])
    assert [(s.kind, s.protocols, s.seeds) for s in data.sources] == [
        ("compare", tuple(PROTOCOLS), (0, 1))
    ]


# ------------------------------------------------------------------------------- HTML


@needs_plotting
def test_html_is_one_self_contained_page_with_every_figure(report_html: str) -> None:
    html = report_html
    assert html.startswith("<!DOCTYPE html>")
    names = re.findall(r'<figure class="figure" data-figure="([^"]+)">', html)
    assert names == FIGURES
    assert html.count('class="figure"') == len(FIGURES)
    assert_offline_page(html, FIGURES)
    # The tables and the scenario in full.
    for needle in (
        "APF counters",
        "not_present_injected",
        "sync_fallbacks",
        "Faults and memory",
        "tiny-report",
        "&#34;memory_limit_mib&#34;: 16",
        "all compute (3 tasks)",
        "seed0.json",
        "seeds per protocol: sync 2, x86 2, arm64-rfcv2 2",
        "not_present_to_ready_us samples under sync",
    ):
        assert needle in html, needle


@pytest.mark.slow
@needs_plotting
def test_html_is_deterministic(two_seeds: list[Path], report_html: str, tmp_path: Path) -> None:
    assert render_report(two_seeds) == report_html
    # A fresh interpreter (its own hash seed, nothing cached) writes the same bytes.
    out = tmp_path / "fresh.html"
    code = (
        "import sys; from pathlib import Path; from apfsim.report import write_report; "
        "write_report([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out), *map(str, two_seeds)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8") == report_html


@needs_plotting
def test_one_seed_has_no_error_bars_and_says_so(inputs: dict[str, Path]) -> None:
    html = render_report([inputs["single"]])
    assert "1 seed: the points are that run&#39;s, without error bars." in html
    assert "memhog (memory_hog)" in html  # two tasks: per task
    throughput = html.split('data-figure="throughput">', 1)[1].split("</figure>", 1)[0]
    assert "LineCollection" not in throughput  # matplotlib's error bars
    many = render_report([inputs["compare"]])
    throughput = many.split('data-figure="throughput">', 1)[1].split("</figure>", 1)[0]
    assert "LineCollection" in throughput


@needs_plotting
def test_files_without_quantiles_still_render(inputs: dict[str, Path], tmp_path: Path) -> None:
    data = load(inputs["seed0"])
    for result in data["results"]:
        for lat in ("fault_in_latency_us", "not_present_to_ready_us"):
            del result["faults"][lat]["cdf_us"]
    html = render_report([write_json(tmp_path / "old.json", data)])
    assert 'data-figure="latency-cdf"' in html
    assert "have no quantiles in old.json (written by an older apfsim; re-run it" in html


@needs_plotting
def test_write_report(two_seeds: list[Path], report_html: str, tmp_path: Path) -> None:
    out = write_report(two_seeds, tmp_path / "r.html")
    assert out.read_text(encoding="utf-8") == report_html


# ------------------------------------------------------------------------------ plot files


@pytest.mark.slow
@needs_plotting
def test_write_plots_writes_png_and_svg(two_seeds: list[Path], tmp_path: Path) -> None:
    out_dir = tmp_path / "new" / "plots"  # created
    written = write_plots(two_seeds, out_dir)
    assert written == [out_dir / f"{n}.{ext}" for n in FIGURES for ext in ("png", "svg")]
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
        else:
            text = data.decode()
            assert text.startswith("<?xml") and "<path" in text and "</svg>" in text
            assert "<dc:date>" not in text  # no timestamp
    again = write_plots(two_seeds, tmp_path / "again")
    for a, b in zip(written, again, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


@needs_plotting
def test_one_protocol_has_no_speedup_figure(inputs: dict[str, Path], tmp_path: Path) -> None:
    data = load(inputs["single"])
    data["results"] = data["results"][:1]
    written = write_plots([write_json(tmp_path / "one.json", data)], tmp_path / "out")
    assert [p.name for p in written if p.suffix == ".svg"] == [
        "throughput.svg",
        "vcpu-time.svg",
        "latency-cdf.svg",
    ]


# ---------------------------------------------------------------------------------- CLI


@pytest.mark.slow
@needs_plotting
def test_cli_report_and_plot(
    two_seeds: list[Path], report_html: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    code, stdout, err = cli(["report", *map(str, two_seeds), "-o", str(out)], capsys)
    assert (code, stdout, err) == (0, f"{out}\n", "")
    assert out.read_text(encoding="utf-8") == report_html
    plots = tmp_path / "plots"
    code, stdout, err = cli(["plot", *map(str, two_seeds), "--output", str(plots)], capsys)
    assert code == 0 and err == ""
    assert stdout.splitlines() == [str(plots / f"{n}.{e}") for n in FIGURES for e in ("png", "svg")]


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("object.json", '{"a": 1}', "top level: no 'schema_version'"),
        ("list.json", "[1, 2]", "top level: expected an object, got list"),
        ("version.json", '{"schema_version": 2}', "schema_version: 2, but this apfsim reads"),
        ("garbage.json", "not json", "is not JSON (Expecting value at line 1, column 1)"),
        ("binary.json", "\udcff", "is not JSON (not UTF-8 text)"),
    ],
)
def test_cli_not_a_results_file(
    name: str, text: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    for command in ("report", "plot"):
        code, out, err = cli([command, str(path), "-o", str(tmp_path / "out")], capsys)
        assert out == ""
        assert_one_line_error(code, err, repr(str(path)), needle, "apfsim run --json")


def test_cli_damaged_results_file(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = load(inputs["seed0"])
    damaged = copy.deepcopy(data)
    del damaged["results"][1]["tasks"][2]["work_s"]
    path = write_json(tmp_path / "damaged.json", damaged)
    code, _, err = cli(["report", str(path), "-o", str(tmp_path / "r.html")], capsys)
    assert_one_line_error(code, err, "not an apfsim results file", "results[1].tasks[2]: missing")
    damaged = copy.deepcopy(data)
    damaged["results"][0]["faults"]["fault_in_latency_us"]["cdf_us"] = [3.0, 2.0, 1.0]
    path = write_json(tmp_path / "order.json", damaged)
    code, _, err = cli(["report", str(path), "-o", str(tmp_path / "r.html")], capsys)
    assert_one_line_error(code, err, "cdf_us: quantiles not in increasing order")
    damaged = copy.deepcopy(data)
    damaged["results"][2]["tasks"][0]["name"] = "renamed"
    path = write_json(tmp_path / "renamed.json", damaged)
    code, _, err = cli(["report", str(path), "-o", str(tmp_path / "r.html")], capsys)
    assert_one_line_error(code, err, "arm64-rfcv2 on seed 0 has other tasks than sync on seed 0")
    damaged = copy.deepcopy(data)
    damaged["kind"] = "sweep"
    path = write_json(tmp_path / "kind.json", damaged)
    code, _, err = cli(["plot", str(path), "-o", str(tmp_path / "p")], capsys)
    assert_one_line_error(code, err, "kind: unknown 'sweep'")


def test_cli_inputs_that_do_not_go_together(
    inputs: dict[str, Path],
    two_seeds: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = str(tmp_path / "r.html")
    code, _, err = cli(["report", str(inputs["seed0"]), str(inputs["single"]), "-o", out], capsys)
    assert_one_line_error(
        code, err, "different scenarios ('tiny-report' and 'rfcv2-2020')", "one report per scenario"
    )
    code, _, err = cli(["report", *map(str, two_seeds), str(inputs["compare"]), "-o", out], capsys)
    assert_one_line_error(code, err, "both hold protocol 'sync' on seed 0", "give each")
    other = load(inputs["seed1"])
    other["scenario"]["duration_s"] = 9.0
    path = write_json(tmp_path / "longer.json", other)
    code, _, err = cli(["report", str(inputs["seed0"]), str(path), "-o", out], capsys)
    assert_one_line_error(code, err, "both 'tiny-report' but duration_s: 0.3 vs 9)")


def test_cli_missing_inputs_and_bad_outputs(
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where the default report.html would go
    seed0 = str(inputs["seed0"])
    missing = tmp_path / "missing.json"
    code, _, err = cli(["report", str(missing)], capsys)
    assert_one_line_error(code, err, f"results file {str(missing)!r} does not exist")
    code, _, err = cli(["plot", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "is a directory, not a results file")
    code, _, err = cli(["report"], capsys)
    assert_one_line_error(code, err, "Missing argument", "apfsim report --help")
    no_dir = tmp_path / "no" / "such" / "report.html"
    code, _, err = cli(["report", seed0, "-o", str(no_dir)], capsys)
    assert_one_line_error(code, err, f"output directory {str(no_dir.parent)!r} does not exist")
    code, _, err = cli(["report", seed0, "-o", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "is a directory; give a file name")
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, _, err = cli(["plot", seed0, "-o", str(a_file)], capsys)
    assert_one_line_error(code, err, "is a file, not a directory")
    assert not (tmp_path / "report.html").exists()


@needs_plotting  # the directory is made once the inputs and matplotlib are known good
def test_cli_plot_directory_that_cannot_be_made(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, _, err = cli(["plot", str(inputs["seed0"]), "-o", str(a_file / "sub")], capsys)
    assert_one_line_error(code, err, "cannot create directory", "(Not a directory)")


def test_cli_without_the_report_extra(
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in ("matplotlib", "jinja2"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    out = tmp_path / "r.html"
    code, _, err = cli(["report", str(inputs["seed0"]), "-o", str(out)], capsys)
    assert_one_line_error(
        code, err, "matplotlib and jinja2 not installed", "pip install 'apfsim[report]'"
    )
    assert not out.exists()
    code, _, err = cli(["plot", str(inputs["seed0"]), "-o", str(tmp_path / "p")], capsys)
    assert_one_line_error(code, err, "matplotlib not installed", "pip install 'apfsim[report]'")
    with pytest.raises(ReportError, match="not installed"):
        render_report([inputs["seed0"]])


def test_importing_apfsim_does_not_import_the_report_extra() -> None:
    code = (
        "import sys, apfsim, apfsim.cli, apfsim.report; "
        "print(sorted(m for m in ('matplotlib', 'jinja2') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]"
