"""Swap device queueing, service-time samplers and the RFCv2 lognormal fit."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from apfsim.engine import Engine, RandomStreams
from apfsim.host.backing import (
    RFCV2_APF_COUNT,
    RFCV2_SWAPIN_LOGNORMAL,
    RFCV2_SWAPIN_MAX_NS,
    RFCV2_SWAPIN_MEAN_NS,
    RFCV2_SWAPIN_MIN_NS,
    BackingStore,
    ConstantServiceTime,
    ExponentialServiceTime,
    IoKind,
    LognormalServiceTime,
    SwapDevice,
    fit_lognormal,
    rfcv2_swapin_time,
)


def constant_device(
    eng: Engine, read_ns: int = 100, write_ns: int = 300, qd: int = 2, per_page: int = 0
) -> SwapDevice:
    return SwapDevice(
        eng, ConstantServiceTime(read_ns), ConstantServiceTime(write_ns), qd, per_page
    )


# ---------------------------------------------------------------------- queueing


def test_fifo_and_queue_depth_exact_times() -> None:
    eng = Engine()
    dev = constant_device(eng, qd=2)
    done: list[tuple[str, int]] = []

    def record(name: Any) -> None:
        done.append((name, eng.now))

    for name, kind in [("r0", IoKind.READ), ("w1", IoKind.WRITE), ("r2", IoKind.READ)]:
        dev.submit(kind, 1, record, name)
    dev.submit(IoKind.READ, 1, record, "r3")
    dev.submit(IoKind.READ, 1, record, "r4")
    assert dev.in_service == 2 and dev.queue_length == 5 and dev.max_queue_length == 5
    eng.run(until=10_000)
    # r0 [0,100]; w1 [0,300]; r2 [100,200]; r3 [200,300]; r4 [300,400] (slot of r3 or w1).
    assert done == [("r0", 100), ("r2", 200), ("w1", 300), ("r3", 300), ("r4", 400)]
    assert (dev.reads, dev.writes, dev.pages_read, dev.pages_written) == (4, 1, 4, 1)
    assert dev.read_latencies_ns.tolist() == [100, 200, 300, 400]
    assert dev.queue_length == 0


def test_readahead_cluster_is_one_request() -> None:
    eng = Engine()
    dev = constant_device(eng, read_ns=1000, qd=1, per_page=50)
    times: list[int] = []
    dev.submit(IoKind.READ, 8, lambda _: times.append(eng.now), None)
    dev.submit(IoKind.READ, 1, lambda _: times.append(eng.now), None)
    eng.run(until=10**6)
    assert times == [1000 + 7 * 50, 1000 + 7 * 50 + 1000]
    assert (dev.reads, dev.pages_read) == (2, 9)


def test_request_from_on_done_does_not_overtake_waiters() -> None:
    eng = Engine()
    dev = constant_device(eng, qd=1)
    order: list[str] = []

    def first_done(_: Any) -> None:
        order.append("a")
        dev.submit(IoKind.READ, 1, order.append, "c")

    dev.submit(IoKind.READ, 1, first_done, None)
    dev.submit(IoKind.READ, 1, order.append, "b")
    eng.run(until=1000)
    assert order == ["a", "b", "c"]


def test_queue_hook_and_time_weighted_stats() -> None:
    eng = Engine()
    dev = constant_device(eng, read_ns=100, qd=1)
    seen: list[tuple[int, int]] = []
    dev.on_queue_change = lambda t, d: seen.append((t, d))
    dev.submit(IoKind.READ, 1, lambda _: None, None)
    dev.submit(IoKind.READ, 1, lambda _: None, None)
    eng.run(until=400)
    assert seen == [(0, 1), (0, 2), (100, 1), (200, 0)]
    # Depth 2 for 100 ns, 1 for 100 ns, 0 for 200 ns.
    assert dev.mean_queue_length() == pytest.approx(300 / 400)
    assert dev.mean_busy_queue_length() == pytest.approx(300 / 200)
    assert dev.busy_ns() == 200 and dev.utilisation() == pytest.approx(0.5)


def test_latency_buffer_grows_and_is_int64() -> None:
    eng = Engine()
    dev = constant_device(eng, read_ns=10, qd=4)
    for _ in range(3000):
        dev.submit(IoKind.READ, 1, lambda _: None, None)
    eng.run(until=10**6)
    lat = dev.read_latencies_ns
    assert isinstance(lat, np.ndarray) and lat.dtype == np.int64 and len(lat) == 3000
    assert lat[0] == 10 and lat[-1] == 10 * 750


def test_swap_device_is_a_backing_store() -> None:
    store: BackingStore = constant_device(Engine())
    assert callable(store.submit)


@pytest.mark.parametrize("bad", [{"qd": 0}, {"per_page": -1}])
def test_device_rejects_bad_parameters(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        constant_device(Engine(), **bad)


def test_littles_law_mm1() -> None:
    """M/M/1 at rho = 0.5: L = rho / (1 - rho) = 1 and L = lambda W on the sample path."""
    eng = Engine()
    streams = RandomStreams(2024)
    service = ExponentialServiceTime(1000.0, streams.stream("swap.read"))
    dev = SwapDevice(eng, service, ConstantServiceTime(0), queue_depth=1)
    gaps = np.rint(streams.stream("arrivals").exponential(2000.0, 100_000)).astype(np.int64)
    arrivals = iter(gaps.tolist())

    def arrive(_: Any) -> None:
        dev.submit(IoKind.READ, 1, lambda _: None, None)
        gap = next(arrivals, None)
        if gap is not None:
            eng.after(gap, arrive)

    eng.after(0, arrive)
    horizon = int(gaps.sum()) + 10**6
    eng.run(until=horizon)
    lat = dev.read_latencies_ns
    assert len(lat) == 100_001
    arrival_rate = len(lat) / horizon
    assert dev.mean_queue_length() == pytest.approx(arrival_rate * lat.mean(), rel=0.01)
    assert dev.mean_queue_length() == pytest.approx(1.0, rel=0.08)
    assert dev.utilisation() == pytest.approx(0.5, rel=0.03)
    assert dev.mean_busy_queue_length() == pytest.approx(2.0, rel=0.08)


def run_lognormal_device(seed: int) -> np.ndarray:
    eng = Engine()
    streams = RandomStreams(seed)
    dev = SwapDevice(
        eng,
        rfcv2_swapin_time(streams.stream("swap.read")),
        rfcv2_swapin_time(streams.stream("swap.write")),
        queue_depth=4,
    )
    for i in range(500):
        dev.submit(IoKind.READ if i % 3 else IoKind.WRITE, 1 + i % 8, lambda _: None, None)
    eng.run(until=10**12)
    return dev.read_latencies_ns.copy()


def test_same_seed_same_run() -> None:
    a, b, c = run_lognormal_device(1), run_lognormal_device(1), run_lognormal_device(2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------- service times


def test_constant_service_time() -> None:
    svc = ConstantServiceTime(1234)
    assert svc.sample() == 1234 and svc.mean_ns == 1234.0
    with pytest.raises(ValueError):
        ConstantServiceTime(-1)


def test_exponential_mean_and_int_samples() -> None:
    svc = ExponentialServiceTime(5000.0, np.random.default_rng(3))
    draws = [svc.sample() for _ in range(50_000)]
    assert all(type(d) is int for d in draws[:10])
    assert np.mean(draws) == pytest.approx(svc.mean_ns, rel=0.02)


def test_rfcv2_default_is_computed_by_the_fit() -> None:
    fit = fit_lognormal(
        RFCV2_SWAPIN_MIN_NS, RFCV2_SWAPIN_MEAN_NS, RFCV2_SWAPIN_MAX_NS, RFCV2_APF_COUNT
    )
    assert fit == RFCV2_SWAPIN_LOGNORMAL
    assert math.isclose(RFCV2_SWAPIN_MEAN_NS, 1.68e6, rel_tol=1e-3)
    assert rfcv2_swapin_time(np.random.default_rng(0)).mean_ns == pytest.approx(
        RFCV2_SWAPIN_MEAN_NS
    )


def test_rfcv2_fit_sample_mean() -> None:
    svc = rfcv2_swapin_time(np.random.default_rng(11))
    draws = np.array([svc.sample() for _ in range(200_000)])
    assert draws.mean() == pytest.approx(1.68e6, rel=0.03)


def test_rfcv2_fit_expected_extremes_of_7555_draws() -> None:
    median_ns, sigma = RFCV2_SWAPIN_LOGNORMAL
    rng = np.random.default_rng(5)
    runs = rng.lognormal(math.log(median_ns), sigma, size=(40, RFCV2_APF_COUNT))
    typical_min = float(np.median(runs.min(axis=1)))
    typical_max = float(np.median(runs.max(axis=1)))
    assert RFCV2_SWAPIN_MIN_NS / 1.6 < typical_min < RFCV2_SWAPIN_MIN_NS * 1.6
    assert RFCV2_SWAPIN_MAX_NS / 1.6 < typical_max < RFCV2_SWAPIN_MAX_NS * 1.6


@settings(max_examples=100)
@given(
    median_ns=st.floats(1e3, 1e8),
    sigma=st.floats(0.05, 3.0),
    n_samples=st.integers(10, 10**6),
)
def test_fit_lognormal_round_trip(median_ns: float, sigma: float, n_samples: int) -> None:
    z = NormalDist().inv_cdf(1 - 1 / (n_samples + 1))
    lo, hi = median_ns * math.exp(-z * sigma), median_ns * math.exp(z * sigma)
    mean = median_ns * math.exp(sigma**2 / 2)
    assume(mean < hi)  # a heavy tail over few samples: the mean can beat the expected max
    fit_median, fit_sigma = fit_lognormal(lo, mean, hi, n_samples)
    assert fit_sigma == pytest.approx(sigma, rel=1e-9)
    assert fit_median == pytest.approx(median_ns, rel=1e-9)


@pytest.mark.parametrize(
    ("lo", "mean", "hi", "n"), [(0, 1, 2, 100), (2, 1, 3, 100), (1, 4, 3, 100), (1, 2, 3, 1)]
)
def test_fit_lognormal_rejects_inconsistent_inputs(
    lo: float, mean: float, hi: float, n: int
) -> None:
    with pytest.raises(ValueError):
        fit_lognormal(lo, mean, hi, n)


def test_lognormal_sampler_is_deterministic_per_stream() -> None:
    a = LognormalServiceTime(1e6, 1.0, RandomStreams(9).stream("swap.read"))
    b = LognormalServiceTime(1e6, 1.0, RandomStreams(9).stream("swap.read"))
    assert [a.sample() for _ in range(5000)] == [b.sample() for _ in range(5000)]


def test_module_example() -> None:
    eng = Engine()
    dev = SwapDevice(eng, ConstantServiceTime(100), ConstantServiceTime(200), queue_depth=1)
    done: list[str] = []
    dev.submit(IoKind.READ, 1, done.append, "a")
    dev.submit(IoKind.READ, 1, done.append, "b")
    eng.run(until=150)
    assert done == ["a"] and dev.queue_length == 1
