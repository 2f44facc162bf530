"""LatencySamples keeps every sample for exact percentiles, at 4 B each while they fit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from apfsim.metrics.accumulators import LatencySamples


def _reference(values: list[int]) -> dict[str, object]:
    ref = np.asarray(values, dtype=np.int64)
    cdf = [round(float(v), 3) for v in np.percentile(ref, np.arange(0, 101, 5)) / 1000.0]
    p99 = round(float(np.percentile(ref, 99)) / 1000.0, 3)
    return {"count": len(values), "p50": cdf[10], "p99": p99, "cdf_us": cdf}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=3000))
def test_summary_is_that_of_the_int64_samples(values: list[int]) -> None:
    samples = LatencySamples(capacity=4)
    for value in values:
        samples.add(value)
    assert samples.summary_us() == _reference(values)
    assert samples.values.tolist() == values


def test_samples_stay_4_bytes_until_one_does_not_fit() -> None:
    samples = LatencySamples()
    for value in range(0, 5_000_000, 1000):
        samples.add(value)
    assert samples.values.itemsize == 4
    samples.add(3_000_000_000)  # 3 s: past int32
    assert samples.values.itemsize == 8
    assert samples.values[-1] == 3_000_000_000 and len(samples) == 5001
