"""Running a sweep: every run not yet stored, on one of three executors, each result
stored as it arrives.

* ``serial``: in this process, one run after another;
* ``process``: a local process pool (default: every usable CPU);
* ``dask``: a dask.distributed cluster: the scheduler at ``--scheduler ADDRESS``, or a
  LocalCluster of ``--workers`` processes when none is given (``pip install apfsim[dask]``).

Workers only simulate; the coordinating process computes the metrics and writes SQLite, so
the rows do not depend on the executor. A run that raises is stored with its error and the
sweep goes on; a process pool that loses a worker is rebuilt and the unfinished runs
resubmitted.
"""

from __future__ import annotations

import itertools
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from apfsim.compare import _protocol_result, _work_rates, default_jobs, run_metrics
from apfsim.scenario import scenario_from_dict
from apfsim.simulation import Simulation
from apfsim.sweep.spec import RunSpec, SweepSpec
from apfsim.sweep.store import SweepStore

__all__ = [
    "EXECUTORS",
    "RunOutcome",
    "SweepError",
    "SweepSummary",
    "execute_run",
    "row_metrics",
    "run_sweep",
]

EXECUTORS = ("serial", "process", "dask")
MAX_POOL_RESTARTS = 3
CHUNK_RUNS = 10_000


class SweepError(RuntimeError):
    """The sweep could not go on (an executor that cannot start, a lost scheduler)."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    key: str
    result: dict[str, Any] | None
    error: str | None
    wall_s: float


@dataclass(frozen=True, slots=True)
class SweepSummary:
    total: int
    skipped: int  # already stored by an earlier invocation
    done: int
    failed: int
    wall_s: float
    executor: str


def execute_run(run: RunSpec) -> RunOutcome:
    """Simulate one run (the picklable unit of work for every executor)."""
    t0 = time.perf_counter()
    try:
        scenario = scenario_from_dict(run.scenario)
        result = Simulation(scenario, run.protocol, run.seed, run.check).run(run.duration_s)
        return RunOutcome(run.key, result.to_dict(), None, time.perf_counter() - t0)
    except Exception as err:  # recorded with the run; the sweep goes on
        message = " ".join(str(err).split()) or type(err).__name__
        return RunOutcome(run.key, None, f"{type(err).__name__}: {message}"[:2000], 0.0)


def row_metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """The metrics stored with a run: compare's per-run metrics and the work rates."""
    typed = _protocol_result({**result, "wall_time_s": 0.0})
    metrics = dict(run_metrics(typed))
    metrics.update(_work_rates(typed))
    metrics["sim_time_s"] = typed.sim_time_s
    return metrics


ProgressFn = Callable[[int, int], None]


def run_sweep(
    spec: SweepSpec,
    store: SweepStore,
    executor: str = "process",
    workers: int | None = None,
    scheduler: str | None = None,
    progress: ProgressFn | None = None,
) -> SweepSummary:
    """Run every run of ``spec`` not yet in ``store``; returns what happened."""
    if executor not in EXECUTORS:
        raise SweepError(f"--executor: {executor!r}; choose from {', '.join(EXECUTORS)}")
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

    def store_outcome(outcome: RunOutcome) -> None:
        nonlocal finished, failed
        run = by_key.pop(outcome.key)
        metrics = None if outcome.result is None else row_metrics(outcome.result)
        store.record(
            spec.name, run, outcome.result, metrics, outcome.error, outcome.wall_s, executor
        )
        finished += 1
        failed += outcome.error is not None
        if progress is not None:
            progress(skipped + finished, total)

    n_workers = workers if workers is not None else default_jobs()
    if executor == "serial":
        outcomes: Iterator[RunOutcome] = (execute_run(r) for r in todo())
    else:
        outcomes = _in_chunks(todo(), executor, n_workers, scheduler)
    for outcome in outcomes:
        store_outcome(outcome)
    return SweepSummary(total, skipped, finished, failed, time.perf_counter() - t0, executor)


def _in_chunks(
    runs: Iterator[RunSpec], executor: str, workers: int, scheduler: str | None
) -> Iterator[RunOutcome]:
    """The runs handed to a pool or cluster CHUNK_RUNS at a time, so that a sweep of a
    million runs holds no more than that many futures; no runs, no pool."""
    while chunk := list(itertools.islice(runs, CHUNK_RUNS)):
        if executor == "process":
            yield from _process_outcomes(chunk, workers)
        else:
            yield from _dask_outcomes(chunk, workers, scheduler)


def _process_outcomes(
    runs: Sequence[RunSpec],
    workers: int,
    execute: Callable[[RunSpec], RunOutcome] = execute_run,
) -> Iterator[RunOutcome]:
    """A local process pool; rebuilt (at most MAX_POOL_RESTARTS times) if a worker dies."""
    context = multiprocessing.get_context("forkserver")
    pending_runs = list(runs)
    restarts = 0
    while pending_runs:
        unfinished = {r.key: r for r in pending_runs}
        pool = ProcessPoolExecutor(max_workers=min(workers, len(pending_runs)), mp_context=context)
        try:
            futures: dict[Future[RunOutcome], str] = {
                pool.submit(execute, r): r.key for r in pending_runs
            }
            waiting = set(futures)
            while waiting:
                done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                for future in done:
                    outcome = future.result()
                    unfinished.pop(outcome.key, None)
                    yield outcome
            pending_runs = []
        except BrokenProcessPool:
            restarts += 1
            if restarts > MAX_POOL_RESTARTS:
                raise SweepError(
                    f"the process pool lost a worker {restarts} times; "
                    f"{len(unfinished)} runs not done (run the sweep again to retry them)"
                ) from None
            pending_runs = list(unfinished.values())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _dask_outcomes(
    runs: Sequence[RunSpec], workers: int, scheduler: str | None
) -> Iterator[RunOutcome]:
    """dask.distributed: an existing scheduler, or a LocalCluster of ``workers`` processes."""
    try:
        import distributed
    except ImportError:
        raise SweepError(
            "--executor dask: dask.distributed is not installed; pip install 'apfsim[dask]'"
        ) from None
    dist: Any = distributed  # untyped library
    cluster = None
    try:
        if scheduler is None:
            cluster = dist.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=40,
            )
            client = dist.Client(cluster)
        else:
            client = dist.Client(scheduler, timeout=10)
    except (OSError, TimeoutError) as err:
        raise SweepError(f"--scheduler: cannot connect to {scheduler!r} ({err})") from None
    try:
        futures = client.map(execute_run, list(runs), key=[f"apfsim-{r.key}" for r in runs])
        for future in dist.as_completed(futures):
            outcome: RunOutcome = future.result()
            future.release()
            yield outcome
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
