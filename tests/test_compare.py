"""``apfsim compare``: flag parsing, one-line errors, jobs-independent JSON, the statistics."""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest

import apfsim.compare
import apfsim.pool
import apfsim.stats
from apfsim.api import compare
from apfsim.cli import main
from apfsim.scenario import ScenarioError, load_scenario
from apfsim.simulation import Simulation
from apfsim.stats import estimate, paired_ratios, t_quantile_975
from cli_helpers import assert_one_line_error, cli

# Two vCPUs, a shared random-writer buffer twice the host limit, a compute task per vCPU and
# one finite compute task (so completion times appear): well under a second per run.
TINY = """\
name = "tiny-compare"
duration_s = 0.2

[guest]
vcpus = 2
memory_mib = 64
reserved_mib = 16

[host]
memory_limit_mib = 16

[initial_memory]
resident_fraction = 0.25
swapped_fraction = 0.75

[[tasks]]
kind = "random_writer"
buffer_mib = 32
count = 2

[[tasks]]
kind = "compute"
count = 2

[[tasks]]
kind = "compute"
name = "finite"
work_s = 0.01
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


# ---------------------------------------------------------------------- flags and errors


@pytest.mark.parametrize(
    "flags",
    [
        ["-p", "sync,x86,halt-only"],
        ["--protocol", "sync", "--protocol", "x86,halt-only"],
        ["-p", "sync", "-p", "x86", "-p", " halt-only"],
    ],
)
def test_protocol_takes_comma_lists_and_repeats(
    flags: list[str], tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.json"
    args = ["compare", str(tiny), *flags, "--seeds", "1", "-j", "1", "-q", "--json", str(out)]
    assert cli(args, capsys) == (0, "", "")
    data = json.loads(out.read_text())
    assert data["protocols"] == ["sync", "x86", "halt-only"]
    assert [(r["protocol"], r["seed"]) for r in data["runs"]] == [
        ("sync", 0),
        ("x86", 0),
        ("halt-only", 0),
    ]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-p", "sync,bogus"], ["--protocol", "'bogus'", "x86", "halt-only"]),
        (["-p", "sync,"], ["--protocol", "empty"]),
        (["-p", "sync,sync"], ["--protocol", "once"]),
        (["-p", "x86,halt-only"], ["--baseline", "'sync'", "x86, halt-only"]),
        (["-p", "sync,x86", "--baseline", "halt-only"], ["--baseline", "'halt-only'"]),
        (["-p", "sync", "--seeds", "0"], ["--seeds", "at least 1", "got 0"]),
        (["-p", "sync", "--seeds", "-2"], ["--seeds", "got -2"]),
        (["-p", "sync", "--jobs", "0"], ["--jobs", "got 0"]),
        (["-p", "sync", "--duration", "0"], ["--duration"]),
        (["-p", "sync", "--seeds", "many"], ["--seeds"]),
        (["-p", "sync", "--executor", "proces"], ["--executor", "did you mean 'process'?"]),
        (["-p", "sync", "--scheduler", "tcp://x:1"], ["--scheduler", "only with --executor dask"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    args: list[str], needles: list[str], tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(["compare", str(tiny), *args], capsys)
    assert out == ""
    assert_one_line_error(code, err, *needles)


def test_unknown_scenario_and_missing_json_directory(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(["compare", "no-such-scenario", "-p", "sync"], capsys)
    assert_one_line_error(code, err, "no-such-scenario", "built-ins are")
    bad = tmp_path / "missing" / "c.json"
    code, _, err = cli(["compare", str(tiny), "-p", "sync", "--json", str(bad)], capsys)
    assert_one_line_error(code, err, "--json", "does not exist")


def test_api_checks_arguments_before_running(tiny: Path) -> None:
    with pytest.raises(ScenarioError, match="--protocol: unknown protocol 'nope'"):
        compare(tiny, ["sync", "nope"], seeds=1)
    with pytest.raises(ScenarioError, match="--baseline"):
        compare(tiny, ["x86"], seeds=1)
    with pytest.raises(ScenarioError, match="--seeds"):
        compare(tiny, ["sync"], seeds=0)
    with pytest.raises(ScenarioError, match="--seeds"):
        compare(tiny, ["sync"], seeds=[1, 1])
    with pytest.raises(ScenarioError, match="--jobs"):
        compare(tiny, ["sync"], seeds=1, jobs=0)


# ---------------------------------------------------------------------- determinism and jobs


class _SpyPool(ProcessPoolExecutor):
    """Records how the pool was built and which processes ran work for it."""

    made: ClassVar[list[_SpyPool]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kwargs = kwargs
        self.worker_pids: set[int] = set()
        _SpyPool.made.append(self)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self.worker_pids:
            self.worker_pids = {self.submit(os.getpid).result() for _ in range(4)}
        super().shutdown(wait, cancel_futures=cancel_futures)


def test_json_is_byte_identical_for_any_jobs_and_the_pool_uses_processes(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apfsim.pool, "ProcessPoolExecutor", _SpyPool)
    _SpyPool.made.clear()
    outputs = {}
    for jobs in ("1", "2"):
        path = tmp_path / f"j{jobs}.json"
        args = ["compare", str(tiny), "-p", "sync,x86", "--seeds", "3", "-j", jobs, "-q"]
        assert cli([*args, "--json", str(path)], capsys) == (0, "", "")
        outputs[jobs] = path.read_bytes()
    assert outputs["1"] == outputs["2"]

    # --jobs 1 made no pool; --jobs 2 made one forkserver pool of two separate processes.
    assert len(_SpyPool.made) == 1
    pool = _SpyPool.made[0]
    assert pool.kwargs["max_workers"] == 2
    assert pool.kwargs["mp_context"].get_start_method() == "forkserver"
    assert pool.worker_pids and os.getpid() not in pool.worker_pids

    data = json.loads(outputs["1"])
    assert data["schema_version"] == 1 and data["kind"] == "compare"
    assert data["seeds"] == [0, 1, 2] and data["baseline"] == "sync"
    assert [(r["protocol"], r["seed"]) for r in data["runs"]] == [
        (p, s) for p in ("sync", "x86") for s in (0, 1, 2)
    ]
    assert all("wall_time_s" not in r for r in data["runs"])
    assert outputs["1"].decode() == json.dumps(data, indent=2, sort_keys=True) + "\n"
    x86 = data["summary"]["x86"]
    assert set(x86["task.compute0.work_s"]) == {"mean", "ci95", "n"}
    assert "task.finite.completion_speedup" in x86["ratio_to_baseline"]
    assert "apf.not_present_injected" in x86 and "apf.sync_fallbacks" in x86


def test_seeds_are_common_random_numbers(tiny: Path) -> None:
    """The same seed under compare and under a direct Simulation gives the same result."""
    result = compare(tiny, ["sync", "x86"], seeds=2, jobs=1)
    direct = Simulation(load_scenario(tiny), "x86", 1).run()
    assert result.run("x86", 1).to_dict() == direct.to_dict()
    assert result.run("x86", 0).to_dict() != direct.to_dict()


# ---------------------------------------------------------------------- statistics


def test_paired_ratio_of_a_protocol_to_itself_is_exactly_one(tiny: Path) -> None:
    result = compare(tiny, ["sync", "x86"], seeds=3, baseline="x86", jobs=1)
    ratios = result.summary["x86"].ratio_to_baseline
    assert "kind.compute.work_rate" in ratios and "task.finite.completion_speedup" in ratios
    for key, e in ratios.items():
        if e.n:  # a task with no work at all has no ratio
            assert (e.mean, e.ci95, e.n) == (1.0, 0.0, 3), key
    assert paired_ratios([0.3, 2.5, None, 1.0], [0.3, 2.5, 1.0, 0.0]) == [1.0, 1.0, None, None]


def test_ci_matches_a_hand_computed_example() -> None:
    # values 1, 2, 3, 4: mean 2.5, s = sqrt(5/3) = 1.290994, t(0.975, 3) = 3.182446;
    # half-width = 3.182446 * 1.290994 / sqrt(4) = 2.054261.
    e = estimate([1.0, 2.0, 3.0, 4.0])
    assert e.mean == 2.5 and e.n == 4
    assert e.ci95 == pytest.approx(2.054261, abs=1e-6)
    assert estimate([2.0, None, 2.0]).ci95 == 0.0
    assert estimate([7.0]) == apfsim.stats.Estimate(7.0, None, 1)
    assert estimate([None]) == apfsim.stats.Estimate(None, None, 0)


@pytest.mark.parametrize(
    ("n", "expected"), [(2, 12.706), (3, 4.303), (5, 2.776), (10, 2.262), (31, 2.042)]
)
def test_t_quantiles_for_small_samples(n: int, expected: float) -> None:
    assert t_quantile_975(n - 1) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize(("dof", "expected"), [(40, 2.0211), (60, 2.0003), (120, 1.9799)])
def test_t_quantiles_beyond_the_table_are_close(dof: int, expected: float) -> None:
    assert t_quantile_975(dof) == pytest.approx(expected, abs=2e-4)
    assert t_quantile_975(dof) > t_quantile_975(10 * dof) > 1.959


def test_t_quantile_rejects_zero_dof() -> None:
    with pytest.raises(ValueError, match="dof"):
        t_quantile_975(0)


# ---------------------------------------------------------------------- table and scenario


def test_table_shows_every_protocol_and_the_ratios(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(
        ["compare", str(tiny), "-p", "sync,x86", "--seeds", "2", "-j", "1"], capsys
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("scenario tiny-compare  seeds 0..1 (n=2)")
    assert "sync" in lines[2] and "x86" in lines[2]
    assert any(line.startswith("[throughput / sync's") for line in lines)
    assert any(line.startswith("[completion speedup") for line in lines)
    ratio_row = next(line for line in lines if line.startswith("  all compute (3)") and "x" in line)
    assert "x1.000 ± 0.000" in ratio_row
    assert lines[-1].startswith("wall time:")


def test_natapov_2010_places_one_writer_and_one_counter_per_vcpu() -> None:
    sc = load_scenario("natapov-2010")
    assert (sc.guest.vcpus, sc.guest.memory_mib, sc.host.memory_limit_mib) == (4, 2048, 512)
    assert sc.duration_s == 60.0
    im = sc.initial_memory
    assert math.isclose(im.resident_fraction + im.swapped_fraction, 1.0)  # all touched
    assert im.resident_fraction * sc.guest.memory_mib == sc.host.memory_limit_mib
    sim = Simulation(sc, "sync", 0)
    for cpu in range(4):
        on_cpu = [sim.workload_of(t) for t in sim.tasks if t.cpu == cpu]
        assert sorted(type(w).__name__ for w in on_cpu) == ["ComputeTask", "RandomWriterTask"]


@pytest.mark.slow
def test_every_protocol_compared_on_the_default_scenario_from_the_cli(tmp_path: Path) -> None:
    """Issue 3 acceptance: all designs side by side; the JSON lists every protocol."""
    from apfsim.registry import PROTOCOLS
    from apfsim.scenario import DEFAULT_SCENARIO

    out = tmp_path / "all.json"
    args = ["compare", DEFAULT_SCENARIO, "--seeds", "2", "--duration", "1", "--quiet"]
    assert main([*args, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["protocols"] == list(PROTOCOLS)
    assert sorted(data["summary"]) == sorted(PROTOCOLS)
    assert len(data["runs"]) == 2 * len(PROTOCOLS)
    for name in PROTOCOLS:
        ratio = data["summary"][name]["ratio_to_baseline"]["kind.compute.work_rate"]
        assert ratio["n"] == 2 and ratio["mean"] > 0
