"""The optional compiled build (``APFSIM_COMPILED=1``: hatch_build.py and scripts/compile.py,
mypyc) against the pure-Python one.

The wheel is built as the README's compiled install builds it and unpacked in a temporary
directory, so the checkout stays pure Python. Every protocol must give byte-identical result
JSON in both builds, and a set of the test modules must pass against the compiled modules.
Skipped without a C compiler.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from apfsim.registry import PROTOCOLS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
    ),
]

# Each protocol, invariants on, on two scenarios where every design injects hundreds of
# not-presents and page-readies within 0.6 s (writer-compute) or swaps hard (natapov-2010).
_RUN = """
import json, sys
import apfsim.engine
from apfsim.api import run_protocol
out = {"compiled": apfsim.engine.__file__.endswith(".so")}
for name in sys.argv[1:]:
    out[name] = [
        run_protocol(scenario, name, seed=3, duration_s=0.6).to_dict()
        for scenario in ("writer-compute", "natapov-2010")
    ]
print(json.dumps(out, sort_keys=True))
"""

# The checker's worlds of 2 vCPUs, 2 tasks and 1 page (every protocol), and B5's mutant
# world, which breaks: what each search finds, step by step, must be the same in both builds.
_CHECK = """
import json, sys
import apfsim.check.world
from apfsim.check import WorldConfig, check
from apfsim.check.mutants import MUTANTS
out = {"compiled": apfsim.check.world.__file__.endswith(".so")}
for name in sys.argv[1:]:
    for mutant in (None, "B5") if name == "x86" else (None,):
        world = MUTANTS[mutant].world if mutant else {"pages": 1}
        r = check(WorldConfig(protocol=name, mutant=mutant, **world))
        v = r.violation
        out[f"{name}/{mutant}"] = [r.states, r.transitions, r.depth, r.goal_states, v and (
            v.prop, v.detail, [(step.action, list(step.effects)) for step in v.trace])]
print(json.dumps(out, sort_keys=True))
"""

# Test modules that run against the compiled modules as they are. The others build fakes
# of the wrong type (test_runloop, test_rfcv2_host), pickle compiled objects or read their
# instance dict (World.key, the attribute census in test_check and test_check_keys), or
# monkeypatch a function a compiled module bound at import (test_check's CLI case).
_SUITE = [
    "tests/test_engine.py",
    "tests/test_long_runs.py",
    "tests/test_replay.py",
    "tests/test_memory.py",
    "tests/test_async_pf_core.py",
    "tests/test_guest_driver.py",
    "tests/test_x86_variant.py",
    "tests/test_s390_pfault.py",
    "tests/test_natapov.py",
    "tests/test_x86_legacy_halted_wake.py",
    "tests/test_inline_events.py",
    "tests/test_host_cpus.py",
]


@pytest.fixture(scope="module")
def compiled_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel the README's ``APFSIM_COMPILED=1`` install builds (hatch_build.py), unpacked."""
    root = tmp_path_factory.mktemp("compiled")
    env = {**os.environ, "APFSIM_COMPILED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = root.glob("apfsim-*.whl")
    assert "-cp3" in wheel.name, f"{wheel.name} is not tagged for this platform"
    site = root / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    assert len(list(site.glob("apfsim/**/*.so"))) >= 30
    assert (site / "apfsim" / "py.typed").is_file()  # users' type checkers read our hints
    return site


def _results(src: Path | None, script: str = _RUN) -> dict[str, Any]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    done = subprocess.run(
        [sys.executable, "-c", script, *PROTOCOLS], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_both_builds_give_byte_identical_results_on_every_protocol(compiled_src: Path) -> None:
    compiled = _results(compiled_src)
    pure = _results(None)
    assert compiled.pop("compiled") is True
    assert pure.pop("compiled") is False
    for name in PROTOCOLS:
        assert json.dumps(compiled[name], sort_keys=True) == json.dumps(
            pure[name], sort_keys=True
        ), name


def test_both_builds_search_the_same_checker_worlds(compiled_src: Path) -> None:
    compiled = _results(compiled_src, _CHECK)
    pure = _results(None, _CHECK)
    assert compiled.pop("compiled") is True
    assert pure.pop("compiled") is False
    assert compiled == pure
    assert pure["x86/B5"][-1] is not None  # the mutant's violation, found by both


def test_the_test_suite_passes_against_the_compiled_modules(compiled_src: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(compiled_src)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_SUITE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:]
