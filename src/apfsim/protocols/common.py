"""What every arch host shares, as the kernel's generic file shares it across arches.

The per-vCPU lifecycle state of the generic core, the prefault hook
(``kvm_arch_async_page_ready``: map the page in stage 2 before telling the guest), the
worker's completion (``async_pf_execute``), the NOWAIT GUP step and the counters. A variant
subclasses this and implements only its own delivery hooks.
"""

from __future__ import annotations

from typing import Any

from apfsim.host.async_pf import AsyncPf, VcpuAsyncPf, async_pf_execute
from apfsim.metrics.accumulators import counter_dict
from apfsim.protocols.base import GuestCallKind, GupNowaitFn, PrefaultFn

__all__ = ["HostBase"]


class HostBase:
    """Shared host state and the arch-independent hooks; ``stats`` counts prefaults."""

    stats: Any  # a counters dataclass with `prefaults` and `prefaults_missed`

    def __init__(self, n_vcpus: int, prefault: PrefaultFn, gup_nowait: GupNowaitFn | None) -> None:
        self.prefault = prefault
        self.gup_nowait = gup_nowait
        self.apf = [VcpuAsyncPf(vcpu_id=i) for i in range(n_vcpus)]

    def gup_nowait_first(self, gfn: int) -> None:
        """FOLL_NOWAIT GUP: submits the swap read (with readahead) and returns at once."""
        if self.gup_nowait is not None:
            self.gup_nowait(gfn)

    def kvm_arch_async_page_ready(self, vcpu_id: int, work: AsyncPf) -> None:
        """Prefault the page so the woken task's retry does not fault again."""
        self.stats.prefaults += 1
        if not self.prefault(work.gfn):
            self.stats.prefaults_missed += 1

    def worker_done(self, work: AsyncPf) -> bool:
        return async_pf_execute(self.apf[work.vcpu_id], self, work)  # type: ignore[arg-type]

    def request_pending(self, vcpu: int) -> bool:
        return False

    def call_kind(self, call: int) -> GuestCallKind:
        """Every paravirt call is a plain hypercall unless the variant says otherwise."""
        return GuestCallKind.HYPERCALL

    def counters(self) -> dict[str, int]:
        return counter_dict(self.stats)
