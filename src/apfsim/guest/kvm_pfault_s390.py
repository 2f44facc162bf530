"""The s390 guest side of pfault (``arch/s390/mm/pfault.c``; ``arch/s390/mm/fault.c`` before).

* ``pfault_irq_init`` (boot CPU) registers ``pfault_interrupt`` for ``EXT_IRQ_CP_SERVICE`` and
  issues DIAG 0x258 init; unless that returns 0, pfault is off for good (``pfault_disable``).
  Every other CPU issues its own init as it comes up (``smp_init_secondary``), ignoring rc.
* ``__switch_to`` stores the next task's pid in the lowcore: that is the token the host reads.
* ``pfault_interrupt``: one global ``pfault_list`` of sleepers and a per-task ``pfault_wait``
  (0; 1 = on the list, asleep or about to be; -1 = the completion came first). INIT for
  ``current``: 0 -> 1 and block, 1 -> block again, -1 -> 0 and go on; INIT for another task:
  ``WARN_ON_ONCE`` and drop. DONE: 1 -> 0, off the list, wake; a running task -> -1; a task
  that is not running: ignored ("leftover of a PFAULT CANCEL"). The task really sleeps in the
  ``schedule()`` on its return to user mode.
* CPU offline: ``pfault_fini`` (DIAG cancel) on the dying CPU, then ``pfault_cpu_dead`` wakes
  every task on the global list, whichever CPU it faulted on. CPU online: ``__cpu_up`` sends
  SIGP initial CPU reset to the new CPU first. Reboot/kexec: cancel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apfsim.abi.s390 import (
    DIAG258_INIT_ALREADY_ESTABLISHED,
    DIAG258_OK,
    DIAG_PFAULT,
    EXT_IRQ_CP_SERVICE,
    LPP_PID_MASK,
    PF_COMPLETE,
    PFAULT_FCODE_CANCEL,
    PFAULT_FCODE_INIT,
    PFAULT_SUBCODE,
    PFAULT_SUBCODE_MASK,
    SIGP,
    SIGP_INITIAL_CPU_RESET,
    S390Lowcore,
    sigp_parameter,
)
from apfsim.metrics.accumulators import counter_dict
from apfsim.ports import (
    AbortOutcome,
    GuestRegs,
    Injection,
    InjectionKind,
    KernelPort,
    SharedBlock,
    WaitNode,
)
from apfsim.protocols.common import GuestBase, ProtocolOptions
from apfsim.snapshot import Fields

__all__ = ["EOPNOTSUPP", "S390PfaultDriverCounters", "S390PfaultGuest"]

EOPNOTSUPP = -95  # __pfault_init's rc when disabled or when the DIAG traps


_LOWCORE = Fields.of(S390Lowcore)


@dataclass(slots=True)
class S390PfaultDriverCounters:
    """What ``pfault_interrupt`` and the lifecycle did, one field per case of the code."""

    init_sleeps: int = 0  # INIT, wait 0 -> 1: on the list, blocks
    init_reblocks: int = 0  # INIT, wait 1: blocks again (after a spurious wake)
    init_credits: int = 0  # INIT, wait -1 -> 0: the DONE came first, no sleep
    init_not_current: int = 0  # WARN_ON_ONCE(tsk != current): dropped
    done_wakes: int = 0  # DONE, wait 1 -> 0: off the list, woken
    done_early: int = 0  # DONE for a running task: wait -> -1
    done_ignored: int = 0  # DONE for a task not running: "leftover of a PFAULT CANCEL"
    pid_not_found: int = 0  # find_task_by_pid_ns failed: returns silently
    not_pfault: int = 0  # another external interrupt, or the handler is not registered
    cpu_dead_wakes: int = 0  # tasks pfault_cpu_dead took off the list and woke
    diag_init_failed: int = 0  # DIAG 0x258 init returned neither 0 nor 8


@dataclass
class S390PfaultGuest(GuestBase):
    """The s390 guest driver: per-CPU lowcores, the global list and each task's wait word."""

    port: KernelPort
    n_cpus: int
    pfault_disable: bool = False  # the `nopfault` early param (or a failed boot-CPU init)
    mutant: str | None = None  # no s390 mutants; kept for the checker's interface
    lowcore: list[S390Lowcore] = field(init=False)
    online: list[bool] = field(init=False)
    pfault_list: list[int] = field(default_factory=list)  # tasks, most recent first
    pfault_wait: dict[int, int] = field(default_factory=dict)  # task -> 1 or -1 (0: absent)
    registered: bool = False  # pfault_interrupt is the handler of EXT_IRQ_CP_SERVICE
    cpu_dead_registered: bool = False  # the CPUHP_S390_PFAULT_DEAD teardown is installed
    stats: S390PfaultDriverCounters = field(default_factory=S390PfaultDriverCounters)

    def __post_init__(self) -> None:
        self.lowcore = [S390Lowcore() for _ in range(self.n_cpus)]
        self.online = [True] * self.n_cpus

    @classmethod
    def create(cls, port: KernelPort, n_cpus: int, opt: ProtocolOptions) -> S390PfaultGuest:
        """``no_kvmapf`` stands for the ``nopfault`` boot option."""
        return cls(port=port, n_cpus=n_cpus, pfault_disable=opt.no_kvmapf)

    def shared_blocks(self) -> Sequence[SharedBlock]:
        return self.lowcore

    @classmethod
    def not_state(cls) -> tuple[str, ...]:
        return (
            *("port", "n_cpus", "mutant", "stats"),
            *("lowcore", "online", "pfault_list", "pfault_wait"),
        )

    def freeze(self) -> tuple[Any, ...]:
        return (
            self.scalar_fields().freeze(self),
            tuple([_LOWCORE.freeze(block) for block in self.lowcore]),
            tuple(self.online),
            tuple(self.pfault_list),
            tuple(self.pfault_wait.items()),
        )

    def thaw(self, state: tuple[Any, ...]) -> None:
        scalars, blocks, online, pfault_list, pfault_wait = state
        self.scalar_fields().thaw(self, scalars)
        for block, values in zip(self.lowcore, blocks, strict=True):
            _LOWCORE.thaw(block, values)
        self.online = list(online)
        self.pfault_list = list(pfault_list)
        self.pfault_wait = dict(pfault_wait)

    def wait_nodes(self) -> list[WaitNode]:
        """One global list, no dummies (the -1 state plays their part): the token is the pid."""
        return [(-1, task, task, False) for task in self.pfault_list]

    # -- DIAG 0x258 ----------------------------------------------------------------------------
    def pfault_init(self, cpu: int) -> int:
        """``__pfault_init`` on ``cpu``: DIAG 0x258 with ``pfault_init_refbk``."""
        if self.pfault_disable:
            return EOPNOTSUPP
        rc = self.port.hypercall(cpu, DIAG_PFAULT, PFAULT_FCODE_INIT)
        if rc in (DIAG258_OK, DIAG258_INIT_ALREADY_ESTABLISHED):
            self.lowcore[cpu].enabled = 1
        else:
            self.stats.diag_init_failed += 1
        return rc

    def pfault_fini(self, cpu: int) -> None:
        """``__pfault_fini`` on ``cpu``: DIAG 0x258 cancel (its rc is not looked at)."""
        if self.pfault_disable:
            return
        self.port.hypercall(cpu, DIAG_PFAULT, PFAULT_FCODE_CANCEL)
        self.lowcore[cpu].enabled = 0

    def pfault_irq_init(self) -> None:
        """The early initcall on the boot CPU (0): handler, init, subclass, hotplug teardown."""
        self.registered = True  # register_external_irq(EXT_IRQ_CP_SERVICE, pfault_interrupt)
        if self.pfault_init(0) != DIAG258_OK:
            self.registered = False  # out_pfault: unregister_external_irq
            self.pfault_disable = True  # out_extint
            return
        # irq_subclass_register(IRQ_SUBCLASS_SERVICE_SIGNAL): CR0 0x200 (the host's check 5).
        self.cpu_dead_registered = True  # cpuhp_setup_state_nocalls(CPUHP_S390_PFAULT_DEAD)

    # -- the external interrupt ----------------------------------------------------------------
    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome:
        """``do_ext_irq`` -> the handler of the interruption code in this CPU's lowcore."""
        lc = self.lowcore[cpu]
        if (
            injection.kind is not InjectionKind.INTERRUPT
            or not self.registered
            or lc.ext_int_code != EXT_IRQ_CP_SERVICE
        ):
            self.stats.not_pfault += 1
            return AbortOutcome.NOT_APF
        return self.pfault_interrupt(cpu, lc.ext_cpu_addr, lc.ext_params2)

    def pfault_interrupt(self, cpu: int, subcode: int, param64: int) -> AbortOutcome:
        """``pfault_interrupt``: INIT or DONE for the task whose pid is the token."""
        if subcode & PFAULT_SUBCODE_MASK != PFAULT_SUBCODE:
            self.stats.not_pfault += 1
            return AbortOutcome.NOT_APF
        done = bool(subcode & PF_COMPLETE)
        task = self.find_task_by_pid(param64 & LPP_PID_MASK)
        if task is None:
            self.stats.pid_not_found += 1
            return AbortOutcome.WOKE if done else AbortOutcome.RETRY
        if done:
            return self.pfault_done(task)
        return self.pfault_initial(cpu, task)

    @staticmethod
    def find_task_by_pid(pid: int) -> int | None:
        """Tasks' pids are their ids here; the idle task's -1 (as a u32) names no task."""
        return None if pid == LPP_PID_MASK else pid

    def pfault_done(self, task: int) -> AbortOutcome:
        """The completion: wake a sleeper, leave -1 for a running task, else ignore."""
        wait = self.pfault_wait.get(task, 0)
        if wait == 1:
            # "Initial interrupt was faster than the completion interrupt."
            self._set_wait(task, 0)
            self._list_del(task)
            self.stats.done_wakes += 1
            self.port.swake_up_one(task)  # wake_up_process
        elif self.task_is_running(task):
            # "Completion interrupt was faster than initial interrupt."
            self._set_wait(task, -1)
            self.stats.done_early += 1
        else:
            self.stats.done_ignored += 1
        return AbortOutcome.WOKE

    def task_is_running(self, task: int) -> bool:
        """``task_is_running(tsk)`` (``__state == TASK_RUNNING``), approximated as "current on
        some CPU": KernelPort has no task-state query, and the kernel's answer differs only
        for a preempted runnable task (-1 there, ignored here). A DONE that beats its own
        INIT always finds the task current: INIT is taken at the entry after the fault."""
        return any(self.port.current_task(c) == task for c in range(self.n_cpus))

    def pfault_initial(self, cpu: int, task: int) -> AbortOutcome:
        """The initial interrupt: only meaningful for ``current`` on this CPU."""
        if task != self.port.current_task(cpu):
            self.stats.init_not_current += 1  # WARN_ON_ONCE(tsk != current)
            return AbortOutcome.RETRY
        wait = self.pfault_wait.get(task, 0)
        if wait == 1:
            # Already on the list with its reference: block again.
            self.stats.init_reblocks += 1
            return AbortOutcome.WAIT_SCHEDULE
        if wait == -1:
            self._set_wait(task, 0)
            self.stats.init_credits += 1
            return AbortOutcome.RETRY
        # get_task_struct + list_add: a DONE on another CPU may wake it before it schedules.
        self._set_wait(task, 1)
        self._list_add(task)
        self.stats.init_sleeps += 1
        # TASK_UNINTERRUPTIBLE + need_resched: "rely on the return to userspace schedule()".
        return AbortOutcome.WAIT_SCHEDULE

    def _list_add(self, task: int) -> None:
        """``list_add(&tsk->thread.list, &pfault_list)`` (the token is the pid)."""
        self.pfault_list.insert(0, task)
        log = self.sleep_log
        if log is not None:
            log.node_added(-1, task, task, False)

    def _list_del(self, task: int) -> None:
        """``list_del(&tsk->thread.list)``."""
        self.pfault_list.remove(task)
        log = self.sleep_log
        if log is not None:
            log.node_removed(-1, task, task, False)

    def _set_wait(self, task: int, wait: int) -> None:
        if wait:
            self.pfault_wait[task] = wait
        else:
            self.pfault_wait.pop(task, None)

    def waiter_woken(self, cpu: int, task: int) -> bool:
        """``schedule()`` returns at once unless the task is still on the list."""
        return self.pfault_wait.get(task, 0) != 1

    def on_context_switch(self, cpu: int, task: int) -> None:
        """``__switch_to``: ``mvc __LC_CURRENT_PID,__TASK_pid`` (-1 for idle, as a u32)."""
        self.lowcore[cpu].current_pid = task & LPP_PID_MASK

    # -- lifecycle -------------------------------------------------------------------------------
    def pfault_cpu_dead(self, cpu: int) -> None:
        """Wake every task on the global list: DONEs are floating, so the dead CPU's own
        sleepers cannot be told apart from the others'."""
        for task in list(self.pfault_list):
            self._set_wait(task, 0)
            self._list_del(task)
            self.stats.cpu_dead_wakes += 1
            self.port.swake_up_one(task)

    def boot(self) -> None:
        """``pfault_irq_init`` on CPU 0, then each secondary's ``pfault_init``."""
        self.pfault_irq_init()
        for cpu in range(1, self.n_cpus):
            self.pfault_init(cpu)  # smp_init_secondary: rc ignored

    def cpu_offline(self, cpu: int) -> None:
        """``__cpu_disable`` (``pfault_fini`` on the dying CPU, which then only runs idle),
        then the ``CPUHP_S390_PFAULT_DEAD`` teardown on a surviving CPU."""
        self.pfault_fini(cpu)
        self.online[cpu] = False
        self.lowcore[cpu].current_pid = LPP_PID_MASK
        if self.cpu_dead_registered:
            self.pfault_cpu_dead(cpu)

    def cpu_online(self, cpu: int) -> None:
        """``__cpu_up`` from a live CPU: SIGP initial CPU reset of the new one (its vCPU's
        token, queue and pending INIT go), then ``smp_init_secondary`` -> ``pfault_init``."""
        sender = next((c for c in range(self.n_cpus) if self.online[c] and c != cpu), cpu)
        self.port.hypercall(sender, SIGP, sigp_parameter(SIGP_INITIAL_CPU_RESET, cpu))
        self.online[cpu] = True
        self.pfault_init(cpu)

    def reboot(self) -> None:
        """Reboot or kexec: cancel on every online CPU. The driver then stands for the next
        kernel, which in the model never registers the handler."""
        for cpu in range(self.n_cpus):
            if self.online[cpu]:
                self.pfault_fini(cpu)
        self.registered = False
        self.cpu_dead_registered = False

    def counters(self) -> dict[str, int]:
        return counter_dict(self.stats)
