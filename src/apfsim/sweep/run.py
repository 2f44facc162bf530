"""Running a sweep: every run not yet stored goes to the runner (:mod:`apfsim.runner`:
serial, process pool or dask), and each result is stored as it arrives.

The coordinating process computes the metrics and writes SQLite, so the rows do not depend
on the executor. A run that raises is stored with its error and the sweep goes on; the
runner rebuilds a process pool that loses a worker. A dask cluster left without workers, or
that loses its scheduler, ends the sweep with :class:`SweepError` (every run stored so far
is kept).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from apfsim.metrics.results import ProtocolResult
from apfsim.metrics.summary import stored_metrics
from apfsim.runner import (
    EXECUTORS,
    WORKER_TIMEOUT_S,
    Execute,
    Execution,
    RunnerError,
    execute_run,
    executor_problem,
)
from apfsim.sweep.spec import RunSpec, SweepSpec

__all__ = [
    "EXECUTORS",
    "RunStore",
    "SweepError",
    "SweepSummary",
    "row_metrics",
    "run_sweep",
]

SweepError = RunnerError
"""The sweep could not go on (an executor that cannot start, a lost scheduler)."""


class RunStore(Protocol):
    """Where a sweep's runs go: :class:`~apfsim.sweep.store.SweepStore` (SQLite), or
    compare's store in memory."""

    def register(self, spec: SweepSpec) -> None: ...

    def completed(self, sweep: str) -> set[str]: ...

    def record(
        self,
        sweep: str,
        run: RunSpec,
        result: dict[str, Any] | None,
        metrics: dict[str, float | None] | None,
        error: str | None,
        wall_s: float,
        executor: str,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class SweepSummary:
    total: int
    skipped: int  # already stored by an earlier invocation
    done: int
    failed: int
    wall_s: float
    executor: str


def row_metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """The metrics stored with a run (:func:`apfsim.metrics.summary.stored_metrics`)."""
    return stored_metrics(ProtocolResult.from_dict(result))


ProgressFn = Callable[[int, int], None]


def run_sweep(
    spec: SweepSpec,
    store: RunStore,
    executor: str = "process",
    workers: int | None = None,
    scheduler: str | None = None,
    progress: ProgressFn | None = None,
    worker_timeout_s: float = WORKER_TIMEOUT_S,
    execute: Execute = execute_run,
) -> SweepSummary:
    """Run every run of ``spec`` not yet in ``store``; returns what happened. With dask, a
    cluster without any worker for ``worker_timeout_s`` seconds is an error."""
    problem = executor_problem(executor)
    if problem is not None:
        raise SweepError(problem)
    t0 = time.perf_counter()
    store.register(spec)
    done_keys = store.completed(spec.name)
    total = len(spec.runs)
    # The runs are made as they are handed out (spec.runs keeps no list of them).
    skipped = sum(k in done_keys for k in spec.runs.run_keys()) if done_keys else 0
    by_key: dict[str, RunSpec] = {}  # handed out, not yet stored

    def todo() -> Iterator[RunSpec]:
        for run in spec.runs:
            if run.key not in done_keys:
                by_key[run.key] = run
                yield run

    finished = failed = 0
    if progress is not None:
        progress(skipped, total)
    with Execution(todo(), executor, workers, scheduler, worker_timeout_s, execute) as runs:
        # Leaving early (a failed store: a full disk) ends the workers now, not at exit.
        for outcome in runs:
            run = by_key.pop(outcome.key)
            metrics = None if outcome.result is None else row_metrics(outcome.result)
            store.record(
                spec.name, run, outcome.result, metrics, outcome.error, outcome.wall_s, executor
            )
            finished += 1
            failed += outcome.error is not None
            if progress is not None:
                progress(skipped + finished, total)
    return SweepSummary(total, skipped, finished, failed, time.perf_counter() - t0, executor)
