"""x86 from 2.6.38 to 5.7: both signals as #PF, SEND_ALWAYS, no ACK, no kick.

The hooks that differ from upstream (``arch/x86/kvm/x86.c`` before Vitaly Kuznetsov's 2020
series, B5):

* enabled = the EN bit alone (``apf_enabled``); the guest sets SEND_ALWAYS, so the shared
  not-present hook injects in kernel mode too (an artificial halt only with APF off or,
  without SEND_ALWAYS, at CPL 0);
* page-ready writes ``reason = PAGE_READY`` and injects another #PF with CR2 = token; if the
  not-present #PF is still pending (not yet delivered), both are cancelled instead;
* ``kvm_arch_can_inject_async_page_present``: interrupts allowed and no exception pending
  (B1: "check pending exception before injecting APF"); the guest's ``reason`` word is not
  checked, so a page-ready can overwrite a not-present the guest has not read yet (the race
  behind B2's #DF fix);
* completions are checked on every run-loop iteration and a running vCPU is not kicked;
* tokens ``(id++ << 12) | vcpu_id`` may be 0 (the B9 fix came in 2022).
"""

from __future__ import annotations

from typing import ClassVar

from apfsim.abi.x86 import (
    KVM_ASYNC_PF_ENABLED,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    MSR_KVM_ASYNC_PF_EN,
)
from apfsim.host.async_pf import AsyncPf, kvm_check_async_pf_completion
from apfsim.ports import GuestView, Injection, InjectionKind
from apfsim.protocols.x86 import X86Host, make_x86_token

__all__ = ["X86LegacyHost"]


class X86LegacyHost(X86Host):
    """The pre-5.8 x86 arch hooks."""

    name = "x86-legacy"
    reserved_token_zero: ClassVar[bool] = False  # tokens may be 0 until B9's fix (2022)

    def apf_enabled(self, vcpu: int) -> bool:
        return bool(self.arch[vcpu].msr_en_val & KVM_ASYNC_PF_ENABLED)

    def alloc_apf_token(self, vcpu: int) -> int:
        arch = self.arch[vcpu]
        token = make_x86_token(arch.id, vcpu)
        arch.id = (arch.id + 1) & 0xF_FFFF
        return token

    def kvm_arch_async_page_present(self, vcpu_id: int, work: AsyncPf) -> None:
        arch = self.arch[vcpu_id]
        token = self.ready_token(vcpu_id, work)
        if self.apf_enabled(vcpu_id):
            if arch.block.flags == KVM_PV_REASON_PAGE_NOT_PRESENT and arch.pending_pf is not None:
                # The not-present #PF is still pending: drop both, the guest never knows.
                arch.pending_pf = None
                arch.block.flags = 0
                self.stats.cancelled += 1
            else:
                arch.block.flags = KVM_PV_REASON_PAGE_READY
                arch.pending_pf = token
                self.stats.page_ready_injected += 1
        arch.halted = False

    def kvm_arch_can_dequeue_async_page_present(self, vcpu_id: int) -> bool:
        """``kvm_arch_can_inject_async_page_present`` (pre-5.8)."""
        if not self.apf_enabled(vcpu_id):
            return True
        arch = self.arch[vcpu_id]
        return not arch.view.irqs_off and arch.pending_pf is None

    def kvm_arch_async_page_present_queued(self, vcpu_id: int) -> None:
        """No such hook before 5.8: the completion waits for the next run-loop iteration."""

    def run_loop_iteration(self, vcpu: int, view: GuestView) -> list[AsyncPf]:
        self.arch[vcpu].view = view
        return kvm_check_async_pf_completion(self.apf[vcpu], self)

    def vcpu_runnable(self, vcpu: int) -> bool:
        return bool(self.apf[vcpu].done) or self.arch[vcpu].pending_pf is not None

    def take_injection(self, vcpu: int) -> Injection | None:
        arch = self.arch[vcpu]
        if arch.pending_pf is None:
            return None
        token, arch.pending_pf = arch.pending_pf, None
        return Injection(InjectionKind.PAGE_FAULT, token)

    def guest_call(self, vcpu: int, call: int, val: int) -> int:
        """Only MSR_KVM_ASYNC_PF_EN exists before 5.8 (no INT vector, no ACK)."""
        if call != MSR_KVM_ASYNC_PF_EN:
            return 1
        return self.kvm_pv_enable_async_pf(vcpu, val)
