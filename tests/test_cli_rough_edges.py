"""Issue 14's CLI rough edges: comma lists everywhere, ``protocols``, ``-h``/``--version``,
help lines without a type for flags, trace windows past the run, named settings in report,
progress with elapsed time and ETA, and the note when a protocol injected nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from apfsim.cli import main
from apfsim.registry import PROTOCOLS
from apfsim.version import __version__
from cli_helpers import assert_one_line_error, cli


def test_run_takes_a_comma_list_of_protocols(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["run", "-p", "sync,x86", "--duration", "0.2"], capsys)
    assert code == 0, err
    header = out.splitlines()[1]
    assert "sync" in header and "x86" in header
    code, _, err = cli(["run", "-p", "sync,", "--duration", "0.2"], capsys)
    assert_one_line_error(code, err, "--protocol", "empty name")


def test_protocols_lists_every_design_with_its_source(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = cli(["protocols"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(PROTOCOLS)
    for line, v in zip(lines, PROTOCOLS.values(), strict=True):
        assert v.summary and v.source
        assert v.summary in line and f"[{v.source}]" in line


@pytest.mark.parametrize("command", [[], ["run"], ["compare"], ["check"], ["sweep-report"]])
def test_dash_h_is_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli([*command, "-h"], capsys)
    assert code == 0
    assert "Usage: apfsim" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["--version"], capsys)
    assert code == 0
    assert out == f"apfsim {__version__}\n"


@pytest.mark.parametrize("command", ["run", "compare", "check", "sweep"])
def test_flags_show_no_type_in_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli([command, "--help"], capsys)
    assert code == 0
    assert "<bool>" not in out
    assert re.search(r"--seeds?\s+<int>", out) or command in ("check", "sweep")


@pytest.mark.parametrize("command", ["run", "compare"])
def test_trace_window_past_the_run_is_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "t.txt"
    extra = ["rfcv2-2020", "--seeds", "1"] if command == "compare" else []
    args = [command, *extra, "-p", "sync", "--duration", "2", "--ftrace", str(out_file)]
    code, _, err = cli([*args, "--trace-window", "30:31"], capsys)
    assert_one_line_error(code, err, "--trace-window", "30 s", "lasts 2 s")
    assert not out_file.exists()


def test_trace_stats_on_an_empty_trace_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("cpus=1\n")  # what --ftrace writes for a window with no events
    code, _, err = cli(["trace-stats", str(empty)], capsys)
    assert_one_line_error(code, err, "no events at all", "--trace-window")
    assert "trace-cmd record" not in err


def test_report_names_the_setting_that_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["run", "-p", "sync", "--duration", "0.3", "--json", str(a), "-q"]) == 0
    args = ["run", "-p", "sync", "--duration", "0.5", "--seed", "1", "--json", str(b), "-q"]
    assert main(args) == 0
    capsys.readouterr()
    code, _, err = cli(["report", str(a), str(b), "-o", str(tmp_path / "r.html")], capsys)
    assert_one_line_error(code, err, "duration_s: 0.3 vs 0.5")


def test_setting_differences_walks_nested_settings() -> None:
    from apfsim.report.data import setting_differences

    a = {"name": "x", "guest": {"vcpus": 1, "memory_mib": 256}, "tasks": [{"passes": 2}]}
    b = {"name": "x", "guest": {"vcpus": 2, "memory_mib": 256}, "tasks": [{"passes": 1}]}
    assert setting_differences(a, b) == ["guest.vcpus: 1 vs 2", "tasks[0].passes: 2 vs 1"]
    many = setting_differences({"a": 1, "b": 1, "c": 1, "d": 1}, {"a": 2, "b": 2, "c": 2, "d": 2})
    assert many == ["a: 1 vs 2", "b: 1 vs 2", "c: 1 vs 2", "..."]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "-p", "sync,x86", "--duration", "0.3"], r"run: \d+% \((sync|x86) \(\d/2\)\)"),
        (
            ["compare", "rfcv2-2020", "-p", "sync", "--seeds", "2", "-j", "1", "--duration", "0.2"],
            r"compare: \d/2 runs",
        ),
    ],
)
def test_progress_lines_give_elapsed_time_and_eta(
    args: list[str],
    needle: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("apfsim.cli.common._PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr("apfsim.cli.common._LINE_EVERY_S", 0.0)
    code, _, err = cli(args, capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "elapsed" in line]
    assert lines, err
    assert all(re.search(needle + r".*, \d+ s elapsed, ETA (\d+ s|-)", line) for line in lines)
    code, _, err = cli([*args, "-q"], capsys)
    assert code == 0 and "elapsed" not in err


def test_a_protocol_that_injected_nothing_gets_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["run", "-p", "sync,arm64-rfcv2,x86-legacy", "--duration", "0.5"], capsys)
    assert code == 0
    notes = err.splitlines()
    assert len(notes) == 1, err  # not sync (no APF by design), not x86-legacy (it injected)
    assert notes[0].startswith("apfsim: note: arm64-rfcv2 injected no async PF: all ")
    assert "in kernel mode" in notes[0] and "run longer (--duration)" in notes[0]
    args = ["compare", "rfcv2-2020", "-p", "sync,arm64-rfcv2", "--seeds", "2", "-j", "1"]
    code, _, err = cli([*args, "--duration", "0.3"], capsys)
    assert code == 0
    assert err.startswith("apfsim: note: arm64-rfcv2 injected no async PF") and err.count("\n") == 1
    code, _, err = cli(["run", "-p", "arm64-rfcv2", "--duration", "0.5", "-q"], capsys)
    assert code == 0 and err == ""


def test_no_note_once_user_mode_faults_are_injected() -> None:
    from apfsim.api import run
    from apfsim.metrics.notes import no_injection_note

    result = run("rfcv2-2020", ["arm64-rfcv2"], duration_s=0.5)
    r = result.results[0]
    assert no_injection_note([r], result.scenario) is not None
    apf = dict(r.apf, not_present_injected=1)
    injected = type(r)(**{**{f: getattr(r, f) for f in r.__dataclass_fields__}, "apf": apf})
    assert no_injection_note([injected], result.scenario) is None


def test_run_set_overrides_a_scenario_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``apfsim run --set KEY=VALUE``: a TOML value (``true``) or a bare string (``2m``)."""
    out = tmp_path / "r.json"
    args = ["run", "postcopy-large", "-p", "sync", "--duration", "0.05", "-q"]
    sets = ["--set", "postcopy.preempt=true", "--set", "postcopy.page_size=2m"]
    code, _, err = cli([*args, *sets, "--json", str(out)], capsys)
    assert code == 0, err
    pc = json.loads(out.read_text())["scenario"]["postcopy"]
    assert pc["preempt"] is True and pc["page_size"] == "2m"


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("nokey", "--set: 'nokey' is not KEY=VALUE"),
        ("postcopy.bogus=1", "postcopy.bogus: no such scenario key"),
        ("postcopy.link_gbps=-1", "postcopy.link_gbps"),
    ],
)
def test_run_set_refuses_bad_overrides_in_one_line(
    item: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(["run", "postcopy-large", "--set", item, "-q"], capsys)
    assert_one_line_error(code, err, needle)
