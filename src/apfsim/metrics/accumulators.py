"""Time-weighted accumulators updated only on state changes (never per access)."""

from __future__ import annotations

from dataclasses import fields
from enum import IntEnum
from typing import Any

import numpy as np
from mypy_extensions import mypyc_attr

__all__ = ["TIME_CATEGORIES", "LatencySamples", "TimeCategory", "VcpuClock", "counter_dict"]


def counter_dict(counters: Any) -> dict[str, int]:
    """A dataclass of int counters as a plain dict, in field order."""
    return {f.name: getattr(counters, f.name) for f in fields(counters)}


class TimeCategory(IntEnum):
    """What a vCPU's wall time was spent on."""

    TASK = 0  # guest running a task (user or kernel on its behalf)
    GUEST_KERNEL = 1  # guest exception/IRQ handlers, APF driver, context switches
    IDLE = 2  # guest idle: vCPU blocked in WFI
    APF_HALT = 3  # halted waiting for a page (the seed's WFI wait)
    SYNC_FAULT = 4  # vCPU thread blocked in a synchronous fault-in
    HOST = 5  # host overhead: exits, entries, stage-2 fault handling, repeated-fault spins


TIME_CATEGORIES = [c.name.lower() for c in TimeCategory]


# Subclassed by interpreted code (tracing, tests) in the compiled build.
@mypyc_attr(allow_interpreted_subclasses=True)
class VcpuClock:
    """Per-vCPU time by category; ``switch`` closes the running interval."""

    __slots__ = ("category", "since", "totals")

    def __init__(self) -> None:
        # NOTE: Python ints, not a numpy array, for performance (a numpy element add per switch).
        self.totals: list[int] = [0] * len(TimeCategory)
        self.category = TimeCategory.HOST
        self.since = 0

    def switch(self, category: TimeCategory, now: int) -> None:
        self.totals[self.category] += now - self.since
        self.category = category
        self.since = now

    def close(self, now: int) -> None:
        self.switch(self.category, now)


_NARROW = np.dtype(np.int32)
_NARROW_MIN, _NARROW_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


class LatencySamples:
    """A growable buffer of nanosecond samples (no Python list of ints): int32 while every
    sample fits (2.1 s), widened to int64 by the first that does not. The percentiles are
    exact, so the samples are kept: 4 B per fault, not 8, is what a long run grows by."""

    __slots__ = ("_buf", "_n")

    def __init__(self, capacity: int = 1024) -> None:
        self._buf: np.ndarray = np.empty(capacity, dtype=np.int32)
        self._n = 0

    def add(self, value_ns: int) -> None:
        buf = self._buf
        if self._n == len(buf):
            # x1.5: less slack than doubling at the same amortised cost per sample.
            buf = self._buf = np.concatenate([buf, np.empty(len(buf) // 2 + 1, dtype=buf.dtype)])
        if not _NARROW_MIN <= value_ns <= _NARROW_MAX and buf.dtype == _NARROW:
            buf = self._buf = buf.astype(np.int64)
        buf[self._n] = value_ns
        self._n += 1

    def __len__(self) -> int:
        return self._n

    @property
    def values(self) -> np.ndarray:
        return self._buf[: self._n]

    def summary_us(self) -> dict[str, object]:
        """Count, p50, p99 and the CDF as 21 quantiles (0, 5, ..., 100 %), in µs."""
        if self._n == 0:
            return {"count": 0, "p50": None, "p99": None, "cdf_us": []}
        qs = np.percentile(self.values, np.arange(0, 101, 5)) / 1000.0
        cdf = [round(float(v), 3) for v in qs]
        return {"count": self._n, "p50": cdf[10], "p99": self.percentile_us(99), "cdf_us": cdf}

    def percentile_us(self, q: float) -> float | None:
        if self._n == 0:
            return None
        return round(float(np.percentile(self.values, q)) / 1000.0, 3)
