"""trace-stats on excerpts of real host traces (tests/data/real-traces, see its README):
every layout trace-cmd 3.1.6 and tracefs write, and the x86-tsc/counter clock."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from apfsim.cli import main
from apfsim.trace import formats as tp
from apfsim.trace import read_trace
from apfsim.trace.formats import ExitReason

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import assert_one_line_error

REAL = Path(__file__).parent / "data" / "real-traces"
SECONDS_LAYOUTS = [
    "trace-cmd-report.txt",
    "trace-cmd-report-t.txt",
    "trace-cmd-report-l.txt",
    "trace-cmd-report-ts-diff.txt",
]


def lines(name: str) -> list[str]:
    return (REAL / name).read_text().splitlines()


@pytest.mark.parametrize("name", SECONDS_LAYOUTS)
def test_every_report_layout_counts_the_wake_all_and_every_kvm_event(name: str) -> None:
    stats = read_trace(lines(name))
    assert stats.malformed_count == 0
    assert stats.events["kvm_async_pf_ready"] == 1 and stats.wake_all == 1
    assert stats.other_kvm_events == 15  # five first events, ten around the wake-all
    assert stats.unknown_lines == 1  # "cpus=2"
    assert stats.other_events == 0
    assert stats.ticks is False
    # The span is the whole trace's (451.895332 to 848.357620), not the one APF event's.
    span = stats.span()
    assert isinstance(span, float) and 396.46 < span < 396.47


@pytest.mark.parametrize("name", ["trace-cmd-report-x86-tsc.txt", "tracefs-raw-tgid-x86-tsc.txt"])
def test_a_counter_clock_trace_is_read_in_ticks(name: str) -> None:
    stats = read_trace(lines(name))
    assert stats.malformed_count == 0
    assert stats.kvm_events == stats.other_kvm_events > 0
    assert stats.ticks is True
    assert stats.span() == 2899767312637 - 2869274860595
    d = stats.to_dict()
    assert d["timestamps"] == "clock ticks" and d["span_s"] is None
    assert d["span_ticks"] == 2899767312637 - 2869274860595


def test_trace_stats_cli_says_the_timestamps_are_clock_ticks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "s.json"
    assert (
        main(["trace-stats", str(REAL / "trace-cmd-report-x86-tsc.txt"), "--json", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "span 30492452042 clock ticks" in text
    assert "timestamps are clock ticks" in text
    assert json.loads(out.read_text())["other_kvm_events"] == 12


def test_trace_stats_cli_spans_the_whole_trace_and_counts_headers_apart(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["trace-stats", str(REAL / "trace-cmd-report-l.txt")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("17 lines, span 396.462288 s")
    assert "other kvm events                          15" in text
    assert "not event lines (headers)                  1" in text


def test_mixed_clocks_in_one_file_are_malformed() -> None:
    text = [
        " CPU 0/KVM-1 [000]     1.000000: kvm_async_pf_ready: token 0xffffffff gva 0",
        " CPU 0/KVM-1 [000]2869274860595: kvm_async_pf_ready: token 0xffffffff gva 0",
    ]
    stats = read_trace(text)
    assert stats.wake_all == 1 and [m.line_no for m in stats.malformed] == [2]
    assert "clock ticks, unlike the lines before" in stats.malformed[0].reason


# -- our --ftrace lines against real trace-cmd report lines -----------------------------------

_REPORT = re.compile(
    r"^(?P<comm>.{16})-(?P<pid>\d+) +\[(?P<cpu>\d+)\] +(?P<ts>[\d.]+): (?P<rest>.*)$"
)


def _parsed(line: str) -> tuple[str, int, int, str, str, str]:
    """comm, pid, cpu, timestamp text, event, fields: read without our layout's widths."""
    m = _REPORT.match(line)
    assert m is not None, line
    event, _, fields = m["rest"].partition(":")
    return m["comm"].strip(), int(m["pid"]), int(m["cpu"]), m["ts"], event, fields.lstrip(" ")


def test_our_lines_match_real_trace_cmd_report_lines_byte_for_byte() -> None:
    """Each real event line, re-made by format_line from its parts: µs as trace-cmd rounds
    them (from the same event's ns in the -t report) and ns as -t prints them."""
    us_lines, ns_lines = lines("trace-cmd-report.txt"), lines("trace-cmd-report-t.txt")
    assert us_lines[0] == ns_lines[0] == "cpus=2"
    compared = 0
    for us_line, ns_line in zip(us_lines[1:], ns_lines[1:], strict=True):
        comm, pid, cpu, ts, event, fields = _parsed(ns_line)
        sec, frac = ts.split(".")
        ts_ns = int(sec) * 1_000_000_000 + int(frac)
        assert tp.format_line(comm, pid, cpu, ts_ns, event, fields, ns=True) == ns_line + "\n"
        assert tp.format_line(comm, pid, cpu, ts_ns, event, fields) == us_line + "\n"
        compared += 1
    assert compared == 16  # long names (kvm_update_master_clock) and short (kvm_mmio) alike


def _c_printf(fmt: str, *args: object) -> str:
    """The TP_printk format of a format file, printed as the kernel does for these
    conversions (%u %s %x with flags and widths; l/ll length modifiers dropped)."""
    return re.sub(r"%(#?0?\d*)l{0,2}([uxs])", r"%\1\2", fmt).replace("%u", "%d") % args


def _print_fmt(event: str) -> str:
    text = (REAL / "formats-6.18" / f"{event}.format").read_text()
    m = re.search(r'^print fmt: "(.*?)", REC', text, re.M)
    assert m is not None
    return m[1]


def test_x86_entry_and_exit_follow_the_6_18_kernel_format() -> None:
    rip = 0xFFFFFFFF81000000
    entry = _c_printf(_print_fmt("kvm_entry"), 1, rip, 0, 0, "")
    assert tp.kvm_entry_x86(1, rip, (6, 18)) == entry
    assert tp.kvm_entry_x86(1, rip, (6, 14)) == entry
    fields = (1, "EPT_VIOLATION", "", "", rip, 0x181, 0, 0, 0, 0)
    exit_ = _c_printf(_print_fmt("kvm_exit"), *fields)
    assert tp.kvm_exit_x86(1, ExitReason.DABT, rip) == exit_  # the default layout: newest
    assert exit_.endswith(" requests 0x0000000000000000")


def test_x86_entry_and_exit_before_6_14_have_no_injection_or_requests_fields() -> None:
    assert tp.kvm_entry_x86(1, 0x401000, (6, 13)) == "vcpu 1, rip 0x401000"
    assert not tp.kvm_exit_x86(0, ExitReason.WFX, 0x10, (6, 13)).endswith("0000000000000000")
    assert tp.kvm_exit_x86(0, ExitReason.WFX, 0x10, (5, 10)).endswith("error_code 0x00000000")


@pytest.mark.parametrize(
    ("text", "expected"), [("6.1", (6, 1)), ("6.1.0-13-amd64", (6, 1)), ("5.10", (5, 10))]
)
def test_parse_kernel(text: str, expected: tuple[int, int]) -> None:
    assert tp.parse_kernel(text) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ftrace-kernel", "4.19"], "--ftrace-kernel: layouts cover kernels 5.10 and later"),
        (["--ftrace-kernel", "six"], "--ftrace-kernel: expected a kernel version like 6.1"),
        ([], "--ftrace-kernel: give --ftrace too"),
    ],
)
def test_bad_ftrace_kernel_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = ["run", "-p", "x86", "--duration", "0.01", "-q"]
    if args:
        code = main([*base, "--ftrace", str(tmp_path / "t.txt"), *args])
    else:
        code = main([*base, "--ftrace-kernel", "6.1"])
    assert_one_line_error(code, capsys.readouterr().err, message)


def test_run_writes_the_chosen_layout(tmp_path: Path) -> None:
    old, new, ns = tmp_path / "old.txt", tmp_path / "new.txt", tmp_path / "ns.txt"
    base = ["run", "-p", "x86", "--duration", "0.05", "-q", "--ftrace"]
    assert main([*base, str(old), "--ftrace-kernel", "6.1"]) == 0
    assert main([*base, str(new)]) == 0
    assert main([*base, str(ns), "--ftrace-ns"]) == 0
    old_exit = next(x for x in old.read_text().splitlines() if "kvm_exit:" in x)
    new_exit = next(x for x in new.read_text().splitlines() if "kvm_exit:" in x)
    assert "requests" not in old_exit and new_exit.endswith(" requests 0x0000000000000000")
    # µs by default, ns with --ftrace-ns; same events either way.
    stamp = re.compile(r"\] +\d+\.(\d+): ")
    new_lines, ns_lines = new.read_text().splitlines()[1:], ns.read_text().splitlines()[1:]
    assert len(new_lines) == len(ns_lines) > 0
    assert {len(m[1]) for x in new_lines if (m := stamp.search(x))} == {6}
    assert {len(m[1]) for x in ns_lines if (m := stamp.search(x))} == {9}
