"""The figures summarised per run: what ``compare`` estimates over seeds and a sweep stores
with each run (docs/compare.md, docs/sweep.md). Metric names are dotted keys:
``task.NAME.work_s``, ``kind.KIND.work_rate``, ``vcpu_time_s.STATE``, ``apf.COUNTER``,
``fault_in_latency_us.p50``, ``faults.per_s``, with ``host.cpus``
``host_cpu.run_delay_s``, and with postcopy ``postcopy.request_latency_us.p50`` / ``.p99``,
``postcopy.pages_requested`` and ``postcopy.migration_time_s``.
"""

from __future__ import annotations

import math

from apfsim.metrics.results import ProtocolResult, TaskResult
from apfsim.metrics.units import ops_unit

__all__ = ["APF_COUNTERS", "kinds", "ops_rates", "run_metrics", "stored_metrics", "work_rates"]

APF_COUNTERS = ("not_present_injected", "page_ready_injected", "sync_fallbacks")
"""The APF counters every run summarises (a protocol without one leaves it out)."""


def kinds(result: ProtocolResult) -> dict[str, list[TaskResult]]:
    out: dict[str, list[TaskResult]] = {}
    for t in result.tasks:
        out.setdefault(t.kind, []).append(t)
    return out


def run_metrics(result: ProtocolResult) -> dict[str, float | None]:
    """The summarised metrics of one run (a counter the protocol lacks is left out)."""
    m: dict[str, float | None] = {}
    for t in result.tasks:
        m[f"task.{t.name}.work_s"] = t.work_s
        m[f"task.{t.name}.completion_s"] = t.completion_s
    for kind, tasks in kinds(result).items():
        m[f"kind.{kind}.work_s"] = math.fsum(t.work_s for t in tasks)
    for cat in result.vcpus[0].time_s:
        m[f"vcpu_time_s.{cat}"] = math.fsum(v.time_s[cat] for v in result.vcpus)
    for key in APF_COUNTERS:
        if key in result.apf:
            m[f"apf.{key}"] = float(result.apf[key])
    for q in ("p50", "p99"):
        m[f"fault_in_latency_us.{q}"] = result.faults["fault_in_latency_us"][q]
    m.update(ops_rates(result))
    sim = result.sim_time_s
    f = result.faults
    m["faults.per_s"] = (f["zero_fill"] + f["minor"] + f["needs_io"]) / sim if sim > 0 else None
    if result.host_cpu is not None:  # only with host.cpus: the stored metrics stay as before
        m["host_cpu.run_delay_s"] = float(result.host_cpu["run_delay_s"])
    pc = result.postcopy
    if pc is not None:  # only with postcopy, likewise
        for q in ("p50", "p99"):
            m[f"postcopy.request_latency_us.{q}"] = pc["request_latency_us"][q]
        m["postcopy.pages_requested"] = float(pc["pages_requested"])
        m["postcopy.migration_time_s"] = pc["migration_time_s"]
    return m


def ops_rates(result: ProtocolResult) -> dict[str, float | None]:
    """Memory tasks' operations (writes, pages, accesses) per simulated second."""
    sim = result.sim_time_s
    m: dict[str, float | None] = {}
    for t in result.tasks:
        if ops_unit(t.kind) is not None:
            m[f"task.{t.name}.ops_rate"] = t.ops / sim if sim > 0 else None
    for kind, tasks in kinds(result).items():
        if ops_unit(kind) is not None:
            m[f"kind.{kind}.ops_rate"] = sum(t.ops for t in tasks) / sim if sim > 0 else None
    return m


def work_rates(result: ProtocolResult) -> dict[str, float | None]:
    """Work per simulated second (runs that stop early are compared fairly)."""
    sim = result.sim_time_s
    m: dict[str, float | None] = {}
    for t in result.tasks:
        m[f"task.{t.name}.work_rate"] = t.work_s / sim if sim > 0 else None
    for kind, tasks in kinds(result).items():
        m[f"kind.{kind}.work_rate"] = math.fsum(t.work_s for t in tasks) / sim if sim else None
    return m


def stored_metrics(result: ProtocolResult) -> dict[str, float | None]:
    """The metrics a sweep stores with each run: the per-run metrics, the work rates and
    the simulated time."""
    metrics = run_metrics(result)
    metrics.update(work_rates(result))
    metrics["sim_time_s"] = result.sim_time_s
    return metrics
