"""Sweep axes, metrics and axis values as a reader names them, for tables and figures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from apfsim.metrics.units import ops_unit, rate_unit

if TYPE_CHECKING:
    from apfsim.sweep.report.aggregate import SweepAggregate

_AXIS_LABELS = {
    "host.swap.mean_us": "swap mean latency (µs)",
    "host.memory_limit_mib": "host memory limit (MiB)",
    "guest.memory_mib": "guest memory (MiB)",
    "guest.vcpus": "vCPUs",
    "initial_memory.resident_fraction": "initially resident fraction",
    "initial_memory.swapped_fraction": "initially swapped fraction",
}
_UNIT_SUFFIXES = (("_us", "µs"), ("_ms", "ms"), ("_mib", "MiB"), ("_s", "s"), ("_pages", "pages"))


def axis_label(axis: str) -> str:
    """A sweep axis (a scenario key) as a reader names it: ``host.swap.mean_us`` ->
    ``swap mean latency (µs)``; unknown keys lose dots and underscores and gain a unit."""
    if axis in _AXIS_LABELS:
        return _AXIS_LABELS[axis]
    name = axis.split(".", 1)[-1] if "." in axis else axis
    for suffix, unit in _UNIT_SUFFIXES:
        if name.endswith(suffix):
            return f"{name.removesuffix(suffix).replace('.', ' ').replace('_', ' ')} ({unit})"
    return name.replace(".", " ").replace("_", " ")


def metric_label(metric: str) -> str:
    """A stored metric as a reader names it: ``kind.random_writer.ops_rate`` ->
    ``random_writer writes/s``, ``fault_in_latency_us.p50`` -> ``fault-in latency p50 (µs)``."""
    parts = metric.split(".")
    head, last = parts[0], parts[-1]
    name = ".".join(parts[1:-1])
    if head == "kind" and len(parts) >= 3:
        what = {
            "ops_rate": rate_unit(name),
            "work_rate": "CPU s/s" if ops_unit(name) is None else "work rate (CPU s/s)",
            "work_s": "work (s)",
        }.get(last, last.replace("_", " "))
        return f"{name} {what}"
    if head == "task" and len(parts) >= 3:
        what = {
            "ops_rate": "ops/s",
            "work_rate": "throughput (CPU s/s)",
            "work_s": "work (s)",
            "completion_s": "completion time (s)",
            "completion_speedup": "completion speedup",
        }.get(last, last.replace("_", " "))
        return f"task {name} {what}"
    if head == "vcpu_time_s":
        return f"vCPU time in {last} (s)"
    if head == "apf":
        return f"APF counter {last}"
    if head in ("fault_in_latency_us", "not_present_to_ready_us"):
        what = "fault-in latency" if head.startswith("fault") else "not-present to ready"
        return f"{what} {last} (µs)"
    if metric == "faults.per_s":
        return "stage-2 faults/s"
    if metric == "sim_time_s":
        return "simulated time (s)"
    return metric.replace("_", " ")


def ratio_label(metric: str, baseline: str) -> str:
    """The label of a metric's paired ratio: ``random_writer writes/s, ratio to sync``."""
    return f"{metric_label(metric)}, ratio to {baseline}"


def sweep_context(agg: SweepAggregate) -> str:
    """Scenario, seeds and duration: the footer that keeps a pasted figure's context."""
    info = agg.info
    seeds = ", ".join(map(str, info.seeds))
    duration = info.spec.get("duration_s")
    sim = "" if duration is None else f" · {duration:g} s simulated per run"
    return (
        f"apfsim sweep {info.name} · scenario {info.spec.get('scenario', '?')} · seeds "
        f"{seeds} (n = {len(info.seeds)}){sim}"
    )


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def point_label(axes: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{a}={format_value(v)}" for a, v in zip(axes, values, strict=True))
