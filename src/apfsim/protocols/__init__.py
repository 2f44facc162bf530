"""Protocol variants: each a small module over the generic core, plus one registry line.

A variant provides the host's arch hooks and the guest's driver; :func:`build_protocol`
wires the two halves to the simulator's (or the model checker's) ports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from apfsim.guest.kvm_apf_arm64 import Arm64ApfGuest, GuestKernelPort
from apfsim.guest.kvm_apf_x86 import X86ApfGuest
from apfsim.guest.kvm_apf_x86_legacy import X86LegacyApfGuest, X86LegacyGuestPort
from apfsim.host.async_pf import AsyncPf
from apfsim.protocols.arm64_rfcv2 import DEFAULT_NO_FAULT_INST_RANGE, Arm64Rfcv2Host
from apfsim.protocols.arm64_sdei_ppi import Arm64SdeiPpiGuest, Arm64SdeiPpiHost, SdeiGuestPort
from apfsim.protocols.base import GuestProtocol, GupNowaitFn, HostProtocol, PrefaultFn
from apfsim.protocols.guest_initiated import (
    GuestInitiatedGuest,
    GuestInitiatedHost,
    GuestInitiatedPort,
)
from apfsim.protocols.sync import NoApfGuest, SyncHost
from apfsim.protocols.x86 import KickFn, X86Host
from apfsim.protocols.x86_legacy import X86LegacyHost

__all__ = ["PROTOCOLS", "GuestCalls", "HostPorts", "ProtocolOptions", "build_protocol"]

ARM_SMCCC_KVM_FUNC_APF = 1  # the vendor-hyp function number the seed's SMCCC call uses


@dataclass(frozen=True, slots=True)
class ProtocolOptions:
    """Knobs of the variants (defaults: the seed as posted)."""

    no_kvmapf: bool = False  # guest boot option `no-kvmapf`
    send_always: bool = False  # the seed leaves KVM_ASYNC_PF_SEND_ALWAYS as a FIXME
    no_fault_inst_range: int = DEFAULT_NO_FAULT_INST_RANGE  # host default window
    guest_handler_offsets_max: int = 0x1000  # the guest asks for this + 4096
    preempt_count_config: bool = True  # CONFIG_PREEMPT_COUNT


class KernelPort(GuestKernelPort, X86LegacyGuestPort, SdeiGuestPort, GuestInitiatedPort, Protocol):
    """Everything any guest driver may call (the simulator implements all of it)."""


class GuestCalls:
    """The guest drivers' exits to the host (SMCCC, WRMSR, hypercall), all through one
    ``_guest_call``; the simulator and the model checker each say what an exit costs."""

    def _guest_call(self, cpu: int, call: int, val: int) -> int:
        raise NotImplementedError

    def smccc_apf(self, cpu: int, val: int) -> int:
        return self._guest_call(cpu, ARM_SMCCC_KVM_FUNC_APF, val)

    def wrmsr(self, cpu: int, msr: int, val: int) -> None:
        self._guest_call(cpu, msr, val)

    def smccc(self, cpu: int, function: int, val: int) -> int:
        return self._guest_call(cpu, function, val)

    def hypercall(self, cpu: int, nr: int, arg: int) -> int:
        return self._guest_call(cpu, nr, arg)


Built = tuple[HostProtocol, GuestProtocol]


@dataclass(frozen=True, slots=True)
class HostPorts:
    """Host services the arch hooks call (the simulator provides them)."""

    prefault: PrefaultFn
    kick: KickFn
    gup_nowait: GupNowaitFn
    start_worker: Callable[[AsyncPf], None]
    now: Callable[[], int]


Factory = Callable[[int, KernelPort, HostPorts, ProtocolOptions], Built]


def _build_sync(n: int, port: KernelPort, ports: HostPorts, opt: ProtocolOptions) -> Built:
    return SyncHost(), NoApfGuest()


def _build_arm64_rfcv2(n: int, port: KernelPort, ports: HostPorts, opt: ProtocolOptions) -> Built:
    guest = Arm64ApfGuest(
        port=port,
        n_cpus=n,
        async_pf_available=not opt.no_kvmapf,
        preempt_count_config=opt.preempt_count_config,
        handler_offsets_max=opt.guest_handler_offsets_max,
        send_always=opt.send_always,
    )
    host = Arm64Rfcv2Host(guest.apf_data, ports.prefault, opt.no_fault_inst_range, ports.gup_nowait)
    return host, guest


def _build_x86(n: int, port: KernelPort, ports: HostPorts, opt: ProtocolOptions) -> Built:
    guest = X86ApfGuest(port=port, n_cpus=n, kvmapf=not opt.no_kvmapf)
    return X86Host(guest.apf_reason, ports.prefault, ports.kick, ports.gup_nowait), guest


def _build_x86_legacy(n: int, port: KernelPort, ports: HostPorts, opt: ProtocolOptions) -> Built:
    guest = X86LegacyApfGuest(
        port=port, n_cpus=n, kvmapf=not opt.no_kvmapf, preempt_count_config=opt.preempt_count_config
    )
    return X86LegacyHost(guest.apf_reason, ports.prefault, ports.kick, ports.gup_nowait), guest


def _build_arm64_sdei_ppi(
    n: int, port: KernelPort, ports: HostPorts, opt: ProtocolOptions
) -> Built:
    guest = Arm64SdeiPpiGuest(port=port, n_cpus=n, kvmapf=not opt.no_kvmapf)
    return Arm64SdeiPpiHost(guest.buffers, ports.prefault, ports.kick, ports.gup_nowait), guest


def _build_guest_initiated(
    n: int, port: KernelPort, ports: HostPorts, opt: ProtocolOptions
) -> Built:
    guest = GuestInitiatedGuest(port=port, n_cpus=n, kvmapf=not opt.no_kvmapf)
    host = GuestInitiatedHost(
        guest.apf_reason,
        ports.prefault,
        ports.kick,
        ports.gup_nowait,
        ports.start_worker,
        ports.now,
    )
    return host, guest


def _build_halt_only(n: int, port: KernelPort, ports: HostPorts, opt: ProtocolOptions) -> Built:
    """A guest without the PV driver on an x86 host: every async fault is an artificial halt."""
    guest = X86ApfGuest(port=port, n_cpus=n, kvmapf=False)
    return X86Host(guest.apf_reason, ports.prefault, ports.kick, ports.gup_nowait), NoApfGuest()


PROTOCOLS: dict[str, Factory] = {
    "sync": _build_sync,
    "arm64-rfcv2": _build_arm64_rfcv2,
    "x86": _build_x86,
    "x86-legacy": _build_x86_legacy,
    "halt-only": _build_halt_only,
    "arm64-sdei-ppi": _build_arm64_sdei_ppi,
    "guest-initiated": _build_guest_initiated,
}


def build_protocol(
    name: str,
    n_vcpus: int,
    port: KernelPort,
    ports: HostPorts,
    opt: ProtocolOptions,
) -> Built:
    """Instantiate variant ``name`` for a VM of ``n_vcpus``."""
    try:
        factory = PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None
    return factory(n_vcpus, port, ports, opt)
