"""Local process pools whose workers never outlive the process that coordinates them.

A forkserver pool's workers are children of the forkserver, not of the coordinator, and
they hold the pipes that keep the forkserver and the resource tracker alive. If the
coordinator is killed (SIGKILL, the OOM killer), nothing tells them: a busy worker finishes
its run, then all three wait forever. So each worker watches the coordinator itself (a
pidfd on Linux, a poll elsewhere) and exits the moment it is gone; the forkserver and the
resource tracker then see their pipes close and exit too.

Ctrl-C belongs to the coordinator: workers ignore SIGINT (a terminal sends it to the whole
process group), and the coordinator ends them with :func:`stop_workers` once it has kept
what finished.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

__all__ = ["WATCH_POLL_S", "new_pool", "stop_workers", "worker_init"]

WATCH_POLL_S = 0.5
"""How often a worker without pidfds checks that its coordinator still lives."""


def new_pool(workers: int) -> ProcessPoolExecutor:
    """A forkserver pool (an explicit start method: Python 3.14 changes the default) whose
    workers exit with this process and leave Ctrl-C to it."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=worker_init,
        initargs=(os.getpid(),),
    )


def worker_init(coordinator: int) -> None:
    """In each worker: ignore SIGINT, and exit as soon as ``coordinator`` has."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watcher = threading.Thread(
        target=_exit_when_gone, args=(coordinator,), name="apfsim-coordinator-watch", daemon=True
    )
    watcher.start()


def _exit_when_gone(pid: int) -> None:
    """Block until process ``pid`` has ended, then end this process at once (a run in
    progress has no one left to report to)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds (not Linux >= 5.3), or already gone
        while _alive(pid):
            time.sleep(WATCH_POLL_S)
    else:
        select.select([fd], [], [])  # readable once the process has exited
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused pid of another user
        return False
    return True


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool now: kill the workers (the runs in progress are lost) and drop the queued
    work. Results the workers had sent are still taken in first, so every future that
    finished before this holds its result."""
    for pid in list(getattr(pool, "_processes", None) or {}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # The pool's manager thread reads the results already sent, then finds the workers gone.
    pool.shutdown(wait=True, cancel_futures=True)
