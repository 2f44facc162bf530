"""Engine throughput: a bare self-rescheduling callback, and a small vCPU model on the engine.

    python benchmarks/bench_engine.py          # prints events/s
    python -m pytest benchmarks --benchmark-only -o python_files='bench_*.py'

Target (issue 2): >= 1.0 M events/s. simulator-performance.md measured ~2 M/s for a bare heap
loop and 1.67-1.89 M/s for the callback vCPU model on this machine.
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Any

from apfsim.engine import Engine


def micro(iterations: int) -> int:
    """One callback that reschedules itself: pure engine overhead per event."""
    eng = Engine()
    left = [iterations]

    def step(_: object) -> None:
        left[0] -= 1
        if left[0]:
            eng.after(7, step)

    eng.after(0, step)
    eng.run(until=1 << 62)
    return eng.events_run


def vcpu_model(
    k: int = 4, tasks: int = 16, horizon_ns: int = 2_000_000_000, sync: bool = False
) -> int:
    """cb_vcpu of simulator-performance.md on our Engine: tasks alternate compute and faults."""
    ex = random.Random(1).expovariate
    eng = Engine()
    busy = [False] * k
    rq: list[deque[int]] = [deque() for _ in range(k)]
    mean_c, mean_l = 1000.0, 2000.0

    def dispatch(v: int) -> None:
        r = rq[v]
        if r:
            busy[v] = True
            eng.after(int(ex(1 / mean_c)), burst_end, r.popleft())
        else:
            busy[v] = False

    def burst_end(tk: Any) -> None:
        eng.after(int(ex(1 / mean_l)), fault_end, tk)
        if not sync:
            dispatch(tk % k)

    def fault_end(tk: Any) -> None:
        v = tk % k
        rq[v].append(tk)
        if sync or not busy[v]:
            dispatch(v)

    for tk in range(tasks):
        rq[tk % k].append(tk)
    for v in range(k):
        dispatch(v)
    eng.run(until=horizon_ns)
    return eng.events_run


def _rate(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    events = fn(*args)
    return events / (time.perf_counter() - t0)


def test_engine_micro(benchmark: Any) -> None:
    benchmark(micro, 200_000)


def test_engine_vcpu_model(benchmark: Any) -> None:
    benchmark(vcpu_model)


if __name__ == "__main__":
    best_micro = max(_rate(micro, 1_000_000) for _ in range(3))
    best_vcpu = max(_rate(vcpu_model) for _ in range(3))
    print(f"engine micro-benchmark: {best_micro / 1e6:.2f} M events/s")
    print(f"engine vCPU model:      {best_vcpu / 1e6:.2f} M events/s")
