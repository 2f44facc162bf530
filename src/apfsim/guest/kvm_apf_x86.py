"""The x86 guest driver, upstream since 5.10 (``arch/x86/kernel/kvm.c``).

Not-present arrives as a #PF whose CR2 is the token, announced by ``flags`` in the per-CPU
``kvm_vcpu_pv_apf_data``; page-ready arrives as an interrupt (``HYPERVISOR_CALLBACK_VECTOR``)
with the token in the block's ``token`` word, which the guest zeroes before writing
``MSR_KVM_ASYNC_PF_ACK``. Sleepers sit in one global table of 256 buckets; a wake that comes
before its wait leaves a dummy node. Since "x86/kvm: Restrict ASYNC_PF to user space" (v5.8)
a not-present taken in kernel mode or with IF=0 is a guest panic, and the only wait is
``schedule()``; the pre-5.8 halted wait lives in ``x86-legacy``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from apfsim.abi.x86 import (
    HYPERVISOR_CALLBACK_VECTOR,
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    WAKE_ALL_TOKEN,
    X86ApfData,
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
from apfsim.protocols.common import GuestBase, ProtocolOptions, hash_32
from apfsim.snapshot import Fields

__all__ = ["KVM_TASK_SLEEP_HASHBITS", "SleepTable", "X86ApfGuest", "X86SleepNode"]

KVM_TASK_SLEEP_HASHBITS = 8


@dataclass(eq=False)
class X86SleepNode:
    """``struct kvm_task_sleep_node`` (on the sleeper's stack; a dummy is kzalloc'ed)."""

    token: int
    cpu: int
    task: int
    dummy: bool = False
    hashed: bool = True
    halted: bool = False  # pre-5.8 only: the waiter spins in native_safe_halt()


_NODE = Fields.of(X86SleepNode)
_REASON = Fields.of(X86ApfData)


class SleepTable:
    """``async_pf_sleepers[KVM_TASK_SLEEP_HASHSIZE]``: 256 hash buckets, each made on first
    use. Iterating visits the non-empty buckets; a copy keeps only
    non-empty buckets, so equal tables pickle to equal bytes (the model checker's states)."""

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: dict[int, list[X86SleepNode]] = {}

    def __len__(self) -> int:
        return 1 << KVM_TASK_SLEEP_HASHBITS

    def __getitem__(self, index: int) -> list[X86SleepNode]:
        bucket = self._buckets.get(index)
        if bucket is None:
            if not 0 <= index < len(self):
                raise IndexError(index)
            bucket = self._buckets[index] = []
        return bucket

    def __iter__(self) -> Iterator[list[X86SleepNode]]:
        """The non-empty buckets (the others hold nothing to visit). Empty ones are dropped
        here, so a walk costs the buckets in use, not every bucket ever used; the driver
        looks its bucket up at each use, and a dropped one is made again on the next."""
        buckets = self._buckets
        live = [bucket for bucket in buckets.values() if bucket]
        if len(live) != len(buckets):
            self._buckets = {i: bucket for i, bucket in buckets.items() if bucket}
        return iter(live)

    def freeze(self) -> tuple[Any, ...]:
        """The non-empty buckets in index order, each node's fields (a state key)."""
        buckets = self._buckets
        node = _NODE.freeze
        return tuple(
            [(i, tuple([node(n) for n in buckets[i]])) for i in sorted(buckets) if buckets[i]]
        )

    def thaw(self, state: tuple[Any, ...]) -> None:
        self._buckets = {i: [X86SleepNode(*values) for values in nodes] for i, nodes in state}

    def __getstate__(self) -> dict[int, list[X86SleepNode]]:
        return {i: self._buckets[i] for i in sorted(self._buckets) if self._buckets[i]}

    def __setstate__(self, buckets: dict[int, list[X86SleepNode]]) -> None:
        self._buckets = buckets


@dataclass(slots=True)
class X86DriverCounters:
    waits_schedule: int = 0
    wakes: int = 0
    wake_all: int = 0
    dummies_created: int = 0
    dummies_consumed: int = 0
    dummies_leaked: int = 0
    dummy_alloc_retries: int = 0
    waits_halt: int = 0  # pre-5.8 (x86-legacy) only
    resched_ipis: int = 0  # pre-5.8 (x86-legacy) only
    acks: int = 0
    guest_panics: int = 0  # "Host injected async #PF in kernel mode / interrupt disabled region"
    spurious_pf: int = 0  # an injected #PF with flags == 0: the ordinary fault path


@dataclass
class X86ApfGuest(GuestBase):
    """The upstream x86 guest side: per-CPU ``apf_reason`` and the global sleep table."""

    port: KernelPort
    n_cpus: int
    kvmapf: bool = True  # cleared by the `no-kvmapf` early param
    mutant: str | None = None  # a fixed bug put back (apfsim.check.mutants); None = as fixed
    apf_reason: list[X86ApfData] = field(init=False)
    async_pf_sleepers: SleepTable = field(init=False)
    stats: X86DriverCounters = field(default_factory=X86DriverCounters)

    def __post_init__(self) -> None:
        self.apf_reason = [X86ApfData() for _ in range(self.n_cpus)]
        self.async_pf_sleepers = SleepTable()

    @classmethod
    def create(cls, port: KernelPort, n_cpus: int, opt: ProtocolOptions) -> X86ApfGuest:
        return cls(port=port, n_cpus=n_cpus, kvmapf=not opt.no_kvmapf)

    def shared_blocks(self) -> Sequence[SharedBlock]:
        return self.apf_reason

    @classmethod
    def not_state(cls) -> tuple[str, ...]:
        return ("port", "n_cpus", "mutant", "apf_reason", "async_pf_sleepers", "stats")

    def freeze(self) -> tuple[Any, ...]:
        return (
            self.scalar_fields().freeze(self),
            tuple([_REASON.freeze(block) for block in self.apf_reason]),
            self.async_pf_sleepers.freeze(),
        )

    def thaw(self, state: tuple[Any, ...]) -> None:
        scalars, blocks, sleepers = state
        self.scalar_fields().thaw(self, scalars)
        for block, values in zip(self.apf_reason, blocks, strict=True):
            _REASON.thaw(block, values)
        self.async_pf_sleepers.thaw(sleepers)

    def wait_nodes(self) -> list[WaitNode]:
        """One global table: every node's scope is -1."""
        return [
            (-1, node.task, node.token, node.dummy)
            for bucket in self.async_pf_sleepers
            for node in bucket
        ]

    def _bucket(self, token: int) -> list[X86SleepNode]:
        return self.async_pf_sleepers[hash_32(token, KVM_TASK_SLEEP_HASHBITS)]

    def _hlist_add_head(self, bucket: list[X86SleepNode], node: X86SleepNode) -> None:
        """``hlist_add_head(&n->link, &b->list)`` under the bucket's raw spinlock."""
        bucket.insert(0, node)
        log = self.sleep_log
        if log is not None:
            log.node_added(-1, node.task, node.token, node.dummy)

    def _hlist_del_init(self, bucket: list[X86SleepNode], node: X86SleepNode) -> None:
        """``hlist_del_init(&n->link)``: unlinked, so ``hlist_unhashed`` is true."""
        bucket.remove(node)
        node.hashed = False
        log = self.sleep_log
        if log is not None:
            log.node_removed(-1, node.task, node.token, node.dummy)

    @staticmethod
    def _find(bucket: list[X86SleepNode], token: int) -> X86SleepNode | None:
        for node in bucket:
            if node.token == token:
                return node
        return None

    # -- not present ------------------------------------------------------------------------
    def kvm_read_and_reset_apf_flags(self, cpu: int) -> int:
        data = self.apf_reason[cpu]
        if not data.enabled:
            return 0
        flags, data.flags = data.flags, 0
        return flags

    def kvm_async_pf_queue_task(self, cpu: int, token: int, halted: bool = False) -> bool:
        """Hash the sleeper's node; False if a dummy was there (the wake came first)."""
        bucket = self._bucket(token)
        dummy = self._find(bucket, token)
        if dummy is not None:
            self._hlist_del_init(bucket, dummy)
            self.stats.dummies_consumed += 1
            return False
        node = X86SleepNode(token, cpu, self.port.current_task(cpu), halted=halted)
        self._hlist_add_head(bucket, node)
        return True

    def kvm_async_pf_task_wait_schedule(self, cpu: int, token: int) -> AbortOutcome:
        if not self.kvm_async_pf_queue_task(cpu, token):
            return AbortOutcome.DUMMY_CONSUMED
        self.stats.waits_schedule += 1
        return AbortOutcome.WAIT_SCHEDULE

    def kvm_handle_async_pf(self, cpu: int, token: int, regs: GuestRegs) -> AbortOutcome:
        """``__kvm_handle_async_pf`` from ``exc_page_fault``."""
        flags = self.kvm_read_and_reset_apf_flags(cpu)
        if not flags:
            self.stats.spurious_pf += 1
            return AbortOutcome.NOT_APF
        if regs.irqs_off or not regs.user_mode:
            self.stats.guest_panics += 1
            return AbortOutcome.NOT_APF
        if flags & KVM_PV_REASON_PAGE_NOT_PRESENT:
            return self.kvm_async_pf_task_wait_schedule(cpu, token)
        return AbortOutcome.ILLEGAL_REASON

    # -- page ready --------------------------------------------------------------------------
    def apf_task_wake_one(self, bucket: list[X86SleepNode], node: X86SleepNode) -> None:
        self._hlist_del_init(bucket, node)
        if node.dummy:
            self.stats.dummies_leaked += 1  # unhashed by wake-all, never freed
            return
        self.stats.wakes += 1
        self.port.swake_up_one(node.task)

    def apf_task_wake_all(self, cpu: int) -> None:
        """Wake every node of this CPU in all 256 buckets."""
        self.stats.wake_all += 1
        for bucket in self.async_pf_sleepers:
            for node in [n for n in bucket if n.cpu == cpu]:
                self.apf_task_wake_one(bucket, node)

    def kvm_async_pf_task_wake(self, cpu: int, token: int) -> None:
        if token == WAKE_ALL_TOKEN:
            self.apf_task_wake_all(cpu)
            return
        bucket = self._bucket(token)
        node = self._find(bucket, token)
        if node is not None:
            self.apf_task_wake_one(bucket, node)
            return
        # Not found: the wait has not run yet. Allocate a dummy outside the raw lock,
        # retrying until the allocation succeeds (the node cannot appear meanwhile here).
        if self.mutant == "dummy-drop":
            return  # the wake is lost: the later wait finds no dummy and sleeps
        while not self.port.kzalloc_atomic(cpu):
            self.stats.dummy_alloc_retries += 1
        dummy = X86SleepNode(token, cpu, self.port.current_task(cpu), dummy=True)
        self._hlist_add_head(bucket, dummy)
        self.stats.dummies_created += 1

    def sysvec_kvm_asyncpf_interrupt(self, cpu: int) -> AbortOutcome:
        """Read the token, wake, zero the slot, then ACK (the order matters: B5/B9)."""
        data = self.apf_reason[cpu]
        if not data.enabled:
            return AbortOutcome.NOT_APF
        token = data.token
        self.kvm_async_pf_task_wake(cpu, token)
        data.token = 0
        self.stats.acks += 1
        self.port.wrmsr(cpu, MSR_KVM_ASYNC_PF_ACK, 1)
        return AbortOutcome.WOKE

    # -- lifecycle -----------------------------------------------------------------------------
    def kvm_guest_cpu_init(self, cpu: int) -> None:
        """INT MSR first ("or interrupt #0 can get injected"), then EN, then enabled=1."""
        if not self.kvmapf:
            return
        self.port.wrmsr(cpu, MSR_KVM_ASYNC_PF_INT, HYPERVISOR_CALLBACK_VECTOR)
        flags = KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
        if self.mutant == "B4":
            # Before "x86/kvm: Restrict ASYNC_PF to user space" the guest (with PREEMPT)
            # asked for SEND_ALWAYS: not-present also in kernel mode.
            flags |= KVM_ASYNC_PF_SEND_ALWAYS
        self.port.wrmsr(cpu, MSR_KVM_ASYNC_PF_EN, flags)
        self.apf_reason[cpu].enabled = 1

    def kvm_pv_disable_apf(self, cpu: int) -> None:
        if not self.apf_reason[cpu].enabled:
            return
        self.port.wrmsr(cpu, MSR_KVM_ASYNC_PF_EN, 0)
        self.apf_reason[cpu].enabled = 0

    def kvm_guest_cpu_offline(self, cpu: int, shutdown: bool) -> None:
        """CPU down-prepare: disable, then (unless shutting down) release this CPU's sleepers."""
        self.kvm_pv_disable_apf(cpu)
        if not shutdown:
            self.apf_task_wake_all(cpu)

    def kvm_pv_reboot_notify(self) -> None:
        """Reboot, kexec or crash: every CPU writes EN=0 before the next kernel owns the
        memory the host writes to (B14's fix; the old code left APF on)."""
        if self.mutant == "B14":
            return
        for cpu in range(self.n_cpus):
            self.kvm_guest_cpu_offline(cpu, shutdown=True)

    # -- the model checker's lifecycle entry points --------------------------------------------
    def cpu_offline(self, cpu: int) -> None:
        self.kvm_guest_cpu_offline(cpu, shutdown=False)

    def cpu_online(self, cpu: int) -> None:
        self.kvm_guest_cpu_init(cpu)

    def reboot(self) -> None:
        self.kvm_pv_reboot_notify()

    # -- GuestProtocol --------------------------------------------------------------------------
    def boot(self) -> None:
        for cpu in range(self.n_cpus):
            self.kvm_guest_cpu_init(cpu)

    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome:
        if injection.kind is InjectionKind.PAGE_FAULT:
            return self.kvm_handle_async_pf(cpu, injection.payload, regs)
        if injection.kind is InjectionKind.INTERRUPT:
            return self.sysvec_kvm_asyncpf_interrupt(cpu)
        return AbortOutcome.NOT_APF

    def waiter_woken(self, cpu: int, task: int) -> bool:
        """``hlist_unhashed(&n.link)`` for ``task``'s node."""
        return not any(
            n.task == task and not n.dummy for bucket in self.async_pf_sleepers for n in bucket
        )

    def counters(self) -> dict[str, int]:
        return counter_dict(self.stats)
