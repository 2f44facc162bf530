"""Free page reporting (guest/page_reporting.py) and the host's discard (GuestMemory.discard)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apfsim.engine import Engine
from apfsim.guest.page_reporting import (
    PAGE_REPORTING_ACTIVE,
    PAGE_REPORTING_IDLE,
    PAGE_REPORTING_REQUESTED,
    PageReporting,
    ReportingParams,
)
from apfsim.host.backing import ConstantServiceTime, SwapDevice
from apfsim.host.io import HostMemoryIo
from apfsim.host.memory import GuestMemory, PageState
from apfsim.ports import NOWAIT_ZERO_FILL, RunCounters
from apfsim.scenario import Scenario, ScenarioError, scenario_from_dict, with_overrides
from apfsim.simulation import Simulation
from apfsim.workloads.base import Plan, Workload
from apfsim.workloads.tasks import MemoryHogTask

M, C, S, U, IO = (
    int(PageState.MAPPED),
    int(PageState.SWAPCACHE),
    int(PageState.SWAPPED),
    int(PageState.UNTOUCHED),
    int(PageState.IN_IO),
)


# ---------------------------------------------------------------------- the host's discard


def memory_with(states: list[int], limit: int = 1000) -> GuestMemory:
    mem = GuestMemory(len(states), limit)
    mem.state[:] = np.array(states, dtype=np.uint8)
    mem.dirty[:] = 1
    mem.referenced[:] = 1
    mem.alloc_swap(np.flatnonzero(np.isin(mem.state, [C, S, IO])))  # their copies in swap
    mem.resident = int(np.isin(mem.state, [M, C, IO]).sum())
    return mem


def test_discard_drops_resident_and_swapped_pages_and_uncharges() -> None:
    mem = memory_with([M, C, S, U, IO, M])
    dropped = mem.discard(np.arange(5, dtype=np.int64))
    assert dropped == 3  # MAPPED, SWAPCACHE, SWAPPED; UNTOUCHED has nothing, IN_IO waits
    assert mem.state.tolist() == [U, U, U, U, IO, M]
    assert mem.slot[:4].tolist() == [-1] * 4 and mem.slot[4] >= 0  # the zap frees slots
    assert int(np.count_nonzero(mem.owner >= 0)) == 1  # only the IN_IO page's is held
    assert mem.dirty[:3].tolist() == [0, 0, 0] and mem.referenced[:3].tolist() == [0] * 3
    assert mem.resident == 2  # the IN_IO page and gfn 5 stay charged
    assert mem.pages_discarded == 3 and mem.discards_skipped_in_io == 1
    mem.check()


def test_discarded_page_is_a_zero_fill_without_a_swap_read() -> None:
    engine = Engine()
    mem = memory_with([S, S, S, S])
    device = SwapDevice(engine, ConstantServiceTime(1000), ConstantServiceTime(1000), 1, 0)
    io = HostMemoryIo(engine, mem, device, 0, RunCounters())
    mem.discard(np.array([1, 2], dtype=np.int64))
    assert io.resolve_nowait(2) == NOWAIT_ZERO_FILL
    assert mem.state[2] == M and mem.zero_fills == 1
    # Readahead around a swapped neighbour no longer reads the discarded pages.
    assert mem.cluster_window(0, 4).tolist() == [0, 3]
    engine.run(until=10**9)
    assert device.reads == 0


def test_in_flight_read_survives_discard_and_completes() -> None:
    mem = memory_with([S, S])
    mem.start_read(np.array([0], dtype=np.int64))
    mem.discard(np.array([0, 1], dtype=np.int64))
    mem.finish_read(np.array([0], dtype=np.int64))
    assert mem.state.tolist() == [C, U] and mem.resident == 1
    mem.check()


# ---------------------------------------------------------------------- the guest's reporting


class FreeMemory(Workload):
    """A stand-in task whose free range the test sets."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__("free")
        self.lo, self.hi = lo, hi

    def plan(self, memory: GuestMemory) -> Plan:
        raise AssertionError("not run")

    def commit(self, memory: GuestMemory, elapsed_ns: int) -> bool:
        raise AssertionError("not run")

    def free_range(self) -> tuple[int, int]:
        return (self.lo, self.hi)


ORDER = 2  # 4-page blocks keep the arrays small
BLOCK = 1 << ORDER


def reporting(
    n_blocks: int, free: FreeMemory, capacity: int = 4, delay_ns: int = 1000, divisor: int = 16
) -> tuple[Engine, GuestMemory, PageReporting, list[int]]:
    engine = Engine()
    mem = GuestMemory(n_blocks * BLOCK, n_blocks * BLOCK)
    mem.initialise(np.random.default_rng(0), 0.5, 0.5)
    kicks: list[int] = []  # when each report call kicked the virtqueue
    params = ReportingParams(ORDER, delay_ns, capacity, divisor, 10, 100, 1)
    pr = PageReporting(engine, mem, params, [free], [], lambda: kicks.append(engine.now))
    return engine, mem, pr, kicks


def blocks_per_call(pr: PageReporting) -> list[int]:
    """Record the blocks of every report call from now on (read at each kick)."""
    sizes: list[int] = []
    kick = pr._kick
    seen = [pr.pages_reported]

    def recording() -> object:
        sizes.append((pr.pages_reported - seen[0]) // BLOCK)
        seen[0] = pr.pages_reported
        return kick()

    pr._kick = recording
    return sizes


def test_reporting_waits_page_reporting_delay() -> None:
    engine, _mem, pr, kicks = reporting(8, FreeMemory(0, 8 * BLOCK), delay_ns=5000)
    pr.register()
    assert pr.state == PAGE_REPORTING_REQUESTED
    engine.run(until=4999)
    assert kicks == [] and pr.pages_reported == 0
    engine.run(until=5000)
    assert kicks == [5000]


def test_frees_while_requested_schedule_one_pass() -> None:
    engine, _mem, pr, _kicks = reporting(8, FreeMemory(0, 8 * BLOCK), capacity=8)
    pr.register()
    for _ in range(5):
        pr.request()
    engine.run(until=10**6)
    assert pr.passes == 1 and pr.state == PAGE_REPORTING_IDLE


def test_at_most_capacity_blocks_per_call_and_the_budget() -> None:
    n_blocks, capacity, divisor = 64, 4, 2
    engine, mem, pr, _kicks = reporting(
        n_blocks, FreeMemory(0, n_blocks * BLOCK), capacity=capacity, divisor=divisor
    )
    sizes = blocks_per_call(pr)
    pr.register()
    # The first pass at 1000 ns: calls of at most 10 + 4 * 100 + 16 ns one after the other,
    # 9 of them; the second pass is 1000 ns after its end.
    engine.run(until=5500)
    budget = -(-n_blocks // (capacity * divisor))  # DIV_ROUND_UP(nr_free, CAPACITY * 16)
    assert sizes == [capacity] * (budget + 1)
    # The budget is spent with blocks left: REQUESTED, another pass PAGE_REPORTING_DELAY on.
    assert pr.state == PAGE_REPORTING_REQUESTED
    engine.run(until=10**6)
    assert max(sizes) <= capacity and sum(sizes) == n_blocks
    assert pr.pages_reported == n_blocks * BLOCK and pr.report_calls == len(sizes)
    assert np.all(mem.state == U) and mem.resident == 0
    assert pr.state == PAGE_REPORTING_IDLE


def test_reported_blocks_are_skipped_and_a_leftover_list_is_reported() -> None:
    free = FreeMemory(0, 6 * BLOCK)
    engine, _mem, pr, kicks = reporting(8, free, capacity=4)
    pr.register()
    engine.run(until=10**6)
    assert pr.report_calls == 2 and pr.pages_reported == 6 * BLOCK  # 4, then the leftover 2
    assert [t - kicks[0] for t in kicks] == [0, 10 + 4 * 100 + 4 * BLOCK]  # the call's time
    free.hi = 7 * BLOCK  # one more block is freed
    pr.request()
    engine.run(until=10**7)
    assert pr.report_calls == 3 and pr.pages_reported == 7 * BLOCK


def test_partial_blocks_and_allocated_blocks_are_not_reported() -> None:
    free = FreeMemory(BLOCK + 1, 5 * BLOCK - 1)  # only blocks 2 and 3 are wholly free
    engine, _mem, pr, _kicks = reporting(8, free, capacity=1)
    pr.register()
    engine.run(until=10**6)
    # Under the watermark (CAPACITY << order pages free) a pass reports nothing:
    # capacity 1 makes it BLOCK pages, which the free range passes.
    assert pr.pages_reported == 2 * BLOCK
    assert pr.reported.tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    free.lo = 3 * BLOCK  # block 2 allocated again: its mark goes
    pr.request()
    engine.run(until=10**7)
    assert pr.reported.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]


def test_no_pass_under_the_watermark() -> None:
    engine, _mem, pr, kicks = reporting(8, FreeMemory(0, 3 * BLOCK), capacity=4)
    pr.register()
    engine.run(until=10**6)
    assert pr.passes == 1 and kicks == [] and pr.state == PAGE_REPORTING_IDLE


def test_a_free_during_a_pass_asks_for_another() -> None:
    free = FreeMemory(0, 8 * BLOCK)
    engine, _mem, pr, _kicks = reporting(8, free, capacity=4)
    pr.register()
    engine.run(until=1000)  # the first call is under way
    assert pr.state == PAGE_REPORTING_ACTIVE
    pr.request()
    engine.run(until=1999)
    assert pr.passes == 1 and pr.state == PAGE_REPORTING_REQUESTED
    engine.run(until=10**6)
    assert pr.passes == 2 and pr.state == PAGE_REPORTING_IDLE


def test_memory_hog_frees_its_buffer_after_each_iteration() -> None:
    mem = GuestMemory(64, 64)
    hog = MemoryHogTask("h", 16, 32, passes=1, iterations=2, page_write_ns=1, guest_fault_ns=0)
    freed: list[tuple[int, int]] = []
    hog.on_free = lambda task: freed.append(task.free_range())
    assert hog.free_range() == (17, 48)  # nothing allocated yet but the page it faults on
    mem.state[:] = M
    plan = hog.plan(mem)
    assert hog.free_range() == (16 + 32, 48)  # the planned pages (all 32) are taken
    hog.commit(mem, plan.run_ns)
    assert freed == [(17, 48)]
    plan = hog.plan(mem)
    hog.commit(mem, plan.run_ns)
    assert hog.finished and hog.free_range() == (16, 48) and len(freed) == 2


# ---------------------------------------------------------------------- whole runs


def freeing_scenario(**overrides: object) -> Scenario:
    """A guest twice the host limit whose memory hog frees and re-touches its buffer."""
    data: dict[str, object] = {
        "duration_s": 5.0,
        "guest": {"vcpus": 1, "memory_mib": 16, "reserved_mib": 2},
        "host": {"memory_limit_mib": 8, "swap": {"distribution": "constant", "mean_us": 200.0}},
        "initial_memory": {"resident_fraction": 0.5, "swapped_fraction": 0.5},
        "tasks": [{"kind": "memory_hog", "passes": 1, "iterations": 2}],
    }
    sc = scenario_from_dict(data)
    return with_overrides(sc, overrides) if overrides else sc


@pytest.mark.parametrize("protocol", ["sync", pytest.param("x86", marks=pytest.mark.slow)])
def test_reporting_turns_swap_ins_of_freed_memory_into_zero_fills(protocol: str) -> None:
    off = freeing_scenario()
    on = freeing_scenario(
        **{
            "guest.free_page_reporting": True,
            "guest.page_reporting.delay_ns": 10_000_000,
            "guest.page_reporting.capacity": 2,  # the watermark: 2 << 9 pages free, 4 MiB
            # The free memory starts as it is off: only what the hog frees is reported.
            "initial_memory.reported": False,
        }
    )
    r_off = Simulation(off, protocol, 3, check=True).run()
    sim = Simulation(on, protocol, 3, check=True)
    r_on = sim.run()
    assert r_off.tasks[0].state == r_on.tasks[0].state == "done"
    assert r_on.memory["swap_reads"] < r_off.memory["swap_reads"]
    assert r_on.faults["zero_fill"] > r_off.faults["zero_fill"]
    assert r_on.memory["report_calls"] > 0 and r_on.memory["pages_discarded"] > 0
    assert "report_calls" not in r_off.memory
    sim.memory.check()


def test_reported_at_start_or_not() -> None:
    """The guest up for long (reported) starts with its free memory discarded; a fresh
    registration reports it PAGE_REPORTING_DELAY in."""
    base = {"guest.free_page_reporting": True, "duration_s": 0.001}
    up = Simulation(freeing_scenario(**base), "sync", 0)
    fresh = Simulation(freeing_scenario(**base, **{"initial_memory.reported": False}), "sync", 0)
    hog = up.memory.n_pages - 2 * 256  # the hog's buffer, all of it free at t=0
    assert up.memory.count(PageState.UNTOUCHED) >= hog - (1 << 9)
    assert fresh.memory.count(PageState.UNTOUCHED) < hog // 4
    up.run()
    assert up.reporting is not None and up.reporting.report_calls == 0


def test_reporting_tunables_are_inert_without_reporting() -> None:
    """Tunables with reporting off are accepted, as a sweep over both leaves them, and
    change nothing (a time-dilated scenario scales them too)."""
    sc = freeing_scenario(**{"guest.page_reporting.delay_ns": 4_000_000_000})
    assert sc.guest.page_reporting.delay_ns == 4_000_000_000 and not sc.guest.free_page_reporting


def test_default_scenario_records_no_reporting_keys() -> None:
    sc = freeing_scenario()
    record = json.dumps(sc.model_dump(mode="json"))
    assert "report" not in record and "balloon" not in record
    on = freeing_scenario(**{"guest.free_page_reporting": True})
    assert on.model_dump(mode="json")["guest"]["free_page_reporting"] is True
    # The Python dump (apfsim show, overrides) keeps every key.
    assert "balloon" in sc.model_dump(mode="python")["host"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"initial_memory.reported": True}, "initial_memory.reported"),
        ({"guest.free_page_reporting": True, "guest.page_reporting.capacity": 0}, "capacity"),
    ],
)
def test_bad_reporting_keys_are_one_line_errors(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ScenarioError, match=field) as err:
        freeing_scenario(**overrides)
    assert "\n" not in str(err.value)
