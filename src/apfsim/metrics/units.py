"""What a task's ``ops`` count, and how rates are named for a reader.

A compute task's throughput is CPU time (``work_s``); a memory task's is its operations per
simulated second: writes (random writer), pages (memory hog) or accesses (fault loop).
"""

from __future__ import annotations

__all__ = ["OPS_UNITS", "ops_unit", "rate_unit"]

OPS_UNITS = {"random_writer": "writes", "memory_hog": "pages", "fault_loop": "accesses"}
"""Task kind -> what one of its ``ops`` is; compute tasks are not listed (their ops are ns)."""


def ops_unit(kind: str) -> str | None:
    """What ``kind``'s ops count (``writes``, ...), None for compute tasks."""
    return OPS_UNITS.get(kind)


def rate_unit(kind: str) -> str:
    """The unit of ``kind``'s throughput: ``writes/s``, ``pages/s``, ... or ``CPU s/s``."""
    unit = ops_unit(kind)
    return "CPU s/s" if unit is None else f"{unit}/s"
