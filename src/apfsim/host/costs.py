"""Per-arch exit-cost presets: the host's world-switch and per-operation costs by hardware.

A preset is the cost of KVM's guest exit and entry and of the operations charged on top of
them, for one kind of host: ``x86-vmx`` (``vmx_vcpu_run`` / ``vmx_handle_exit``),
``arm64-vhe`` (the host kernel at EL2: ``kvm_vcpu_run_vhe``) and ``arm64-nvhe`` (the host
kernel at EL1, a hyp stub at EL2: ``__kvm_vcpu_run`` in ``arch/arm64/kvm/hyp/nvhe/switch.c``,
which saves and restores the EL1 system registers on every exit). ``generic`` keeps the
arch-neutral assumptions every run used before presets existed (s390 has no published
figures, so ``auto`` gives it these).

Each published figure is a round trip measured in the guest (exit, dispatch, entry); the
model splits it evenly between ``exit_ns`` and ``entry_ns`` (an assumption: only the sum is
measured) and charges no extra dispatch for a hypercall, since the null hypercall's own
dispatch is inside the measured round trip. Costs without a published figure keep the
``generic`` assumption in every preset. docs/model.md "Per-arch cost presets" gives every
source.

``auto`` picks the preset of the run's arch. An arm64 host defaults to VHE: on ARMv8.1+
hardware (the ThunderX2 of the RFCv2 series included) the kernel stays at EL2 unless told
``kvm-arm.mode=nvhe`` or ``protected`` (``arch/arm64/kernel/idreg-override.c`` maps both to
``id_aa64mmfr1.vh=0``; ``has_vhe()`` in ``arch/arm64/include/asm/virt.h`` then reads the
``ARM64_HAS_VIRT_HOST_EXTN`` capability).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Final, Literal

__all__ = [
    "AUTO_PRESET",
    "PRESETS",
    "PRESET_NAMES",
    "CostPreset",
    "PresetName",
    "ResolvedCosts",
    "cost_keys",
    "preset_for",
    "resolve_costs",
]

PresetName = Literal["auto", "generic", "x86-vmx", "arm64-vhe", "arm64-nvhe"]
PRESET_NAMES: Final = ("auto", "generic", "x86-vmx", "arm64-vhe", "arm64-nvhe")


@dataclass(frozen=True, slots=True)
class CostPreset:
    """One host's costs in ns (the fields ``[host]`` and ``[host.costs]`` leave unset)."""

    exit_ns: int
    entry_ns: int
    hypercall_ns: int
    ack_exit_ns: int
    ipi_send_ns: int
    interrupt_inject_ns: int
    exception_inject_ns: int
    sdei_deliver_ns: int
    sdei_complete_ns: int


# The generic assumptions (docs/model.md ``### [host]``): also every preset's value for a
# cost no published figure covers.
_ASSUMED: Final = {
    "ack_exit_ns": 300,  # the ACK's own trap is a round trip; this is its re-check work
    "ipi_send_ns": 1_000,  # no sender-only figure: published IPI figures are end to end
    "interrupt_inject_ns": 300,  # no figure: a vGIC list register / APIC IRR write
    "exception_inject_ns": 500,  # no figure for #PF / data-abort injection was found
    "sdei_deliver_ns": 1_500,  # SDEI: no measurement published
    "sdei_complete_ns": 1_000,
}


def _round_trip(total_ns: int) -> dict[str, int]:
    """A measured null-hypercall round trip split evenly into exit and entry (the split is
    an assumption; the sum is the figure)."""
    return {"exit_ns": total_ns // 2, "entry_ns": total_ns - total_ns // 2, "hypercall_ns": 0}


PRESETS: Final[dict[str, CostPreset]] = {
    "generic": CostPreset(exit_ns=1_000, entry_ns=1_000, hypercall_ns=500, **_ASSUMED),
    # Landau, Ben-Yehuda, Gordon, "SplitX" (WIOV 2011), Table 1: the direct cost of an exit
    # (world switch out and back) is 2,000 cycles on a Xeon X5570 at 2.93 GHz, KVM of Linux
    # 2.6.34, EPT+VPID: 2000 / 2.93 = 683 ns. Cross-check: kvm-unit-tests vmexit "vmcall"
    # 1,529 TSC cycles on Skylake-SP (Wanpeng Li, kvm, Mar 2020, Message-Id
    # <1584071718-17163-1-git-send-email-wanpengli@tencent.com>) is 510-765 ns at any TSC of
    # 2.0-3.0 GHz (the post names no clock).
    "x86-vmx": CostPreset(**_round_trip(683), **_ASSUMED),
    # kvm-unit-tests arm/micro-bench "hvc" 306 ns (avg) on Ampere Altra, Linux v6.12-rc1,
    # VHE by default (Raghavendra Rao Ananta, kvm, 29 Oct 2024, Message-ID
    # <CAJHc60xQNeTwSBuPhrKO_JBuikqZ7R=BM5rkWht3YwieVXwkHg@mail.gmail.com>). Cross-check:
    # 408 ns on Kunpeng 920 (heqiong, kvm, 1 Nov 2023, quoted in Message-ID
    # <20231101-923f359769ccf8db69c25c4f@orel>).
    "arm64-vhe": CostPreset(**_round_trip(306), **_ASSUMED),
    # The same "hvc" micro-bench, 4,530 ns (avg) on Juno r2 pinned to its Cortex-A53 CPU 0:
    # ARMv8.0, no VHE, so KVM can only run nVHE (Naresh Kamboju, kvm, 24 Feb 2020,
    # Message-ID <CA+G9fYvt2LyqU5G2j_EFKzgPXzt8sDYYm8NxP+zD6Do07REsYw@mail.gmail.com>).
    # An in-order LITTLE core: the slow end of nVHE hardware.
    "arm64-nvhe": CostPreset(**_round_trip(4_530), **_ASSUMED),
}

# ``auto``: the preset of the run's arch.
AUTO_PRESET: Final = {"x86": "x86-vmx", "arm64": "arm64-vhe", "s390": "generic"}

_COST_FIELDS: Final = tuple(f.name for f in fields(CostPreset))
_HOST_FIELDS: Final = ("exit_ns", "entry_ns")  # in ``[host]``; the rest in ``[host.costs]``


def preset_for(preset: str, arch: str) -> str:
    """The preset a run of ``arch`` uses when the scenario says ``preset``."""
    return AUTO_PRESET[arch] if preset == "auto" else preset


@dataclass(frozen=True, slots=True)
class ResolvedCosts(CostPreset):
    """A run's costs: the scenario's explicit keys over its preset's figures."""

    preset: str

    def as_dict(self) -> dict[str, int | str]:
        """The costs and the preset they came from, for a run's results."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve_costs(host: Any, arch: str) -> ResolvedCosts:
    """The costs of a run of ``arch`` from a scenario's ``host`` section: each key the
    scenario sets, else the figure of ``host.costs.preset``."""
    name = preset_for(host.costs.preset, arch)
    preset = PRESETS[name]
    values: dict[str, Any] = {}
    for field in _COST_FIELDS:
        explicit = getattr(host if field in _HOST_FIELDS else host.costs, field)
        values[field] = getattr(preset, field) if explicit is None else explicit
    return ResolvedCosts(preset=name, **values)


def cost_keys(costs: CostPreset) -> dict[str, int]:
    """``costs`` as the dotted scenario keys that set each one explicitly (``host.exit_ns``,
    ``host.costs.hypercall_ns``, ...), for ``with_overrides``: a scenario with them set
    charges the same whatever its preset."""
    return {
        f"host.{name}" if name in _HOST_FIELDS else f"host.costs.{name}": getattr(costs, name)
        for name in _COST_FIELDS
    }
