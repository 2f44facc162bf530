"""Precopy rounds before postcopy's switch-over (apfsim.host.precopy; QEMU migration/ram.c
``ram_save_iterate`` and ``migration_bitmap_sync``, ``postcopy_start``)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pytest

from apfsim.host.memory import PageState
from apfsim.host.postcopy import PAGE_HEADER_BYTES, TARGET_PAGE, ZERO_PAGE_BYTES
from apfsim.host.vcpu import Vcpu
from apfsim.ports import Injection
from apfsim.scenario import scenario_from_dict
from apfsim.simulation import Simulation

MIB_PAGES = 256


def scenario(tasks: list[dict[str, Any]], **pc: Any) -> dict[str, Any]:
    """A 64 MiB guest on a 1 Gb/s link (a full round is about 0.5 s), half its pages never
    touched (zero pages on the wire)."""
    return {
        "name": "precopy-test",
        "duration_s": 2.0,
        "guest": {"vcpus": 1, "memory_mib": 64, "reserved_mib": 0},
        "host": {"memory_limit_mib": 64},
        "initial_memory": {"resident_fraction": 0.5},
        "postcopy": {"enabled": True, "link_gbps": 1.0, "precopy_rounds": 2, **pc},
        "tasks": tasks,
    }


COMPUTE = [{"kind": "compute"}]
WRITER = [{"kind": "random_writer", "buffer_mib": 8, "access_ns": 2_000}]


def run(d: dict[str, Any], protocol: str = "sync") -> dict[str, Any]:
    result = Simulation(scenario_from_dict(d), protocol, seed=1).run().to_dict()
    return result


def test_idle_guest_is_sent_once_and_switches_with_nothing_to_fetch() -> None:
    """A guest that writes nothing: the first round sends every page (zero pages as their
    header and flag byte), the second finds nothing dirty, the switch-over discards nothing
    and the migration ends with the downtime."""
    out = run(scenario(COMPUTE))
    pc = out["postcopy"]
    first, second = pc["precopy"]["rounds"]
    n = 64 * MIB_PAGES
    assert first["pages"] == n and first["zero_pages"] == n // 2
    nbytes = n // 2 * ZERO_PAGE_BYTES + n // 2 * (TARGET_PAGE + PAGE_HEADER_BYTES)
    assert first["duration_ms"] == pytest.approx(nbytes * 8 / 1e9 * 1e3, abs=1e-6)
    assert first["dirtied"] == 0 and second["pages"] == 0 and second["dirtied"] == 0
    switch = pc["precopy"]["switch_over_s"]
    assert switch == pytest.approx(first["duration_ms"] / 1e3, abs=1e-9)
    assert pc["host_pages_left"] == 0 and pc["pages_requested"] == pc["pages_background"] == 0
    assert pc["migration_time_s"] == pytest.approx(switch + pc["downtime_ms"] / 1e3, abs=1e-9)


def test_pages_dirtied_in_the_last_round_and_only_they_come_by_postcopy() -> None:
    """The writer dirties part of its buffer in each round: the next round resends exactly
    those, and the pages dirtied in the last round (and the switch-over's sync) are the
    ones postcopy then fetches, by request or by the background stream."""
    pc = run(scenario(WRITER))["postcopy"]
    first, second = pc["precopy"]["rounds"]
    assert 0 < first["dirtied"] <= 8 * MIB_PAGES
    assert second["pages"] == first["dirtied"] and second["zero_pages"] == 0
    assert pc["host_pages_left"] == 0
    assert pc["pages_requested"] + pc["pages_background"] == second["dirtied"] > 0


def test_rounds_dirty_what_the_writers_rate_predicts_and_converge() -> None:
    """Analytic check: n uniform random writes over B pages dirty B(1 - exp(-n/B)) distinct
    pages on average. A writer of one page per 100 us over B = 2,048 pages dirties about
    1,500 during the first round (0.27 s); the second resends only those (49 ms), during
    which it dirties about 440, so a second round leaves postcopy a third of the pages."""
    slow = [{**WRITER[0], "access_ns": 100_000}]
    one = run(scenario(slow, precopy_rounds=1))["postcopy"]
    two = run(scenario(slow, precopy_rounds=2))["postcopy"]
    b = 8 * MIB_PAGES
    for r in two["precopy"]["rounds"]:
        writes = r["duration_ms"] * 1e6 / 100_000
        assert r["dirtied"] == pytest.approx(b * (1 - math.exp(-writes / b)), rel=0.08)
    left_one = one["pages_requested"] + one["pages_background"]
    left_two = two["pages_requested"] + two["pages_background"]
    assert left_two * 3 < left_one


def test_the_vm_is_stopped_for_the_downtime() -> None:
    """vm_stop at the switch-over: a busy compute task loses exactly the longer downtime
    when the device state grows (64 MiB more is 537 ms more at 1 Gb/s)."""
    small = run(scenario(COMPUTE, device_state_kib=1024))
    large = run(scenario(COMPUTE, device_state_kib=1024 + 64 * 1024))
    extra_ns = (large["postcopy"]["downtime_ms"] - small["postcopy"]["downtime_ms"]) * 1e6
    assert extra_ns == pytest.approx(64 * 1024 * 1024 * 8, rel=1e-6)
    lost = small["tasks"][0]["work_s"] * 1e9 - large["tasks"][0]["work_s"] * 1e9
    assert lost == pytest.approx(extra_ns, rel=0.02)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"postcopy": {"source": "local"}}, "postcopy.precopy_rounds"),
        ({"initial_memory": {"swapped_fraction": 0.1}}, "initial_memory.swapped_fraction"),
    ],
)
def test_bad_precopy_scenarios_name_the_field(change: dict[str, Any], message: str) -> None:
    d = scenario(COMPUTE)
    for k, v in change.items():
        d[k] = {**d[k], **v}
    with pytest.raises(ValueError, match=message):
        scenario_from_dict(d)


class HeldVcpu(Vcpu):
    """Records every guest entry made while the VM is stopped."""

    during_downtime: ClassVar[list[tuple[int, int]]] = []

    def _entered(self, injections: list[Injection]) -> None:
        if self._hold_until > self.engine.now:
            HeldVcpu.during_downtime.append((self.index, self.engine.now))
        super()._entered(injections)


@pytest.mark.parametrize("link_gbps", [1.0, 1.01, 1.03, 1.07, 1.13])
def test_no_vcpu_enters_the_guest_while_the_vm_is_stopped(link_gbps: float) -> None:
    """Regression: vm_stop found a vCPU whose entry was under way (a 1 ms entry makes it
    likely) and let it run the guest during the downtime. The entry now completes only
    when the VM runs again, with what was left of its cost."""
    HeldVcpu.during_downtime = []
    d = scenario(
        [{"kind": "compute", "cpu": i} for i in range(4)],
        link_gbps=link_gbps,
        precopy_rounds=1,
    )
    d["guest"]["vcpus"] = 4
    d["host"]["entry_ns"] = 1_000_000
    d["duration_s"] = 0.8
    sim = Simulation(scenario_from_dict(d), "sync", seed=1, vcpu_type=HeldVcpu)
    result = sim.run().to_dict()
    assert result["postcopy"]["precopy"]["switch_over_s"] is not None
    assert HeldVcpu.during_downtime == []


def test_huge_host_pages_touched_in_part_arrive_whole() -> None:
    """With 2 MiB host pages precopy sends a host page whole: after the switch-over a host
    page holds no never-touched 4 KiB page unless none of it was ever touched."""
    d = scenario(COMPUTE, page_size="2m", precopy_rounds=1)
    d["duration_s"] = 0.6
    sim = Simulation(scenario_from_dict(d), "sync", seed=1)
    sim.run()
    assert sim.precopy is not None and sim.precopy.switch_ns > 0
    untouched = (sim.memory.state == PageState.UNTOUCHED).reshape(-1, 512)
    assert np.all(untouched.all(axis=1) | ~untouched.any(axis=1))
    assert untouched.all(axis=1).sum() < len(untouched)  # most host pages were touched
