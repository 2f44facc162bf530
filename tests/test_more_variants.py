"""x86-legacy, arm64-sdei-ppi and guest-initiated: their own paths, unit level and end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import apfsim
from apfsim.abi.arm64 import (
    ARM_SMCCC_KVM_FUNC_ASYNC_PF_ENABLE,
    ARM_SMCCC_KVM_FUNC_ASYNC_PF_IRQ_ACK,
    SDEI_EVENT_COMPLETE,
)
from apfsim.abi.x86 import (
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    MSR_KVM_ASYNC_PF_EN,
)
from apfsim.api import run_protocol
from apfsim.cli import main
from apfsim.guest.kvm_apf_x86_legacy import X86LegacyApfGuest
from apfsim.host.async_pf import AsyncPf
from apfsim.ports import (
    AbortOutcome,
    FaultDecision,
    GuestRegs,
    GuestView,
    Injection,
    InjectionKind,
    SyncCause,
)
from apfsim.protocols.arm64_sdei_ppi import Arm64SdeiPpiGuest, Arm64SdeiPpiHost
from apfsim.protocols.guest_initiated import (
    HC_APF_POPULATE,
    GuestInitiatedGuest,
    GuestInitiatedHost,
)
from apfsim.protocols.x86_legacy import X86LegacyHost
from apfsim.registry import PROTOCOLS

USER = GuestView(privileged=False)
KERNEL = GuestView(privileged=True)


class Port:
    """A fake guest kernel: one current task per CPU; records wake-ups, IPIs and calls."""

    def __init__(self) -> None:
        self.current = {0: 7, 1: 8}
        self.woken: list[int] = []
        self.resched: list[int] = []
        self.host: Any = None
        self.gups: list[int] = []
        self.workers: list[AsyncPf] = []
        self.kicks: list[int] = []

    def current_task(self, cpu: int) -> int:
        return self.current[cpu]

    def swake_up_one(self, task: int) -> None:
        self.woken.append(task)

    def smp_send_reschedule(self, cpu: int) -> None:
        self.resched.append(cpu)

    def kzalloc_atomic(self, cpu: int) -> bool:
        return True

    def rq_is_locked(self, cpu: int) -> bool:
        return False

    def wrmsr(self, cpu: int, msr: int, val: int) -> None:
        self.host.guest_call(cpu, msr, val)

    def smccc(self, cpu: int, function: int, val: int) -> int:
        return int(self.host.guest_call(cpu, function, val))

    def smccc_apf(self, cpu: int, val: int) -> int:
        raise AssertionError("only the RFCv2 driver calls smccc_apf")

    def hypercall(self, cpu: int, nr: int, arg: int) -> int:
        return int(self.host.guest_call(cpu, nr, arg))

    def prefault(self, gfn: int) -> bool:
        return True

    def kick(self, vcpu: int) -> None:
        self.kicks.append(vcpu)

    def gup_nowait(self, gfn: int) -> None:
        self.gups.append(gfn)

    def start_worker(self, work: AsyncPf) -> None:
        self.workers.append(work)


def drain(host: Any, vcpu: int = 0) -> list[Injection]:
    out = []
    while (inj := host.take_injection(vcpu)) is not None:
        out.append(inj)
    return out


# -- x86-legacy -----------------------------------------------------------------------------


def legacy_pair() -> tuple[Port, X86LegacyApfGuest, X86LegacyHost]:
    port = Port()
    guest = X86LegacyApfGuest(port=port, n_cpus=2)
    host = X86LegacyHost(guest.apf_reason, port.prefault, port.kick, port.gup_nowait)
    port.host = host
    guest.boot()
    for vcpu in (0, 1):  # consume the boot wake-all
        host.run_loop_iteration(vcpu, USER)
        for inj in drain(host, vcpu):
            guest.on_injection(vcpu, inj, GuestRegs(user_mode=True))
    return port, guest, host


def test_legacy_guest_sets_send_always_so_kernel_faults_go_async() -> None:
    """Pre-5.8 guests wrote SEND_ALWAYS: the host injects not-present at CPL 0 too."""
    port, guest, host = legacy_pair()
    assert host.arch[0].msr_en_val == KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_SEND_ALWAYS
    res = host.try_async_pf(0, 0x500, KERNEL, 0)
    assert res.decision is FaultDecision.ASYNC
    assert host.arch[0].block.flags == KVM_PV_REASON_PAGE_NOT_PRESENT
    assert port.gups == [0x500]  # the NOWAIT GUP submitted the read first
    [inj] = drain(host)
    assert inj.kind is InjectionKind.PAGE_FAULT
    out = guest.on_injection(0, inj, GuestRegs(user_mode=False))
    assert out is AbortOutcome.WAIT_SCHEDULE  # preemptible kernel: schedule()


def test_legacy_halted_waiter_is_woken_by_a_resched_ipi_to_itself() -> None:
    """kvm_async_pf_task_wait halts in atomic context; the wake unhashes the node and sends
    smp_send_reschedule(n->cpu): unlike the seed, a page-ready on the halted CPU works."""
    port, guest, host = legacy_pair()
    res = host.try_async_pf(0, 0x600, KERNEL, 0)
    assert res.work is not None
    [inj] = drain(host)
    atomic = GuestRegs(user_mode=False, preempt_count=2)
    assert guest.on_injection(0, inj, atomic) is AbortOutcome.WAIT_HALT
    assert not guest.waiter_woken(0, 7)
    host.worker_done(res.work)
    host.run_loop_iteration(0, KERNEL)
    [ready] = drain(host)
    assert host.arch[0].block.flags == KVM_PV_REASON_PAGE_READY
    assert guest.on_injection(0, ready, atomic) is AbortOutcome.WOKE
    assert port.resched == [0] and guest.waiter_woken(0, 7)


def test_legacy_n_halted_is_computed_under_the_bucket_lock() -> None:
    """v5.7 kvm_async_pf_task_wait takes the bucket's raw spinlock before it computes
    ``n.halted``: a fault taken holding one lock (preempt_count 1) halts."""
    _, guest, host = legacy_pair()
    res = host.try_async_pf(0, 0x680, KERNEL, 0)
    assert res.work is not None
    [inj] = drain(host)
    one_lock = GuestRegs(user_mode=False, preempt_count=1)
    assert guest.on_injection(0, inj, one_lock) is AbortOutcome.WAIT_HALT


def test_legacy_page_ready_cancels_a_not_present_still_pending() -> None:
    """If the not-present #PF has not been delivered yet, both events are dropped."""
    _, _, host = legacy_pair()
    res = host.try_async_pf(0, 0x700, USER, 0)
    assert res.work is not None and host.arch[0].pending_pf == res.work.token
    host.worker_done(res.work)
    host.run_loop_iteration(0, USER)  # the pending #PF blocks delivery (B1)
    assert host.arch[0].pending_pf == res.work.token
    host.arch[0].pending_pf = None  # delivered; the guest has not read `reason` yet
    host.run_loop_iteration(0, USER)
    assert host.arch[0].block.flags == KVM_PV_REASON_PAGE_READY  # overwrote NOT_PRESENT: B2


def test_legacy_page_ready_needs_interrupts_allowed() -> None:
    _, _, host = legacy_pair()
    res = host.try_async_pf(0, 0x800, USER, 0)
    assert res.work is not None
    drain(host)
    host.worker_done(res.work)
    assert host.run_loop_iteration(0, GuestView(privileged=True, irqs_off=True)) == []
    assert len(host.run_loop_iteration(0, USER)) == 1


def test_legacy_token_can_be_zero_before_the_b9_fix() -> None:
    _, _, host = legacy_pair()
    assert host.alloc_apf_token(0) == 0  # (0 << 12) | vcpu 0


# -- arm64-sdei-ppi -------------------------------------------------------------------------


def sdei_pair() -> tuple[Port, Arm64SdeiPpiGuest, Arm64SdeiPpiHost]:
    port = Port()
    guest = Arm64SdeiPpiGuest(port=port, n_cpus=1)
    host = Arm64SdeiPpiHost(guest.buffers, port.prefault, port.kick, port.gup_nowait)
    port.host = host
    guest.boot()
    host.run_loop_iteration(0, USER)
    for inj in drain(host):
        guest.on_injection(0, inj, GuestRegs(user_mode=True))
    port.kicks.clear()  # the boot wake-all kicked once
    port.resched.clear()
    return port, guest, host


def test_sdei_not_present_tags_task_self_ipis_and_completes_the_event() -> None:
    port, guest, host = sdei_pair()
    res = host.try_async_pf(0, 0x10, USER, 0)
    assert res.decision is FaultDecision.ASYNC and host.arch[0].notpresent_pending
    [inj] = drain(host)
    assert inj.kind is InjectionKind.SDEI
    assert host.try_async_pf(0, 0x11, USER, 0).cause is SyncCause.REASON_BUSY  # one in flight
    assert guest.on_injection(0, inj, GuestRegs(user_mode=True)) is AbortOutcome.WAIT_SCHEDULE
    assert port.resched == [0]
    assert not host.arch[0].notpresent_pending and host.stats.sdei_completions == 1
    assert not guest.waiter_woken(0, 7)


def test_sdei_only_at_el0() -> None:
    _, _, host = sdei_pair()
    assert host.try_async_pf(0, 0x12, KERNEL, 0).cause is SyncCause.GATED_CONTEXT


def test_ppi_page_ready_one_in_flight_until_the_smccc_ack() -> None:
    port, guest, host = sdei_pair()
    works = []
    for gfn in (0x20, 0x21):
        res = host.try_async_pf(0, gfn, USER, 0)
        assert res.work is not None
        works.append(res.work)
        for inj in drain(host):
            port.current[0] = 7 if gfn == 0x20 else 9
            guest.on_injection(0, inj, GuestRegs(user_mode=True))
    port.current[0] = 5
    acks_before = host.stats.acks  # the boot wake-all was ACKed already
    for w in works:
        host.worker_done(w)
    assert port.kicks == [0]  # only the first completion kicks
    host.run_loop_iteration(0, USER)
    [ppi] = drain(host)
    assert ppi.kind is InjectionKind.INTERRUPT and host.arch[0].pageready_pending
    assert host.run_loop_iteration(0, USER) == []  # no second PPI before the ACK
    guest.on_injection(0, ppi, GuestRegs(user_mode=True))  # wakes task 7, ACKs
    assert port.woken == [7] and host.stats.acks == acks_before + 1
    [ppi2] = drain(host)  # the ACK delivered the next one inline
    guest.on_injection(0, ppi2, GuestRegs(user_mode=True))
    assert port.woken == [7, 9]
    assert (
        ARM_SMCCC_KVM_FUNC_ASYNC_PF_IRQ_ACK
        != SDEI_EVENT_COMPLETE
        != ARM_SMCCC_KVM_FUNC_ASYNC_PF_ENABLE
    )


# -- guest-initiated ------------------------------------------------------------------------


def gi_pair() -> tuple[Port, GuestInitiatedGuest, GuestInitiatedHost]:
    port = Port()
    guest = GuestInitiatedGuest(port=port, n_cpus=1)
    host = GuestInitiatedHost(
        guest.apf_reason, port.prefault, port.kick, port.gup_nowait, port.start_worker, lambda: 0
    )
    port.host = host
    guest.boot()
    host.run_loop_iteration(0, USER)
    for inj in drain(host):
        guest.on_injection(0, inj, GuestRegs(user_mode=True))
        host.guest_call(0, 0x4B564D07, 1)  # the wake-all ACK
    return port, guest, host


def test_absent_page_is_reported_before_any_io() -> None:
    """Paolo Bonzini: inject the fault "even before the host starts populating the page"."""
    port, _, host = gi_pair()
    res = host.try_async_pf(0, 0x30, USER, 0)
    assert res.decision is FaultDecision.ASYNC and res.work is None
    assert port.gups == [] and port.workers == []
    [inj] = drain(host)
    assert inj.kind is InjectionKind.PAGE_FAULT


def test_populate_hypercall_starts_the_fault_in_and_the_task_sleeps() -> None:
    port, guest, host = gi_pair()
    host.try_async_pf(0, 0x31, USER, 0)
    [inj] = drain(host)
    assert guest.on_injection(0, inj, GuestRegs(user_mode=True)) is AbortOutcome.WAIT_SCHEDULE
    assert port.gups == [0x31] and len(port.workers) == 1
    assert port.workers[0].gfn == 0x31 and host.arch[0].gfns.find(0x31)


def test_kernel_preemptible_context_also_sleeps() -> None:
    _, guest, host = gi_pair()
    host.try_async_pf(0, 0x32, KERNEL, 0)
    [inj] = drain(host)
    assert guest.on_injection(0, inj, GuestRegs(user_mode=False)) is AbortOutcome.WAIT_SCHEDULE


def test_guest_that_cannot_sleep_declines_and_the_retry_is_synchronous() -> None:
    port, guest, host = gi_pair()
    host.try_async_pf(0, 0x33, KERNEL, 0)
    [inj] = drain(host)
    atomic = GuestRegs(user_mode=False, preempt_count=2)
    assert guest.on_injection(0, inj, atomic) is AbortOutcome.RETRY
    assert port.workers == []
    res = host.try_async_pf(0, 0x33, KERNEL, 0)
    assert res.decision is FaultDecision.SYNC and res.cause is SyncCause.GUEST_DECLINED
    assert port.gups == [0x33]


def test_populate_of_an_unknown_token_fails() -> None:
    _, _, host = gi_pair()
    assert host.guest_call(0, HC_APF_POPULATE, 0xDEAD) == -1


def test_msr_en_value_written_at_boot() -> None:
    _, _, host = gi_pair()
    assert host.arch[0].msr_en_val & KVM_ASYNC_PF_ENABLED and MSR_KVM_ASYNC_PF_EN


# -- end to end -----------------------------------------------------------------------------


def small_scenario(kernel_fraction: float = 0.0, kernel_mode: str = "kernel") -> apfsim.Scenario:
    return apfsim.Scenario.model_validate(
        {
            "name": "variants",
            "duration_s": 3.0,
            "guest": {"vcpus": 1, "memory_mib": 96, "reserved_mib": 8},
            "host": {"memory_limit_mib": 48},
            "initial_memory": {"resident_fraction": 0.5, "swapped_fraction": 0.5},
            "tasks": [
                {
                    "kind": "random_writer",
                    "buffer_mib": 80,
                    "kernel_fraction": kernel_fraction,
                    "kernel_mode": kernel_mode,
                },
                {"kind": "compute"},
            ],
        }
    )


def test_legacy_end_to_end_has_no_sync_fallbacks_for_preemptible_kernel_faults() -> None:
    r = run_protocol(small_scenario(0.3), "x86-legacy", seed=2)
    assert r.apf["sync_fallbacks"] == 0
    assert r.apf["waits_schedule"] > 0 and r.apf["guest_bogus_aborts"] == 0
    assert r.apf["page_ready_injected"] >= r.apf["not_present_injected"] - 1


def test_sdei_end_to_end_counts_match() -> None:
    r = run_protocol(small_scenario(), "arm64-sdei-ppi", seed=2)
    assert r.apf["sdei_completions"] == r.apf["not_present_injected"] > 0
    assert r.apf["page_ready_injected"] - r.apf["acks"] in (0, 1)
    assert r.apf["guest_bogus_aborts"] == 0 and r.apf["unknown_token"] == 0


def test_guest_initiated_end_to_end_declines_only_atomic_faults() -> None:
    r = run_protocol(small_scenario(0.3, "kernel_atomic"), "guest-initiated", seed=2)
    assert r.apf["declined"] > 0
    assert r.apf["populate_hypercalls"] + r.apf["declined"] <= r.apf["not_present_injected"]
    assert r.apf["sync_fallback_guest_declined"] == r.apf["declined"]
    r_user = run_protocol(small_scenario(), "guest-initiated", seed=2)
    assert r_user.apf["declined"] == 0 and r_user.apf["guest_panics"] == 0


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_every_protocol_is_deterministic(protocol: str) -> None:
    a = run_protocol(small_scenario(0.1), protocol, seed=3).to_dict()
    b = run_protocol(small_scenario(0.1), protocol, seed=3).to_dict()
    assert a == b
    assert sum(a["vcpus"][0]["time_s"].values()) == pytest.approx(a["sim_time_s"], abs=1e-6)


def test_all_protocols_from_the_cli_and_json_lists_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 3 acceptance: every design on the default scenario from the CLI."""
    out = tmp_path / "all.json"
    args = ["run", "--duration", "2", "--quiet", "--json", str(out)]
    for name in PROTOCOLS:
        args += ["-p", name]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert [r["protocol"] for r in data["results"]] == list(PROTOCOLS)
    assert len(PROTOCOLS) >= 7
