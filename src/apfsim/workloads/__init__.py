"""Guest workloads: compute, random writer (Natapov's bm), sequential memory hog (the seed's)."""

from apfsim.workloads.base import AccessMode, Plan, StopKind, Workload
from apfsim.workloads.tasks import ComputeTask, FaultLoopTask, MemoryHogTask, RandomWriterTask

__all__ = [
    "AccessMode",
    "ComputeTask",
    "FaultLoopTask",
    "MemoryHogTask",
    "Plan",
    "RandomWriterTask",
    "StopKind",
    "Workload",
]
