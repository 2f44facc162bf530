"""Reading a sweep database for a report, and the report's output files.

The database is opened read-only through :meth:`apfsim.sweep.store.SweepStore.reader`, where
its schema lives: a report never changes it, works on a file it may not write, and can be
made while the sweep is still running (of the runs finished so far).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apfsim.report.data import ReportError
from apfsim.report.figures import require
from apfsim.scenario import did_you_mean
from apfsim.sweep.store import StoredRun, StoreError, SweepStore

OUTPUT_SUFFIXES = (".html", ".csv", ".parquet")
FIGURE_SUFFIXES = (".png", ".svg")
DUCKDB_MISSING = "duckdb is not installed; pip install 'apfsim[parquet]' (or write .csv: no extra)"


class SweepReportError(Exception):
    """A database, option or output the report cannot use; the message is one line naming
    the problem and the fix."""


@dataclass(frozen=True, slots=True)
class SweepInfo:
    """One row of the database's ``sweeps`` table, and how many runs it has by status."""

    name: str
    description: str
    spec: dict[str, Any]  # the sweep file as parsed (TOML data)
    axes: tuple[str, ...]
    protocols: tuple[str, ...]
    seeds: tuple[int, ...]
    baseline: str
    counts: dict[str, int]  # status ("ok", "error") -> runs


def _open(db_path: Path) -> SweepStore:
    try:
        return SweepStore.reader(db_path)
    except StoreError as err:
        raise SweepReportError(str(err)) from None


def load_sweep_db(db_path: Path, sweep: str | None = None) -> tuple[SweepInfo, list[StoredRun]]:
    """The sweep's description and its completed runs, by (point, protocol, seed), without
    their full results (``StoredRun.result`` is None; see :func:`point_results`).

    ``sweep`` may be omitted when the database holds exactly one sweep.
    """
    with _open(db_path) as store:
        try:
            sweeps = store.sweeps()
            names = [s["name"] for s in sweeps]
            if not names:
                raise SweepReportError(
                    f"{str(db_path)!r} holds no sweep; run one with 'apfsim sweep'"
                )
            if sweep is None:
                if len(names) > 1:
                    raise SweepReportError(
                        f"{str(db_path)!r} holds {len(names)} sweeps; choose one with "
                        f"--sweep: {', '.join(names)}"
                    )
                sweep = names[0]
            if sweep not in names:
                raise SweepReportError(
                    f"--sweep: no sweep {sweep!r} in {str(db_path)!r}; it holds: "
                    f"{', '.join(names)}{did_you_mean(sweep, names)}"
                )
            r = sweeps[names.index(sweep)]
            spec = r["spec"]
            info = SweepInfo(
                name=r["name"],
                description=str(spec.get("description", "")) if isinstance(spec, dict) else "",
                spec=spec if isinstance(spec, dict) else {},
                axes=tuple(r["axes"]),
                protocols=tuple(r["protocols"]),
                seeds=tuple(r["seeds"]),
                baseline=r["baseline"],
                counts=store.count(sweep),
            )
            runs = store.runs(sweep, results=False)
        except (sqlite3.DatabaseError, ValueError, KeyError, IndexError) as err:
            raise SweepReportError(
                f"{str(db_path)!r} is not a readable apfsim sweep database ({err}); "
                "run the sweep again"
            ) from None
    return info, runs


def point_results(db_path: Path, sweep: str, point: int) -> dict[str, dict[str, Any]]:
    """The full results (docs/results-schema.md) of a point's completed runs, by run key."""
    with _open(db_path) as store:
        try:
            return store.point_results(sweep, point)
        except (sqlite3.DatabaseError, ValueError) as err:
            raise SweepReportError(
                f"{str(db_path)!r}: cannot read the results of point {point} ({err}); "
                "run the sweep again"
            ) from None


def write_bytes(output: Path, data: bytes) -> None:
    try:
        output.write_bytes(data)
    except OSError as err:
        raise SweepReportError(
            f"cannot write {str(output)!r} ({err.strerror}); choose a writable location"
        ) from None


def check_output(output: Path, suffixes: Sequence[str] = OUTPUT_SUFFIXES) -> str:
    """The output's kind (its lower-case suffix) if it can be written; else raise."""
    shown = repr(str(output))
    suffix = output.suffix.lower()
    if suffix not in suffixes:
        raise SweepReportError(
            f"-o: cannot tell the format of {shown}; give a file ending in "
            f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"
        )
    if output.is_dir():
        raise SweepReportError(f"-o: {shown} is a directory; give a file name")
    if not output.parent.is_dir():
        raise SweepReportError(
            f"-o: directory {str(output.parent)!r} does not exist; create it first"
        )
    # What the format needs, before any work.
    if suffix == ".parquet":
        try:
            import duckdb  # noqa: F401
        except ImportError:
            raise SweepReportError(DUCKDB_MISSING) from None
    elif suffix in (".html", *FIGURE_SUFFIXES):
        try:
            require(*(("matplotlib", "jinja2") if suffix == ".html" else ("matplotlib",)))
        except ReportError as err:
            raise SweepReportError(str(err)) from None
    return suffix
