"""Picklable run functions for the process-pool tests (worker processes import them)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from apfsim.runner import RunOutcome, execute_run
from apfsim.sweep.spec import RunSpec


def crash_once(marker: Path, run: RunSpec) -> RunOutcome:
    """Kill this worker process the first time it runs seed 1 of 'sync' (``marker``
    remembers it), as an OOM kill would; run normally otherwise."""
    if run.protocol == "sync" and run.seed == 1 and not marker.exists():
        marker.write_text("crashed")
        os._exit(9)
    return execute_run(run)


def stored_runs(db: Path, where: str = "") -> int:
    """Runs in a sweep database another process is writing; 0 before its schema exists
    (the file appears a moment before its tables do)."""
    try:
        with sqlite3.connect(db) as con:
            return int(con.execute(f"SELECT COUNT(*) FROM runs {where}").fetchone()[0])
    except sqlite3.Error:
        return 0
