"""Sweeps: sweep files, SQLite results, executors (serial, process, dask), resuming."""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import apfsim.runner as runner
from apfsim.cli import main
from apfsim.runner import Execution
from apfsim.scenario import load_scenario
from apfsim.simulation import Simulation
from apfsim.sweep import SweepError, SweepStore, load_sweep, parse_sweep, run_sweep

sys.path.insert(0, str(Path(__file__).parent))
import sweep_helpers
from sweep_helpers import stored_runs

TINY: dict[str, Any] = {
    "name": "tiny",
    "scenario": "rfcv2-2020",
    "duration_s": 0.3,
    "protocols": ["sync", "arm64-rfcv2"],
    "seeds": 2,
    "set": {"host.swap.distribution": "exponential"},
    "grid": {"host.swap.mean_us": {"logspace": [100, 10000], "num": 3}},
    "zip": {"host.memory_limit_mib": [171, 128], "initial_memory.resident_fraction": [0.5, 0.5]},
}

ROW = "sweep, key, point, params, protocol, seed, status, error, sim_time_s, metrics, result"


def rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as con:
        return con.execute(f"SELECT {ROW} FROM runs ORDER BY key").fetchall()


def write_sweep(path: Path, data: dict[str, Any]) -> Path:
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f'"{k}" = {_toml(v)}' for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


# -- sweep files ------------------------------------------------------------------------------


def test_expansion_is_grid_times_zip_times_protocols_times_seeds() -> None:
    spec = parse_sweep(TINY, "tiny")
    assert spec.points == 3 * 2 and len(spec.runs) == 6 * 2 * 2
    assert spec.axes == (
        "host.swap.mean_us",
        "host.memory_limit_mib",
        "initial_memory.resident_fraction",
    )
    means = sorted({dict(r.params)["host.swap.mean_us"] for r in spec.runs})
    assert means == [100.0, 1000.0, 10000.0]
    assert len({r.key for r in spec.runs}) == len(spec.runs)
    # The key is a content hash: the same run in another sweep has the same key.
    again = parse_sweep({**TINY, "name": "other"}, "x")
    assert [r.key for r in again.runs] == [r.key for r in spec.runs]
    run = spec.runs[0]
    assert run.scenario["host"]["swap"]["mean_us"] == 100.0
    assert run.scenario["host"]["swap"]["distribution"] == "exponential"


def test_builtin_latency_map_expands() -> None:
    spec = load_sweep("latency-map")
    assert spec.points == 7 * 3 and len(spec.protocols) == 5 and len(spec.runs) == 7 * 3 * 5 * 3
    means = sorted({dict(r.params)["host.swap.mean_us"] for r in spec.runs})
    assert means[0] == 36.0 and means[-1] == 55000.0


def test_builtin_natapov_swap_latency_scales_the_fitted_distribution() -> None:
    """The sweep that replaced natapov_sensitivity.py's latency study: each point is the
    shipped lognormal scaled as a whole (min, mean and max by mean / 1680 µs)."""
    spec = load_sweep("natapov-swap-latency")
    base = load_scenario("natapov-2010").host.swap
    assert spec.points == 5 and len(spec.runs) == 5 * 3
    for point in range(spec.points):
        swap = spec.runs[point * 3].scenario["host"]["swap"]
        factor = swap["mean_us"] / base.mean_us
        assert swap["min_us"] == base.min_us * factor and swap["max_us"] == base.max_us * factor
        assert swap["distribution"] == base.distribution


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"grid": {"host.swap.mean_usx": [1.0]}}, "grid.host.swap.mean_usx: "),
        ({"grid": {"host.swap.mean_us": []}}, "grid.host.swap.mean_us: empty axis"),
        ({"grid": {"host.swap.queue_depth": ["deep"]}}, "grid.host.swap.queue_depth: "),
        ({"grid": {"host.swap.mean_us": {"logspace": [0, 5], "num": 3}}}, "grid.host.swap.mean_us"),
        ({"zip": {"guest.vcpus": [1, 2], "tasks.1.count": [1]}}, "zip: lists must have one length"),
        ({"protocols": ["sync", "nope"]}, "protocols: unknown protocol 'nope'"),
        ({"seeds": 0}, "seeds: "),
        ({"baseline": "x86"}, "baseline: "),
        ({"speed": 3}, "speed: unknown key"),
        ({"scenario": "no-such-scenario"}, "scenario: "),
    ],
)
def test_bad_sweep_files_exit_2_naming_the_axis(
    tmp_path: Path, change: dict[str, Any], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {k: v for k, v in TINY.items() if k not in ("grid", "zip")} | change
    path = write_sweep(tmp_path / "bad.toml", data)
    with pytest.raises(SweepError, match=None) as info:
        load_sweep(path)
    assert fragment in str(info.value)
    assert main(["sweep", str(path), "--db", str(tmp_path / "x.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--executor", "threads"], "--executor"),
        (["--scheduler", "tcp://x:1"], "--scheduler: only with --executor dask"),
        (["--workers", "0"], "--workers"),
        (["--db", "/nonexistent/dir/x.sqlite"], "--db: directory"),
    ],
)
def test_bad_sweep_flags_exit_2(
    tmp_path: Path, args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sweep(tmp_path / "s.toml", TINY)
    assert main(["sweep", str(path), *args]) == 2
    assert fragment in capsys.readouterr().err


# -- executors and the store ----------------------------------------------------------------


@pytest.mark.slow
def test_serial_process_and_dask_give_identical_rows(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    spec = parse_sweep(TINY, "tiny")
    dbs = {}
    for executor in ("serial", "process", "dask"):
        dbs[executor] = tmp_path / f"{executor}.sqlite"
        store = SweepStore(dbs[executor])
        summary = run_sweep(spec, store, executor, workers=2)
        store.close()
        assert summary.done == len(spec.runs) and summary.failed == 0
    serial = rows(dbs["serial"])
    assert len(serial) == len(spec.runs)
    assert rows(dbs["process"]) == serial
    assert rows(dbs["dask"]) == serial
    with sqlite3.connect(dbs["dask"]) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        executors = {r[0] for r in con.execute("SELECT executor FROM timings")}
    assert executors == {"dask"}


def test_rows_hold_params_metrics_and_the_full_result(tmp_path: Path) -> None:
    spec = parse_sweep(TINY, "tiny")
    store = SweepStore(tmp_path / "s.sqlite")
    run_sweep(spec, store, "serial")
    stored = store.runs("tiny")
    assert len(stored) == len(spec.runs)
    first = stored[0]
    assert set(first.params) == set(spec.axes)
    assert first.result is not None and first.result["protocol"] == first.protocol
    assert first.metrics["sim_time_s"] == pytest.approx(0.3)
    assert any(k.endswith(".work_rate") for k in first.metrics)


def test_a_failing_run_is_recorded_and_the_sweep_goes_on_then_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = parse_sweep(TINY, "tiny")
    real = Simulation  # what the runner runs
    assert runner.__dict__["Simulation"] is real

    class Failing(Simulation):
        def run(self, *args: Any, **kwargs: Any) -> Any:
            if self.protocol == "arm64-rfcv2" and self.seed == 1:
                raise RuntimeError("injected failure\nsecond line")
            return super().run(*args, **kwargs)

    monkeypatch.setattr(runner, "Simulation", Failing)
    store = SweepStore(tmp_path / "s.sqlite")
    summary = run_sweep(spec, store, "serial")
    failing = [r for r in spec.runs if r.protocol == "arm64-rfcv2" and r.seed == 1]
    assert summary.failed == len(failing) and summary.done == len(spec.runs)
    errors = store.runs("tiny", status="error")
    assert {e.key for e in errors} == {r.key for r in failing}
    assert errors[0].error == "RuntimeError: injected failure second line"
    monkeypatch.setattr(runner, "Simulation", real)
    again = run_sweep(spec, store, "serial")
    assert again.skipped == len(spec.runs) - len(failing) and again.failed == 0
    assert store.count("tiny") == {"ok": len(spec.runs)}


@pytest.mark.slow
def test_process_pool_survives_a_killed_worker(tmp_path: Path) -> None:
    spec = parse_sweep(TINY, "tiny")
    crash = functools.partial(sweep_helpers.crash_once, tmp_path / "crashed")
    outcomes = list(Execution(spec.runs, "process", 2, execute=crash))
    assert (tmp_path / "crashed").exists()  # a worker really died
    keys = [o.key for o in outcomes]
    assert sorted(keys) == sorted(r.key for r in spec.runs) and len(set(keys)) == len(keys)
    assert all(o.error is None for o in outcomes)


@pytest.mark.slow
def test_killed_sweep_resumes_and_every_run_is_present_once(tmp_path: Path) -> None:
    data = {**TINY, "seeds": 3, "duration_s": 0.5}
    path = write_sweep(tmp_path / "s.toml", data)
    db = tmp_path / "s.sqlite"
    total = len(parse_sweep(data, "s").runs)
    cmd = [sys.executable, "-m", "apfsim", "sweep", str(path), "--db", str(db), "--quiet"]
    proc = subprocess.Popen([*cmd, "--executor", "serial"], start_new_session=True)
    deadline = time.monotonic() + 120
    stored = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        stored = stored_runs(db)
        if stored >= total // 2:
            break
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # a lost machine: no chance to clean up
    proc.wait()
    assert 0 < stored < total
    done = subprocess.run([*cmd, "--executor", "process"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(db) as con:
        keys = [r[0] for r in con.execute("SELECT key FROM runs WHERE status = 'ok'")]
    assert len(keys) == total and len(set(keys)) == total
    assert sorted(keys) == sorted(r.key for r in parse_sweep(data, "s").runs)


@pytest.mark.slow
def test_interrupt_keeps_finished_runs_and_says_how_to_finish(tmp_path: Path) -> None:
    # Far more runs than the two waited for: the interrupt must land with work left, however
    # fast the runs are on this machine (with 3 seeds a quick one finished them first).
    path = write_sweep(tmp_path / "s.toml", {**TINY, "seeds": 40, "duration_s": 0.5})
    db = tmp_path / "s.sqlite"
    cmd = [sys.executable, "-m", "apfsim", "sweep", str(path), "--db", str(db)]
    proc = subprocess.Popen(
        [*cmd, "--executor", "serial", "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
        # Python installs its ^C handler only if SIGINT is not ignored, as it is for anything
        # started in the background by a non-interactive shell (a CI job, `pytest &`).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if stored_runs(db) >= 2:
            break
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted:" in err and "run the same command again" in err
    assert "Traceback" not in err


def test_cli_sweep_prints_a_summary_and_skips_on_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sweep(tmp_path / "s.toml", TINY)
    db = tmp_path / "s.sqlite"
    assert main(["sweep", str(path), "--db", str(db), "--executor", "serial"]) == 0
    out = capsys.readouterr().out
    assert "24 runs (6 points x 2 protocols x 2 seeds); 0 already stored, 24 run now" in out
    assert main(["sweep", str(path), "--db", str(db), "--executor", "serial"]) == 0
    assert "24 already stored, 0 run now" in capsys.readouterr().out


def test_progress_reports_done_over_total(tmp_path: Path) -> None:
    spec = parse_sweep(TINY, "tiny")
    seen: list[tuple[int, int]] = []
    run_sweep(
        spec, SweepStore(tmp_path / "s.sqlite"), "serial", progress=lambda d, t: seen.append((d, t))
    )
    assert seen[0] == (0, 24) and seen[-1] == (24, 24)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
