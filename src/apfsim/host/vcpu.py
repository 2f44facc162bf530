"""The vCPU thread's run loop (``kvm_arch_vcpu_ioctl_run`` and ``kvm_handle_guest_abort``).

Modes: in the guest; in the host handling an exit; blocked in ``kvm_vcpu_block`` after a
WFI (guest idle, or the seed's halted APF wait); blocked in a synchronous fault-in; or
spinning on repeated faults (RFCv2 has no artificial halt: the guest re-faults until the
page arrives). With ``host.cpus`` set, the thread also competes for a host CPU
(:mod:`apfsim.host.sched`): it sleeps while blocked, is preempted only at its next guest
entry (the descheduling is an exit whose entry waits for a CPU), and the wait is its
``run_delay``, which the guest sees as steal time when ``steal_time_accounting`` is on.
Every return to the guest passes through one run-loop iteration, where the protocol
checks completions (RFCv2: ``kvm_check_async_pf_completion`` on every iteration) and the
pending abort, if any, is injected.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from mypy_extensions import mypyc_attr

from apfsim.engine import EventHandle
from apfsim.guest.context import GuestContext
from apfsim.host.async_pf import AsyncPf
from apfsim.host.sched import ANY_CPU, HostSched, HostThread
from apfsim.metrics.accumulators import TimeCategory, VcpuClock
from apfsim.ports import (
    NOWAIT_MAPPED,
    NOWAIT_MINOR,
    NOWAIT_ZERO_FILL,
    Checker,
    Clock,
    FaultDecision,
    GuestSide,
    HostIo,
    HostProtocol,
    Injection,
    InjectionKind,
    Probe,
    RunCounters,
    SyncCause,
)
from apfsim.runloop import (
    FaultOutcome,
    exit_request,
    fault_outcome,
    vcpu_enter,
    waits_for_cancelled,
    wake_condition,
)

__all__ = ["Vcpu", "VcpuMode", "VcpuParams"]


@dataclass(frozen=True, slots=True)
class VcpuParams:
    """The host's costs a vCPU thread pays (``[host]`` and ``[host.costs]`` of a scenario)."""

    exit_ns: int
    entry_ns: int
    stage2_fault_ns: int
    zero_fill_ns: int
    minor_fault_ns: int
    exception_inject_ns: int
    interrupt_inject_ns: int
    sdei_deliver_ns: int
    steal_time_accounting: bool = False

    @classmethod
    def of(cls, host: Any, costs: Any, steal_time_accounting: bool) -> VcpuParams:
        """From a scenario's ``host`` section and the run's resolved ``costs``
        (apfsim.host.costs.resolve_costs: explicit keys over the arch's preset)."""
        c = costs
        return cls(
            c.exit_ns,
            c.entry_ns,
            host.stage2_fault_ns,
            host.zero_fill_ns,
            host.minor_fault_ns,
            c.exception_inject_ns,
            c.interrupt_inject_ns,
            c.sdei_deliver_ns,
            steal_time_accounting,
        )


# Labels of the events kept for an invariant report (made once, not per event).
_TRY_LABEL = {d: f"try_async_pf {d.value}, gfn" for d in FaultDecision}
_INJECT_LABEL = {k: f"inject {k.value}" for k in InjectionKind}


class VcpuMode(IntEnum):
    GUEST = 0
    HOST = 1
    BLOCKED = 2
    SYNC_FAULT = 3
    SPIN = 4


# NOTE: enum members as module constants, for performance (read at every exit and entry).
_GUEST, _HOST, _BLOCKED, _SPIN_MODE = VcpuMode.GUEST, VcpuMode.HOST, VcpuMode.BLOCKED, VcpuMode.SPIN
_CAT_HOST = TimeCategory.HOST
_HOLD = 1 << 62  # stopped, with no restart time yet


# Subclassed by interpreted code (tracing, the model checker) in the compiled build.
@mypyc_attr(allow_interpreted_subclasses=True)
class Vcpu:
    """vCPU ``index``: one host thread running one guest CPU, given its collaborators."""

    guest: GuestSide

    def __init__(
        self,
        index: int,
        clock: Clock,
        host: HostProtocol,
        io: HostIo,
        params: VcpuParams,
        counters: RunCounters,
        checker: Checker | None = None,
    ) -> None:
        self.index = index
        self.engine = clock
        self.host = host
        self.io = io
        self.counters = counters
        self.checker = checker
        self.probe: Probe | None = None
        self.params = params
        self.mode = VcpuMode.HOST
        self.clock = VcpuClock()
        self.block_halt = False
        self._since = 0
        self._spin_gfn = 0
        self._host_event: EventHandle | None = None
        self._exit_ns = params.exit_ns
        self._entry_ns = params.entry_ns
        self._inject_ns = {
            InjectionKind.DATA_ABORT: params.exception_inject_ns,
            InjectionKind.PAGE_FAULT: params.exception_inject_ns,
            InjectionKind.INTERRUPT: params.interrupt_inject_ns,
            InjectionKind.SDEI: params.sdei_deliver_ns,
        }
        self._stage2_ns = params.stage2_fault_ns
        self._round_trip = max(1, params.exit_ns + params.entry_ns + params.stage2_fault_ns)
        # A minor fault's exit, handling and entry (workloads.base.MinorFold).
        self._minor_handled = params.exit_ns + params.stage2_fault_ns + params.minor_fault_ns
        self._minor_round_trip = self._minor_handled + params.entry_ns
        # Nothing has reached this vCPU since its last entry's run-loop iteration, so an entry
        # now would find nothing new: a task may take minor faults in line.
        self.fold_ok = False
        self._hold_until = 0  # the VM is stopped (a migration's switch-over) until then
        self._held_rest = 0  # what was left of an entry the stop cut short
        # Host CPU contention (None: every thread has a CPU of its own, nothing waits).
        self.thread: HostThread | None = None
        self.sched: HostSched | None = None
        self._resched = False  # TIF_NEED_RESCHED: schedule() before the next entry

    def attach_sched(self, sched: HostSched, affinity: int = ANY_CPU) -> None:
        """Run this thread on ``sched``'s host CPUs (``affinity``: one CPU, or any)."""
        self.sched = sched
        self.thread = HostThread(
            f"vcpu{self.index}", affinity, self._granted, self.resched, self.on_host_tick
        )
        sched.vcpu_threads.append(self.thread)

    # -- exits and entries -------------------------------------------------------------------
    def _to_host(self) -> None:
        self.mode = _HOST
        self.clock.switch(_CAT_HOST, self.engine.now)

    def exit_async(self) -> None:
        """An interrupt (timer, IPI) forces an exit while the guest runs."""
        self.guest.interrupt(self.engine.now)
        self._to_host()
        self._host_event = self.engine.after(self._exit_ns, self._enter_last)

    def enter(self, _: object = None) -> None:
        """One run-loop iteration, then guest entry with any pending abort injected."""
        self._enter(False)

    def _enter_last(self, _: object = None) -> None:
        """``enter`` as an event's last act: the entry itself may then run in place when it
        is the next event anyway (Engine.next_is), in exactly the heap's order."""
        self._enter(True)

    def _enter(self, last: bool) -> None:
        self._host_event = None
        if self._hold_until:
            if self._hold_until > self.engine.now:
                # vm_stop: the vCPU thread waits in QEMU for the VM to run again.
                self._host_event = self.engine.at(self._hold_until, self._enter_last)
                return
            self._hold_until = 0
        if self._resched:
            # xfer_to_guest_mode_handle_work: schedule() before entering the guest.
            self._resched = False
            assert self.sched is not None and self.thread is not None
            if not self.sched.yield_cpu(self.thread):
                return  # queued: _granted enters when the thread gets a CPU back
        counters = self.counters
        self.fold_ok = True
        delivered, injections = vcpu_enter(self.host, self.index, self.guest.context().view())
        for work in delivered:
            # Only a not-present the guest saw has a page-ready latency; a halt just ends.
            if work.wakeup_all:
                counters.wake_all += 1
            elif work.notpresent_injected:
                counters.ready_latency.add(self.engine.now - work.start_ns)
            counters.kvm_async_pf_ready += 1
            if self.probe is not None:
                self.probe.apf_ready(self.index, work)
        cost = self._entry_ns
        for injection in injections:
            cost += self._inject_ns[injection.kind]
            if self.checker is not None:
                self.checker.note(self.index, _INJECT_LABEL, injection.payload, injection.kind)
        engine = self.engine
        if last and engine.next_is(at := engine.now + cost):
            engine.advance_to(at)
            self._entered(injections)
            return
        self._host_event = engine.after(cost, self._entered, injections)

    @property
    def in_guest(self) -> bool:
        return self.mode == VcpuMode.GUEST

    def _entered(self, injections: list[Injection]) -> None:
        self._host_event = None
        self.mode = _GUEST
        # The LAPIC state matters only to an injection (most entries have none).
        lapic = not injections or self.host.lapic_enabled(self.index)
        self.guest.take_events(injections, lapic)
        self.guest.resume()
        if self.mode is _GUEST and exit_request(self.host, self.index):
            # A worker made its request while this entry was under way (its kick found the
            # vCPU outside the guest): vcpu_enter_guest's last check sends it round again.
            self.exit_async()
        if self.checker is not None:
            self.checker.check_entry(self.index)

    def exit_for_guest_call(
        self, exits: int, handling_ns: int, ctx: GuestContext | None = None
    ) -> None:
        """The guest trapped ``exits`` times (WRMSR, HVC, an IPI register write) in one
        handler: the host already applied each; pay every round trip and its handling.
        ``ctx`` is the context of that handler (what a trace shows as the exit's PC)."""
        self._to_host()
        cost = self._exit_ns + handling_ns + (exits - 1) * (self._exit_ns + self._entry_ns)
        self._host_event = self.engine.after(cost, self._call_done)

    def _call_done(self, _: object = None) -> None:
        """The calls are handled; a disable that cancelled running workers blocks the
        thread in ``cancel_work_sync`` until their GUP returns, then the loop goes on."""
        self._host_event = None
        if waits_for_cancelled(self.io.running_workers(), self.index):
            self.mode = VcpuMode.SYNC_FAULT
            self.clock.switch(TimeCategory.SYNC_FAULT, self.engine.now)
            self._sleep()
            self.io.on_worker_idle(self.index, self._flushed)
            return
        self._enter(True)

    def _flushed(self) -> None:
        self._wake()

    # -- stage-2 faults ----------------------------------------------------------------------
    def stage2_fault(self, gfn: int, ctx: GuestContext) -> None:
        """``kvm_handle_guest_abort`` -> ``user_mem_abort`` -> ``try_async_pf``."""
        self._to_host()
        cost = self._exit_ns + self._stage2_ns
        nowait = self.io.resolve_nowait(gfn)
        if nowait == NOWAIT_ZERO_FILL:
            self.counters.zero_fill += 1
            cost += self.params.zero_fill_ns
        elif nowait == NOWAIT_MINOR:
            self.counters.minor += 1
            cost += self.params.minor_fault_ns
        elif nowait != NOWAIT_MAPPED:
            self._needs_io(gfn, ctx, cost)
            return
        self._host_event = self.engine.after(cost, self._enter_last)

    @property
    def minor_fault_ns(self) -> tuple[int, int]:
        """A minor fault on a placed page (``stage2_fault`` with ``resolve_nowait`` finding
        it): ns to its re-entry, and to the guest running again (for workloads.base.MinorFold)."""
        return self._minor_handled, self._minor_round_trip

    def charge_folded(self, faults: int) -> None:
        """``faults`` minor faults a task segment took in line: counted as ``stage2_fault``
        counts them, their round trips moved from the task's time to the host's."""
        self.counters.minor += faults
        ns = faults * self._minor_round_trip
        totals = self.clock.totals
        totals[TimeCategory.TASK] -= ns
        totals[_CAT_HOST] += ns

    def fold_fault(self, gfn: int, start: int) -> None:
        """An event reached the vCPU inside an in-line fault begun at ``start``: that fault
        goes on as ``stage2_fault`` took it. Past its handling the entry had begun, before
        the event: its run-loop iteration found what the last entry's had (nothing reached
        the vCPU between them, or the run would have unfolded then), so it delivered and
        injected nothing, and the guest runs again at the end of the entry."""
        self.mode = _HOST
        self.clock.switch(_CAT_HOST, start)
        nowait = self.io.resolve_nowait(gfn)
        assert nowait == NOWAIT_MINOR, f"in-line fault on gfn {gfn}: {nowait}"
        self.counters.minor += 1
        handled = start + self._minor_handled
        if self.engine.now <= handled:
            self._host_event = self.engine.at(handled, self._enter_last)
        else:
            self.fold_ok = True
            self._host_event = self.engine.at(handled + self._entry_ns, self._entered, [])

    def stop(self) -> None:
        """``vm_stop`` at a migration's switch-over: a vCPU in the guest is kicked out, and
        no vCPU enters the guest again until ``restart``."""
        self._touched()
        self._hold_until = _HOLD
        if self.mode is _GUEST:
            self.guest.interrupt(self.engine.now)
            self._to_host()
            self._host_event = self.engine.at(_HOLD, self._enter_last)
        elif (event := self._host_event) is not None and event[2] == self._entered:
            # An entry under way completes only when the VM runs again: the rest of its
            # cost then, with the events it was injecting.
            self._held_rest = event[0] - self.engine.now
            injections = event[3]
            self.engine.cancel(event)
            self._host_event = self.engine.at(_HOLD, self._entered, injections)

    def restart(self, at: int) -> None:
        """The VM runs again (on the destination) at ``at``."""
        self._hold_until = at
        event = self._host_event
        if event is not None and event[0] == _HOLD:
            callback, arg = event[2], event[3]
            assert callback is not None
            self.engine.cancel(event)
            self._host_event = self.engine.at(at + self._held_rest, callback, arg)
            self._held_rest = 0

    def _touched(self) -> None:
        """An event reaches this vCPU: a task's in-line faults become real exits from now on,
        and none is taken in line again until an entry has seen the event."""
        if self.guest.folding:
            self.guest.unfold(self.engine.now)
        self.fold_ok = False

    def _needs_io(self, gfn: int, ctx: GuestContext, cost: int) -> None:
        """GUP NOWAIT failed: the protocol decides async, repeated fault or synchronous."""
        now = self.engine.now
        counters = self.counters
        counters.needs_io += 1
        result = self.host.try_async_pf(self.index, gfn, ctx.view(), now)
        decision = result.decision
        if decision is FaultDecision.USER_EXIT:
            # kvm_do_userfault: the exit comes before any async PF attempt (no tracepoint).
            if self.checker is not None:
                self.checker.note(self.index, _TRY_LABEL, gfn, decision)
            self._user_exit(gfn, now)
            return
        if decision is not FaultDecision.SYNC or result.cause is SyncCause.QUEUE_FULL:
            # APF was admissible (kvm_can_do_async_pf): the kernel traces the attempt, and
            # a gfn already outstanding as a repeated fault.
            repeated = decision is FaultDecision.REPEATED or (
                decision is FaultDecision.HALT and result.work is None
            )
            counters.kvm_try_async_get_page += 1
            counters.kvm_async_pf_repeated_fault += repeated
            if self.probe is not None:
                self.probe.try_async(self.index, gfn, repeated)
        if self.checker is not None:
            self.checker.note(self.index, _TRY_LABEL, gfn, result.decision)
        outcome = fault_outcome(result)
        if outcome is FaultOutcome.ENTER:
            counters.async_faults += 1
            if result.work is not None:  # guest-initiated queues its work at the hypercall
                self.io.start_worker(result.work)
            self._host_event = self.engine.after(cost, self._enter_last)
        elif outcome is FaultOutcome.SPIN:
            self._spin_gfn = gfn
            self._spin(now + cost)
        elif outcome is FaultOutcome.HALT:
            # KVM_REQ_APF_HALT: vcpu_enter_guest returns without entering; kvm_vcpu_block.
            if result.work is not None:
                counters.async_faults += 1
                self.io.start_worker(result.work)
            counters.halts += 1
            self._host_event = self.engine.after(cost, self._block, True)
        else:
            assert result.cause is not None
            counters.sync_causes[result.cause] += 1
            self._sync_fault(gfn, now)

    def _sync_fault(self, gfn: int, start: int) -> None:
        self.mode = VcpuMode.SYNC_FAULT
        self.clock.switch(TimeCategory.SYNC_FAULT, start)
        self._since = start
        self._sleep()  # blocked in I/O inside GUP: not runnable, so never steal
        self.io.read_page(gfn, self._sync_done, gfn, self.index)

    def _sync_done(self, gfn: int) -> None:
        now = self.engine.now
        self.counters.fault_latency.add(now - self._since)
        self.io.map_after_read(gfn)
        self._wake()

    def _user_exit(self, gfn: int, start: int) -> None:
        """KVM_EXIT_MEMORY_FAULT: KVM_RUN returns -EFAULT and the VMM's vCPU thread fetches
        and installs the page itself, then re-enters (the exit and the re-entry are in
        postcopy's ``exit_to_user_ns``). The vCPU is out of guest mode throughout, as in a
        blocking fault-in, and its time counts as one (``SYNC_FAULT``)."""
        self.mode = VcpuMode.SYNC_FAULT
        self.clock.switch(TimeCategory.SYNC_FAULT, start)
        self._since = start
        self._sleep()  # waits in user space for the page: not runnable, so never steal
        self.io.fetch_in_user(gfn, self._sync_done, gfn)

    def _spin(self, start: int) -> None:
        """Repeated fault: re-enter, re-fault, until a completion or interrupt ends it."""
        self.mode = VcpuMode.SPIN
        self._since = start
        if self._wake_condition():
            self._host_event = self.engine.at(start, self._spin_end)

    def _spin_end(self, _: object = None) -> None:
        now = self.engine.now
        # Each round trip of the loop is one more repeated fault (and, in the kernel, one
        # more kvm_try_async_get_page + kvm_async_pf_repeated_fault).
        refaults = 1 + max(0, now - self._since) // self._round_trip
        counters = self.counters
        counters.repeated_spins += refaults
        counters.kvm_try_async_get_page += refaults
        counters.kvm_async_pf_repeated_fault += refaults
        if self.probe is not None:
            self.probe.spin_refaults(
                self.index, self._spin_gfn, self._since, refaults, self._round_trip
            )
        self._to_host()
        self._enter(True)

    # -- WFI and wake-ups ----------------------------------------------------------------------
    def _wake_condition(self) -> bool:
        """``kvm_vcpu_check_block``: a pending IRQ, or the arch says runnable."""
        guest = self.guest
        return wake_condition(guest.timer_pending, guest.ipi_pending, self.host, self.index)

    def wfi(self, halt: bool) -> None:
        """The guest executed WFI: trap, then block unless already runnable."""
        self._to_host()
        self._host_event = self.engine.after(self._exit_ns, self._block, halt)

    def _block(self, halt: bool) -> None:
        self._host_event = None
        if self._wake_condition():
            self._enter(True)
            return
        self.mode = VcpuMode.BLOCKED
        self.block_halt = halt
        if halt and self.checker is not None:
            self.checker.vcpu_halted(self.index)
        category = TimeCategory.APF_HALT if halt else TimeCategory.IDLE
        self.clock.switch(category, self.engine.now)
        self._sleep()

    # -- the host CPU ----------------------------------------------------------------------------
    def _sleep(self) -> None:
        """The thread blocks (``kvm_vcpu_block``, I/O in GUP, ``cancel_work_sync``): its
        host CPU goes to the next runnable thread."""
        if self.sched is not None:
            assert self.thread is not None
            self._resched = False
            self.sched.sleep(self.thread)

    def _wake(self) -> None:
        """The thread is woken (``rcuwait_wake_up``, the I/O's completion): it enters the
        guest once it has a host CPU."""
        self._to_host()
        if self.sched is not None:
            assert self.thread is not None
            if not self.sched.wake(self.thread):
                return  # runnable, queued for a CPU: _granted enters
        self.enter()

    def start(self, _: object = None) -> None:
        """The thread's first run-loop iteration (``KVM_RUN``)."""
        self._wake()

    def _granted(self) -> None:
        """The queued thread got a host CPU: the wait was ``run_delay``, which
        ``record_steal_time`` / ``kvm_update_stolen_time`` add to the guest's steal time
        before this entry."""
        assert self.thread is not None
        if self.params.steal_time_accounting:
            self.guest.stolen_ns += self.thread.last_delay
        self._enter(False)

    def resched(self) -> None:
        """The host scheduler wants this CPU (``resched_curr``): a thread in the guest exits
        (the reschedule IPI or tick); every thread calls ``schedule()`` at its next entry."""
        self._touched()
        self._resched = True
        mode = self.mode
        if mode == VcpuMode.GUEST:
            # The IPI lands as its own event: the waker may be this vCPU's own guest code
            # (a hypercall that queues work), which must finish its step first.
            self.engine.after(0, self._resched_ipi)
        elif mode == VcpuMode.SPIN and self._host_event is None:
            self._host_event = self.engine.after(0, self._spin_end)

    def _resched_ipi(self, _: object = None) -> None:
        if self._resched and self.mode == VcpuMode.GUEST:
            self.exit_async()

    def worker_completed(self, work: AsyncPf) -> None:
        """The end of ``async_pf_execute``: ``kvm_vcpu_wake_up`` (only a blocked vCPU
        notices), then the checks of the completion (the kick, I9, now; the lists at the
        vCPU's next entry)."""
        self._touched()
        if self.host.vcpu_runnable(self.index):
            if self.mode == VcpuMode.BLOCKED:
                self._wake()
            elif self.mode == VcpuMode.SPIN and self._host_event is None:
                self._host_event = self.engine.after(0, self._spin_end)
        if self.checker is not None:
            self.checker.note(self.index, "async_pf_execute done, gfn", work.gfn)
            self.checker.check_worker(self.index, self.in_guest)

    def on_tick(self) -> None:
        """The guest's timer fires (one pending level-triggered IRQ at most)."""
        self._touched()
        mode = self.mode
        if mode is _GUEST:
            self.guest.timer_pending = True
            self.exit_async()
        elif mode is _BLOCKED:
            # A halted vCPU still has its guest tick armed; an idle one (NO_HZ idle) does not.
            if self.block_halt:
                self.guest.timer_pending = True
                self._wake()
        else:
            self.guest.timer_pending = True
            if mode is _SPIN_MODE and self._host_event is None:
                self._host_event = self.engine.after(0, self._spin_end)

    def kick(self) -> None:
        """``kvm_vcpu_kick``: force a running vCPU out of the guest (a blocked one is woken
        by the worker's ``swake_up_one`` / rcuwait)."""
        self._touched()
        if self.mode is _GUEST:
            self.counters.kicks += 1
            self.exit_async()

    def on_host_tick(self) -> None:
        """The host's own scheduler tick on this pCPU: an exit, but nothing for the guest."""
        self._touched()
        if self.mode is _GUEST:
            self.exit_async()

    def on_ipi(self) -> None:
        """A virtual IPI (reschedule) sent by another guest CPU."""
        self._touched()
        self.guest.ipi_pending = True
        mode = self.mode
        if mode == VcpuMode.GUEST:
            self.exit_async()
        elif mode == VcpuMode.BLOCKED:
            self._wake()
        elif mode == VcpuMode.SPIN and self._host_event is None:
            self._host_event = self.engine.after(0, self._spin_end)

    def doorbell_exit(self) -> bool:
        """A guest write to an ioeventfd doorbell (a virtqueue kick, ``virtqueue_notify``):
        KVM signals the eventfd and re-enters; the device's work runs in a QEMU thread.
        An exit and an entry, paid only by a vCPU in the guest (False otherwise)."""
        self._touched()
        if self.mode == VcpuMode.GUEST:
            self.exit_async()
            return True
        return False
