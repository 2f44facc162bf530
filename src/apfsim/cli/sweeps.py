"""``apfsim sweep`` and ``apfsim sweeps``."""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from pathlib import Path
from typing import Annotated

import typer

from apfsim.api import (
    MAX_DURATION_S,
)
from apfsim.cli.common import (
    QuietOption,
    SchedulerOption,
    _Exit,
    _fail,
    _is_dir,
    _Progress,
    app,
)
from apfsim.runner import WORKER_TIMEOUT_S, executor_problem
from apfsim.sweep.run import SweepError as SweepRunError
from apfsim.sweep.run import run_sweep
from apfsim.sweep.spec import SweepError as SpecError
from apfsim.sweep.spec import builtin_sweeps, load_sweep
from apfsim.sweep.store import SweepStore


@app.command("sweep")
def sweep_command(
    sweep_file: Annotated[
        str, typer.Argument(help="A sweep TOML file, or a built-in sweep (apfsim sweeps).")
    ],
    executor: Annotated[
        str, typer.Option(help="serial, process (a local pool: default) or dask.")
    ] = "process",
    scheduler: SchedulerOption = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: the usable CPUs).")
    ] = None,
    db: Annotated[
        Path | None,
        typer.Option(help="SQLite results file (default: NAME.sqlite here); re-runs resume."),
    ] = None,
    worker_timeout: Annotated[
        float,
        typer.Option(
            help="dask: give up (exit 2) once the cluster has had no worker this many seconds."
        ),
    ] = WORKER_TIMEOUT_S,
    quiet: QuietOption = False,
) -> None:
    """Run a parameter sweep into SQLite, skipping runs already stored."""
    problem = executor_problem(executor)
    if problem is not None:
        raise _fail(problem)
    if scheduler is not None and executor != "dask":
        raise _fail("--scheduler: only with --executor dask")
    if workers is not None and workers < 1:
        raise _fail(f"--workers: must be at least 1 (got {workers})")
    if not 0 < worker_timeout <= MAX_DURATION_S:
        raise _fail(
            f"--worker-timeout: must be a number of seconds in (0, {MAX_DURATION_S:g}] "
            f"(got {worker_timeout})"
        )
    try:
        spec = load_sweep(sweep_file)
    except SpecError as err:
        raise _fail(str(err)) from None
    path = db if db is not None else Path(f"{spec.name}.sqlite")
    if not _is_dir(path.parent):
        raise _fail(f"--db: directory {str(path.parent)!r} does not exist; create it first")
    try:
        store = SweepStore(path)
    except sqlite3.DatabaseError as err:
        raise _fail(f"--db: {str(path)!r} is not a usable SQLite file ({err})") from None
    progress = _Progress(quiet)
    try:
        summary = run_sweep(
            spec, store, executor, workers, scheduler, progress.sweep_done, worker_timeout
        )
    except SweepRunError as err:
        progress.close()
        raise _fail(f"{err}; {_stored(store, spec.name)} runs stored in {str(path)!r}") from None
    except sqlite3.Error as err:
        # A full disk (or quota) while storing a run: the rows already committed stay.
        progress.close()
        raise _fail(
            f"--db: cannot write {str(path)!r} ({err}); the {_stored(store, spec.name)} runs "
            "stored before are kept; free space and run the same command again to finish"
        ) from None
    except KeyboardInterrupt:
        progress.close()
        print(
            f"apfsim: interrupted: {_stored(store, spec.name)} of {len(spec.runs)} runs stored "
            f"in {str(path)!r}; run the same command again to finish",
            file=sys.stderr,
        )
        raise _Exit(130) from None
    finally:
        progress.close()
        with contextlib.suppress(sqlite3.Error):
            store.close()
    if not quiet:
        print(
            f"sweep {spec.name}: {summary.total} runs ({spec.points} points x "
            f"{len(spec.protocols)} protocols x {len(spec.seeds)} seeds); "
            f"{summary.skipped} already stored, {summary.done} run now "
            f"({summary.failed} failed) with {summary.executor} in {summary.wall_s:.1f} s; "
            f"results in {path}"
        )
    if summary.failed:
        print(
            f"apfsim: {summary.failed} runs failed; their errors are in {path} "
            "(runs.error); run again to retry them",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def _stored(store: SweepStore, sweep: str) -> str:
    """How many runs of ``sweep`` are stored (ok), for a last message; "?" if even reading
    the file fails."""
    try:
        return str(store.count(sweep).get("ok", 0))
    except sqlite3.Error:
        return "?"


@app.command("sweeps")
def sweeps_command() -> None:
    """List the built-in sweeps."""
    for name, description in builtin_sweeps().items():
        print(f"{name:<20} {description}")
