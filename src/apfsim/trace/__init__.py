"""Tracing: a Perfetto/Chrome timeline and kernel-format text traces of a run, and
``trace-stats`` over text traces (ours or from a real host)."""

from apfsim.trace.recorder import TraceOptions, TraceOptionsError, TraceRecorder
from apfsim.trace.stats import TraceStats, read_trace

__all__ = ["TraceOptions", "TraceOptionsError", "TraceRecorder", "TraceStats", "read_trace"]
