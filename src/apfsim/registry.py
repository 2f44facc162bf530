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
from apfsim.protocols.s390_pfault import S390PfaultHost
from apfsim.protocols.sync import NoApfGuest, SyncHost
from apfsim.protocols.x86 import X86Host
from apfsim.protocols.x86_legacy import X86LegacyHost

__all__ = ["PROTOCOLS", "ProtocolOptions", "Variant", "build_protocol", "variant"]

VARIANTS = (
    Variant("sync", "any", SyncHost, NoApfGuest),  # the scenario's guest.arch
    Variant("arm64-rfcv2", "arm64", Arm64Rfcv2Host, Arm64ApfGuest, lifecycle=True),
    Variant("x86", "x86", X86Host, X86ApfGuest, lifecycle=True),
    Variant("x86-legacy", "x86", X86LegacyHost, X86LegacyApfGuest, lifecycle=True),
    Variant("halt-only", "x86", X86Host, NoApfGuest),  # a guest without the PV driver
    Variant("arm64-sdei-ppi", "arm64", Arm64SdeiPpiHost, Arm64SdeiPpiGuest),
    Variant("guest-initiated", "x86", GuestInitiatedHost, GuestInitiatedGuest, lifecycle=True),
    Variant("s390-pfault", "s390", S390PfaultHost, S390PfaultGuest, lifecycle=True),
)

PROTOCOLS: dict[str, Variant] = {v.name: v for v in VARIANTS}

Built = tuple[HostProtocol, GuestProtocol]


def variant(name: str) -> Variant:
    """The registry record of ``name``; ValueError names the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None


def build_protocol(
    name: str, n_vcpus: int, port: KernelPort, ports: HostPorts, opt: ProtocolOptions
) -> Built:
    """Instantiate variant ``name`` for a VM of ``n_vcpus``: the guest driver first, then the
    host over the per-CPU blocks the guest registers."""
    v = variant(name)
    guest = v.guest.create(port, n_vcpus, opt)
    host = v.host.create(guest.shared_blocks(), n_vcpus, ports, opt)
    return host, guest
