"""Ctrl-C keeps what is done: ``run``, ``compare`` and ``check`` print and write what had
finished (marked partial in the JSON), then exit 130; any other command says it was
interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import apfsim.api
import apfsim.cli.catalog
import apfsim.cli.explore
import apfsim.runner
from apfsim.check.search import CheckResult
from apfsim.check.world import WorldConfig
from apfsim.runner import RunSpec

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import cli
from proc_helpers import descendants, wait_gone


def _interrupt_when(protocol: str, seed: int | None = None) -> Callable[..., Any]:
    """The runner's ``simulate``, except that the run of ``protocol`` (on ``seed``, if
    given) raises KeyboardInterrupt, as ^C during that run would."""
    real = apfsim.runner.simulate

    def wrapped(run: RunSpec, *args: Any, **kwargs: Any) -> Any:
        if run.protocol == protocol and seed in (None, run.seed):
            raise KeyboardInterrupt
        return real(run, *args, **kwargs)

    return wrapped


def test_run_interrupted_prints_and_writes_the_protocols_that_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(apfsim.runner, "simulate", _interrupt_when("x86"))
    out = tmp_path / "out.json"
    args = ["run", "natapov-2010", "-p", "sync", "-p", "x86", "--duration", "0.05"]
    code, stdout, stderr = cli([*args, "--json", str(out)], capsys)
    assert code == 130
    assert stderr == (
        f"apfsim: interrupted: kept what finished (sync), written to '{out}' marked partial\n"
    )
    assert "seed 0" in stdout and "PARTIAL: cut short; only sync finished" in stdout
    data = json.loads(out.read_text())
    assert data["partial"] is True
    assert [r["protocol"] for r in data["results"]] == ["sync"]


def test_run_interrupted_before_anything_finished_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(apfsim.runner, "simulate", _interrupt_when("sync"))
    code, stdout, stderr = cli(["run", "natapov-2010", "-p", "sync", "--duration", "0.05"], capsys)
    assert code == 130 and stdout == ""
    assert stderr == "apfsim: interrupted: no protocol had finished; nothing to keep\n"


def test_a_complete_run_is_not_marked_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    args = ["run", "natapov-2010", "-p", "sync", "--duration", "0.05", "-q", "--json", str(out)]
    assert cli(args, capsys) == (0, "", "")
    assert "partial" not in json.loads(out.read_text())


def test_compare_interrupted_summarises_the_runs_that_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Serial runs, ^C during x86 on seed 1: sync's two seeds and x86's seed 0 are kept, and
    the ratios pair the seeds both protocols ran."""
    monkeypatch.setattr(apfsim.runner, "simulate", _interrupt_when("x86", 1))
    out = tmp_path / "c.json"
    args = ["compare", "natapov-2010", "-p", "sync,x86", "--seeds", "2", "-j", "1"]
    code, stdout, stderr = cli([*args, "--duration", "0.05", "--json", str(out)], capsys)
    assert code == 130
    assert stderr == (
        f"apfsim: interrupted: kept the 3 of 4 runs that finished, written to '{out}' "
        "marked partial\n"
    )
    assert "PARTIAL: cut short after 3 of 4 runs" in stdout
    data = json.loads(out.read_text())
    assert data["partial"] is True
    assert [(r["protocol"], r["seed"]) for r in data["runs"]] == [
        ("sync", 0),
        ("sync", 1),
        ("x86", 0),
    ]
    ratio = data["summary"]["x86"]["ratio_to_baseline"]["kind.compute.work_rate"]
    assert ratio["n"] == 1  # x86 seed 0 over sync seed 0 only
    assert data["summary"]["sync"]["task.worker0.work_s"]["n"] == 2


def test_check_interrupted_prints_the_states_explored_so_far(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def check(config: WorldConfig, **kwargs: Any) -> CheckResult:
        kwargs["progress"](20_000, 7)
        kwargs["progress"](30_000, 8)
        raise KeyboardInterrupt

    monkeypatch.setattr(apfsim.cli.explore, "check", check)
    out = tmp_path / "check.json"
    code, stdout, stderr = cli(["check", "x86", "-q", "--json", str(out)], capsys)
    assert code == 130
    assert "at least 30000 states explored" in stdout and "depth 8 reached" in stdout
    assert stderr == f"apfsim: interrupted: check incomplete; written to '{out}' marked partial\n"
    data = json.loads(out.read_text())
    assert data["partial"] is True and data["complete"] is False
    assert data["states"] == 30_000 and data["depth"] == 8 and data["violation"] is None


def test_an_interrupt_no_command_handles_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """typer turns such a ^C into a silent exit 130; main says what happened."""

    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(apfsim.cli.catalog, "load_scenario", interrupted)
    assert cli(["show", "natapov-2010"], capsys) == (130, "", "apfsim: interrupted\n")


# -- a real SIGINT -----------------------------------------------------------------------------


def _closed_trace(path: Path) -> bool:
    """A Chrome trace file its run has finished writing."""
    try:
        return path.read_bytes().endswith(b"]}\n")
    except FileNotFoundError:
        return False


def _sigint_when(cmd: list[str], ready: Callable[[int], bool]) -> subprocess.CompletedProcess[str]:
    """Start ``cmd``; once ``ready(pid)`` holds, send it SIGINT (as Ctrl-C would); its result."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Python installs its ^C handler only if SIGINT is not ignored (as it is for a
        # background job of a shell): give the child the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not ready(proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "never got ready to be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigint_during_the_second_protocol_keeps_the_first(tmp_path: Path) -> None:
    """The issue's case: ^C while x86 runs, after sync finished (its trace is closed and
    x86's is open)."""
    out = tmp_path / "out.json"
    trace = tmp_path / "t.json"
    cmd = [sys.executable, "-m", "apfsim", "run", "natapov-2010", "-p", "sync", "-p", "x86"]
    cmd += ["--duration", "5", "-q", "--json", str(out), "--trace", str(trace)]
    cmd += ["--trace-window", "0:0.001"]
    x86_trace = tmp_path / "t.x86.json"
    done = _sigint_when(
        cmd, lambda _: _closed_trace(tmp_path / "t.sync.json") and x86_trace.exists()
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == (
        f"apfsim: interrupted: kept what finished (sync), written to '{out}' marked partial\n"
    )
    assert done.stdout == ""  # -q
    data = json.loads(out.read_text())
    assert data["partial"] is True and [r["protocol"] for r in data["results"]] == ["sync"]
    assert _closed_trace(x86_trace)  # the interrupted run's trace is still a valid file


@pytest.mark.slow
def test_sigint_during_a_pooled_compare_keeps_the_finished_runs_and_ends_the_workers(
    tmp_path: Path,
) -> None:
    """Two workers; x86 on seed 0 starts only once two sync runs have finished, so ^C then
    keeps at least those two; the workers (which ignore SIGINT) are ended, not left over."""
    out = tmp_path / "c.json"
    trace = tmp_path / "t.json"
    cmd = [sys.executable, "-m", "apfsim", "compare", "natapov-2010", "-p", "sync,x86"]
    cmd += ["--seeds", "3", "-j", "2", "--duration", "4", "-q", "--json", str(out)]
    cmd += ["--trace", str(trace), "--trace-window", "0:0.001"]

    workers: set[int] = set()

    def ready(pid: int) -> bool:
        workers.update(descendants(pid))  # the forkserver, the resource tracker, the workers
        synced = sum(_closed_trace(tmp_path / f"t.sync.s{s}.json") for s in range(3))
        return synced >= 2 and (tmp_path / "t.x86.s0.json").exists()

    done = _sigint_when(cmd, ready)
    assert done.returncode == 130, done.stderr
    assert done.stderr.startswith("apfsim: interrupted: kept the ")
    assert done.stderr.endswith(f"of 6 runs that finished, written to '{out}' marked partial\n")
    data = json.loads(out.read_text())
    assert data["partial"] is True
    runs = [(r["protocol"], r["seed"]) for r in data["runs"]]
    assert {("sync", 0), ("sync", 1)} <= set(runs) and ("x86", 0) not in runs
    assert len(workers) >= 4
    assert wait_gone(workers, 30) == set()
