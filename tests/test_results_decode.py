"""``ProtocolResult.from_dict``: the one validated decoder of results JSON (issue 15)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from apfsim.metrics.results import InvalidResults, ProtocolResult

COMPARE = Path(__file__).parent / "data" / "pipeline" / "compare.json"


def _runs() -> list[dict[str, Any]]:
    runs = json.loads(COMPARE.read_text())["runs"]
    return [{k: v for k, v in run.items() if k != "seed"} for run in runs]


def test_round_trip_is_exact() -> None:
    for run in _runs():
        assert ProtocolResult.from_dict(run).to_dict() == run
        walled = {**run, "wall_time_s": 1.5}
        assert ProtocolResult.from_dict(walled).to_dict(include_wall=True) == walled


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = path.split("/")
    here: Any = out
    for part in parents:
        here = here[int(part)] if isinstance(here, list) else here[part]
    if value is _DELETE:
        del here[last]
    else:
        here[int(last) if isinstance(here, list) else last] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("tasks/1/work_s", _DELETE, "runs[2].tasks[1]: missing 'work_s'"),
        ("tasks/0/ops", True, "runs[2].tasks[0].ops: expected an integer, got bool"),
        ("tasks/0/work_s", "1", "runs[2].tasks[0].work_s: expected a finite number, got str"),
        ("sim_time_s", math.inf, "runs[2].sim_time_s: expected a finite number, got float"),
        ("sim_time_s", 0.0, "runs[2].sim_time_s: must be positive (got 0.0)"),
        ("tasks", [], "runs[2].tasks: no task"),
        ("tasks", {}, "runs[2].tasks: expected a list, got dict"),
        ("vcpus/0/time_s/idle", _DELETE, "runs[2].vcpus[0].time_s: missing 'idle'"),
        ("faults/async", 1.5, "runs[2].faults.async: expected an integer, got float"),
        ("memory/ipis", None, "runs[2].memory.ipis: expected a finite number, got null"),
        ("apf", [], "runs[2].apf: expected an object, got list"),
        (
            "faults/fault_in_latency_us/cdf_us",
            [3.0, 1.0],
            "runs[2].faults.fault_in_latency_us.cdf_us: quantiles not in increasing order",
        ),
    ],
)
def test_bad_results_name_the_location(path: str, value: Any, message: str) -> None:
    damaged = _set(_runs()[2], path, value)
    with pytest.raises(InvalidResults) as err:
        ProtocolResult.from_dict(damaged, "runs[2]")
    assert str(err.value) == message


def test_not_an_object() -> None:
    with pytest.raises(InvalidResults, match=r"^result: expected an object, got list$"):
        ProtocolResult.from_dict([1, 2])
