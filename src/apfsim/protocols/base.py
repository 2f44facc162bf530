"""What the simulator (and later the model checker) asks of a protocol variant.

A variant is a pair: the host's arch hooks over the generic core
(:mod:`apfsim.host.async_pf`) and the guest's driver. Both are plain code over explicit
state; time, I/O and scheduling stay in the simulator, which calls these entry points at
the kernel's call sites.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from apfsim.host.async_pf import AsyncPf

__all__ = [
    "AbortOutcome",
    "FaultDecision",
    "FaultResult",
    "GuestCallKind",
    "GuestProtocol",
    "GuestRegs",
    "GuestView",
    "GupNowaitFn",
    "HostProtocol",
    "Injection",
    "InjectionKind",
    "PrefaultFn",
    "SyncCause",
]

PrefaultFn = Callable[[int], bool]
"""Map a gfn into stage 2 if it is resident; False if it was reclaimed meanwhile."""

GupNowaitFn = Callable[[int], None]
"""GUP with FOLL_NOWAIT on a swapped gfn: submits the swap read (with readahead), no wait."""


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

    name: str

    def try_async_pf(self, vcpu: int, gfn: int, view: GuestView, now_ns: int) -> FaultResult: ...

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


class GuestProtocol(Protocol):
    """Guest entry points the guest CPU model calls."""

    def boot(self) -> None: ...

    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome: ...

    def on_ret_to_user(self, cpu: int) -> None: ...

    def on_idle_entry(self, cpu: int) -> None: ...

    def waiter_woken(self, cpu: int, task: int) -> bool: ...

    def counters(self) -> dict[str, int]: ...
