"""Sweep results in SQLite (WAL): one row per run, written as each run finishes.

Tables::

    sweeps(name PRIMARY KEY, spec, axes, protocols, seeds, baseline)   -- JSON text
    runs(sweep, key, point, params, protocol, seed, status, error,
         sim_time_s, metrics, result, PRIMARY KEY (sweep, key))
    timings(sweep, key, wall_s, executor, PRIMARY KEY (sweep, key))

``key`` is a hash of what determines the result (resolved scenario, protocol, seed,
duration, checks), so a run is the same row whatever executor ran it; ``params`` holds the
point's axis values, ``metrics`` the run's summarised metrics and work rates, ``result`` the
full result JSON (docs/results-schema.md); all JSON with sorted keys. Wall-clock figures are
kept apart in ``timings`` so ``runs`` is identical across executors. Only the coordinating
process writes, one transaction per finished run, so an interrupted sweep keeps every run
that had finished and a re-run skips them (``status = 'ok'``); failed runs are retried.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from apfsim.sweep.spec import RunSpec, SweepSpec

__all__ = ["SCHEMA_VERSION", "StoreError", "StoredRun", "SweepStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sweeps(
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, axes TEXT NOT NULL,
    protocols TEXT NOT NULL, seeds TEXT NOT NULL, baseline TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs(
    sweep TEXT NOT NULL, key TEXT NOT NULL, point INTEGER NOT NULL, params TEXT NOT NULL,
    protocol TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL, error TEXT,
    sim_time_s REAL, metrics TEXT, result TEXT,
    PRIMARY KEY (sweep, key)
);
CREATE TABLE IF NOT EXISTS timings(
    sweep TEXT NOT NULL, key TEXT NOT NULL, wall_s REAL NOT NULL, executor TEXT NOT NULL,
    PRIMARY KEY (sweep, key)
);
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class StoreError(ValueError):
    """A file that is not a readable apfsim sweep database; the message is one line naming
    the problem and the fix."""


class StoredRun:
    """One row of ``runs``, decoded."""

    __slots__ = ("error", "key", "metrics", "params", "point", "protocol", "result", "seed")

    def __init__(self, row: sqlite3.Row) -> None:
        self.key: str = row["key"]
        self.point: int = row["point"]
        self.params: dict[str, Any] = json.loads(row["params"])
        self.protocol: str = row["protocol"]
        self.seed: int = row["seed"]
        self.error: str | None = row["error"]
        self.metrics: dict[str, float | None] = json.loads(row["metrics"] or "{}")
        self.result: dict[str, Any] | None = json.loads(row["result"]) if row["result"] else None


_FIX = "give the --db file of 'apfsim sweep'"
# The columns of ``runs`` but the full result (read on demand: SweepStore.point_results).
_RUN_COLUMNS = "key, point, params, protocol, seed, error, metrics, NULL AS result"


class SweepStore:
    """An open results database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        self._db.commit()

    @classmethod
    def reader(cls, path: Path) -> SweepStore:
        """Open ``path`` read-only (``PRAGMA query_only``): a report never changes the
        database, works on a file it may not write, and can read a sweep still running.
        Raises :class:`StoreError` for a file that is no apfsim sweep database of this
        schema version."""
        shown = repr(str(path))
        if not path.exists():
            raise StoreError(f"sweep database {shown} does not exist; {_FIX}")
        if path.is_dir():
            raise StoreError(f"{shown} is a directory, not a sweep database; {_FIX}")
        try:
            # Not mode=ro: a read-only connection leaves -wal and -shm files behind. SQLite
            # falls back to read-only by itself for a file it may not write.
            db = sqlite3.connect(path)
        except sqlite3.Error as err:
            raise StoreError(f"cannot open {shown} ({err}); {_FIX}") from None
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA query_only = ON")
            tables = {r["name"] for r in db.execute("SELECT name FROM sqlite_master")}
            if not {"meta", "sweeps", "runs"} <= tables:
                raise StoreError(
                    f"{shown} is not an apfsim sweep database (no sweeps and runs tables); {_FIX}"
                )
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as err:
            db.close()
            raise StoreError(f"{shown} is not an apfsim sweep database ({err}); {_FIX}") from None
        except StoreError:
            db.close()
            raise
        if row is None or row["value"] != str(SCHEMA_VERSION):
            version = "none" if row is None else repr(row["value"])
            db.close()
            raise StoreError(
                f"{shown} has sweep schema version {version}, but this apfsim reads "
                f"{SCHEMA_VERSION}; run the sweep again with this apfsim"
            )
        store = cls.__new__(cls)
        store.path = path
        store._db = db
        return store

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SweepStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, spec: SweepSpec) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO sweeps VALUES (?, ?, ?, ?, ?, ?)",
            (
                spec.name,
                _dumps(spec.source),
                _dumps(list(spec.axes)),
                _dumps(list(spec.protocols)),
                _dumps(list(spec.seeds)),
                spec.baseline,
            ),
        )
        self._db.commit()

    def completed(self, sweep: str) -> set[str]:
        rows = self._db.execute("SELECT key FROM runs WHERE sweep = ? AND status = 'ok'", (sweep,))
        return {r["key"] for r in rows}

    def record(
        self,
        sweep: str,
        run: RunSpec,
        result: dict[str, Any] | None,
        metrics: dict[str, float | None] | None,
        error: str | None,
        wall_s: float,
        executor: str,
    ) -> None:
        """Store one finished run (replacing an earlier failure of the same run)."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sweep,
                    run.key,
                    run.point,
                    _dumps(dict(run.params)),
                    run.protocol,
                    run.seed,
                    "ok" if error is None else "error",
                    error,
                    None if result is None else result["sim_time_s"],
                    None if metrics is None else _dumps(metrics),
                    None if result is None else _dumps(result),
                ),
            )
            self._db.execute(
                "INSERT OR REPLACE INTO timings VALUES (?, ?, ?, ?)",
                (sweep, run.key, wall_s, executor),
            )

    def sweeps(self) -> list[dict[str, Any]]:
        out = []
        for r in self._db.execute("SELECT * FROM sweeps ORDER BY name"):
            out.append(
                {
                    "name": r["name"],
                    "spec": json.loads(r["spec"]),
                    "axes": json.loads(r["axes"]),
                    "protocols": json.loads(r["protocols"]),
                    "seeds": json.loads(r["seeds"]),
                    "baseline": r["baseline"],
                }
            )
        return out

    def runs(self, sweep: str, status: str = "ok", results: bool = True) -> list[StoredRun]:
        """The runs of ``sweep`` with ``status``, by (point, protocol, seed); without
        ``results`` their full results are left unread (``result`` None: they take memory)."""
        columns = "*" if results else _RUN_COLUMNS
        rows = self._db.execute(
            f"SELECT {columns} FROM runs WHERE sweep = ? AND status = ? "
            "ORDER BY point, protocol, seed",
            (sweep, status),
        )
        return [StoredRun(r) for r in rows]

    def point_results(self, sweep: str, point: int) -> dict[str, dict[str, Any]]:
        """The full results of a point's completed runs, by run key."""
        rows = self._db.execute(
            "SELECT key, result FROM runs WHERE sweep = ? AND point = ? AND status = 'ok' "
            "AND result IS NOT NULL",
            (sweep, point),
        ).fetchall()
        return {r["key"]: json.loads(r["result"]) for r in rows}

    def count(self, sweep: str) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT status, COUNT(*) AS n FROM runs WHERE sweep = ? GROUP BY status", (sweep,)
        )
        return {r["status"]: r["n"] for r in rows}
