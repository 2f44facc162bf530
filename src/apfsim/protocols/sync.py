"""No async PF: every fault that needs I/O blocks the vCPU thread until the page is in.

This is the baseline the seed's series measured against ("without APF"): the host's GUP
in ``user_mem_abort`` sleeps on the swap read, so the whole vCPU stalls, and the guest
cannot run anything else meanwhile.
"""

from __future__ import annotations

from apfsim.guest.kvm_apf_arm64 import SMCCC_RET_NOT_SUPPORTED
from apfsim.host.async_pf import AsyncPf
from apfsim.protocols.base import (
    AbortOutcome,
    FaultDecision,
    FaultResult,
    GuestCallKind,
    GuestRegs,
    GuestView,
    Injection,
    SyncCause,
)

__all__ = ["NoApfGuest", "SyncHost"]

_SYNC = FaultResult(FaultDecision.SYNC, cause=SyncCause.NO_APF)


class SyncHost:
    """A host without async PF (or a guest that never enabled it)."""

    name = "sync"

    def try_async_pf(self, vcpu: int, gfn: int, view: GuestView, now_ns: int) -> FaultResult:
        return _SYNC

    def run_loop_iteration(self, vcpu: int, view: GuestView) -> list[AsyncPf]:
        return []

    def worker_done(self, work: AsyncPf) -> bool:
        raise AssertionError("the sync protocol starts no async work")

    def vcpu_runnable(self, vcpu: int) -> bool:
        return False

    def take_injection(self, vcpu: int) -> Injection | None:
        return None

    def guest_call(self, vcpu: int, call: int, val: int) -> int:
        return SMCCC_RET_NOT_SUPPORTED

    def request_pending(self, vcpu: int) -> bool:
        return False

    def call_kind(self, call: int) -> GuestCallKind:
        return GuestCallKind.HYPERCALL

    def counters(self) -> dict[str, int]:
        return {}


class NoApfGuest:
    """A guest without the PV driver (or booted with ``no-kvmapf``)."""

    def boot(self) -> None:
        pass

    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome:
        return AbortOutcome.NOT_APF

    def on_ret_to_user(self, cpu: int) -> None:
        pass

    def on_idle_entry(self, cpu: int) -> None:
        pass

    def waiter_woken(self, cpu: int, task: int) -> bool:
        return True

    def counters(self) -> dict[str, int]:
        return {}
