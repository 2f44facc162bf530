"""The kernel's tracepoint text: TP_printk formats and the trace-cmd line layout.

The APF events are ``include/trace/events/kvm.h`` (TRACE_SYSTEM ``kvm``, under
``CONFIG_KVM_ASYNC_PF``); ``kvm_entry``/``kvm_exit`` come from the architecture's trace
header (``arch/arm64/kvm/trace_arm.h`` or ``arch/x86/kvm/trace.h``), whose x86 layout
depends on the kernel version (:data:`KERNEL_VERSIONS`). C's ``%#llx`` prints 0 as ``0``
(no ``0x``), which :func:`c_hex` keeps. :func:`format_line` is ``trace-cmd report``'s line.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "APF_EVENTS",
    "KERNEL_DEFAULT",
    "KERNEL_VERSIONS",
    "KVM_ARM_EXIT",
    "KVM_X86_EXIT",
    "WAKE_ALL_TOKEN",
    "ExitReason",
    "c_hex",
    "format_line",
    "kvm_async_pf_completed",
    "kvm_async_pf_not_present",
    "kvm_async_pf_ready",
    "kvm_async_pf_repeated_fault",
    "kvm_entry_arm64",
    "kvm_entry_x86",
    "kvm_exit_arm64",
    "kvm_exit_x86",
    "kvm_try_async_get_page",
    "parse_kernel",
]

WAKE_ALL_TOKEN = 0xFFFF_FFFF
"""The token ``kvm_arch_async_page_present`` traces for a wake-all item (``~0`` as u32)."""

APF_EVENTS = (
    "kvm_try_async_get_page",
    "kvm_async_pf_not_present",
    "kvm_async_pf_ready",
    "kvm_async_pf_completed",
    "kvm_async_pf_repeated_fault",
)


def c_hex(value: int) -> str:
    """C's ``%#llx``: ``0x``-prefixed lowercase hex, except that 0 prints as ``0``."""
    return f"{value:#x}" if value else "0"


# -- include/trace/events/kvm.h -------------------------------------------------------------------
def kvm_try_async_get_page(gva: int, gfn: int) -> str:
    """``kvm_async_get_page_class``: ``"gva = %#llx, gfn = %#llx"``."""
    return f"gva = {c_hex(gva)}, gfn = {c_hex(gfn)}"


kvm_async_pf_repeated_fault = kvm_try_async_get_page  # same event class


def kvm_async_pf_not_present(token: int, gva: int) -> str:
    """``kvm_async_pf_nopresent_ready``: ``"token %#llx gva %#llx"``."""
    return f"token {c_hex(token)} gva {c_hex(gva)}"


kvm_async_pf_ready = kvm_async_pf_not_present  # same event class


def kvm_async_pf_completed(address: int, gva: int) -> str:
    """``"gva %#llx address %#lx"`` (the pfn field of older kernels is not printed)."""
    return f"gva {c_hex(gva)} address {c_hex(address)}"


# -- kvm_entry / kvm_exit -------------------------------------------------------------------------
class ExitReason(IntEnum):
    """Why the vCPU left the guest, as the model distinguishes it."""

    IRQ = 0  # a host interrupt: timer tick, kick, IPI (arm64 ARM_EXCEPTION_IRQ)
    DABT = 1  # stage-2 data abort / EPT violation
    WFX = 2  # WFI / HLT
    HVC = 3  # a paravirt call: HVC (SMCCC) / WRMSR or VMCALL


# (ARM_EXCEPTION_* name, ESR_ELx.EC, kvm_arm_exception_class name) per reason.
KVM_ARM_EXIT = {
    ExitReason.IRQ: ("IRQ", 0x00, "UNKNOWN"),
    ExitReason.DABT: ("TRAP", 0x24, "DABT_LOW"),
    ExitReason.WFX: ("TRAP", 0x01, "WFx"),
    ExitReason.HVC: ("TRAP", 0x16, "HVC64"),
}

# VMX basic exit reason names (kvm_print_exit_reason) per reason.
KVM_X86_EXIT = {
    ExitReason.IRQ: "EXTERNAL_INTERRUPT",
    ExitReason.DABT: "EPT_VIOLATION",
    ExitReason.WFX: "HLT",
    ExitReason.HVC: "MSR_WRITE",
}


def kvm_entry_arm64(pc: int) -> str:
    """arm64 ``kvm_entry``: ``"PC: 0x%016lx"``."""
    return f"PC: 0x{pc:016x}"


def kvm_exit_arm64(reason: ExitReason, pc: int) -> str:
    """arm64 ``kvm_exit``: ``"%s: HSR_EC: 0x%04x (%s), PC: 0x%016lx"``."""
    kind, ec, ec_name = KVM_ARM_EXIT[reason]
    return f"{kind}: HSR_EC: 0x{ec:04x} ({ec_name}), PC: 0x{pc:016x}"


# -- kernel versions --------------------------------------------------------------------------
KERNEL_OLDEST = (5, 10)
"""The oldest x86 layout offered: 5.10 gave ``kvm_exit`` its vcpu id, ``intr_info`` and
``error_code``."""
KERNEL_ENTRY_INTR = (6, 14)
"""6.14 added ``intr_info``/``error_code`` to ``kvm_entry`` and ``requests`` to ``kvm_exit``
(commits 3e633e7e7d07 and 0e77b324110c, in the KVM pull for 6.14,
<20250124163741.101568-1-pbonzini@redhat.com>)."""
KERNEL_DEFAULT = (6, 18)
"""The layout written unless another is asked for: that of the newest kernel checked
(a 6.18 host's ``events/kvm/*/format``)."""
KERNEL_VERSIONS = {
    "5.10-6.13": "kvm_entry 'vcpu %u, rip 0x%lx'; "
    "kvm_exit '... intr_info 0x%08x error_code 0x%08x'",
    "6.14+": "kvm_entry adds ' intr_info 0x%08x error_code 0x%08x'; kvm_exit adds "
    "' requests 0x%016llx'",
}


def parse_kernel(text: str) -> tuple[int, int]:
    """``"6.1"`` or ``"6.1.0-13-amd64"`` -> (6, 1); ValueError with a one-line reason."""
    parts = text.strip().split(".")
    try:
        if len(parts) < 2:
            raise ValueError
        major, minor = int(parts[0]), int(parts[1].split("-")[0])
    except ValueError:
        raise ValueError(f"expected a kernel version like 6.1 (got {text!r})") from None
    if (major, minor) < KERNEL_OLDEST:
        raise ValueError(
            f"layouts cover kernels {KERNEL_OLDEST[0]}.{KERNEL_OLDEST[1]} and later (got {text!r})"
        )
    return major, minor


def kvm_entry_x86(vcpu: int, rip: int, kernel: tuple[int, int] = KERNEL_DEFAULT) -> str:
    """x86 ``kvm_entry``: ``"vcpu %u, rip 0x%lx"`` (5.10); 6.14 adds ``" intr_info 0x%08x
    error_code 0x%08x"`` (the event injected at entry: the model does not say which, so
    0) and, in 6.18, a trailing ``%s`` for ``[immediate exit]``, which the model never asks
    for."""
    if kernel < KERNEL_ENTRY_INTR:
        return f"vcpu {vcpu}, rip 0x{rip:x}"
    return f"vcpu {vcpu}, rip 0x{rip:x} intr_info 0x{0:08x} error_code 0x{0:08x}"


def kvm_exit_x86(
    vcpu: int, reason: ExitReason, rip: int, kernel: tuple[int, int] = KERNEL_DEFAULT
) -> str:
    """x86 ``kvm_exit`` (5.10 to 6.13; 6.14 adds ``" requests 0x%016llx"``, the vCPU's
    pending ``KVM_REQ_*`` bits, 0 here). ``info1`` is the exit qualification (an EPT
    violation: a read of a non-present page, 0x181), ``info2`` the IDT-vectoring info (0:
    nothing was being delivered), ``intr_info`` the external interrupt (the local timer
    vector 0xec, valid)."""
    info1 = 0x181 if reason is ExitReason.DABT else 0
    intr_info = 0x800000EC if reason is ExitReason.IRQ else 0
    text = (
        f"vcpu {vcpu} reason {KVM_X86_EXIT[reason]} rip 0x{rip:x} info1 0x{info1:016x} "
        f"info2 0x{0:016x} intr_info 0x{intr_info:08x} error_code 0x{0:08x}"
    )
    return text if kernel < KERNEL_ENTRY_INTR else f"{text} requests 0x{0:016x}"


# -- the line ----------------------------------------------------------------------------------
def format_line(
    comm: str, pid: int, cpu: int, ts_ns: int, event: str, fields: str, ns: bool = False
) -> str:
    """One line as ``trace-cmd report`` prints it: comm right-aligned in 16, ``-pid``
    left-aligned in 5, ``[%03d]`` CPU, seconds in 5, then µs rounded to the nearest (as
    trace-cmd does; ``ns`` gives the 9 digits of ``report -t``), the event name and its
    colon left-aligned in 21, a space, the fields."""
    if ns:
        sec, frac = divmod(ts_ns, 1_000_000_000)
        stamp = f"{sec:5d}.{frac:09d}"
    else:
        sec, frac = divmod((ts_ns + 500) // 1000, 1_000_000)
        stamp = f"{sec:5d}.{frac:06d}"
    return f"{comm:>16}-{pid:<5} [{cpu:03d}] {stamp}: {event + ':':<21} {fields}\n"
