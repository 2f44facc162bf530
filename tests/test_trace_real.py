"""trace-stats on excerpts of real host traces (tests/data/real-traces, see its README):
every layout trace-cmd 3.1.6 and tracefs write, and the x86-tsc/counter clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apfsim.cli import main
from apfsim.trace import read_trace

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
