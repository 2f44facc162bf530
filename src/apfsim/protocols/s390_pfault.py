"""s390 pfault, host half: ``arch/s390/kvm/kvm-s390.c``, ``diag.c``, ``interrupt.c`` over the
generic core built with ``CONFIG_KVM_ASYNC_PF_SYNC`` (s390 is its only user).

* DIAG 0x258 (``__diag_page_ref_service``): init stores the token address and the
  select/compare masks (rc 0, or 8 if a token is already valid); cancel only invalidates the
  token (rc 0, or 4): no flush, no wake-all, queued workers still inject their DONE.
* ``kvm_arch_setup_async_pf`` refuses, in this order: no valid token; the PSW does not match
  select/compare (Linux: not in problem state); PSW EXT off; an interrupt is pending; CR0
  service-signal subclass off; ``gmap->pfault_enabled`` off; the lowcore read fails. Then
  ``kvm_setup_async_pf`` (64 per vCPU). There is no gfn lookup: a second fault on the same
  page queues a second item, and the token is the faulting task's pid read from this vCPU's
  lowcore at fault time, so two faults of one task carry the same token.
* PFAULT_INIT goes to the faulting vCPU's single local slot. PFAULT_DONE is injected by the
  worker itself (``async_pf_execute`` under ASYNC_PF_SYNC) into the VM-wide floating FIFO,
  capped at ``ASYNC_PF_PER_VCPU * KVM_MAX_VCPUS`` (a DONE over the cap is lost). Any vCPU with
  PSW EXT on takes it; at most one external interrupt per entry, INIT before DONE.
* ``vcpu_pre_run`` -> ``kvm_check_async_pf_completion`` only reaps done items (no present
  call under ASYNC_PF_SYNC, no prefault: ``kvm_arch_async_page_ready`` is empty).
* A vCPU reset (``kvm_arch_vcpu_ioctl_normal_reset``, reached through the SIGP initial CPU
  reset a CPU bring-up sends) invalidates the token, flushes the queue (``flush_work``: every
  worker still injects its DONE) and drops a pending INIT (``kvm_s390_clear_local_irqs``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from apfsim.abi.s390 import (
    DIAG258_CANCEL_NOT_ESTABLISHED,
    DIAG258_INIT_ALREADY_ESTABLISHED,
    DIAG258_OK,
    DIAG_PFAULT,
    EXT_IRQ_CP_SERVICE,
    KVM_S390_PFAULT_TOKEN_INVALID,
    LC_LPP,
    PFAULT_DONE,
    PFAULT_FCODE_CANCEL,
    PFAULT_FCODE_INIT,
    PFAULT_INIT,
    PFAULT_SELECT_COMPARE,
    PSW_MASK_EXT,
    PSW_MASK_PSTATE,
    SIGP,
    SIGP_CC_ORDER_CODE_ACCEPTED,
    SIGP_INITIAL_CPU_RESET,
    S390Lowcore,
)
from apfsim.host.async_pf import (
    ASYNC_PF_PER_VCPU,
    AsyncPf,
    WorkMemo,
    WorkState,
    WorkTable,
    async_pf_execute,
)
from apfsim.ports import (
    Broken,
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

__all__ = [
    "FLOATING_PFAULT_CAP",
    "KVM_MAX_VCPUS",
    "S390Counters",
    "S390PfaultHost",
    "psw_mask",
]

KVM_MAX_VCPUS = 255  # arch/s390/include/asm/kvm_host.h
FLOATING_PFAULT_CAP = ASYNC_PF_PER_VCPU * KVM_MAX_VCPUS  # __inject_pfault_done's -EBUSY bound
CALL_UNSUPPORTED = -1  # any other call or code: a program exception in the kernel (never made)

# Linux's external new PSW: supervisor state with EXT (and I/O) off. KVM loads it at every
# external-interrupt delivery, so nothing else external is deliverable in that entry.
_EXT_NEW_PSW = GuestView(privileged=True, irqs_off=True)


def psw_mask(view: GuestView) -> int:
    """The PSW bits ``kvm_arch_setup_async_pf`` tests, from the registers at the exit."""
    return (0 if view.privileged else PSW_MASK_PSTATE) | (0 if view.irqs_off else PSW_MASK_EXT)


@dataclass
class VcpuPfault:
    """``vcpu->arch``'s pfault fields and the vCPU's local PFAULT_INIT slot."""

    block: S390Lowcore  # this vCPU's lowcore (the prefixed page the token is read from)
    pfault_token: int = KVM_S390_PFAULT_TOKEN_INVALID  # the registered token address
    pfault_select: int = 0
    pfault_compare: int = 0
    init_pending: int | None = None  # li->irq.ext.ext_params2 with IRQ_PEND_PFAULT_INIT set
    # s390 has no gfn table (kvm_arch_setup_async_pf looks nothing up). The skeleton's type
    # and the invariants read one, so this one exists and stays empty; apf_on() is False so
    # I2's hash clause is not asked of it.
    gfns: GfnHash = field(default_factory=GfnHash)
    view: GuestView = field(default_factory=lambda: GuestView(privileged=False))


_LOWCORE = Fields.of(S390Lowcore)


@dataclass(slots=True)
class S390Counters(ApfCounters):
    """The generic counters (INIT counts as not-present, DONE as page-ready) and s390's own."""

    diag_init: int = 0
    diag_init_already: int = 0  # rc 8
    diag_cancel: int = 0
    diag_cancel_not_established: int = 0  # rc 4
    resets: int = 0  # kvm_arch_vcpu_ioctl_normal_reset (SIGP initial CPU reset)
    flushed: int = 0  # items a reset flush_work'ed (their DONE still comes)
    init_dropped_by_reset: int = 0  # kvm_s390_clear_local_irqs with INIT pending
    done_lost: int = 0  # __inject_pfault_done -EBUSY at the floating cap (WARN_ON_ONCE)
    done_deferred_ext_off: int = 0  # an entry saw DONEs queued but the guest had EXT off
    reaped: int = 0  # done items freed by kvm_check_async_pf_completion
    kicks: int = 0


class S390PfaultHost(HostBase[VcpuPfault]):
    """The s390 arch hooks over the generic core, one instance per VM."""

    name = "s390-pfault"
    # The token is the faulting task's pid: two faults of one task (a re-fault after a
    # spurious wake, R7) are two live items with one token, by design (notes §7).
    unique_tokens: ClassVar[bool] = False

    def __init__(
        self,
        blocks: list[S390Lowcore],
        prefault: PrefaultFn,
        kick: KickFn,
        gup_nowait: GupNowaitFn | None = None,
    ) -> None:
        super().__init__(len(blocks), prefault, gup_nowait)
        self.kick = kick
        self.arch = [VcpuPfault(block=b) for b in blocks]
        self.stats = S390Counters()
        # gmap->pfault_enabled: QEMU sets it (FLIC KVM_DEV_FLIC_APF_ENABLE) when it starts.
        self.pfault_enabled = True
        # float_int.lists[FIRQ_LIST_PFAULT]: the tokens of the DONEs not yet delivered.
        self.float_pfault: deque[int] = deque()
        self.lost_done = 0  # DONEs dropped at the cap (state: the checker's S1)
        # Items a reset flush_work'ed: off their vCPU's queue, the worker still running.
        self.flushing: list[AsyncPf] = []

    # ``view`` (the registers at the last exit) is written before it is read: not state.
    arch_fields = Fields.of(VcpuPfault, exclude=("block", "gfns", "view"))

    def freeze_own(self, works: WorkMemo) -> tuple[Any, ...]:
        return (
            tuple([_LOWCORE.freeze(arch.block) for arch in self.arch]),
            self.pfault_enabled,
            tuple(self.float_pfault),
            self.lost_done,
            tuple(map(works.ref, self.flushing)),
        )

    def thaw_own(self, state: tuple[Any, ...], works: WorkTable) -> None:
        blocks, self.pfault_enabled, floating, self.lost_done, flushing = state
        for arch, values in zip(self.arch, blocks, strict=True):
            _LOWCORE.thaw(arch.block, values)
        self.float_pfault = deque(floating)
        self.flushing = list(map(works.get, flushing))

    @classmethod
    def create(
        cls, blocks: Sequence[Any], n_vcpus: int, ports: HostPorts, opt: ProtocolOptions
    ) -> S390PfaultHost:
        """Over the guest's lowcores (a guest without the driver still has lowcores)."""
        own = list(blocks) if blocks else [S390Lowcore() for _ in range(n_vcpus)]
        return cls(own, ports.prefault, ports.kick, ports.gup_nowait)

    # -- the fault path (HostBase.try_async_pf: vcpu_post_run -> kvm_arch_setup_async_pf) ------
    # s390 has no gfn lookup, so a fault on a page already being fetched queues another item
    # with the same token (notes §7, R7).
    gfn_lookup: ClassVar[bool] = False

    def gup_nowait_first(self, gfn: int) -> None:
        """FAULT_FLAG_RETRY_NOWAIT / FOLL_NOWAIT is only asked for with pfault enabled."""
        if self.pfault_enabled:
            super().gup_nowait_first(gfn)

    def kvm_can_do_async_pf(self, vcpu: int, view: GuestView) -> SyncCause | None:
        """``kvm_arch_setup_async_pf``'s refusals, in the kernel's order; None: go async."""
        arch = self.arch[vcpu]
        if arch.pfault_token == KVM_S390_PFAULT_TOKEN_INVALID:
            return SyncCause.NO_APF
        mask = psw_mask(view)
        if mask & arch.pfault_select != arch.pfault_compare:
            return SyncCause.GATED_CONTEXT  # Linux's masks: the guest was not in user mode
        if not mask & PSW_MASK_EXT:
            return SyncCause.IRQS_OFF  # psw_extint_disabled
        if self.kvm_s390_vcpu_has_irq(vcpu, view):
            return SyncCause.EXCEPTION_PENDING
        # gcr[0] & CR0_SERVICE_SIGNAL_SUBMASK: every online guest CPU has it set (pfault_irq_init
        # registers the subclass; only a dying CPU clears it, and it no longer faults).
        if not self.pfault_enabled:
            return SyncCause.NO_APF
        # read_guest_real of the token cannot fail here: it is this vCPU's own lowcore.
        return None

    def kvm_s390_vcpu_has_irq(self, vcpu: int, view: GuestView) -> bool:
        """``kvm_s390_vcpu_has_irq(vcpu, 0)`` over what this model's host holds: the local
        INIT, a floating DONE (deliverable: EXT is on here), an event awaiting reinjection."""
        return (
            self.arch[vcpu].init_pending is not None
            or bool(self.float_pfault)
            or view.exception_pending
        )

    def kvm_arch_setup_async_pf_token(self, vcpu: int) -> int:
        """``read_guest_real(vcpu, pfault_token, &arch.pfault_token, 8)``: the lowcore's LPP
        doubleword, i.e. ``LPP_MAGIC << 32 | current_pid`` of the task now running there."""
        arch = self.arch[vcpu]
        assert arch.pfault_token == LC_LPP  # the only address Linux registers
        return arch.block.lpp_doubleword()

    # -- arch hooks of the generic core -----------------------------------------------------------
    def kvm_arch_async_page_not_present(self, vcpu_id: int, work: AsyncPf) -> bool:
        """``__kvm_inject_pfault_token(vcpu, true, token)`` -> ``__inject_pfault_init``: the
        local slot is overwritten (``kvm_s390_vcpu_has_irq`` made sure it was free)."""
        self.arch[vcpu_id].init_pending = work.token
        self.stats.not_present_injected += 1
        return True

    def kvm_arch_async_page_present(self, vcpu_id: int, work: AsyncPf) -> None:
        """``__kvm_inject_pfault_token(vcpu, false, token)`` -> ``kvm_s390_inject_vm``: a
        floating DONE, whether or not the token is still valid (cancel did not flush)."""
        if len(self.float_pfault) >= FLOATING_PFAULT_CAP:
            # -EBUSY: WARN_ON_ONCE in __kvm_inject_pfault_token, and the DONE is gone.
            self.lost_done += 1
            self.stats.done_lost += 1
            return
        self.float_pfault.append(work.token)
        self.stats.page_ready_injected += 1
        self.floating_irq_kick(vcpu_id)

    def floating_irq_kick(self, vcpu_id: int) -> None:
        """``__floating_irq_kick``: the kernel picks an idle vCPU (``idle_mask``), else the
        next one round-robin. The kick port can only force a running vCPU out, and the run
        loops wake only the faulting vCPU from ``kvm_vcpu_block`` (the generic worker's
        ``__kvm_vcpu_wake_up``), so the model kicks the faulting vCPU; whichever vCPU enters
        next with EXT on takes the DONE."""
        self.stats.kicks += 1
        self.kick(vcpu_id)

    def kvm_arch_async_page_ready(self, vcpu_id: int, work: AsyncPf) -> None:
        """Empty on s390: "s390 will always inject the page directly" (no prefault)."""

    def kvm_arch_can_dequeue_async_page_present(self, vcpu_id: int) -> bool:
        """Always: the check only frees what the worker already delivered."""
        return True

    def kvm_arch_async_page_present_queued(self, vcpu_id: int) -> None:
        """An empty inline on s390, and skipped under ASYNC_PF_SYNC anyway."""

    def worker_done(self, work: AsyncPf) -> bool:
        """``async_pf_execute`` under ASYNC_PF_SYNC: the worker injects DONE itself, then puts
        the item on ``done`` (the caller wakes the faulting vCPU, as the worker does)."""
        if work in self.flushing:
            # A reset's flush_work waited for this worker: its DONE is injected, then the
            # clear frees it (it is no longer on any list of its vCPU).
            self.flushing.remove(work)
            self.kvm_arch_async_page_present(work.vcpu_id, work)
            work.state = WorkState.DELIVERED
            return False
        if work.state is not WorkState.RUNNING:
            return False
        self.kvm_arch_async_page_present(work.vcpu_id, work)
        return async_pf_execute(self.apf[work.vcpu_id], self, work)

    # -- the run loop ----------------------------------------------------------------------------
    def run_loop_iteration(self, vcpu: int, view: GuestView) -> list[AsyncPf]:
        """``vcpu_pre_run``: ``kvm_check_async_pf_completion`` (housekeeping only); the
        registers are kept for ``kvm_s390_deliver_pending_interrupts``."""
        self.arch[vcpu].view = view
        return self.kvm_check_async_pf_completion(vcpu)

    def kvm_check_async_pf_completion(self, vcpu: int) -> list[AsyncPf]:
        """Free every done item and drop ``queued``: under ASYNC_PF_SYNC the DONE went out
        from the worker, so ``kvm_arch_async_page_present`` is not called again here."""
        apf = self.apf[vcpu]
        reaped: list[AsyncPf] = []
        while apf.done and self.kvm_arch_can_dequeue_async_page_present(vcpu):
            work = apf.done.popleft()
            self.kvm_arch_async_page_ready(vcpu, work)
            apf.queue.remove(work)
            apf.queued -= 1
            work.state = WorkState.DELIVERED
            reaped.append(work)
        self.stats.reaped += len(reaped)
        return reaped

    def take_injection(self, vcpu: int) -> Injection | None:
        """``kvm_s390_deliver_pending_interrupts``: the highest deliverable external interrupt
        (PFAULT_INIT ranks above PFAULT_DONE), gated only by PSW EXT. Delivery loads the
        external new PSW, whose EXT is off: at most one per entry."""
        arch = self.arch[vcpu]
        if arch.view.irqs_off:
            if self.float_pfault:
                self.stats.done_deferred_ext_off += 1
            return None
        if arch.init_pending is not None:
            token, subcode = arch.init_pending, PFAULT_INIT
            arch.init_pending = None
        elif self.float_pfault:
            token, subcode = self.float_pfault.popleft(), PFAULT_DONE
        else:
            return None
        # __deliver_pfault_init / __deliver_pfault_done: the interruption code, the subcode
        # in the "CPU address" field and the token, stored into the guest's lowcore.
        block = arch.block
        block.ext_int_code = EXT_IRQ_CP_SERVICE
        block.ext_cpu_addr = subcode
        block.ext_params2 = token
        arch.view = _EXT_NEW_PSW
        return Injection(InjectionKind.INTERRUPT, token)

    def vcpu_runnable(self, vcpu: int) -> bool:
        """``kvm_arch_vcpu_runnable`` -> ``kvm_s390_vcpu_has_irq``: a blocked vCPU is in an
        enabled wait, so its INIT or any floating DONE wakes it."""
        return self.arch[vcpu].init_pending is not None or bool(self.float_pfault)

    # -- guest calls -----------------------------------------------------------------------------
    def guest_call(self, vcpu: int, call: int, val: int) -> int:
        """DIAG 0x258 (``val``: the function code of the parameter block), or a SIGP."""
        if call == DIAG_PFAULT:
            return self.diag_page_ref_service(vcpu, val)
        if call == SIGP and val >> 16 == SIGP_INITIAL_CPU_RESET:
            # Handled by userspace (QEMU's sigp_initial_cpu_reset -> KVM_S390_INITIAL_RESET).
            self.kvm_arch_vcpu_ioctl_initial_reset(val & 0xFFFF)
            return SIGP_CC_ORDER_CODE_ACCEPTED
        return CALL_UNSUPPORTED

    def diag_page_ref_service(self, vcpu: int, fcode: int) -> int:
        """``__diag_page_ref_service``: the block is Linux's (token address ``__LC_LPP``,
        select = compare = problem state), so the SPECIFICATION checks all pass."""
        arch = self.arch[vcpu]
        if fcode == PFAULT_FCODE_INIT:
            self.stats.diag_init += 1
            if arch.pfault_token != KVM_S390_PFAULT_TOKEN_INVALID:
                self.stats.diag_init_already += 1
                return DIAG258_INIT_ALREADY_ESTABLISHED
            arch.pfault_token = LC_LPP
            arch.pfault_select = arch.pfault_compare = PFAULT_SELECT_COMPARE
            return DIAG258_OK
        if fcode == PFAULT_FCODE_CANCEL:
            self.stats.diag_cancel += 1
            if arch.pfault_token == KVM_S390_PFAULT_TOKEN_INVALID:
                self.stats.diag_cancel_not_established += 1
                return DIAG258_CANCEL_NOT_ESTABLISHED
            # "we assume all outstanding tokens are already pending": only the token goes.
            arch.pfault_token = KVM_S390_PFAULT_TOKEN_INVALID
            return DIAG258_OK
        return CALL_UNSUPPORTED

    def kvm_arch_vcpu_ioctl_initial_reset(self, vcpu: int) -> None:
        """Its ``kvm_arch_vcpu_ioctl_normal_reset`` part: the token, the async PF queue and
        the local interrupts."""
        self.stats.resets += 1
        arch = self.arch[vcpu]
        arch.pfault_token = KVM_S390_PFAULT_TOKEN_INVALID
        self.kvm_clear_async_pf_completion_queue(vcpu)
        if arch.init_pending is not None:
            self.stats.init_dropped_by_reset += 1
        arch.init_pending = None  # kvm_s390_clear_local_irqs

    def kvm_clear_async_pf_completion_queue(self, vcpu: int) -> None:
        """Under ASYNC_PF_SYNC every queued item is ``flush_work``'ed, not cancelled: its
        worker still injects DONE. The model lets the worker finish later (off the queue)."""
        apf = self.apf[vcpu]
        for work in apf.queue:
            if work.state is WorkState.RUNNING:
                self.flushing.append(work)
                self.stats.flushed += 1
            else:
                work.state = WorkState.DELIVERED  # on `done`: its DONE already went out
        apf.queue.clear()
        apf.done.clear()
        apf.queued = 0

    # -- invariants ------------------------------------------------------------------------------
    def apf_on(self, vcpu: int) -> bool:
        """No gfn table on s390, so I2's "gfn in the hash iff queued" has nothing to check."""
        return False

    def check_arch(self, vcpu: int, in_guest: bool) -> Broken:
        """S1: the floating DONE list stays within its cap and no DONE was dropped there
        (R4a: a dropped DONE leaves its task asleep forever)."""
        if len(self.float_pfault) > FLOATING_PFAULT_CAP:
            return "S1", f"{len(self.float_pfault)} floating PFAULT_DONEs, over the cap"
        if self.lost_done:
            return "S1", (
                f"{self.lost_done} PFAULT_DONE(s) dropped at the floating cap "
                f"({FLOATING_PFAULT_CAP}): -EBUSY, only a WARN_ON_ONCE"
            )
        return None
