"""The seed's guest driver: arm64 async page fault, RFCv2 patch 9/9 (``arch/arm64/mm/fault.c``).

Every function keeps the patch's name and does what the patch does, weaknesses included:

* ``kvm_async_pf_wait`` picks the halted (WFI) wait for the idle task or, with
  ``CONFIG_PREEMPT_COUNT``, when ``preempt_count() > 1`` or inside an RCU read side
  (without it: whenever the fault came from kernel mode).
* ``kvm_async_pf_wake_one`` only marks a node ``delayed`` when the waker is the sleeper
  itself or the runqueue is locked; the wake then waits for
  ``kvm_async_pf_delayed_wake`` on return to user or idle entry. A halted waiter is always
  ``current`` when its page-ready arrives, so its wake is always delayed and, since the WFI
  loop never returns to user, it is never woken (modelled, not fixed).
* ``kvm_async_pf_wake_all`` unlinks dummy nodes without freeing them (counted as leaks).
* ``kvm_async_pf_cpu_offline`` disables APF but wakes nobody: sleepers on that CPU whose
  page-ready the host then drops are never woken (modelled, not fixed).

State is explicit (:class:`ApfData`, per-CPU sleep lists of :class:`SleepNode`); the kernel
services the driver needs come through :class:`GuestKernelPort`, which the simulator and the
model checker each implement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apfsim.abi.arm64 import (
    APF_FUNC_SET_RANGE,
    APF_FUNC_UPDATE_ENABLE,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    SMCCC_RET_SUCCESS,
    SYS_RESTART,
    WAKE_ALL_TOKEN,
    ApfData,
)
from apfsim.metrics.accumulators import counter_dict
from apfsim.ports import (
    AbortOutcome,
    GuestRegs,
    Injection,
    InjectionKind,
    KernelPort,
    SharedBlock,
    WaitNode,
)
from apfsim.protocols.common import GuestBase, ProtocolOptions
from apfsim.snapshot import Fields

__all__ = ["Arm64ApfGuest", "SleepNode"]


@dataclass(eq=False)
class SleepNode:
    """``struct kvm_task_sleep_node``; ``task`` is a task id (``-1`` stands for idle)."""

    token: int
    task: int
    cpu: int
    halted: bool = False
    delayed: bool = False
    dummy: bool = False  # allocated by kvm_async_pf_wake (wake before wait)
    hashed: bool = True  # False once hlist_del_init ran: the waiter's "woken" test


_NODE = Fields.of(SleepNode)
_APF_DATA = Fields.of(ApfData)


@dataclass(slots=True)
class DriverCounters:
    """What the driver did, for the results (names follow the functions)."""

    waits_schedule: int = 0
    waits_halt: int = 0
    wakes: int = 0
    wake_all: int = 0
    delayed_marked: int = 0
    delayed_wakes: int = 0
    dummies_created: int = 0
    dummies_consumed: int = 0
    dummies_leaked: int = 0
    dummy_alloc_retries: int = 0
    illegal_reason: int = 0
    resched_ipis: int = 0


@dataclass
class Arm64ApfGuest(GuestBase):
    """The guest side of RFCv2: per-CPU ``apf_data`` and ``apf_head`` sleep lists."""

    port: KernelPort
    n_cpus: int
    async_pf_available: bool = True  # cleared by the `no-kvmapf` early param
    preempt_count_config: bool = True  # CONFIG_PREEMPT_COUNT
    handler_offsets_max: int = (
        0x1000  # max(el*_sync|irq|error - vectors), __exception_handlers_offset
    )
    send_always: bool = False  # the patch leaves "FIXME: Enable KVM_ASYNC_PF_SEND_ALWAYS"
    apf_data: list[ApfData] = field(init=False)
    apf_head: list[list[SleepNode]] = field(init=False)
    stats: DriverCounters = field(default_factory=DriverCounters)

    def __post_init__(self) -> None:
        self.apf_data = [ApfData() for _ in range(self.n_cpus)]
        self.apf_head = [[] for _ in range(self.n_cpus)]

    @classmethod
    def create(cls, port: KernelPort, n_cpus: int, opt: ProtocolOptions) -> Arm64ApfGuest:
        return cls(
            port=port,
            n_cpus=n_cpus,
            async_pf_available=not opt.no_kvmapf,
            preempt_count_config=opt.preempt_count_config,
            handler_offsets_max=opt.guest_handler_offsets_max,
            send_always=opt.send_always,
        )

    def shared_blocks(self) -> Sequence[SharedBlock]:
        return self.apf_data

    @classmethod
    def not_state(cls) -> tuple[str, ...]:
        return ("port", "n_cpus", "apf_data", "apf_head", "stats")

    def freeze(self) -> tuple[Any, ...]:
        node = _NODE.freeze
        return (
            self.scalar_fields().freeze(self),
            tuple([_APF_DATA.freeze(block) for block in self.apf_data]),
            tuple([tuple([node(n) for n in head]) for head in self.apf_head]),
        )

    def thaw(self, state: tuple[Any, ...]) -> None:
        scalars, blocks, heads = state
        self.scalar_fields().thaw(self, scalars)
        for block, values in zip(self.apf_data, blocks, strict=True):
            _APF_DATA.thaw(block, values)
        self.apf_head = [[SleepNode(*values) for values in head] for head in heads]

    def wait_nodes(self) -> list[WaitNode]:
        """Each CPU's ``apf_head`` list (the idle task is task -1)."""
        return [
            (cpu, node.task, node.token, node.dummy)
            for cpu, head in enumerate(self.apf_head)
            for node in head
        ]

    # -- helpers named after the patch's inline functions -------------------------------
    def kvm_async_pf_find(self, cpu: int, token: int) -> SleepNode | None:
        """Walk this CPU's list from the head (hlist_add_head order: newest first)."""
        for node in self.apf_head[cpu]:
            if node.token == token:
                return node
        return None

    def _hlist_add_head(self, cpu: int, node: SleepNode) -> None:
        """``hlist_add_head(&n->link, &apf_head->list)`` on this CPU's list."""
        self.apf_head[cpu].insert(0, node)
        log = self.sleep_log
        if log is not None:
            log.node_added(cpu, node.task, node.token, node.dummy)

    def _hlist_del(self, cpu: int, node: SleepNode) -> None:
        """``hlist_del_init(&n->link)``: unlinked, so ``hlist_unhashed`` is true."""
        self.apf_head[cpu].remove(node)
        node.hashed = False
        log = self.sleep_log
        if log is not None:
            log.node_removed(cpu, node.task, node.token, node.dummy)

    # -- page not present ----------------------------------------------------------------
    def kvm_async_pf_wait(
        self, cpu: int, token: int, in_kernel: bool, regs: GuestRegs
    ) -> AbortOutcome:
        """Park ``current`` on ``token``; reason is cleared before the task sleeps."""
        data = self.apf_data[cpu]
        existing = self.kvm_async_pf_find(cpu, token)
        if existing is not None:
            # A dummy entry exists: the wake-up was delivered ahead of the fault.
            self._hlist_del(cpu, existing)
            self.stats.dummies_consumed += 1
            data.reason = 0  # kvm_async_pf_unlock_and_clear
            return AbortOutcome.DUMMY_CONSUMED
        if self.preempt_count_config:
            # Computed with the list's spinlock held: preempt_count() is the interrupted
            # code's count + 1, so "> 1" means the faulting code was already atomic.
            atomic = regs.preempt_count + 1 > 1 or regs.rcu_depth > 0
        else:
            atomic = in_kernel
        halted = regs.is_idle_task or atomic
        node = SleepNode(token=token, task=self.port.current_task(cpu), cpu=cpu, halted=halted)
        self._hlist_add_head(cpu, node)
        data.reason = 0  # kvm_async_pf_unlock_and_clear: the host may signal again from here
        if halted:
            self.stats.waits_halt += 1
            return AbortOutcome.WAIT_HALT
        self.stats.waits_schedule += 1
        return AbortOutcome.WAIT_SCHEDULE

    def waiter_woken(self, cpu: int, task: int) -> bool:
        """The wait loop's exit test, ``hlist_unhashed(&n.link)``, for ``task``'s node."""
        return all(node.task != task or node.dummy for node in self.apf_head[cpu])

    # -- page ready ----------------------------------------------------------------------
    def kvm_async_pf_wake_one(self, cpu: int, node: SleepNode) -> None:
        """Wake a sleeper unless the waker is the sleeper or the runqueue is locked."""
        if node.task == self.port.current_task(cpu) or self.port.rq_is_locked(cpu):
            if not node.delayed:
                self.stats.delayed_marked += 1
            node.delayed = True
            return
        self._hlist_del(cpu, node)
        if node.dummy:
            # wake_all reaches dummies too: unlinked, never freed.
            self.stats.dummies_leaked += 1
            return
        self.stats.wakes += 1
        if node.halted:
            self.stats.resched_ipis += 1
            self.port.smp_send_reschedule(node.cpu)
        else:
            self.port.swake_up_one(node.task)

    def kvm_async_pf_wake_all(self, cpu: int) -> None:
        """Token ~0: every node on this CPU's list goes through wake_one."""
        self.stats.wake_all += 1
        for node in list(self.apf_head[cpu]):
            self.kvm_async_pf_wake_one(cpu, node)
        self.apf_data[cpu].reason = 0

    def kvm_async_pf_wake(self, cpu: int, token: int) -> None:
        """Wake the sleeper on ``token``, or leave a dummy node if the wait has not run yet."""
        if token == WAKE_ALL_TOKEN:
            self.kvm_async_pf_wake_all(cpu)
            return
        node = self.kvm_async_pf_find(cpu, token)
        if node is None:
            # Async PF not handled yet: add a dummy, busy-retrying a failed GFP_ATOMIC.
            while not self.port.kzalloc_atomic(cpu):
                self.stats.dummy_alloc_retries += 1
            dummy = SleepNode(token=token, task=self.port.current_task(cpu), cpu=cpu, dummy=True)
            self._hlist_add_head(cpu, dummy)
            self.stats.dummies_created += 1
        else:
            self.kvm_async_pf_wake_one(cpu, node)
        self.apf_data[cpu].reason = 0

    def kvm_async_pf_delayed_wake(self, cpu: int) -> None:
        """On return to user and idle entry: perform the wakes wake_one had to delay."""
        data = self.apf_data[cpu]
        if not data.enabled or not self.apf_head[cpu]:
            return
        reason = data.reason
        if not reason:
            # Block host signals while walking the list (the patch writes NOT_PRESENT+READY).
            data.reason = KVM_PV_REASON_PAGE_NOT_PRESENT + KVM_PV_REASON_PAGE_READY
        for node in list(self.apf_head[cpu]):
            if node.cpu != cpu or not node.delayed:
                continue
            before = node.hashed
            self.kvm_async_pf_wake_one(cpu, node)
            if before and not node.hashed:
                self.stats.delayed_wakes += 1
        if not reason:
            data.reason = 0

    # -- abort dispatch --------------------------------------------------------------------
    def do_async_pf(self, cpu: int, addr: int, regs: GuestRegs) -> AbortOutcome:
        """Called first in ``do_mem_abort``; FAR carries the token."""
        data = self.apf_data[cpu]
        if not data.enabled:
            return AbortOutcome.NOT_APF
        reason = data.reason
        if not reason:
            return AbortOutcome.NOT_APF
        token = addr & 0xFFFF_FFFF
        if reason == KVM_PV_REASON_PAGE_NOT_PRESENT:
            return self.kvm_async_pf_wait(cpu, token, not regs.user_mode, regs)
        if reason == KVM_PV_REASON_PAGE_READY:
            self.kvm_async_pf_wake(cpu, token)
            return AbortOutcome.WOKE
        self.stats.illegal_reason += 1
        data.reason = 0
        return AbortOutcome.ILLEGAL_REASON

    # -- enable / disable and lifecycle ------------------------------------------------------
    def kvm_async_pf_enable(self, cpu: int, enable: bool) -> None:
        """SMCCC: set the no-fault range (vectors max offset + 4096), then the enable word."""
        data = self.apf_data[cpu]
        if enable == bool(data.enabled):
            return
        if enable:
            ret = self.port.smccc_apf(cpu, APF_FUNC_SET_RANGE | (self.handler_offsets_max + 4096))
            if ret != SMCCC_RET_SUCCESS:
                return
            data.enabled = 1
            flags = KVM_ASYNC_PF_ENABLED | (KVM_ASYNC_PF_SEND_ALWAYS if self.send_always else 0)
            ret = self.port.smccc_apf(cpu, APF_FUNC_UPDATE_ENABLE | flags)
            if ret != SMCCC_RET_SUCCESS:
                data.enabled = 0
            return
        ret = self.port.smccc_apf(cpu, APF_FUNC_UPDATE_ENABLE)
        if ret == SMCCC_RET_SUCCESS:
            data.enabled = 0

    def kvm_async_pf_cpu_init(self, feature_available: bool) -> bool:
        """early_initcall on the boot CPU; False is -EPERM (no feature or `no-kvmapf`)."""
        if not feature_available or not self.async_pf_available:
            return False
        self.kvm_async_pf_enable(0, True)
        return True

    def kvm_async_pf_cpu_online(self, cpu: int) -> None:
        self.kvm_async_pf_enable(cpu, True)

    def kvm_async_pf_cpu_offline(self, cpu: int) -> None:
        """Disable only: unlike x86's kvm_guest_cpu_offline, no local wake-all."""
        self.kvm_async_pf_enable(cpu, False)

    def kvm_async_pf_cpu_reboot_notify(self, code: int) -> None:
        """On SYS_RESTART every CPU disables APF (on_each_cpu)."""
        if code == SYS_RESTART:
            for cpu in range(self.n_cpus):
                self.kvm_async_pf_enable(cpu, False)

    # -- the model checker's lifecycle entry points --------------------------------------------
    def cpu_offline(self, cpu: int) -> None:
        self.kvm_async_pf_cpu_offline(cpu)

    def cpu_online(self, cpu: int) -> None:
        self.kvm_async_pf_cpu_online(cpu)

    def reboot(self) -> None:
        self.kvm_async_pf_cpu_reboot_notify(SYS_RESTART)

    def sleepers(self, cpu: int) -> list[SleepNode]:
        """Real (non-dummy) nodes still hashed on ``cpu``."""
        return [node for node in self.apf_head[cpu] if not node.dummy]

    # -- GuestProtocol: the call sites the guest CPU model uses ------------------------------
    def boot(self) -> None:
        """early_initcall on the boot CPU, then the hotplug "online" callback on the others."""
        if self.kvm_async_pf_cpu_init(feature_available=True):
            for cpu in range(1, self.n_cpus):
                self.kvm_async_pf_cpu_online(cpu)

    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome:
        """``do_mem_abort`` calls ``do_async_pf`` before the ordinary fault table."""
        if injection.kind is not InjectionKind.DATA_ABORT:
            return AbortOutcome.NOT_APF
        return self.do_async_pf(cpu, injection.payload, regs)

    def on_ret_to_user(self, cpu: int) -> None:
        """``finish_ret_to_user`` in entry.S calls ``kvm_async_pf_delayed_wake``."""
        self.kvm_async_pf_delayed_wake(cpu)

    def on_idle_entry(self, cpu: int) -> None:
        """``__cpu_do_idle`` calls ``kvm_async_pf_delayed_wake`` before ``wfi``."""
        self.kvm_async_pf_delayed_wake(cpu)

    def counters(self) -> dict[str, int]:
        return counter_dict(self.stats)
