"""Fixed kernel bugs put back (spec §5), each at the line its fix changed, plus one
design-level mutant (``dummy-drop``: the wake-before-wait record dropped).

A mutant is a name the protocol code tests at that line (``self.mutant == "B9"``), so the
checker runs the shipped code with exactly one fix reverted. Each entry says which protocol
carries it, the fix's title, and the smallest world that exposes it; ``apfsim check
--mutant NAME`` must find a counterexample for every one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MUTANTS", "Mutant"]


@dataclass(frozen=True)
class Mutant:
    name: str
    protocol: str
    fix: str  # the fix's title (spec §5)
    reverted: str  # what the mutant does instead, in kernel terms
    world: dict[str, Any] = field(default_factory=dict)  # WorldConfig fields that expose it
    also: tuple[str, ...] = ()  # other protocols whose code has the same switch


MUTANTS: dict[str, Mutant] = {
    m.name: m
    for m in (
        Mutant(
            "B1",
            "x86",
            '"KVM MMU: check pending exception before injecting APF" (2a266f23550b)',
            "kvm_can_do_async_pf ignores an event awaiting reinjection, so the async #PF is "
            "injected on top of it (#DF)",
            {"vcpus": 1, "tasks": 1, "pages": 1, "event_pending": True},
        ),
        Mutant(
            "B4",
            "x86",
            '"x86/kvm: Restrict ASYNC_PF to user space" (3a7c8fafd1b4, v5.8)',
            "kvm_guest_cpu_init asks for SEND_ALWAYS again, so the host injects not-present "
            "in kernel mode too, which the 5.8+ guest (no halted wait) treats as a fatal "
            "'async #PF in kernel mode'",
            {"vcpus": 1, "tasks": 1, "pages": 1},
        ),
        Mutant(
            "B5",
            "x86",
            "\"KVM: x86: interrupt based APF 'page ready' event delivery\" and "
            '"acknowledgment mechanism for async pf page ready notifications" (2020)',
            "kvm_arch_can_dequeue_async_page_present ignores the token slot: a second "
            "page-ready overwrites a token the guest has not read",
            {"vcpus": 1, "tasks": 2, "pages": 2, "placement": "one", "modes": ("user",)},
        ),
        Mutant(
            "B8",
            "x86",
            '"KVM: x86: Properly handle APF vs disabled LAPIC situation" (2021)',
            "page-ready is dequeued while the guest's LAPIC is software-disabled: the "
            "interrupt is dropped and the task never wakes",
            {"vcpus": 1, "tasks": 1, "pages": 1, "modes": ("user",), "lapic": True},
        ),
        Mutant(
            "B9",
            "x86",
            '"KVM: x86/mmu: make apf token non-zero to fix bug" (2022)',
            "the apf.id counter wraps to 0 and vCPU 0's token becomes 0, the 'slot free' value",
            {"vcpus": 1, "tasks": 1, "pages": 2, "modes": ("user",), "token_id_bits": 1},
        ),
        Mutant(
            "B12",
            "x86",
            '"KVM: x86: Fix a semi theoretical bug in kvm_arch_async_page_present_queued" (2025)',
            "no barriers between the worker's APF_READY / pageready_pending read and the ACK's "
            "clear / request check: neither side delivers and nobody kicks",
            {"vcpus": 1, "tasks": 2, "pages": 2, "placement": "one", "modes": ("user",)},
        ),
        Mutant(
            "B14",
            "x86",
            "guest kexec/reboot teardown: every CPU writes EN=0 (kvm_guest_cpu_offline("
            "shutdown) unification, 2021; title unverified)",
            "the guest reboots without disabling async PF; the host keeps writing the old "
            "APF data block, now the new kernel's memory",
            {"vcpus": 1, "tasks": 1, "pages": 1, "modes": ("user",), "reboot": True},
        ),
        Mutant(
            "dummy-drop",
            "arm64-sdei-ppi",
            "the wake-before-wait record (x86: the dummy sleep node; the 2021 arm64 series: "
            "the task's async-PF flag cleared by the PPI handler)",
            "a page-ready that arrives before its task went to sleep is dropped, so the task "
            "then sleeps with nobody left to wake it",
            {"vcpus": 1, "tasks": 1, "pages": 1, "modes": ("user",), "syscalls": False},
            also=("x86", "guest-initiated"),
        ),
    )
}
