"""Regenerate docs/figures/latency-map-speedup.png: "APF speedup against swap-in latency".

    python scripts/latency_map_figure.py [DB]

Runs the built-in ``latency-map`` sweep into DB (default latency-map.sqlite; resumable:
runs already stored are skipped), then draws the compute thread's work rate relative to
sync along the swap-in latency, one panel per overcommit ratio, with 95 % intervals, and
prints the speedups it plotted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from apfsim.sweep import SweepStore, load_sweep, run_sweep
from apfsim.sweep.report import aggregate, speedup_figure, text_table

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "latency-map-speedup.png"
METRIC = "task.compute.work_rate"


def main() -> None:
    db = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("latency-map.sqlite")
    spec = load_sweep("latency-map")
    store = SweepStore(db)
    summary = run_sweep(spec, store, "process")
    store.close()
    print(f"{summary.done} runs now, {summary.skipped} stored before, {summary.failed} failed")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    speedup_figure(
        db,
        "latency-map",
        "host.swap.mean_us",
        METRIC,
        FIGURE,
        title="APF speedup against swap-in latency (compute thread, relative to sync)",
    )
    print(f"wrote {FIGURE}")
    agg = aggregate(db, "latency-map", ["host.swap.mean_us", "host.memory_limit_mib"])
    print(text_table(agg, METRIC))


if __name__ == "__main__":
    main()
