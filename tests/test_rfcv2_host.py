"""Host side of RFCv2 (patch 7/9, ``virt/kvm/arm/async_pf.c``): tokens, gfn hash, admission,
signal sequencing, SMCCC and runnability."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from apfsim.host.async_pf import ASYNC_PF_PER_VCPU, AsyncPf, WorkState
from apfsim.ports import FaultDecision, GuestView, Injection, InjectionKind, SyncCause
from apfsim.protocols.arm64_rfcv2 import Arm64Rfcv2Host, HostCounters, VcpuApfArch
from apfsim.protocols.common import GfnHash, hash_32, make_token


def _far(injection: Injection | None) -> int | None:
    """The FAR of an injected data abort (RFCv2 carries the token there)."""
    if injection is None:
        return None
    assert injection.kind is InjectionKind.DATA_ABORT
    return injection.payload


USER = GuestView(privileged=False)
EL1 = GuestView(privileged=True)
ENABLE = APF_FUNC_UPDATE_ENABLE | KVM_ASYNC_PF_ENABLED


@dataclass
class Prefault:
    """Records prefaulted gfns; ``resident`` False models a page reclaimed meanwhile."""

    resident: bool = True
    gfns: list[int] = field(default_factory=list)

    def __call__(self, gfn: int) -> bool:
        self.gfns.append(gfn)
        return self.resident


def make_host(
    n_vcpus: int = 1, *, enable: bool = True, send_always: bool = False
) -> tuple[Arm64Rfcv2Host, Prefault]:
    """A host whose guest enabled APF on every vCPU and consumed the wake-all."""
    prefault = Prefault()
    host = Arm64Rfcv2Host([ApfData() for _ in range(n_vcpus)], prefault)
    if enable:
        flags = ENABLE | (KVM_ASYNC_PF_SEND_ALWAYS if send_always else 0)
        for vcpu in range(n_vcpus):
            assert host.smccc_apf(vcpu, flags) == SMCCC_RET_SUCCESS
            assert len(host.run_loop_iteration(vcpu, USER)) == 1
            ack(host, vcpu)
        host.stats = HostCounters()
    return host, prefault


def ack(host: Arm64Rfcv2Host, vcpu: int) -> int | None:
    """The guest takes the injected abort and its handler clears ``reason``."""
    far = _far(host.take_injection(vcpu))
    host.arch[vcpu].control_block.reason = 0
    return far


def fault_async(host: Arm64Rfcv2Host, vcpu: int, gfn: int, view: GuestView = USER) -> AsyncPf:
    result = host.try_async_pf(vcpu, gfn, view, now_ns=0)
    assert result.decision is FaultDecision.ASYNC and result.work is not None
    return result.work


# ---------------------------------------------------------------------- tokens


def test_make_token_is_u16_id_shifted_over_vcpu_id() -> None:
    """``arch.token = (vcpu->arch.apf.id++ << 16) | vcpu->vcpu_id`` (u16 id)."""
    assert make_token(3, 2) == (3 << 16) | 2 == 0x30002
    assert make_token(0, 0) == 0
    assert make_token(0x1_0005, 1) == 0x50001  # id is a u16


def test_successive_setups_increment_id() -> None:
    """Each kvm_arch_setup_async_pf consumes one id; tokens carry the vCPU in bits 15:0."""
    host, _ = make_host(n_vcpus=2)
    tokens = []
    for gfn in (0x10, 0x11, 0x12):
        tokens.append(fault_async(host, 1, gfn).token)
        ack(host, 1)
    assert tokens == [0x00001, 0x10001, 0x20001]
    assert host.arch[1].id == 3 and host.arch[0].id == 0


def test_token_id_wraps_after_65536_and_zero_is_not_skipped() -> None:
    """RFCv2 skips neither 0 nor ~0 (the x86 fix B9 is not in the seed)."""
    host, _ = make_host()
    tokens = [host.kvm_arch_setup_async_pf_token(0) for _ in range(65536 + 2)]
    assert tokens[:3] == [0x0000_0000, 0x0001_0000, 0x0002_0000]
    assert tokens[65534:] == [0xFFFE_0000, 0xFFFF_0000, 0x0000_0000, 0x0001_0000]
    assert host.stats.token_wraps == 1
    assert tokens.count(0) == 2


def test_token_can_equal_wake_all_for_vcpu_0xffff() -> None:
    """id 0xffff on vCPU 0xffff gives 0xffffffff, the guest's wake-all token."""
    host, _ = make_host()
    arch = VcpuApfArch(control_block=ApfData(), id=0xFFFF)
    host.arch = {0xFFFF: arch}  # type: ignore[assignment]  # only this vCPU's record
    assert host.kvm_arch_setup_async_pf_token(0xFFFF) == WAKE_ALL_TOKEN
    assert make_token(0xFFFF, 0xFFFF) == WAKE_ALL_TOKEN
    assert arch.id == 0 and host.stats.token_wraps == 1


def test_queue_full_setup_still_consumes_an_id() -> None:
    """``apf.id++`` happens before kvm_setup_async_pf, so a refused setup burns a token."""
    host, _ = make_host()
    for gfn in range(ASYNC_PF_PER_VCPU):
        fault_async(host, 0, gfn)
        ack(host, 0)
    result = host.try_async_pf(0, 0x1000, USER, now_ns=0)
    assert (result.decision, result.cause) == (FaultDecision.SYNC, SyncCause.QUEUE_FULL)
    assert host.arch[0].id == ASYNC_PF_PER_VCPU + 1
    assert not host.arch[0].gfns.find(0x1000)
    assert host.apf[0].queued == ASYNC_PF_PER_VCPU


# ---------------------------------------------------------------------- hash_32 / GfnHash


def test_hash_32_matches_golden_ratio_32_by_hand() -> None:
    """include/linux/hash.h: ``(val * GOLDEN_RATIO_32) >> (32 - bits)``, 0x61C88647."""
    assert hash_32(1, 32) == 0x61C88647
    assert hash_32(0, 6) == 0
    assert hash_32(1, 6) == 24  # 0x61C88647: top six bits 011000
    assert hash_32(2, 6) == 48  # 0xC3910C8E: 110000
    assert hash_32(3, 6) == 9  # 0x1_2559_92D5 mod 2^32 = 0x255992D5: 001001
    assert hash_32(0x10000, 8) == 0x86  # 0x61C88647 << 16 mod 2^32 = 0x86470000
    assert hash_32(0x80000000, 6) == 32  # odd multiplier keeps bit 31 only: 100000


def _pool() -> list[int]:
    """Gfns with deliberately colliding homes (incl. 62/63/0 for wrap-around probing) and
    aliases differing above bit 31 (hashed as ``gfn & 0xffffffff``)."""
    by_home: dict[int, list[int]] = {}
    for gfn in range(1, 20_000):
        by_home.setdefault(hash_32(gfn, 6), []).append(gfn)
    pool: list[int] = []
    for home in (62, 63, 0, 1, 31):
        pool.extend(by_home[home][:14])
    pool.extend(g | (1 << 32) for g in by_home[63][:4])
    pool.extend(by_home[17][:6])
    return pool


POOL = _pool()


def test_pool_has_collisions_and_aliases() -> None:
    homes = [hash_32(g & 0xFFFF_FFFF, 6) for g in POOL]
    assert homes.count(63) >= 18 and len(set(POOL)) == len(POOL) > ASYNC_PF_PER_VCPU


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(POOL)), max_size=250))
def test_gfn_hash_matches_set_model(ops: list[tuple[bool, int]]) -> None:
    """kvm_async_pf_hash_add/find/remove agree with a set; backward-shift delete keeps
    every other key findable."""
    table = GfnHash()
    model: set[int] = set()
    for add, gfn in ops:
        if add:
            if gfn in model or len(model) >= ASYNC_PF_PER_VCPU:
                continue  # the host only adds after a failed find, with a free slot
            table.add(gfn)
            model.add(gfn)
        else:
            table.delete(gfn)
            model.discard(gfn)
        assert len(table) == len(model)
        for g in POOL:
            assert table.find(g) == (g in model), hex(g)


@settings(max_examples=40, deadline=None)
@given(st.permutations(POOL[:ASYNC_PF_PER_VCPU]))
def test_gfn_hash_full_table_drains_in_any_order(order: list[int]) -> None:
    """All 64 slots used (probing wraps), then delete in any order."""
    table = GfnHash()
    for gfn in POOL[:ASYNC_PF_PER_VCPU]:
        table.add(gfn)
    assert len(table) == ASYNC_PF_PER_VCPU
    assert not table.find(POOL[ASYNC_PF_PER_VCPU])  # a full probe cycle finds nothing
    remaining = set(order)
    for gfn in order:
        table.delete(gfn)
        remaining.discard(gfn)
        assert all(table.find(g) for g in remaining)
        assert not table.find(gfn)
    assert len(table) == 0


def test_gfn_hash_delete_of_absent_gfn_is_harmless() -> None:
    table = GfnHash()
    table.add(POOL[0])
    table.delete(POOL[1])
    assert table.find(POOL[0]) and len(table) == 1


# ---------------------------------------------------------------------- try_async_pf


def test_async_queues_work_and_injects_not_present() -> None:
    """try_async_pf → kvm_arch_setup_async_pf → not_present: hash add, reason=1, dabt(token)."""
    host, _ = make_host()
    result = host.try_async_pf(0, 0x42, USER, now_ns=7)
    assert result.decision is FaultDecision.ASYNC and result.cause is None
    work = result.work
    assert work is not None
    assert (work.gfn, work.token, work.start_ns, work.state) == (0x42, 0, 7, WorkState.RUNNING)
    assert work.notpresent_injected
    arch = host.arch[0]
    assert arch.control_block.reason == KVM_PV_REASON_PAGE_NOT_PRESENT
    assert arch.pending_abort == work.token
    assert arch.gfns.find(0x42)
    assert host.apf[0].queue == [work] and host.apf[0].queued == 1
    assert host.stats.not_present_injected == 1


def test_repeated_fault_on_outstanding_gfn_reenters_without_new_work() -> None:
    """``kvm_async_pf_hash_find(vcpu, gfn)`` → return 1: no halt on arm64, no new token."""
    host, _ = make_host()
    fault_async(host, 0, 0x42)
    ack(host, 0)
    result = host.try_async_pf(0, 0x42, USER, now_ns=0)
    assert result.decision is FaultDecision.REPEATED and result.work is None
    assert host.apf[0].queued == 1 and host.arch[0].id == 1
    assert host.arch[0].control_block.reason == 0
    assert host.arch[0].pending_abort is None
    assert host.stats.repeated_faults == 1


def test_repeated_fault_with_reason_busy_is_sync() -> None:
    """The can-inject gate comes before the hash lookup in try_async_pf."""
    host, _ = make_host()
    fault_async(host, 0, 0x42)
    result = host.try_async_pf(0, 0x42, USER, now_ns=0)
    assert (result.decision, result.cause) == (FaultDecision.SYNC, SyncCause.REASON_BUSY)
    assert host.stats.repeated_faults == 0


def test_not_enabled_is_sync_no_apf() -> None:
    host, _ = make_host(enable=False)
    result = host.try_async_pf(0, 0x42, USER, now_ns=0)
    assert (result.decision, result.cause) == (FaultDecision.SYNC, SyncCause.NO_APF)
    assert host.arch[0].id == 0


def test_reason_busy_is_sync() -> None:
    """Patch: "Pending page fault, which ins't acknowledged by guest"."""
    host, _ = make_host()
    host.arch[0].control_block.reason = KVM_PV_REASON_PAGE_READY
    result = host.try_async_pf(0, 0x42, USER, now_ns=0)
    assert (result.decision, result.cause) == (FaultDecision.SYNC, SyncCause.REASON_BUSY)


@pytest.mark.parametrize(
    ("pc_offset", "decision"),
    [
        (0, FaultDecision.SYNC),
        (DEFAULT_NO_FAULT_INST_RANGE - 1, FaultDecision.SYNC),
        (DEFAULT_NO_FAULT_INST_RANGE, FaultDecision.ASYNC),
        (0x5000, FaultDecision.ASYNC),
        (None, FaultDecision.ASYNC),
    ],
)
def test_no_inject_window(pc_offset: int | None, decision: FaultDecision) -> None:
    """``pc >= vbar && pc < vbar + no_fault_inst_range`` → no injection (ELR_EL1 unsaved)."""
    host, _ = make_host(send_always=True)
    result = host.try_async_pf(0, 0x42, GuestView(True, pc_offset), now_ns=0)
    assert result.decision is decision
    if decision is FaultDecision.SYNC:
        assert result.cause is SyncCause.WINDOW


def test_send_user_only_gates_privileged_faults() -> None:
    """``send_user_only && vcpu_mode_priv(vcpu)``: the seed never sets SEND_ALWAYS."""
    host, _ = make_host()
    assert host.arch[0].send_user_only
    result = host.try_async_pf(0, 0x42, EL1, now_ns=0)
    assert (result.decision, result.cause) == (FaultDecision.SYNC, SyncCause.GATED_CONTEXT)
    # The patch's order: the privilege gate is tested before the window.
    inside = host.try_async_pf(0, 0x42, GuestView(True, 0x10), now_ns=0)
    assert inside.cause is SyncCause.GATED_CONTEXT


def test_send_always_allows_privileged_faults() -> None:
    host, _ = make_host(send_always=True)
    assert not host.arch[0].send_user_only
    assert host.try_async_pf(0, 0x42, EL1, now_ns=0).decision is FaultDecision.ASYNC


def test_queue_full_after_64_outstanding() -> None:
    """kvm_setup_async_pf refuses at ``queued >= ASYNC_PF_PER_VCPU`` (64)."""
    host, _ = make_host()
    for gfn in range(ASYNC_PF_PER_VCPU):
        fault_async(host, 0, gfn)
        ack(host, 0)
    result = host.try_async_pf(0, 0x999, USER, now_ns=0)
    assert (result.decision, result.cause) == (FaultDecision.SYNC, SyncCause.QUEUE_FULL)
    assert host.arch[0].control_block.reason == 0 and host.arch[0].pending_abort is None


# ---------------------------------------------------------------------- signal sequencing


def test_page_ready_waits_for_guest_to_clear_reason() -> None:
    """RFCv2: "signals are fired and consumed in sequential fashion": none while reason != 0."""
    host, prefault = make_host()
    work = fault_async(host, 0, 0x42)
    assert host.worker_done(work)
    assert host.run_loop_iteration(0, USER) == []
    assert host.arch[0].pending_abort == work.token  # the not-present, still pending
    assert work.state is WorkState.DONE
    ack(host, 0)
    assert host.run_loop_iteration(0, USER) == [work]
    arch = host.arch[0]
    assert arch.control_block.reason == KVM_PV_REASON_PAGE_READY
    assert arch.pending_abort == work.token
    assert not arch.gfns.find(0x42)
    assert host.apf[0].queued == 0 and host.apf[0].queue == []
    state: WorkState = work.state  # read again: mypy keeps the narrowing above
    assert state is WorkState.DELIVERED
    assert prefault.gfns == [0x42]
    assert host.stats.page_ready_injected == 1 and host.stats.prefaults == 1


def test_exactly_one_page_ready_per_iteration_in_completion_order() -> None:
    host, _ = make_host()
    works = []
    for gfn in (0x1, 0x2, 0x3):
        works.append(fault_async(host, 0, gfn))
        ack(host, 0)
    for work in (works[2], works[0], works[1]):
        host.worker_done(work)
    delivered = []
    for _ in range(3):
        batch = host.run_loop_iteration(0, USER)
        assert len(batch) == 1
        assert host.arch[0].pending_abort == batch[0].token
        delivered.extend(batch)
        ack(host, 0)
    assert delivered == [works[2], works[0], works[1]]
    assert host.run_loop_iteration(0, USER) == []
    assert host.apf[0].queued == 0


def test_prefault_miss_is_counted() -> None:
    """kvm_arch_async_page_ready: the page was reclaimed again before the prefault."""
    host, prefault = make_host()
    prefault.resident = False
    work = fault_async(host, 0, 0x42)
    ack(host, 0)
    host.worker_done(work)
    assert host.run_loop_iteration(0, USER) == [work]
    assert host.stats.prefaults == 1 and host.stats.prefaults_missed == 1
    assert host.arch[0].control_block.reason == KVM_PV_REASON_PAGE_READY  # still told


def test_page_ready_obeys_window_and_is_sent_at_el1() -> None:
    """can_inject_async_page_present: same reason/window gates, but any exception level."""
    host, _ = make_host()
    assert host.arch[0].send_user_only
    work = fault_async(host, 0, 0x42)
    ack(host, 0)
    host.worker_done(work)
    assert host.run_loop_iteration(0, GuestView(True, 0x100)) == []
    assert host.run_loop_iteration(0, GuestView(False, 0x7FF)) == []
    assert host.run_loop_iteration(0, EL1) == [work]
    assert host.arch[0].control_block.reason == KVM_PV_REASON_PAGE_READY


# ---------------------------------------------------------------------- SMCCC


def test_set_range_only_grows_while_disabled() -> None:
    """BIT(62): ``no_fault_inst_range = max(range, val)``."""
    host, _ = make_host(enable=False)
    assert host.arch[0].no_fault_inst_range == DEFAULT_NO_FAULT_INST_RANGE == 0x800
    assert host.smccc_apf(0, APF_FUNC_SET_RANGE | 0x400) == SMCCC_RET_SUCCESS
    assert host.arch[0].no_fault_inst_range == 0x800
    assert host.smccc_apf(0, APF_FUNC_SET_RANGE | 0x2000) == SMCCC_RET_SUCCESS
    assert host.arch[0].no_fault_inst_range == 0x2000


def test_set_range_while_enabled_is_refused() -> None:
    """Patch 7/9 ``kvm_async_pf_hypercall``: BIT(62) while enabled → NOT_SUPPORTED."""
    host, _ = make_host()
    assert host.smccc_apf(0, APF_FUNC_SET_RANGE | 0x4000) == SMCCC_RET_NOT_SUPPORTED
    assert host.arch[0].no_fault_inst_range == DEFAULT_NO_FAULT_INST_RANGE


@pytest.mark.parametrize(
    "val",
    [0, KVM_ASYNC_PF_ENABLED, APF_FUNC_UPDATE_ENABLE | APF_FUNC_SET_RANGE | 0x4000],
    ids=["no-function", "flags-only", "both-bits"],
)
def test_unrecognised_smccc_function_is_not_supported(val: int) -> None:
    """``switch (func) { ... default: ret = SMCCC_RET_NOT_SUPPORTED; }`` (patch 7/9)."""
    host, _ = make_host(enable=False)
    assert host.smccc_apf(0, val) == SMCCC_RET_NOT_SUPPORTED
    assert host.arch[0].no_fault_inst_range == DEFAULT_NO_FAULT_INST_RANGE
    assert not host.arch[0].enabled


def test_enable_resets_hash_and_queues_wake_all() -> None:
    """kvm_async_pf_update_enable_reg: hash reset, send_user_only, kvm_async_pf_wakeup_all."""
    host, prefault = make_host(enable=False)
    host.arch[0].gfns.add(0x77)  # stale entry from an earlier life
    assert host.smccc_apf(0, ENABLE) == SMCCC_RET_SUCCESS
    assert host.arch[0].enabled and host.arch[0].send_user_only
    assert len(host.arch[0].gfns) == 0
    [item] = host.apf[0].done
    assert item.wakeup_all and host.apf[0].queued == 1 and host.apf[0].queue == []
    assert host.stats.wakeup_all_queued == 1
    assert host.vcpu_runnable(0)
    assert host.run_loop_iteration(0, USER) == [item]
    assert host.arch[0].control_block.reason == KVM_PV_REASON_PAGE_READY
    assert _far(host.take_injection(0)) == WAKE_ALL_TOKEN
    assert prefault.gfns == []  # no prefault for wakeup_all
    assert host.apf[0].queued == 0


def test_enable_twice_and_disable_twice_are_not_required() -> None:
    """``enable == enabled`` → SMCCC_RET_NOT_REQUIRED, with no second wake-all."""
    host, _ = make_host()
    assert host.smccc_apf(0, ENABLE) == SMCCC_RET_NOT_REQUIRED
    assert host.smccc_apf(0, ENABLE | KVM_ASYNC_PF_SEND_ALWAYS) == SMCCC_RET_NOT_REQUIRED
    assert host.arch[0].send_user_only
    assert not host.apf[0].done
    assert host.smccc_apf(0, APF_FUNC_UPDATE_ENABLE) == SMCCC_RET_SUCCESS
    assert host.smccc_apf(0, APF_FUNC_UPDATE_ENABLE) == SMCCC_RET_NOT_REQUIRED


def test_disable_cancels_everything_and_ignores_later_completions() -> None:
    """Disable → kvm_clear_async_pf_completion_queue: in-flight I/O finishes, unseen."""
    host, prefault = make_host()
    running = fault_async(host, 0, 0x1)
    ack(host, 0)
    done = fault_async(host, 0, 0x2)
    ack(host, 0)
    host.worker_done(done)
    assert host.smccc_apf(0, APF_FUNC_UPDATE_ENABLE) == SMCCC_RET_SUCCESS
    apf = host.apf[0]
    assert apf.queue == [] and not apf.done and apf.queued == 0
    assert running.state is WorkState.CANCELLED and done.state is WorkState.CANCELLED
    assert host.stats.cancelled == 2
    assert not host.worker_done(running)
    assert host.run_loop_iteration(0, USER) == []
    assert _far(host.take_injection(0)) is None
    assert host.arch[0].control_block.reason == 0
    assert prefault.gfns == []
    result = host.try_async_pf(0, 0x3, USER, now_ns=0)
    assert result.cause is SyncCause.NO_APF


def test_vcpu_runnable_iff_done_nonempty_or_reason_set_while_enabled() -> None:
    """kvm_arch_vcpu_runnable's APF clause (only under KVM_ASYNC_PF_ENABLED)."""
    host, _ = make_host()
    assert not host.vcpu_runnable(0)
    work = fault_async(host, 0, 0x42)
    assert host.vcpu_runnable(0)  # reason == 1
    ack(host, 0)
    assert not host.vcpu_runnable(0)  # RUNNING work alone does not count
    host.worker_done(work)
    assert host.vcpu_runnable(0)  # done non-empty
    host.run_loop_iteration(0, USER)
    assert host.vcpu_runnable(0)  # reason == 2
    ack(host, 0)
    assert not host.vcpu_runnable(0)
    disabled, _ = make_host(enable=False)
    disabled.arch[0].control_block.reason = 1
    assert not disabled.vcpu_runnable(0)


def test_unsafe_injection_counted_when_elr_not_saved() -> None:
    """An injection outside the window but before kernel_entry saved ELR_EL1/SPSR_EL1."""
    host, _ = make_host(send_always=True)
    entry = GuestView(privileged=True, pc_offset=0x900, elr_saved=False)
    work = fault_async(host, 0, 0x42, view=entry)
    assert host.stats.unsafe_injections == 1
    ack(host, 0)
    host.worker_done(work)
    assert host.run_loop_iteration(0, entry) == [work]
    assert host.stats.unsafe_injections == 2
    ack(host, 0)
    fault_async(host, 0, 0x43, view=EL1)
    assert host.stats.unsafe_injections == 2


def test_counters_report_every_field() -> None:
    host, _ = make_host()
    fault_async(host, 0, 0x42)
    counters = host.counters()
    assert set(counters) == set(HostCounters.__dataclass_fields__)
    assert counters["not_present_injected"] == 1
