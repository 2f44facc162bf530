"""arm64 SDEI/PPI (Gavin Shan, "[PATCH v4 00/15] Support Asynchronous Page Fault", 2021).

The review's answer to the seed (spec §3.3; `Documentation/virt/kvm/arm/apf.rst` of v4):

* **not-present = SDEI event** 0x40400001. The guest's handler tags the current task
  (``TIF_ASYNC_PF``) with the token, sends itself a reschedule IPI and completes the event
  (an SMCCC exit); the IPI fires once the host has seen the completion, and the task
  reschedules on return to user until it is woken. Only one event in flight
  (``notpresent_pending``); sent only at EL0 (``send_user_only``).
* **page-ready = a PPI.** When the first completion lands, the host raises KVM_REQ_ASYNC_PF
  and kicks the vCPU (assumed as in the 5.14 generic core), writes ``reason`` and ``token``
  into the shared buffer and injects the PPI; the guest wakes the task and ACKs with an SMCCC
  call, after which the host sends the next (``pageready_pending``).
* A repeated fault (gfn outstanding) re-enters the guest as in RFCv2: there is no halt on
  arm64 (assumption: the v4 series keeps RFCv2's fault hook).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apfsim.abi.arm64 import (
    ARM_SMCCC_KVM_FUNC_ASYNC_PF_ENABLE,
    ARM_SMCCC_KVM_FUNC_ASYNC_PF_IRQ_ACK,
    ASYNC_PF_PPI,
    KVM_PV_REASON_PAGE_READY,
    SDEI_EVENT_COMPLETE,
    WAKE_ALL_TOKEN,
    SdeiApfBuffer,
)
from apfsim.host.async_pf import (
    AsyncPf,
    WorkMemo,
    WorkTable,
    kvm_async_pf_wakeup_all,
    kvm_check_async_pf_completion,
)
from apfsim.metrics.accumulators import counter_dict
from apfsim.ports import (
    AbortOutcome,
    Broken,
    GuestCallKind,
    GuestRegs,
    GuestView,
    GupNowaitFn,
    HostPorts,
    Injection,
    InjectionKind,
    KernelPort,
    KickFn,
    PrefaultFn,
    SharedBlock,
    SyncCause,
    WaitNode,
)
from apfsim.protocols.common import (
    ApfCounters,
    GfnHash,
    GuestBase,
    HostBase,
    ProtocolOptions,
    make_token,
)
from apfsim.snapshot import Fields

__all__ = ["Arm64SdeiPpiGuest", "Arm64SdeiPpiHost"]


@dataclass
class VcpuSdeiArch:
    buffer: SdeiApfBuffer
    enabled: bool = False
    send_user_only: bool = True
    id: int = 0
    notpresent_pending: bool = False
    notpresent_token: int = 0
    pageready_pending: bool = False
    async_pf_request: bool = False  # KVM_REQ_ASYNC_PF
    gfns: GfnHash = field(default_factory=GfnHash)
    view: GuestView = field(default_factory=lambda: GuestView(privileged=False))
    pending: list[Injection] = field(default_factory=list)
    acked: list[AsyncPf] = field(default_factory=list)  # delivered inline by an ACK


_BUFFER = Fields.of(SdeiApfBuffer)


@dataclass(slots=True)
class SdeiHostCounters(ApfCounters):
    sdei_completions: int = 0
    acks: int = 0
    kicks: int = 0


class Arm64SdeiPpiHost(HostBase[VcpuSdeiArch]):
    name = "arm64-sdei-ppi"
    # ``view`` and ``acked`` (the last exit's registers, the last ACK's items) are written
    # before they are read: not state. ``pending`` is frozen as a tuple.
    arch_fields = Fields.of(VcpuSdeiArch, exclude=("buffer", "gfns", "view", "acked", "pending"))

    def freeze_own(self, works: WorkMemo) -> tuple[Any, ...]:
        return tuple([(_BUFFER.freeze(arch.buffer), tuple(arch.pending)) for arch in self.arch])

    def thaw_own(self, state: tuple[Any, ...], works: WorkTable) -> None:
        for arch, (buffer, pending) in zip(self.arch, state, strict=True):
            _BUFFER.thaw(arch.buffer, buffer)
            arch.pending = list(pending)

    def __init__(
        self,
        buffers: list[SdeiApfBuffer],
        prefault: PrefaultFn,
        kick: KickFn,
        gup_nowait: GupNowaitFn | None = None,
    ) -> None:
        super().__init__(len(buffers), prefault, gup_nowait)
        self.kick = kick
        self.arch = [VcpuSdeiArch(buffer=b) for b in buffers]
        self.stats = SdeiHostCounters()

    @classmethod
    def create(
        cls, blocks: Sequence[Any], n_vcpus: int, ports: HostPorts, opt: ProtocolOptions
    ) -> Arm64SdeiPpiHost:
        return cls(list(blocks), ports.prefault, ports.kick, ports.gup_nowait)

    def kvm_can_do_async_pf(self, vcpu: int, view: GuestView) -> SyncCause | None:
        """Enabled, at EL0 only, and no SDEI not-present event still in flight."""
        arch = self.arch[vcpu]
        if not arch.enabled:
            return SyncCause.NO_APF
        if arch.send_user_only and view.privileged:
            return SyncCause.GATED_CONTEXT
        if arch.notpresent_pending:
            return SyncCause.REASON_BUSY
        return None

    def kvm_arch_setup_async_pf_token(self, vcpu: int) -> int:
        arch = self.arch[vcpu]
        token = make_token(arch.id, vcpu)
        arch.id = (arch.id + 1) & 0xFFFF
        return token

    # -- arch hooks -------------------------------------------------------------------------------
    def kvm_arch_async_page_not_present(self, vcpu_id: int, work: AsyncPf) -> bool:
        arch = self.arch[vcpu_id]
        arch.gfns.add(work.gfn)
        arch.notpresent_pending = True
        arch.notpresent_token = work.token
        arch.pending.append(Injection(InjectionKind.SDEI, work.token))
        self.stats.not_present_injected += 1
        return True

    def kvm_arch_async_page_present(self, vcpu_id: int, work: AsyncPf) -> None:
        arch = self.arch[vcpu_id]
        token = WAKE_ALL_TOKEN if work.wakeup_all else work.token
        if not work.wakeup_all:
            arch.gfns.delete(work.gfn)
        if not arch.enabled:
            return
        arch.buffer.reason = KVM_PV_REASON_PAGE_READY
        arch.buffer.token = token
        arch.pageready_pending = True
        arch.pending.append(Injection(InjectionKind.INTERRUPT, ASYNC_PF_PPI))
        self.stats.page_ready_injected += 1

    def kvm_arch_can_dequeue_async_page_present(self, vcpu_id: int) -> bool:
        arch = self.arch[vcpu_id]
        return not arch.enabled or not arch.pageready_pending

    def kvm_arch_async_page_present_queued(self, vcpu_id: int) -> None:
        arch = self.arch[vcpu_id]
        arch.async_pf_request = True
        if not arch.pageready_pending:
            self.stats.kicks += 1
            self.kick(vcpu_id)

    # -- run loop and SMCCC ---------------------------------------------------------------------
    def run_loop_iteration(self, vcpu: int, view: GuestView) -> list[AsyncPf]:
        arch = self.arch[vcpu]
        delivered, arch.acked = arch.acked, []
        if arch.async_pf_request:
            arch.async_pf_request = False
            delivered.extend(kvm_check_async_pf_completion(self.apf[vcpu], self))
        return delivered

    def vcpu_runnable(self, vcpu: int) -> bool:
        return bool(self.apf[vcpu].done) or bool(self.arch[vcpu].pending)

    def take_injection(self, vcpu: int) -> Injection | None:
        pending = self.arch[vcpu].pending
        return pending.pop(0) if pending else None

    def request_pending(self, vcpu: int) -> bool:
        return self.arch[vcpu].async_pf_request

    def check_arch(self, vcpu: int, in_guest: bool) -> Broken:
        arch = self.arch[vcpu]
        return self.missed_kick(vcpu, in_guest, arch.async_pf_request, arch.pageready_pending)

    def call_kind(self, call: int) -> GuestCallKind:
        if call == SDEI_EVENT_COMPLETE:
            return GuestCallKind.SDEI_COMPLETE
        if call == ARM_SMCCC_KVM_FUNC_ASYNC_PF_IRQ_ACK:
            return GuestCallKind.ACK
        return GuestCallKind.HYPERCALL

    def guest_call(self, vcpu: int, call: int, val: int) -> int:
        arch = self.arch[vcpu]
        if call == SDEI_EVENT_COMPLETE:
            self.stats.sdei_completions += 1
            arch.notpresent_pending = False
            return 0
        if call == ARM_SMCCC_KVM_FUNC_ASYNC_PF_IRQ_ACK:
            self.stats.acks += 1
            arch.pageready_pending = False
            arch.acked.extend(kvm_check_async_pf_completion(self.apf[vcpu], self))
            return 0
        if call == ARM_SMCCC_KVM_FUNC_ASYNC_PF_ENABLE:
            arch.enabled = bool(val & 1)
            arch.gfns.reset()
            if arch.enabled and kvm_async_pf_wakeup_all(self.apf[vcpu], self, WAKE_ALL_TOKEN):
                self.stats.wakeup_all_queued += 1
            return 0
        return -1


@dataclass(slots=True)
class SdeiGuestCounters:
    sdei_events: int = 0
    waits_schedule: int = 0
    wakes: int = 0
    woken_before_sleep: int = 0
    wake_all: int = 0
    unknown_token: int = 0
    acks: int = 0


@dataclass
class Arm64SdeiPpiGuest(GuestBase):
    """The v4 guest: task tagged by the SDEI handler, woken by the PPI handler."""

    port: KernelPort
    n_cpus: int
    kvmapf: bool = True
    mutant: str | None = None  # a fixed bug put back (apfsim.check.mutants); None = as fixed
    buffers: list[SdeiApfBuffer] = field(init=False)
    waiting: list[dict[int, int]] = field(init=False)  # per CPU: token -> task (TIF_ASYNC_PF)
    stats: SdeiGuestCounters = field(default_factory=SdeiGuestCounters)

    def __post_init__(self) -> None:
        self.buffers = [SdeiApfBuffer() for _ in range(self.n_cpus)]
        self.waiting = [{} for _ in range(self.n_cpus)]

    @classmethod
    def create(cls, port: KernelPort, n_cpus: int, opt: ProtocolOptions) -> Arm64SdeiPpiGuest:
        return cls(port=port, n_cpus=n_cpus, kvmapf=not opt.no_kvmapf)

    def shared_blocks(self) -> Sequence[SharedBlock]:
        return self.buffers

    @classmethod
    def not_state(cls) -> tuple[str, ...]:
        return ("port", "n_cpus", "mutant", "buffers", "waiting", "stats")

    def freeze(self) -> tuple[Any, ...]:
        return (
            self.scalar_fields().freeze(self),
            tuple([_BUFFER.freeze(buffer) for buffer in self.buffers]),
            tuple([tuple(waiting.items()) for waiting in self.waiting]),
        )

    def thaw(self, state: tuple[Any, ...]) -> None:
        scalars, buffers, waiting = state
        self.scalar_fields().thaw(self, scalars)
        for buffer, values in zip(self.buffers, buffers, strict=True):
            _BUFFER.thaw(buffer, values)
        self.waiting = [dict(items) for items in waiting]

    def wait_nodes(self) -> list[WaitNode]:
        """A tagged task (TIF_ASYNC_PF) per token, per CPU."""
        return [
            (cpu, task, token, False)
            for cpu, waiting in enumerate(self.waiting)
            for token, task in waiting.items()
        ]

    def boot(self) -> None:
        if not self.kvmapf:
            return
        for cpu in range(self.n_cpus):
            self.port.smccc(cpu, ARM_SMCCC_KVM_FUNC_ASYNC_PF_ENABLE, 1)
            self.buffers[cpu].enabled = 1

    def sdei_asyncpf_handler(self, cpu: int, token: int) -> AbortOutcome:
        """Tag current with the token, self-IPI, complete the event; sleep on return to user."""
        self.stats.sdei_events += 1
        self._tag(cpu, token, self.port.current_task(cpu))
        self.port.smp_send_reschedule(cpu)
        self.port.smccc(cpu, SDEI_EVENT_COMPLETE, 0)
        self.stats.waits_schedule += 1
        return AbortOutcome.WAIT_SCHEDULE

    def asyncpf_ppi_handler(self, cpu: int) -> AbortOutcome:
        """Find the task by token, clear its flag and wake it, then ACK."""
        buf = self.buffers[cpu]
        token = buf.token
        if token == WAKE_ALL_TOKEN:
            self.stats.wake_all += 1
            for tok in list(self.waiting[cpu]):
                self._wake(cpu, tok)
        elif token in self.waiting[cpu]:
            self._wake(cpu, token)
        else:
            self.stats.unknown_token += 1
        buf.reason = 0
        buf.token = 0
        self.stats.acks += 1
        self.port.smccc(cpu, ARM_SMCCC_KVM_FUNC_ASYNC_PF_IRQ_ACK, 1)
        return AbortOutcome.WOKE

    def _tag(self, cpu: int, token: int, task: int) -> None:
        """``task`` is the one this CPU's page-ready for ``token`` will wake (an earlier
        tag for that token is overwritten)."""
        waiting = self.waiting[cpu]
        log = self.sleep_log
        if log is not None:
            old = waiting.get(token)
            if old is not None:
                log.node_removed(cpu, old, token, False)
            log.node_added(cpu, task, token, False)
        waiting[token] = task

    def _wake(self, cpu: int, token: int) -> None:
        task = self.waiting[cpu].pop(token)
        log = self.sleep_log
        if log is not None:
            log.node_removed(cpu, task, token, False)
        self.stats.wakes += 1
        if task == self.port.current_task(cpu) and self.mutant == "dummy-drop":
            self._tag(cpu, token, task)  # the early wake is dropped: it will sleep
            return
        if task == self.port.current_task(cpu):
            self.stats.woken_before_sleep += 1  # flag cleared: it will not sleep
        else:
            self.port.swake_up_one(task)

    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome:
        if injection.kind is InjectionKind.SDEI:
            return self.sdei_asyncpf_handler(cpu, injection.payload)
        if injection.kind is InjectionKind.INTERRUPT:
            return self.asyncpf_ppi_handler(cpu)
        return AbortOutcome.NOT_APF

    def waiter_woken(self, cpu: int, task: int) -> bool:
        return task not in self.waiting[cpu].values()

    def counters(self) -> dict[str, int]:
        return counter_dict(self.stats)
