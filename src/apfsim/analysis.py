"""pandas DataFrames of results, for notebooks: one row per run, one column per metric.

``RunResult.to_pandas()`` and ``CompareResult.to_pandas()`` give the runs of ``run`` and
``compare``; :func:`sweep_frame` the runs stored by ``apfsim sweep``. pandas is an optional
extra (``pip install 'apfsim[analysis]'``), imported only when a frame is asked for; without
it :class:`MissingExtraError` says which extra to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apfsim.metrics.frames import MissingExtraError, pandas

__all__ = ["MissingExtraError", "sweep_frame"]


def sweep_frame(db: Path | str, sweep: str | None = None) -> Any:
    """The completed runs of a sweep database (``apfsim sweep``): one row per run, with its
    point, axis values (one column per axis), protocol, seed and stored metrics
    (``kind.compute.work_rate``, ...). ``sweep`` may be omitted when the file holds one sweep;
    a bad file raises SweepReportError. ``attrs`` holds the sweep's name and baseline."""
    from apfsim.sweep.report import load_sweep_db

    pd = pandas()
    info, runs = load_sweep_db(Path(db), sweep)
    rows = [
        {
            "point": r.point,
            **{axis: r.params.get(axis) for axis in info.axes},
            "protocol": r.protocol,
            "seed": r.seed,
            **r.metrics,
        }
        for r in runs
    ]
    columns = ["point", *info.axes, "protocol", "seed"]
    df = pd.DataFrame.from_records(rows, columns=None if rows else columns)
    df.attrs["sweep"] = info.name
    df.attrs["baseline"] = info.baseline
    return df
