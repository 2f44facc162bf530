"""Issue 13: bad scenario and sweep files are refused with one line and exit 2, never a
traceback, and a sweep or a guest never takes memory or time without bound (items 1, 2, 3,
9, 10, 12, 13, 14 and 16)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apfsim.host.backing import LognormalServiceTime
from apfsim.scenario import MAX_MEMORY_MIB, Scenario, load_scenario, scenario_to_toml
from apfsim.sweep import SweepError, SweepStore, load_sweep, parse_sweep, run_sweep
from apfsim.sweep.spec import MAX_POINTS
from cli_helpers import assert_one_line_error, cli

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import TINY, write_sweep

# A small valid scenario; each case below changes one thing in it.
BASE = """\
name = "small"
duration_s = 0.05

[guest]
memory_mib = 64
reserved_mib = 16

[host]
memory_limit_mib = 32

[host.swap]
distribution = "lognormal"

[[tasks]]
kind = "random_writer"
buffer_mib = 16

[[tasks]]
kind = "compute"
"""


def scenario_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def run_cli(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``apfsim ARGS`` in a fresh interpreter: a hang or a blow-up cannot take pytest along."""
    return subprocess.run(
        [sys.executable, "-m", "apfsim", *args], capture_output=True, text=True, timeout=timeout
    )


def test_the_base_scenario_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["run", str(scenario_file(tmp_path, BASE)), "-q", "-p", "sync"], capsys)
    assert code == 0, err


# -- item 1: a sweep's size is counted before anything is built -----------------------------

HUGE_SWEEPS: dict[str, tuple[dict[str, Any], str]] = {
    "two billion seeds": ({"seeds": 2_000_000_000}, "seeds"),
    "a logspace of two billion": (
        {"grid": {"host.swap.mean_us": {"logspace": [1.0, 100.0], "num": 2_000_000_000}}},
        "num",
    ),
    "three axes of 2000": (
        {
            "grid": {
                "host.swap.mean_us": {"linspace": [100.0, 200.0], "num": 2000},
                "host.swap.queue_depth": {"linspace": [1, 2000], "num": 2000, "integer": True},
                "host.exit_ns": {"linspace": [1, 2000], "num": 2000, "integer": True},
            }
        },
        "runs is more than 1000000",
    ),
    "a million points": (
        {"grid": {"host.exit_ns": list(range(1, MAX_POINTS + 2))}},
        f"{MAX_POINTS + 1} points",
    ),
}


@pytest.mark.parametrize("case", sorted(HUGE_SWEEPS))
def test_a_sweep_over_the_limits_is_refused_at_once(case: str, tmp_path: Path) -> None:
    change, needle = HUGE_SWEEPS[case]
    data: dict[str, Any] = {"scenario": "rfcv2-2020", "protocols": ["sync"], **change}
    data.setdefault("set", {"host.swap.distribution": "exponential"})
    path = write_sweep(tmp_path / "huge.toml", data)
    t0 = time.monotonic()
    proc = run_cli(["sweep", str(path), "--db", str(tmp_path / "x.sqlite")])
    assert_one_line_error(proc.returncode, proc.stderr, needle)
    assert time.monotonic() - t0 < 20


def test_a_999999_run_sweep_starts_in_seconds_in_bounded_memory(tmp_path: Path) -> None:
    """The runs are made on demand: nothing per run exists before the first one starts."""
    path = write_sweep(
        tmp_path / "big.toml",
        {
            "scenario": "rfcv2-2020",
            "protocols": ["sync"],
            "seeds": 99_999 * 10 + 9,
            "set": {"host.swap.distribution": "exponential"},
        },
    )
    probe = textwrap.dedent(
        f"""
        import resource, time
        t0 = time.perf_counter()
        from apfsim.sweep import load_sweep
        spec = load_sweep({str(path)!r})
        first, last = spec.runs[0], spec.runs[-1]
        started = time.perf_counter() - t0
        print(len(spec.runs), first.seed, last.seed, started,
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    runs, first, last, started, rss_kib = proc.stdout.split()
    assert (int(runs), int(first), int(last)) == (999_999, 0, 999_998)
    assert float(started) < 10 and int(rss_kib) < 500 * 1024


def test_run_keys_are_those_of_earlier_versions() -> None:
    """A sweep stored before the runs were made lazily resumes: the keys did not change.

    They last changed in issue 16: swap slots and the per-arch cost presets changed
    every run's results, so no stored run should be reused."""
    spec = parse_sweep(TINY, "tiny")
    keys = [r.key for r in spec.runs]
    assert keys[:3] == [
        "d29619d369b4a8a00bfc2483e5375123",
        "c7d499ffdd3aa6da0ae0e50c2212d946",
        "9106c04c7ce26f5d104c75ab4cd503b3",
    ]
    assert keys[23] == "9b28e3d3105eddb9c9baad99773374cb"
    assert list(spec.runs.run_keys()) == keys
    assert [spec.runs[i].key for i in (-1, 5)] == [keys[-1], keys[5]]


def test_a_resumed_sweep_skips_what_is_stored(tmp_path: Path) -> None:
    data = {**TINY, "duration_s": 0.05, "protocols": ["sync"], "seeds": 1}
    spec = parse_sweep(data, "tiny")
    store = SweepStore(tmp_path / "s.sqlite")
    first = run_sweep(spec, store, "serial")
    again = run_sweep(parse_sweep({**data, "seeds": [0, 1]}, "tiny"), store, "serial")
    assert (first.total, first.skipped, first.done) == (6, 0, 6)
    assert (again.total, again.skipped, again.done) == (12, 6, 6)


def test_each_grid_value_once(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"grid\.host\.swap\.mean_us: 100\.0 is given twice"):
        parse_sweep({**TINY, "grid": {"host.swap.mean_us": [100, 100.0]}}, "t")
    zipped = {"host.memory_limit_mib": [128, 128], "initial_memory.resident_fraction": [0.5, 0.5]}
    with pytest.raises(SweepError, match=r"zip: the values \(128, 0.5\) are given twice"):
        parse_sweep({**TINY, "zip": zipped}, "t")


# -- item 2: a sweep's duration_s is bounded like a scenario's --------------------------------


@pytest.mark.parametrize("value", ["1e12", "nan", "inf", "0", "86401", "true"])
def test_a_sweep_duration_out_of_bounds_is_refused(value: str, tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(f'scenario = "rfcv2-2020"\nprotocols = ["sync"]\nduration_s = {value}\n')
    proc = run_cli(["sweep", str(path), "--db", str(tmp_path / "x.sqlite")])
    assert_one_line_error(proc.returncode, proc.stderr, "duration_s", "86400")
    assert not (tmp_path / "x.sqlite").exists()


# -- item 3: guest and host memory are bounded ------------------------------------------------

MEMORY_CASES = {
    "a 1 TiB guest": ("memory_mib = 64", "memory_mib = 1048576", "guest.memory_mib"),
    "a guest just over the bound": (
        "memory_mib = 64",
        f"memory_mib = {MAX_MEMORY_MIB + 1}",
        "guest.memory_mib",
    ),
    "a host limit over the bound": (
        "memory_limit_mib = 32",
        f"memory_limit_mib = {MAX_MEMORY_MIB + 1}",
        "host.memory_limit_mib",
    ),
    "a host limit above the guest": (
        "memory_limit_mib = 32",
        "memory_limit_mib = 65",
        "host.memory_limit_mib: 65 MiB is more than guest.memory_mib (64)",
    ),
    "vcpus = true": ("memory_mib = 64", "memory_mib = 64\nvcpus = true", "guest.vcpus"),
    "a number as a string": ("reserved_mib = 16", 'reserved_mib = "16"', "guest.reserved_mib"),
}


@pytest.mark.parametrize("case", sorted(MEMORY_CASES))
def test_memory_and_types_out_of_bounds_are_refused(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new, needle = MEMORY_CASES[case]
    path = scenario_file(tmp_path, BASE.replace(old, new))
    code, out, err = cli(["run", str(path), "-q"], capsys)
    assert_one_line_error(code, err, needle)
    assert out == ""


def test_a_host_limit_equal_to_the_guest_is_allowed() -> None:
    data = tomllib.loads(BASE.replace("memory_limit_mib = 32", "memory_limit_mib = 64"))
    assert Scenario.model_validate(data).host.memory_limit_mib == 64


def test_the_largest_guest_starts_in_bounded_memory() -> None:
    probe = textwrap.dedent(
        f"""
        import resource
        from apfsim.scenario import scenario_from_dict
        from apfsim.simulation import Simulation
        sc = scenario_from_dict({{
            "duration_s": 0.01,
            "guest": {{"memory_mib": {MAX_MEMORY_MIB}}},
            "host": {{"memory_limit_mib": {MAX_MEMORY_MIB}}},
            "initial_memory": {{"resident_fraction": 0.5, "swapped_fraction": 0.5}},
            "tasks": [{{"kind": "memory_hog"}}, {{"kind": "compute"}}],
        }})
        Simulation(sc, "arm64-rfcv2", 0).run()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 500 * 1024  # KiB


# -- item 9: a memory hog left with no memory -------------------------------------------------

HOG = """\
duration_s = 0.05
[guest]
memory_mib = 16
reserved_mib = 0
[host]
memory_limit_mib = 16
[[tasks]]
kind = "random_writer"
buffer_mib = {writer}
[[tasks]]
kind = "memory_hog"
"""


def test_a_memory_hog_left_with_0_mib_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = scenario_file(tmp_path, HOG.format(writer=16))
    code, _, err = cli(["run", str(path), "-q"], capsys)
    assert_one_line_error(code, err, "tasks.1", "memory_hog", "0 MiB")


def test_a_second_memory_hog_without_a_size_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = scenario_file(tmp_path, HOG.format(writer=8) + '[[tasks]]\nkind = "memory_hog"\n')
    code, _, err = cli(["run", str(path), "-q"], capsys)
    assert_one_line_error(code, err, "tasks.2", "second memory_hog")


def test_a_memory_hog_left_with_1_mib_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = scenario_file(tmp_path, HOG.format(writer=15))
    code, _, err = cli(["run", str(path), "-q"], capsys)
    assert code == 0, err


# -- item 10: every float finite and within physical bounds -----------------------------------

FLOAT_CASES = {
    "work_s inf": ('kind = "compute"', 'kind = "compute"\nwork_s = inf', "tasks.1.compute.work_s"),
    "work_s 1e300": (
        'kind = "compute"',
        'kind = "compute"\nwork_s = 1e300',
        "tasks.1.compute.work_s",
    ),
    "burst_mean_us 0.1": (
        'kind = "compute"',
        'kind = "fault_loop"\nregion_mib = 1\nburst_mean_us = 0.1',
        "burst_mean_us",
    ),
    "burst_mean_us inf": (
        'kind = "compute"',
        'kind = "fault_loop"\nregion_mib = 1\nburst_mean_us = inf',
        "burst_mean_us",
    ),
    "max_us inf": ('distribution = "lognormal"', "max_us = inf", "host.swap.max_us"),
    "min_us denormal": ('distribution = "lognormal"', "min_us = 5e-324", "host.swap.min_us"),
    "exponential mean_us inf": (
        'distribution = "lognormal"',
        'distribution = "exponential"\nmean_us = inf',
        "host.swap.mean_us",
    ),
    "write_mean_scale inf": (
        'distribution = "lognormal"',
        "write_mean_scale = inf",
        "host.swap.write_mean_scale",
    ),
    "write_mean_scale denormal": (
        'distribution = "lognormal"',
        "write_mean_scale = 5e-324",
        "host.swap.write_mean_scale",
    ),
    "duration_s nan": ("duration_s = 0.05", "duration_s = nan", "duration_s"),
    "resident_fraction nan": (
        'distribution = "lognormal"',
        'distribution = "lognormal"\n[initial_memory]\nresident_fraction = nan',
        "initial_memory.resident_fraction",
    ),
    "a lognormal fit too wide": (
        'distribution = "lognormal"',
        "min_us = 0.001\nmean_us = 2.0\nmax_us = 86400000000.0\nfit_samples = 2",
        "the lognormal fit's median is under 1 ns",
    ),
    "an integer of 400 digits": (
        "reserved_mib = 16",
        "reserved_mib = " + "9" * 400,
        "guest.reserved_mib",
    ),
}


@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
def test_floats_out_of_bounds_are_refused(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new, needle = FLOAT_CASES[case]
    assert old in BASE
    path = scenario_file(tmp_path, BASE.replace(old, new, 1))
    code, out, err = cli(["run", str(path), "-q", "-p", "sync", "-p", "x86"], capsys)
    assert_one_line_error(code, err, needle)
    assert len(err) < 400, err  # a long value is cut short in the message
    assert out == ""


def test_a_heavy_tail_draw_stays_a_non_negative_int64() -> None:
    """The widest lognormal the bounds allow, and wider: no draw wraps to a negative delay."""
    sampler = LognormalServiceTime(1.0, 40.0, np.random.default_rng(0))
    draws = [sampler.sample() for _ in range(20_000)]
    assert min(draws) >= 0 and max(draws) <= 1 << 62


def test_the_extremes_the_bounds_allow_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extremes = BASE.replace(
        'distribution = "lognormal"',
        "min_us = 0.001\nmean_us = 1.0\nmax_us = 50.0\nwrite_mean_scale = 0.001",
    ).replace('kind = "compute"', 'kind = "fault_loop"\nregion_mib = 1\nburst_mean_us = 1.0')
    path = scenario_file(tmp_path, extremes)
    code, _, err = cli(["run", str(path), "-q", "-p", "sync", "-p", "x86"], capsys)
    assert code == 0, err


# -- item 12: bad sweep files ------------------------------------------------------------------

BAD_SWEEPS = {
    "a path into a string": ("", '[set]\n"name.r" = 1', "set: name.r: no such scenario key"),
    "an infinite linspace end": (
        "",
        '[grid]\n"host.swap.queue_depth" = {linspace = [1.0, inf], num = 3, integer = true}',
        "grid.host.swap.queue_depth: linspace needs two finite numbers",
    ),
    "a logspace that overflows": (
        "",
        '[grid]\n"host.swap.mean_us" = {logspace = [1e-300, 1e300], num = 3}',
        "grid.host.swap.mean_us: logspace overflows",
    ),
    "a linspace end of 400 digits": (
        "",
        '[grid]\n"host.exit_ns" = {linspace = [1, ' + "9" * 400 + "], num = 3}",
        "grid.host.exit_ns: linspace needs two finite numbers",
    ),
    "a list of protocol lists": ('protocols = [["sync"]]', "", "protocols: unknown protocol"),
    "a negative task index": (
        "",
        '[grid]\n"tasks.-1.count" = [1, 2]',
        "grid.tasks.-1.count: tasks.-1.count: no such scenario key",
    ),
    "a task index with an underscore": (
        "",
        '[grid]\n"tasks.0_1.count" = [1, 2]',
        "grid.tasks.0_1.count: tasks.0_1.count: no such scenario key",
    ),
    "a number as the name": ("name = 3", "", "name: must be a non-empty string"),
    "an empty name": ('name = ""', "", "name: must be a non-empty string"),
    "a table as the description": ("description = {a = 1}", "", "description: must be a string"),
    "a baseline list": ('baseline = ["sync"]', "", "baseline:"),
    "integer not a boolean": (
        "",
        '[grid]\n"host.exit_ns" = {linspace = [1, 3], num = 3, integer = 1}',
        "integer must be true or false",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_files_exit_2_in_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    top, tables, needle = BAD_SWEEPS[case]
    protocols = "" if "protocols" in top else 'protocols = ["sync"]'
    path = tmp_path / "bad.toml"
    path.write_text(f'scenario = "rfcv2-2020"\n{protocols}\n{top}\n{tables}\n')
    code, out, err = cli(["sweep", str(path), "--db", str(tmp_path / "x.sqlite")], capsys)
    assert_one_line_error(code, err, needle)
    assert out == ""


def test_a_seed_beyond_sqlite_integers_is_refused() -> None:
    """TOML cannot write one, the Python API can: a seed is stored as an SQLite INTEGER."""
    with pytest.raises(SweepError, match="seeds: a count >= 1 or a list of distinct seeds"):
        parse_sweep({**TINY, "seeds": [1 << 63]}, "t")


# -- item 13: a file name longer than 255 characters ------------------------------------------


@pytest.mark.parametrize("command", ["run", "show", "compare", "sweep"])
@pytest.mark.parametrize("name", ["a" * 300, "a" * 300 + ".toml", "dir/" + "a" * 300])
def test_a_file_name_too_long_is_one_line(
    command: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli([command, name], capsys)
    assert_one_line_error(code, err, "a" * 100)
    assert out == ""


def test_a_nul_in_a_file_name_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by tests/test_fuzz.py: a NUL byte in a sweep's scenario path raised ValueError."""
    path = tmp_path / "nul.toml"
    path.write_text('scenario = "a\\nb\\u0000"\nprotocols = ["sync"]\n')
    code, _, err = cli(["sweep", str(path), "--db", str(tmp_path / "x.sqlite")], capsys)
    assert_one_line_error(code, err, "scenario: a\\nb\\x00: cannot read the file")
    with pytest.raises(SweepError, match="cannot read the sweep file"):
        load_sweep("nul\x00.toml")


def test_a_json_path_too_long_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["run", "--json", "/tmp/" + "a" * 300 + "/r.json", "-q"], capsys)
    assert_one_line_error(code, err, "--json")


@pytest.mark.parametrize("flag", ["--trace", "--ftrace"])
def test_a_trace_directory_name_too_long_is_one_line(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = "/tmp/" + "b" * 300 + "/t.txt"
    code, _, err = cli(["run", "writer-compute", "--duration", "0.1", flag, path, "-q"], capsys)
    assert_one_line_error(code, err, flag)


# -- item 14: TOML nested too deeply -----------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "show", "compare", "sweep"])
@pytest.mark.parametrize("nesting", ["[" * 5000 + "]" * 5000, "{a = " * 5000 + "1" + "}" * 5000])
def test_toml_nested_5000_deep_is_one_line(
    command: str, nesting: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(f"x = {nesting}\n")
    code, _, err = cli([command, str(path)], capsys)
    assert_one_line_error(code, err, "not valid TOML", "nested too deeply")


# -- item 16: show writes valid TOML for any name ----------------------------------------------

NAMES = ["a\nb", "tab\there", "nul\x00", "bell\x07", "del\x7f", 'quote" back\\slash', "é ü 漢"]


@pytest.mark.parametrize("name", NAMES)
def test_show_writes_toml_that_reads_back_for_any_name(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    escaped = json.dumps(name).replace("\x7f", "\\u007f")  # a TOML basic string
    path = scenario_file(
        tmp_path,
        BASE.replace('name = "small"', f"name = {escaped}\ndescription = {escaped}").replace(
            'kind = "compute"', f'kind = "compute"\nname = {escaped}'
        ),
    )
    code, out, err = cli(["show", str(path)], capsys)
    assert code == 0 and err == ""
    again = Scenario.model_validate(tomllib.loads(out))
    assert again == load_scenario(path)
    assert again.name == again.description == again.tasks[1].name == name
    assert scenario_to_toml(again) == out


def test_an_error_naming_a_control_character_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = scenario_file(tmp_path, BASE + '[guest.costs]\n"bad\\nkey" = 1\n')
    code, _, err = cli(["run", str(path), "-q"], capsys)
    assert_one_line_error(code, err, "guest.costs.bad\\nkey")
