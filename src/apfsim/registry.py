"""The registry of protocol designs: one :class:`~apfsim.protocols.common.Variant` line each.

A variant is a host half (the arch hooks over the generic core) and a guest driver;
:func:`build_protocol` builds the guest, then the host over the guest's shared blocks, and
wires both to the simulator's (or the model checker's) ports. Adding a design is its own
modules plus one line in :data:`VARIANTS`.
"""

from __future__ import annotations

from apfsim.guest.kvm_apf_arm64 import Arm64ApfGuest
from apfsim.guest.kvm_apf_x86 import X86ApfGuest
from apfsim.guest.kvm_apf_x86_legacy import X86LegacyApfGuest
from apfsim.guest.kvm_pfault_s390 import S390PfaultGuest
from apfsim.ports import GuestProtocol, HostPorts, HostProtocol, KernelPort
from apfsim.protocols.arm64_rfcv2 import Arm64Rfcv2Host
from apfsim.protocols.arm64_sdei_ppi import Arm64SdeiPpiGuest, Arm64SdeiPpiHost
from apfsim.protocols.common import ProtocolOptions, Variant
from apfsim.protocols.guest_initiated import GuestInitiatedGuest, GuestInitiatedHost
from apfsim.protocols.memory_fault_exit import MemoryFaultExitHost
from apfsim.protocols.s390_pfault import S390PfaultHost
from apfsim.protocols.sync import NoApfGuest, SyncHost
from apfsim.protocols.x86 import X86Host
from apfsim.protocols.x86_legacy import X86LegacyHost
from apfsim.scenario import did_you_mean

__all__ = ["PROTOCOLS", "ProtocolOptions", "Variant", "build_protocol", "variant"]

VARIANTS = (
    Variant(
        "sync",
        "any",  # the scenario's guest.arch
        SyncHost,
        NoApfGuest,
        summary="no async PF: a fault that needs I/O blocks the vCPU thread (the baseline)",
        source="blocking GUP in user_mem_abort / the x86 MMU fault path",
    ),
    Variant(
        "arm64-rfcv2",
        "arm64",
        Arm64Rfcv2Host,
        Arm64ApfGuest,
        lifecycle=True,
        summary="both signals an injected data abort; not-present at EL0 only; never merged",
        source='Gavin Shan, "[RFCv2 0/9] kvm/arm64: Support Async Page Fault", kvmarm, May 2020',
    ),
    Variant(
        "x86",
        "x86",
        X86Host,
        X86ApfGuest,
        lifecycle=True,
        summary="not-present as a #PF, page-ready as an interrupt vector; upstream since 5.10",
        source="arch/x86/kvm/x86.c, arch/x86/kernel/kvm.c (Linux 5.10+)",
    ),
    Variant(
        "x86-legacy",
        "x86",
        X86LegacyHost,
        X86LegacyApfGuest,
        lifecycle=True,
        summary="both signals a #PF announced by a reason word; Linux 2.6.38 to 5.7",
        source="arch/x86/kvm/x86.c, arch/x86/kernel/kvm.c (Linux 2.6.38-5.7)",
    ),
    Variant(
        "halt-only",
        "x86",
        X86Host,
        NoApfGuest,  # a guest without the PV driver
        summary="x86 host, guest without the PV driver: a fault that needs I/O halts the vCPU",
        source="arch/x86/kvm/x86.c with the guest never enabling async PF",
    ),
    Variant(
        "arm64-sdei-ppi",
        "arm64",
        Arm64SdeiPpiHost,
        Arm64SdeiPpiGuest,
        summary="not-present as an SDEI event, page-ready as a PPI; never merged",
        source='Gavin Shan, "[PATCH v4 00/15] Support Asynchronous Page Fault", 2021',
    ),
    Variant(
        "guest-initiated",
        "x86",
        GuestInitiatedHost,
        GuestInitiatedGuest,
        lifecycle=True,
        summary="the guest is told first and asks the host by hypercall to fetch the page",
        source="Paolo Bonzini's reply to the arm64 RFCv2 series (kvmarm, 2020)",
    ),
    Variant(
        "s390-pfault",
        "s390",
        S390PfaultHost,
        S390PfaultGuest,
        lifecycle=True,
        summary="pfault: DIAG 0x258 handshake, both signals external interrupts",
        source="arch/s390/mm/pfault.c, arch/s390/kvm",
    ),
    Variant(
        "memory-fault-exit",
        "any",
        MemoryFaultExitHost,
        NoApfGuest,
        summary="no async PF; a fault on a page still remote exits to the VMM, which fetches it",
        source="Anish Moorthy, KVM_CAP_EXIT_ON_MISSING v7 (2024); James Houghton, "
        "KVM Userfault v3 (2025)",
    ),
)

PROTOCOLS: dict[str, Variant] = {v.name: v for v in VARIANTS}

Built = tuple[HostProtocol, GuestProtocol]


def variant(name: str) -> Variant:
    """The registry record of ``name``; ValueError names the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(
            f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}"
            f"{did_you_mean(name, PROTOCOLS)}"
        ) from None


def build_protocol(
    name: str, n_vcpus: int, port: KernelPort, ports: HostPorts, opt: ProtocolOptions
) -> Built:
    """Instantiate variant ``name`` for a VM of ``n_vcpus``: the guest driver first, then the
    host over the per-CPU blocks the guest registers."""
    v = variant(name)
    guest = v.guest.create(port, n_vcpus, opt)
    host = v.host.create(guest.shared_blocks(), n_vcpus, ports, opt)
    return host, guest
