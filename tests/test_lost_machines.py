"""Lost processes and full disks: a killed coordinator leaves no process behind, a sweep
whose disk fills or whose dask workers or scheduler vanish ends with one line, keeping every
run it had stored."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from proc_helpers import alive, descendants, wait_gone
from sweep_helpers import stored_runs

LONG_SWEEP = """\
name = "long"
scenario = "rfcv2-2020"
duration_s = 600.0
protocols = ["sync", "arm64-rfcv2"]
seeds = 2
"""


def _kill_all(pids: set[int]) -> None:
    """Clean up after a failed test: nothing of it may stay on the machine."""
    for pid in alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen[Any], timeout: float) -> None:
    """Poll ``predicate`` while ``proc`` runs; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the command ended before it could be killed"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sweep", "compare"])
def test_killing_the_coordinator_ends_its_pool_forkserver_and_resource_tracker(
    command: str, tmp_path: Path
) -> None:
    """SIGKILL (the OOM killer, a lost session) of a process-pool coordinator: its busy
    workers, the forkserver and the resource tracker all exit within seconds."""
    if command == "sweep":
        sweep = tmp_path / "long.toml"
        sweep.write_text(LONG_SWEEP)
        args = ["sweep", str(sweep), "--db", str(tmp_path / "s.sqlite"), "--workers", "2"]
    else:
        args = ["compare", "rfcv2-2020", "-p", "sync,arm64-rfcv2", "--seeds", "2", "-j", "2"]
        args += ["--duration", "600"]
    proc = subprocess.Popen([sys.executable, "-m", "apfsim", *args, "-q"], cwd=tmp_path)
    family: set[int] = set()
    try:

        def pool_started() -> bool:
            # The resource tracker, the forkserver and two workers (its children).
            family.update(descendants(proc.pid))
            return len(alive(family)) >= 4

        _wait_for(pool_started, proc, 120)
        proc.kill()
        proc.wait()
        assert wait_gone(family, 30) == set()
    finally:
        proc.kill()
        proc.wait()
        _kill_all(family)


# -- a full disk --------------------------------------------------------------------------------

SHORT_SWEEP = """\
name = "short"
scenario = "rfcv2-2020"
duration_s = 0.05
protocols = ["sync"]
seeds = 200
"""


def _file_size_limit(limit: int) -> Callable[[], None]:
    def limit_files() -> None:
        # Writes past ``limit`` bytes fail with EFBIG, as ENOSPC would on a full disk (Python
        # ignores SIGXFSZ, so the write returns the error).
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


@pytest.mark.parametrize("executor", ["serial", "process"])
def test_a_full_disk_ends_the_sweep_with_one_line_keeping_the_stored_runs(
    executor: str, tmp_path: Path
) -> None:
    sweep = tmp_path / "short.toml"
    sweep.write_text(SHORT_SWEEP)
    db = tmp_path / "s.sqlite"
    cmd = [sys.executable, "-m", "apfsim", "sweep", str(sweep), "--db", str(db), "-q"]
    cmd += ["--executor", executor, "--workers", "2"]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(160 * 1024),
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    match = re.fullmatch(
        rf"apfsim: error: --db: cannot write '{re.escape(str(db))}' \((.+)\); the (\d+) runs "
        r"stored before are kept; free space and run the same command again to finish\n",
        done.stderr,
    )
    assert match is not None, done.stderr
    with sqlite3.connect(db) as con:
        stored = con.execute("SELECT COUNT(*) FROM runs WHERE status = 'ok'").fetchone()[0]
    assert 0 < stored < 200 and stored == int(match[2])


# -- dask: the workers or the scheduler lost ------------------------------------------------------

MANY_SWEEP = """\
name = "many"
scenario = "rfcv2-2020"
duration_s = 0.05
protocols = ["sync"]
seeds = 400
"""


def _wait_for_file(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    _wait_for(lambda: path.exists() and text in path.read_text(errors="replace"), proc, timeout)


@contextlib.contextmanager
def _dask_cluster(tmp_path: Path) -> Iterator[tuple[str, int, int]]:
    """A scheduler on a free port and one single-threaded worker under its nanny, each in its
    own session; (address, scheduler pid, worker session id). All killed at the end."""
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler_file = tmp_path / "scheduler.json"
    where = ["--host", "127.0.0.1", "--port", "0", "--scheduler-file", str(scheduler_file)]
    scheduler = subprocess.Popen(
        [*dask, *where, "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    worker: subprocess.Popen[bytes] | None = None
    try:
        _wait_for_file(scheduler_file, '"address"', scheduler, 120)
        address = json.loads(scheduler_file.read_text())["address"]
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            options = ["--nthreads", "1", "--no-dashboard", "--local-directory", str(tmp_path)]
            worker = subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, *options],
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        _wait_for_file(log, "Registered to", worker, 120)
        yield address, scheduler.pid, worker.pid
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["workers", "scheduler"])
def test_a_dask_sweep_that_loses_its_workers_or_scheduler_ends_with_one_line(
    lost: str, tmp_path: Path
) -> None:
    """SIGKILL of the nanny and its worker: after --worker-timeout without any worker, exit 2
    (dask alone would wait for ever). SIGKILL of the scheduler: exit 2 at once, not three
    tracebacks. Either way every run stored before is kept and counted in the message."""
    pytest.importorskip("distributed")
    sweep = tmp_path / "many.toml"
    sweep.write_text(MANY_SWEEP)
    db = tmp_path / "many.sqlite"
    with _dask_cluster(tmp_path) as (address, scheduler_pid, worker_session):
        cmd = [sys.executable, "-m", "apfsim", "sweep", str(sweep), "--db", str(db), "-q"]
        cmd += ["--executor", "dask", "--scheduler", address, "--worker-timeout", "2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: stored_runs(db, "WHERE status = 'ok'") >= 2, proc, 120)
            os.killpg(worker_session if lost == "workers" else scheduler_pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=90)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, stderr
    assert stdout == "" and "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    if lost == "workers":
        why = r"the dask scheduler '[^']+' has had no worker for \d+ s \(\d+ runs not done\); "
        why += r"start workers \(or raise --worker-timeout\) and run the command again"
    else:
        why = r"lost the dask scheduler '[^']+' \([^\n]+\)"
    match = re.fullmatch(
        rf"apfsim: error: --scheduler: {why}; (\d+) runs stored in '{re.escape(str(db))}'\n",
        stderr,
    )
    assert match is not None, stderr
    assert 2 <= stored_runs(db, "WHERE status = 'ok'") == int(match[1]) < 400
