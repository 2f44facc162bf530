"""Sweep machinery (issue 6): its cost per run, and how well the process pool uses the cores.

    python benchmarks/bench_sweep.py [RUNS] [SIMULATED_S]

A sweep of RUNS (default 200) short runs (rfcv2-2020, default 0.2 simulated s: about 20 ms
of simulation each) is run serially and on the process pool, each into a fresh SQLite file.
Machinery cost per run = (sweep wall time - the runs' own wall times) / RUNS, for the serial
executor: expansion and validation, pickling, metrics, one SQLite transaction per run.
Targets: <= 50 ms per run; the pool keeps both cores busy (speedup over serial near 2).
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from apfsim.sweep import SweepStore, parse_sweep, run_sweep

TARGET_MS_PER_RUN = 50.0


def sweep_data(runs: int, duration_s: float = 0.2) -> dict[str, Any]:
    points = max(1, runs // 4)
    return {
        "name": "bench",
        "scenario": "rfcv2-2020",
        "duration_s": duration_s,
        "protocols": ["sync", "arm64-rfcv2"],
        "seeds": 2,
        "set": {"host.swap.distribution": "exponential"},
        "grid": {"host.swap.mean_us": {"logspace": [36.0, 55000.0], "num": points}},
    }


def measure(runs: int, executor: str, duration_s: float = 0.2) -> tuple[float, float, int]:
    """(sweep wall s, sum of run wall s, runs) into a fresh database."""
    t0 = time.perf_counter()
    spec = parse_sweep(sweep_data(runs, duration_s), "bench")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.sqlite"
        store = SweepStore(db)
        run_sweep(spec, store, executor)
        store.close()
        wall = time.perf_counter() - t0
        with sqlite3.connect(db) as con:
            own = con.execute("SELECT SUM(wall_s) FROM timings").fetchone()[0]
    return wall, float(own), len(spec.runs)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    duration = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
    serial, serial_own, n = measure(runs, "serial", duration)
    pool, pool_own, _ = measure(runs, "process", duration)
    per_run_ms = 1000 * (serial - serial_own) / n
    print(f"{n} runs of rfcv2-2020, {duration:g} simulated s each")
    print(f"  serial : {serial:6.2f} s wall, runs' own {serial_own:6.2f} s")
    print(f"  machinery per run (serial): {per_run_ms:.1f} ms (target <= {TARGET_MS_PER_RUN:g})")
    print(f"  process: {pool:6.2f} s wall, runs' own {pool_own:6.2f} s (summed over workers)")
    print(f"  speedup of the process pool over serial: x{serial / pool:.2f}")
    print(f"  core use (runs' own time / wall / 2 cores): {pool_own / pool / 2:.0%}")


# -- pytest-benchmark -------------------------------------------------------------------------


def test_sweep_serial_40(benchmark: Any) -> None:
    benchmark.pedantic(measure, args=(40, "serial"), rounds=2)


if __name__ == "__main__":
    main()
