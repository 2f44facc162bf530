"""s390 "pfault" ABI: DIAGNOSE 0x258 and the lowcore words both halves use.

The guest asks for pseudo page faults with DIAG 0x258 (``struct pfault_refbk`` in
``arch/s390/mm/pfault.c``, ``struct prs_parm`` in ``arch/s390/kvm/diag.c``). The token the host
reads at each fault is the 8 bytes at ``__LC_LPP`` in that CPU's lowcore: ``lpp`` (with
``LPP_MAGIC``) then ``current_pid``, which ``__switch_to`` stores. Both signals are external
interrupts ``EXT_IRQ_CP_SERVICE`` whose subcode (stored in the "CPU address" field) says
PFAULT_INIT or PFAULT_DONE, with the token in the 64-bit parameter (``ext_params2``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CR0_SERVICE_SIGNAL_SUBMASK",
    "DIAG258_CANCEL_NOT_ESTABLISHED",
    "DIAG258_INIT_ALREADY_ESTABLISHED",
    "DIAG258_OK",
    "DIAG_PFAULT",
    "EXT_IRQ_CP_SERVICE",
    "KVM_S390_PFAULT_TOKEN_INVALID",
    "LC_LPP",
    "LPP_MAGIC",
    "LPP_PID_MASK",
    "PFAULT_DONE",
    "PFAULT_FCODE_CANCEL",
    "PFAULT_FCODE_INIT",
    "PFAULT_INIT",
    "PFAULT_REFDWLEN",
    "PFAULT_REFVERSN",
    "PFAULT_RES_FIELD",
    "PFAULT_SELECT_COMPARE",
    "PFAULT_SUBCODE",
    "PFAULT_SUBCODE_MASK",
    "PF_COMPLETE",
    "PSW_MASK_EXT",
    "PSW_MASK_PSTATE",
    "SIGP",
    "SIGP_CC_ORDER_CODE_ACCEPTED",
    "SIGP_INITIAL_CPU_RESET",
    "S390Lowcore",
    "sigp_parameter",
]

# -- DIAGNOSE 0x258 "page-reference services" -----------------------------------------------
DIAG_PFAULT = 0x258  # refdiagc; also the guest-call number the model's hypercall uses
PFAULT_FCODE_INIT = 0  # reffcode: establish the token (pfault_init)
PFAULT_FCODE_CANCEL = 1  # reffcode: cancel it (pfault_fini)
PFAULT_REFDWLEN = 5  # refdwlen, in doublewords
PFAULT_REFVERSN = 2  # refversn
PFAULT_RES_FIELD = 1 << 63  # __PF_RES_FIELD: the init block's `reserved` (the host's `zarch`)
DIAG258_OK = 0
DIAG258_INIT_ALREADY_ESTABLISHED = 8  # init while the token is valid: nothing changes
DIAG258_CANCEL_NOT_ESTABLISHED = 4  # cancel while the token is invalid

# -- PSW and control-register bits the host checks ------------------------------------------
PSW_MASK_EXT = 1 << 56  # 0x0100000000000000: external interrupts enabled
PSW_MASK_PSTATE = 1 << 48  # 0x0001000000000000: problem (user) state
PFAULT_SELECT_COMPARE = PSW_MASK_PSTATE  # refselmk == refcmpmk == 1 << 48: user mode only
CR0_SERVICE_SIGNAL_SUBMASK = 0x200  # irq_subclass_register(IRQ_SUBCLASS_SERVICE_SIGNAL)

# -- the two external interrupts ------------------------------------------------------------
EXT_IRQ_CP_SERVICE = 0x2603  # the external interruption code of both
PFAULT_INIT = 0x0600  # subcode: a page is missing (host KVM_S390_INT_PFAULT_INIT)
PFAULT_DONE = 0x0680  # subcode: it arrived (host KVM_S390_INT_PFAULT_DONE)
PF_COMPLETE = 0x0080  # the completion bit of the subcode
PFAULT_SUBCODE = 0x0600  # the guest's __SUBCODE_MASK: `(subcode & 0xff00) == 0x0600`
PFAULT_SUBCODE_MASK = 0xFF00  # (the same int code carries virtio's 0x0d00)

# -- the token ------------------------------------------------------------------------------
KVM_S390_PFAULT_TOKEN_INVALID = 0xFFFF_FFFF_FFFF_FFFF  # ~0ULL: no token established
LC_LPP = 0x398  # __LC_LPP: the token address the guest registers (u32 lpp, u32 current_pid)
LPP_MAGIC = 1 << 31  # the lpp word's upper half
LPP_PID_MASK = 0xFFFF_FFFF  # the guest's `pid = param64 & LPP_PID_MASK`

# -- SIGP (the reset a CPU bring-up sends) --------------------------------------------------
SIGP = 0xAE  # the SIGP opcode: the guest-call number of the model's signal-processor exits
SIGP_INITIAL_CPU_RESET = 11  # order code 0x0b (``__cpu_up`` sends it to the new CPU)
SIGP_CC_ORDER_CODE_ACCEPTED = 0


def sigp_parameter(order: int, cpu_addr: int) -> int:
    """The model's encoding of one SIGP exit: order code and target CPU address."""
    return (order << 16) | (cpu_addr & 0xFFFF)


@dataclass
class S390Lowcore:
    """The pfault words of one CPU's lowcore (its prefix page).

    The guest writes ``lpp`` and ``current_pid`` (``__switch_to``); the host reads the 8
    bytes at ``__LC_LPP`` as the token at each fault and, at each external-interrupt
    delivery, stores ``ext_int_code``, the subcode in ``ext_cpu_addr`` and the token in
    ``ext_params2`` (what :meth:`words` returns). ``enabled``: the guest's own view that
    DIAG 0x258 init succeeded on this CPU.
    """

    lpp: int = LPP_MAGIC
    current_pid: int = LPP_PID_MASK  # the idle task (-1) until the first switch
    ext_int_code: int = 0
    ext_cpu_addr: int = 0
    ext_params2: int = 0
    enabled: int = 0

    def lpp_doubleword(self) -> int:
        """The 8 bytes at ``__LC_LPP`` as the host's ``read_guest_real`` sees them."""
        return ((self.lpp & 0xFFFF_FFFF) << 32) | (self.current_pid & LPP_PID_MASK)

    def words(self) -> tuple[int, ...]:
        return (self.ext_int_code, self.ext_cpu_addr, self.ext_params2)
