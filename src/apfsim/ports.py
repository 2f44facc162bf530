"""The narrow collaborators each component is given, instead of a whole simulation.

Only Protocols and plain data live here: what the host and the guest see of each other
(``GuestView``, ``GuestRegs``, ``Injection``), what a protocol variant offers the run loop
(``HostProtocol``, ``GuestProtocol``), the kernel services its guest driver calls
(``KernelPort``), the host services its arch hooks call (``HostPorts``), and the ports of the
run loop itself (``Clock``, ``VcpuSide``, ``GuestSide``, ``HostIo``, ``GuestServices``,
``Checker``, ``Probe``) with the one :class:`RunCounters` everything counts into. The
simulator implements the ports with time; the model checker with choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Protocol

from apfsim.host.async_pf import AsyncPf, WorkMemo, WorkTable
from apfsim.metrics.accumulators import LatencySamples

__all__ = [
    "NOWAIT_MAPPED",
    "NOWAIT_MINOR",
    "NOWAIT_NEEDS_IO",
    "NOWAIT_ZERO_FILL",
    "AbortOutcome",
    "Broken",
    "Checker",
    "Clock",
    "FaultDecision",
    "FaultResult",
    "GuestCallKind",
    "GuestProtocol",
    "GuestRegs",
    "GuestServices",
    "GuestSide",
    "GuestView",
    "GupNowaitFn",
    "HostIo",
    "HostPorts",
    "HostProtocol",
    "Injection",
    "InjectionKind",
    "KernelPort",
    "KickFn",
    "PrefaultFn",
    "Probe",
    "RunCounters",
    "SharedBlock",
    "SleepLog",
    "StartWorkerFn",
    "SyncCause",
    "VcpuSide",
    "WaitNode",
]

PrefaultFn = Callable[[int], bool]
"""Map a gfn into stage 2 if it is resident; False if it was reclaimed meanwhile."""

GupNowaitFn = Callable[[int], None]
"""GUP with FOLL_NOWAIT on a swapped gfn: submits the swap read (with readahead), no wait."""

KickFn = Callable[[int], None]
"""``kvm_vcpu_kick``: force vCPU ``n`` out of the guest if it runs there."""

StartWorkerFn = Callable[[AsyncPf], None]
"""``schedule_work`` of an item's ``async_pf_execute`` on a kworker."""


@dataclass(frozen=True)
class GuestView:
    """The guest registers the host reads at an exit: exception level and PC."""

    privileged: bool
    pc_offset: int | None = None  # PC - VBAR_EL1 while in vector/entry code, else None
    elr_saved: bool = True  # False in entry code before kernel_entry saved ELR/SPSR
    irqs_off: bool = False  # x86: IF=0 (no artificial halt possible either)
    exception_pending: bool = False  # an event awaits (re)injection at this exit


@dataclass(frozen=True)
class GuestRegs:
    """What the guest's abort handler can see of the interrupted context."""

    user_mode: bool
    preempt_count: int = 0
    rcu_depth: int = 0
    is_idle_task: bool = False
    irqs_off: bool = False


class AbortOutcome(Enum):
    """What the guest CPU does after its abort/APF handler returns."""

    NOT_APF = "not_apf"  # an ordinary abort (an injected one here is a guest crash)
    DUMMY_CONSUMED = "dummy_consumed"  # wake came first: the task retries at once
    WAIT_SCHEDULE = "wait_schedule"  # task set TASK_UNINTERRUPTIBLE and calls schedule()
    WAIT_HALT = "wait_halt"  # task spins in dsb(sy); wfi() until its node is unhashed
    WOKE = "woke"  # a page-ready was handled; return to the interrupted context
    RETRY = "retry"  # the guest declines to wait: return and retry the access
    ILLEGAL_REASON = "illegal_reason"


class InjectionKind(Enum):
    """How the host delivers a signal into the guest at the next entry."""

    DATA_ABORT = "data_abort"  # arm64 synchronous external abort, FAR = payload (RFCv2)
    PAGE_FAULT = "page_fault"  # x86 #PF, CR2 = payload
    INTERRUPT = "interrupt"  # a vector / PPI; the token is in shared memory
    SDEI = "sdei"  # an SDEI event dispatched to the guest's handler

    @property
    def synchronous(self) -> bool:
        """Exceptions are taken at once; an interrupt waits until the guest unmasks IRQs."""
        return self is not InjectionKind.INTERRUPT


@dataclass(frozen=True)
class Injection:
    kind: InjectionKind
    payload: int


class GuestCallKind(Enum):
    """What a guest exit for a paravirt call costs the host (``host.costs`` in a scenario)."""

    HYPERCALL = "hypercall"  # an HVC / VMCALL / PV-MSR write: enable, set range, populate
    ACK = "ack"  # the page-ready ACK (MSR_KVM_ASYNC_PF_ACK, ASYNC_PF_IRQ_ACK)
    SDEI_COMPLETE = "sdei_complete"  # SDEI_EVENT_COMPLETE: restore the interrupted context


class FaultDecision(Enum):
    """The outcome of the host's try_async_pf for a fault that needs I/O."""

    ASYNC = "async"  # work queued; re-enter the guest (not-present injected)
    REPEATED = "repeated"  # gfn already outstanding: re-enter without new work
    HALT = "halt"  # artificial halt (KVM_REQ_APF_HALT) until the page is in or an IRQ comes
    SYNC = "sync"  # fault the page in synchronously in the vCPU thread
    USER_EXIT = "user_exit"  # KVM_EXIT_MEMORY_FAULT: the VMM's vCPU thread fetches the page


class SyncCause(Enum):
    """Why a fault that needed I/O was handled synchronously."""

    NO_APF = "no_apf"  # protocol without async PF, or APF not enabled by the guest
    QUEUE_FULL = "queue_full"  # queued == ASYNC_PF_PER_VCPU
    GATED_CONTEXT = "gated_context"  # send_user_only and the guest was privileged
    WINDOW = "window"  # PC inside the no-inject window
    REASON_BUSY = "reason_busy"  # previous signal not consumed (reason != 0)
    IRQS_OFF = "irqs_off"  # x86 kvm_can_do_async_pf: interrupts not allowed
    GUEST_DECLINED = "guest_declined"  # guest-initiated: told, but it could not sleep
    EXCEPTION_PENDING = "exception_pending"  # x86: an event awaits (re)injection (B1 fix)


@dataclass(slots=True, frozen=True)
class FaultResult:
    decision: FaultDecision
    work: AsyncPf | None = None
    cause: SyncCause | None = None


class HostProtocol(Protocol):
    """Host entry points the vCPU run loop calls."""

    name: ClassVar[str]
    mutant: str | None

    def try_async_pf(self, vcpu: int, gfn: int, view: GuestView, now_ns: int) -> FaultResult: ...

    def freeze(self, works: WorkMemo) -> tuple[Any, ...]:
        """The host's state as plain values, items by position in ``works`` (the checker)."""
        ...

    def thaw(self, state: tuple[Any, ...], works: WorkTable) -> None: ...

    def run_loop_iteration(self, vcpu: int, view: GuestView) -> list[AsyncPf]: ...

    def worker_done(self, work: AsyncPf) -> bool: ...

    def vcpu_runnable(self, vcpu: int) -> bool: ...

    def take_injection(self, vcpu: int) -> Injection | None: ...

    def guest_call(self, vcpu: int, call: int, val: int) -> int:
        """A guest-initiated exit: WRMSR (x86) or an SMCCC/hypercall (arm64)."""
        ...

    def call_kind(self, call: int) -> GuestCallKind:
        """Which named cost the guest exit for ``call`` pays."""
        ...

    def request_pending(self, vcpu: int) -> bool:
        """``kvm_request_pending``: a request (APF_READY) was made after this entry's
        run-loop iteration; KVM re-checks it with the vCPU in IN_GUEST_MODE and does not
        stay in the guest."""
        ...

    def counters(self) -> dict[str, int]: ...

    def check_arch(self, vcpu: int, in_guest: bool) -> Broken:
        """The variant's own invariants of ``vcpu`` (apfsim.invariants)."""
        ...

    def lapic_enabled(self, vcpu: int) -> bool: ...

    def kvm_lapic_set_enabled(self, vcpu: int, enabled: bool) -> None: ...

    def narrow_token_ids(self, bits: int) -> None: ...


class GuestProtocol(Protocol):
    """Guest entry points the guest CPU model calls."""

    mutant: str | None

    def boot(self) -> None: ...

    def freeze(self) -> tuple[Any, ...]:
        """The driver's state as plain values (the model checker's key)."""
        ...

    def thaw(self, state: tuple[Any, ...]) -> None: ...

    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome: ...

    def on_ret_to_user(self, cpu: int) -> None: ...

    def on_idle_entry(self, cpu: int) -> None: ...

    def waiter_woken(self, cpu: int, task: int) -> bool: ...

    def on_context_switch(self, cpu: int, task: int) -> None: ...

    def counters(self) -> dict[str, int]: ...

    def shared_blocks(self) -> Sequence[SharedBlock]:
        """The per-CPU data blocks the guest registered with the host."""
        ...

    sleep_log: SleepLog | None

    def wait_nodes(self) -> list[WaitNode]:
        """Every sleep record the driver holds (I6)."""
        ...

    def cpu_offline(self, cpu: int) -> None: ...

    def cpu_online(self, cpu: int) -> None: ...

    def reboot(self) -> None: ...


class KernelPort(Protocol):
    """The guest-kernel services a guest driver calls (``current``, wake-ups, IPIs,
    allocation) and its exits to the host (SMCCC, WRMSR, hypercall)."""

    def current_task(self, cpu: int) -> int: ...

    def rq_is_locked(self, cpu: int) -> bool: ...

    def swake_up_one(self, task: int) -> None: ...

    def smp_send_reschedule(self, cpu: int) -> None: ...

    def kzalloc_atomic(self, cpu: int) -> bool: ...

    def smccc_apf(self, cpu: int, val: int) -> int: ...

    def smccc(self, cpu: int, function: int, val: int) -> int: ...

    def wrmsr(self, cpu: int, msr: int, val: int) -> None: ...

    def hypercall(self, cpu: int, nr: int, arg: int) -> int: ...


@dataclass(frozen=True, slots=True)
class HostPorts:
    """The host services the arch hooks call (the simulator and the checker provide them)."""

    prefault: PrefaultFn
    kick: KickFn
    gup_nowait: GupNowaitFn
    start_worker: StartWorkerFn
    now: Callable[[], int]
    # The userfault bitmap (KVM_MEM_USERFAULT): True for a gfn still on a postcopy source.
    # None: the run models no postcopy, so no memslot has the flag.
    userfault: Callable[[int], bool] | None = None


class SharedBlock(Protocol):
    """A guest per-CPU APF data block: the guest's ``enabled`` word and the words the host
    writes (what I8 watches after the guest disabled async PF)."""

    enabled: int

    def words(self) -> tuple[int, ...]: ...


WaitNode = tuple[int, int, int, bool]
"""A guest sleep record as the invariants see it: ``(scope, task, token, dummy)``. ``scope``
is the CPU whose list holds it, or -1 for one global table (x86); ``task`` is -1 for the idle
task. NOTE: a plain tuple, built by the driver's list comprehension, for performance (one
per node at every APF handler's check)."""


class SleepLog(Protocol):
    """Told of each sleep record a guest driver links or unlinks, as it does it (the run's
    invariant checker keeps I6's bookkeeping from it instead of walking every list)."""

    def node_added(self, scope: int, task: int, token: int, dummy: bool) -> None:
        """``hlist_add_head`` of a record, as :data:`WaitNode` fields."""
        ...

    def node_removed(self, scope: int, task: int, token: int, dummy: bool) -> None:
        """``hlist_del_init`` of a record, as :data:`WaitNode` fields."""
        ...


Broken = tuple[str, str] | None
"""A broken invariant as ``(name, detail)``, or None."""


# -- the run loop's ports ----------------------------------------------------------------------


class Clock(Protocol):
    """Simulated time (the engine): integer nanoseconds and callbacks."""

    now: int

    def at(self, time_ns: int, callback: Callable[[Any], object], arg: Any = None) -> Any: ...

    def after(self, delay_ns: int, callback: Callable[[Any], object], arg: Any = None) -> Any: ...

    def cancel(self, handle: Any) -> None: ...

    def next_is(self, time_ns: int) -> bool:
        """Would an event at ``time_ns`` scheduled now run next (see Engine.next_is)?"""
        ...

    def advance_to(self, time_ns: int) -> None:
        """Run such an event in place: the clock moves to it."""
        ...


class HostIo(Protocol):
    """The host memory and I/O a vCPU thread touches: stage-2 state, swap reads, workers."""

    def resolve_nowait(self, gfn: int) -> int:
        """The fault-in that needs no I/O: :data:`NOWAIT_MAPPED`, :data:`NOWAIT_ZERO_FILL`,
        :data:`NOWAIT_MINOR`, or :data:`NOWAIT_NEEDS_IO` (nothing done)."""
        ...

    def read_page(
        self, gfn: int, on_done: Callable[[Any], object], arg: Any, vcpu: int = 0
    ) -> None:
        """Wait for ``gfn`` to be in memory (join or start its read), then ``on_done(arg)``;
        ``vcpu`` names the thread's vCPU (its uffd, when there is one per vCPU)."""
        ...

    def fetch_in_user(self, gfn: int, on_done: Callable[[Any], object], arg: Any) -> None:
        """A memory-fault exit: the VMM's vCPU thread brings the page in, then re-enters."""
        ...

    def map_after_read(self, gfn: int) -> None:
        """The synchronous fault-in's own GUP returned: map the page if still in swap cache."""
        ...

    def start_worker(self, work: AsyncPf) -> None:
        """``schedule_work``: a kworker runs the item's ``async_pf_execute``."""
        ...

    def running_workers(self) -> Iterable[AsyncPf]:
        """The items whose worker's GUP is under way."""
        ...

    def on_worker_idle(self, vcpu: int, callback: Callable[[], object]) -> None:
        """Call ``callback`` once no cancelled item of ``vcpu`` has its GUP running."""
        ...


NOWAIT_MAPPED, NOWAIT_ZERO_FILL, NOWAIT_MINOR, NOWAIT_NEEDS_IO = range(4)


class GuestSide(Protocol):
    """What the vCPU thread sees of its guest CPU."""

    timer_pending: bool
    ipi_pending: bool
    stolen_ns: int

    folding: bool  # the running segment takes minor faults in line (workloads.base.MinorFold)

    def interrupt(self, now: int) -> None: ...

    def unfold(self, now: int) -> None:
        """Something reaches the vCPU during in-line faults: run each as its own exit."""
        ...

    def context(self) -> Any: ...

    def take_events(self, injections: list[Injection], lapic_enabled: bool) -> None:
        """At entry; an interrupt raised into a software-disabled LAPIC is lost."""
        ...

    def resume(self) -> None: ...


class VcpuSide(Protocol):
    """What the guest CPU asks of its vCPU thread: the exits it takes, and its time clock."""

    clock: Any  # a VcpuClock: the time category the vCPU is in
    fold_ok: bool  # nothing has reached the vCPU since its last entry's run-loop iteration

    def stage2_fault(self, gfn: int, ctx: Any) -> None: ...

    def charge_folded(self, faults: int) -> None:
        """``faults`` minor faults a task segment took in line: their counts and host time."""
        ...

    def fold_fault(self, gfn: int, start: int) -> None:
        """The in-line minor fault on ``gfn`` begun at ``start`` goes on as its own exit."""
        ...

    def wfi(self, halt: bool) -> None: ...

    def exit_for_guest_call(self, exits: int, handling_ns: int, ctx: Any = None) -> None: ...


class Checker(Protocol):
    """The invariants, where the kernel would assert (None with ``--no-check``)."""

    def note(self, vcpu: int, what: Any, value: int, key: Any = None) -> None:
        """A protocol event for a later report: ``what`` is its label, or with ``key`` a
        table of labels looked up only when a report is written."""
        ...

    def check_vcpu(self, vcpu: int, in_guest: bool) -> None: ...

    def check_entry(self, vcpu: int) -> None:
        """``vcpu`` entered the guest (or tried to): its host invariants, if an APF event
        happened since its last entry check."""
        ...

    def check_worker(self, vcpu: int, in_guest: bool) -> None: ...

    def check_guest(self) -> None: ...

    def task_slept(self, task: int) -> None:
        """``task`` went to sleep in the APF wait (TASK_UNINTERRUPTIBLE, then schedule())."""
        ...

    def vcpu_halted(self, vcpu: int) -> None:
        """``vcpu`` blocked in a guest HLT / WFI with its guest tick armed."""
        ...


class Probe(Protocol):
    """Tracepoints of a run (None when untraced): :mod:`apfsim.trace` implements them."""

    def try_async(self, vcpu: int, gfn: int, repeated: bool) -> None: ...

    def spin_refaults(self, vcpu: int, gfn: int, since: int, count: int, every: int) -> None: ...

    def apf_setup(self, work: AsyncPf) -> None: ...

    def apf_completed(self, work: AsyncPf) -> None: ...

    def apf_ready(self, vcpu: int, work: AsyncPf) -> None: ...

    def apf_wait(self, task: Any, cpu: int, token: int, halted: bool) -> None: ...

    def task_woken(self, task: Any) -> None: ...

    def task_state(self, task: Any) -> None: ...


class RunCounters:
    """Everything a run counts, in one place: the vCPU threads, the guest CPUs, the kernel
    port and the I/O count here; :mod:`apfsim.metrics.collect` turns it into results. The
    tracepoint counts are what the kernel's APF tracepoints would count."""

    __slots__ = (
        "apf_sleeps",
        "async_faults",
        "context_switches",
        "fault_latency",
        "guest_bogus_aborts",
        "halts",
        "ipis",
        "kicks",
        "kvm_async_pf_completed",
        "kvm_async_pf_not_present",
        "kvm_async_pf_ready",
        "kvm_async_pf_repeated_fault",
        "kvm_try_async_get_page",
        "minor",
        "needs_io",
        "ready_latency",
        "repeated_spins",
        "sync_causes",
        "wake_all",
        "wake_of_non_sleeper",
        "zero_fill",
    )

    def __init__(self) -> None:
        self.zero_fill = self.minor = self.needs_io = self.async_faults = 0
        self.halts = self.repeated_spins = 0
        self.sync_causes: dict[SyncCause, int] = dict.fromkeys(SyncCause, 0)
        self.apf_sleeps = self.guest_bogus_aborts = self.wake_of_non_sleeper = 0
        self.context_switches = self.ipis = self.kicks = 0
        self.kvm_try_async_get_page = self.kvm_async_pf_not_present = 0
        self.kvm_async_pf_ready = self.kvm_async_pf_completed = 0
        self.kvm_async_pf_repeated_fault = self.wake_all = 0
        self.fault_latency = LatencySamples()  # fault-in I/O: sync stall or worker GUP
        self.ready_latency = LatencySamples()  # not-present injected -> page-ready delivered


class GuestServices(Protocol):
    """The guest kernel around one CPU: task workloads, the driver call site, IPIs."""

    memory: Any  # the stage-2 view the workloads plan against (GuestMemory)

    @property
    def workloads(self) -> Sequence[Any]:
        """Each task's workload, by tid."""
        ...

    def workload_of(self, task: Any) -> Any: ...

    def run_driver(self, cpu: int, fn: Callable[..., Any], *args: Any) -> Any: ...

    def send_ipi(self, cpu: int, sender: int) -> None: ...

    def task_finished(self, task: Any) -> None: ...
