"""Picklable run functions for the process-pool tests (worker processes import them)."""

from __future__ import annotations

import os
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
