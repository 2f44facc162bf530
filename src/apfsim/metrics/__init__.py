"""Accumulators (vCPU time by category, latency samples) and typed results."""

from apfsim.metrics.accumulators import TIME_CATEGORIES, LatencySamples, TimeCategory, VcpuClock
from apfsim.metrics.results import ProtocolResult, RunResult, TaskResult, VcpuResult

__all__ = [
    "TIME_CATEGORIES",
    "LatencySamples",
    "ProtocolResult",
    "RunResult",
    "TaskResult",
    "TimeCategory",
    "VcpuClock",
    "VcpuResult",
]
