"""Backing store behind guest memory: the interface, service-time samplers and a swap device.

The async PF worker's ``get_user_pages`` ends in a swap-in when the page is only in swap;
what the guest waits for is that read's latency, queueing included. A :class:`SwapDevice`
models the block device as ``queue_depth`` parallel servers with one FIFO queue. A
readahead cluster is one request, as ``swap_cluster_readahead`` submits it under one plug.

Example::

    eng = Engine()
    dev = SwapDevice(eng, ConstantServiceTime(100), ConstantServiceTime(200), queue_depth=1)
    done: list[str] = []
    dev.submit(IoKind.READ, 1, done.append, "a")
    dev.submit(IoKind.READ, 1, done.append, "b")
    eng.run(until=150)
    assert done == ["a"] and dev.queue_length == 1
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from enum import Enum
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from apfsim.engine import Engine

__all__ = [
    "RFCV2_APF_COUNT",
    "RFCV2_SWAPIN_LOGNORMAL",
    "RFCV2_SWAPIN_MAX_NS",
    "RFCV2_SWAPIN_MEAN_NS",
    "RFCV2_SWAPIN_MIN_NS",
    "BackingStore",
    "ConstantServiceTime",
    "ExponentialServiceTime",
    "IoKind",
    "LognormalServiceTime",
    "ServiceTime",
    "SwapDevice",
    "fit_lognormal",
    "rfcv2_swapin_time",
]

# Gavin Shan, "[PATCH RFCv2 0/9] kvm/arm64: Support Async Page Fault" (2020-05-08), host
# instrumentation with APF on (published-results.md §3): ThunderX2, SAS-3 disk.
RFCV2_APF_COUNT = 7555
RFCV2_SWAPIN_MIN_NS = 36.2e3
RFCV2_SWAPIN_MAX_NS = 55.7e6
RFCV2_SWAPIN_MEAN_NS = 12.7e9 / RFCV2_APF_COUNT  # total swap-in time / APFs = 1.68 ms

# NOTE: samplers draw this many values per numpy call and hand them out one by one,
# for performance (one numpy call costs about as much as a thousand list lookups).
_BATCH = 4096
_MAX_SERVICE_NS = float(1 << 62)


class IoKind(Enum):
    """Direction of a backing-store request."""

    READ = "read"
    WRITE = "write"


class BackingStore(Protocol):
    """Where evicted guest pages live: a swap device today, a postcopy source later."""

    def submit(self, kind: IoKind, npages: int, on_done: Callable[[Any], object], arg: Any) -> None:
        """Queue a request for ``npages`` contiguous pages; ``on_done(arg)`` runs when it ends."""
        ...


# ---------------------------------------------------------------------- service times


class ServiceTime(ABC):
    """A sampler of service times in integer nanoseconds with an analytic ``mean_ns``."""

    __slots__ = ()

    @property
    @abstractmethod
    def mean_ns(self) -> float:
        """The distribution's mean, before rounding to integer ns."""

    @abstractmethod
    def sample(self) -> int:
        """One service time, >= 0 ns."""


class ConstantServiceTime(ServiceTime):
    """Every request takes exactly ``ns``: for tests and idealised devices."""

    __slots__ = ("_ns",)

    def __init__(self, ns: int) -> None:
        if ns < 0:
            raise ValueError(f"ns={ns} must be >= 0")
        self._ns = int(ns)

    @property
    def mean_ns(self) -> float:
        return float(self._ns)

    def sample(self) -> int:
        return self._ns


class _BatchedServiceTime(ServiceTime):
    """Base for random samplers: refills a list of ints from one vectorised draw."""

    __slots__ = ("_buf", "_pos", "_rng")

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._buf: list[int] = []
        self._pos = 0

    @abstractmethod
    def _draw(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` real-valued draws in ns."""

    def sample(self) -> int:
        pos = self._pos
        if pos == len(self._buf):
            # NOTE: a list of Python ints, not an array, for performance: indexing it is
            # cheaper than extracting numpy scalars and already yields an int.
            # Clipped at 2**62 ns (146 years): a heavy tail's rare huge draw stays an int64.
            draws = np.minimum(self._draw(_BATCH), _MAX_SERVICE_NS)
            self._buf = np.rint(draws).astype(np.int64).tolist()
            pos = 0
        self._pos = pos + 1
        return self._buf[pos]


class LognormalServiceTime(_BatchedServiceTime):
    """Lognormal service times: ``exp(N(ln median_ns, sigma**2))``, a heavy right tail."""

    __slots__ = ("median_ns", "sigma")

    def __init__(self, median_ns: float, sigma: float, rng: np.random.Generator) -> None:
        if median_ns <= 0 or sigma < 0:
            raise ValueError(f"median_ns={median_ns} must be > 0 and sigma={sigma} >= 0")
        super().__init__(rng)
        self.median_ns = float(median_ns)
        self.sigma = float(sigma)

    @property
    def mean_ns(self) -> float:
        return self.median_ns * math.exp(self.sigma**2 / 2)

    def _draw(self, n: int) -> npt.NDArray[np.float64]:
        return self._rng.lognormal(math.log(self.median_ns), self.sigma, n)


class ExponentialServiceTime(_BatchedServiceTime):
    """Exponential service times (memoryless): gives M/M/c queues for validation."""

    __slots__ = ("_mean_ns",)

    def __init__(self, mean_ns: float, rng: np.random.Generator) -> None:
        if mean_ns <= 0:
            raise ValueError(f"mean_ns={mean_ns} must be > 0")
        super().__init__(rng)
        self._mean_ns = float(mean_ns)

    @property
    def mean_ns(self) -> float:
        return self._mean_ns

    def _draw(self, n: int) -> npt.NDArray[np.float64]:
        return self._rng.exponential(self._mean_ns, n)


def fit_lognormal(
    min_ns: float, mean_ns: float, max_ns: float, n_samples: int
) -> tuple[float, float]:
    """``(median_ns, sigma)`` of a lognormal matching an observed min, mean and max.

    Derived from the RFCv2 host instrumentation (7555 APFs, min 36.2 us, mean 1.68 ms =
    12.7 s / 7555, max 55.7 ms; published-results.md §3). The mean is matched exactly;
    ``sigma`` comes from the max/min ratio, taking the extremes of ``n_samples`` normal
    draws to sit at their expected order statistics ``±z``: ``ln(max/min) = 2 z sigma``
    with ``z = NormalDist().inv_cdf(1 - 1/(n_samples + 1))``.
    """
    if not 0 < min_ns < mean_ns < max_ns:
        raise ValueError(f"need 0 < min_ns={min_ns} < mean_ns={mean_ns} < max_ns={max_ns}")
    if n_samples < 2:
        raise ValueError(f"n_samples={n_samples} must be >= 2")
    z = NormalDist().inv_cdf(1 - 1 / (n_samples + 1))
    sigma = math.log(max_ns / min_ns) / (2 * z)
    median_ns = mean_ns / math.exp(sigma**2 / 2)
    return median_ns, sigma


RFCV2_SWAPIN_LOGNORMAL: tuple[float, float] = fit_lognormal(
    RFCV2_SWAPIN_MIN_NS, RFCV2_SWAPIN_MEAN_NS, RFCV2_SWAPIN_MAX_NS, RFCV2_APF_COUNT
)
"""``(median_ns, sigma)`` fitted to the RFCv2 swap-in latencies (about 1.01 ms, 1.0)."""


def rfcv2_swapin_time(rng: np.random.Generator) -> LognormalServiceTime:
    """The default swap-in service time: the RFCv2 fit (mean 1.68 ms)."""
    median_ns, sigma = RFCV2_SWAPIN_LOGNORMAL
    return LognormalServiceTime(median_ns, sigma, rng)


# ---------------------------------------------------------------------- swap device

# A request in the device: (kind, npages, on_done, arg, submit_ns).
# NOTE: a tuple, not a dataclass, for performance (one per I/O).
_Request = tuple[IoKind, int, Callable[[Any], object], Any, int]


class SwapDevice(BackingStore):
    """A block device with ``queue_depth`` requests in service at once and a FIFO queue.

    Service time = one draw for the request's kind + ``transfer_ns_per_page`` per page after
    the first. When a request completes, its slot goes to the oldest waiting request and
    then ``on_done(arg)`` runs, so a request submitted from ``on_done`` cannot overtake the
    queue. ``reads``/``writes``/``pages_*`` count completed requests.
    """

    __slots__ = (
        "_area",
        "_busy_ns",
        "_engine",
        "_in_service",
        "_last_ns",
        "_lat",
        "_n_lat",
        "_start_ns",
        "_waiting",
        "max_queue_length",
        "on_queue_change",
        "pages_read",
        "pages_written",
        "queue_depth",
        "read_time",
        "reads",
        "transfer_ns_per_page",
        "write_time",
        "writes",
    )

    def __init__(
        self,
        engine: Engine,
        read_time: ServiceTime,
        write_time: ServiceTime,
        queue_depth: int,
        transfer_ns_per_page: int = 0,
    ) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth={queue_depth} must be >= 1")
        if transfer_ns_per_page < 0:
            raise ValueError(f"transfer_ns_per_page={transfer_ns_per_page} must be >= 0")
        self._engine = engine
        self.read_time = read_time
        self.write_time = write_time
        self.queue_depth = queue_depth
        self.transfer_ns_per_page = transfer_ns_per_page
        self._in_service = 0
        self._waiting: deque[_Request] = deque()
        self.on_queue_change: Callable[[int, int], None] | None = None
        self.reads = 0
        self.writes = 0
        self.pages_read = 0
        self.pages_written = 0
        self.max_queue_length = 0
        self._start_ns = engine.now
        self._last_ns = engine.now
        self._area = 0  # integral of queue length over time, in request-ns
        self._busy_ns = 0  # time with at least one request in service
        self._lat = np.empty(1024, dtype=np.int64)
        self._n_lat = 0

    # ------------------------------------------------------------------ requests

    def submit(self, kind: IoKind, npages: int, on_done: Callable[[Any], object], arg: Any) -> None:
        """Queue a request; it starts at once if fewer than ``queue_depth`` are in service."""
        if npages < 1:
            raise ValueError(f"npages={npages} must be >= 1")
        now = self._engine.now
        self._account(now)
        req: _Request = (kind, npages, on_done, arg, now)
        if self._in_service < self.queue_depth:
            self._start(req)
        else:
            self._waiting.append(req)
        depth = self._in_service + len(self._waiting)
        if depth > self.max_queue_length:
            self.max_queue_length = depth
        if self.on_queue_change is not None:
            self.on_queue_change(now, depth)

    def _start(self, req: _Request) -> None:
        kind, npages = req[0], req[1]
        sampler = self.read_time if kind is IoKind.READ else self.write_time
        service = sampler.sample() + self.transfer_ns_per_page * (npages - 1)
        self._in_service += 1
        self._engine.after(service, self._complete, req)

    def _complete(self, req: _Request) -> None:
        kind, npages, on_done, arg, submit_ns = req
        now = self._engine.now
        self._account(now)
        self._in_service -= 1
        if self._waiting:
            self._start(self._waiting.popleft())
        if kind is IoKind.READ:
            self.reads += 1
            self.pages_read += npages
            self._record_latency(now - submit_ns)
        else:
            self.writes += 1
            self.pages_written += npages
        if self.on_queue_change is not None:
            self.on_queue_change(now, self._in_service + len(self._waiting))
        on_done(arg)

    # ------------------------------------------------------------------ statistics

    def _account(self, now: int) -> None:
        """Advance the time integrals of queue length and busy time to ``now``."""
        dt = now - self._last_ns
        if dt:
            if self._in_service:
                self._busy_ns += dt
                self._area += dt * (self._in_service + len(self._waiting))
            self._last_ns = now

    def _record_latency(self, ns: int) -> None:
        if self._n_lat == len(self._lat):
            grown = np.empty(2 * len(self._lat), dtype=np.int64)
            grown[: self._n_lat] = self._lat
            self._lat = grown
        self._lat[self._n_lat] = ns
        self._n_lat += 1

    @property
    def queue_length(self) -> int:
        """Requests in the device now (in service + waiting)."""
        return self._in_service + len(self._waiting)

    @property
    def in_service(self) -> int:
        return self._in_service

    @property
    def read_latencies_ns(self) -> npt.NDArray[np.int64]:
        """Submit-to-completion time of every completed read, in completion order (a view)."""
        return self._lat[: self._n_lat]

    def busy_ns(self) -> int:
        """Time so far with at least one request in service."""
        self._account(self._engine.now)
        return self._busy_ns

    def mean_queue_length(self) -> float:
        """Time-average of requests in the device (in service + waiting) since creation."""
        self._account(self._engine.now)
        elapsed = self._engine.now - self._start_ns
        return self._area / elapsed if elapsed else 0.0

    def mean_busy_queue_length(self) -> float:
        """Time-average of requests in the device over the time it was busy."""
        self._account(self._engine.now)
        return self._area / self._busy_ns if self._busy_ns else 0.0

    def utilisation(self) -> float:
        """Fraction of time since creation with at least one request in service."""
        elapsed = self._engine.now - self._start_ns
        return self.busy_ns() / elapsed if elapsed else 0.0
