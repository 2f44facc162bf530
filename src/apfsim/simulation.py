"""One VM on one host under one protocol: builds the world and runs it.

The :class:`Simulation` owns the engine, the host's view of guest memory, the swap device,
the async workers (kworkers) and the per-vCPU threads, and implements the guest kernel
port the protocol's guest driver calls (``current``, wake-ups, IPIs, allocation, SMCCC).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from apfsim.check.invariants import INVARIANTS, Broken, check_guest, check_vcpu
from apfsim.engine import Engine, RandomStreams
from apfsim.guest.context import Contexts
from apfsim.guest.cpu import GuestCpu
from apfsim.guest.sched import CfsParams, Task, TaskState
from apfsim.host.async_pf import AsyncPf
from apfsim.host.backing import (
    ConstantServiceTime,
    ExponentialServiceTime,
    IoKind,
    LognormalServiceTime,
    ServiceTime,
    SwapDevice,
    fit_lognormal,
)
from apfsim.host.memory import GuestMemory, PageState, Reclaimed
from apfsim.host.vcpu import Vcpu
from apfsim.metrics.accumulators import TIME_CATEGORIES, LatencySamples
from apfsim.metrics.results import ProtocolResult, TaskResult, VcpuResult
from apfsim.protocols import GuestCalls, HostPorts, ProtocolOptions, build_protocol
from apfsim.protocols.base import GuestCallKind, SyncCause
from apfsim.scenario import (
    MIB_PAGES,
    ComputeSpec,
    FaultLoopSpec,
    MemoryHogSpec,
    RandomWriterSpec,
    Scenario,
)
from apfsim.trace.formats import APF_EVENTS
from apfsim.trace.hooks import TracedVcpu
from apfsim.trace.recorder import TraceOptions, TraceRecorder
from apfsim.workloads.base import AccessMode, Workload
from apfsim.workloads.tasks import ComputeTask, FaultLoopTask, MemoryHogTask, RandomWriterTask

__all__ = ["Simulation"]


_MAPPED = int(PageState.MAPPED)
_SWAPPED = int(PageState.SWAPPED)
_SWAPCACHE = int(PageState.SWAPCACHE)
_IN_IO = int(PageState.IN_IO)

R = TypeVar("R")
ProgressFn = Callable[[float], None]


def _service_time(cfg: Any, rng: np.random.Generator, scale: float) -> ServiceTime:
    mean_ns = cfg.mean_us * 1000.0 * scale
    if cfg.distribution == "constant":
        return ConstantServiceTime(round(mean_ns))
    if cfg.distribution == "exponential":
        return ExponentialServiceTime(mean_ns, rng)
    median, sigma = fit_lognormal(
        cfg.min_us * 1000.0, cfg.mean_us * 1000.0, cfg.max_us * 1000.0, cfg.fit_samples
    )
    return LognormalServiceTime(median * scale, sigma, rng)


RECENT_EVENTS = 16
TRACEPOINT_COUNTS = (*APF_EVENTS, "wake_all")


class InvariantViolation(RuntimeError):
    """A protocol invariant broke during a run; the message is the full report.

    ``partial`` holds the results of the protocols that finished before it (api.run)."""

    partial: Any = None


class Simulation(GuestCalls):
    """Run ``scenario`` under ``protocol`` with ``seed``; see :meth:`run`."""

    def __init__(
        self,
        scenario: Scenario,
        protocol: str,
        seed: int,
        check: bool = True,
        trace: TraceOptions | None = None,
    ) -> None:
        self.scenario = scenario
        self.protocol = protocol
        self.seed = seed
        self.check = check  # protocol invariants at every transition (apfsim.check)
        self.recent: deque[tuple[int, int, str, int]] = deque(maxlen=RECENT_EVENTS)
        self._apf_changed = [True] * scenario.guest.vcpus
        self.engine = Engine()
        self.streams = RandomStreams(seed)
        g, h = scenario.guest, scenario.host
        n_pages = g.memory_mib * MIB_PAGES
        self.memory = GuestMemory(
            n_pages, h.memory_limit_mib * MIB_PAGES, h.page_cluster, h.reclaim_batch
        )
        im = scenario.initial_memory
        self.memory.initialise(
            self.streams.stream("initial-memory"), im.resident_fraction, im.swapped_fraction
        )
        swap = h.swap
        self.device = SwapDevice(
            self.engine,
            _service_time(swap, self.streams.stream("swap-read"), 1.0),
            _service_time(swap, self.streams.stream("swap-write"), swap.write_mean_scale),
            swap.queue_depth,
            swap.transfer_ns_per_page,
        )
        self.contexts = Contexts(g.vector_pc_offset, g.kernel_entry_pc_offset)
        self.stats: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.sync_causes: Counter[str] = Counter()
        self.tracepoints: Counter[str] = Counter()  # what the kernel's APF tracepoints count
        self.fault_latency = LatencySamples()  # fault-in I/O: sync stall or worker GUP
        self.ready_latency = LatencySamples()  # not-present injected -> page-ready delivered
        self._io_waiters: dict[int, list[tuple[Callable[[Any], object], Any]]] = {}
        self._alloc_rng = self.streams.stream("guest-kzalloc")
        self._running_cpu = -1
        self._started = False
        self._ipi_send_ns = h.costs.ipi_send_ns
        self._call_ns = {
            GuestCallKind.HYPERCALL: h.costs.hypercall_ns,
            GuestCallKind.ACK: h.costs.ack_exit_ns,
            GuestCallKind.SDEI_COMPLETE: h.costs.hypercall_ns + h.costs.sdei_complete_ns,
        }
        options = ProtocolOptions(
            no_kvmapf=g.no_kvmapf,
            send_always=g.send_always,
            no_fault_inst_range=h.no_fault_inst_range,
            guest_handler_offsets_max=g.handler_offsets_max,
            preempt_count_config=g.preempt_count_config,
        )
        ports = HostPorts(
            self._prefault, self.kick_vcpu, self.submit_swapin, self.start_worker, self._now
        )
        self.host_protocol, self.guest_protocol = build_protocol(
            protocol, g.vcpus, self, ports, options
        )
        cfs = CfsParams(
            g.sched.latency_ns,
            g.sched.min_granularity_ns,
            g.sched.wakeup_granularity_ns,
            g.sched.gentle_fair_sleepers,
            g.sched.wakeup_preemption,
        ).scaled(g.vcpus)
        vcpu_class = TracedVcpu if trace is not None and trace.enabled else Vcpu
        self.vcpus = [vcpu_class(i, self) for i in range(g.vcpus)]
        self.cpus = [GuestCpu(i, self, v, cfs) for i, v in enumerate(self.vcpus)]
        for v, c in zip(self.vcpus, self.cpus, strict=True):
            v.guest = c
        self.tasks: list[Task] = []
        self.workloads: list[Workload] = []
        self._task_kinds: list[str] = []
        self._build_tasks()
        self._unfinished = sum(1 for w in self.workloads if _is_finite(w))
        self._tick_ns = 1_000_000_000 // g.hz
        self._host_tick_ns = 1_000_000_000 // h.tick_hz if h.tick_hz else 0
        self.tracer: TraceRecorder | None = None
        if trace is not None and trace.enabled:
            self.tracer = TraceRecorder(self, trace)
            self.tracer.install()
            for vcpu, cpu in zip(self.vcpus, self.cpus, strict=True):
                vcpu.tracer = cpu.tracer = self.tracer

    # -- construction -------------------------------------------------------------------------
    def _build_tasks(self) -> None:
        g = self.scenario.guest
        next_gfn = g.reserved_mib * MIB_PAGES
        fixed = sum(t.claimed_mib() for t in self.scenario.tasks)
        free_pages = (g.memory_mib - g.reserved_mib - fixed) * MIB_PAGES
        rr = 0
        costs = g.costs
        for spec in self.scenario.tasks:
            if isinstance(spec, RandomWriterSpec):
                first, n = next_gfn, spec.buffer_mib * MIB_PAGES
                next_gfn += n
            elif isinstance(spec, MemoryHogSpec):
                n = spec.memory_mib * MIB_PAGES if spec.memory_mib else free_pages
                first = next_gfn
                next_gfn += n
            for i in range(spec.count):
                name = spec.name if spec.count == 1 else f"{spec.name}{i}"
                workload: Workload
                if isinstance(spec, FaultLoopSpec):
                    n = spec.region_mib * MIB_PAGES
                    workload = FaultLoopTask(
                        name,
                        next_gfn,
                        n,
                        spec.burst_mean_us * 1000.0,
                        self.streams.stream(f"task:{name}"),
                    )
                    next_gfn += n
                elif isinstance(spec, ComputeSpec):
                    total = None if spec.work_s is None else round(spec.work_s * 1e9)
                    workload = ComputeTask(name, total)
                elif isinstance(spec, RandomWriterSpec):
                    workload = RandomWriterTask(
                        name,
                        first,
                        n,
                        spec.access_ns,
                        self.streams.stream(f"task:{name}"),
                        spec.kernel_fraction,
                        AccessMode[spec.kernel_mode.upper()],
                    )
                else:
                    workload = MemoryHogTask(
                        name,
                        first,
                        n,
                        spec.passes,
                        spec.iterations,
                        spec.page_write_ns,
                        costs.guest_fault_ns,
                    )
                cpu = spec.cpu if spec.cpu is not None else rr % g.vcpus
                rr += 1
                task = Task(tid=len(self.tasks), name=name, cpu=cpu)
                self.tasks.append(task)
                self.workloads.append(workload)
                self._task_kinds.append(spec.kind)
                self.cpus[cpu].rq.enqueue(task, wakeup=False)

    def workload_of(self, task: Task) -> Workload:
        return self.workloads[task.tid]

    # -- host services --------------------------------------------------------------------------
    def write_back(self, reclaimed: Reclaimed) -> None:
        """Dirty evicted pages go to swap: one write request per reclaim batch."""
        if len(reclaimed.writes):
            self.device.submit(IoKind.WRITE, len(reclaimed.writes), _ignore, None)

    def submit_swapin(self, gfn: int) -> None:
        """``do_swap_page`` -> ``swapin_readahead``: submit the read (with readahead).

        KVM's first GUP with FOLL_NOWAIT already does this before giving up on the page
        lock, so the I/O starts at the fault, whatever the protocol does next.
        """
        if int(self.memory.state[gfn]) == _SWAPPED:
            window = self.memory.readahead_window(gfn)
            self.write_back(self.memory.start_read(window))
            self.device.submit(IoKind.READ, len(window), self._read_done, window)

    def read_page(self, gfn: int, on_done: Callable[[Any], object], arg: Any) -> None:
        """Wait for ``gfn`` to be in memory: join its read, starting one if needed."""
        self.submit_swapin(gfn)
        if int(self.memory.state[gfn]) != _IN_IO:
            self.engine.after(0, on_done, arg)
            return
        self._io_waiters.setdefault(gfn, []).append((on_done, arg))

    def _read_done(self, window: np.ndarray) -> None:
        self.memory.finish_read(window)
        for gfn in window.tolist():
            for on_done, arg in self._io_waiters.pop(gfn, ()):
                on_done(arg)

    def start_worker(self, work: AsyncPf) -> None:
        """``schedule_work``: a kworker picks the item up after the workqueue delay."""
        self.tracepoints["kvm_async_pf_not_present"] += 1
        if self.tracer is not None:
            self.tracer.apf_setup(work)
        self.engine.after(self.scenario.host.worker_start_ns, self._worker_run, work)

    def _worker_run(self, work: AsyncPf) -> None:
        self.read_page(work.gfn, self._worker_done, work)

    def _worker_done(self, work: AsyncPf) -> None:
        """End of ``async_pf_execute``: the page is in; queue the completion, wake the vCPU."""
        self.fault_latency.add(self.engine.now - work.start_ns)
        self.tracepoints["kvm_async_pf_completed"] += 1
        if self.tracer is not None:
            self.tracer.apf_completed(work)
        self.host_protocol.worker_done(work)
        vcpu = self.vcpus[work.vcpu_id]
        vcpu.worker_completed()
        if self.check:
            self.note(work.vcpu_id, "async_pf_execute done, gfn", work.gfn)
            # The kick (I9) now; the lists at the vCPU's next entry.
            self._raise_if(check_vcpu(self.host_protocol, work.vcpu_id, vcpu.in_guest, False))

    # -- invariants (spec §8.3), checked where the protocol state changes ----------------------
    def note(self, vcpu: int, what: str, value: int) -> None:
        """Remember a protocol event for the report of a later violation."""
        self.recent.append((self.engine.now, vcpu, what, value))
        self._apf_changed[vcpu] = True

    def check_vcpu(self, vcpu: int, in_guest: bool, at_entry: bool = False) -> None:
        """The host invariants of ``vcpu``; at an entry only if an APF event happened since
        the last entry check (ticks and minor faults change no APF state)."""
        if at_entry:
            if not self._apf_changed[vcpu]:
                return
            self._apf_changed[vcpu] = False
        self._raise_if(check_vcpu(self.host_protocol, vcpu, in_guest))

    def check_guest(self) -> None:
        waiting = [
            (t.tid, t.cpu)
            for t in self.tasks
            if t.state is TaskState.SLEEPING_APF or t.state is TaskState.HALTED_APF
        ]
        all_done = all(t.state is TaskState.DONE for t in self.tasks)
        self._raise_if(check_guest(self.guest_protocol, waiting, all_done))

    def _raise_if(self, broken: Broken) -> None:
        if broken is None:
            return
        name, detail = broken
        lines = [
            f"{self.protocol}: invariant {name} broken at {self.engine.now / 1e6:.6f} ms "
            f"(seed {self.seed}): {detail}",
            f"  {name}: {INVARIANTS.get(name.split()[0], '')}",
            "  last events:",
        ]
        for t, vcpu, what, value in self.recent:
            lines.append(f"    {t / 1e6:12.6f} ms  vCPU{vcpu}  {what} {value:#x}")
        raise InvariantViolation("\n".join(lines))

    def _prefault(self, gfn: int) -> bool:
        """``kvm_arch_async_page_ready``: map the page in stage 2 if it is still resident."""
        state = int(self.memory.state[gfn])
        if state == _SWAPCACHE:
            return self.memory.map_after_read(gfn)
        return state == _MAPPED

    def send_ipi(self, cpu: int, sender: int) -> None:
        """A reschedule IPI: the sender traps on its ICR / ICC_SGI1R_EL1 write, then the
        target takes the interrupt (a running target is kicked out to take it)."""
        self.stats["ipis"] += 1
        self._trap(sender, self._ipi_send_ns)
        self.vcpus[cpu].on_ipi()

    def task_finished(self, task: Task) -> None:
        if _is_finite(self.workloads[task.tid]):
            self._unfinished -= 1

    # -- GuestKernelPort (the guest driver's view of its kernel) --------------------------------
    def run_driver(self, cpu: int, fn: Callable[..., R], *args: Any) -> R:
        """Call into the guest driver with ``cpu`` as the executing CPU."""
        self._running_cpu = cpu
        try:
            return fn(*args)
        finally:
            self._running_cpu = -1

    def current_task(self, cpu: int) -> int:
        current = self.cpus[cpu].current
        return -1 if current is None else current.tid

    def rq_is_locked(self, cpu: int) -> bool:
        return self.cpus[cpu].context().rq_locked

    def swake_up_one(self, task: int) -> None:
        t = self.tasks[task]
        if not self.cpus[t.cpu].try_to_wake_up(t, self._running_cpu):
            self.stats["wake_of_non_sleeper"] += 1

    def smp_send_reschedule(self, cpu: int) -> None:
        self.cpus[cpu].need_resched = True
        if cpu != self._running_cpu:
            self.send_ipi(cpu, self._running_cpu)
        elif self._started:
            # A self-IPI still goes through the interrupt controller: the write traps, and
            # the IPI is pending at the next entry.
            self.stats["ipis"] += 1
            self.cpus[cpu].ipi_pending = True
            self._trap(cpu, self._ipi_send_ns)

    def kzalloc_atomic(self, cpu: int) -> bool:
        p = self.scenario.guest.dummy_alloc_fail_probability
        return p == 0.0 or bool(self._alloc_rng.random() >= p)

    def _trap(self, cpu: int, handling_ns: int) -> None:
        """A guest instruction on a running CPU that exits; the exit happens when the
        handler frame executing it ends. Nothing is charged at boot or from host context."""
        if cpu >= 0 and self._running_cpu >= 0 and self._started:
            guest = self.cpus[cpu]
            guest.pending_exits += 1
            guest.pending_exit_ns += handling_ns

    def _guest_call(self, cpu: int, call: int, val: int) -> int:
        """A guest exit (SMCCC, WRMSR): applied now; a running CPU pays the round trip."""
        self._trap(cpu, self._call_ns[self.host_protocol.call_kind(call)])
        return self.host_protocol.guest_call(cpu, call, val)

    def _now(self) -> int:
        return self.engine.now

    def kick_vcpu(self, vcpu: int) -> None:
        self.vcpus[vcpu].kick()

    # -- running ----------------------------------------------------------------------------------
    def _tick(self, vcpu: Vcpu) -> None:
        self.engine.after(self._tick_ns, self._tick, vcpu)
        vcpu.on_tick()

    def _host_tick(self, vcpu: Vcpu) -> None:
        self.engine.after(self._host_tick_ns, self._host_tick, vcpu)
        vcpu.on_host_tick()

    def run(
        self, duration_s: float | None = None, progress: ProgressFn | None = None
    ) -> ProtocolResult:
        """Simulate up to ``duration_s`` (default: the scenario's) and return the results."""
        wall0 = time.perf_counter()
        end = round((duration_s if duration_s is not None else self.scenario.duration_s) * 1e9)
        engine = self.engine
        self.run_driver(0, self.guest_protocol.boot)
        self._started = True
        n = len(self.vcpus)
        for i, vcpu in enumerate(self.vcpus):
            engine.at(self._tick_ns * (i + 1) // (n + 1) + self._tick_ns // 2, self._tick, vcpu)
            if self._host_tick_ns:
                # Host and guest ticks are not aligned: start the host's a third of a period in.
                first = self._host_tick_ns * (i + 1) // (n + 1) + self._host_tick_ns // 3
                engine.at(first, self._host_tick, vcpu)
            # The boot-time enable was an exit (SMCCC / WRMSR): every vCPU starts with a
            # run-loop iteration, which delivers the enable's wake-all before any task runs.
            engine.at(0, vcpu.enter)
        step = max(1, min(end, 100_000_000))
        t = 0
        stop_early = self.scenario.stop_when_done and self._unfinished > 0
        try:
            while t < end:
                t = min(end, t + step)
                engine.run(until=t)
                if progress is not None:
                    progress(t / end)
                if stop_early and self._unfinished == 0:
                    break
        except BaseException:
            # An invariant violation or ^C: the trace up to here is what one wants to see.
            if self.tracer is not None:
                for vcpu in self.vcpus:
                    vcpu.clock.close(engine.now)
                self.tracer.close(engine.now)
            raise
        result = self._result(engine.now, time.perf_counter() - wall0)
        if self.tracer is not None:
            self.tracer.close(engine.now)
        return result

    # -- results ----------------------------------------------------------------------------------
    def _result(self, now: int, wall_s: float) -> ProtocolResult:
        tasks = []
        for task, workload, kind in zip(self.tasks, self.workloads, self._task_kinds, strict=True):
            tasks.append(
                TaskResult(
                    name=task.name,
                    kind=kind,
                    cpu=task.cpu,
                    work_s=round(workload.work_ns / 1e9, 9),
                    ops=workload.ops,
                    completion_s=None
                    if task.completion_ns is None
                    else round(task.completion_ns / 1e9, 9),
                    state=task.state.value,
                )
            )
        vcpus = []
        for v in self.vcpus:
            v.clock.close(now)
            vcpus.append(
                VcpuResult(
                    v.index,
                    {
                        name: round(int(ns) / 1e9, 9)
                        for name, ns in zip(TIME_CATEGORIES, v.clock.totals, strict=True)
                    },
                )
            )
        apf: dict[str, int] = {}
        apf.update(self.host_protocol.counters())
        apf.update(self.guest_protocol.counters())
        apf["apf_sleeps"] = self.stats["apf_sleeps"]
        apf["guest_bogus_aborts"] = self.stats["guest_bogus_aborts"]
        for cause in SyncCause:
            apf[f"sync_fallback_{cause.value}"] = self.sync_causes[cause.value]
        apf["sync_fallbacks"] = sum(self.sync_causes.values())
        faults: dict[str, Any] = {
            "zero_fill": self.faults["zero_fill"],
            "minor": self.faults["minor"],
            "needs_io": self.faults["needs_io"],
            "async": self.faults["async"],
            "sync": sum(self.sync_causes.values()),
            "repeated": self.faults["repeated_spins"],
            "fault_in_latency_us": self.fault_latency.summary_us(),
            "not_present_to_ready_us": self.ready_latency.summary_us(),
        }
        dev = self.device
        memory: dict[str, Any] = {
            "resident_pages": int(self.memory.resident),
            "limit_pages": int(self.memory.limit_pages),
            "pages_evicted": int(self.memory.pages_evicted),
            "pages_written": int(self.memory.pages_written),
            "swap_reads": int(dev.reads),
            "swap_writes": int(dev.writes),
            "swap_mean_queue": round(float(dev.mean_queue_length()), 6),
            "context_switches": self.stats["context_switches"],
            "ipis": self.stats["ipis"],
        }
        tracepoints = {name: self.tracepoints[name] for name in TRACEPOINT_COUNTS}
        return ProtocolResult(
            protocol=self.protocol,
            sim_time_s=round(now / 1e9, 9),
            wall_time_s=wall_s,
            events=self.engine.events_run,
            tasks=tasks,
            vcpus=vcpus,
            apf=apf,
            faults=faults,
            memory=memory,
            tracepoints=tracepoints,
        )


def _is_finite(workload: Workload) -> bool:
    if isinstance(workload, ComputeTask):
        return workload.total_work_ns is not None
    if isinstance(workload, MemoryHogTask):
        return workload.iterations is not None
    return False


def _ignore(_: object) -> None:
    pass
