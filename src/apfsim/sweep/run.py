"""Running a sweep: every run not yet stored, on one of three executors, each result
stored as it arrives.

* ``serial``: in this process, one run after another;
* ``process``: a local process pool (default: every usable CPU);
* ``dask``: a dask.distributed cluster: the scheduler at ``--scheduler ADDRESS``, or a
  LocalCluster of ``--workers`` processes when none is given (``pip install apfsim[dask]``).

Workers only simulate; the coordinating process computes the metrics and writes SQLite, so
the rows do not depend on the executor. A run that raises is stored with its error and the
sweep goes on; a process pool that loses a worker is rebuilt and the unfinished runs
resubmitted. A dask cluster left without workers for ``worker_timeout_s``, or that loses its
scheduler, ends the sweep with :class:`SweepError` (every run stored so far is kept).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from apfsim.compare import default_jobs
from apfsim.metrics.results import ProtocolResult
from apfsim.metrics.summary import stored_metrics
from apfsim.pool import new_pool, stop_workers
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
WORKER_TIMEOUT_S = 60.0
"""dask: how long a cluster may have no worker at all before the sweep gives up."""
_DASK_POLL_S = 0.1  # how often the dask loop looks for finished runs when none is ready
_DASK_CHECK_S = 1.0  # how often it asks the scheduler how many workers it has
CHUNK_RUNS = 10_000
"""Runs handed to a pool or cluster at a time: a sweep of a million runs holds no more
futures than this."""


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
    return stored_metrics(ProtocolResult.from_dict(result))


ProgressFn = Callable[[int, int], None]


def run_sweep(
    spec: SweepSpec,
    store: SweepStore,
    executor: str = "process",
    workers: int | None = None,
    scheduler: str | None = None,
    progress: ProgressFn | None = None,
    worker_timeout_s: float = WORKER_TIMEOUT_S,
) -> SweepSummary:
    """Run every run of ``spec`` not yet in ``store``; returns what happened. With dask, a
    cluster without any worker for ``worker_timeout_s`` seconds is an error."""
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
        outcomes: Generator[RunOutcome, None, None] = (execute_run(r) for r in todo())
    else:
        outcomes = _in_chunks(todo(), executor, n_workers, scheduler, worker_timeout_s)
    try:
        for outcome in outcomes:
            store_outcome(outcome)
    finally:
        outcomes.close()  # a failed store (a full disk) ends the workers now, not at exit
    return SweepSummary(total, skipped, finished, failed, time.perf_counter() - t0, executor)


def _in_chunks(
    runs: Iterator[RunSpec],
    executor: str,
    workers: int,
    scheduler: str | None,
    worker_timeout_s: float,
) -> Generator[RunOutcome, None, None]:
    """The runs handed to a pool or cluster CHUNK_RUNS at a time; no runs, no pool. Closing
    it closes the chunk's pool or cluster (and its workers) at once."""
    while chunk := list(itertools.islice(runs, CHUNK_RUNS)):
        if executor == "process":
            part = _process_outcomes(chunk, workers)
        else:
            part = _dask_outcomes(chunk, workers, scheduler, worker_timeout_s)
        try:
            yield from part
        finally:
            part.close()


def _process_outcomes(
    runs: Sequence[RunSpec],
    workers: int,
    execute: Callable[[RunSpec], RunOutcome] = execute_run,
) -> Generator[RunOutcome, None, None]:
    """A local process pool; rebuilt (at most MAX_POOL_RESTARTS times) if a worker dies.
    Its workers exit if this process dies (:mod:`apfsim.pool`)."""
    pending_runs = list(runs)
    restarts = 0
    while pending_runs:
        unfinished = {r.key: r for r in pending_runs}
        pool = new_pool(min(workers, len(pending_runs)))
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
        except KeyboardInterrupt:
            stop_workers(pool)  # ^C means now: the runs in progress are given up
            for future in futures:  # those that had ended are stored all the same
                if future.done() and not future.cancelled() and future.exception() is None:
                    outcome = future.result()
                    if unfinished.pop(outcome.key, None) is not None:
                        yield outcome
            raise
        except BaseException:
            # The consumer gave up (a full disk): what runs now could not be stored.
            stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _dask_outcomes(
    runs: Sequence[RunSpec], workers: int, scheduler: str | None, worker_timeout_s: float
) -> Generator[RunOutcome, None, None]:
    """dask.distributed: an existing scheduler, or a LocalCluster of ``workers`` processes.

    Raises SweepError once the scheduler is lost or no worker has been there for
    ``worker_timeout_s`` seconds: dask itself would wait for ever. dask's own log lines
    (tracebacks of lost connections) are silenced meanwhile; the error says what happened."""
    try:
        import distributed
    except ImportError:
        raise SweepError(
            "--executor dask: dask.distributed is not installed; pip install 'apfsim[dask]'"
        ) from None
    dist: Any = distributed  # untyped library
    where = "the LocalCluster's scheduler" if scheduler is None else f"scheduler {scheduler!r}"
    with _quiet_dask_logs():
        cluster = None
        try:
            if scheduler is None:
                cluster = dist.LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.CRITICAL,
                )
                client = dist.Client(cluster)
            else:
                client = dist.Client(scheduler, timeout=10)
        except (OSError, TimeoutError) as err:
            raise SweepError(f"--scheduler: cannot connect to {scheduler!r} ({err})") from None
        try:
            keys = {f"apfsim-{r.key}": r.key for r in runs}
            futures = client.map(execute_run, list(runs), key=list(keys))
            finished = dist.as_completed(futures)
            health = _DaskHealth(client, where, worker_timeout_s, finished.count)
            while not finished.is_empty():
                batch = finished.next_batch(block=False)
                for future in batch:
                    outcome = _dask_outcome(future, keys[future.key], where, health)
                    future.release()
                    yield outcome
                if not batch:
                    health.check()
                    time.sleep(_DASK_POLL_S)
        finally:
            with contextlib.suppress(Exception):
                client.close(timeout=10)
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close(timeout=10)


def _dask_outcome(future: Any, key: str, where: str, health: _DaskHealth) -> RunOutcome:
    """A finished dask future as an outcome. A run dask itself failed (KilledWorker: it took
    down its workers too often) is stored as a failed run; a cancelled one means the
    scheduler is gone. Fetching the result waits while the cluster is healthy: a result
    held by a worker that died is computed again, which needs a worker."""
    while True:
        if future.cancelled():
            raise SweepError(f"--scheduler: lost the dask {where} (its runs were cancelled)")
        try:
            outcome: RunOutcome = future.result(timeout=_DASK_CHECK_S)
        except TimeoutError:
            health.check(fetching=1)
            continue
        except Exception as err:
            if future.cancelled() or isinstance(err, OSError):
                raise SweepError(f"--scheduler: lost the dask {where} ({err})") from None
            message = " ".join(str(err).split()) or type(err).__name__
            return RunOutcome(key, None, f"{type(err).__name__}: {message}"[:2000], 0.0)
        return outcome


class _DaskHealth:
    """Whether a dask cluster can still finish the sweep: a scheduler that answers, and some
    worker at least every ``worker_timeout_s`` seconds."""

    def __init__(
        self, client: Any, where: str, worker_timeout_s: float, unfinished: Callable[[], int]
    ) -> None:
        self.client = client
        self.unfinished = unfinished  # runs not yet taken from the cluster
        self.where = where
        self.worker_timeout_s = worker_timeout_s
        self.next_check = 0.0
        self.no_workers_since: float | None = None
        self.disconnected_since: float | None = None

    def check(self, fetching: int = 0) -> None:
        """Raise SweepError if the cluster is lost (looks at most once per _DASK_CHECK_S);
        ``fetching``: runs taken but whose result is still being fetched."""
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + _DASK_CHECK_S
        status = str(self.client.status)
        if status in ("closing", "closed", "failed"):
            raise SweepError(f"--scheduler: lost the dask {self.where} (client {status})")
        if status != "running":  # reconnecting: dask cancels the runs if that fails
            if self.disconnected_since is None:
                self.disconnected_since = now
            elif now - self.disconnected_since > max(30.0, self.worker_timeout_s):
                raise SweepError(f"--scheduler: lost the dask {self.where} (no connection)")
            return
        self.disconnected_since = None
        try:
            n_workers = len(self.client.scheduler_info()["workers"])
        except Exception:  # asked while the connection broke: the next check tells
            return
        if n_workers:
            self.no_workers_since = None
        elif self.no_workers_since is None:
            self.no_workers_since = now
        elif now - self.no_workers_since >= self.worker_timeout_s:
            raise SweepError(
                f"--scheduler: the dask {self.where} has had no worker for "
                f"{now - self.no_workers_since:.0f} s ({self.unfinished() + fetching} runs "
                "not done); start workers (or raise --worker-timeout) and run the sweep again"
            )


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """Silence dask.distributed's loggers, and asyncio's (a result fetch given up after its
    timeout leaves a task in the client's loop that ends with an exception no one reads), for
    the ``with`` body; then collect such tasks and restore the levels."""
    names = ["asyncio", "distributed"] + [
        name for name in logging.root.manager.loggerDict if name.startswith("distributed.")
    ]
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        gc.collect()  # while still quiet: the abandoned tasks report on being freed
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
