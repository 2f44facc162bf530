"""No async PF: every fault that needs I/O blocks the vCPU thread until the page is in.

This is the baseline the seed's series measured against ("without APF"): the host's GUP
in ``user_mem_abort`` sleeps on the swap read, so the whole vCPU stalls, and the guest
cannot run anything else meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from apfsim.abi.arm64 import SMCCC_RET_NOT_SUPPORTED
from apfsim.host.async_pf import AsyncPf, WorkMemo, WorkTable
from apfsim.ports import (
    Broken,
    FaultDecision,
    FaultResult,
    GuestCallKind,
    GuestView,
    HostPorts,
    Injection,
    KernelPort,
    SyncCause,
)
from apfsim.protocols.common import GuestBase, ProtocolOptions

__all__ = ["NoApfGuest", "SyncHost"]

_SYNC = FaultResult(FaultDecision.SYNC, cause=SyncCause.NO_APF)


class SyncHost:
    """A host without async PF (or a guest that never enabled it)."""

    name: ClassVar[str] = "sync"
    mutant: str | None = None

    @classmethod
    def create(
        cls, blocks: Sequence[Any], n_vcpus: int, ports: HostPorts, opt: ProtocolOptions
    ) -> SyncHost:
        return cls()

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

    def check_arch(self, vcpu: int, in_guest: bool) -> Broken:
        return None

    def lapic_enabled(self, vcpu: int) -> bool:
        return True

    def kvm_lapic_set_enabled(self, vcpu: int, enabled: bool) -> None:
        pass

    def narrow_token_ids(self, bits: int) -> None:
        pass

    def freeze(self, works: WorkMemo) -> tuple[Any, ...]:
        return ()

    def thaw(self, state: tuple[Any, ...], works: WorkTable) -> None:
        pass


class NoApfGuest(GuestBase):
    """A guest without the PV driver (or booted with ``no-kvmapf``): every hook a no-op."""

    @classmethod
    def create(cls, port: KernelPort, n_cpus: int, opt: ProtocolOptions) -> NoApfGuest:
        return cls()
