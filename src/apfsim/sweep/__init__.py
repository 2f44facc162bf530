"""Parameter sweeps: sweep files expanded into runs, run on a local pool or a Dask
cluster, stored in SQLite as they finish, resumable (docs/sweep.md)."""

from apfsim.sweep.run import EXECUTORS, SweepSummary, run_sweep
from apfsim.sweep.spec import RunSpec, SweepError, SweepSpec, load_sweep, parse_sweep
from apfsim.sweep.store import SweepStore

__all__ = [
    "EXECUTORS",
    "RunSpec",
    "SweepError",
    "SweepSpec",
    "SweepStore",
    "SweepSummary",
    "load_sweep",
    "parse_sweep",
    "run_sweep",
]
