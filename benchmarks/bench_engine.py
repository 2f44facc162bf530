"""Bare engine throughput: self-rescheduling callbacks, and the cb_vcpu model on our Engine.

    python benchmarks/bench_engine.py          # prints events/s (median of 3)
    python -m pytest benchmarks -p no:cacheprovider --benchmark-only -o python_files='bench_*.py'

Target (issue 2): >= 1.0 M events/s. The same two models, measured with a hand-rolled heap of
float-time tuples in simulator-performance.md on this machine: micro 1.58 M/s, vCPU model
1.67 M/s (async) / 1.89 M/s (sync), at load ~1. Ours carries integer ns, ``seq``, tombstone
checks and the live-event count, so expect somewhat less.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from apfsim.engine import Engine

TARGET_EVENTS_PER_S = 1.0e6

# cb_vcpu in ns: bursts ~Exp(1 us), faults ~Exp(2 us); horizons give ~1e6 model events.
MEAN_BURST_NS = 1000.0
MEAN_FAULT_NS = 2000.0
HORIZON_NS = {False: 130_000_000, True: 375_000_000}  # keyed by ``sync``


def micro(processes: int = 1000, iterations: int = 1000) -> int:
    """(a) ``processes`` callbacks each rescheduling itself ``iterations`` times.

    Constant per-process delays of 1.0 + 0.1 (i mod 7) us, no RNG: pure engine cost with a
    heap of ``processes`` entries, as in simulator-performance.md.
    """
    eng = Engine()
    after = eng.after
    left = [iterations] * processes
    delays = [1000 + 100 * (i % 7) for i in range(processes)]

    def step(i: int) -> None:
        left[i] -= 1
        if left[i]:
            after(delays[i], step, i)

    for i in range(processes):
        after(delays[i], step, i)
    eng.run(until=1 << 62)
    return eng.events_run


def vcpu_model(
    sync: bool = False, k: int = 4, tasks: int = 16, seed: int = 42, scale: float = 1.0
) -> tuple[int, float]:
    """(b) cb_vcpu of simulator-performance.md on our Engine; returns (events, utilisation).

    ``tasks`` tasks pinned ``task % k`` alternate a compute burst on their vCPU with a page
    fault. sync: the vCPU stays held during the fault; async: it runs the next task.
    Utilisation should be C/(C+L) = 1/3 (sync) and M/M/1//4 1 - P0 = 0.905 (async).
    """
    ex = random.Random(seed).expovariate
    eng = Engine()
    after = eng.after
    busy = [False] * k
    rq: list[deque[int]] = [deque() for _ in range(k)]
    rate_c, rate_l = 1.0 / MEAN_BURST_NS, 1.0 / MEAN_FAULT_NS
    burst_ns = [0]

    def dispatch(v: int) -> None:
        r = rq[v]
        if r:
            busy[v] = True
            d = int(ex(rate_c))
            burst_ns[0] += d
            after(d, burst_end, r.popleft())
        else:
            busy[v] = False

    def burst_end(tk: int) -> None:
        after(int(ex(rate_l)), fault_end, tk)
        if not sync:
            dispatch(tk % k)

    def fault_end(tk: int) -> None:
        v = tk % k
        rq[v].append(tk)
        if sync or not busy[v]:
            dispatch(v)

    for tk in range(tasks):
        rq[tk % k].append(tk)
    for v in range(k):
        dispatch(v)
    horizon = int(HORIZON_NS[sync] * scale)
    eng.run(until=horizon)
    return eng.events_run, burst_ns[0] / (k * horizon)


def events_per_s(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    out = fn()
    events = out[0] if isinstance(out, tuple) else out
    return float(events) / (time.perf_counter() - t0)


# -- pytest-benchmark (a tenth of the script's sizes, so the suite stays short) ---------------


def test_engine_micro(benchmark: Any) -> None:
    events = benchmark.pedantic(micro, args=(1000, 100), rounds=5)
    assert events == 100_000


def test_engine_vcpu_model_async(benchmark: Any) -> None:
    events, util = benchmark.pedantic(vcpu_model, kwargs={"sync": False, "scale": 0.1}, rounds=5)
    assert events > 50_000 and 0.85 < util < 0.95


def test_engine_vcpu_model_sync(benchmark: Any) -> None:
    events, util = benchmark.pedantic(vcpu_model, kwargs={"sync": True, "scale": 0.1}, rounds=5)
    assert events > 50_000 and 0.30 < util < 0.37


def main() -> None:
    cases: dict[str, Callable[[], Any]] = {
        "micro, 1000 self-rescheduling callbacks": micro,
        "vCPU model (cb_vcpu), async": lambda: vcpu_model(sync=False),
        "vCPU model (cb_vcpu), sync": lambda: vcpu_model(sync=True),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):  # interleaved rounds, as the reference measurements
        for name, fn in cases.items():
            rates[name].append(events_per_s(fn))
    print(f"engine throughput (median of 3; target >= {TARGET_EVENTS_PER_S / 1e6:.1f} M events/s)")
    for name, values in rates.items():
        median = statistics.median(values)
        verdict = "ok" if median >= TARGET_EVENTS_PER_S else "BELOW TARGET"
        print(
            f"  {name:40s} {median / 1e6:5.2f} M events/s "
            f"(min {min(values) / 1e6:.2f}, max {max(values) / 1e6:.2f})  {verdict}"
        )
    for sync, expected in ((False, 1 - 1 / 10.5), (True, 1 / 3)):
        events, util = vcpu_model(sync=sync)
        label = "sync" if sync else "async"
        print(
            f"  check: vCPU model {label} utilisation {util:.3f} "
            f"(theory {expected:.3f}), {events} events"
        )


if __name__ == "__main__":
    main()
