"""The Chrome/Perfetto writer's arithmetic: a slice's end is exactly the next one's start in
a viewer's double arithmetic (DevTools nests a slice that starts before the previous ends)."""

from __future__ import annotations

import random
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from apfsim.trace.chrome import ts_dur

sys.path.insert(0, str(Path(__file__).parent))
from trace_rules import check_trace


def test_the_reported_case_ends_exactly_at_the_next_start() -> None:
    ts, dur = ts_dur(4_782_247, 5_896_896)
    assert 4782.247 + 1114.649 > 5896.896  # the float sum that nested 865 slices
    assert ts == "4782.247" and float(ts) + float(dur) == 5896.896
    assert abs(Decimal(float(dur)) - Decimal("1114.649")) < Decimal("1e-9")  # still 1114.649 µs


@pytest.mark.parametrize("binade_us", [2**14, 2**24, 2**28])  # 16 ms, 16.8 s, 4.5 min
def test_within_a_binade_every_end_equals_the_next_start_in_doubles(binade_us: int) -> None:
    rng = random.Random(binade_us)
    low, high = binade_us * 1000, 2 * binade_us * 1000
    for _ in range(5_000):
        start = rng.randrange(low, high - 1)
        end = rng.choice([start + 1, rng.randrange(start + 1, min(start + 10**5, high))])
        end = rng.choice([end, rng.randrange(start + 1, high)])
        ts, dur = ts_dur(start, end)
        next_ts, _ = ts_dur(end, end + 1)
        assert float(ts) + float(dur) == float(next_ts), (start, end, ts, dur)
        assert abs(Decimal(float(dur)) * 1000 - (end - start)) < Decimal("0.001")


def test_across_binades_an_end_never_passes_the_next_start() -> None:
    rng = random.Random(14)
    exact = 0
    for _ in range(5_000):
        start = rng.randrange(0, 400 * 10**9)
        end = start + rng.choice([1, rng.randrange(1, 10**4), rng.randrange(1, 10**11)])
        ts, dur = ts_dur(start, end)
        next_ts, _ = ts_dur(end, end + 1)
        assert float(ts) + float(dur) <= float(next_ts), (start, end, ts, dur)
        exact += float(ts) + float(dur) == float(next_ts)
    assert exact > 4_750
    ts, dur = ts_dur(353_850_595, 3_245_994_746)  # a rounding tie no double reaches
    assert float(ts) + float(dur) < 3245994.746


def test_the_python_rules_catch_a_float_end_past_the_next_start() -> None:
    meta = {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "v"}}
    x = {"ph": "X", "cat": "apf", "name": "a", "pid": 1, "tid": 1}
    nested = [meta, {**x, "ts": 4782.247, "dur": 1114.649}, {**x, "ts": 5896.896, "dur": 1.0}]
    with pytest.raises(AssertionError, match="overlaps"):
        check_trace({"traceEvents": nested})
    ts, dur = ts_dur(4_782_247, 5_896_896)
    fixed = [meta, {**x, "ts": float(ts), "dur": float(dur)}, {**x, "ts": 5896.896, "dur": 1.0}]
    assert check_trace({"traceEvents": fixed})["touching"] == 1
