"""Regenerate the "APF speedup against swap-in latency" figures in docs/figures/.

    python scripts/latency_map_figure.py [DB]

Runs the built-in ``latency-map`` sweep into DB (default latency-map.sqlite; resumable:
runs already stored are skipped), then draws each task's work rate relative to sync along
the swap-in latency, one panel per overcommit ratio, with 95 % intervals: the compute
thread (what APF frees the vCPU for) and the faulting writer (what it costs the task that
waits), and prints the numbers it plotted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from apfsim.sweep import SweepStore, load_sweep, run_sweep
from apfsim.sweep.report import aggregate, speedup_figure, text_table

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"
METRICS = {
    "task.compute.work_rate": ("latency-map-compute.png", "compute thread"),
    "task.writer.work_rate": ("latency-map-writer.png", "faulting writer"),
}


def main() -> None:
    db = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("latency-map.sqlite")
    spec = load_sweep("latency-map")
    store = SweepStore(db)
    summary = run_sweep(spec, store, "process")
    store.close()
    print(f"{summary.done} runs now, {summary.skipped} stored before, {summary.failed} failed")
    FIGURES.mkdir(parents=True, exist_ok=True)
    agg = aggregate(db, "latency-map", ["host.swap.mean_us", "host.memory_limit_mib"])
    for metric, (name, task) in METRICS.items():
        figure = FIGURES / name
        speedup_figure(
            db,
            "latency-map",
            "host.swap.mean_us",
            metric,
            figure,
            # The zip varies the resident and swapped fractions with the limit: one panel
            # per overcommit ratio.
            by=["host.swap.mean_us", "host.memory_limit_mib"],
            title=f"APF speedup against swap-in latency: {task}, work rate / sync",
        )
        print(f"wrote {figure}")
        print(text_table(agg, metric))


if __name__ == "__main__":
    main()
