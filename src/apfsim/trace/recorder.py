"""The simulation's trace points, fanned out to a Perfetto timeline and a kernel-format
text trace.

The simulator calls a :class:`TraceRecorder` only when tracing was asked for (its hooks
sit behind ``if tracer is not None``), so an untraced run pays one attribute test per
exit, fault and APF event. The ftrace side writes the kernel's own tracepoints at the points
where the kernel emits them:

* ``kvm_try_async_get_page`` / ``kvm_async_pf_repeated_fault``: the host fault path once
  GUP NOWAIT failed and async PF was admissible (``kvm_faultin_pfn`` / ``user_mem_abort``);
* ``kvm_async_pf_not_present``: ``kvm_arch_async_page_not_present``, for every item set up;
* ``kvm_async_pf_completed``: the end of ``async_pf_execute`` (on the kworker);
* ``kvm_async_pf_ready``: ``kvm_arch_async_page_present``, token ``~0`` for wake-all;
* ``kvm_exit`` / ``kvm_entry``: every exit and entry, in the layout of the protocol's arch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import apfsim.trace.formats as formats
from apfsim.guest.sched import CfsRq, Task, TaskState
from apfsim.host.async_pf import AsyncPf, WorkState
from apfsim.metrics.accumulators import TimeCategory, VcpuClock
from apfsim.scenario import MAX_DURATION_S, one_line, short_repr
from apfsim.trace.chrome import ChromeTraceWriter, json_str
from apfsim.trace.formats import ExitReason, c_hex
from apfsim.trace.output import TraceFile, TraceWriteError

if TYPE_CHECKING:
    from apfsim.guest.context import GuestContext
    from apfsim.simulation import Simulation

__all__ = [
    "OPEN_END_NS",
    "TraceOptions",
    "TraceOptionsError",
    "TraceRecorder",
    "TraceWriteError",
    "TracedClock",
]

# Chrome trace processes.
PID_VCPUS, PID_TASKS, PID_HOST = 1, 2, 3

# Synthetic guest PCs for kvm_entry/kvm_exit: the model has no instruction addresses, only
# contexts; vector and entry code sit at their modelled offset from VBAR_EL1 / the IDT stubs.
_ARM64_VBAR = 0xFFFF_8000_1001_0000
_ARM64_KERNEL_PC = 0xFFFF_8000_1020_0000
_ARM64_USER_PC = 0x0000_AAAA_C000_1000
_X86_IDT_STUBS = 0xFFFF_FFFF_81A0_0000
_X86_KERNEL_PC = 0xFFFF_FFFF_8100_0000
_X86_USER_PC = 0x0040_1000
# The host virtual address QEMU maps guest RAM at (kvm_async_pf_completed's ``address``).
_HVA_BASE = 0x7F00_0000_0000

_CATEGORY_LABEL = {
    TimeCategory.GUEST_KERNEL: json_str("guest kernel"),
    TimeCategory.IDLE: json_str("guest idle (WFI)"),
    TimeCategory.APF_HALT: json_str("halted: waiting for a page"),
    TimeCategory.SYNC_FAULT: json_str("blocked: synchronous fault-in"),
}
_HOST_LABEL = json_str("host")
_RUNNING, _RUNNABLE = json_str("running"), json_str("runnable")
# Slice names carry no token (it is in args), so a viewer can sum a name's time.
_ASLEEP_ON_APF, _HALTED_ON_APF = json_str("asleep on APF"), json_str("halted on APF")
_NOT_PRESENT, _PAGE_READY = json_str("not-present"), json_str("page-ready")
_REPEATED = json_str("repeated fault")
MAX_PENDING_FLOWS = 8192


OPEN_END_NS = 1 << 62  # a window without an END
_MAX_START_NS = round(MAX_DURATION_S * 1e9)


class TraceOptionsError(ValueError):
    """Tracing options that cannot be used; the one-line message names the flag (as
    ``apfsim run`` prints it) and what is allowed."""


def _window_text(window: tuple[int, int]) -> str:
    """``(30e9, 31e9)`` -> ``"30:31"``; an open end is left empty (``"30:"``)."""
    start, end = window
    return f"{start / 1e9:g}:" + ("" if end >= OPEN_END_NS else f"{end / 1e9:g}")


@dataclass(frozen=True, slots=True)
class TraceOptions:
    """Where to write (a Chrome/Perfetto JSON file, a kernel-format text file, or both),
    the window ``[start_ns, end_ns)`` of simulated time to keep, and the text's layout:
    µs timestamps as ``trace-cmd report`` prints them (``ftrace_ns``: ns, as ``-t``) and
    the kernel version whose x86 ``kvm_entry``/``kvm_exit`` fields to write. Options that
    cannot be used raise :class:`TraceOptionsError` (the message ``apfsim run`` prints)."""

    chrome: Path | None = None
    ftrace: Path | None = None
    window: tuple[int, int] = (0, OPEN_END_NS)
    ftrace_ns: bool = False
    kernel: tuple[int, int] = formats.KERNEL_DEFAULT

    def __post_init__(self) -> None:
        start, end = self.window
        if not 0 <= start < end or start > _MAX_START_NS:
            raise TraceOptionsError(
                f"--trace-window: need 0 <= START < END (got {_window_text(self.window)})"
            )
        if not self.enabled and self.window != (0, OPEN_END_NS):
            raise TraceOptionsError("--trace-window: give --trace or --ftrace too")
        if self.ftrace is None and (self.ftrace_ns or self.kernel != formats.KERNEL_DEFAULT):
            flag = "--ftrace-ns" if self.ftrace_ns else "--ftrace-kernel"
            raise TraceOptionsError(f"{flag}: give --ftrace too")
        try:
            formats.parse_kernel(".".join(map(str, self.kernel)))
        except ValueError as err:
            raise TraceOptionsError(f"--ftrace-kernel: {err}") from None

    @classmethod
    def from_flags(
        cls,
        chrome: Path | None = None,
        ftrace: Path | None = None,
        window: str | None = None,
        ftrace_ns: bool = False,
        kernel: str | None = None,
    ) -> TraceOptions:
        """The options of ``apfsim run``'s flags: ``window`` as ``START:END`` in simulated
        seconds (either side may be empty), ``kernel`` as ``6.1``."""
        if ftrace is None and (ftrace_ns or kernel is not None):
            flag = "--ftrace-ns" if ftrace_ns else "--ftrace-kernel"
            raise TraceOptionsError(f"{flag}: give --ftrace too")
        if chrome is None and ftrace is None and window is not None:
            raise TraceOptionsError("--trace-window: give --trace or --ftrace too")
        layout = formats.KERNEL_DEFAULT
        if kernel is not None:
            try:
                layout = formats.parse_kernel(kernel)
            except ValueError as err:
                raise TraceOptionsError(f"--ftrace-kernel: {err}") from None
        span = (0, OPEN_END_NS) if window is None else cls.parse_window(window)
        return cls(chrome, ftrace, span, ftrace_ns, layout)

    @staticmethod
    def parse_window(text: str) -> tuple[int, int]:
        """``"30:31"`` -> ``(30e9, 31e9)`` ns, ``"30:"`` -> ``(30e9, OPEN_END_NS)``."""
        start_text, sep, end_text = text.partition(":")
        try:
            if not sep:
                raise ValueError
            start = float(start_text) if start_text.strip() else 0.0
            end = float(end_text) if end_text.strip() else math.inf
        except ValueError:
            raise TraceOptionsError(
                "--trace-window: expected START:END in simulated seconds, like 30:31 or 30: "
                f"(got {short_repr(text)})"
            ) from None
        bad_end = end_text.strip() and not math.isfinite(end)  # an empty END is open
        if not (math.isfinite(start) and 0 <= start <= MAX_DURATION_S) or bad_end:
            raise TraceOptionsError(f"--trace-window: need 0 <= START < END (got {one_line(text)})")
        return round(start * 1e9), round(min(end * 1e9, OPEN_END_NS))

    @property
    def enabled(self) -> bool:
        return self.chrome is not None or self.ftrace is not None

    def check_duration(self, duration_s: float) -> None:
        """Refuse a window that starts at or after the run's end: its trace would be empty."""
        start_s = self.window[0] / 1e9
        if self.enabled and start_s >= duration_s:
            raise TraceOptionsError(
                f"--trace-window: starts at {start_s:g} s but the run lasts {duration_s:g} s "
                f"(--duration or the scenario's duration_s); give a window within "
                f"0:{duration_s:g}"
            )

    def for_run(self, protocol: str, seed: int | None = None) -> TraceOptions:
        """The files of one run among several: ``t.json`` -> ``t.x86.json`` (and
        ``t.x86.s3.json`` for seed 3 when ``seed`` is given)."""
        tag = protocol if seed is None else f"{protocol}.s{seed}"

        def tagged(path: Path | None) -> Path | None:
            return None if path is None else path.with_name(f"{path.stem}.{tag}{path.suffix}")

        return replace(self, chrome=tagged(self.chrome), ftrace=tagged(self.ftrace))


class TracedClock(VcpuClock):
    """A vCPU clock that also draws the vCPU's state track: one slice per change of what
    the vCPU does (the task it runs, guest kernel, idle, halted, blocked, an exit)."""

    __slots__ = ("_label", "_recorder", "_start", "_vcpu")

    def __init__(self, recorder: TraceRecorder, vcpu: int, old: VcpuClock) -> None:
        super().__init__()
        self.totals[:] = old.totals
        self.category, self.since = old.category, old.since
        self._recorder = recorder
        self._vcpu = vcpu
        self._label = _HOST_LABEL
        self._start = old.since

    def switch(self, category: TimeCategory, now: int) -> None:
        VcpuClock.switch(self, category, now)
        label = self._recorder.vcpu_label(self._vcpu, category)
        if label is not self._label:
            self._recorder.vcpu_slice(self._vcpu, self._label, self._start, now)
            self._label = label
            self._start = now

    def close(self, now: int) -> None:
        VcpuClock.close(self, now)
        self._recorder.vcpu_slice(self._vcpu, self._label, self._start, now)
        self._start = now


class TraceRecorder:
    """Receives the simulation's trace points and writes the enabled outputs."""

    def __init__(self, sim: Simulation, options: TraceOptions) -> None:
        self.sim = sim
        engine = sim.engine
        self.now: Callable[[], int] = lambda: engine.now
        self.arch = sim.arch  # the kvm_entry / kvm_exit layout of the run's arch
        self.vector_ctx = sim.contexts.vector
        self.window = options.window
        self.ftrace_ns, self.kernel = options.ftrace_ns, options.kernel
        n = len(sim.vcpus)
        self._exit_label = [_HOST_LABEL] * n
        self._reason_label = {
            r: json_str(
                "exit: "
                + (formats.KVM_ARM_EXIT[r][2] if self.arch == "arm64" else formats.KVM_X86_EXIT[r])
            )
            for r in ExitReason
        }
        self._reason_label[ExitReason.IRQ] = json_str(
            "exit: IRQ" if self.arch == "arm64" else "exit: EXTERNAL_INTERRUPT"
        )
        self._task_label = [json_str(t.name) for t in sim.tasks]
        # One async track per vCPU: viewers group b/e events by name within a process.
        self._apf_name = [json_str(f"APF in flight (vCPU {v})") for v in range(n)]
        self.chrome: ChromeTraceWriter | None = None
        self.ftrace: TraceFile | None = None
        self._ftrace_buf: list[str] = []
        if options.chrome is not None:
            self.chrome = ChromeTraceWriter(
                options.chrome,
                self.window,
                {"protocol": sim.protocol, "seed": sim.seed, "generator": "apfsim"},
            )
            self._chrome_tracks()
        if options.ftrace is not None:
            self.ftrace = TraceFile(options.ftrace, "--ftrace")
            self.ftrace.write(f"cpus={n}\n")
        # Chrome state: open async slices, flows waiting for their wake-up, task tracks.
        self._serial = 0
        self._open: dict[AsyncPf, tuple[int, int]] = {}  # work -> (serial, start)
        self._by_token: dict[tuple[int, int], int] = {}  # (vcpu, token) -> serial
        self._flows: dict[int, list[int]] = {}  # serial -> [vcpu, not-present ts, ready ts]
        self._waits: dict[int, tuple[int, str, str]] = {}  # tid -> (serial or -1, label, args)
        self._task_slice: list[tuple[str, int, str] | None] = [None] * len(sim.tasks)
        self._counters: dict[str, int] = {}  # last written inside the window
        self._values: dict[str, tuple[str, int]] = {}  # last sampled: name -> (key, value)
        self._window_open = False

    # -- setup ------------------------------------------------------------------------------
    def _chrome_tracks(self) -> None:
        chrome = self.chrome
        assert chrome is not None
        chrome.name_process(PID_VCPUS, f"vCPUs ({self.sim.protocol})", 1)
        for v in range(len(self.sim.vcpus)):
            chrome.name_thread(PID_VCPUS, 2 * v + 1, f"vCPU {v}")
            chrome.name_thread(PID_VCPUS, 2 * v + 2, f"vCPU {v}: APF signals")
        chrome.name_process(PID_TASKS, "guest tasks", 2)
        for task in self.sim.tasks:
            chrome.name_thread(PID_TASKS, task.tid + 1, f"{task.name} (cpu {task.cpu})")
        chrome.name_process(PID_HOST, "host", 3)

    def install(self) -> None:
        """Hook the vCPU clocks, the runqueues and the swap device of the simulation."""
        sim = self.sim
        if self.chrome is not None:
            for vcpu in sim.vcpus:
                vcpu.clock = TracedClock(self, vcpu.index, vcpu.clock)
            for cpu in sim.cpus:
                if isinstance(cpu.rq, CfsRq):
                    cpu.rq.on_state = self.task_state
            for task in sim.tasks:
                self.task_state(task)
            sim.device.on_queue_change = self._queue_changed
            self.sample_counters()

    # -- vCPU tracks --------------------------------------------------------------------------
    def vcpu_label(self, vcpu: int, category: TimeCategory) -> str:
        if category is TimeCategory.TASK:
            current = self.sim.cpus[vcpu].current
            return self._task_label[current.tid] if current is not None else _HOST_LABEL
        if category is TimeCategory.HOST:
            return self._exit_label[vcpu]
        return _CATEGORY_LABEL[category]

    def vcpu_slice(self, vcpu: int, label: str, start: int, end: int) -> None:
        if self.chrome is not None and end > start:
            self.chrome.slice(PID_VCPUS, 2 * vcpu + 1, label, start, end)

    def kvm_exit(self, vcpu: int, reason: ExitReason, ctx: GuestContext) -> None:
        """The vCPU left the guest (called before the clock switches to host time)."""
        self._exit_label[vcpu] = self._reason_label[reason]
        if self.ftrace is not None:
            now = self.now()
            if self.window[0] <= now < self.window[1]:
                if self.arch == "arm64":
                    fields = formats.kvm_exit_arm64(reason, self._pc(ctx))
                else:
                    fields = formats.kvm_exit_x86(vcpu, reason, self._pc(ctx), self.kernel)
                self._vcpu_line(vcpu, now, "kvm_exit", fields)
        if reason is ExitReason.DABT and self.chrome is not None:
            self.sample_counters()

    def kvm_entry(self, vcpu: int, ctx: GuestContext) -> None:
        if self.ftrace is None:
            return
        now = self.now()
        if self.window[0] <= now < self.window[1]:
            pc = self._pc(ctx)
            fields = (
                formats.kvm_entry_arm64(pc)
                if self.arch == "arm64"
                else formats.kvm_entry_x86(vcpu, pc, self.kernel)
            )
            self._vcpu_line(vcpu, now, "kvm_entry", fields)

    def _pc(self, ctx: GuestContext) -> int:
        arm = self.arch == "arm64"
        if ctx.pc_offset is not None:
            return (_ARM64_VBAR if arm else _X86_IDT_STUBS) + ctx.pc_offset
        if not ctx.privileged:
            return _ARM64_USER_PC if arm else _X86_USER_PC
        return _ARM64_KERNEL_PC if arm else _X86_KERNEL_PC

    # -- the APF lifecycle ------------------------------------------------------------------
    def try_async(self, vcpu: int, gfn: int, repeated: bool) -> None:
        """``kvm_try_async_get_page`` (APF was admissible), and
        ``kvm_async_pf_repeated_fault`` when the gfn was already outstanding."""
        gva = gfn << 12
        now = self.now()
        if self.ftrace is not None and self.window[0] <= now < self.window[1]:
            self._vcpu_line(
                vcpu, now, "kvm_try_async_get_page", formats.kvm_try_async_get_page(gva, gfn)
            )
        if repeated:
            if self.ftrace is not None and self.window[0] <= now < self.window[1]:
                self._vcpu_line(
                    vcpu,
                    now,
                    "kvm_async_pf_repeated_fault",
                    formats.kvm_async_pf_repeated_fault(gva, gfn),
                )
            if self.chrome is not None:
                self.chrome.marker(PID_VCPUS, 2 * vcpu + 2, _REPEATED, now, f'{{"gfn":"{gfn:#x}"}}')

    def spin_refaults(self, vcpu: int, gfn: int, since: int, count: int, every: int) -> None:
        """The re-faults of a repeated-fault loop (arm64 has no artificial halt), one pair of
        lines each, at the times they happened (written when the loop ends)."""
        if self.ftrace is None:
            return
        gva = gfn << 12
        try_fields = formats.kvm_try_async_get_page(gva, gfn)
        repeated_fields = formats.kvm_async_pf_repeated_fault(gva, gfn)
        for i in range(count):
            ts = since + i * every
            if self.window[0] <= ts < self.window[1]:
                self._vcpu_line(vcpu, ts, "kvm_try_async_get_page", try_fields)
                self._vcpu_line(vcpu, ts, "kvm_async_pf_repeated_fault", repeated_fields)

    def apf_setup(self, work: AsyncPf) -> None:
        """``kvm_arch_async_page_not_present`` for a new item."""
        now = self.now()
        vcpu = work.vcpu_id
        if self.ftrace is not None and self.window[0] <= now < self.window[1]:
            fields = formats.kvm_async_pf_not_present(work.token, work.cr2_or_gpa)
            self._vcpu_line(vcpu, now, "kvm_async_pf_not_present", fields)
        chrome = self.chrome
        if chrome is None:
            return
        self._serial += 1
        serial = self._serial
        self._open[work] = (serial, now)
        self._by_token[(vcpu, work.token)] = serial
        self._flows[serial] = [vcpu, now, -1]
        if len(self._flows) > MAX_PENDING_FLOWS:
            del self._flows[next(iter(self._flows))]
        chrome.marker(
            PID_VCPUS,
            2 * vcpu + 2,
            _NOT_PRESENT,
            now,
            f'{{"token":"{c_hex(work.token)}","gfn":"{work.gfn:#x}","serial":{serial}}}',
        )
        self.sample_counters()

    def apf_completed(self, work: AsyncPf) -> None:
        """``kvm_async_pf_completed`` at the end of the worker's GUP."""
        now = self.now()
        if self.ftrace is not None and self.window[0] <= now < self.window[1]:
            fields = formats.kvm_async_pf_completed(_HVA_BASE + (work.gfn << 12), work.cr2_or_gpa)
            v = work.vcpu_id
            self.ftrace_line(f"kworker/{v}:1", 200 + v, v, now, "kvm_async_pf_completed", fields)
        if self.chrome is not None:
            if work.state is WorkState.CANCELLED:
                self._end_async(work, now, "cancelled")
            self.sample_counters()

    def apf_ready(self, vcpu: int, work: AsyncPf) -> None:
        """``kvm_arch_async_page_present`` for one item dequeued at this run-loop iteration."""
        now = self.now()
        token = formats.WAKE_ALL_TOKEN if work.wakeup_all else work.token
        gva = 0 if work.wakeup_all else work.cr2_or_gpa
        if self.ftrace is not None and self.window[0] <= now < self.window[1]:
            self._vcpu_line(vcpu, now, "kvm_async_pf_ready", formats.kvm_async_pf_ready(token, gva))
        chrome = self.chrome
        if chrome is None:
            return
        if work.wakeup_all:
            chrome.marker(PID_VCPUS, 2 * vcpu + 2, json_str("page-ready: wake all"), now)
            return
        serial = self._end_async(work, now, "delivered")
        chrome.marker(PID_VCPUS, 2 * vcpu + 2, _PAGE_READY, now, f'{{"token":"{c_hex(token)}"}}')
        if serial is not None:
            flow = self._flows.get(serial)
            if flow is not None:
                if work.notpresent_injected:
                    flow[2] = now
                else:
                    del self._flows[serial]  # a halt, not a signal: no task waits on it
        self.sample_counters()

    def _end_async(self, work: AsyncPf, now: int, how: str) -> int | None:
        opened = self._open.pop(work, None)
        if opened is None or self.chrome is None:
            return None
        serial, start = opened
        key = (work.vcpu_id, work.token)
        if self._by_token.get(key) == serial:
            del self._by_token[key]  # bounded by the APFs in flight, not by the run
        self.chrome.async_span(
            PID_VCPUS,
            2 * work.vcpu_id + 1,
            serial,
            self._apf_name[work.vcpu_id],
            start,
            now,
            f'{{"token":"{c_hex(work.token)}","gfn":"{work.gfn:#x}","end":"{how}"}}',
        )
        return serial

    # -- guest tasks ----------------------------------------------------------------------------
    def apf_wait(self, task: Task, cpu: int, token: int, halted: bool) -> None:
        """The guest parked ``task`` on ``token`` (``kvm_async_pf_wait``)."""
        if self.chrome is None:
            return
        serial = self._by_token.get((cpu, token), -1)
        label = _HALTED_ON_APF if halted else _ASLEEP_ON_APF
        self._waits[task.tid] = (serial, label, f'{{"token":"{c_hex(token)}"}}')
        if halted:
            self.task_state(task)

    def task_state(self, task: Task) -> None:
        """Close the task's current slice and open the one its new state starts."""
        if self.chrome is None:
            return
        now = self.now()
        state = task.state
        args = ""
        if state is TaskState.RUNNING:
            label = _RUNNING
        elif state is TaskState.RUNNABLE:
            label = _RUNNABLE
        elif state is TaskState.DONE:
            label = ""
        else:
            wait = self._waits.get(task.tid)
            label, args = (wait[1], wait[2]) if wait is not None else (json_str(state.value), "")
        current = self._task_slice[task.tid]
        if current is not None and current[0] is label and current[2] == args:
            return
        if current is not None:
            self.chrome.slice(PID_TASKS, task.tid + 1, current[0], current[1], now, current[2])
        self._task_slice[task.tid] = (label, now, args) if label else None

    def task_woken(self, task: Task) -> None:
        """The task's wait ended: a wake-up marker, and its flow from the not-present."""
        chrome = self.chrome
        if chrome is None:
            return
        now = self.now()
        chrome.marker(PID_TASKS, task.tid + 1, json_str("wake-up"), now)
        wait = self._waits.pop(task.tid, None)
        if wait is None:
            return
        flow = self._flows.pop(wait[0], None)
        if flow is None:
            return
        serial, vcpu = wait[0], flow[0]
        points = [(PID_VCPUS, 2 * vcpu + 2, flow[1])]
        if flow[2] >= 0:
            points.append((PID_VCPUS, 2 * vcpu + 2, flow[2]))
        points.append((PID_TASKS, task.tid + 1, now))
        chrome.flow(serial, points)

    # -- counters -------------------------------------------------------------------------------
    def _queue_changed(self, now: int, depth: int) -> None:
        self._counter("swap queue", "depth", depth, now)
        self._counter("resident", "pages", int(self.sim.memory.resident), now)

    def sample_counters(self) -> None:
        sim = self.sim
        now = self.now()
        self._counter("resident", "pages", int(sim.memory.resident), now)
        self._counter("swap queue", "depth", sim.device.queue_length, now)
        apf = getattr(sim.host_protocol, "apf", None)
        if apf is not None:
            for v, state in enumerate(apf):
                self._counter(f"vCPU {v} APFs", "outstanding", state.queued, now)

    def _counter(self, name: str, key: str, value: int, now: int) -> None:
        """A counter track: Perfetto names it ``name key`` ("resident pages"), DevTools
        ``name`` with a series ``key``; so the two read as one phrase, never a unit twice."""
        chrome = self.chrome
        if chrome is None:
            return
        self._values[name] = (key, value)
        if not chrome.inside(now):
            return
        if not self._window_open:
            # The first sample in the window: every counter's value as the window opens.
            self._window_open = True
            start = max(self.window[0], 0)
            for other, (other_key, other_value) in self._values.items():
                self._counters[other] = other_value
                chrome.counter(PID_HOST, json_str(other), start, f'{{"{other_key}":{other_value}}}')
            return
        if self._counters.get(name) == value:
            return
        self._counters[name] = value
        chrome.counter(PID_HOST, json_str(name), now, f'{{"{key}":{value}}}')

    # -- text lines -----------------------------------------------------------------------------
    def _vcpu_line(self, vcpu: int, now: int, event: str, fields: str) -> None:
        self.ftrace_line(f"CPU {vcpu}/KVM", 4000 + vcpu, vcpu, now, event, fields)

    def ftrace_line(self, comm: str, pid: int, cpu: int, now: int, event: str, fields: str) -> None:
        self._ftrace_buf.append(
            formats.format_line(comm, pid, cpu, now, event, fields, self.ftrace_ns)
        )
        if len(self._ftrace_buf) >= 4096 and self.ftrace is not None:
            self.ftrace.write("".join(self._ftrace_buf))
            self._ftrace_buf.clear()

    # -- end ---------------------------------------------------------------------------------------
    def close(self, now: int) -> None:
        """End open slices at ``now`` and finish both files (after the vCPU clocks closed).
        Both are closed even if one cannot be written; then the first error is raised."""
        failed: TraceWriteError | None = None
        if self.chrome is not None:
            try:
                for work in list(self._open):
                    self._end_async(work, now, "in flight at end")
                for task in self.sim.tasks:
                    current = self._task_slice[task.tid]
                    if current is not None:
                        self.chrome.slice(
                            PID_TASKS, task.tid + 1, current[0], current[1], now, current[2]
                        )
                        self._task_slice[task.tid] = None
                self.chrome.close()
            except TraceWriteError as err:
                failed = err
                self.chrome.close()  # the file only: its writes are off after the failure
        if self.ftrace is not None:
            for finish in (self.ftrace_flush, self.ftrace.close):
                try:
                    finish()
                except TraceWriteError as err:
                    failed = failed or err
        if failed is not None:
            raise failed

    def ftrace_flush(self) -> None:
        """Write the buffered text lines."""
        if self.ftrace is not None:
            text = "".join(self._ftrace_buf)
            self._ftrace_buf.clear()
            self.ftrace.write(text)
