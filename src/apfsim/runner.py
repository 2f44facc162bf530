"""Running simulations: one runner for ``run``, ``compare`` and ``sweep``.

A batch of runs (:class:`RunSpec`) goes to one of three executors and
comes back as :class:`RunOutcome` values, in the order they finish:

* ``serial``: in this process, one run after another (with the run's own progress);
* ``process``: a local process pool (default: every usable CPU) whose workers die with this
  process (:mod:`apfsim.pool`); a pool that loses a worker is rebuilt and the unfinished
  runs resubmitted, at most :data:`MAX_POOL_RESTARTS` times;
* ``dask``: a dask.distributed cluster: the scheduler at ``scheduler``, or a LocalCluster of
  ``workers`` processes when none is given (``pip install apfsim[dask]``). A cluster left
  without workers for ``worker_timeout_s``, or that loses its scheduler, ends the batch with
  :class:`RunnerError`; a run dask itself gives up on (KilledWorker) is a failed outcome.

Workers only simulate: the coordinating process stores and summarises, so what it writes
does not depend on the executor. :meth:`Execution.cancel` starts no further run; the runs in
progress still end and are yielded (``compare`` stops so at its first failed run).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

from apfsim.checking import InvariantViolation
from apfsim.metrics.results import ProtocolResult
from apfsim.pool import new_pool, stop_workers
from apfsim.scenario import did_you_mean, scenario_from_dict
from apfsim.simulation import Simulation
from apfsim.trace.hooks import traced_simulation
from apfsim.trace.recorder import TraceOptions, TraceWriteError

__all__ = [
    "CHUNK_RUNS",
    "EXECUTORS",
    "MAX_POOL_RESTARTS",
    "WORKER_TIMEOUT_S",
    "Execute",
    "Execution",
    "RunOutcome",
    "RunSpec",
    "RunnerError",
    "default_jobs",
    "execute_all",
    "execute_run",
    "execute_whole",
    "executor_problem",
    "one_line",
    "simulate",
]

EXECUTORS = ("serial", "process", "dask")
MAX_POOL_RESTARTS = 3
WORKER_TIMEOUT_S = 60.0
"""dask: how long a cluster may have no worker at all before the batch is given up."""
_DASK_POLL_S = 0.1  # how often the dask loop looks for finished runs when none is ready
_DASK_CHECK_S = 1.0  # how often it asks the scheduler how many workers it has
CHUNK_RUNS = 10_000
"""Runs handed to a pool or cluster at a time: a batch of a million runs holds no more
futures than this."""

RunProgress = Callable[[float], None]
"""Called with the fraction of the current run done (serial executor only)."""


class RunnerError(RuntimeError):
    """The batch could not go on (an executor that cannot start, a lost scheduler)."""


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One run: a protocol on a seed at a point of a sweep's axes (compare: one point)."""

    key: str  # content hash: the resolved scenario, protocol, seed, duration, check
    point: int
    params: tuple[tuple[str, Any], ...]  # the axis values of this point, in axis order
    protocol: str
    seed: int
    scenario: dict[str, Any]  # resolved (JSON-able) scenario with every override applied
    duration_s: float | None
    check: bool
    trace: TraceOptions | None = None  # compare's --trace/--ftrace files (not in the key)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """One finished run: its result dict (docs/results-schema.md) or its error.

    ``raised`` carries an exception the caller asked to be handed back whole (compare's
    invariant violations and trace write errors, whose messages are reports)."""

    key: str
    result: dict[str, Any] | None
    error: str | None
    wall_s: float
    raised: BaseException | None = None


class Execute(Protocol):
    """The unit of work: picklable (a module-level function) for the process and dask pools,
    which call it with the run alone; the serial executor passes the run's progress too."""

    def __call__(self, run: RunSpec, progress: RunProgress | None = None, /) -> RunOutcome: ...


def executor_problem(executor: str) -> str | None:
    """The one-line error for an unknown ``--executor`` (naming the closest), or None."""
    if executor in EXECUTORS:
        return None
    return (
        f"--executor: {executor!r}; choose from {', '.join(EXECUTORS)}"
        f"{did_you_mean(executor, EXECUTORS)}"
    )


def default_jobs() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - platforms without affinity


def simulate(run: RunSpec, progress: RunProgress | None = None) -> ProtocolResult:
    """One run's simulation, traced if the run has trace files."""
    scenario = scenario_from_dict(run.scenario)
    if run.trace is None:
        sim = Simulation(scenario, run.protocol, run.seed, run.check)
    else:
        sim = traced_simulation(scenario, run.protocol, run.seed, run.check, run.trace)
    return sim.run(run.duration_s, progress)


def execute_run(run: RunSpec, progress: RunProgress | None = None, /) -> RunOutcome:
    """A sweep's unit of work: any error is the outcome's one-line ``error`` (the sweep
    stores it and goes on)."""
    t0 = time.perf_counter()
    try:
        result = simulate(run, progress)
    except Exception as err:  # recorded with the run; the batch goes on
        return RunOutcome(run.key, None, one_line(err), 0.0)
    return RunOutcome(run.key, result.to_dict(), None, time.perf_counter() - t0)


def execute_whole(run: RunSpec, progress: RunProgress | None = None, /) -> RunOutcome:
    """``run`` and ``compare``'s unit of work: the result with its wall time; an invariant
    violation or a trace write error comes back whole (``raised``: its message is a
    report, and it ends the command); any other error propagates."""
    t0 = time.perf_counter()
    try:
        result = simulate(run, progress)
    except (InvariantViolation, TraceWriteError) as err:
        return RunOutcome(run.key, None, one_line(err), 0.0, raised=err)
    return RunOutcome(run.key, result.to_dict(include_wall=True), None, time.perf_counter() - t0)


def one_line(err: BaseException) -> str:
    """An error as one line of at most 2,000 characters: ``Type: message``."""
    message = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {message}"[:2000]


BatchProgress = Callable[[float, int], None]
"""Called with (runs done, fractional in a serial batch; runs in all)."""


def execute_all(
    runs: Sequence[RunSpec],
    results: list[dict[str, Any] | None],
    executor: str = "serial",
    workers: int | None = None,
    scheduler: str | None = None,
    progress: BatchProgress | None = None,
) -> None:
    """Every run (:func:`execute_whole`) into ``results[i]``, so whatever ends the batch
    leaves every finished run there. The first failed run ends it: no further run starts,
    those in progress end and are kept, then its error is raised (an invariant violation
    or a trace write error whole; a run dask gave up on as :class:`RunnerError`). ^C
    propagates at once."""
    index = {run.key: i for i, run in enumerate(runs)}
    total = len(runs)
    done = 0

    def fraction(f: float) -> None:
        if progress is not None:
            progress(done + f, total)

    failure: BaseException | None = None
    execution = Execution(
        runs,
        executor,
        workers,
        scheduler,
        execute=execute_whole,
        run_progress=fraction if progress is not None else None,
    )
    with execution:
        for outcome in execution:
            done += 1
            if outcome.raised is not None or outcome.error is not None:
                failure = failure or outcome.raised or RunnerError(str(outcome.error))
                execution.cancel()
            else:
                results[index[outcome.key]] = outcome.result
            if progress is not None:
                progress(float(done), total)
    if failure is not None:
        raise failure


class Execution:
    """The outcomes of ``runs`` on ``executor``, as they finish (iterate once).

    Closing it (or leaving a ``for`` loop over it by an exception) ends the pool or cluster
    and its workers at once; the runs in progress are given up."""

    def __init__(
        self,
        runs: Iterable[RunSpec],
        executor: str = "process",
        workers: int | None = None,
        scheduler: str | None = None,
        worker_timeout_s: float = WORKER_TIMEOUT_S,
        execute: Execute = execute_run,
        run_progress: RunProgress | None = None,
    ) -> None:
        problem = executor_problem(executor)
        if problem is not None:
            raise RunnerError(problem)
        self.executor = executor
        self.workers = workers if workers is not None else default_jobs()
        self.scheduler = scheduler
        self.worker_timeout_s = worker_timeout_s
        self.execute = execute
        self.run_progress = run_progress
        self.cancelled = False
        self._runs = iter(runs)
        self._outcomes = self._serial() if executor == "serial" else self._in_chunks()

    def __iter__(self) -> Iterator[RunOutcome]:
        return self._outcomes

    def cancel(self) -> None:
        """Start no further run; those in progress still end and are yielded."""
        self.cancelled = True

    def close(self) -> None:
        self._outcomes.close()

    def __enter__(self) -> Execution:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serial(self) -> Generator[RunOutcome, None, None]:
        for run in self._runs:
            if self.cancelled:
                return
            yield self.execute(run, self.run_progress)

    def _in_chunks(self) -> Generator[RunOutcome, None, None]:
        """The runs handed to a pool or cluster CHUNK_RUNS at a time; no runs, no pool."""
        while not self.cancelled and (chunk := list(itertools.islice(self._runs, CHUNK_RUNS))):
            part = self._process(chunk) if self.executor == "process" else self._dask(chunk)
            try:
                yield from part
            finally:
                part.close()

    def _process(self, runs: Sequence[RunSpec]) -> Generator[RunOutcome, None, None]:
        """A local process pool; rebuilt (at most MAX_POOL_RESTARTS times) if a worker dies.
        Its workers exit if this process dies (:mod:`apfsim.pool`)."""
        pending_runs = list(runs)
        restarts = 0
        while pending_runs:
            unfinished = {r.key: r for r in pending_runs}
            pool = new_pool(min(self.workers, len(pending_runs)))
            try:
                futures: dict[Future[RunOutcome], str] = {
                    pool.submit(self.execute, r): r.key for r in pending_runs
                }
                waiting = set(futures)
                while waiting:
                    if self.cancelled:
                        # Queued runs are dropped; those a worker has taken still end.
                        waiting = {f for f in waiting if not f.cancel()}
                        if not waiting:
                            break
                    done, waiting = wait(waiting, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        outcome = future.result()
                        unfinished.pop(outcome.key, None)
                        yield outcome
                pending_runs = []
            except BrokenProcessPool:
                restarts += 1
                if restarts > MAX_POOL_RESTARTS:
                    raise RunnerError(
                        f"the process pool lost a worker {restarts} times; "
                        f"{len(unfinished)} runs not done (run again to retry them)"
                    ) from None
                pending_runs = list(unfinished.values())
            except KeyboardInterrupt:
                stop_workers(pool)  # ^C means now: the runs in progress are given up
                for future in futures:  # those that had ended are yielded all the same
                    if future.done() and not future.cancelled() and future.exception() is None:
                        outcome = future.result()
                        if unfinished.pop(outcome.key, None) is not None:
                            yield outcome
                raise
            except BaseException:
                # The consumer gave up (a full disk): what runs now could not be kept.
                stop_workers(pool)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    def _dask(self, runs: Sequence[RunSpec]) -> Generator[RunOutcome, None, None]:
        """dask.distributed: an existing scheduler, or a LocalCluster of ``workers`` processes.

        Raises RunnerError once the scheduler is lost or no worker has been there for
        ``worker_timeout_s`` seconds: dask itself would wait for ever. dask's own log lines
        (tracebacks of lost connections) are silenced meanwhile; the error says what
        happened."""
        try:
            import distributed
        except ImportError:
            raise RunnerError(
                "--executor dask: dask.distributed is not installed; pip install 'apfsim[dask]'"
            ) from None
        dist: Any = distributed  # untyped library
        scheduler = self.scheduler
        where = "the LocalCluster's scheduler" if scheduler is None else f"scheduler {scheduler!r}"
        with _quiet_dask_logs():
            cluster = None
            try:
                if scheduler is None:
                    cluster = dist.LocalCluster(
                        n_workers=self.workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=None,
                        silence_logs=logging.CRITICAL,
                    )
                    client = dist.Client(cluster)
                else:
                    client = dist.Client(scheduler, timeout=10)
            except (OSError, TimeoutError) as err:
                raise RunnerError(f"--scheduler: cannot connect to {scheduler!r} ({err})") from None
            try:
                keys = {f"apfsim-{r.key}": r.key for r in runs}
                futures = client.map(self.execute, list(runs), key=list(keys))
                finished = dist.as_completed(futures)
                health = _DaskHealth(client, where, self.worker_timeout_s, finished.count)
                while not finished.is_empty():
                    if self.cancelled:
                        # Only the runs that had finished count: the rest are given up.
                        client.cancel([f for f in futures if not f.done()])
                        return
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
            raise RunnerError(f"--scheduler: lost the dask {where} (its runs were cancelled)")
        try:
            outcome: RunOutcome = future.result(timeout=_DASK_CHECK_S)
        except TimeoutError:
            health.check(fetching=1)
            continue
        except Exception as err:
            if future.cancelled() or isinstance(err, OSError):
                raise RunnerError(f"--scheduler: lost the dask {where} ({err})") from None
            return RunOutcome(key, None, one_line(err), 0.0)
        return outcome


class _DaskHealth:
    """Whether a dask cluster can still finish the batch: a scheduler that answers, and some
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
        """Raise RunnerError if the cluster is lost (looks at most once per _DASK_CHECK_S);
        ``fetching``: runs taken but whose result is still being fetched."""
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + _DASK_CHECK_S
        status = str(self.client.status)
        if status in ("closing", "closed", "failed"):
            raise RunnerError(f"--scheduler: lost the dask {self.where} (client {status})")
        if status != "running":  # reconnecting: dask cancels the runs if that fails
            if self.disconnected_since is None:
                self.disconnected_since = now
            elif now - self.disconnected_since > max(30.0, self.worker_timeout_s):
                raise RunnerError(f"--scheduler: lost the dask {self.where} (no connection)")
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
            raise RunnerError(
                f"--scheduler: the dask {self.where} has had no worker for "
                f"{now - self.no_workers_since:.0f} s ({self.unfinished() + fetching} runs "
                "not done); start workers (or raise --worker-timeout) and run the command again"
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
