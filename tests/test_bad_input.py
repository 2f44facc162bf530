"""Issue 13: bad scenario and sweep files are refused with one line and exit 2, never a
traceback, and a sweep or a guest never takes memory or time without bound (items 1, 2, 3,
9, 10, 12, 13, 14 and 16)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from apfsim.host.backing import LognormalServiceTime
from apfsim.scenario import MAX_MEMORY_MIB, Scenario, load_scenario, scenario_to_toml
from cli_helpers import assert_one_line_error, cli

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


# -- item 13: a file name longer than 255 characters ------------------------------------------


@pytest.mark.parametrize("command", ["run", "show", "compare", "sweep"])
@pytest.mark.parametrize("name", ["a" * 300, "a" * 300 + ".toml", "dir/" + "a" * 300])
def test_a_file_name_too_long_is_one_line(
    command: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli([command, name], capsys)
    assert_one_line_error(code, err, "a" * 100)
    assert out == ""


def test_a_json_path_too_long_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["run", "--json", "/tmp/" + "a" * 300 + "/r.json", "-q"], capsys)
    assert_one_line_error(code, err, "--json")


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
