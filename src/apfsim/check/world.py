"""The model checker's small world: the simulator's protocol code, driven by choices, not time.

A :class:`World` holds a VM of a few vCPUs, guest tasks and guest pages. Its host and guest
halves are built by :func:`apfsim.protocols.build_protocol`, exactly as the simulator builds
them; the world implements the same ports (``KernelPort`` for the guest driver,
``HostPorts`` for the arch hooks). Where the simulator lets time decide what happens next,
the world offers every enabled step (:meth:`World.actions`) and the search tries each:

* a task's next access (in user or kernel mode, or on top of a pending event), which may
  take a stage-2 fault into ``try_async_pf``;
* a vCPU entry (``vcpu_enter_guest``: one run-loop iteration, then injection);
* the end of the top guest frame (vector stub, ``kernel_entry``, entry-common, the abort
  or APF handler, an IRQ handler, the tail of the APF wait before ``schedule()``);
* a worker's completion (``async_pf_execute``), a synchronous fault-in's end;
* a timer tick (an exit, and an interrupt the guest takes when it unmasks);
* the task's own system call (an exception with its own syndrome to read);
* CPU offline and online, reboot or kexec, and the x86 LAPIC software-enable.

Each step also checks what can only be seen as it happens (an abort landing where the
guest cannot take it, a not-present in kernel mode, a host write into memory whose kernel
never enabled async PF); :mod:`apfsim.check.invariants` checks the states.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from apfsim.guest.context import Contexts, GuestContext
from apfsim.guest.kernel import GuestCalls
from apfsim.host.async_pf import AsyncPf
from apfsim.invariants import check_guest, check_vcpu
from apfsim.ports import (
    AbortOutcome,
    Broken,
    FaultDecision,
    GuestView,
    HostPorts,
    Injection,
    InjectionKind,
)
from apfsim.registry import PROTOCOLS, ProtocolOptions, build_protocol, variant

__all__ = ["MODES", "Action", "Mode", "TaskState", "World", "WorldConfig", "has_lifecycle"]


class Mode:
    """Where a vCPU thread is (plain ints: a state snapshot stays small and fast)."""

    GUEST = 0  # in the guest: a task, or kernel frames
    ENTRY = 1  # in the host, about to run a run-loop iteration and enter
    HALTED = 2  # kvm_vcpu_block with the guest tick armed (artificial halt, halted wait)
    IDLE = 3  # kvm_vcpu_block after the idle task's WFI (NO_HZ idle: no tick)
    SYNC = 4  # blocked in a synchronous fault-in
    OFFLINE = 5  # the guest CPU is offline


class TaskState:
    RUNNABLE = 0
    SLEEPING = 1  # waiting in schedule() for its APF token
    HALTED = 2  # the seed's halted wait (dsb; wfi until unhashed)
    DONE = 3


class Step(IntEnum):
    ACCESS = 0
    ENTER = 1
    HANDLE = 2
    WORKER = 3
    SYNC_DONE = 4
    TICK = 5
    SYSCALL = 6
    OFFLINE = 7
    ONLINE = 8
    REBOOT = 9
    LAPIC = 10


Action = tuple[int, int, int]  # (Step, index, argument)

MODES: dict[str, GuestContext] = {
    "user": Contexts.USER,
    "kernel": Contexts.KERNEL,
    "kernel_atomic": Contexts.KERNEL_ATOMIC,
    "kernel_rcu": Contexts.KERNEL_RCU,
    "kernel_irqs_off": Contexts.KERNEL_IRQS_OFF,
}
_EVENT = "event_pending"  # a user access whose exit has an event awaiting reinjection (x86)

# Frame kinds: what runs when the frame ends.
F_NOP, F_ABORT, F_TAIL, F_TICK, F_IPI, F_SYSCALL_READ = range(6)


@dataclass(frozen=True)
class WorldConfig:
    """The world's size and what it may do; the defaults are the acceptance world."""

    protocol: str
    vcpus: int = 2
    tasks: int = 2
    pages: int = 2
    modes: tuple[str, ...] = ("user", "kernel")
    placement: str = "spread"  # "spread": task t on vCPU t % vcpus; "one": all on vCPU 0
    syscalls: bool | None = None  # a task's own system call; None: arm64 with a shared CPU
    hotplug: int = 0  # CPU offline/online cycles allowed (each vCPU)
    stay_offline: bool = False  # an offlined CPU never comes back (no online step)
    reboot: bool = False  # a reboot/kexec may happen once
    lapic: bool = False  # the x86 guest may software-disable its LAPIC once
    event_pending: bool = False  # x86: a fault may come with an event awaiting reinjection
    send_always: bool = False  # the seed's FIXME, for its halted wait
    token_id_bits: int | None = None  # x86 apf.id width; None: too wide to wrap in this world
    mutant: str | None = None


@dataclass
class Frame:
    ctx: GuestContext
    kind: int
    injection: Injection | None = None
    regs: Any = None  # GuestRegs of the interrupted context
    task: int = -1


@dataclass
class Vcpu:
    mode: int = Mode.GUEST
    frames: list[Frame] = field(default_factory=list)
    current: int = -1
    sync_gfn: int = -1
    timer: bool = False  # a tick is pending in the (virtual) timer
    ipi: bool = False  # a reschedule IPI is pending
    irqs: list[Injection] = field(default_factory=list)  # injected interrupts not yet taken
    need_resched: bool = False
    event_pending: bool = False  # x86: an event awaits reinjection at this exit
    exits: int = 0  # traps requested by the frame now ending (calls, IPI writes)
    hotplug_left: int = 0
    lapic_left: int = 0


@dataclass
class Task:
    cpu: int
    pages: tuple[int, ...]
    state: int = TaskState.RUNNABLE
    pc: int = 0
    ctx: GuestContext = Contexts.USER
    syscall_done: bool = False
    wait_cpu: int = -1  # the CPU whose list holds its node while it waits


class Violation(Exception):
    """A property broken by a step, in kernel terms."""

    def __init__(self, prop: str, detail: str) -> None:
        super().__init__(f"{prop}: {detail}")
        self.prop = prop
        self.detail = detail


class World(GuestCalls):
    """One state of the small world; :meth:`step` mutates it, :meth:`key` identifies it."""

    def __init__(self, config: WorldConfig) -> None:
        if config.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {config.protocol!r}")
        self.config = config
        self.variant = variant(config.protocol)
        self.pages = [False] * config.pages  # True: present in the host (stage 2 mapped)
        self.io: list[AsyncPf] = []  # workers in flight
        self.vcpus = [
            Vcpu(hotplug_left=config.hotplug, lapic_left=int(config.lapic))
            for _ in range(config.vcpus)
        ]
        self.tasks = [
            Task(
                cpu=t % config.vcpus if config.placement == "spread" else 0,
                pages=tuple((t + i) % config.pages for i in range(config.pages)),
            )
            for t in range(config.tasks)
        ]
        self.reboot_left = int(config.reboot)
        self.rebooted = False
        self.running_cpu = -1
        self.log: list[str] | None = None  # set to a list to record what each step did
        ctxs = Contexts(vector_pc_offset=0x200, entry_pc_offset=0xC00)
        self.vector_ctx = ctxs.vector
        self.entry_ctx = ctxs.entry
        opts = ProtocolOptions(send_always=config.send_always)
        ports = HostPorts(self._prefault, self._kick, self._gup_nowait, self._start_worker, _zero)
        self.host, self.guest = build_protocol(config.protocol, config.vcpus, self, ports, opts)
        # A narrow token id keeps the state space small; only B9's world lets it wrap.
        bits = config.token_id_bits
        if bits is None:
            bits = (config.tasks * config.pages * (1 + config.hotplug) + 4).bit_length()
        self.host.narrow_token_ids(bits)
        self.host.mutant = self.guest.mutant = config.mutant
        if (config.hotplug or config.reboot) and not self.variant.lifecycle:
            raise ValueError(f"{config.protocol}'s guest models no CPU hotplug or reboot callbacks")
        self.guest.boot()
        for cpu in range(config.vcpus):
            self.vcpus[cpu].mode = Mode.ENTRY
            self._pick(cpu)

    # -- identity ------------------------------------------------------------------------------
    def key(self) -> bytes:
        """The state's bytes, without counters and logs (two states are equal iff equal)."""
        saved = self._strip()
        try:
            return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            self._restore(saved)

    def copy(self) -> World:
        saved = self._strip()
        try:
            data = pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            self._restore(saved)
        clone: World = pickle.loads(data)
        # The config and the counters (shared: the search never reads them); the host fields
        # normalised by _strip stay blank in the clone.
        clone._restore([entry for entry in saved if entry[0] in ("", "host", "guest")])
        return clone

    def broken(self) -> Broken:
        """The first invariant this state breaks (apfsim.invariants), or None."""
        host = self.host
        for v, vc in enumerate(self.vcpus):
            broken = check_vcpu(host, v, vc.mode == Mode.GUEST)
            if broken is not None:
                return broken
        waiting = [
            (t, task.wait_cpu)
            for t, task in enumerate(self.tasks)
            if task.state in (TaskState.SLEEPING, TaskState.HALTED)
        ]
        all_done = all(task.state == TaskState.DONE for task in self.tasks)
        return check_guest(self.guest, waiting, all_done)

    _COUNTERS = ("stats", "declined", "populates")

    def _strip(self) -> list[tuple[str, str, object]]:
        """Detach what is not state (log, config, counters); returns it for _restore."""
        saved: list[tuple[str, str, object]] = [("", "log", self.log), ("", "config", self.config)]
        keep_ack_window = self.config.mutant == "B12"
        self.log = None
        self.config = None  # type: ignore[assignment]  # the same for every state
        for owner in ("host", "guest"):
            half = getattr(self, owner)
            for attr in self._COUNTERS:
                if hasattr(half, attr):
                    saved.append((owner, attr, getattr(half, attr)))
                    setattr(half, attr, None)
        # Host fields written before they are read (the registers at the last exit, what
        # the last ACK delivered, the halt flag that only feeds a counter): history, not state.
        for v, arch in enumerate(getattr(self.host, "arch", ())):
            for attr, blank in (
                ("view", _BLANK_VIEW),
                ("acked", []),
                ("halted", False),
                ("ack_window", False),
            ):
                if attr == "ack_window" and keep_ack_window:
                    continue
                if hasattr(arch, attr):
                    saved.append((f"host.arch.{v}", attr, getattr(arch, attr)))
                    setattr(arch, attr, blank)
        return saved

    def _restore(self, saved: list[tuple[str, str, object]]) -> None:
        for owner, attr, value in saved:
            if owner.startswith("host.arch."):
                target: object = self.host.arch[int(owner.rsplit(".", 1)[1])]  # type: ignore[attr-defined]
            else:
                target = getattr(self, owner) if owner else self
            setattr(target, attr, value)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- ports: the host services --------------------------------------------------------------
    def _prefault(self, gfn: int) -> bool:
        return self.pages[gfn]

    def _gup_nowait(self, gfn: int) -> None:
        pass  # the read is the worker's step

    def _start_worker(self, work: AsyncPf) -> None:
        self.io.append(work)

    def _kick(self, vcpu: int) -> None:
        """``kvm_vcpu_kick``: a vCPU in the guest exits."""
        if self.vcpus[vcpu].mode == Mode.GUEST:
            self._note(f"kick vCPU{vcpu}: it exits")
            self.vcpus[vcpu].mode = Mode.ENTRY

    # -- ports: the guest kernel services ------------------------------------------------------
    def current_task(self, cpu: int) -> int:
        return self.vcpus[cpu].current

    def rq_is_locked(self, cpu: int) -> bool:
        return False  # schedule() is one atomic step here

    def swake_up_one(self, task: int) -> None:
        t = self.tasks[task]
        if t.state != TaskState.SLEEPING:
            return
        t.state = TaskState.RUNNABLE
        t.wait_cpu = -1
        self._note(f"task{task} woken")
        self._migrate_if_offline(t)
        vc = self.vcpus[t.cpu]
        if vc.current < 0 or vc.current == task:
            vc.need_resched = True
            if t.cpu != self.running_cpu:
                self._send_ipi(t.cpu)

    def smp_send_reschedule(self, cpu: int) -> None:
        self.vcpus[cpu].need_resched = True
        self._send_ipi(cpu)

    def kzalloc_atomic(self, cpu: int) -> bool:
        return True

    def _guest_call(self, cpu: int, call: int, val: int) -> int:
        if self.running_cpu >= 0:
            self.vcpus[cpu].exits += 1
        return self.host.guest_call(cpu, call, val)

    def _send_ipi(self, cpu: int) -> None:
        vc = self.vcpus[cpu]
        if vc.mode == Mode.OFFLINE:
            return
        vc.ipi = True
        if cpu == self.running_cpu:
            vc.exits += 1  # a self-IPI: the write traps, the IPI waits for the unmask
            return
        if vc.mode in (Mode.GUEST, Mode.HALTED, Mode.IDLE):
            vc.mode = Mode.ENTRY

    # -- enabled steps -------------------------------------------------------------------------
    def actions(self) -> list[Action]:
        out: list[Action] = []
        for v, vc in enumerate(self.vcpus):
            mode = vc.mode
            if mode == Mode.GUEST:
                if vc.frames:
                    out.append((Step.HANDLE, v, 0))
                else:
                    t = vc.current
                    if t >= 0 and self.tasks[t].state == TaskState.RUNNABLE:
                        for m in range(len(self._modes)):
                            out.append((Step.ACCESS, v, m))
                        task = self.tasks[t]
                        if self._syscalls and not task.syscall_done and task.ctx is Contexts.USER:
                            out.append((Step.SYSCALL, v, 0))
                if not vc.timer and self._tick_matters(v):
                    out.append((Step.TICK, v, 0))
            elif mode == Mode.ENTRY:
                out.append((Step.ENTER, v, 0))
            elif mode == Mode.HALTED:
                if not vc.timer:
                    out.append((Step.TICK, v, 0))
            elif mode == Mode.SYNC:
                out.append((Step.SYNC_DONE, v, 0))
            if mode == Mode.OFFLINE:
                if not self.config.stay_offline:
                    out.append((Step.ONLINE, v, 0))
            elif vc.hotplug_left and v > 0 and not vc.frames and mode in (Mode.GUEST, Mode.IDLE):
                # cpu_down from another CPU; the teardown callbacks run on this one (an idle
                # CPU is woken for them). The boot CPU stays.
                out.append((Step.OFFLINE, v, 0))
            if self._lapic_disabled(v) and mode in (Mode.GUEST, Mode.ENTRY, Mode.IDLE):
                out.append((Step.LAPIC, v, 1))  # the guest's own code re-enables it
            elif vc.lapic_left and mode == Mode.GUEST and not vc.frames:
                out.append((Step.LAPIC, v, 0))
        for i in range(len(self.io)):
            out.append((Step.WORKER, i, 0))
        if self.reboot_left and not self.rebooted and self._quiet_for_kexec():
            out.append((Step.REBOOT, 0, 0))
        return out

    def _quiet_for_kexec(self) -> bool:
        """The old kernel runs its reboot path: no vCPU is between an exit and the entry
        that delivers its pending injection, and none is inside a handler."""
        return all(vc.mode != Mode.ENTRY and not vc.frames for vc in self.vcpus)

    @property
    def _arm64(self) -> bool:
        return self.variant.arch == "arm64"

    @property
    def _syscalls(self) -> bool:
        """A task's own exception matters where a page-ready for another task of the same
        CPU can land in it: arm64 (the no-inject window), with two tasks sharing a CPU."""
        if self.config.syscalls is not None:
            return self.config.syscalls
        cpus = [task.cpu for task in self.tasks]
        return self._arm64 and len(set(cpus)) < len(cpus)

    def _tick_matters(self, v: int) -> bool:
        """A tick on a running vCPU is an exit plus an interrupt. It is offered where it can
        change something: inside kernel frames (an exit can land there), with another task
        to switch to, or with completions the next run-loop iteration could deliver. Other
        ticks only cycle back to the same state."""
        vc = self.vcpus[v]
        if vc.frames or vc.irqs or self._other_runnable(v):
            return True
        apf = getattr(self.host, "apf", None)
        return bool(apf is not None and apf[v].done)

    @property
    def _modes(self) -> list[str]:
        modes = list(self.config.modes)
        if self.config.event_pending:
            modes.append(_EVENT)
        return modes

    def step(self, action: Action) -> None:
        """Apply one step; raises :class:`Violation` if the step itself breaks a property."""
        kind, index, arg = action
        blocks = self._blocks()
        _STEP_CODE[kind](self, index, arg)
        self._check_host_writes(blocks, kind == Step.HANDLE)

    def describe(self, action: Action) -> str:
        """The step in kernel terms, for a trace (call before :meth:`step`)."""
        kind, index, arg = action
        if kind == Step.ACCESS:
            vc = self.vcpus[index]
            task = self.tasks[vc.current]
            gfn = task.pages[task.pc]
            return f"vCPU{index}: task{vc.current} touches gfn{gfn} in {self._modes[arg]} mode"
        if kind == Step.WORKER:
            work = self.io[index]
            return f"worker: async_pf_execute for gfn{work.gfn} (vCPU{work.vcpu_id})"
        if kind == Step.REBOOT:
            return "guest reboots into a new kernel (kexec)"
        if kind == Step.HANDLE:
            what = f"{_frame_name(self.vcpus[index].frames[-1])} runs to its end"
        elif kind == Step.LAPIC:
            what = f"guest {'re-enables' if arg else 'software-disables'} its LAPIC"
        else:
            what = _STEP_NAMES[Step(kind)]
        return f"vCPU{index}: {what}"

    def _note(self, text: str) -> None:
        if self.log is not None:
            self.log.append(text)

    # -- the steps -----------------------------------------------------------------------------
    def _view(self, v: int) -> GuestView:
        vc = self.vcpus[v]
        if vc.frames:
            ctx = vc.frames[-1].ctx
        elif vc.current >= 0:
            ctx = self.tasks[vc.current].ctx
        else:
            ctx = Contexts.IDLE
        view = ctx.view()
        if vc.event_pending:
            view = GuestView(view.privileged, view.pc_offset, view.elr_saved, view.irqs_off, True)
        return view

    def _regs_ctx(self, v: int) -> GuestContext:
        vc = self.vcpus[v]
        if vc.frames:
            return vc.frames[-1].ctx
        if vc.current >= 0:
            return self.tasks[vc.current].ctx
        return Contexts.IDLE

    def _access(self, v: int, mode: str) -> None:
        vc = self.vcpus[v]
        t = vc.current
        task = self.tasks[t]
        gfn = task.pages[task.pc]
        task.ctx = MODES["user"] if mode == _EVENT else MODES[mode]
        if self.pages[gfn]:
            task.pc += 1
            task.ctx = Contexts.USER
            self._note(f"task{t} wrote gfn{gfn}")
            if task.pc == len(task.pages):
                task.state = TaskState.DONE
                self._note(f"task{t} done")
                self._schedule(v)
                self._settle(v)
            return
        vc.event_pending = mode == _EVENT
        result = self.host.try_async_pf(v, gfn, self._view(v), 0)
        self._note(f"stage-2 fault on gfn{gfn}: try_async_pf says {result.decision.value}")
        if result.work is not None:
            self.io.append(result.work)
        decision = result.decision
        if decision is FaultDecision.SYNC:
            vc.mode = Mode.SYNC
            vc.sync_gfn = gfn
            vc.event_pending = False
        elif decision is FaultDecision.HALT:
            vc.mode = Mode.HALTED
        else:
            vc.mode = Mode.ENTRY

    def _enter(self, v: int) -> None:
        vc = self.vcpus[v]
        vc.mode = Mode.GUEST
        delivered = self.host.run_loop_iteration(v, self._view(v))
        if delivered:
            self._note(f"{len(delivered)} completion(s) delivered")
        regs_ctx = self._regs_ctx(v)
        exceptions: list[Injection] = []
        while (injection := self.host.take_injection(v)) is not None:
            if injection.kind is InjectionKind.INTERRUPT:
                if self._lapic_disabled(v):
                    self._note("page-ready interrupt into a disabled LAPIC: lost")
                    continue
                vc.irqs.append(injection)
            else:
                exceptions.append(injection)
        if exceptions:
            if vc.event_pending:
                raise Violation(
                    "I4 not-present injected with an event pending (B1)",
                    f"vCPU{v}: an async #PF on top of an event awaiting reinjection: #DF",
                )
            if not regs_ctx.elr_saved or regs_ctx.syndrome_unread:
                what = "ELR_EL1/SPSR_EL1" if not regs_ctx.elr_saved else "ESR_EL1/FAR_EL1"
                raise Violation(
                    "abort injected where the guest cannot take it",
                    f"vCPU{v}: {exceptions[0].kind.value} injected in {regs_ctx.name}, "
                    f"whose {what} are not yet saved: the nested exception overwrites them",
                )
        vc.event_pending = False
        regs = regs_ctx.regs()
        for injection in exceptions:
            self._note(f"inject {injection.kind.value} (payload {injection.payload:#x})")
            self._push_exception(v, Frame(Contexts.HANDLER, F_ABORT, injection, regs))
        self._settle(v)

    def _push_exception(self, v: int, handler: Frame) -> None:
        """arm64: the vector stub and kernel_entry run first, with ELR_EL1 not yet saved, and
        an exit can land in them. x86 delivers through the IDT with the state saved by the
        CPU and IF cleared, so nothing can be injected before the handler runs."""
        frames = self.vcpus[v].frames
        frames.append(handler)
        if self._arm64:
            frames.append(Frame(self.entry_ctx, F_NOP))
            frames.append(Frame(self.vector_ctx, F_NOP))

    def _take_interrupts(self, v: int) -> bool:
        """Interrupts wait for the guest to unmask (the top context's IRQ mask)."""
        vc = self.vcpus[v]
        if not (vc.irqs or vc.timer or vc.ipi):
            return False
        if self._regs_ctx(v).irqs_off and (vc.frames or vc.current >= 0):
            return False
        regs = self._regs_ctx(v).regs()
        if vc.ipi:
            vc.ipi = False
            vc.frames.append(Frame(Contexts.IRQ, F_IPI))
        if vc.timer:
            vc.timer = False
            vc.frames.append(Frame(Contexts.IRQ, F_TICK))
        for injection in vc.irqs:
            self._note(f"guest takes interrupt {injection.payload:#x}")
            vc.frames.append(Frame(Contexts.IRQ, F_ABORT, injection, regs))
        vc.irqs.clear()
        return True

    def _handle(self, v: int) -> None:
        vc = self.vcpus[v]
        frame = vc.frames.pop()
        self.running_cpu = v
        try:
            self._frame_end(v, frame)
        finally:
            self.running_cpu = -1
        if vc.exits and vc.mode == Mode.GUEST:
            vc.exits = 0
            vc.mode = Mode.ENTRY  # the handler's MSR write / SMCCC / IPI write traps
            return
        vc.exits = 0
        if not vc.frames and vc.current >= 0 and self.tasks[vc.current].ctx is Contexts.USER:
            self.guest.on_ret_to_user(v)
        self._settle(v)

    def _frame_end(self, v: int, frame: Frame) -> None:
        vc = self.vcpus[v]
        if frame.kind == F_ABORT:
            assert frame.injection is not None
            injection = frame.injection
            outcome = self.guest.on_injection(v, injection, frame.regs)
            self._note(f"guest handler: {outcome.value}")
            bogus = outcome in (AbortOutcome.NOT_APF, AbortOutcome.ILLEGAL_REASON)
            if bogus and injection.kind is not InjectionKind.INTERRUPT:
                mode = "user" if frame.regs.user_mode else "kernel"
                irqs = ", IRQs off" if frame.regs.irqs_off else ""
                raise Violation(
                    "I4 guest cannot take an injected async PF",
                    f"vCPU{v}: {injection.kind.value} with token {injection.payload:#x} "
                    f"taken in {mode} mode{irqs} was refused ({outcome.value}): on real "
                    "hardware a guest panic or a bogus fault",
                )
            if outcome is AbortOutcome.WAIT_SCHEDULE:
                self.tasks[vc.current].wait_cpu = v
                vc.frames.append(Frame(Contexts.KERNEL, F_TAIL, task=vc.current))
            elif outcome is AbortOutcome.WAIT_HALT:
                self.tasks[vc.current].wait_cpu = v
                self.tasks[vc.current].state = TaskState.HALTED
        elif frame.kind == F_TAIL:
            if self.guest.waiter_woken(v, frame.task):
                self.tasks[frame.task].wait_cpu = -1  # woken before it slept
            else:
                self.tasks[frame.task].state = TaskState.SLEEPING
                self._note(f"task{frame.task} sleeps on its token")
                self._schedule(v)
        elif frame.kind == F_TICK:
            if self._other_runnable(v):
                vc.need_resched = True
        elif frame.kind == F_SYSCALL_READ:
            pass

    def _settle(self, v: int) -> None:
        """Nothing left to run in kernel frames: take interrupts, reschedule, wait or idle."""
        vc = self.vcpus[v]
        if vc.mode != Mode.GUEST:
            return
        if self._take_interrupts(v) or vc.frames:
            return
        if vc.need_resched:
            self._schedule(v)
        t = vc.current
        if t >= 0 and self.tasks[t].state == TaskState.HALTED:
            if self.guest.waiter_woken(v, t):
                self.tasks[t].state = TaskState.RUNNABLE
                self.tasks[t].wait_cpu = -1
                self._note(f"task{t} leaves its halted wait")
            else:
                vc.mode = Mode.HALTED  # wfi in the halted wait: the tick stays armed
                return
        if vc.current < 0:
            self.running_cpu = v
            try:
                self.guest.on_idle_entry(v)
            finally:
                self.running_cpu = -1
            if vc.exits:
                vc.exits = 0
                vc.mode = Mode.ENTRY
                return
            if self._take_interrupts(v) or vc.current >= 0:
                return
            runnable = self.host.vcpu_runnable(v) or vc.need_resched
            vc.mode = Mode.ENTRY if runnable else Mode.IDLE

    def _other_runnable(self, v: int) -> bool:
        current = self.vcpus[v].current
        return any(
            t.cpu == v and t.state == TaskState.RUNNABLE and i != current
            for i, t in enumerate(self.tasks)
        )

    def _schedule(self, v: int) -> None:
        """``schedule()``: the next runnable task of this CPU after ``current``, or idle."""
        vc = self.vcpus[v]
        vc.need_resched = False
        n = len(self.tasks)
        start = vc.current
        for i in range(1, n + 1):
            cand = (start + i) % n
            task = self.tasks[cand]
            if task.cpu == v and task.state == TaskState.RUNNABLE:
                if cand != vc.current:
                    self._note(f"vCPU{v} switches to task{cand}")
                    self.guest.on_context_switch(v, cand)
                vc.current = cand
                return
        if vc.current >= 0 and self.tasks[vc.current].state == TaskState.HALTED:
            return  # the halted waiter keeps the CPU
        if vc.current >= 0:
            self.guest.on_context_switch(v, -1)
        vc.current = -1

    def _pick(self, v: int) -> None:
        self.vcpus[v].current = -1
        self._schedule(v)

    def _worker_done(self, index: int) -> None:
        work = self.io.pop(index)
        self.pages[work.gfn] = True
        self.host.worker_done(work)
        vid = work.vcpu_id
        vc = self.vcpus[vid]
        if vc.mode in (Mode.HALTED, Mode.IDLE) and self.host.vcpu_runnable(vid):
            self._note(f"vCPU{vid} woken from kvm_vcpu_block")
            vc.mode = Mode.ENTRY

    def _sync_done(self, v: int) -> None:
        vc = self.vcpus[v]
        self.pages[vc.sync_gfn] = True
        vc.sync_gfn = -1
        vc.mode = Mode.ENTRY

    def _tick(self, v: int) -> None:
        vc = self.vcpus[v]
        vc.timer = True
        vc.mode = Mode.ENTRY

    def _syscall(self, v: int) -> None:
        """The task's own synchronous exception: vector, kernel_entry, entry-common (syndrome
        not yet read), then the handler."""
        vc = self.vcpus[v]
        self.tasks[vc.current].syscall_done = True
        vc.frames.append(Frame(Contexts.SYSCALL, F_NOP))
        vc.frames.append(Frame(Contexts.ENTRY_COMMON, F_SYSCALL_READ))
        if self._arm64:
            vc.frames.append(Frame(self.entry_ctx, F_NOP))
            vc.frames.append(Frame(self.vector_ctx, F_NOP))

    def _offline(self, v: int) -> None:
        """CPU hotplug: the driver's offline callback, then the CPU's tasks move away."""
        vc = self.vcpus[v]
        vc.hotplug_left -= 1
        self.running_cpu = v
        try:
            self.guest.cpu_offline(v)
        finally:
            self.running_cpu = -1
        vc.mode = Mode.OFFLINE
        vc.frames.clear()
        vc.irqs.clear()
        vc.timer = vc.ipi = vc.need_resched = False
        vc.exits = 0
        vc.current = -1
        for task in self.tasks:
            self._migrate_if_offline(task)

    def _migrate_if_offline(self, task: Task) -> None:
        if self.vcpus[task.cpu].mode != Mode.OFFLINE:
            return
        target = next(i for i, vc in enumerate(self.vcpus) if vc.mode != Mode.OFFLINE)
        task.cpu = target
        vc = self.vcpus[target]
        if task.state == TaskState.RUNNABLE and vc.current < 0:
            vc.need_resched = True
            if vc.mode in (Mode.IDLE, Mode.HALTED):
                vc.mode = Mode.ENTRY

    def _online(self, v: int) -> None:
        vc = self.vcpus[v]
        self.guest.cpu_online(v)
        vc.mode = Mode.ENTRY

    def _reboot(self) -> None:
        """Reboot or kexec: the driver's teardown, then a new kernel that never enables
        async PF; the old tasks are gone."""
        self.reboot_left -= 1
        self.guest.reboot()
        self.rebooted = True
        for block in self.guest.shared_blocks():
            block.enabled = 0
        for task in self.tasks:
            task.state = TaskState.DONE
        for vc in self.vcpus:
            if vc.mode == Mode.OFFLINE:
                continue
            vc.frames.clear()
            vc.irqs.clear()
            vc.current = -1
            vc.exits = 0
            if vc.mode in (Mode.GUEST, Mode.HALTED):
                vc.mode = Mode.ENTRY

    def _lapic(self, v: int, enable: bool) -> None:
        """The guest clears or sets its LAPIC software-enable bit (SPIV)."""
        if not enable:
            self.vcpus[v].lapic_left -= 1
        self.host.kvm_lapic_set_enabled(v, enable)
        if self.vcpus[v].mode == Mode.GUEST:
            self.vcpus[v].mode = Mode.ENTRY  # the SPIV write traps to the host

    def _lapic_disabled(self, v: int) -> bool:
        return not self.host.lapic_enabled(v)

    # -- step-level checks ---------------------------------------------------------------------
    def _blocks(self) -> list[tuple[int, ...]]:
        return [b.words() for b in self.guest.shared_blocks()]

    def _check_host_writes(self, before: list[tuple[int, ...]], guest_step: bool) -> None:
        """I8/B14: the host never writes APF data of a CPU whose kernel has not enabled it."""
        if guest_step:
            return
        for cpu, block in enumerate(self.guest.shared_blocks()):
            words = block.words()
            if words != before[cpu] and any(words) and not block.enabled:
                raise Violation(
                    "I8 host wrote guest memory after async PF was disabled (B14)",
                    f"vCPU{cpu}: the host wrote {words} into the APF data block, but this "
                    "CPU's kernel has not enabled async PF (after kexec it is someone "
                    "else's memory)",
                )


_STEP_CODE: dict[int, Callable[[World, int, int], None]] = {
    Step.ACCESS: lambda w, v, arg: w._access(v, w._modes[arg]),
    Step.ENTER: lambda w, v, _: w._enter(v),
    Step.HANDLE: lambda w, v, _: w._handle(v),
    Step.WORKER: lambda w, i, _: w._worker_done(i),
    Step.SYNC_DONE: lambda w, v, _: w._sync_done(v),
    Step.TICK: lambda w, v, _: w._tick(v),
    Step.SYSCALL: lambda w, v, _: w._syscall(v),
    Step.OFFLINE: lambda w, v, _: w._offline(v),
    Step.ONLINE: lambda w, v, _: w._online(v),
    Step.REBOOT: lambda w, _v, _a: w._reboot(),
    Step.LAPIC: lambda w, v, arg: w._lapic(v, bool(arg)),
}
_STEP_NAMES = {
    Step.ENTER: "run-loop iteration and guest entry",
    Step.SYNC_DONE: "synchronous fault-in completes",
    Step.TICK: "timer tick",
    Step.SYSCALL: "task makes a system call (svc / syscall)",
    Step.OFFLINE: "guest takes the CPU offline",
    Step.ONLINE: "guest brings the CPU online",
}
_HANDLERS = {
    InjectionKind.PAGE_FAULT: "#PF handler (exc_page_fault -> kvm_handle_async_pf)",
    InjectionKind.DATA_ABORT: "abort handler (do_mem_abort -> do_async_pf)",
    InjectionKind.SDEI: "SDEI event handler",
    InjectionKind.INTERRUPT: "page-ready interrupt handler",
}
_FRAMES = {
    F_TAIL: "APF wait, from queueing the node to schedule()",
    F_TICK: "timer interrupt (scheduler_tick)",
    F_IPI: "reschedule IPI",
    F_SYSCALL_READ: "entry-common (el0_sync, before reading ESR_EL1/FAR_EL1)",
}


def _frame_name(frame: Frame) -> str:
    if frame.injection is not None:
        return f"{_HANDLERS[frame.injection.kind]} for {frame.injection.payload:#x}"
    if frame.kind in _FRAMES:
        return _FRAMES[frame.kind]
    return {"vector": "vector stub", "kernel_entry": "kernel_entry"}.get(
        frame.ctx.name, f"{frame.ctx.name} code"
    )


_BLANK_VIEW = GuestView(privileged=False)


def has_lifecycle(protocol: str) -> bool:
    """Whether the protocol's guest driver models CPU hotplug and reboot callbacks."""
    return variant(protocol).lifecycle


def _zero() -> int:
    return 0
