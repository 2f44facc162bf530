"""arm64 async PF ABI: the seed's RFCv2 (2020) and the SDEI/PPI v4 series (2021).

Neither series was merged; the constants follow the patches' ``kvm_para.h`` and
``Documentation/virt/kvm/arm/apf.rst`` hunks. Each shared block has ``enabled`` (the guest's
own word) and :meth:`words` (what the host writes), which the checker's I8 reads.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "APF_FUNC_SET_RANGE",
    "APF_FUNC_UPDATE_ENABLE",
    "ARM_SMCCC_KVM_FUNC_APF",
    "ARM_SMCCC_KVM_FUNC_ASYNC_PF_ENABLE",
    "ARM_SMCCC_KVM_FUNC_ASYNC_PF_IRQ_ACK",
    "ASYNC_PF_PPI",
    "DEFAULT_NO_FAULT_INST_RANGE",
    "KVM_ASYNC_PF_ENABLED",
    "KVM_ASYNC_PF_SEND_ALWAYS",
    "KVM_PV_REASON_PAGE_NOT_PRESENT",
    "KVM_PV_REASON_PAGE_READY",
    "SDEI_EVENT_ASYNC_PF",
    "SDEI_EVENT_COMPLETE",
    "SMCCC_RET_NOT_REQUIRED",
    "SMCCC_RET_NOT_SUPPORTED",
    "SMCCC_RET_SUCCESS",
    "WAKE_ALL_TOKEN",
    "ApfData",
    "SdeiApfBuffer",
]

# -- RFCv2 (Gavin Shan, 2020): both signals a data abort, announced by `reason` ------------------
KVM_PV_REASON_PAGE_NOT_PRESENT = 1
KVM_PV_REASON_PAGE_READY = 2
KVM_ASYNC_PF_ENABLED = 1 << 0
KVM_ASYNC_PF_SEND_ALWAYS = 1 << 1
WAKE_ALL_TOKEN = 0xFFFF_FFFF
ARM_SMCCC_KVM_FUNC_APF = 1  # the vendor-hyp function number the seed's SMCCC call uses
APF_FUNC_UPDATE_ENABLE = 1 << 63  # BIT(63): update the enable register
APF_FUNC_SET_RANGE = 1 << 62  # BIT(62): set the no-fault instruction range
SMCCC_RET_SUCCESS = 0
SMCCC_RET_NOT_SUPPORTED = -1
SMCCC_RET_NOT_REQUIRED = -2
SYS_RESTART = 0x0001  # reboot notifier code for a restart
DEFAULT_NO_FAULT_INST_RANGE = 0x800
"""The host's default no-inject window from VBAR_EL1 (the vector table), RFCv2 7/9."""


@dataclass
class ApfData:
    """Per-CPU ``struct kvm_vcpu_pv_apf_data``: ``reason`` is shared with the host."""

    reason: int = 0
    enabled: int = 0

    def words(self) -> tuple[int, ...]:
        return (self.reason,)


# -- SDEI/PPI v4 (Gavin Shan, 2021) ----------------------------------------------------------------
SDEI_EVENT_ASYNC_PF = 0x40400001
SDEI_EVENT_COMPLETE = 0xC4000025  # SDEI_1_0_FN_SDEI_EVENT_COMPLETE (SMC64)
ARM_SMCCC_KVM_FUNC_ASYNC_PF_ENABLE = 0x100  # model-local ids for the v4 SMCCC functions
ARM_SMCCC_KVM_FUNC_ASYNC_PF_IRQ_ACK = 0x101
ASYNC_PF_PPI = 20  # assumption: a free PPI chosen by userspace and described in DT/ACPI


@dataclass
class SdeiApfBuffer:
    """The shared buffer (reason, token) written by the host, read and cleared by the guest."""

    reason: int = 0
    token: int = 0
    enabled: int = 0

    def words(self) -> tuple[int, ...]:
        return (self.reason, self.token)
