"""Guest execution contexts: what the host sees at an exit and what the APF handler sees.

A context carries the facts the seed's code and the host's checks read: exception level
(``vcpu_mode_priv``), ``preempt_count()``, RCU read-side depth, masked interrupts, the PC
relative to VBAR_EL1 while in vector/entry code, whether ``kernel_entry`` has saved
ELR_EL1/SPSR_EL1 yet, and whether this CPU holds its runqueue lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from apfsim.ports import GuestRegs, GuestView
from apfsim.workloads.base import AccessMode

__all__ = ["CONTEXT_OF_MODE", "Contexts", "GuestContext"]

HARDIRQ_OFFSET = 1 << 16


@dataclass(frozen=True, slots=True)
class GuestContext:
    name: str
    privileged: bool
    preempt_count: int = 0
    rcu_depth: int = 0
    irqs_off: bool = False
    pc_offset: int | None = None
    elr_saved: bool = True
    rq_locked: bool = False
    idle: bool = False
    syndrome_unread: bool = False  # ESR_EL1/FAR_EL1 (x86: CR2) of this exception not yet read
    # NOTE: made once per context (there are a few), not at every exit, for performance.
    _view: GuestView = field(init=False, repr=False, compare=False, hash=False)
    _regs: GuestRegs = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        view = GuestView(self.privileged, self.pc_offset, self.elr_saved, self.irqs_off)
        regs = GuestRegs(
            not self.privileged, self.preempt_count, self.rcu_depth, self.idle, self.irqs_off
        )
        object.__setattr__(self, "_view", view)
        object.__setattr__(self, "_regs", regs)

    @property
    def preemptible(self) -> bool:
        """Whether a pending reschedule may be taken on return to this context."""
        return not self.privileged or (
            self.preempt_count == 0 and self.rcu_depth == 0 and not self.irqs_off
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Contexts are a small fixed set: a copy (the model checker's state snapshots)
        comes back as the same object, so ``ctx is Contexts.USER`` still holds."""
        # NOTE: an interned context pickles as its position in this process's registry
        # (the checker's snapshots never leave the process), for performance.
        position = _POSITION.get(id(self))
        if position is not None:
            return _context_at, (position,)
        return _intern, (self.key(),)

    def key(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.privileged,
            self.preempt_count,
            self.rcu_depth,
            self.irqs_off,
            self.pc_offset,
            self.elr_saved,
            self.rq_locked,
            self.idle,
            self.syndrome_unread,
        )

    def view(self) -> GuestView:
        """What the host reads of the registers at an exit in this context."""
        return self._view

    def regs(self) -> GuestRegs:
        """What a handler sees of this context as the one it interrupted."""
        return self._regs


_INTERNED: dict[tuple[Any, ...], GuestContext] = {}
_BY_POSITION: list[GuestContext] = []
_POSITION: dict[int, int] = {}  # id(ctx) -> its index in _BY_POSITION


def _register(ctx: GuestContext) -> GuestContext:
    ctx = _INTERNED.setdefault(ctx.key(), ctx)
    if id(ctx) not in _POSITION:
        _POSITION[id(ctx)] = len(_BY_POSITION)
        _BY_POSITION.append(ctx)
    return ctx


def _intern(values: tuple[Any, ...]) -> GuestContext:
    ctx = _INTERNED.get(values)
    if ctx is None:
        ctx = _register(GuestContext(*values))
    return ctx


def _context_at(position: int) -> GuestContext:
    return _BY_POSITION[position]


class Contexts:
    """The fixed contexts of the model; vector/entry PCs depend on the guest's layout."""

    USER: ClassVar[GuestContext] = GuestContext("user", privileged=False)
    KERNEL: ClassVar[GuestContext] = GuestContext("kernel", privileged=True)
    KERNEL_ATOMIC: ClassVar[GuestContext] = GuestContext(
        "kernel_atomic", privileged=True, preempt_count=2
    )
    KERNEL_RCU: ClassVar[GuestContext] = GuestContext("kernel_rcu", privileged=True, rcu_depth=1)
    KERNEL_IRQS_OFF: ClassVar[GuestContext] = GuestContext(
        "kernel_irqs_off", privileged=True, irqs_off=True
    )
    IDLE: ClassVar[GuestContext] = GuestContext("idle", privileged=True, idle=True)
    # do_mem_abort / do_async_pf after kernel_entry: registers saved, IRQs masked.
    HANDLER: ClassVar[GuestContext] = GuestContext("abort_handler", privileged=True, irqs_off=True)
    # el0_sync / el1_sync in entry-common.c before read_sysreg(esr_el1 / far_el1): outside the
    # vector table and entry.S, so outside RFCv2's no-inject window, and not re-entrant.
    ENTRY_COMMON: ClassVar[GuestContext] = GuestContext(
        "entry_common", privileged=True, irqs_off=True, syndrome_unread=True
    )
    # A system call's handler (the guest's own synchronous exception, with IRQs unmasked).
    SYSCALL: ClassVar[GuestContext] = GuestContext("syscall", privileged=True)
    IRQ: ClassVar[GuestContext] = GuestContext(
        "irq", privileged=True, preempt_count=HARDIRQ_OFFSET, irqs_off=True
    )
    # __schedule: preemption disabled and rq->lock held with IRQs off.
    RQ_LOCKED: ClassVar[GuestContext] = GuestContext(
        "rq_locked", privileged=True, preempt_count=2, irqs_off=True, rq_locked=True
    )

    def __init__(self, vector_pc_offset: int, entry_pc_offset: int) -> None:
        # The vector stub (inside the architectural 0x800 table) and el1_sync/el0_sync's
        # kernel_entry (after the table): ELR_EL1 is not yet saved in either.
        self.vector = GuestContext(
            "vector", privileged=True, irqs_off=True, pc_offset=vector_pc_offset, elr_saved=False
        )
        self.entry = GuestContext(
            "kernel_entry",
            privileged=True,
            irqs_off=True,
            pc_offset=entry_pc_offset,
            elr_saved=False,
        )
        self.vector = _intern(self.vector.key())
        self.entry = _intern(self.entry.key())


for _ctx in vars(Contexts).values():
    if isinstance(_ctx, GuestContext):
        _register(_ctx)

CONTEXT_OF_MODE: dict[AccessMode, GuestContext] = {
    AccessMode.USER: Contexts.USER,
    AccessMode.KERNEL: Contexts.KERNEL,
    AccessMode.KERNEL_ATOMIC: Contexts.KERNEL_ATOMIC,
    AccessMode.KERNEL_RCU: Contexts.KERNEL_RCU,
    AccessMode.KERNEL_IRQS_OFF: Contexts.KERNEL_IRQS_OFF,
}
