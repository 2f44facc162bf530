"""Issue 13 item 17: random scenario and sweep files, valid and invalid, through the CLI.

Each case writes a file, runs ``apfsim run`` (under one protocol drawn from all of them) or
``apfsim sweep`` (serial) in this process under a time limit, invariants on, and fails on
an escaping exception (a traceback), an exit code other than 0 or 2, an error of more than
one line, or a violated invariant (``run`` exits 1; a sweep stores the error with the run).

The default run is derandomised and short (APFSIM_FUZZ_EXAMPLES, default 50 scenarios and
50 sweeps). The long profile: ``APFSIM_FUZZ_EXAMPLES=1000 pytest tests/test_fuzz.py`` (2000
cases; see README, "Testing").
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apfsim.cli import main
from apfsim.registry import PROTOCOLS

EXAMPLES = int(os.environ.get("APFSIM_FUZZ_EXAMPLES", "50"))
FUZZED = list(PROTOCOLS)
TIME_LIMIT_S = 60  # per case: the valid scenarios below run in well under a second
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Values that are wrong somewhere: each replaces one key's value in a bad case.
BAD_VALUES: list[Any] = [
    math.inf,
    -math.inf,
    math.nan,
    5e-324,
    -1,
    0,
    1e300,
    10**30,
    int("9" * 300),
    True,
    "1",
    "a\nb\x00",
    [],
    [1, [2]],
    {"x": 1},
    "",
]


# -- a TOML writer for anything, inf, nan and control characters included ---------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in data.items())


# -- scenarios ---------------------------------------------------------------------------------

small_floats = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def tasks(draw: st.DrawFn, free_mib: int, vcpus: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["compute", "random_writer", "memory_hog", "fault_loop"]))
        task: dict[str, Any] = {"kind": kind}
        if draw(st.booleans()):
            task["cpu"] = draw(st.integers(0, vcpus - 1))
        if kind == "compute":
            task["count"] = draw(st.integers(1, 2))
            if draw(st.booleans()):
                task["work_s"] = draw(st.floats(1e-6, 0.05))
        elif kind == "random_writer":
            size = draw(st.integers(1, max(1, free_mib // 2)))
            free_mib -= size
            task |= {"buffer_mib": size, "access_ns": draw(st.integers(50, 2000))}
            task["kernel_fraction"] = draw(small_floats)
            task["kernel_mode"] = draw(
                st.sampled_from(
                    ["user", "kernel", "kernel_atomic", "kernel_rcu", "kernel_irqs_off"]
                )
            )
        elif kind == "memory_hog":
            if draw(st.booleans()):
                size = draw(st.integers(1, max(1, free_mib // 2)))
                free_mib -= size
                task["memory_mib"] = size
            task["passes"] = draw(st.integers(1, 3))
            if draw(st.booleans()):
                task["iterations"] = draw(st.integers(1, 3))
        else:
            size = draw(st.integers(1, max(1, free_mib // 4)))
            free_mib -= size
            task |= {"region_mib": size, "burst_mean_us": draw(st.floats(1.0, 5000.0))}
        out.append(task)
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """Small scenarios, most of them valid: 16-256 MiB, 1-4 vCPUs, milliseconds of time."""
    memory = draw(st.integers(16, 256))
    reserved = draw(st.integers(0, 16))
    vcpus = draw(st.integers(1, 4))
    limit = draw(st.integers(1, memory))
    resident = draw(st.floats(0.0, limit / memory))
    distribution = draw(st.sampled_from(["lognormal", "exponential", "constant"]))
    swap: dict[str, Any] = {"distribution": distribution}
    swap["queue_depth"] = draw(st.integers(1, 64))
    if distribution == "lognormal":
        low = draw(st.floats(1.0, 200.0))
        mean = low * draw(st.floats(1.5, 50.0))
        swap |= {"min_us": low, "mean_us": mean, "max_us": mean * draw(st.floats(1.5, 100.0))}
        swap["fit_samples"] = draw(st.integers(2, 10_000))
    else:
        swap["mean_us"] = draw(st.floats(0.001, 20_000.0))
    swap["write_mean_scale"] = draw(st.floats(0.001, 10.0))
    tick_hz = draw(st.sampled_from([0, 100, 250, 1000]))
    cpus = draw(st.integers(0, 3)) if tick_hz else 0  # shared CPUs need the host tick
    return {
        "name": draw(st.text(max_size=8)),
        "description": draw(st.text(max_size=8)),
        "duration_s": draw(st.floats(0.001, 0.02)),
        "stop_when_done": draw(st.booleans()),
        "guest": {
            "arch": draw(st.sampled_from(["arm64", "x86", "s390"])),
            "vcpus": vcpus,
            "memory_mib": memory,
            "reserved_mib": reserved,
            "hz": draw(st.sampled_from([10, 100, 250, 1000])),
            "preempt": draw(st.sampled_from(["full", "voluntary"])),
            "steal_time_accounting": draw(st.booleans()),
            "no_kvmapf": draw(st.booleans()),
            "send_always": draw(st.booleans()),
            "preempt_count_config": draw(st.booleans()),
            "dummy_alloc_fail_probability": draw(st.sampled_from([0.0, 0.1, 0.9])),
        },
        "host": {
            "memory_limit_mib": limit,
            "tick_hz": tick_hz,
            "cpus": cpus,
            "pin_vcpus": cpus > 0 and draw(st.booleans()),
            "worker_finish_ns": draw(st.sampled_from([0, 3_000])),
            "page_cluster": draw(st.integers(0, 6)),
            "reclaim_batch": draw(st.integers(1, 64)),
            "swap": swap,
        },
        "initial_memory": {
            "resident_fraction": resident,
            "swapped_fraction": draw(st.floats(0.0, 1.0 - resident)),
        },
        "tasks": draw(tasks(memory - reserved, vcpus)),
    }


Keys = tuple[str | int, ...]


def paths(data: Any, prefix: Keys = ()) -> Iterator[Keys]:
    """The keys to every value in ``data`` (list items by index)."""
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        if isinstance(value, dict | list) and value:
            yield from paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def get_in(data: Any, keys: Keys) -> Any:
    for key in keys:
        data = data[key]
    return data


@st.composite
def mutated(draw: st.DrawFn, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as it is (half the time), or with a key set to a bad value, an unknown key,
    or a table dropped."""
    choice = draw(st.sampled_from(["valid", "valid", "bad value", "unknown key", "drop"]))
    if choice == "valid":
        return data
    keys = draw(st.sampled_from(sorted(paths(data), key=repr)))
    parent = get_in(data, keys[:-1])
    if choice == "bad value":
        parent[keys[-1]] = draw(st.sampled_from(BAD_VALUES))
    elif choice == "unknown key" and isinstance(parent, dict):
        parent["bogus\nkey"] = 1
    elif choice == "unknown key":
        data["bogus"] = 1
    else:
        top = keys[0]
        assert isinstance(top, str)  # a path into a table starts with a key, not an index
        del data[top]
    return data


@st.composite
def garbled(draw: st.DrawFn, text: str) -> str:
    """``text`` as it is (mostly), cut short, with a line twice, or nested too deep."""
    choice = draw(st.sampled_from(["same"] * 7 + ["cut", "line twice", "deep"]))
    lines = text.splitlines(keepends=True)
    if choice == "cut":
        return text[: draw(st.integers(0, len(text)))]
    if choice == "line twice" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        return "".join(lines[: i + 1] + lines[i:])
    if choice == "deep":
        depth = draw(st.integers(1, 5000))
        return text + "deep = " + "[" * depth + "]" * depth + "\n"
    return text


# -- running a case ----------------------------------------------------------------------------


class CaseTimeout(Exception):
    """A case ran past TIME_LIMIT_S."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise CaseTimeout(f"over {TIME_LIMIT_S} s")


def apfsim(args: list[str]) -> tuple[int, str]:
    """``apfsim ARGS`` in this process under the time limit: (exit code, stderr)."""
    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def check_outcome(code: int, err: str, text: str) -> None:
    assert code in (0, 2), f"exit {code}: {err}\n--- file:\n{text}"
    if code == 2:
        assert err.startswith("apfsim: error: ") and len(err.splitlines()) == 1, (err, text)
    assert "Traceback" not in err, err


@pytest.mark.slow  # 50 runs and 50 sweeps, about 20 s: the full tier
@FUZZ
@given(data=st.data())
def test_random_scenarios_run_or_exit_2(data: st.DataObject) -> None:
    scenario = data.draw(mutated(data.draw(scenarios())))
    protocol = data.draw(st.sampled_from(FUZZED))
    text = data.draw(garbled(toml_document(scenario)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.toml"
        path.write_text(text)
        code, err = apfsim(["run", str(path), "-p", protocol, "-q"])
    check_outcome(code, err, f"{text}\n(protocol {protocol})")


@st.composite
def sweeps(draw: st.DrawFn) -> dict[str, Any]:
    """Small sweeps over a random scenario: at most 2 x 2 points, 2 protocols, 2 seeds."""
    base = draw(scenarios())
    axes = sorted(".".join(map(str, k)) for k in paths(base) if k[0] not in ("name", "description"))
    sweep: dict[str, Any] = {
        "scenario": "./base.toml",
        "protocols": draw(st.lists(st.sampled_from(FUZZED), min_size=1, max_size=2, unique=True)),
        "seeds": draw(st.one_of(st.integers(1, 2), st.just([0, 7]))),
        "duration_s": draw(st.floats(0.001, 0.01)),
    }
    for section in ("grid", "zip"):
        if draw(st.booleans()):
            path = draw(st.sampled_from(axes))
            value = get_in(base, tuple(int(k) if k.isdigit() else k for k in path.split(".")))
            if isinstance(value, bool):
                values: Any = [True, False]
            elif isinstance(value, int | float) and draw(st.booleans()):
                kind = draw(st.sampled_from(["linspace", "logspace"]))
                values = {kind: [value, value * 2 + 1], "num": 2}
                if isinstance(value, int):
                    values["integer"] = True
            else:
                values = [value]
            sweep[section] = {path: values}
    if "zip" in sweep and "grid" in sweep and set(sweep["zip"]) == set(sweep["grid"]):
        del sweep["zip"]
    return {"sweep": draw(mutated(sweep)), "base": base}


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_random_sweeps_run_or_exit_2(data: st.DataObject) -> None:
    case = data.draw(sweeps())
    text = data.draw(garbled(toml_document(case["sweep"])))
    base_text = toml_document(case["base"])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "base.toml").write_text(base_text)
        path = Path(tmp) / "sweep.toml"
        path.write_text(text)
        db = Path(tmp) / "out.sqlite"
        code, err = apfsim(["sweep", str(path), "--executor", "serial", "--db", str(db), "-q"])
        errors = []
        if code == 1 and db.exists():
            with sqlite3.connect(db) as con:
                errors = [
                    r[0] for r in con.execute("SELECT error FROM runs WHERE error IS NOT NULL")
                ]
    assert not errors, f"runs failed: {errors[:3]}\n--- sweep:\n{text}\n--- base:\n{base_text}"
    check_outcome(code, err, f"{text}\n--- base:\n{base_text}")


LOST_WAKEUP = """\
duration_s = 0.01
[guest]
arch = "x86"
memory_mib = 16
reserved_mib = 0
hz = 10
preempt_count_config = false
[host]
memory_limit_mib = 1
tick_hz = 0
page_cluster = 0
reclaim_batch = 1
[host.swap]
queue_depth = 1
min_us = 1.0
mean_us = 2.0
max_us = 4.0
fit_samples = 2
[initial_memory]
resident_fraction = 0.0
swapped_fraction = 1.0
[[tasks]]
kind = "memory_hog"
passes = 1
"""


def test_x86_legacy_halted_waiter_woken_in_its_loop_is_not_a_lost_wakeup(tmp_path: Path) -> None:
    """The fuzzer's smallest x86-legacy case of issue 13 item 8: I6 called a halted waiter
    lost between its wake and the loop's next hlist_unhashed test (it is held to its node
    only in the HLT now; tests/test_x86_legacy_halted_wake.py)."""
    path = tmp_path / "s.toml"
    path.write_text(LOST_WAKEUP)
    code, err = apfsim(["run", str(path), "-p", "x86-legacy", "-q"])
    assert code == 0, err
