"""A finished run's state, turned into typed results (the JSON of docs/results-schema.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from apfsim.guest.sched import Task
from apfsim.host.backing import SwapDevice
from apfsim.host.memory import GuestMemory
from apfsim.host.postcopy import PostcopyDestination
from apfsim.host.sched import HostSched
from apfsim.metrics.accumulators import TIME_CATEGORIES, VcpuClock
from apfsim.metrics.results import ProtocolResult, TaskResult, VcpuResult
from apfsim.metrics.units import ops_unit
from apfsim.ports import RunCounters, SyncCause
from apfsim.workloads.base import Workload

__all__ = ["TRACEPOINT_COUNTS", "collect"]

TRACEPOINT_COUNTS = (
    "kvm_try_async_get_page",
    "kvm_async_pf_not_present",
    "kvm_async_pf_ready",
    "kvm_async_pf_completed",
    "kvm_async_pf_repeated_fault",
    "wake_all",
)
"""What the kernel's APF tracepoints would count (``include/trace/events/kvm.h``), and the
wake-all items among the page-ready ones."""


def collect(
    protocol: str,
    now: int,
    wall_s: float,
    events: int,
    tasks: Sequence[Task],
    workloads: Sequence[Workload],
    kinds: Sequence[str],
    clocks: Sequence[VcpuClock],
    apf: dict[str, int],
    counters: RunCounters,
    memory: GuestMemory,
    device: SwapDevice,
    reporting: dict[str, int] | None = None,
    sched: HostSched | None = None,
    host_costs: Mapping[str, int | str] | None = None,
    postcopy: dict[str, Any] | None = None,
) -> ProtocolResult:
    """The results of a run stopped at ``now``; ``apf`` holds the protocol's own counters;
    ``reporting`` the free page reporting figures, when the guest reports (added to
    ``memory``); ``sched`` is the host CPUs' scheduler (None: host CPUs not modelled);
    ``host_costs`` the run's resolved exit and operation costs (apfsim.host.costs)."""
    sim_s = now / 1e9
    task_results = [
        TaskResult(
            name=task.name,
            kind=kind,
            cpu=task.cpu,
            work_s=round(workload.work_ns / 1e9, 9),
            ops=workload.ops,
            completion_s=None if task.completion_ns is None else round(task.completion_ns / 1e9, 9),
            state=task.state.value,
            ops_unit=ops_unit(kind),
            ops_per_s=(
                None if ops_unit(kind) is None or sim_s <= 0 else round(workload.ops / sim_s, 6)
            ),
        )
        for task, workload, kind in zip(tasks, workloads, kinds, strict=True)
    ]
    vcpus = []
    for index, clock in enumerate(clocks):
        clock.close(now)
        times = {
            name: round(int(ns) / 1e9, 9)
            for name, ns in zip(TIME_CATEGORIES, clock.totals, strict=True)
        }
        run_delay = None
        if sched is not None:
            run_delay = round(sched.vcpu_threads[index].run_delay_at(now) / 1e9, 9)
        vcpus.append(VcpuResult(index, times, run_delay))
    apf = dict(apf)
    apf["apf_sleeps"] = counters.apf_sleeps
    apf["guest_bogus_aborts"] = counters.guest_bogus_aborts
    for cause in SyncCause:
        apf[f"sync_fallback_{cause.value}"] = counters.sync_causes[cause]
    syncs = sum(counters.sync_causes.values())
    apf["sync_fallbacks"] = syncs
    faults: dict[str, Any] = {
        "zero_fill": counters.zero_fill,
        "minor": counters.minor,
        "needs_io": counters.needs_io,
        "async": counters.async_faults,
        "sync": syncs,
        "repeated": counters.repeated_spins,
        "per_s": (
            round((counters.zero_fill + counters.minor + counters.needs_io) / sim_s, 6)
            if sim_s > 0
            else 0.0
        ),
        "fault_in_latency_us": counters.fault_latency.summary_us(),
        "not_present_to_ready_us": counters.ready_latency.summary_us(),
    }
    mem: dict[str, Any] = {
        "resident_pages": int(memory.resident),
        "limit_pages": int(memory.limit_pages),
        "pages_evicted": int(memory.pages_evicted),
        "pages_written": int(memory.pages_written),
        "swap_reads": int(device.reads),
        "swap_writes": int(device.writes),
        "swap_mean_queue": round(float(device.mean_queue_length()), 6),
        "context_switches": counters.context_switches,
        "ipis": counters.ipis,
    }
    if reporting is not None:
        mem.update(reporting)
    tracepoints = {name: getattr(counters, name) for name in TRACEPOINT_COUNTS}
    host_cpu: dict[str, Any] | None = None
    if sched is not None:
        host_cpu = {
            "cpus": sched.cpus,
            "run_delay_s": round(sum(t.run_delay_at(now) for t in sched.vcpu_threads) / 1e9, 9),
            "preemptions": sched.preemptions,
            "kworkers": sched.kworkers,
            "kworker_run_delay_s": round(sched.kworker_run_delay / 1e9, 9),
            "kworker_cpu_s": round(sched.kworker_cpu_ns / 1e9, 9),
        }
    return ProtocolResult(
        protocol=protocol,
        sim_time_s=round(now / 1e9, 9),
        wall_time_s=wall_s,
        events=events,
        tasks=task_results,
        vcpus=vcpus,
        apf=apf,
        faults=faults,
        memory=mem,
        tracepoints=tracepoints,
        host_cpu=host_cpu,
        host_costs=dict(host_costs or {}),
        postcopy=postcopy,
    )


def postcopy_results(
    dest: PostcopyDestination,
    now: int,
    downtime_ns: int,
    work_samples: Sequence[int],
    sample_ns: int,
    precopy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Postcopy's figures: the migration's times and traffic, request -> placed latency
    (count, p50, p99 and its CDF), and the guest's work rate (work-seconds per second,
    summed over tasks) in each sample interval. With ``precopy`` (its results) the run
    started at the migration's start, not at the switch-over."""
    st = dest.stats
    left = int(np.count_nonzero((dest.placed_ns < 0) | (dest.placed_ns > now)))
    done = left == 0
    prev, rates = 0, []
    for w in work_samples:
        rates.append(round((w - prev) / sample_ns, 6))
        prev = w
    out: dict[str, Any] = {
        "page_size_kib": dest.params.host_page_pages * 4,
        "preempt": dest.params.preempt,
        "source": dest.params.source,
        "downtime_ms": round(downtime_ns / 1e6, 6),
        "migration_time_s": (
            round(((0 if precopy is not None else downtime_ns) + st.last_placed_ns) / 1e9, 9)
            if done
            else None
        ),
        "host_pages": dest.n_host,
        "host_pages_left": left,
        "pages_requested": st.pages_requested,
        "pages_background": st.pages_background,
        "zero_pages": st.zero_pages,
        "faults_blocked": st.faults_blocked,
        "user_fetches": st.user_fetches,
        "messages_read": st.messages_read,
        "requests_sent": st.requests_sent,
        "requests_skipped": st.requests_skipped,
        "requests_received": st.requests_received,
        "wake_walks": st.wake_walks,
        "entries_walked": st.entries_walked,
        "bytes_main": st.bytes_main,
        "bytes_preempt": st.bytes_preempt,
        "request_latency_us": dest.latency.summary_us(),
        "work_sample_s": sample_ns / 1e9,
        "work_rate": rates,
    }
    if precopy is not None:
        out["precopy"] = precopy
    return out
