"""Issue 15 item 7: the CLI stays thin. The checker's world and the trace options validate
themselves, so the Python API refuses the same input with the same one-line message as the
CLI; ``report`` and ``plot`` share one implementation; unknown names get a "did you mean"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from apfsim.api import compare, run
from apfsim.check import WorldConfig, WorldConfigError
from apfsim.scenario import ScenarioError, load_scenario, scenario_from_dict, with_overrides
from apfsim.sweep import SweepError, load_sweep, parse_sweep
from apfsim.trace import TraceOptions, TraceOptionsError
from cli_helpers import assert_one_line_error, cli
from test_sweep import TINY, write_sweep

# -- the checker's world: WorldConfig and `apfsim check` give the same message ---------------

WORLDS: dict[str, tuple[list[str], dict[str, Any], str]] = {
    "unknown protocol": (["nope"], {"protocol": "nope"}, "PROTOCOL: unknown 'nope'"),
    "vcpus out of range": (["x86", "--vcpus", "5"], {"vcpus": 5}, "--vcpus: must be 1 to 4"),
    "no tasks": (["x86", "--tasks", "0"], {"tasks": 0}, "--tasks: must be 1 to 4"),
    "too many pages": (["x86", "--pages", "9"], {"pages": 9}, "--pages: must be 1 to 4"),
    "unknown mode": (
        ["x86", "--modes", "user,sideways"],
        {"modes": ("user", "sideways")},
        "--modes: unknown 'sideways'",
    ),
    "hotplug out of range": (["x86", "--hotplug", "3"], {"hotplug": 3}, "--hotplug: must be 0"),
    "unknown mutant": (["x86", "--mutant", "B99"], {"mutant": "B99"}, "--mutant: unknown 'B99'"),
    "a mutant of another protocol": (
        ["arm64-rfcv2", "--mutant", "B9"],
        {"protocol": "arm64-rfcv2", "mutant": "B9"},
        "B9 is a bug of x86, not of arm64-rfcv2",
    ),
    "reboot without the guest's callbacks": (
        ["arm64-sdei-ppi", "--reboot"],
        {"protocol": "arm64-sdei-ppi", "reboot": True},
        "models no CPU hotplug or reboot callbacks; use one of",
    ),
}


@pytest.mark.parametrize("case", sorted(WORLDS))
def test_a_bad_world_is_refused_alike_by_the_api_and_the_cli(
    case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args, fields, needle = WORLDS[case]
    with pytest.raises(WorldConfigError) as refused:
        WorldConfig(**{"protocol": "x86", **fields})
    assert needle in str(refused.value)
    code, _, err = cli(["check", *args], capsys)
    assert_one_line_error(code, err, needle)
    assert err == f"apfsim: error: {refused.value}\n"


def test_the_mutant_world_and_the_flags_still_combine(capsys: pytest.CaptureFixture[str]) -> None:
    """--mutant alone takes its protocol and world; a flag given changes that world."""
    code, out, err = cli(["check", "--mutant", "B9", "-q"], capsys)
    assert code == 1, err
    assert "x86" in out
    code, _, err = cli(["check", "--mutant", "B9", "--vcpus", "7"], capsys)
    assert_one_line_error(code, err, "--vcpus: must be 1 to 4 in a checked world (got 7)")


# -- the trace options: TraceOptions and `apfsim run` give the same message ------------------

TRACES: dict[str, tuple[list[str], dict[str, Any], str]] = {
    "a window ending before it starts": (
        ["--trace", "T", "--trace-window", "2:1"],
        {"chrome": "T", "window": (2 * 10**9, 10**9)},
        "--trace-window: need 0 <= START < END (got 2:1)",
    ),
    "a window before zero": (
        ["--trace", "T", "--trace-window", "-1:1"],
        {"chrome": "T", "window": (-(10**9), 10**9)},
        "--trace-window: need 0 <= START < END (got -1:1)",
    ),
    "a window without a trace": (
        ["--trace-window", "1:2"],
        {"window": (10**9, 2 * 10**9)},
        "--trace-window: give --trace or --ftrace too",
    ),
    "ns timestamps without a text trace": (
        ["--trace", "T", "--ftrace-ns"],
        {"chrome": "T", "ftrace_ns": True},
        "--ftrace-ns: give --ftrace too",
    ),
    "a kernel too old": (
        ["--ftrace", "T", "--ftrace-kernel", "4.19"],
        {"ftrace": "T", "kernel": (4, 19)},
        "--ftrace-kernel: layouts cover kernels 5.10 and later (got '4.19')",
    ),
}


@pytest.mark.parametrize("case", sorted(TRACES))
def test_bad_trace_options_are_refused_alike_by_the_api_and_the_cli(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, fields, needle = TRACES[case]
    path = tmp_path / "t.out"
    fields = {k: path if v == "T" else v for k, v in fields.items()}
    with pytest.raises(TraceOptionsError) as refused:
        TraceOptions(**fields)
    assert str(refused.value) == needle
    code, _, err = cli(["run", *(str(path) if a == "T" else a for a in args)], capsys)
    assert_one_line_error(code, err)
    assert err == f"apfsim: error: {needle}\n"


def test_the_window_is_parsed_by_the_trace_options() -> None:
    assert TraceOptions.parse_window("30:31") == (30 * 10**9, 31 * 10**9)
    assert TraceOptions.parse_window(":0.5") == (0, 5 * 10**8)
    assert TraceOptions.parse_window("30:") == (30 * 10**9, 1 << 62)
    assert TraceOptions.parse_window("0:1e300") == (0, 1 << 62)  # no overflow
    for text in ("abc", "1", "nan:1", "0:inf", "0:-inf", "1e300:", "-1e300:", "-1:1"):
        with pytest.raises(TraceOptionsError, match="--trace-window"):
            TraceOptions.parse_window(text)


def test_a_window_past_the_run_is_refused_alike_by_run_and_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = TraceOptions(tmp_path / "t.json", window=(30 * 10**9, 31 * 10**9))
    expected = "starts at 30 s but the run lasts 0.5 s"
    with pytest.raises(TraceOptionsError, match=expected) as refused:
        run("rfcv2-2020", ["sync"], duration_s=0.5, trace=options)
    with pytest.raises(TraceOptionsError, match=expected):
        compare("rfcv2-2020", ["sync"], 1, duration_s=0.5, jobs=1, trace=options)
    assert not (tmp_path / "t.json").exists()
    args = ["--trace", str(tmp_path / "t.json"), "--trace-window", "30:31", "--duration", "0.5"]
    for command in (["run", "-p", "sync"], ["compare", "rfcv2-2020", "-p", "sync"]):
        code, _, err = cli([*command, *args], capsys)
        assert err == f"apfsim: error: {refused.value}\n"
        assert code == 2


# -- report and plot: one implementation ------------------------------------------------------


@pytest.mark.parametrize("command", ["report", "plot"])
def test_report_and_plot_refuse_bad_results_alike(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "r.json"
    bad.write_text("{")
    code, out, err = cli([command, str(bad), "-o", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, str(bad))
    assert out == ""


# -- did you mean -----------------------------------------------------------------------------

SUGGESTED: dict[str, tuple[list[str], str]] = {
    "a protocol (run)": (["run", "-p", "x86-legacyy"], "did you mean 'x86-legacy'?"),
    "a protocol (compare)": (["compare", "rfcv2-2020", "-p", "sinc"], "did you mean 'sync'?"),
    "a protocol (check)": (["check", "arm64-rfcv"], "did you mean 'arm64-rfcv2'?"),
    "a scenario": (["run", "rfcv2-202"], "did you mean 'rfcv2-2020'?"),
    "a scenario (show)": (["show", "natapov-2001"], "did you mean 'natapov-2010'?"),
    "a built-in sweep": (["sweep", "latency-mapp"], "did you mean 'latency-map'?"),
    "a mutant": (["check", "--mutant", "dummy-dorp"], "did you mean 'dummy-drop'?"),
    "a mode": (["check", "x86", "--modes", "kernl"], "did you mean 'kernel'?"),
}


@pytest.mark.parametrize("case", sorted(SUGGESTED))
def test_an_unknown_name_gets_a_suggestion(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    args, suggestion = SUGGESTED[case]
    code, _, err = cli(args, capsys)
    assert_one_line_error(code, err, suggestion)
    assert err.rstrip().endswith(suggestion)


def test_a_name_like_none_gets_no_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["run", "-p", "zzzzzz"], capsys)
    assert_one_line_error(code, err, "unknown protocol 'zzzzzz'")
    assert "did you mean" not in err


def test_the_api_suggests_names_too() -> None:
    with pytest.raises(ScenarioError, match=r"did you mean 'x86'\?$"):
        run("rfcv2-2020", ["x68"])
    with pytest.raises(ScenarioError, match=r"did you mean 'x86'\?$"):
        compare("rfcv2-2020", ["sync", "x68"])
    with pytest.raises(ScenarioError, match=r"did you mean 'writer-compute'\?$"):
        load_scenario("writer-compte")
    with pytest.raises(SweepError, match=r"did you mean 'latency-map'\?$"):
        load_sweep("latency_map")


def test_a_misspelt_scenario_key_gets_its_spelling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = load_scenario("rfcv2-2020").model_dump(mode="json")
    data["host"]["swap"]["mean_uss"] = 100
    with pytest.raises(ScenarioError, match=r"host\.swap\.mean_uss: .* did you mean 'mean_us'\?$"):
        scenario_from_dict(data)
    data = load_scenario("rfcv2-2020").model_dump(mode="json")
    data["tasks"][0]["cout"] = 1
    with pytest.raises(ScenarioError, match=r"did you mean 'count'\?$"):
        scenario_from_dict(data)
    with pytest.raises(ScenarioError, match=r"did you mean 'guest\.vcpus'\?$"):
        with_overrides(load_scenario("rfcv2-2020"), {"guset.vcpus": 2})
    path = tmp_path / "s.toml"
    path.write_text('name = "x"\nduraton_s = 1\n[[tasks]]\nkind = "compute"\n')
    code, _, err = cli(["run", str(path)], capsys)
    assert_one_line_error(code, err, "duraton_s", "did you mean 'duration_s'?")


def test_a_misspelt_sweep_key_gets_its_spelling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SweepError, match=r"protocol: unknown key; .* did you mean 'protocols'\?$"):
        parse_sweep({**TINY, "protocol": ["sync"]}, "t")
    with pytest.raises(SweepError, match=r"did you mean 'host\.swap\.mean_us'\?$"):
        parse_sweep({**TINY, "grid": {"host.swap.mean_uss": [100, 200]}}, "t")
    with pytest.raises(SweepError, match=r"did you mean 'x86'\?$"):
        parse_sweep({**TINY, "protocols": ["sync", "x68"], "baseline": "sync"}, "t")
    path = write_sweep(tmp_path / "s.toml", {**TINY, "sed": 1})
    code, _, err = cli(["sweep", str(path), "--db", str(tmp_path / "s.sqlite")], capsys)
    assert_one_line_error(code, err, "sed: unknown key", "did you mean 'seeds'?")
