"""``apfsim trace-stats``: read a kernel-format text trace (ours, or one recorded with
``trace-cmd record -e kvm`` / ``perf script`` on a real host) and summarise async PF.

Accepted layouts: ``trace-cmd report`` (``comm-pid [cpu] ts: event: fields``) with its
``-t``, ``-l`` (latency: ``comm-pid cpu+flags ts:``, no brackets) and ``--ts-diff``
(``ts: (+delta) event:``) variants, the raw ftrace buffer (with the irq-flags and tgid
columns) and ``perf script`` (``comm pid [cpu] ts: kvm:event: fields``). A trace recorded
with a counter clock (``trace_clock=x86-tsc`` or ``counter``) has integer timestamps, which
are clock ticks, not ns; they are read as such and the summary says so. Other events are
counted (kvm ones apart) and lines that are no event at all (headers) are counted as
unknown; an async-PF event whose fields do not parse is reported with its line number.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apfsim.trace.formats import APF_EVENTS, WAKE_ALL_TOKEN

__all__ = ["Malformed", "TraceStats", "read_trace", "trace_stats_text"]

# comm, then -pid (trace-cmd, ftrace) or " pid" / " pid/tid" (perf script), an optional
# tgid column, [cpu], optional irq flags, the timestamp, [system:]event:, the fields.
# The CPU is "[cpu]" then optional flags, or (trace-cmd report -l) the CPU number glued to
# the flags ("0d..1."). The timestamp is sec.frac, or an integer count of a counter clock,
# which trace-cmd prints glued to the bracket ("[001]2869274860595:"). --ts-diff adds
# "(+delta)" after the timestamp.
_LINE = re.compile(
    r"^\s*(?P<comm>.*?\S)(?:-|\s+)(?P<pid>\d+)(?:/(?P<tid>\d+))?\s+(?:\(\s*[\d-]+\)\s+)?"
    r"(?:\[(?P<cpu>\d+)\]\s*(?:[^\s:]+\s+)?|(?P<lcpu>\d+)[.a-zA-Z][^\s:]*\s+)"
    r"(?P<ts>\d+(?:\.\d+)?):\s+(?:\(\+\d+\)\s+)?(?:(?P<sys>\w+):)?(?P<event>\w+):"
    r"(?P<fields>.*)$"
)
_HEX = r"(0x[0-9a-fA-F]+|0)"
_TYPE = r"(?:,? type = (?:kernel|user))?"  # the Kalyazin RFC (2024) adds the fault's mode
_FIELDS = {
    "kvm_try_async_get_page": re.compile(rf"gva = {_HEX}, gfn = {_HEX}{_TYPE}$"),
    "kvm_async_pf_repeated_fault": re.compile(rf"gva = {_HEX}, gfn = {_HEX}{_TYPE}$"),
    "kvm_async_pf_not_present": re.compile(rf"token {_HEX} gva {_HEX}{_TYPE}$"),
    "kvm_async_pf_ready": re.compile(rf"token {_HEX} gva {_HEX}{_TYPE}$"),
    "kvm_async_pf_completed": re.compile(rf"gva {_HEX} address {_HEX}(?: pfn {_HEX})?$"),
}
_ALIASES = {"kvm_async_pf_doublefault": "kvm_async_pf_repeated_fault"}  # <= 3.x name
_OTHER_KVM = ("kvm_entry", "kvm_exit")
MAX_MALFORMED_KEPT = 100
MAX_TS_NS = (1 << 63) - 1  # the kernel's u64 clock as numpy's int64 holds it: ~292 years
MAX_TID = (1 << 31) - 1  # pid_t
MAX_TOKEN = (1 << 64) - 1  # the tracepoints' u64 token


@dataclass(frozen=True, slots=True)
class Malformed:
    line_no: int
    reason: str
    text: str


@dataclass
class TraceStats:
    """What one pass over a trace found."""

    lines: int = 0
    events: Counter[str] = field(default_factory=Counter)
    other_kvm_events: int = 0  # kvm events other than APF and entry/exit (kvm_msr, ...)
    other_events: int = 0  # events of other systems (sched_switch, ...)
    unknown_lines: int = 0  # not an event line: headers, blank lines
    ticks: bool | None = None  # timestamps are counter-clock ticks (None: no timestamp yet)
    malformed: list[Malformed] = field(default_factory=list)
    malformed_count: int = 0
    wake_all: int = 0
    ready_without_not_present: int = 0
    latencies_ns: dict[int, list[int]] = field(default_factory=dict)  # per vCPU thread id
    in_flight: dict[int, int] = field(default_factory=dict)  # not-present never ready
    thread_names: dict[int, str] = field(default_factory=dict)  # pid -> "comm-pid"
    first_ts_ns: int | None = None  # of any event, not only APF ones (ticks if ``ticks``)
    last_ts_ns: int | None = None

    @property
    def kvm_events(self) -> int:
        """Every kvm event read, async PF or not."""
        return sum(self.events.values()) + self.other_kvm_events

    @property
    def unit(self) -> str:
        """What the timestamps count: ``ns``, or ``ticks`` of an x86-tsc/counter clock."""
        return "ticks" if self.ticks else "ns"

    @property
    def repeated_faults(self) -> int:
        return self.events["kvm_async_pf_repeated_fault"]

    def latency_summary(self) -> dict[str, dict[str, Any]]:
        """Per vCPU thread: count and not-present -> ready percentiles in µs (in clock
        ticks for a counter-clock trace, which has no known frequency)."""
        scale = 1.0 if self.ticks else 1000.0
        out: dict[str, dict[str, Any]] = {}
        for tid in sorted(self.latencies_ns):
            values = np.asarray(self.latencies_ns[tid], dtype=np.int64)
            row: dict[str, Any] = {"count": len(values)}
            if len(values):
                qs = np.percentile(values, [0, 50, 90, 99, 100]) / scale
                for name, v in zip(("min", "p50", "p90", "p99", "max"), qs, strict=True):
                    row[name] = round(float(v), 3)
                row["mean"] = round(float(values.mean()) / scale, 3)
            row["in_flight_at_end"] = self.in_flight.get(tid, 0)
            out[self.thread_names.get(tid, str(tid))] = row
        return out

    def span(self) -> int | float | None:
        """From the first event to the last (of any kind): s, or ticks."""
        if self.first_ts_ns is None or self.last_ts_ns is None:
            return None
        if self.ticks:
            return self.last_ts_ns - self.first_ts_ns
        return round((self.last_ts_ns - self.first_ts_ns) / 1e9, 9)

    def to_dict(self) -> dict[str, Any]:
        span = self.span()
        return {
            "lines": self.lines,
            "events": {name: self.events[name] for name in (*APF_EVENTS, *_OTHER_KVM)},
            "wake_all": self.wake_all,
            "repeated_faults": self.repeated_faults,
            "ready_without_not_present": self.ready_without_not_present,
            "other_kvm_events": self.other_kvm_events,
            "other_events": self.other_events,
            "unknown_lines": self.unknown_lines,
            "malformed_lines": self.malformed_count,
            "timestamps": "clock ticks" if self.ticks else "seconds",
            f"not_present_to_ready_{'ticks' if self.ticks else 'us'}": self.latency_summary(),
            "span_s": None if self.ticks else span,
            **({"span_ticks": span} if self.ticks else {}),
        }


def _ts_ns(text: str) -> int | None:
    """The timestamp in ns, None past MAX_TS_NS (checked on the digits' count first, so a
    number of any length costs no more than its scan). An integer (a counter clock's
    ticks) is returned as it is."""
    sec, dot, frac = text.partition(".")
    if not dot:
        return _bounded_int(sec, 10, MAX_TS_NS)
    sec = sec.lstrip("0")
    if len(sec) > len(str(MAX_TS_NS // 1_000_000_000)):
        return None
    ns = int(sec or "0") * 1_000_000_000 + int((frac + "000000000")[:9])
    return ns if ns <= MAX_TS_NS else None


def _bounded_int(text: str, base: int, limit: int) -> int | None:
    """``int(text, base)`` if it is at most ``limit`` (None otherwise, whatever its length)."""
    digits = text.lower().removeprefix("0x").lstrip("0") if base == 16 else text.lstrip("0")
    width = len(format(limit, "x" if base == 16 else "d"))
    if len(digits) > width:
        return None
    value = int(digits or "0", base)
    return value if value <= limit else None


def read_trace(lines: Iterable[str]) -> TraceStats:
    """One streaming pass: counts, pairing of not-present with ready per vCPU thread."""
    stats = TraceStats()
    pending: dict[tuple[int, int], int] = {}  # (thread id, token) -> not-present ts
    for line_no, raw in enumerate(lines, start=1):
        stats.lines += 1
        line = raw.rstrip("\n")
        m = _LINE.match(line)
        if m is None:
            if any(name in line for name in APF_EVENTS):
                _malformed(stats, line_no, "not in trace-cmd/ftrace/perf-script layout", line)
            else:
                stats.unknown_lines += 1
            continue
        event = _ALIASES.get(m["event"], m["event"])
        pattern = _FIELDS.get(event)
        ts = _ts_ns(m["ts"])
        ticks = "." not in m["ts"]
        if ts is not None and stats.ticks is not None and ticks != stats.ticks:
            unit = "clock ticks" if ticks else "seconds"
            _malformed(stats, line_no, f"timestamp in {unit}, unlike the lines before", line)
            continue
        if pattern is None:
            if event in _OTHER_KVM:
                stats.events[event] += 1
            elif (m["sys"] or "kvm") == "kvm" and event.startswith("kvm"):
                stats.other_kvm_events += 1
            else:
                stats.other_events += 1
            if ts is not None:
                _span(stats, ts, ticks)
            continue
        fm = pattern.match(m["fields"].strip())
        if fm is None:
            _malformed(stats, line_no, f"{event}: fields do not match its TP_printk", line)
            continue
        if ts is None:
            _malformed(stats, line_no, f"timestamp {_clip(m['ts'])} is out of range", line)
            continue
        # Pair by thread id: ftrace prints "<...>" for a comm it no longer remembers.
        tid = _bounded_int(m["tid"] or m["pid"], 10, MAX_TID)
        if tid is None:
            bad = _clip(m["tid"] or m["pid"])
            _malformed(stats, line_no, f"thread id {bad} is out of range", line)
            continue
        token = 0  # only not-present and ready carry one
        if event in ("kvm_async_pf_not_present", "kvm_async_pf_ready"):
            parsed = _bounded_int(fm[1], 16, MAX_TOKEN)
            if parsed is None:
                _malformed(stats, line_no, f"{event}: token {_clip(fm[1])} exceeds 64 bits", line)
                continue
            token = parsed
        start = None
        if event == "kvm_async_pf_ready" and token != WAKE_ALL_TOKEN:
            start = pending.get((tid, token))
            if start is not None and ts < start:
                _malformed(
                    stats,
                    line_no,
                    f"kvm_async_pf_ready: at {_seconds(ts)} s, before its not-present at "
                    f"{_seconds(start)} s (token {fm[1]}, thread {tid})",
                    line,
                )
                continue
        _span(stats, ts, ticks)
        stats.events[event] += 1
        if tid not in stats.thread_names or stats.thread_names[tid].startswith("<...>"):
            stats.thread_names[tid] = f"{m['comm']}-{tid}"
        if event == "kvm_async_pf_not_present":
            pending[(tid, token)] = ts
        elif event == "kvm_async_pf_ready":
            if token == WAKE_ALL_TOKEN:
                stats.wake_all += 1
                continue
            samples = stats.latencies_ns.setdefault(tid, [])
            if start is None:
                stats.ready_without_not_present += 1
            else:
                del pending[(tid, token)]
                samples.append(ts - start)
    for tid, _token in pending:
        stats.in_flight[tid] = stats.in_flight.get(tid, 0) + 1
        stats.latencies_ns.setdefault(tid, [])
    return stats


def _span(stats: TraceStats, ts: int, ticks: bool) -> None:
    """Widen the trace's span to ``ts`` (trace-cmd merges the per-CPU buffers in time
    order; the raw buffer of one CPU need not be, so min and max)."""
    stats.ticks = ticks
    if stats.first_ts_ns is None or ts < stats.first_ts_ns:
        stats.first_ts_ns = ts
    if stats.last_ts_ns is None or ts > stats.last_ts_ns:
        stats.last_ts_ns = ts


def _clip(digits: str) -> str:
    """A number as a message shows it: at most 20 characters, then how long it was."""
    return digits if len(digits) <= 20 else f"{digits[:12]}... ({len(digits)} characters)"


def _seconds(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _malformed(stats: TraceStats, line_no: int, reason: str, line: str) -> None:
    stats.malformed_count += 1
    if len(stats.malformed) < MAX_MALFORMED_KEPT:
        stats.malformed.append(Malformed(line_no, reason, line[:200]))


def trace_stats_text(stats: TraceStats) -> str:
    """The human-readable summary ``apfsim trace-stats`` prints."""
    d = stats.to_dict()
    span = stats.span()
    if stats.ticks:
        lines = [
            f"{stats.lines} lines, span {span} clock ticks",
            "timestamps are clock ticks (trace_clock x86-tsc or counter), not seconds: "
            "latencies below are in ticks",
        ]
    else:
        lines = [f"{stats.lines} lines, span {span if span is not None else '-'} s"]
    lines.append("[events]")
    for name, count in d["events"].items():
        lines.append(f"  {name:<32}{count:>12}")
    lines.append(f"  {'wake-all (ready, token ~0)':<32}{stats.wake_all:>12}")
    lines.append(f"  {'repeated faults':<32}{stats.repeated_faults:>12}")
    lines.append(f"  {'ready without its not-present':<32}{stats.ready_without_not_present:>12}")
    lines.append(f"  {'other kvm events':<32}{stats.other_kvm_events:>12}")
    lines.append(f"  {'other events':<32}{stats.other_events:>12}")
    lines.append(f"  {'not event lines (headers)':<32}{stats.unknown_lines:>12}")
    lines.append(f"  {'malformed lines':<32}{stats.malformed_count:>12}")
    unit = "clock ticks" if stats.ticks else "us"
    lines.append(f"[not-present -> ready latency per vCPU thread ({unit})]")
    header = ("thread", "count", "min", "p50", "p90", "p99", "max", "in flight")
    lines.append(f"  {header[0]:<24}" + "".join(f"{h:>11}" for h in header[1:]))
    for thread, row in stats.latency_summary().items():
        cells = [str(row["count"])]
        cells += [f"{row[k]:.3f}" if k in row else "-" for k in ("min", "p50", "p90", "p99", "max")]
        cells.append(str(row["in_flight_at_end"]))
        lines.append(f"  {thread:<24}" + "".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)
