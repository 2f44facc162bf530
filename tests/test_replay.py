"""Every counterexample the checker prints, replayed through the simulator's own classes.

The checker (``check.World``) and the simulator (``guest/cpu.py:GuestCpu``,
``host/vcpu.py:Vcpu``) both drive ``apfsim.runloop``. This test takes each trace the checker
prints (every mutant's, and findings F1-F4) and replays its steps on a GuestCpu and a Vcpu
per vCPU, built exactly as a Simulation builds them but on a clock that only moves when the
replay fires an event: ENTER fires the vCPU thread's entry, HANDLE the guest's frame end,
ACCESS the task's planned access, TICK the vCPU's tick, WORKER the kworker's completion.
After each step the guest side (each CPU's frames, current task, pending interrupts and
resched flag, the vCPU thread's mode, every task's state, the driver's sleep records) must
equal the checker's. The LAPIC toggle is replayed as the guest's SPIV write (the host's
``kvm_lapic_set_enabled`` and a trap); the steps the simulator has no event for (CPU
hotplug, reboot, an event awaiting reinjection) end a replay, and the prefix before them
is compared: B1, B14 and F3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from apfsim.check import WorldConfig, check
from apfsim.check.mutants import MUTANTS
from apfsim.check.world import MODES, Mode, RoundRobinRq, Step, World
from apfsim.guest.cpu import GuestCpu
from apfsim.guest.kernel import SimKernel
from apfsim.guest.sched import CfsParams, Task
from apfsim.host.async_pf import AsyncPf
from apfsim.host.memory import GuestMemory, PageState
from apfsim.host.vcpu import Vcpu, VcpuMode, VcpuParams
from apfsim.ports import (
    NOWAIT_MAPPED,
    NOWAIT_NEEDS_IO,
    GuestCallKind,
    HostPorts,
    RunCounters,
)
from apfsim.registry import ProtocolOptions, build_protocol
from apfsim.runloop import push_syscall
from apfsim.workloads.base import AccessMode, Plan, StopKind, Workload

_ACCESS = {name: AccessMode[name.upper()] for name in MODES}
_UNSUPPORTED = {Step.OFFLINE, Step.ONLINE, Step.REBOOT}


class ManualClock:
    """Engine time that never moves: events wait until the replay fires them."""

    def __init__(self) -> None:
        self.now = 0
        self.pending: list[list[Any]] = []

    def after(self, delay: int, callback: Callable[[Any], object], arg: Any = None) -> list[Any]:
        entry = [callback, arg]
        self.pending.append(entry)
        return entry

    def at(self, time_ns: int, callback: Callable[[Any], object], arg: Any = None) -> list[Any]:
        return self.after(0, callback, arg)

    def cancel(self, handle: list[Any] | None) -> None:
        if handle is not None and handle in self.pending:
            self.pending.remove(handle)

    def next_is(self, time_ns: int) -> bool:
        return False  # nothing runs in place: each step fires its own event

    def advance_to(self, time_ns: int) -> None:
        raise AssertionError("next_is never allows it")

    def fire(self, owner: object, names: tuple[str, ...]) -> bool:
        """Run the first pending event of ``owner`` whose callback is one of ``names``."""
        for entry in self.pending:
            callback = entry[0]
            if getattr(callback, "__self__", None) is owner and callback.__name__ in names:
                self.pending.remove(entry)
                callback(entry[1])
                return True
        return False


class Script(Workload):
    """The checker's task program: write each page once; the replay picks each access's mode."""

    def __init__(self, name: str, pages: tuple[int, ...], memory: Any) -> None:
        super().__init__(name)
        self.pages = pages
        self.pc = 0
        self.mode = AccessMode.USER
        self.memory = memory
        self.go = False  # the replay's ACCESS step: the access runs (else an exit cut in)

    def plan(self, memory: Any) -> Plan:
        gfn = self.pages[self.pc]
        present = memory.state[gfn] == int(PageState.MAPPED)
        return Plan(1, StopKind.RESUME if present else StopKind.MISS, gfn, self.mode)

    def commit(self, memory: Any, elapsed_ns: int) -> bool:
        if not self.go:
            return False
        self.go = False
        if memory.state[self.pages[self.pc]] == int(PageState.MAPPED):
            self.pc += 1
            self.mode = AccessMode.USER
        return True

    def current_mode(self) -> AccessMode:
        return self.mode

    @property
    def finished(self) -> bool:
        return self.pc == len(self.pages)


def swapped_memory(pages: int) -> GuestMemory:
    """The world's pages, all swapped out (only ``state`` is used)."""
    memory = GuestMemory(pages, limit_pages=pages)
    memory.state[:] = int(PageState.SWAPPED)
    return memory


class Io:
    """Host I/O as the checker's world has it: a page is present or not; workers wait."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.workers: list[AsyncPf] = []
        self.sync: dict[int, tuple[Callable[[Any], object], Any, int]] = {}
        self.vcpus: list[Vcpu] = []

    def resolve_nowait(self, gfn: int) -> int:
        return NOWAIT_MAPPED if self.present(gfn) else NOWAIT_NEEDS_IO

    def present(self, gfn: int) -> bool:
        return bool(self.memory.state[gfn] == int(PageState.MAPPED))

    def read_page(
        self, gfn: int, on_done: Callable[[Any], object], arg: Any, vcpu: int = 0
    ) -> None:
        owner = getattr(on_done, "__self__", None)
        assert isinstance(owner, Vcpu)
        self.sync[owner.index] = (on_done, arg, gfn)

    def map_after_read(self, gfn: int) -> None:
        pass

    def start_worker(self, work: AsyncPf) -> None:
        self.workers.append(work)

    def running_workers(self) -> list[AsyncPf]:
        return self.workers  # the checker's workers run from their start

    def on_worker_idle(self, vcpu: int, callback: Callable[[], object]) -> None:
        callback()  # not reached: the replay stops at the steps that disable async PF


class Replay:
    """The simulator's classes for one checker world, stepped by the checker's actions."""

    def __init__(self, config: WorldConfig, world: World) -> None:
        n = config.vcpus
        self.clock = ManualClock()
        self.memory = swapped_memory(config.pages)
        self.io = Io(self.memory)
        self.tasks = [Task(t.tid, t.name, t.cpu) for t in world.tasks]
        self.workloads = [
            Script(t.name, s.pages, self.memory)
            for t, s in zip(self.tasks, world.scripts, strict=True)
        ]
        counters = RunCounters()
        workloads: list[Workload] = [*self.workloads]  # the kernel's list holds any Workload
        self.kernel = SimKernel(
            self.memory,
            self.tasks,
            workloads,
            [True] * len(self.tasks),
            counters,
            np.random.default_rng(0),
            0.0,
            0,
            dict.fromkeys(GuestCallKind, 0),
        )
        ports = HostPorts(self.io.present, self._kick, _nothing, self.io.start_worker, lambda: 0)
        opts = ProtocolOptions(send_always=config.send_always)
        self.host, self.guest = build_protocol(config.protocol, n, self.kernel, ports, opts)
        bits = config.token_id_bits
        if bits is None:
            bits = (config.tasks * config.pages * (1 + config.hotplug) + 4).bit_length()
        self.host.narrow_token_ids(bits)
        self.host.mutant = self.guest.mutant = config.mutant
        self.kernel.host = self.host
        params = VcpuParams(0, 0, 0, 0, 0, 0, 0, 0)
        self.vcpus = [Vcpu(v, self.clock, self.host, self.io, params, counters) for v in range(n)]
        self.cpus = [
            GuestCpu(
                v,
                self.clock,
                vcpu,
                self.guest,
                self.kernel,
                CfsParams(),
                world.rules,
                False,
                counters,
            )
            for v, vcpu in enumerate(self.vcpus)
        ]
        for vcpu, cpu in zip(self.vcpus, self.cpus, strict=True):
            vcpu.guest = cpu
            cpu.rq = RoundRobinRq()  # the checker's policy
        self.io.vcpus = self.vcpus
        self.kernel.cpus, self.kernel.vcpus = self.cpus, self.vcpus
        self.kernel.run_driver(0, self.guest.boot)
        self.kernel.started = True
        for task in self.tasks:
            self.cpus[task.cpu].rq.enqueue(task, wakeup=False)
            self.cpus[task.cpu].need_resched = True
        for vcpu in self.vcpus:
            self.clock.after(0, vcpu.enter)

    def _kick(self, v: int) -> None:
        self.vcpus[v].kick()

    def step(self, world: World, action: tuple[int, int, int]) -> None:
        kind, index, arg = action
        if kind == Step.ENTER:
            vcpu = self.vcpus[index]
            self.clock.fire(vcpu, ("enter", "_enter_last", "_spin_end", "_call_done"))
            assert self.clock.fire(vcpu, ("_entered",))
            self.clock.fire(vcpu, ("_block",))
        elif kind == Step.HANDLE:
            assert self.clock.fire(self.cpus[index], ("_on_frame_end",))
            self.clock.fire(self.vcpus[index], ("_block",))
        elif kind == Step.ACCESS:
            cpu = self.cpus[index]
            assert cpu.current is not None
            script = self.workloads[cpu.current.tid]
            script.mode = _ACCESS[world._modes[arg]]
            script.go = True
            # The plan was made before the mode was chosen: make it again.
            self.clock.cancel(cpu._event)
            cpu._start_task()
            assert self.clock.fire(cpu, ("_on_task_stop",))
            self.clock.fire(self.vcpus[index], ("_block",))
        elif kind == Step.TICK:
            self.vcpus[index].on_tick()
        elif kind == Step.WORKER:
            work = self.io.workers.pop(index)
            self.memory.state[work.gfn] = int(PageState.MAPPED)
            self.host.worker_done(work)
            self.vcpus[work.vcpu_id].worker_completed(work)
        elif kind == Step.SYNC_DONE:
            on_done, value, gfn = self.io.sync.pop(index)
            self.memory.state[gfn] = int(PageState.MAPPED)
            on_done(value)
        elif kind == Step.LAPIC:
            # The guest's SPIV write: kvm_lapic_set_enabled, and the write traps to the host.
            self.host.kvm_lapic_set_enabled(index, bool(arg))
            if self.vcpus[index].mode == VcpuMode.GUEST:
                self.vcpus[index].exit_async()
            self.clock.fire(self.vcpus[index], ("_block",))
        elif kind == Step.SYSCALL:
            cpu = self.cpus[index]
            cpu.interrupt(0)
            push_syscall(cpu, world.rules)
            cpu.resume()

    def state(self) -> list[Any]:
        """The guest side, in the checker's terms."""
        modes = [_sim_mode(vcpu) for vcpu in self.vcpus]
        return _guest_side(modes, self.cpus, self.tasks, self.guest)


def _sim_mode(vcpu: Vcpu) -> int:
    if vcpu.mode == VcpuMode.GUEST:
        return Mode.GUEST
    if vcpu.mode == VcpuMode.BLOCKED:
        return Mode.HALTED if vcpu.block_halt else Mode.IDLE
    if vcpu.mode == VcpuMode.SYNC_FAULT:
        return Mode.SYNC
    return Mode.ENTRY


def _world_state(world: World) -> list[Any]:
    return _guest_side([vc.mode for vc in world.vcpus], world.vcpus, world.tasks, world.guest)


def _guest_side(modes: list[int], cpus: Any, tasks: list[Task], guest: Any) -> list[Any]:
    """Each CPU's mode, frames, current task, resched flag and pending interrupts; every
    task's state; the driver's sleep records."""
    out: list[Any] = [
        (
            mode,
            [(f.kind, f.ctx.name) for f in cpu.frames],
            -1 if cpu.current is None else cpu.current.tid,
            cpu.need_resched,
            cpu.timer_pending,
            cpu.ipi_pending,
            [i.payload for i in cpu.pending_irqs],
        )
        for mode, cpu in zip(modes, cpus, strict=True)
    ]
    out.append([(t.state, t.halt_ctx and t.halt_ctx.name) for t in tasks])
    out.append(sorted(guest.wait_nodes()))
    return out


def _nothing(_: int) -> None:
    pass


def _counterexamples() -> list[Any]:
    worlds = [
        pytest.param(replace(WorldConfig(protocol=m.protocol, **m.world), mutant=name), id=name)
        for name, m in MUTANTS.items()
    ]
    seed = WorldConfig(protocol="arm64-rfcv2", vcpus=1, tasks=1, pages=1, send_always=True)
    worlds += [
        pytest.param(replace(seed, modes=("user", "kernel_atomic")), id="F1"),
        pytest.param(
            WorldConfig(protocol="arm64-rfcv2", vcpus=1, tasks=2, pages=1, placement="one"),
            id="F2",
        ),
        pytest.param(
            WorldConfig(
                protocol="arm64-rfcv2",
                vcpus=2,
                tasks=2,
                pages=1,
                modes=("user",),
                hotplug=1,
                stay_offline=True,
                syscalls=False,
            ),
            id="F3",
        ),
        pytest.param(
            WorldConfig(protocol="arm64-rfcv2", vcpus=1, tasks=2, pages=1, syscalls=False),
            id="F4",
        ),
    ]
    return worlds


@pytest.mark.parametrize("config", _counterexamples())
def test_every_counterexample_reaches_the_same_states_through_the_simulator(
    config: WorldConfig,
) -> None:
    found = check(config)
    assert found.violation is not None
    world = World(config)
    sim = Replay(config, world)
    path = _path(config, [step.action for step in found.violation.trace])
    replayed = 0
    for action in path:
        if action[0] in _UNSUPPORTED or (
            action[0] == Step.ACCESS and world._modes[action[2]] not in MODES
        ):
            # A step the simulator has no event for: only the prefix is compared.
            assert config.hotplug or config.reboot or config.event_pending
            break
        try:
            world.step(action)
        except Exception:
            break  # the step broke a property: the checker stops there too
        sim.step(world, action)
        assert sim.state() == _world_state(world), (world.describe(action), replayed)
        replayed += 1
    else:
        assert replayed == len(path)
    assert replayed > 0


def _path(config: WorldConfig, described: list[str]) -> list[tuple[int, int, int]]:
    """The counterexample's actions, recovered from its described steps."""
    world = World(config)
    path: list[tuple[int, int, int]] = []
    for text in described:
        match = [a for a in world.actions() if world.describe(a) == text]
        assert match, text
        path.append(match[0])
        try:
            world.step(match[0])
        except Exception:
            break
    return path
