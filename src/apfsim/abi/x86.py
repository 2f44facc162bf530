"""x86 async PF ABI (``arch/x86/include/uapi/asm/kvm_para.h``, ``msr.rst``).

The data block's first word was ``reason`` until 5.9 (both signals a #PF) and is ``flags``
since 5.10 (page-ready moved to an interrupt with the ``token`` word and an ACK MSR).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "HYPERVISOR_CALLBACK_VECTOR",
    "KVM_ASYNC_PF_DELIVERY_AS_INT",
    "KVM_ASYNC_PF_ENABLED",
    "KVM_ASYNC_PF_RESERVED",
    "KVM_ASYNC_PF_SEND_ALWAYS",
    "KVM_PV_REASON_PAGE_NOT_PRESENT",
    "KVM_PV_REASON_PAGE_READY",
    "MSR_KVM_ASYNC_PF_ACK",
    "MSR_KVM_ASYNC_PF_EN",
    "MSR_KVM_ASYNC_PF_INT",
    "WAKE_ALL_TOKEN",
    "X86ApfData",
]

MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_ASYNC_PF_INT = 0x4B564D06
MSR_KVM_ASYNC_PF_ACK = 0x4B564D07
KVM_ASYNC_PF_ENABLED = 1 << 0
KVM_ASYNC_PF_SEND_ALWAYS = 1 << 1
KVM_ASYNC_PF_DELIVERY_AS_INT = 1 << 3
KVM_ASYNC_PF_RESERVED = 0b11 << 4  # bits 5:4 of MSR_KVM_ASYNC_PF_EN
KVM_PV_REASON_PAGE_NOT_PRESENT = 1
KVM_PV_REASON_PAGE_READY = 2  # before 5.10 only: page-ready was a #PF too
HYPERVISOR_CALLBACK_VECTOR = 0xF3
WAKE_ALL_TOKEN = 0xFFFF_FFFF


@dataclass
class X86ApfData:
    """Per-CPU ``struct kvm_vcpu_pv_apf_data``: ``flags`` @0, ``token`` @4, guest ``enabled``."""

    flags: int = 0
    token: int = 0
    enabled: int = 0

    def words(self) -> tuple[int, ...]:
        return (self.flags, self.token)
