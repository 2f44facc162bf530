"""x86 upstream (5.10+): not-present as #PF, page-ready as an interrupt with an ACK MSR.

Host hooks (``arch/x86/kvm/x86.c``, ``mmu/mmu.c``; spec §1):

* ``__kvm_faultin_pfn``: NOWAIT first; then, if ``kvm_can_do_async_pf`` (interrupts
  allowed): a gfn already outstanding on this vCPU is a repeated fault and halts the vCPU
  (KVM_REQ_APF_HALT); otherwise ``kvm_arch_setup_async_pf``. Interrupts off: synchronous.
* ``kvm_arch_async_page_not_present``: inject #PF(token) with ``flags = NOT_PRESENT`` if
  ``kvm_can_deliver_async_pf`` (enabled with DELIVERY_AS_INT, user mode unless SEND_ALWAYS),
  else the artificial halt. The core records which (``notpresent_injected``).
* ``kvm_arch_async_page_present_queued``: KVM_REQ_APF_READY, and a kick unless a page-ready
  is already in flight. ``kvm_arch_can_dequeue_async_page_present``: the guest's ``token``
  slot is free. ``kvm_arch_async_page_present``: write the token and raise the vector only
  for injected not-presents (or wake-all); always end the halt.
* ``MSR_KVM_ASYNC_PF_ACK``: clear ``pageready_pending`` and deliver the next completion
  inline: at most one page-ready in flight per vCPU.
* Tokens are ``(id++ << 12) | vcpu_id``, skipping ids whose shifted value is 0 (B9 fix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from apfsim.abi.x86 import (
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_RESERVED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    WAKE_ALL_TOKEN,
    X86ApfData,
)
from apfsim.host.async_pf import (
    AsyncPf,
    WorkMemo,
    WorkTable,
    kvm_async_pf_wakeup_all,
    kvm_check_async_pf_completion,
    kvm_clear_async_pf_completion_queue,
)
from apfsim.ports import (
    Broken,
    FaultDecision,
    FaultResult,
    GuestCallKind,
    GuestView,
    GupNowaitFn,
    HostPorts,
    Injection,
    InjectionKind,
    KickFn,
    PrefaultFn,
    SyncCause,
)
from apfsim.protocols.common import ApfCounters, GfnHash, HostBase, ProtocolOptions
from apfsim.snapshot import Fields

__all__ = ["X86Counters", "X86Host", "make_x86_token"]

_HALT = FaultResult(FaultDecision.HALT)


def make_x86_token(apf_id: int, vcpu_id: int) -> int:
    return ((apf_id << 12) | vcpu_id) & 0xFFFF_FFFF


@dataclass
class VcpuApfX86:
    """``vcpu->arch.apf`` (x86) plus the vCPU's pending events."""

    block: X86ApfData  # the guest's per-CPU data block (flags, token)
    msr_en_val: int = 0
    vec: int = 0
    id: int = 0
    send_user_only: bool = True
    pageready_pending: bool = False
    halted: bool = False
    apf_ready_request: bool = False  # KVM_REQ_APF_READY
    gfns: GfnHash = field(default_factory=GfnHash)
    pending_pf: int | None = None  # CR2 of a #PF to inject at the next entry
    pending_irq: bool = False  # the page-ready vector is pending in the LAPIC
    acked: list[AsyncPf] = field(default_factory=list)  # delivered inline by an ACK
    lapic_enabled: bool = True  # the guest's LAPIC software-enable (SPIV) bit
    ack_window: bool = False  # an ACK ran since the last run-loop iteration (B12 model)
    request_after_ack: bool = False  # APF_READY was set inside that window (B12 model)
    request_hidden: bool = False  # B12: that store not yet visible to this entry's checks
    view: GuestView = field(default_factory=lambda: GuestView(privileged=False))

    @property
    def enabled(self) -> bool:
        """``kvm_pv_async_pf_enabled``: EN and DELIVERY_AS_INT both set."""
        want = KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
        return self.msr_en_val & want == want


_BLOCK = Fields.of(X86ApfData)


@dataclass(slots=True)
class X86Counters(ApfCounters):
    not_present_halted: int = 0  # kvm_can_deliver_async_pf false: artificial halt instead
    halt_ended_without_ready: int = 0
    acks: int = 0
    kicks: int = 0
    cancelled: int = 0


class X86Host(HostBase[VcpuApfX86]):
    """The x86 arch hooks over the generic core, one instance per VM."""

    name = "x86"
    token_id_mask = 0xF_FFFF  # apf.id bits that fit above the 12-bit vcpu_id in a u32 token
    reserved_token_zero: ClassVar[bool] = True  # 0 is the free token slot (B9)

    def __init__(
        self,
        blocks: list[X86ApfData],
        prefault: PrefaultFn,
        kick: KickFn,
        gup_nowait: GupNowaitFn | None = None,
    ) -> None:
        super().__init__(len(blocks), prefault, gup_nowait)
        self.kick = kick
        self.arch = [VcpuApfX86(block=b) for b in blocks]
        self.stats = X86Counters()

    @classmethod
    def create(
        cls, blocks: Sequence[Any], n_vcpus: int, ports: HostPorts, opt: ProtocolOptions
    ) -> X86Host:
        """Over the guest's data blocks; a guest without the PV driver (halt-only) never
        registers one, so the host's are blank and never enabled."""
        own = list(blocks) if blocks else [X86ApfData() for _ in range(n_vcpus)]
        return cls(own, ports.prefault, ports.kick, ports.gup_nowait)

    # -- fault path ----------------------------------------------------------------------------
    def kvm_can_do_async_pf(self, vcpu: int, view: GuestView) -> SyncCause | None:
        """No async PF while an event awaits (re)injection (B1: "check pending exception
        before injecting APF"), and "if interrupts are off we cannot even use an artificial
        halt state"; None means it may."""
        if view.exception_pending and self.mutant != "B1":
            return SyncCause.EXCEPTION_PENDING
        if view.irqs_off:
            return SyncCause.IRQS_OFF
        return None

    def apf_enabled(self, vcpu: int) -> bool:
        """``kvm_pv_async_pf_enabled``."""
        return self.arch[vcpu].enabled

    def kvm_can_deliver_async_pf(self, vcpu: int, view: GuestView) -> bool:
        arch = self.arch[vcpu]
        if not self.apf_enabled(vcpu):
            return False
        return not (arch.send_user_only and view.privileged)

    def kvm_async_pf_repeated_fault(self, vcpu: int) -> FaultResult:
        """``kvm_async_pf_repeated_fault``: halt until the outstanding fault-in completes."""
        self.arch[vcpu].halted = True  # KVM_REQ_APF_HALT
        return _HALT

    def kvm_arch_setup_async_pf_token(self, vcpu: int) -> int:
        return self.alloc_apf_token(vcpu)

    def kvm_arch_async_pf_result(self, work: AsyncPf) -> FaultResult:
        """Not-present injected: re-enter; else the artificial halt (KVM_REQ_APF_HALT)."""
        if work.notpresent_injected:
            return FaultResult(FaultDecision.ASYNC, work=work)
        return FaultResult(FaultDecision.HALT, work=work)

    def alloc_apf_token(self, vcpu: int) -> int:
        """``(apf.id++ << 12) | vcpu_id``, never 0 ("make apf token non-zero to fix bug")."""
        arch = self.arch[vcpu]
        arch.id = (arch.id + 1) & self.token_id_mask
        if (arch.id << 12) & 0xFFFF_FFFF == 0 and self.mutant != "B9":
            arch.id = 1
        return make_x86_token(arch.id, vcpu)

    # -- arch hooks ------------------------------------------------------------------------------
    def kvm_arch_async_page_not_present(self, vcpu_id: int, work: AsyncPf) -> bool:
        arch = self.arch[vcpu_id]
        arch.gfns.add(work.gfn)
        if self.kvm_can_deliver_async_pf(vcpu_id, arch.view):
            arch.block.flags = KVM_PV_REASON_PAGE_NOT_PRESENT
            arch.pending_pf = work.token
            self.stats.not_present_injected += 1
            return True
        arch.halted = True  # KVM_REQ_APF_HALT
        self.stats.not_present_halted += 1
        return False

    def ready_token(self, vcpu_id: int, work: AsyncPf) -> int:
        """The token page-ready carries: ~0 for wake-all, else the item's (its gfn leaves
        the hash: ``kvm_del_async_pf_gfn``)."""
        if work.wakeup_all:
            return WAKE_ALL_TOKEN
        self.arch[vcpu_id].gfns.delete(work.gfn)
        return work.token

    def kvm_arch_async_page_present(self, vcpu_id: int, work: AsyncPf) -> None:
        arch = self.arch[vcpu_id]
        token = self.ready_token(vcpu_id, work)
        if (work.wakeup_all or work.notpresent_injected) and self.apf_enabled(vcpu_id):
            arch.block.token = token
            arch.pageready_pending = True
            arch.pending_irq = True
            self.stats.page_ready_injected += 1
        elif arch.halted:
            self.stats.halt_ended_without_ready += 1
        arch.halted = False  # always: this is what ends an artificial halt

    def kvm_arch_can_dequeue_async_page_present(self, vcpu_id: int) -> bool:
        """Disabled: drain. Else the LAPIC must be enabled (B8) and the token slot free (one
        page-ready in flight, B5)."""
        if not self.apf_enabled(vcpu_id):
            return True
        arch = self.arch[vcpu_id]
        lapic_ok = arch.lapic_enabled or self.mutant == "B8"
        slot_free = arch.block.token == 0 or self.mutant == "B5"
        return lapic_ok and slot_free

    def kvm_arch_async_page_present_queued(self, vcpu_id: int) -> None:
        """Request APF_READY; kick unless a page-ready is pending (its ACK will re-check)."""
        arch = self.arch[vcpu_id]
        arch.apf_ready_request = True
        pending = arch.pageready_pending
        if self.mutant == "B12" and arch.ack_window:
            # No barrier: this read may still see the value from before the ACK's clear.
            pending = True
            arch.request_after_ack = True
        if not pending:
            self.stats.kicks += 1
            self.kick(vcpu_id)

    def lapic_enabled(self, vcpu: int) -> bool:
        return self.arch[vcpu].lapic_enabled

    def narrow_token_ids(self, bits: int) -> None:
        self.token_id_mask = (1 << bits) - 1

    # History, not state: the registers at the last exit, what the last ACK delivered, the
    # halt flag that only feeds a counter; ``ack_window`` too, except in B12's model.
    arch_fields = Fields.of(
        VcpuApfX86, exclude=("block", "gfns", "acked", "view", "halted", "ack_window")
    )

    def freeze_own(self, works: WorkMemo) -> tuple[Any, ...]:
        blocks = tuple([_BLOCK.freeze(arch.block) for arch in self.arch])
        if self.mutant == "B12":
            return blocks, tuple([arch.ack_window for arch in self.arch])
        return blocks, None

    def thaw_own(self, state: tuple[Any, ...], works: WorkTable) -> None:
        blocks, windows = state[0], state[1]
        for arch, values in zip(self.arch, blocks, strict=True):
            _BLOCK.thaw(arch.block, values)
        if windows is not None:
            for arch, window in zip(self.arch, windows, strict=True):
                arch.ack_window = window

    def kvm_lapic_set_enabled(self, vcpu_id: int, enabled: bool) -> None:
        """The guest writes the LAPIC software-enable bit; enabling it re-requests APF_READY
        so that completions held back while it was off are delivered (B8's fix)."""
        arch = self.arch[vcpu_id]
        arch.lapic_enabled = enabled
        if enabled and self.apf[vcpu_id].done:
            arch.apf_ready_request = True

    # -- run loop and MSRs -----------------------------------------------------------------------
    def run_loop_iteration(self, vcpu: int, view: GuestView) -> list[AsyncPf]:
        """``vcpu_enter_guest``: KVM_REQ_APF_READY -> ``kvm_check_async_pf_completion``."""
        arch = self.arch[vcpu]
        arch.view = view
        delivered, arch.acked = arch.acked, []
        # Without the barrier (B12) the request set after the ACK may not be seen here.
        missed = self.mutant == "B12" and arch.request_after_ack
        arch.ack_window = arch.request_after_ack = False
        arch.request_hidden = missed
        if arch.apf_ready_request and not missed:
            arch.apf_ready_request = False
            delivered.extend(kvm_check_async_pf_completion(self.apf[vcpu], self))
        return delivered

    def vcpu_runnable(self, vcpu: int) -> bool:
        """``kvm_vcpu_has_events``: its first test is a non-empty ``done`` list."""
        return bool(self.apf[vcpu].done) or self.arch[vcpu].pending_irq

    def take_injection(self, vcpu: int) -> Injection | None:
        arch = self.arch[vcpu]
        if arch.pending_pf is not None:
            token, arch.pending_pf = arch.pending_pf, None
            return Injection(InjectionKind.PAGE_FAULT, token)
        if arch.pending_irq:
            arch.pending_irq = False
            return Injection(InjectionKind.INTERRUPT, arch.vec)
        return None

    def request_pending(self, vcpu: int) -> bool:
        arch = self.arch[vcpu]
        return arch.apf_ready_request and not arch.request_hidden

    def call_kind(self, call: int) -> GuestCallKind:
        return GuestCallKind.ACK if call == MSR_KVM_ASYNC_PF_ACK else GuestCallKind.HYPERCALL

    def guest_call(self, vcpu: int, call: int, val: int) -> int:
        """A WRMSR exit from the guest."""
        arch = self.arch[vcpu]
        if call == MSR_KVM_ASYNC_PF_INT:
            arch.vec = val & 0xFF
            return 0
        if call == MSR_KVM_ASYNC_PF_ACK:
            if val & 1:
                self.stats.acks += 1
                arch.pageready_pending = False
                arch.ack_window = True
                # Delivered inline; reported with the next run-loop iteration's deliveries.
                arch.acked.extend(kvm_check_async_pf_completion(self.apf[vcpu], self))
            return 0
        if call == MSR_KVM_ASYNC_PF_EN:
            return self.kvm_pv_enable_async_pf(vcpu, val)
        return 1

    def apf_on(self, vcpu: int) -> bool:
        return self.apf_enabled(vcpu)

    def check_arch(self, vcpu: int, in_guest: bool) -> Broken:
        """I3: one page-ready in flight, with its token in the slot; I9: a ready request on
        a running vCPU was kicked or waits for a pending ACK (B12)."""
        arch = self.arch[vcpu]
        pending = arch.pageready_pending
        if pending and arch.block.token == 0 and self.apf_enabled(vcpu):
            return "I3", f"vCPU{vcpu}: pageready_pending with an empty token slot"
        if not in_guest or not arch.apf_ready_request or pending:
            return None  # missed_kick's first tests, without the call (at every check)
        return self.missed_kick(vcpu, in_guest, True, False)

    def kvm_pv_enable_async_pf(self, vcpu: int, val: int) -> int:
        """A write of MSR_KVM_ASYNC_PF_EN; 1 means the WRMSR fails (#GP)."""
        if val & KVM_ASYNC_PF_RESERVED:
            return 1  # bits 5:4 are reserved
        arch = self.arch[vcpu]
        arch.msr_en_val = val
        if not self.apf_enabled(vcpu):
            self.stats.cancelled += len(kvm_clear_async_pf_completion_queue(self.apf[vcpu]))
            arch.gfns.reset()
            return 0
        arch.send_user_only = not val & KVM_ASYNC_PF_SEND_ALWAYS
        if kvm_async_pf_wakeup_all(self.apf[vcpu], self, WAKE_ALL_TOKEN) is not None:
            self.stats.wakeup_all_queued += 1
        return 0
