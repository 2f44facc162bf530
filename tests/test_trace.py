"""Tracing: Chrome/Perfetto JSON and kernel-format text, and trace-stats reading both ours
and real-host layouts."""

from __future__ import annotations

import errno
import io
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import apfsim
from apfsim.cli import main
from apfsim.metrics.results import ProtocolResult
from apfsim.registry import PROTOCOLS
from apfsim.simulation import Simulation
from apfsim.trace import TraceOptions, read_trace
from apfsim.trace import formats as tp
from apfsim.trace.formats import ExitReason
from apfsim.trace.hooks import traced_simulation

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import assert_one_line_error
from trace_rules import check_trace


def small_scenario() -> apfsim.Scenario:
    """Two vCPUs, two faulting writers (some kernel-mode accesses) and two compute tasks."""
    return apfsim.Scenario.model_validate(
        {
            "name": "trace-small",
            "duration_s": 3.0,
            "guest": {"vcpus": 2, "memory_mib": 96, "reserved_mib": 8},
            "host": {"memory_limit_mib": 48},
            "initial_memory": {"resident_fraction": 0.5, "swapped_fraction": 0.5},
            "tasks": [
                {"kind": "random_writer", "buffer_mib": 40, "count": 2, "kernel_fraction": 0.2},
                {"kind": "compute", "count": 2},
            ],
        }
    )


def traced(
    tmp_path: Path, protocol: str, window: tuple[int, int] = (0, 1 << 62)
) -> tuple[ProtocolResult, dict[str, Any], Path]:
    # ns timestamps (--ftrace-ns): the latencies parsed back are then exact.
    options = TraceOptions(tmp_path / "t.json", tmp_path / "t.txt", window, ftrace_ns=True)
    result = traced_simulation(small_scenario(), protocol, 0, True, options).run()
    doc = json.loads((tmp_path / "t.json").read_text())
    return result, doc, tmp_path / "t.txt"


# -- the formats ------------------------------------------------------------------------------


def test_tp_printk_formats_match_the_kernel_including_c_hex_of_zero() -> None:
    assert tp.c_hex(0) == "0" and tp.c_hex(0x10) == "0x10"
    assert tp.kvm_try_async_get_page(0x1000, 1) == "gva = 0x1000, gfn = 0x1"
    assert tp.kvm_async_pf_repeated_fault(0, 0) == "gva = 0, gfn = 0"
    assert tp.kvm_async_pf_not_present(0, 0x2000) == "token 0 gva 0x2000"
    assert tp.kvm_async_pf_ready(0xFFFFFFFF, 0) == "token 0xffffffff gva 0"
    assert tp.kvm_async_pf_completed(0x7F0000001000, 0x1000) == "gva 0x1000 address 0x7f0000001000"
    assert tp.kvm_entry_arm64(0x10) == "PC: 0x0000000000000010"
    assert (
        tp.kvm_exit_arm64(ExitReason.DABT, 0xFFFF800010200000)
        == "TRAP: HSR_EC: 0x0024 (DABT_LOW), PC: 0xffff800010200000"
    )
    assert tp.kvm_exit_arm64(ExitReason.IRQ, 0).startswith("IRQ: HSR_EC: 0x0000 (UNKNOWN)")
    assert tp.kvm_entry_x86(1, 0x401000, (5, 10)) == "vcpu 1, rip 0x401000"
    assert tp.kvm_exit_x86(0, ExitReason.WFX, 0x10, (5, 10)) == (
        "vcpu 0 reason HLT rip 0x10 info1 0x0000000000000000 info2 0x0000000000000000 "
        "intr_info 0x00000000 error_code 0x00000000"
    )


def test_line_layout_is_trace_cmd_report() -> None:
    line = tp.format_line("CPU 0/KVM", 4000, 0, 30_224_372_551, "kvm_async_pf_ready", "x")
    assert line == "       CPU 0/KVM-4000  [000]    30.224373: kvm_async_pf_ready:   x\n"
    line = tp.format_line("CPU 0/KVM", 4000, 0, 30_224_372_551, "kvm_entry", "x", ns=True)
    assert line == "       CPU 0/KVM-4000  [000]    30.224372551: kvm_entry:            x\n"
    # trace-cmd rounds to the nearest µs, carrying into the seconds.
    assert "    31.000000: " in tp.format_line("c", 1, 0, 30_999_999_600, "e", "x")


# -- our traces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "protocol", [p if p == "x86" else pytest.param(p, marks=pytest.mark.slow) for p in PROTOCOLS]
)
def test_tracing_changes_no_result_and_both_outputs_are_consistent(
    tmp_path: Path, protocol: str
) -> None:
    untraced = Simulation(small_scenario(), protocol, 0).run()
    result, doc, text = traced(tmp_path, protocol)
    assert result.to_dict() == untraced.to_dict()
    summary = check_trace(doc)
    # ftrace round trip: the text parses back to the counts in the run's JSON results.
    stats = read_trace(text.read_text().splitlines())
    assert stats.malformed_count == 0
    for name in tp.APF_EVENTS:
        assert stats.events[name] == result.tracepoints[name], name
    assert stats.wake_all == result.tracepoints["wake_all"]
    assert stats.events["kvm_entry"] > 0 and stats.events["kvm_exit"] > 0
    if protocol in ("sync", "memory-fault-exit"):  # no async PF (and no postcopy here)
        assert summary["async_pairs"] == summary["flows"] == 0
        return
    assert result.tracepoints["kvm_async_pf_not_present"] > 0
    # One async slice per APF set up; a flow for every APF a task waited on and was woken.
    assert summary["async_pairs"] == result.tracepoints["kvm_async_pf_not_present"]
    if protocol != "halt-only":
        assert summary["flows"] > 0
        assert summary["flows"] <= result.apf.get("not_present_injected", summary["flows"])
    assert "resident" in summary["counters"] and "swap queue" in summary["counters"]


def test_round_trip_agrees_with_the_protocol_counters(tmp_path: Path) -> None:
    """Independent counts: the host's own counters and the guest-visible latency."""
    result, _, text = traced(tmp_path, "arm64-rfcv2")
    stats = read_trace(text.read_text().splitlines())
    assert stats.events["kvm_async_pf_not_present"] == result.apf["not_present_injected"]
    assert stats.events["kvm_async_pf_repeated_fault"] == result.apf["repeated_faults"]
    assert stats.events["kvm_async_pf_ready"] == result.apf["page_ready_injected"]
    assert stats.wake_all == result.apf["wakeup_all_queued"] == result.apf["wake_all"]
    ready = stats.events["kvm_async_pf_ready"] - stats.wake_all
    assert ready == result.apf["wakes"]  # the guest woke one waiter per page-ready
    assert stats.events["kvm_async_pf_completed"] + sum(stats.in_flight.values()) >= ready
    latency = stats.latency_summary()
    samples = sum(row["count"] for row in latency.values())
    assert samples == result.faults["not_present_to_ready_us"]["count"]
    # RFCv2 injects every not-present, so the pairs are the results' samples: same quantiles.
    all_ns = sorted(v for values in stats.latencies_ns.values() for v in values)
    cdf = result.faults["not_present_to_ready_us"]["cdf_us"]
    quantiles = np.percentile(np.asarray(all_ns), np.arange(0, 101, 5)) / 1000
    assert [round(float(q), 3) for q in quantiles] == cdf


@pytest.mark.parametrize("protocol", ["x86", "halt-only"])
def test_x86_round_trip_agrees_with_the_protocol_counters(tmp_path: Path, protocol: str) -> None:
    """x86 traces not-present before deciding inject or halt, and ready for both."""
    result, _, text = traced(tmp_path, protocol)
    body = text.read_text()
    assert "reason EPT_VIOLATION rip 0x" in body and "kvm_entry:" in body
    assert "HSR_EC" not in body
    stats = read_trace(body.splitlines())
    assert stats.repeated_faults == result.apf["repeated_faults"] > 0
    not_present = result.apf["not_present_injected"] + result.apf["not_present_halted"]
    assert stats.events["kvm_async_pf_not_present"] == not_present > 0
    if protocol == "halt-only":
        assert result.apf["not_present_injected"] == 0
    assert stats.wake_all == result.apf["wakeup_all_queued"]
    # Every not-present is followed by its ready on the same vCPU thread, or is in flight.
    paired = sum(len(v) for v in stats.latencies_ns.values())
    assert paired + sum(stats.in_flight.values()) == not_present
    assert stats.ready_without_not_present == 0


def test_arm64_repeated_fault_loop_traces_every_refault(tmp_path: Path) -> None:
    """RFCv2 has no artificial halt: a fault on an outstanding gfn re-enters and faults
    again; the kernel traces each such fault."""
    scenario = apfsim.Scenario.model_validate(
        {
            "name": "spin",
            "duration_s": 1.0,
            "guest": {"vcpus": 1, "memory_mib": 64, "reserved_mib": 8},
            "host": {"memory_limit_mib": 24},
            "initial_memory": {"resident_fraction": 0.3, "swapped_fraction": 0.7},
            "tasks": [{"kind": "random_writer", "buffer_mib": 4, "count": 3}],
        }
    )
    options = TraceOptions(None, tmp_path / "t.txt")
    result = traced_simulation(scenario, "arm64-rfcv2", 0, True, options).run()
    stats = read_trace((tmp_path / "t.txt").read_text().splitlines())
    loops, refaults = result.apf["repeated_faults"], result.faults["repeated"]
    assert loops > 0 and refaults > loops
    assert stats.repeated_faults == loops + refaults
    assert stats.events["kvm_try_async_get_page"] == (
        stats.events["kvm_async_pf_not_present"] + loops + refaults
    )


def test_fault_lines_come_in_the_kernel_order(tmp_path: Path) -> None:
    """exit (data abort) -> try_async_get_page -> not_present -> entry, on one thread."""
    _, _, text = traced(tmp_path, "arm64-rfcv2")
    lines = [ln for ln in text.read_text().splitlines() if "CPU 0/KVM" in ln]
    events = [ln.split(": ")[1].split(":")[0].strip() for ln in lines]
    seen = 0
    for i, event in enumerate(events):
        if event == "kvm_async_pf_not_present":
            assert events[i - 1] == "kvm_try_async_get_page"
            assert events[i - 2] == "kvm_exit" and "DABT_LOW" in lines[i - 2]
            assert events[i + 1] == "kvm_entry"
            seen += 1
    assert seen > 100


def test_an_aborted_run_still_leaves_valid_trace_files(tmp_path: Path) -> None:
    options = TraceOptions(tmp_path / "t.json", tmp_path / "t.txt")
    sim = traced_simulation(small_scenario(), "arm64-rfcv2", 0, True, options)
    calls = 0

    def interrupt(_: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sim.run(progress=interrupt)
    summary = check_trace(json.loads((tmp_path / "t.json").read_text()))
    assert summary["slices"] > 0 and summary["async_pairs"] > 0
    stats = read_trace((tmp_path / "t.txt").read_text().splitlines())
    assert stats.events["kvm_async_pf_not_present"] > 0 and stats.malformed_count == 0


@pytest.mark.slow
def test_window_keeps_only_its_slice_of_time(tmp_path: Path) -> None:
    window = (1_000_000_000, 1_500_000_000)
    (tmp_path / "full").mkdir()
    _, full, _ = traced(tmp_path / "full", "arm64-rfcv2")
    _, doc, text = traced(tmp_path, "arm64-rfcv2", window)
    summary = check_trace(doc)
    assert summary["slices"] > 0
    start_us, end_us = 1_000_000, 1_500_000
    for ev in doc["traceEvents"]:
        if "ts" in ev:
            assert start_us <= ev["ts"] <= end_us, ev
            assert ev["ts"] < end_us or ev["ph"] == "e", ev  # [START, END)
            assert ev["ts"] + ev.get("dur", 0) <= end_us + 1e-6, ev
    # APFs in flight across the start are clipped to it, not dropped.
    spans: dict[Any, list[float]] = {}
    for ev in full["traceEvents"]:
        if ev["ph"] in "be":
            spans.setdefault(ev["id2"]["local"], []).append(ev["ts"])
    crossing = sum(1 for b, e in spans.values() if b < start_us < e)
    begins = [ev for ev in doc["traceEvents"] if ev["ph"] == "b"]
    assert sum(1 for ev in begins if ev["ts"] == start_us) == crossing
    # Every counter's value as the window opens.
    counters = [ev for ev in doc["traceEvents"] if ev["ph"] == "C"]
    assert {ev["name"] for ev in counters if ev["ts"] == start_us} == set(summary["counters"])
    stats = read_trace(text.read_text().splitlines())
    assert stats.first_ts_ns is not None and stats.last_ts_ns is not None
    assert window[0] <= stats.first_ts_ns and stats.last_ts_ns < window[1]


def test_trace_is_written_while_the_run_goes_on(tmp_path: Path) -> None:
    """Streaming: the file grows during the run, so memory does not hold the trace."""
    options = TraceOptions(tmp_path / "t.json", tmp_path / "t.txt")
    sim = traced_simulation(small_scenario(), "arm64-rfcv2", 0, True, options)
    sizes: list[int] = []
    sim.run(progress=lambda _: sizes.append((tmp_path / "t.json").stat().st_size))
    growing = [b > a for a, b in itertools.pairwise(sizes)]
    assert sum(growing) >= len(growing) // 2 and sizes[-1] > sizes[0]


@pytest.mark.slow
def test_default_scenario_trace_has_every_track_async_pairs_flows_and_counters(
    tmp_path: Path,
) -> None:
    """The acceptance trace: the default scenario around its first async faults."""
    out = tmp_path / "default.json"
    code = main(
        [
            *("run", "-p", "arm64-rfcv2", "--duration", "33", "--quiet"),
            *("--trace", str(out), "--trace-window", "32:33"),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    summary = check_trace(doc)
    names = {
        ev["args"]["name"]
        for ev in doc["traceEvents"]
        if ev["ph"] == "M" and ev["name"] == "thread_name"
    }
    assert {"vCPU 0", "vCPU 0: APF signals", "memhog (cpu 0)", "compute (cpu 0)"} <= names
    assert summary["async_pairs"] > 10 and summary["flows"] > 10
    slice_names = {ev["name"] for ev in doc["traceEvents"] if ev["ph"] == "X"}
    expected = {"exit: DABT_LOW", "exit: IRQ", "running", "runnable", "guest kernel", "memhog"}
    assert expected <= slice_names, expected - slice_names
    # Names carry no token (Perfetto can sum time asleep); the token is in args.
    assert not any("token" in name for name in slice_names)
    asleep = [ev for ev in doc["traceEvents"] if ev["ph"] == "X" and ev["name"] == "asleep on APF"]
    assert asleep and all("token" in ev["args"] for ev in asleep)
    # DevTools' arithmetic: every vCPU/task slice that follows another ends exactly at its ts.
    assert summary["touching"] > 100
    # Async tracks are process-scoped: under the vCPUs process, not global.
    assert all(ev["pid"] == 1 and "id" not in ev for ev in doc["traceEvents"] if ev["ph"] in "be")
    # Counter tracks as Perfetto names them ("name key"): no unit twice.
    counters = {
        f"{ev['name']} {key}" for ev in doc["traceEvents"] if ev["ph"] == "C" for key in ev["args"]
    }
    assert {"resident pages", "swap queue depth", "vCPU 0 APFs outstanding"} <= counters
    assert len(summary["counters"]) == 3


# -- trace-stats on other layouts ---------------------------------------------------------------

REAL_HOST = """\
# tracer: nop
cpus=4
           <...>-41236 [002] 1711.099000: kvm_async_pf_not_present: token 0x3001 gva 0x9000
 CPU 1/KVM-41236 [002] 1711.099500: kvm_async_pf_ready: token 0x3001 gva 0x9000, type = user
 qemu-kvm 41200/41236 [002] 1711.099600: kvm:kvm_entry: vcpu 1, rip 0x1
 CPU 1/KVM-41236 [002] 1711.100000: kvm_exit:             vcpu 1 reason EPT_VIOLATION rip 0x1
 CPU 1/KVM-41236 [002] 1711.100010: kvm_try_async_get_page: gva = 0x7f00, gfn = 0x7
 CPU 1/KVM-41236 [002] 1711.100011: kvm_async_pf_not_present: token 0x1001 gva 0x7f00
 CPU 1/KVM-41236 [002] d..2. 1711.100012: kvm_async_pf_doublefault: gva = 0x7f00, gfn = 0x7
 kworker/u8:2-120  [000]  1711.103000: kvm_async_pf_completed: gva 0x7f00 address 0x7f1 pfn 0x9
 CPU 1/KVM-41236 [002] 1711.104011: kvm_async_pf_ready: token 0x1001 gva 0x7f00
 qemu-kvm 41236 [002] 1711.200000: kvm:kvm_async_pf_not_present: token 0x2001 gva 0x8000
 qemu-kvm 41236 [002] 1711.201000: kvm:kvm_async_pf_ready: token 0x2001 gva 0x8000
 CPU 1/KVM-41236 [002] 1711.300000: kvm_async_pf_ready: token 0xffffffff gva 0
 CPU 1/KVM-41236 [002] 1711.300001: sched_switch: prev_comm=CPU 1/KVM prev_pid=41236
 CPU 1/KVM-41236 [002] 1711.300002: kvm_async_pf_ready: token zz gva 0
kvm_async_pf_ready: garbage
"""


def test_trace_stats_reads_trace_cmd_ftrace_and_perf_script_layouts(tmp_path: Path) -> None:
    stats = read_trace(REAL_HOST.splitlines())
    assert stats.events["kvm_async_pf_not_present"] == 3
    assert stats.events["kvm_async_pf_ready"] == 4  # three pairs and a wake-all
    assert stats.events["kvm_async_pf_repeated_fault"] == 1  # the 3.x name counts too
    assert stats.events["kvm_async_pf_completed"] == 1
    assert stats.events["kvm_entry"] == 1  # perf script -F +pid: "comm pid/tid"
    assert stats.wake_all == 1
    # One thread whatever its comm column says ("<...>" once ftrace forgot the name).
    assert stats.latencies_ns == {41236: [500_000, 4_000_000, 1_000_000]}
    assert list(stats.latency_summary()) == ["CPU 1/KVM-41236"]
    assert stats.unknown_lines == 2  # two header lines
    assert stats.other_events == 1  # sched_switch
    assert [m.line_no for m in stats.malformed] == [16, 17]


def test_trace_stats_cli_prints_and_reports_malformed_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "host.txt"
    trace.write_text(REAL_HOST)
    out = tmp_path / "stats.json"
    assert main(["trace-stats", str(trace), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "kvm_async_pf_not_present" in captured.out and "CPU 1/KVM-41236" in captured.out
    assert f"{trace}:16: malformed" in captured.err
    data = json.loads(out.read_text())
    assert data["events"]["kvm_async_pf_ready"] == 4 and data["malformed_lines"] == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["trace-stats", "/nonexistent/trace.txt"], "no file"),
        (["run", "--trace", "/nonexistent/dir/t.json"], "--trace: directory"),
        (["run", "--ftrace", "/nonexistent/dir/t.txt"], "--ftrace: directory"),
        (["run", "--trace", "t.json", "--trace-window", "2:1"], "--trace-window"),
        (["run", "--trace", "t.json", "--trace-window", "abc"], "--trace-window"),
        (["run", "--trace", "t.json", "--trace-window", "nan:1"], "--trace-window"),
        (["run", "--trace", "t.json", "--trace-window", "0:inf"], "--trace-window"),
        (["run", "--trace", "t.json", "--trace-window", "1e300:"], "--trace-window"),
        (["run", "--trace-window", "1:2"], "give --trace or --ftrace"),
    ],
)
def test_bad_trace_flags_exit_2_with_one_line(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_trace_stats_is_linear_on_long_lines() -> None:
    line = " CPU 0/KVM-1 [000] 1.000000: kvm_async_pf_ready: token 0x1 gva 0x2" + " " * 50_000
    stats = read_trace([line] * 20)
    assert stats.events["kvm_async_pf_ready"] == 20


def test_trace_stats_reports_numbers_out_of_range_as_malformed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past Python's 4300-digit int limit, past int64 nanoseconds, past pid_t and u64 tokens:
    each such line is malformed (line number and why); the good lines still count."""
    huge = "9" * 5000
    lines = [
        " CPU 0/KVM-7 [000] 1.000000: kvm_async_pf_not_present: token 0x1 gva 0x1000",
        f" CPU 0/KVM-7 [000] {huge}.5: kvm_async_pf_ready: token 0x1 gva 0x1000",
        " CPU 0/KVM-7 [000] 99999999999.0: kvm_async_pf_ready: token 0x1 gva 0x1000",
        f" CPU 0/KVM-{huge} [000] 1.5: kvm_async_pf_ready: token 0x1 gva 0x1000",
        " CPU 0/KVM-7 [000] 1.6: kvm_async_pf_ready: token 0x1" + "0" * 16 + " gva 0x1000",
        " CPU 0/KVM-7 [000] 1.000250: kvm_async_pf_ready: token 0x1 gva 0x1000",
    ]
    trace = tmp_path / "huge.txt"
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "stats.json"
    assert main(["trace-stats", str(trace), "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{trace}:2: malformed: timestamp 999999999999... (5002 characters)" in err
    assert f"{trace}:3: malformed: timestamp 99999999999.0 is out of range" in err
    assert f"{trace}:4: malformed: thread id 999999999999... (5000 characters)" in err
    assert f"{trace}:5: malformed: kvm_async_pf_ready: token" in err
    data = json.loads(out.read_text())
    assert data["malformed_lines"] == 4 and data["events"]["kvm_async_pf_ready"] == 1
    assert data["not_present_to_ready_us"]["CPU 0/KVM-7"]["max"] == 250.0


def test_trace_stats_reports_a_ready_before_its_not_present_as_malformed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative latency is a broken trace, not a sample: the ready line is malformed and the
    not-present stays in flight (or pairs with a later, consistent ready)."""
    trace = tmp_path / "back.txt"
    trace.write_text(
        " CPU 0/KVM-7 [000] 2.000000: kvm_async_pf_not_present: token 0x1 gva 0x1000\n"
        " CPU 0/KVM-7 [000] 1.000000: kvm_async_pf_ready: token 0x1 gva 0x1000\n"
        " CPU 0/KVM-7 [000] 3.000000: kvm_async_pf_not_present: token 0x2 gva 0x2000\n"
        " CPU 0/KVM-7 [000] 2.500000: kvm_async_pf_ready: token 0x2 gva 0x2000\n"
        " CPU 0/KVM-7 [000] 3.000100: kvm_async_pf_ready: token 0x2 gva 0x2000\n"
    )
    stats = read_trace(trace.read_text().splitlines())
    assert [m.line_no for m in stats.malformed] == [2, 4]
    assert "before its not-present at 2.000000000 s" in stats.malformed[0].reason
    assert stats.latencies_ns == {7: [100_000]}  # never a negative sample
    assert stats.in_flight == {7: 1} and stats.events["kvm_async_pf_ready"] == 1
    assert main(["trace-stats", str(trace)]) == 0
    err = capsys.readouterr().err
    assert f"{trace}:2: malformed: kvm_async_pf_ready: at 1.000000000 s, before" in err


def test_trace_stats_of_only_malformed_lines_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(" CPU 0/KVM-1 [000] 1.000000: kvm_async_pf_ready: token zz gva 0\n")
    assert main(["trace-stats", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: malformed" in err and "all 1 kvm async-PF lines" in err


def test_trace_stats_of_a_file_without_kvm_events_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.txt"
    other.write_text("hello\nworld\n")
    assert main(["trace-stats", str(other)]) == 2
    assert "no kvm events" in capsys.readouterr().err


def test_compare_writes_one_trace_per_protocol_and_seed(tmp_path: Path) -> None:
    out = tmp_path / "c.txt"
    code = main(
        [
            *("compare", "rfcv2-2020", "-p", "sync,arm64-rfcv2", "--seeds", "2", "--jobs", "1"),
            *("--duration", "0.2", "--quiet", "--ftrace", str(out)),
        ]
    )
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "c.arm64-rfcv2.s0.txt",
        "c.arm64-rfcv2.s1.txt",
        "c.sync.s0.txt",
        "c.sync.s1.txt",
    ]


# -- outputs that cannot be written -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-p", "sync", "--trace", "/dev/full"], "--trace: '/dev/full' is not a regular file"),
        (["-p", "sync", "-p", "x86", "--trace", "/dev/full"], "'/dev/full' is not a regular"),
        (["-p", "sync", "--ftrace", "/dev/full"], "--ftrace: '/dev/full' is not a regular file"),
        (["-p", "sync", "--ftrace", "{tmp}"], "is a directory; give the path of a file"),
        (["-p", "sync", "-p", "x86", "--ftrace", "{tmp}/d"], "'{tmp}/d.x86' is a directory"),
        (["-p", "sync", "--trace", "{tmp}/t", "--ftrace", "{tmp}/t"], "the same file as --trace"),
    ],
)
def test_unwritable_trace_outputs_fail_before_the_first_run(
    args: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A special file, a directory (given, or made by tagging a run's name) fails with one
    line before anything runs; no regular file appears next to a device."""
    (tmp_path / "d.x86").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    created = [Path("/dev/full.sync"), Path("/dev/full.x86")]
    try:
        code = main(["run", "natapov-2010", "--duration", "0.05", *args])
        captured = capsys.readouterr()
        assert_one_line_error(code, captured.err, fragment.replace("{tmp}", str(tmp_path)))
        assert captured.out == ""  # no run: no table
        assert not any(p.exists() for p in created)
    finally:
        for path in created:
            if path.is_file():
                path.unlink()


def test_a_read_only_file_system_fails_before_the_first_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every output is opened before the first run, so EROFS on the second protocol's file
    stops the command before sync runs."""
    real_open = io.open
    target = tmp_path / "t.x86.json"

    def read_only(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(target) and any(m in mode for m in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", read_only)
    trace = tmp_path / "t.json"
    two = ["run", "natapov-2010", "-p", "sync", "-p", "x86", "--duration", "0.05"]
    code = main([*two, "--trace", str(trace)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, f"--trace: cannot write '{target}'", "Read-only")
    assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_a_disk_filling_up_mid_run_keeps_the_protocols_that_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC while x86 traces: one line naming the flag and file, exit 2; sync's results are
    printed and written (marked partial)."""
    real_open = io.open

    class FillsUp:
        def __init__(self, file: Any) -> None:
            self._file = file

        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self._file, name)

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            self._file.close()

    def full_for_x86(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = real_open(file, mode, *args, **kwargs)
        return FillsUp(opened) if ".x86." in str(file) and "w" in mode else opened

    monkeypatch.setattr(io, "open", full_for_x86)
    out = tmp_path / "out.json"
    ftrace = tmp_path / "t.txt"
    two = ["run", "natapov-2010", "-p", "sync", "-p", "x86", "--duration", "0.05"]
    code = main([*two, "--ftrace", str(ftrace), "--json", str(out)])
    captured = capsys.readouterr()
    x86_file = tmp_path / "t.x86.txt"
    assert_one_line_error(
        code, captured.err, f"--ftrace: cannot write '{x86_file}' (No space left on device)"
    )
    assert "PARTIAL: cut short; only sync finished" in captured.out
    data = json.loads(out.read_text())
    assert data["partial"] is True and [r["protocol"] for r in data["results"]] == ["sync"]
    assert read_trace((tmp_path / "t.sync.txt").read_text().splitlines()).events
