"""One VM on one host under one protocol: the composition root of a simulation run.

:class:`Simulation` wires the components, each given only its narrow ports
(:mod:`apfsim.ports`): the engine is every component's clock; the host's memory, swap device
and async workers are :class:`~apfsim.host.io.HostMemoryIo`; the guest kernel's services are
:class:`~apfsim.guest.kernel.SimKernel`; the invariants are a
:class:`~apfsim.checking.RunChecker`; everything counts into one
:class:`~apfsim.ports.RunCounters`, which :mod:`apfsim.metrics.collect` turns into results.
Tracing is attached from outside (``apfsim.trace.attach``), never imported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from apfsim.checking import InvariantViolation, RunChecker
from apfsim.engine import Engine, RandomStreams
from apfsim.guest.cpu import GuestCpu, GuestParams
from apfsim.guest.kernel import SimKernel
from apfsim.guest.page_reporting import PageReporting, ReportingParams
from apfsim.guest.sched import CfsParams, Task
from apfsim.host.backing import (
    ConstantServiceTime,
    ExponentialServiceTime,
    LognormalServiceTime,
    ServiceTime,
    SwapDevice,
    fit_lognormal,
)
from apfsim.host.costs import resolve_costs
from apfsim.host.io import HostMemoryIo
from apfsim.host.memory import GuestMemory, PageState
from apfsim.host.postcopy import PostcopyDestination, PostcopyParams
from apfsim.host.precopy import Precopy
from apfsim.host.sched import ANY_CPU, HostSched
from apfsim.host.vcpu import Vcpu, VcpuParams
from apfsim.metrics.collect import collect, postcopy_results
from apfsim.metrics.results import ProtocolResult
from apfsim.ports import GuestCallKind, HostPorts, RunCounters
from apfsim.registry import ProtocolOptions, build_protocol, variant
from apfsim.scenario import (
    MIB_PAGES,
    ComputeSpec,
    FaultLoopSpec,
    MemoryHogSpec,
    RandomWriterSpec,
    Scenario,
)
from apfsim.workloads.base import AccessMode, MinorFold, Workload
from apfsim.workloads.tasks import ComputeTask, FaultLoopTask, MemoryHogTask, RandomWriterTask

__all__ = ["InvariantViolation", "Observer", "Simulation"]

ProgressFn = Callable[[float], None]
WORK_SAMPLE_NS = 100_000_000  # postcopy's work-rate series: one sample per 100 ms
_REMOTE = int(PageState.REMOTE)


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


def _cfs(cfg: Any) -> CfsParams:
    """The CFS tunables of a scenario's ``guest.sched`` or ``host.sched``, unscaled."""
    return CfsParams(
        cfg.latency_ns,
        cfg.min_granularity_ns,
        cfg.wakeup_granularity_ns,
        cfg.gentle_fair_sleepers,
        cfg.wakeup_preemption,
    )


class Observer(Protocol):
    """Something attached to a run from outside (a tracer): told when the run ends."""

    def close(self, now: int) -> None: ...


class Simulation:
    """Run ``scenario`` under ``protocol`` with ``seed``; see :meth:`run`.

    ``vcpu_type`` lets a tracer substitute its traced vCPU thread (``apfsim.trace``).
    """

    def __init__(
        self,
        scenario: Scenario,
        protocol: str,
        seed: int,
        check: bool = True,
        vcpu_type: type[Vcpu] = Vcpu,
    ) -> None:
        self.scenario = scenario
        self.protocol = protocol
        self.variant = variant(protocol)
        self.seed = seed
        self.check = check  # protocol invariants at every transition (apfsim.invariants)
        self.engine = Engine()
        self.streams = RandomStreams(seed)
        self.counters = RunCounters()
        self.observers: list[Observer] = []
        g, h = scenario.guest, scenario.host
        self.arch = self.variant.arch_in(g.arch)
        # The exit, entry and per-operation costs: explicit keys over the arch's preset.
        self.costs = costs = resolve_costs(h, self.arch)
        self.memory = GuestMemory(
            g.memory_mib * MIB_PAGES,
            h.memory_limit_mib * MIB_PAGES,
            h.page_cluster,
            h.reclaim_batch,
            h.swap.readahead_mode(),
        )
        im = scenario.initial_memory
        self.memory.initialise(
            self.streams.stream("initial-memory"), im.resident_fraction, im.swapped_fraction
        )
        pc = scenario.postcopy
        self.postcopy: PostcopyDestination | None = None
        self._work_samples: list[int] = []
        self.precopy: Precopy | None = None
        self._downtime_ns = 0
        if pc.enabled:
            # The source's memory is the initial state; its never-touched pages are zero
            # pages on the wire. Without precopy the destination starts with every page
            # REMOTE; with it the guest runs on the source first (Precopy, _switch_over).
            zero = self.memory.state == np.uint8(PageState.UNTOUCHED)
            if not pc.precopy_rounds:
                self.memory.initialise_remote()
            self.postcopy_params = PostcopyParams.of(pc, g.vcpus)
        swap = h.swap
        self.device = SwapDevice(
            self.engine,
            _service_time(swap, self.streams.stream("swap-read"), 1.0),
            _service_time(swap, self.streams.stream("swap-write"), swap.write_mean_scale),
            swap.queue_depth,
            swap.transfer_ns_per_page,
        )
        self.io = HostMemoryIo(
            self.engine, self.memory, self.device, h.worker_start_ns, self.counters
        )
        if pc.enabled:
            self.postcopy = PostcopyDestination(
                self.engine, self.memory, self.postcopy_params, zero, not pc.precopy_rounds
            )
            self.io.postcopy = self.postcopy
            if pc.precopy_rounds:
                self.precopy = Precopy(
                    self.engine,
                    self.memory,
                    self.postcopy_params,
                    pc.precopy_rounds,
                    self._switch_over,
                )
            else:
                self._downtime_ns = self.postcopy_params.downtime_ns(pc.device_state_kib * 1024)
        self.tasks: list[Task] = []
        self.workloads: list[Workload] = []
        self._private: list[bool] = []  # the task's pages are its own (no other task's)
        self._task_kinds: list[str] = []
        self._claimed_end = 0
        specs = self._build_tasks()
        self.kernel = SimKernel(
            self.memory,
            self.tasks,
            self.workloads,
            [_is_finite(w) for w in self.workloads],
            self.counters,
            self.streams.stream("guest-kzalloc"),
            g.dummy_alloc_fail_probability,
            costs.ipi_send_ns,
            {
                GuestCallKind.HYPERCALL: costs.hypercall_ns,
                GuestCallKind.ACK: costs.ack_exit_ns,
                GuestCallKind.SDEI_COMPLETE: costs.hypercall_ns + costs.sdei_complete_ns,
            },
        )
        options = ProtocolOptions(
            no_kvmapf=g.no_kvmapf,
            send_always=g.send_always,
            no_fault_inst_range=h.no_fault_inst_range,
            guest_handler_offsets_max=g.handler_offsets_max,
            preempt_count_config=g.preempt_count_config,
        )
        engine = self.engine
        ports = HostPorts(
            self.io.prefault,
            self.io.kick,
            self.io.submit_swapin,
            self.io.start_worker,
            lambda: engine.now,
            None if self.postcopy is None else self._userfault,
        )
        self.host_protocol, self.guest_protocol = build_protocol(
            protocol, g.vcpus, self.kernel, ports, options
        )
        self.io.host = self.kernel.host = self.host_protocol
        self.checker: RunChecker | None = None
        if check:
            self.checker = RunChecker(
                self.engine, self.host_protocol, self.guest_protocol, self.tasks, protocol, seed
            )
        cfs = _cfs(g.sched).scaled(g.vcpus)
        vparams = VcpuParams.of(h, costs, g.steal_time_accounting)
        gparams = GuestParams.of(g)
        self.contexts = gparams.contexts
        rules = gparams.rules(self.arch)
        self.vcpus = [
            vcpu_type(
                i, self.engine, self.host_protocol, self.io, vparams, self.counters, self.checker
            )
            for i in range(g.vcpus)
        ]
        self.cpus = [
            GuestCpu(
                i,
                self.engine,
                v,
                self.guest_protocol,
                self.kernel,
                cfs,
                rules,
                g.steal_time_accounting,
                self.counters,
                self.checker,
            )
            for i, v in enumerate(self.vcpus)
        ]
        for v, c in zip(self.vcpus, self.cpus, strict=True):
            v.guest = c
        self.kernel.cpus, self.kernel.vcpus = self.cpus, self.vcpus
        if self.checker is not None:
            self.checker.attach(self.vcpus)
        self.io.vcpus = self.vcpus
        self.io.worker_finish_ns = h.worker_finish_ns
        self.host_sched: HostSched | None = None
        if h.cpus:
            hs = _cfs(h.sched).scaled(h.cpus)
            self.host_sched = HostSched(
                self.engine,
                h.cpus,
                hs.sched_latency_ns,
                hs.min_granularity_ns,
                hs.wakeup_granularity_ns,
                hs.gentle_fair_sleepers,
                hs.wakeup_preemption,
            )
            for v in self.vcpus:
                v.attach_sched(self.host_sched, v.index % h.cpus if h.pin_vcpus else ANY_CPU)
            self.io.cpu = self.host_sched
        for task, cpu in specs:
            self.cpus[cpu].rq.enqueue(task, wakeup=False)
            self.cpus[cpu].need_resched = True  # the idle task leaves do_idle for it
        self.reporting = self._page_reporting() if g.free_page_reporting else None
        self._fold_minor_faults()
        self._tick_ns = 1_000_000_000 // g.hz
        self._host_tick_ns = 1_000_000_000 // h.tick_hz if h.tick_hz else 0

    # -- construction -------------------------------------------------------------------------
    def _build_tasks(self) -> list[tuple[Task, int]]:
        """The scenario's tasks and their workloads, each with the CPU it starts on."""
        placed: list[tuple[Task, int]] = []
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
                self._private.append(spec.count == 1)
                self._task_kinds.append(spec.kind)
                placed.append((task, cpu))
        self._claimed_end = next_gfn
        return placed

    def _fold_minor_faults(self) -> None:
        """Let a postcopy writer take its minor faults on placed pages in line
        (workloads.base.MinorFold): the results are those of taking each as its own exit.
        Only where nothing else can change those pages or the vCPU's run between them: a
        writer with a buffer of its own, no reclaim (postcopy has none), no free page
        reporting and no host scheduler. The invariant checker sees the same: its events for
        a vCPU come from the vCPU's own exits or a completion that unfolds the run."""
        if self.postcopy is None or self.reporting is not None or self.host_sched is not None:
            return
        block = self.postcopy_params.host_page_pages
        handled, round_trip = self.vcpus[0].minor_fault_ns  # the same on every vCPU
        for workload, private in zip(self.workloads, self._private, strict=True):
            if isinstance(workload, RandomWriterTask) and private:
                workload.fold = MinorFold(handled, round_trip, block)

    def _page_reporting(self) -> PageReporting:
        """The guest's free page reporting (virtio-balloon on vCPU 0), registered at t=0.

        Free at t=0: the memory no task claims and each memory hog's buffer (allocated at
        its first touch). With ``initial_memory.reported`` (unset: true) those blocks were
        reported before and start discarded; otherwise the registration's request reports
        them ``PAGE_REPORTING_DELAY`` in."""
        sc = self.scenario
        cfg, h = sc.guest.page_reporting, sc.host
        params = ReportingParams(
            cfg.order,
            cfg.delay_ns,
            cfg.capacity,
            cfg.budget_divisor,
            self.costs.exit_ns + self.costs.entry_ns,  # the doorbell exit of each report
            h.balloon.report_range_ns,
            h.balloon.discard_page_ns,
        )
        hogs = [w for w in self.workloads if isinstance(w, MemoryHogTask)]
        reporting = PageReporting(
            self.engine,
            self.memory,
            params,
            hogs,
            [(self._claimed_end, self.memory.n_pages)],
            self.vcpus[0].doorbell_exit,
        )
        for hog in hogs:
            hog.on_free = reporting.notify_free
        if sc.initial_memory.reported is not False:
            reporting.assume_reported()
        reporting.register()
        return reporting

    def workload_of(self, task: Task) -> Workload:
        return self.workloads[task.tid]

    # -- running ----------------------------------------------------------------------------------
    def _tick(self, vcpu: Vcpu) -> None:
        self.engine.after(self._tick_ns, self._tick, vcpu)
        vcpu.on_tick()

    def _host_tick(self, vcpu: Vcpu) -> None:
        self.engine.after(self._host_tick_ns, self._host_tick, vcpu)
        vcpu.on_host_tick()

    def _sample_work(self, _: object = None) -> None:
        """The guest's work done so far, every ``WORK_SAMPLE_NS`` (postcopy's work rate)."""
        self.engine.after(WORK_SAMPLE_NS, self._sample_work)
        self._work_samples.append(sum(w.work_ns for w in self.workloads))

    def _cpu_tick(self, cpu: int) -> None:
        """The host tick of host CPU ``cpu`` (with ``host.cpus``): whatever runs there."""
        self.engine.after(self._host_tick_ns, self._cpu_tick, cpu)
        assert self.host_sched is not None
        self.host_sched.tick(cpu)

    def run(
        self, duration_s: float | None = None, progress: ProgressFn | None = None
    ) -> ProtocolResult:
        """Simulate up to ``duration_s`` (default: the scenario's) and return the results."""
        wall0 = time.perf_counter()
        end = round((duration_s if duration_s is not None else self.scenario.duration_s) * 1e9)
        engine = self.engine
        self.kernel.run_driver(0, self.guest_protocol.boot)
        self.kernel.started = True
        n = len(self.vcpus)
        sched = self.host_sched
        for i, vcpu in enumerate(self.vcpus):
            engine.at(self._tick_ns * (i + 1) // (n + 1) + self._tick_ns // 2, self._tick, vcpu)
            if self._host_tick_ns and sched is None:
                # Host and guest ticks are not aligned: start the host's a third of a period in.
                first = self._host_tick_ns * (i + 1) // (n + 1) + self._host_tick_ns // 3
                engine.at(first, self._host_tick, vcpu)
            # The boot-time enable was an exit (SMCCC / WRMSR): every vCPU starts with a
            # run-loop iteration, which delivers the enable's wake-all before any task runs.
            engine.at(0, vcpu.start)
        if self._host_tick_ns and sched is not None:
            # One tick per host CPU, phased as the per-vCPU ticks are without contention.
            for cpu in range(sched.cpus):
                first = self._host_tick_ns * (cpu + 1) // (sched.cpus + 1) + self._host_tick_ns // 3
                engine.at(first, self._cpu_tick, cpu)
        if self.postcopy is not None:
            engine.at(WORK_SAMPLE_NS, self._sample_work)
        if self.precopy is not None:
            self.precopy.start()
        for cpu_state in self.cpus:
            # In-line faults end before each work sample and the run's end (what is read).
            cpu_state.fold_period, cpu_state.fold_until = WORK_SAMPLE_NS, end
        step = max(1, min(end, 100_000_000))
        t = 0
        stop_early = self.scenario.stop_when_done and self.kernel.unfinished > 0
        try:
            while t < end:
                t = min(end, t + step)
                engine.run(until=t)
                if progress is not None:
                    progress(t / end)
                if stop_early and self.kernel.unfinished == 0:
                    break
        except BaseException:
            # An invariant violation or ^C: what was observed up to here is what one wants.
            self._close(engine.now)
            raise
        result = collect(
            self.protocol,
            engine.now,
            time.perf_counter() - wall0,
            engine.events_run,
            self.tasks,
            self.workloads,
            self._task_kinds,
            [v.clock for v in self.vcpus],
            {**self.host_protocol.counters(), **self.guest_protocol.counters()},
            self.counters,
            self.memory,
            self.device,
            None if self.reporting is None else self.reporting.counters(),
            self.host_sched,
            self.costs.as_dict(),
            None if self.postcopy is None else self._postcopy_results(engine.now),
        )
        self._close(engine.now)
        return result

    def _userfault(self, gfn: int) -> bool:
        """The userfault bitmap the VMM keeps for postcopy: set while the page is on the
        source (cleared once it is placed)."""
        return int(self.memory.state[gfn]) == _REMOTE

    def _switch_over(self) -> None:
        """``postcopy_start`` after the last precopy round: stop the VM, sync the dirty log
        once more, send the device state and the discard list (the downtime), and run the
        VM on the destination with the discarded pages still on the source."""
        assert self.precopy is not None and self.postcopy is not None
        for vcpu in self.vcpus:
            vcpu.stop()
        remote = self.precopy.final_sync()
        device_state = self.scenario.postcopy.device_state_kib * 1024
        self._downtime_ns = self.postcopy_params.downtime_ns(
            device_state, self.precopy.discard_bytes(remote)
        )
        run_at = self.engine.now + self._downtime_ns
        self.postcopy.switch_over(remote, run_at)
        for vcpu in self.vcpus:
            vcpu.restart(run_at)

    def _postcopy_results(self, now: int) -> dict[str, Any]:
        pc = self.postcopy
        assert pc is not None
        return postcopy_results(
            pc,
            now,
            self._downtime_ns,
            self._work_samples,
            WORK_SAMPLE_NS,
            None if self.precopy is None else self.precopy.results(),
        )

    def _close(self, now: int) -> None:
        if not self.observers:
            return
        for vcpu in self.vcpus:
            vcpu.clock.close(now)
        for observer in self.observers:
            observer.close(now)


def _is_finite(workload: Workload) -> bool:
    if isinstance(workload, ComputeTask):
        return workload.total_work_ns is not None
    if isinstance(workload, MemoryHogTask):
        return workload.iterations is not None
    return False
