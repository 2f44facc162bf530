"""Host side of the seed's design: "[PATCH RFCv2 7/9] kvm/arm64: Support async page fault".

Both signals are an injected synchronous data abort whose FAR is the token, announced by
the ``reason`` word of the guest's control block. Signals are fired and consumed in
sequence: nothing is injected while ``reason != 0``. No injection while the guest PC is in
``[VBAR_EL1, VBAR_EL1 + no_fault_inst_range)``. With ``send_user_only`` (the guest never
sets SEND_ALWAYS: "FIXME" in patch 9/9) not-present is not sent at EL1; page-ready is.
There is no artificial halt: a repeated fault on an outstanding gfn re-enters the guest,
which faults again. Completions are checked on every run-loop iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apfsim.abi.arm64 import (
    APF_FUNC_SET_RANGE,
    APF_FUNC_UPDATE_ENABLE,
    DEFAULT_NO_FAULT_INST_RANGE,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    SMCCC_RET_NOT_REQUIRED,
    SMCCC_RET_NOT_SUPPORTED,
    SMCCC_RET_SUCCESS,
    WAKE_ALL_TOKEN,
    ApfData,
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
    GuestView,
    GupNowaitFn,
    HostPorts,
    Injection,
    InjectionKind,
    PrefaultFn,
    SyncCause,
)
from apfsim.protocols.common import ApfCounters, GfnHash, HostBase, ProtocolOptions, make_token
from apfsim.snapshot import Fields

__all__ = ["Arm64Rfcv2Host", "HostCounters"]


@dataclass
class VcpuApfArch:
    """``vcpu->arch.apf`` in RFCv2 plus the vCPU's pending injected abort."""

    control_block: ApfData  # the guest's per-CPU block; the host reads and writes `reason`
    enabled: bool = False
    send_user_only: bool = True
    id: int = 0
    gfns: GfnHash = field(default_factory=GfnHash)
    no_fault_inst_range: int = DEFAULT_NO_FAULT_INST_RANGE
    pending_abort: int | None = None  # FAR of a data abort to inject at the next entry
    view: GuestView = field(default_factory=lambda: GuestView(privileged=False))


_BLOCK = Fields.of(ApfData)


@dataclass(slots=True)
class HostCounters(ApfCounters):
    cancelled: int = 0
    unsafe_injections: int = 0  # injected while ELR_EL1 was not yet saved
    token_wraps: int = 0


class Arm64Rfcv2Host(HostBase[VcpuApfArch]):
    """The RFCv2 arch hooks over the generic core, one instance per VM."""

    name = "arm64-rfcv2"
    # ``view`` (the registers at the last exit) is written before it is read: not state.
    arch_fields = Fields.of(VcpuApfArch, exclude=("control_block", "gfns", "view"))

    def __init__(
        self,
        control_blocks: list[ApfData],
        prefault: PrefaultFn,
        no_fault_inst_range: int = DEFAULT_NO_FAULT_INST_RANGE,
        gup_nowait: GupNowaitFn | None = None,
    ) -> None:
        super().__init__(len(control_blocks), prefault, gup_nowait)
        self.arch = [
            VcpuApfArch(control_block=block, no_fault_inst_range=no_fault_inst_range)
            for block in control_blocks
        ]
        self.stats = HostCounters()

    def freeze_own(self, works: WorkMemo) -> tuple[Any, ...]:
        return tuple([_BLOCK.freeze(arch.control_block) for arch in self.arch])

    def thaw_own(self, state: tuple[Any, ...], works: WorkTable) -> None:
        for arch, values in zip(self.arch, state, strict=True):
            _BLOCK.thaw(arch.control_block, values)

    @classmethod
    def create(
        cls, blocks: Sequence[Any], n_vcpus: int, ports: HostPorts, opt: ProtocolOptions
    ) -> Arm64Rfcv2Host:
        return cls(list(blocks), ports.prefault, opt.no_fault_inst_range, ports.gup_nowait)

    # -- admission -------------------------------------------------------------------------
    def _can_inject_present(self, vcpu: int, view: GuestView) -> SyncCause | None:
        """``kvm_arch_can_inject_async_page_present`` without its "not enabled" case:
        the previous signal consumed (``reason == 0``) and the PC outside the window."""
        arch = self.arch[vcpu]
        if arch.control_block.reason != 0:
            return SyncCause.REASON_BUSY
        if view.pc_offset is not None and view.pc_offset < arch.no_fault_inst_range:
            return SyncCause.WINDOW
        return None

    def kvm_can_do_async_pf(self, vcpu: int, view: GuestView) -> SyncCause | None:
        """``kvm_arch_can_inject_async_page_not_present``, in the patch's order; None = yes."""
        arch = self.arch[vcpu]
        if not arch.enabled:
            return SyncCause.NO_APF
        if arch.send_user_only and view.privileged:
            return SyncCause.GATED_CONTEXT
        return self._can_inject_present(vcpu, view)

    def kvm_arch_setup_async_pf_token(self, vcpu: int) -> int:
        """``token = (apf.id++ << 16) | vcpu_id`` in ``kvm_arch_setup_async_pf``.

        The u16 id advances on every attempt (also when the queue is then full), wraps at
        65536, and skips neither 0 nor ~0: the first token of vCPU 0 is 0.
        """
        arch = self.arch[vcpu]
        token = make_token(arch.id, vcpu)
        arch.id = (arch.id + 1) & 0xFFFF
        if arch.id == 0:
            self.stats.token_wraps += 1
        return token

    # -- arch hooks called by the generic core -------------------------------------------------
    def _inject_dabt(self, vcpu: int, far: int, reason: int) -> None:
        arch = self.arch[vcpu]
        arch.control_block.reason = reason
        arch.pending_abort = far
        if not arch.view.elr_saved:
            self.stats.unsafe_injections += 1

    def kvm_arch_async_page_not_present(self, vcpu_id: int, work: AsyncPf) -> bool:
        self.arch[vcpu_id].gfns.add(work.gfn)
        self._inject_dabt(vcpu_id, work.token, KVM_PV_REASON_PAGE_NOT_PRESENT)
        self.stats.not_present_injected += 1
        return True

    def kvm_arch_async_page_present(self, vcpu_id: int, work: AsyncPf) -> None:
        arch = self.arch[vcpu_id]
        if work.wakeup_all:
            token = WAKE_ALL_TOKEN
        else:
            token = work.token
            arch.gfns.delete(work.gfn)
        if not arch.enabled:
            return
        self._inject_dabt(vcpu_id, token, KVM_PV_REASON_PAGE_READY)
        self.stats.page_ready_injected += 1

    def kvm_arch_can_dequeue_async_page_present(self, vcpu_id: int) -> bool:
        arch = self.arch[vcpu_id]
        if not arch.enabled:
            return True  # drained without telling the guest
        return self._can_inject_present(vcpu_id, arch.view) is None

    def kvm_arch_async_page_present_queued(self, vcpu_id: int) -> None:
        """RFCv2 (v5.7 base) has no such hook: a running vCPU is not kicked."""

    # -- run loop entry points -----------------------------------------------------------------
    def run_loop_iteration(self, vcpu: int, view: GuestView) -> list[AsyncPf]:
        """``kvm_check_async_pf_completion`` on every iteration of the run loop."""
        self.arch[vcpu].view = view
        return kvm_check_async_pf_completion(self.apf[vcpu], self)

    def vcpu_runnable(self, vcpu: int) -> bool:
        """``kvm_arch_vcpu_runnable``: while enabled, also "done non-empty or reason != 0"."""
        if not self.arch[vcpu].enabled:
            return False
        return bool(self.apf[vcpu].done) or self.arch[vcpu].control_block.reason != 0

    def take_injection(self, vcpu: int) -> Injection | None:
        arch = self.arch[vcpu]
        far, arch.pending_abort = arch.pending_abort, None
        return None if far is None else Injection(InjectionKind.DATA_ABORT, far)

    def guest_call(self, vcpu: int, call: int, val: int) -> int:
        """The SMCCC exit: only ARM_SMCCC_VENDOR_HYP_KVM_APF_FUNC_ID is modelled."""
        return self.smccc_apf(vcpu, val)

    def smccc_apf(self, vcpu: int, val: int) -> int:
        """``kvm_async_pf_hypercall``: bits 63:56 select exactly one function.

        BIT(63) updates the enable word, BIT(62) sets the no-fault range; any other
        selector is SMCCC_RET_NOT_SUPPORTED (the patch's ``switch`` default).
        """
        arch = self.arch[vcpu]
        func = val & (0xFF << 56)
        arg = val & ~(0xFF << 56)
        if func == APF_FUNC_SET_RANGE:
            if arch.enabled:
                return SMCCC_RET_NOT_SUPPORTED
            # The range may only grow.
            arch.no_fault_inst_range = max(arch.no_fault_inst_range, arg)
            return SMCCC_RET_SUCCESS
        if func != APF_FUNC_UPDATE_ENABLE:
            return SMCCC_RET_NOT_SUPPORTED
        enable = bool(arg & KVM_ASYNC_PF_ENABLED)
        if enable == arch.enabled:
            return SMCCC_RET_NOT_REQUIRED
        if not enable:
            arch.enabled = False
            self.stats.cancelled += len(kvm_clear_async_pf_completion_queue(self.apf[vcpu]))
            return SMCCC_RET_SUCCESS
        arch.enabled = True
        arch.send_user_only = not arg & KVM_ASYNC_PF_SEND_ALWAYS
        arch.gfns.reset()
        if kvm_async_pf_wakeup_all(self.apf[vcpu], self, WAKE_ALL_TOKEN) is not None:
            self.stats.wakeup_all_queued += 1
        return SMCCC_RET_SUCCESS
