"""What every variant shares, split as ``virt/kvm/async_pf.c`` and the arch glue split it.

* the per-vCPU gfn table of outstanding faults (``kvm_add/find/del_async_pf_gfn``) and the
  token layout the arm64 series share;
* the counters every variant keeps;
* :class:`HostBase`: the generic core's lists, the prefault hook
  (``kvm_arch_async_page_ready``), the worker's completion (``async_pf_execute``) and the
  ``try_async_pf`` skeleton (NOWAIT GUP -> gate -> repeated fault -> token ->
  ``kvm_setup_async_pf`` -> queue full) whose steps are ``kvm_arch_*`` hooks;
* :class:`GuestBase`: a guest driver's call sites as no-op hooks;
* :class:`ProtocolOptions` and the :class:`Variant` record of the registry.

A variant subclasses the two bases and overrides only what its kernel code does differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from mypy_extensions import mypyc_attr

from apfsim.abi.arm64 import DEFAULT_NO_FAULT_INST_RANGE
from apfsim.host.async_pf import (
    ASYNC_PF_PER_VCPU,
    AsyncPf,
    VcpuAsyncPf,
    WorkMemo,
    WorkTable,
    async_pf_execute,
    kvm_setup_async_pf,
)
from apfsim.metrics.accumulators import counter_dict
from apfsim.ports import (
    AbortOutcome,
    Broken,
    FaultDecision,
    FaultResult,
    GuestCallKind,
    GuestProtocol,
    GuestRegs,
    GuestView,
    GupNowaitFn,
    HostPorts,
    HostProtocol,
    Injection,
    KernelPort,
    PrefaultFn,
    SharedBlock,
    SleepLog,
    SyncCause,
    WaitNode,
)
from apfsim.snapshot import Fields

__all__ = [
    "ApfCounters",
    "GfnHash",
    "GuestBase",
    "HostBase",
    "ProtocolOptions",
    "Variant",
    "hash_32",
    "make_token",
]

_EMPTY = 0xFFFF_FFFF_FFFF_FFFF
_QUEUE_FULL = FaultResult(FaultDecision.SYNC, cause=SyncCause.QUEUE_FULL)
_REPEATED = FaultResult(FaultDecision.REPEATED)


def hash_32(value: int, bits: int) -> int:
    """The kernel's ``hash_32`` (multiplicative hash by GOLDEN_RATIO_32)."""
    return ((value * 0x61C88647) & 0xFFFF_FFFF) >> (32 - bits)


def make_token(apf_id: int, vcpu_id: int) -> int:
    """arm64: ``(apf.id << 16) | vcpu_id`` with a u16 ``id``, stored in a u32 (AArch32 guests)."""
    return (((apf_id & 0xFFFF) << 16) | vcpu_id) & 0xFFFF_FFFF


@dataclass
class GfnHash:
    """The per-vCPU 64-slot open-addressing gfn table (``kvm_add/find/del_async_pf_gfn``)."""

    slots: list[int] = field(default_factory=lambda: [_EMPTY] * ASYNC_PF_PER_VCPU)
    used: int = 0

    @staticmethod
    def _hash(gfn: int) -> int:
        return hash_32(gfn & 0xFFFF_FFFF, 6)

    def add(self, gfn: int) -> None:
        key = self._hash(gfn)
        while self.slots[key] != _EMPTY:
            key = (key + 1) & (ASYNC_PF_PER_VCPU - 1)
        self.slots[key] = gfn
        self.used += 1

    def _slot(self, gfn: int) -> int:
        key = self._hash(gfn)
        for _ in range(ASYNC_PF_PER_VCPU):
            if self.slots[key] == gfn or self.slots[key] == _EMPTY:
                break
            key = (key + 1) & (ASYNC_PF_PER_VCPU - 1)
        return key

    def find(self, gfn: int) -> bool:
        """``kvm_find_async_pf_gfn``. NOTE: the first probe is tried before ``_slot``'s
        loop, for performance (the invariant check asks at every entry with an item)."""
        if self.slots[hash_32(gfn & 0xFFFF_FFFF, 6)] == gfn:
            return True
        return self.slots[self._slot(gfn)] == gfn

    def delete(self, gfn: int) -> None:
        """Backward-shift delete, so later probes still find their entries."""
        i = self._slot(gfn)
        if self.slots[i] != gfn:
            return
        self.used -= 1
        mask = ASYNC_PF_PER_VCPU - 1
        while True:
            self.slots[i] = _EMPTY
            j = i
            while True:
                j = (j + 1) & mask
                if self.slots[j] == _EMPTY:
                    return
                k = self._hash(self.slots[j])
                # Move slots[j] back to i unless its home k lies cyclically in (i, j].
                if (j > i and (k <= i or k > j)) or (j < i and (k <= i and k > j)):
                    break
            self.slots[i] = self.slots[j]
            i = j

    def reset(self) -> None:
        self.slots = [_EMPTY] * ASYNC_PF_PER_VCPU
        self.used = 0

    def freeze(self) -> tuple[tuple[int, int], ...]:
        """The used slots as (slot, gfn) pairs (a state key: probing depends on the slots)."""
        if not self.used:
            return ()
        return tuple((i, gfn) for i, gfn in enumerate(self.slots) if gfn != _EMPTY)

    def thaw(self, used: tuple[tuple[int, int], ...]) -> None:
        self.slots = [_EMPTY] * ASYNC_PF_PER_VCPU
        for i, gfn in used:
            self.slots[i] = gfn
        self.used = len(used)

    def __getstate__(self) -> dict[int, int]:
        """Only the used slots (the model checker snapshots this table per state)."""
        return {i: gfn for i, gfn in enumerate(self.slots) if gfn != _EMPTY}

    def __setstate__(self, used: dict[int, int]) -> None:
        self.slots = [_EMPTY] * ASYNC_PF_PER_VCPU
        for i, gfn in used.items():
            self.slots[i] = gfn
        self.used = len(used)

    def __len__(self) -> int:
        return self.used


@dataclass(slots=True)
class ApfCounters:
    """What every variant's host counts (a variant adds its own fields after these)."""

    not_present_injected: int = 0
    page_ready_injected: int = 0
    wakeup_all_queued: int = 0
    repeated_faults: int = 0
    prefaults: int = 0
    prefaults_missed: int = 0


@dataclass(frozen=True, slots=True)
class ProtocolOptions:
    """Knobs of the variants (defaults: the seed as posted)."""

    no_kvmapf: bool = False  # guest boot option `no-kvmapf`
    send_always: bool = False  # the seed leaves KVM_ASYNC_PF_SEND_ALWAYS as a FIXME
    no_fault_inst_range: int = DEFAULT_NO_FAULT_INST_RANGE  # host default window
    guest_handler_offsets_max: int = 0x1000  # the guest asks for this + 4096
    preempt_count_config: bool = True  # CONFIG_PREEMPT_COUNT


class ArchApf(Protocol):
    """What the skeleton reads of a variant's ``vcpu->arch.apf``."""

    gfns: GfnHash
    view: GuestView


A = TypeVar("A", bound=ArchApf)


class HostBase(Generic[A]):
    """The generic core's per-vCPU lists plus the arch-independent steps of the fault path.

    A subclass provides ``arch`` (per-vCPU state with ``gfns`` and ``view``), ``stats`` (an
    :class:`ApfCounters`) and the delivery hooks; it overrides a ``kvm_arch_*`` step of
    :meth:`try_async_pf` only where its kernel code differs.
    """

    name: ClassVar[str]
    stats: Any  # an ApfCounters subclass
    arch: list[A]
    mutant: str | None = None  # a fixed bug put back (apfsim.check.mutants); None = as fixed
    reserved_token_zero: ClassVar[bool] = False  # token 0 means "slot free" (x86 5.10+: B9)
    unique_tokens: ClassVar[bool] = True  # a token names one fault (not so on s390: the pid)
    gfn_lookup: ClassVar[bool] = True  # kvm_find_async_pf_gfn before queueing (s390 has none)

    def __init__(self, n_vcpus: int, prefault: PrefaultFn, gup_nowait: GupNowaitFn | None) -> None:
        self.prefault = prefault
        self.gup_nowait = gup_nowait
        self.apf = [VcpuAsyncPf(vcpu_id=i) for i in range(n_vcpus)]

    # -- the fault path ------------------------------------------------------------------------
    def gup_nowait_first(self, gfn: int) -> None:
        """FOLL_NOWAIT GUP: submits the swap read (with readahead) and returns at once."""
        if self.gup_nowait is not None:
            self.gup_nowait(gfn)

    def try_async_pf(self, vcpu: int, gfn: int, view: GuestView, now_ns: int) -> FaultResult:
        """The arch fault path once GUP NOWAIT said "needs I/O" (x86 ``__kvm_faultin_pfn``,
        RFCv2 ``user_mem_abort``): the gate comes before the gfn lookup, so a repeated
        fault with the gate closed is synchronous even though a worker fetches the page."""
        self.gup_nowait_first(gfn)
        arch = self.arch[vcpu]
        arch.view = view
        cause = self.kvm_can_do_async_pf(vcpu, view)
        if cause is not None:
            return FaultResult(FaultDecision.SYNC, cause=cause)
        if self.gfn_lookup and arch.gfns.find(gfn):
            self.stats.repeated_faults += 1
            return self.kvm_async_pf_repeated_fault(vcpu)
        token = self.kvm_arch_setup_async_pf_token(vcpu)
        work = kvm_setup_async_pf(self.apf[vcpu], self, gfn, token, now_ns)
        if work is None:
            return _QUEUE_FULL
        return self.kvm_arch_async_pf_result(work)

    def kvm_can_do_async_pf(self, vcpu: int, view: GuestView) -> SyncCause | None:
        """May this fault go async at all; None means yes."""
        raise NotImplementedError

    def kvm_async_pf_repeated_fault(self, vcpu: int) -> FaultResult:
        """The gfn is already outstanding: arm64 has no halt, it re-enters and re-faults."""
        return _REPEATED

    def kvm_arch_setup_async_pf_token(self, vcpu: int) -> int:
        raise NotImplementedError

    def kvm_arch_async_pf_result(self, work: AsyncPf) -> FaultResult:
        """What the vCPU does once the item is queued: re-enter with not-present pending."""
        return FaultResult(FaultDecision.ASYNC, work=work)

    # -- hooks of the generic core (host/async_pf.py:ArchHooks) ---------------------------------
    def kvm_arch_async_page_not_present(self, vcpu_id: int, work: AsyncPf) -> bool:
        raise NotImplementedError

    def kvm_arch_async_page_present(self, vcpu_id: int, work: AsyncPf) -> None:
        raise NotImplementedError

    def kvm_arch_can_dequeue_async_page_present(self, vcpu_id: int) -> bool:
        raise NotImplementedError

    def kvm_arch_async_page_present_queued(self, vcpu_id: int) -> None:
        raise NotImplementedError

    def kvm_arch_async_page_ready(self, vcpu_id: int, work: AsyncPf) -> None:
        """Prefault the page so the woken task's retry does not fault again."""
        self.stats.prefaults += 1
        if not self.prefault(work.gfn):
            self.stats.prefaults_missed += 1

    def worker_done(self, work: AsyncPf) -> bool:
        return async_pf_execute(self.apf[work.vcpu_id], self, work)

    def request_pending(self, vcpu: int) -> bool:
        return False

    def call_kind(self, call: int) -> GuestCallKind:
        """Every paravirt call is a plain hypercall unless the variant says otherwise."""
        return GuestCallKind.HYPERCALL

    def counters(self) -> dict[str, int]:
        return counter_dict(self.stats)

    def lapic_enabled(self, vcpu: int) -> bool:
        """Whether the guest's interrupt controller takes interrupts (x86: LAPIC SPIV)."""
        return True

    def kvm_lapic_set_enabled(self, vcpu: int, enabled: bool) -> None:
        """The guest software-enables or disables its interrupt controller (x86 only)."""

    def narrow_token_ids(self, bits: int) -> None:
        """The model checker's small worlds: let the token id counter wrap at ``bits``."""

    # -- the model checker's flat state key (apfsim.snapshot) -----------------------------------
    arch_fields: ClassVar[Fields]
    """The arch record's scalar state fields: not ``gfns`` and the shared block (frozen
    here), nor history the host writes before it reads (the registers at the last exit)."""

    def freeze(self, works: WorkMemo) -> tuple[Any, ...]:
        """The host's state: the generic core's lists, each arch record, the variant's own."""
        get = self.arch_fields.freeze
        return (
            tuple([apf.freeze(works) for apf in self.apf]),
            tuple([(get(arch), arch.gfns.freeze()) for arch in self.arch]),
            self.freeze_own(works),
        )

    def thaw(self, state: tuple[Any, ...], works: WorkTable) -> None:
        apfs, archs, own = state
        for apf, frozen in zip(self.apf, apfs, strict=True):
            apf.thaw(frozen, works)
        put = self.arch_fields.thaw
        for arch, (values, gfns) in zip(self.arch, archs, strict=True):
            put(arch, values)
            arch.gfns.thaw(gfns)
        self.thaw_own(own, works)

    def freeze_own(self, works: WorkMemo) -> tuple[Any, ...]:
        """The variant's state outside the arch records (its shared blocks, its queues)."""
        return ()

    def thaw_own(self, state: tuple[Any, ...], works: WorkTable) -> None:
        pass

    # -- the variant's own invariant hooks (apfsim.invariants) ------------------------------------
    def apf_on(self, vcpu: int) -> bool:
        """Whether async PF is enabled on ``vcpu`` (the gfn hash is checked only then)."""
        return bool(getattr(self.arch[vcpu], "enabled", True))

    def check_arch(self, vcpu: int, in_guest: bool) -> Broken:
        """The variant's own invariants of ``vcpu`` (I3, I9); None when they hold."""
        return None

    def missed_kick(self, vcpu: int, in_guest: bool, requested: bool, ack_pending: bool) -> Broken:
        """I9 for designs that kick on the first completion unless a page-ready is pending
        (whose ACK re-checks): a request left on a running vCPU waits for an unrelated exit."""
        if (
            in_guest
            and requested
            and not ack_pending
            and self.apf[vcpu].done
            and self.kvm_arch_can_dequeue_async_page_present(vcpu)
        ):
            return "I9", (
                f"vCPU{vcpu}: a page-ready request is set while the vCPU runs in the guest, "
                "nobody kicked it and no ACK is pending: the page-ready waits for an "
                "unrelated exit (missed kick)"
            )
        return None


_GUEST_SCALARS: dict[type, Fields] = {}


# Subclassed by interpreted code (tracing, tests) in the compiled build.
@mypyc_attr(allow_interpreted_subclasses=True)
class GuestBase:
    """A guest driver's call sites, as no-op hooks: a guest without the PV driver."""

    mutant: str | None = None
    # The run's checker, told of every sleep record linked or unlinked; None in the model
    # checker (not state: never set there) and with checks off.
    sleep_log: SleepLog | None = None

    @classmethod
    def not_state(cls) -> tuple[str, ...]:
        """Dataclass fields :meth:`scalar_fields` leaves out: ports, counters, configuration
        fixed at creation, and what the driver's :meth:`freeze` handles itself. (A method,
        not a class attribute: a compiled dataclass would take that for a field.)"""
        return ()

    def scalar_fields(self) -> Fields:
        """The driver's other dataclass fields: scalars, frozen as they are."""
        cls = type(self)
        known = _GUEST_SCALARS.get(cls)
        if known is None:
            known = _GUEST_SCALARS[cls] = Fields.of(cls, exclude=cls.not_state())
        return known

    def boot(self) -> None:
        pass

    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome:
        return AbortOutcome.NOT_APF

    def on_ret_to_user(self, cpu: int) -> None:
        pass

    def on_idle_entry(self, cpu: int) -> None:
        pass

    def on_context_switch(self, cpu: int, task: int) -> None:
        """``__switch_to`` made ``task`` (-1: idle) current on ``cpu`` (s390 writes its pid
        into the lowcore there, where the host reads the pfault token)."""

    def waiter_woken(self, cpu: int, task: int) -> bool:
        return True

    def counters(self) -> dict[str, int]:
        return {}

    def shared_blocks(self) -> Sequence[SharedBlock]:
        """The per-CPU data blocks the host writes (none without the driver)."""
        return ()

    def freeze(self) -> tuple[Any, ...]:
        """The driver's state as plain values (the model checker's key; apfsim.snapshot)."""
        return ()

    def thaw(self, state: tuple[Any, ...]) -> None:
        """Write a :meth:`freeze` result back (sleep records are made anew)."""

    def wait_nodes(self) -> list[WaitNode]:
        """Every sleep record the driver holds (I6)."""
        return []

    # Lifecycle callbacks: only drivers whose Variant says ``lifecycle`` model them.
    def cpu_offline(self, cpu: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} models no CPU hotplug")

    def cpu_online(self, cpu: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} models no CPU hotplug")

    def reboot(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} models no reboot")


class HostFactory(Protocol):
    """A host half's class: ``create`` builds it over the guest's shared blocks."""

    def create(
        self, blocks: Sequence[Any], n_vcpus: int, ports: HostPorts, opt: ProtocolOptions
    ) -> HostProtocol: ...


class GuestFactory(Protocol):
    """A guest driver's class: ``create`` builds it for ``n_cpus`` CPUs."""

    def create(self, port: KernelPort, n_cpus: int, opt: ProtocolOptions) -> GuestProtocol: ...


@dataclass(frozen=True, slots=True)
class Variant:
    """One protocol design, as the registry lists it; ``check/``, ``trace/`` and the
    invariants ask this record (and the halves it builds) instead of testing names or types.

    ``arch`` picks the exception-entry rule and the trace layout (``arm64``, ``x86``,
    ``s390``, or ``any``: the scenario's ``guest.arch``); ``lifecycle``: the guest driver
    models CPU hotplug and reboot callbacks. ``summary`` (one line) and ``source`` (the public
    code or patch series it follows) are what ``apfsim protocols`` lists.
    """

    def arch_in(self, scenario_arch: str) -> str:
        """The arch a run of this variant has in a guest of ``scenario_arch``."""
        return scenario_arch if self.arch == "any" else self.arch

    name: str
    arch: str
    host: HostFactory
    guest: GuestFactory
    lifecycle: bool = False
    summary: str = ""
    source: str = ""
