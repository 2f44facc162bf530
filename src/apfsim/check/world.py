"""The model checker's small world: the simulator's run loop and protocol code, driven by
choices, not time.

A :class:`World` holds a VM of a few vCPUs, guest tasks and guest pages. Its host and guest
halves are built by :func:`apfsim.registry.build_protocol`, exactly as the simulator builds
them, and its guest CPUs run the simulator's run loop (:mod:`apfsim.runloop`): the same
exception frames, interrupt masking, idle entry, return to user, preemption points and
``schedule()``. Where the simulator lets time decide what happens next, the world offers
every enabled step (:meth:`World.actions`) and the search tries each:

* a task's next access (in user or kernel mode, or on top of a pending event), which may
  take a stage-2 fault into ``try_async_pf``;
* a vCPU entry (``vcpu_enter_guest``: one run-loop iteration, then injection);
* the end of the top guest frame (vector stub, ``kernel_entry``, entry-common, the abort
  or APF handler, an IRQ handler, the tail of the APF wait before ``schedule()``,
  ``__schedule``'s context switch);
* a worker's completion (``async_pf_execute``), a synchronous fault-in's end;
* a timer tick (an exit, and an interrupt the guest takes when it unmasks);
* the task's own system call (an exception with its own syndrome to read);
* CPU offline and online, reboot or kexec, and the x86 LAPIC software-enable.

Each step also checks what can only be seen as it happens (an abort landing where the
guest cannot take it, a not-present in kernel mode, a host write into memory whose kernel
never enabled async PF); :mod:`apfsim.invariants` checks the states. The runqueue is
round-robin: the tick, offered wherever it can change something, explores every point at
which CFS could preempt, so the world needs no vruntime.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import apfsim.runloop as runloop
from apfsim.check.mutants import MUTANTS
from apfsim.guest.context import Contexts, GuestContext
from apfsim.guest.kernel import GuestCalls
from apfsim.guest.sched import Task, TaskState
from apfsim.host.async_pf import AsyncPf, WorkMemo, WorkTable
from apfsim.invariants import check_guest, check_vcpu
from apfsim.ports import (
    AbortOutcome,
    Broken,
    GuestView,
    HostPorts,
    Injection,
    InjectionKind,
)
from apfsim.registry import PROTOCOLS, ProtocolOptions, build_protocol, variant
from apfsim.runloop import CpuState, FaultOutcome, Frame, FrameKind, Next, RunLoopRules
from apfsim.scenario import did_you_mean, one_line
from apfsim.snapshot import Fields

__all__ = [
    "MODES",
    "Action",
    "Mode",
    "TaskState",
    "World",
    "WorldConfig",
    "WorldConfigError",
    "has_lifecycle",
]


class Mode:
    """Where a vCPU thread is (plain ints: a state snapshot stays small and fast)."""

    GUEST: Final = 0  # in the guest: a task, or kernel frames
    ENTRY: Final = 1  # in the host, about to run a run-loop iteration and enter
    HALTED: Final = 2  # kvm_vcpu_block with the guest tick armed (artificial halt, halted wait)
    IDLE: Final = 3  # kvm_vcpu_block after the idle task's WFI (NO_HZ idle: no tick)
    SYNC: Final = 4  # blocked in a synchronous fault-in
    OFFLINE: Final = 5  # the guest CPU is offline


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
    STREAM = 11


Action = tuple[int, int, int]  # (Step, index, argument)

MODES: dict[str, GuestContext] = {
    "user": Contexts.USER,
    "kernel": Contexts.KERNEL,
    "kernel_atomic": Contexts.KERNEL_ATOMIC,
    "kernel_rcu": Contexts.KERNEL_RCU,
    "kernel_irqs_off": Contexts.KERNEL_IRQS_OFF,
}
_EVENT = "event_pending"  # a user access whose exit has an event awaiting reinjection (x86)
_BLANK_VIEW = GuestView(privileged=False)


class WorldConfigError(ValueError):
    """A world that cannot be checked; the one-line message names the ``apfsim check`` flag
    (or the field) and what is allowed."""


@dataclass(frozen=True)
class WorldConfig:
    """The world's size and what it may do; the defaults are the acceptance world. A bad
    value raises :class:`WorldConfigError` (the message ``apfsim check`` prints)."""

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
    idle_tick: bool = False  # the tick keeps running in idle (no NO_HZ_IDLE)
    preempt: bool = True  # CONFIG_PREEMPT: kernel code is preempted on IRQ return
    stream: bool = False  # postcopy: the background stream may place any missing page
    mutant: str | None = None

    def __post_init__(self) -> None:
        def fail(message: str) -> WorldConfigError:
            return WorldConfigError(one_line(message))

        if self.mutant is not None:
            m = MUTANTS.get(self.mutant)
            if m is None:
                raise fail(
                    f"--mutant: unknown {self.mutant!r}; known: {', '.join(MUTANTS)}"
                    f"{did_you_mean(self.mutant, MUTANTS)}"
                )
            if self.protocol != m.protocol and self.protocol not in m.also:
                raise fail(f"--mutant: {m.name} is a bug of {m.protocol}, not of {self.protocol}")
        if self.protocol not in PROTOCOLS:
            raise fail(
                f"PROTOCOL: unknown {self.protocol!r}; known: {', '.join(PROTOCOLS)}"
                f"{did_you_mean(self.protocol, PROTOCOLS)}"
            )
        for name in ("vcpus", "tasks", "pages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4:
                raise fail(f"--{name}: must be 1 to 4 in a checked world (got {value!r})")
        if not self.modes:
            raise fail(f"--modes: give at least one of {', '.join(MODES)}")
        for mode in self.modes:
            if mode not in MODES:
                raise fail(
                    f"--modes: unknown {mode!r}; known: {', '.join(MODES)}"
                    f"{did_you_mean(mode, MODES)}"
                )
        if not isinstance(self.hotplug, int) or not 0 <= self.hotplug <= 2:
            raise fail(f"--hotplug: must be 0 to 2 (got {self.hotplug!r})")
        if self.placement not in ("spread", "one"):
            raise fail(f"placement: 'spread' or 'one' (got {self.placement!r})")
        if self.token_id_bits is not None and not (
            isinstance(self.token_id_bits, int) and self.token_id_bits >= 1
        ):
            raise fail(f"token_id_bits: None or at least 1 (got {self.token_id_bits!r})")
        if (self.hotplug or self.reboot) and not variant(self.protocol).lifecycle:
            with_hooks = ", ".join(p for p, v in PROTOCOLS.items() if v.lifecycle)
            raise fail(
                f"--hotplug/--reboot: {self.protocol}'s guest driver models no CPU hotplug or "
                f"reboot callbacks; use one of {with_hooks}"
            )


class Script:
    """A task's program in the small world: write each of its pages once, in order."""

    __slots__ = ("ctx", "pages", "pc", "syscall_done", "wait_cpu")

    def __init__(self, pages: tuple[int, ...]) -> None:
        self.pages = pages
        self.pc = 0
        self.ctx = Contexts.USER  # the context of the access it is making
        self.syscall_done = False
        self.wait_cpu = -1  # the CPU whose list holds its node while it waits

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.pages, self.pc, self.ctx, self.syscall_done, self.wait_cpu)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.pages, self.pc, self.ctx, self.syscall_done, self.wait_cpu = state


class RoundRobinRq:
    """A runqueue without time: tasks take turns. Wakeup preemption is left to the tick
    (a woken task runs once the tick finds another runnable, or curr stops)."""

    __slots__ = ("curr", "queue")

    def __init__(self) -> None:
        self.queue: list[Task] = []
        self.curr: Task | None = None

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.queue, self.curr)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.queue, self.curr = state

    def enqueue(self, task: Task, wakeup: bool) -> None:
        task.state = TaskState.RUNNABLE
        self.queue.append(task)

    def pick_next(self) -> Task | None:
        task = self.queue.pop(0) if self.queue else None
        if task is not None:
            task.state = TaskState.RUNNING
        self.curr = task
        return task

    def put_prev(self, task: Task) -> None:
        task.state = TaskState.RUNNABLE
        self.queue.append(task)
        if self.curr is task:
            self.curr = None

    def check_preempt_tick(self) -> bool:
        return bool(self.queue)

    def check_preempt_wakeup(self, woken: Task) -> bool:
        return False

    def update_curr(self, delta_exec_ns: int) -> None:
        pass


class WVcpu(CpuState):
    """One vCPU thread and its guest CPU: the run loop's state plus where the thread is."""

    def __init__(self, cpu: int, world: World, hotplug: int, lapic: int) -> None:
        self.init_state(cpu)
        self.world = world
        self.rq = RoundRobinRq()
        self.mode = Mode.GUEST
        self.sync_gfn = -1
        self.event_pending = False  # x86: an event awaits reinjection at this exit
        self.hotplug_left = hotplug
        self.lapic_left = lapic

    def task_context(self, task: Task) -> GuestContext:
        return self.world.scripts[task.tid].ctx

    def freeze(self) -> tuple[Any, ...]:
        """This vCPU's state; tasks as their ids (the world's own records)."""
        rq = self.rq
        return (
            _VCPU.freeze(self),
            tuple([task.tid for task in rq.queue]),
            -1 if rq.curr is None else rq.curr.tid,
            -1 if self.current is None else self.current.tid,
            tuple([_freeze_frame(frame) for frame in self.frames]),
            tuple(self.pending_irqs),
        )

    def thaw(self, state: tuple[Any, ...], tasks: list[Task]) -> None:
        scalars, queue, curr, current, frames, irqs = state
        _VCPU.thaw(self, scalars)
        self.rq.queue = [tasks[t] for t in queue]
        self.rq.curr = None if curr < 0 else tasks[curr]
        self.current = None if current < 0 else tasks[current]
        self.frames = [_thaw_frame(frame, tasks) for frame in frames]
        self.pending_irqs = list(irqs)

    _FIELDS = (
        "cpu",
        "world",
        "rq",
        "mode",
        "sync_gfn",
        "event_pending",
        "hotplug_left",
        "lapic_left",
        "frames",
        "current",
        "need_resched",
        "timer_pending",
        "ipi_pending",
        "pending_irqs",
        "pending_exits",
        "pending_exit_ns",
        "in_kernel",
    )

    # NOTE: a flat tuple instead of the instance dict, for performance (every state is
    # pickled); ``ret`` as its int.
    def __getstate__(self) -> tuple[Any, ...]:
        return (*[getattr(self, name) for name in self._FIELDS], int(self.ret))

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self._FIELDS, state, strict=False):
            setattr(self, name, value)
        self.ret = runloop.Ret(state[-1])


_VCPU = Fields(
    *("mode", "sync_gfn", "event_pending", "hotplug_left", "lapic_left", "need_resched"),
    *("timer_pending", "ipi_pending", "pending_exits", "pending_exit_ns", "in_kernel", "ret"),
)
_TASK = Fields.of(Task, exclude=("tid", "name"))
_SCRIPT = Fields("pc", "ctx", "syscall_done", "wait_cpu")


def _freeze_frame(frame: Frame) -> tuple[Any, ...]:
    """A frame's fields; a task argument (the wait tail's, the switch's) as its id."""
    arg = frame.arg
    if isinstance(arg, Task):
        return frame.ctx, frame.kind, frame.remaining, arg.tid, True
    return frame.ctx, frame.kind, frame.remaining, arg, False


def _thaw_frame(state: tuple[Any, ...], tasks: list[Task]) -> Frame:
    ctx, kind, remaining, arg, is_task = state
    return Frame(ctx, kind, remaining, tasks[arg] if is_task else arg)


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
        if (config.hotplug or config.reboot) and not self.variant.lifecycle:
            raise ValueError(f"{config.protocol}'s guest models no CPU hotplug or reboot callbacks")
        self.pages = [False] * config.pages  # True: present in the host (stage 2 mapped)
        self.io: list[AsyncPf] = []  # workers in flight
        self.vcpus = [
            WVcpu(v, self, config.hotplug, int(config.lapic)) for v in range(config.vcpus)
        ]
        spread = config.placement == "spread"
        self.tasks = [
            Task(tid=t, name=f"task{t}", cpu=t % config.vcpus if spread else 0)
            for t in range(config.tasks)
        ]
        self.scripts = [
            Script(tuple((t + i) % config.pages for i in range(config.pages)))
            for t in range(config.tasks)
        ]
        self.reboot_left = int(config.reboot)
        self.rebooted = False
        self.running_cpu = -1
        self.log: list[str] | None = None  # set to a list to record what each step did
        ctxs = Contexts(vector_pc_offset=0x200, entry_pc_offset=0xC00)
        arch = self.variant.arch_in("arm64")
        self.rules = RunLoopRules.for_arch(
            arch, ctxs.vector, ctxs.entry, full_preempt=config.preempt
        )
        opts = ProtocolOptions(send_always=config.send_always)
        # The userfault bitmap (memory-fault-exit reads it): the world stands for a postcopy
        # destination, every page not yet present still on the source.
        ports = HostPorts(
            self._prefault, self._kick, self._gup_nowait, self._start_worker, _zero, self._remote
        )
        self.host, self.guest = build_protocol(config.protocol, config.vcpus, self, ports, opts)
        # s390: a completion goes to the VM-wide floating list, which any vCPU's entry takes
        # and whose kick picks any idle vCPU: no vCPU's steps are its own (World.local_steps).
        self._floating = hasattr(self.host, "float_pfault")
        self.driver = self.guest
        # A narrow token id keeps the state space small; only B9's world lets it wrap.
        bits = config.token_id_bits
        if bits is None:
            bits = (config.tasks * config.pages * (1 + config.hotplug) + 4).bit_length()
        self.host.narrow_token_ids(bits)
        self.host.mutant = self.guest.mutant = config.mutant
        self.guest.boot()
        for task in self.tasks:
            vc = self.vcpus[task.cpu]
            vc.rq.enqueue(task, wakeup=False)
            vc.need_resched = True
        for vc in self.vcpus:
            vc.mode = Mode.ENTRY

    # -- identity ------------------------------------------------------------------------------
    def freeze(self) -> tuple[Any, ...]:
        """The state as one hashable tuple of plain values (apfsim.snapshot): equal iff the
        states are equal. Counters, logs and host history are not state and are left out."""
        works = WorkMemo()
        host = self.host.freeze(works)
        io = tuple(map(works.ref, self.io))
        return (
            tuple(self.pages),
            tuple([_TASK.freeze(task) for task in self.tasks]),
            tuple([_SCRIPT.freeze(script) for script in self.scripts]),
            tuple([vc.freeze() for vc in self.vcpus]),
            self.reboot_left,
            self.rebooted,
            self.running_cpu,
            host,
            self.guest.freeze(),
            io,
            tuple(works.items),
        )

    def thaw(self, state: tuple[Any, ...]) -> None:
        """Become the state ``state`` (a :meth:`freeze` of this world or of one built from the
        same config), in place."""
        (pages, tasks, scripts, vcpus, reboot_left, rebooted, running_cpu) = state[:7]
        host, guest, io, items = state[7:]
        self.pages = list(pages)
        for task, values in zip(self.tasks, tasks, strict=True):
            _TASK.thaw(task, values)
        for script, values in zip(self.scripts, scripts, strict=True):
            _SCRIPT.thaw(script, values)
        for vc, frozen in zip(self.vcpus, vcpus, strict=True):
            vc.thaw(frozen, self.tasks)
        self.reboot_left, self.rebooted, self.running_cpu = reboot_left, rebooted, running_cpu
        works = WorkTable(items)
        self.host.thaw(host, works)
        self.guest.thaw(guest)
        self.io = list(map(works.get, io))

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

    _COUNTERS = ("stats", "declined", "populates", "user_exits")
    # Host fields written before they are read (the registers at the last exit, what the
    # last ACK delivered, the halt flag that only feeds a counter): history, not state.
    _HISTORY = (("view", _BLANK_VIEW), ("acked", ()), ("halted", False), ("ack_window", False))

    def _strip(self) -> list[tuple[Any, str, object]]:
        """Detach what is not state (log, config, counters, history); returns it for
        _restore. An entry's owner is a name ("" the world, "host", "guest") or, for the
        history fields, the arch record itself."""
        saved: list[tuple[Any, str, object]] = [
            ("", "log", self.log),
            ("", "config", self.config),
            ("", "variant", self.variant),
            ("", "rules", self.rules),
        ]
        plan = self._strip_plan()
        self.log = None
        self.config = None  # type: ignore[assignment]  # the same for every state
        self.variant = None  # type: ignore[assignment]
        self.rules = None  # type: ignore[assignment]
        counters, history = plan
        for owner, attr in counters:
            half = getattr(self, owner)
            value = getattr(half, attr)
            saved.append((owner, attr, value))
            # A zeroed record of the same type (the compiled build checks field types).
            setattr(half, attr, 0 if isinstance(value, int) else type(value)())
        if history:
            for arch in self.host.arch:  # type: ignore[attr-defined]
                for attr, blank in history:
                    saved.append((arch, attr, getattr(arch, attr)))
                    setattr(arch, attr, blank)
        return saved

    def _strip_plan(self) -> tuple[list[tuple[str, str]], list[tuple[str, object]]]:
        """Which counters and history fields this variant has (the same for every state).
        NOTE: worked out once per world and kept with the class, for performance."""
        key = (type(self.host), type(self.guest), self.config.mutant == "B12")
        known = _STRIP_PLANS.get(key)
        if known is None:
            counters = [
                (owner, attr)
                for owner in ("host", "guest")
                for attr in self._COUNTERS
                if hasattr(getattr(self, owner), attr)
            ]
            archs = getattr(self.host, "arch", ())
            history: list[tuple[str, object]] = [
                (attr, list(blank) if isinstance(blank, tuple) else blank)
                for attr, blank in self._HISTORY
                if archs and hasattr(archs[0], attr) and not (attr == "ack_window" and key[2])
            ]
            known = _STRIP_PLANS[key] = (counters, history)
        return known

    def _restore(self, saved: list[tuple[Any, str, object]]) -> None:
        for owner, attr, value in saved:
            if not isinstance(owner, str):
                setattr(owner, attr, value)  # an arch record's history field
            elif owner:
                setattr(getattr(self, owner), attr, value)
            else:
                setattr(self, attr, value)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def broken(self) -> Broken:
        """The first invariant this state breaks (apfsim.invariants), or None."""
        host = self.host
        for v, vc in enumerate(self.vcpus):
            broken = check_vcpu(host, v, vc.mode == Mode.GUEST)
            if broken is not None:
                return broken
        # A halted waiter preempted out of its WFI loop is runnable: once its node is
        # unhashed it is woken, and it finds out when it runs again. One still current is
        # held to I6 only in the halt itself (its vCPU blocked): the loop tests
        # hlist_unhashed(&n.link) before each native_safe_halt() / wfi(), so out of it (the
        # page-ready handler on top of the loop, the self-IPI's trap) a missing node means
        # woken, not lost (pre-5.8 x86 kvm_async_pf_task_wait, RFCv2 kvm_async_pf_wait).
        waiting = [
            (t, self.scripts[t].wait_cpu)
            for t, task in enumerate(self.tasks)
            if task.state is TaskState.SLEEPING_APF
            or (task.state is TaskState.HALTED_APF and self.vcpus[task.cpu].mode == Mode.HALTED)
        ]
        all_done = all(task.state is TaskState.DONE for task in self.tasks)
        return check_guest(self.guest, waiting, all_done)

    # -- ports: the host services --------------------------------------------------------------
    def _prefault(self, gfn: int) -> bool:
        return self.pages[gfn]

    def _remote(self, gfn: int) -> bool:
        return not self.pages[gfn]

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
        current = self.vcpus[cpu].current
        return -1 if current is None else current.tid

    def rq_is_locked(self, cpu: int) -> bool:
        return runloop.context(self.vcpus[cpu]).rq_locked

    def swake_up_one(self, task: int) -> None:
        t = self.tasks[task]
        if t.state is not TaskState.SLEEPING_APF:
            return
        self._migrate_if_offline(t)
        if runloop.try_to_wake_up(self.vcpus[t.cpu], t, self.running_cpu, self):
            self._note(f"task{task} woken")

    def smp_send_reschedule(self, cpu: int) -> None:
        self.vcpus[cpu].need_resched = True
        self.send_ipi(cpu, self.running_cpu)

    def kzalloc_atomic(self, cpu: int) -> bool:
        return True

    def _guest_call(self, cpu: int, call: int, val: int) -> int:
        if self.running_cpu >= 0:
            self.vcpus[cpu].pending_exits += 1
        return self.host.guest_call(cpu, call, val)

    def _send_ipi(self, cpu: int) -> None:
        vc = self.vcpus[cpu]
        if vc.mode == Mode.OFFLINE:
            return
        vc.ipi_pending = True
        if cpu == self.running_cpu:
            vc.pending_exits += 1  # a self-IPI: the write traps, the IPI waits for the unmask
            return
        if vc.mode in (Mode.GUEST, Mode.HALTED, Mode.IDLE):
            vc.mode = Mode.ENTRY

    # -- runloop.Kernel: the run loop's needs, without time --------------------------------------
    def call_driver(self, cpu: CpuState, fn: Callable[..., Any], *args: Any) -> Any:
        self.running_cpu = cpu.cpu
        try:
            return fn(*args)
        finally:
            self.running_cpu = -1

    def runqueue(self, cpu: CpuState) -> RoundRobinRq:
        return self.vcpus[cpu.cpu].rq

    def update_curr(self, cpu: CpuState) -> None:
        pass

    def picked(self, cpu: CpuState, nxt: Task | None) -> None:
        pass

    def context_switched(self, cpu: CpuState, nxt: Task | None) -> None:
        self._note(f"vCPU{cpu.cpu} switches to {'idle' if nxt is None else nxt.name}")

    def send_ipi(self, cpu: int, sender: int) -> None:
        """A reschedule IPI: the sender's ICR / ICC_SGI1R_EL1 write traps (as in the
        simulator's kernel port), then the target takes the interrupt."""
        if cpu != sender and sender >= 0 and self.running_cpu >= 0:
            self.vcpus[sender].pending_exits += 1
        self._send_ipi(cpu)

    def handled(
        self, cpu: CpuState, injection: Injection, interrupted: GuestContext, outcome: AbortOutcome
    ) -> None:
        """I4: a not-present the guest refuses is a guest panic or a bogus fault."""
        self._note(f"guest handler: {outcome.value}")
        bogus = outcome in (AbortOutcome.NOT_APF, AbortOutcome.ILLEGAL_REASON)
        if bogus and injection.kind is not InjectionKind.INTERRUPT:
            regs = interrupted.regs()
            mode = "user" if regs.user_mode else "kernel"
            irqs = ", IRQs off" if regs.irqs_off else ""
            raise Violation(
                "I4 guest cannot take an injected async PF",
                f"vCPU{cpu.cpu}: {injection.kind.value} with token {injection.payload:#x} "
                f"taken in {mode} mode{irqs} was refused ({outcome.value}): on real "
                "hardware a guest panic or a bogus fault",
            )

    def apf_waiting(self, cpu: CpuState, task: Task, token: int, halted: bool) -> None:
        self.scripts[task.tid].wait_cpu = cpu.cpu

    def apf_slept(self, cpu: CpuState, task: Task) -> None:
        self._note(f"task{task.tid} sleeps on its token")

    def task_woken(self, task: Task) -> None:
        self.scripts[task.tid].wait_cpu = -1

    def task_state(self, task: Task) -> None:
        if task.state is TaskState.RUNNING:
            self._note(f"task{task.tid} leaves its halted wait")

    def bogus_abort(self, cpu: CpuState) -> None:
        pass

    # -- enabled steps -------------------------------------------------------------------------
    def actions(self) -> list[Action]:
        out: list[Action] = []
        n_modes = len(self._modes)
        for v, vc in enumerate(self.vcpus):
            mode = vc.mode
            if mode == Mode.GUEST:
                if vc.frames:
                    out.append((Step.HANDLE, v, 0))
                else:
                    task = vc.current
                    if task is not None and task.state is TaskState.RUNNING:
                        for m in range(n_modes):
                            out.append((Step.ACCESS, v, m))
                        script = self.scripts[task.tid]
                        if (
                            self._syscalls
                            and not script.syscall_done
                            and script.ctx is Contexts.USER
                        ):
                            out.append((Step.SYSCALL, v, 0))
                if not vc.timer_pending and self._tick_matters(v):
                    out.append((Step.TICK, v, 0))
            elif mode == Mode.ENTRY:
                # A disable that cancelled a worker mid-GUP waits for it (cancel_work_sync).
                if not runloop.waits_for_cancelled(self.io, v):
                    out.append((Step.ENTER, v, 0))
            elif mode == Mode.HALTED or (mode == Mode.IDLE and self.config.idle_tick):
                if not vc.timer_pending:
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
            if not self.host.lapic_enabled(v) and mode in (Mode.GUEST, Mode.ENTRY, Mode.IDLE):
                out.append((Step.LAPIC, v, 1))  # the guest's own code re-enables it
            elif vc.lapic_left and mode == Mode.GUEST and not vc.frames:
                out.append((Step.LAPIC, v, 0))
        for i in range(len(self.io)):
            out.append((Step.WORKER, i, 0))
        if self.config.stream:
            # Postcopy's background stream places a missing page at any moment: before a
            # fault, between the fault and its worker, or while a GUP sleeps on it.
            for gfn, present in enumerate(self.pages):
                if not present:
                    out.append((Step.STREAM, gfn, 0))
        if self.reboot_left and not self.rebooted and self._quiet_for_kexec():
            out.append((Step.REBOOT, 0, 0))
        return out

    def ample(self, actions: list[Action]) -> list[Action] | None:
        """A proper subset of ``actions`` that is an ample set, or None (partial-order
        reduction, docs/check.md "Partial-order reduction"): the smallest set of one vCPU's
        enabled steps (:meth:`local_steps`). The search adds the cycle proviso."""
        best: list[Action] | None = None
        for v in range(len(self.vcpus)):
            mine = self.local_steps(v, actions)
            shorter = best is None or (mine is not None and len(mine) < len(best))
            if mine is not None and len(mine) < len(actions) and shorter:
                best = mine
        return best

    def local_steps(self, v: int, actions: list[Action]) -> list[Action] | None:
        """vCPU ``v``'s enabled steps, if no other process can disable, disturb or be
        disturbed by them before ``v`` moves (else None).

        Such a vCPU has no worker in flight (a completion kicks it) and no task of its own
        asleep or in the halted wait (another CPU's wake IPIs it); its steps touch only its
        own state: an access to a present page (a page never goes away), a run-loop entry,
        the end of a frame other than an injection's handler (which may queue a sleep node,
        wake a task elsewhere, or start a worker), a tick, a system call. CPU hotplug, reboot
        and the LAPIC switch reach across vCPUs: a world that allows them is not reduced, nor
        one whose completions float (s390)."""
        config = self.config
        if config.hotplug or config.reboot or config.lapic or self._floating:
            return None
        vc = self.vcpus[v]
        if vc.mode == Mode.SYNC or vc.mode == Mode.OFFLINE:
            return None
        if vc.frames and vc.frames[-1].kind is FrameKind.HANDLER:
            return None
        for work in self.io:
            if work.vcpu_id == v:
                return None
        for task in self.tasks:
            waits = task.state is TaskState.SLEEPING_APF or task.halt_ctx is not None
            if waits and task.cpu == v:
                return None
        mine = [a for a in actions if a[1] == v and a[0] in _LOCAL_STEPS]
        if not mine or sum(1 for a in actions if a[1] == v and a[0] != Step.WORKER) != len(mine):
            return None  # nothing to do, or a step of its own that reaches across vCPUs
        if vc.mode == Mode.GUEST and not vc.frames and vc.current is not None:
            script = self.scripts[vc.current.tid]
            if script.pc < len(script.pages) and not self.pages[script.pages[script.pc]]:
                return None  # its fault races with the workers and syncs of other vCPUs
        return mine

    def _quiet_for_kexec(self) -> bool:
        """The old kernel runs its reboot path: no vCPU is between an exit and the entry
        that delivers its pending injection, and none is inside a handler."""
        return all(vc.mode != Mode.ENTRY and not vc.frames for vc in self.vcpus)

    @property
    def _syscalls(self) -> bool:
        """A task's own exception matters where a page-ready for another task of the same
        CPU can land in it: arm64 (the no-inject window), with two tasks sharing a CPU."""
        if self.config.syscalls is not None:
            return self.config.syscalls
        cpus = [task.cpu for task in self.tasks]
        return self.rules.entry_frames and len(set(cpus)) < len(cpus)

    def _tick_matters(self, v: int) -> bool:
        """A tick on a running vCPU is an exit plus an interrupt. It is offered where it can
        change something: with completions the next run-loop iteration could deliver, in
        kernel code that takes the interrupt at once, or where it could switch tasks. In code
        with IRQs masked and nothing to deliver, an exit leaves only the timer pending until
        the unmask: the same state as a tick at the unmask, which is offered there."""
        vc = self.vcpus[v]
        apf = getattr(self.host, "apf", None)
        if apf is not None and apf[v].done:
            return True
        if vc.frames:
            return not vc.frames[-1].ctx.irqs_off
        return bool(vc.pending_irqs or vc.rq.queue)

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
            assert vc.current is not None
            script = self.scripts[vc.current.tid]
            gfn = script.pages[script.pc]
            return f"vCPU{index}: task{vc.current.tid} touches gfn{gfn} in {self._modes[arg]} mode"
        if kind == Step.WORKER:
            work = self.io[index]
            return f"worker: async_pf_execute for gfn{work.gfn} (vCPU{work.vcpu_id})"
        if kind == Step.REBOOT:
            return "guest reboots into a new kernel (kexec)"
        if kind == Step.STREAM:
            return f"postcopy: the background stream places gfn{index} (UFFDIO_COPY)"
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
        view = runloop.context(vc).view()
        if vc.event_pending:
            view = GuestView(view.privileged, view.pc_offset, view.elr_saved, view.irqs_off, True)
        return view

    def _access(self, v: int, mode: str) -> None:
        vc = self.vcpus[v]
        task = vc.current
        assert task is not None
        script = self.scripts[task.tid]
        gfn = script.pages[script.pc]
        script.ctx = MODES["user"] if mode == _EVENT else MODES[mode]
        if self.pages[gfn]:
            script.pc += 1
            script.ctx = Contexts.USER
            self._note(f"task{task.tid} wrote gfn{gfn}")
            if script.pc == len(script.pages):
                task.state = TaskState.DONE
                self._note(f"task{task.tid} done")
                runloop.schedule(vc, self.rules, self)
                self._resume(v)
            return
        vc.event_pending = mode == _EVENT
        result = self.host.try_async_pf(v, gfn, self._view(v), 0)
        self._note(f"stage-2 fault on gfn{gfn}: try_async_pf says {result.decision.value}")
        if result.work is not None:
            self.io.append(result.work)
        outcome = runloop.fault_outcome(result)
        if outcome is FaultOutcome.SYNC or outcome is FaultOutcome.USER_EXIT:
            # A memory-fault exit is a blocking fault-in as the guest sees it: the VMM's vCPU
            # thread fetches the page and re-enters, the vCPU out of guest mode meanwhile.
            vc.mode = Mode.SYNC
            vc.sync_gfn = gfn
            vc.event_pending = False
        elif outcome is FaultOutcome.HALT:
            vc.mode = Mode.HALTED
        else:  # re-enter; a repeated fault re-enters and faults again until the page is in
            vc.mode = Mode.ENTRY

    def _enter(self, v: int) -> None:
        vc = self.vcpus[v]
        vc.mode = Mode.GUEST
        delivered, injections = runloop.vcpu_enter(self.host, v, self._view(v))
        if delivered:
            self._note(f"{len(delivered)} completion(s) delivered")
        interrupted = runloop.context(vc)
        exceptions = [i for i in injections if i.kind.synchronous]
        if exceptions:
            if vc.event_pending:
                raise Violation(
                    "I4 not-present injected with an event pending (B1)",
                    f"vCPU{v}: an async #PF on top of an event awaiting reinjection: #DF",
                )
            if not interrupted.elr_saved or interrupted.syndrome_unread:
                what = "ELR_EL1/SPSR_EL1" if not interrupted.elr_saved else "ESR_EL1/FAR_EL1"
                raise Violation(
                    "abort injected where the guest cannot take it",
                    f"vCPU{v}: {exceptions[0].kind.value} injected in {interrupted.name}, "
                    f"whose {what} are not yet saved: the nested exception overwrites them",
                )
        vc.event_pending = False
        for injection in injections:
            what = "inject" if injection.kind.synchronous else "raise interrupt"
            self._note(f"{what} {injection.kind.value} (payload {injection.payload:#x})")
        if runloop.take_events(vc, self.rules, injections, self.host.lapic_enabled(v)):
            self._note("page-ready interrupt into a disabled LAPIC: lost")
        self._resume(v)
        if vc.mode == Mode.GUEST and runloop.exit_request(self.host, v):
            self._note("a request came during the entry: it goes round again")
            vc.mode = Mode.ENTRY

    def _handle(self, v: int) -> None:
        vc = self.vcpus[v]
        frame = vc.frames.pop()
        runloop.frame_end(vc, self.rules, frame, self)
        if vc.pending_exits and vc.mode == Mode.GUEST:
            vc.pending_exits = 0
            vc.mode = Mode.ENTRY  # the handler's MSR write / SMCCC / IPI write traps
            return
        vc.pending_exits = 0
        runloop.take_interrupts(vc, self.rules)
        self._resume(v)

    def _resume(self, v: int) -> None:
        """The run loop decides what runs next; a WFI blocks unless already runnable."""
        vc = self.vcpus[v]
        if vc.mode != Mode.GUEST:
            return
        nxt = runloop.resume(vc, self.rules, self)
        if nxt is Next.EXIT:
            vc.pending_exits = 0
            vc.mode = Mode.ENTRY
        elif nxt is Next.WFI_HALT or nxt is Next.WFI_IDLE:
            if runloop.wake_condition(vc.timer_pending, vc.ipi_pending, self.host, v):
                vc.mode = Mode.ENTRY  # kvm_vcpu_check_block: already runnable
            else:
                vc.mode = Mode.HALTED if nxt is Next.WFI_HALT else Mode.IDLE

    def _worker_done(self, index: int) -> None:
        work = self.io.pop(index)
        self.pages[work.gfn] = True
        self.host.worker_done(work)
        vid = work.vcpu_id
        vc = self.vcpus[vid]
        if vc.mode in (Mode.HALTED, Mode.IDLE) and self.host.vcpu_runnable(vid):
            self._note(f"vCPU{vid} woken from kvm_vcpu_block")
            vc.mode = Mode.ENTRY

    def _stream(self, gfn: int) -> None:
        """The page arrives by the background stream: present in the host from now on, so
        a later fault on it needs no I/O; a worker or GUP asleep on it still finishes by its
        own step (its retry finds the page)."""
        self.pages[gfn] = True

    def _sync_done(self, v: int) -> None:
        vc = self.vcpus[v]
        self.pages[vc.sync_gfn] = True
        vc.sync_gfn = -1
        vc.mode = Mode.ENTRY

    def _tick(self, v: int) -> None:
        vc = self.vcpus[v]
        vc.timer_pending = True
        vc.mode = Mode.ENTRY

    def _syscall(self, v: int) -> None:
        """The task's own synchronous exception: vector, kernel_entry, entry-common (syndrome
        not yet read), then the handler."""
        vc = self.vcpus[v]
        assert vc.current is not None
        self.scripts[vc.current.tid].syscall_done = True
        runloop.push_syscall(vc, self.rules)

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
        vc.pending_irqs.clear()
        vc.timer_pending = vc.ipi_pending = vc.need_resched = False
        vc.pending_exits = 0
        current, vc.current = vc.current, None
        if current is not None and current.state in (TaskState.RUNNING, TaskState.HALTED_APF):
            vc.rq.put_prev(current)
        vc.rq.curr = None
        for task in self.tasks:
            self._migrate_if_offline(task)

    def _migrate_if_offline(self, task: Task) -> None:
        """``migrate_tasks``: a task of an offline CPU moves to the first online one."""
        source = self.vcpus[task.cpu]
        if source.mode != Mode.OFFLINE:
            return
        target_cpu = next(i for i, vc in enumerate(self.vcpus) if vc.mode != Mode.OFFLINE)
        task.cpu = target_cpu
        if task in source.rq.queue:
            source.rq.queue.remove(task)
            target = self.vcpus[target_cpu]
            target.rq.queue.append(task)
            target.need_resched = True
            if target.mode in (Mode.IDLE, Mode.HALTED):
                target.mode = Mode.ENTRY

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
            task.halt_ctx = None
        for vc in self.vcpus:
            vc.rq.queue.clear()
            vc.rq.curr = None
            if vc.mode == Mode.OFFLINE:
                continue
            vc.frames.clear()
            vc.pending_irqs.clear()
            vc.current = None
            vc.need_resched = False
            vc.pending_exits = 0
            if vc.mode in (Mode.GUEST, Mode.HALTED):
                vc.mode = Mode.ENTRY

    def _lapic(self, v: int, enable: bool) -> None:
        """The guest clears or sets its LAPIC software-enable bit (SPIV)."""
        if not enable:
            self.vcpus[v].lapic_left -= 1
        self.host.kvm_lapic_set_enabled(v, enable)
        if self.vcpus[v].mode == Mode.GUEST:
            self.vcpus[v].mode = Mode.ENTRY  # the SPIV write traps to the host

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
    Step.STREAM: lambda w, gfn, _: w._stream(gfn),
}
# A vCPU's steps that touch only its own state when it has no worker in flight and no task
# asleep (World.ample); an access only to a present page.
_LOCAL_STEPS = frozenset((Step.ACCESS, Step.ENTER, Step.HANDLE, Step.TICK, Step.SYSCALL))
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
    FrameKind.WAIT_TAIL: "APF wait, from queueing the node to schedule()",
    FrameKind.TICK: "timer interrupt (scheduler_tick)",
    FrameKind.IPI: "reschedule IPI",
    FrameKind.SWITCH: "__schedule (context switch under rq->lock)",
    FrameKind.SYSCALL: "system call body",
    FrameKind.ENTRY_COMMON: "entry-common (el0_sync, before reading ESR_EL1/FAR_EL1)",
}


def _frame_name(frame: Frame) -> str:
    if frame.kind is FrameKind.HANDLER:
        injection: Injection = frame.arg[0]
        return f"{_HANDLERS[injection.kind]} for {injection.payload:#x}"
    if frame.kind in _FRAMES:
        return _FRAMES[frame.kind]
    return {"vector": "vector stub", "kernel_entry": "kernel_entry"}.get(
        frame.ctx.name, f"{frame.ctx.name} code"
    )


_STRIP_PLANS: dict[tuple[Any, ...], tuple[list[tuple[str, str]], list[tuple[str, object]]]] = {}


def has_lifecycle(protocol: str) -> bool:
    """Whether the protocol's guest driver models CPU hotplug and reboot callbacks."""
    return variant(protocol).lifecycle


def _zero() -> int:
    return 0
