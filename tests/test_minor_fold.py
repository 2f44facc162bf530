"""Minor faults taken in line (workloads.base.MinorFold, guest/cpu.py:GuestCpu.unfold).

After postcopy has placed a page, the guest's first touch of it is a stage-2 fault whose GUP
finds the host PTE: ``kvm_handle_guest_abort`` -> ``user_mem_abort``, a minor fault, an
entry. A writer's plan takes such faults in line at their exact cost instead of stopping at
each. These tests hold it to its claim: the results are those of taking every fault as its
own exit, whatever reaches the vCPU between or inside them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apfsim.host.memory import GuestMemory, PageState
from apfsim.host.vcpu import Vcpu
from apfsim.scenario import scenario_from_dict
from apfsim.simulation import Simulation
from apfsim.workloads.base import MinorFold, StopKind
from apfsim.workloads.tasks import RandomWriterTask

MAPPED, PLACED, REMOTE = int(PageState.MAPPED), int(PageState.PLACED), int(PageState.REMOTE)


def scenario(**pc: Any) -> dict[str, Any]:
    """A 256 MiB guest migrated over 2 Gb/s (about 1.1 s): two writers with buffers of
    their own on vCPU 0 (one runs while the other waits for a page: its page-ready arrives
    during the runner's faults in line), two writers sharing 32 MiB on vCPU 1 (never in
    line: their pages are shared)."""
    return {
        "name": "minor-fold",
        "duration_s": 1.6,
        "guest": {"vcpus": 2, "memory_mib": 256, "reserved_mib": 0},
        "host": {"memory_limit_mib": 256},
        "postcopy": {"enabled": True, "link_gbps": 2.0, **pc},
        "tasks": [
            {"kind": "random_writer", "name": "near", "buffer_mib": 64, "cpu": 0},
            {"kind": "random_writer", "name": "far", "buffer_mib": 176, "cpu": 0},
            {"kind": "random_writer", "name": "shared", "buffer_mib": 16, "count": 2, "cpu": 1},
        ],
    }


class CountingVcpu(Vcpu):
    """Counts the events that reached a vCPU inside an in-line fault's round trip."""

    inside = 0

    def fold_fault(self, gfn: int, start: int) -> None:
        CountingVcpu.inside += 1
        super().fold_fault(gfn, start)


def run(d: dict[str, Any], protocol: str, fold: bool) -> tuple[dict[str, Any], int, int]:
    """(results without the event count, events, workloads taking faults in line)."""
    sim = Simulation(scenario_from_dict(d), protocol, seed=2, vcpu_type=CountingVcpu)
    folding = sum(w.fold is not None for w in sim.workloads)
    if not fold:
        for w in sim.workloads:
            w.fold = None
    result = sim.run().to_dict()
    events = result.pop("events")
    return result, events, folding


@pytest.mark.slow
@pytest.mark.parametrize(
    ("protocol", "pc"),
    [
        ("sync", {}),
        ("x86", {}),
        # RFCv2 kicks no running vCPU: its page-ready waits for the next exit, which may be
        # one of the faults taken in line (a completion unfolds the run at once).
        ("arm64-rfcv2", {"preempt": True}),
        ("arm64-sdei-ppi", {}),
        ("memory-fault-exit", {}),
        ("x86", {"page_size": "2m"}),
        # The guest runs on the source first; the switch-over stops and restarts every vCPU.
        ("x86", {"precopy_rounds": 1, "link_gbps": 4.0}),
        # A 40 us entry: completions and kicks land after a fault's handling, while its
        # entry is under way (the entry's run-loop iteration came before them).
        ("x86", {"entry_ns": 40_000}),
        ("arm64-rfcv2", {"preempt": True, "entry_ns": 40_000}),
    ],
)
def test_faults_in_line_give_the_results_of_one_exit_each(
    protocol: str, pc: dict[str, Any]
) -> None:
    CountingVcpu.inside = 0
    d = scenario(**{k: v for k, v in pc.items() if k != "entry_ns"})
    if "entry_ns" in pc:
        d["host"]["entry_ns"] = pc["entry_ns"]
    folded, folded_events, folding = run(d, protocol, fold=True)
    inside = CountingVcpu.inside
    plain, plain_events, _ = run(d, protocol, fold=False)
    assert folding == 2  # the private writers only
    assert folded == plain
    huge = pc.get("page_size") == "2m"
    assert plain["faults"]["minor"] > (10 if huge else 5_000)
    assert folded_events < plain_events  # the faults really were taken in line
    if not huge:
        if "precopy_rounds" not in pc:
            assert folded_events * 2 < plain_events
        assert inside > 0  # ticks did land inside a round trip and were taken at its entry


def writer(pages: list[int], access_ns: int = 100) -> RandomWriterTask:
    """A writer whose next batch is exactly ``pages``."""
    w = RandomWriterTask("w", 0, 1 << 20, access_ns, np.random.default_rng(0))
    w._pages = np.array(pages, dtype=np.int64)
    w._modes = np.zeros(len(pages), dtype=np.int8)
    w._pos = 0
    return w


def memory_of(states: list[int]) -> GuestMemory:
    mem = GuestMemory(len(states), len(states))
    mem.state[:] = np.array(states, dtype=np.uint8)
    return mem


def reference(
    states: list[int], pages: list[int], a: int, rt: int, block: int
) -> tuple[list[int], int]:
    """The plan one exit at a time: each access's completion time, up to the first page
    neither mapped nor placed; a fault precedes the first access to each placed block."""
    mapped: set[int] = set()
    t, done = 0, []
    for g in pages:
        s = states[g]
        if s != MAPPED and s != PLACED:
            break
        if s == PLACED and g // block not in mapped:
            mapped.add(g // block)
            t += rt
        t += a
        done.append(t)
    return done, t


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([MAPPED, PLACED, REMOTE]), min_size=16, max_size=16),
    st.lists(st.integers(0, 15), min_size=1, max_size=40),
    st.sampled_from([1, 2, 4]),
    st.integers(1, 4_000),
    st.integers(0, 8_000),
)
def test_plan_and_commit_match_one_exit_at_a_time(
    host_pages: list[int], pages: list[int], block: int, budget: int, at: int
) -> None:
    """Property: the plan's length and stop are those of taking each fault as its own exit
    (within the budget's rule), and a commit between faults applies exactly the accesses and
    faults done by then."""
    a, handled, rt = 100, 250, 300
    states = [host_pages[g // block] for g in range(16)]  # a host page is placed whole
    mem = memory_of(states)
    w = writer(pages, a)
    w.fold = MinorFold(handled, rt, block)
    w.fold_budget_ns = budget
    miss = mem.first_not_mapped(w._pages)
    if miss == len(pages) or states[pages[miss]] != PLACED:
        return  # a plan takes faults in line only from a first miss on a placed page
    plan = w.plan(mem)
    done, end = reference(states, pages, a, rt, block)
    starts = [] if plan.fold is None else plan.fold.starts.tolist()
    # Faults in line start within the budget, and the plan ends at a stop of the reference.
    assert all(s < budget for s in starts)
    if plan.kind is StopKind.RESUME:
        assert plan.run_ns == end == done[-1] and len(done) == len(pages)
    else:
        stop = w._planned
        assert plan.gfn == pages[stop]
        assert plan.run_ns == (done[stop - 1] if stop else 0)
    # Commit between faults (never inside one: the CPU unfolds first).
    elapsed = min(at, plan.run_ns)
    for s in starts:
        if s < elapsed < s + rt:
            elapsed = s
    before = mem.state.copy()
    w.commit(mem, elapsed)
    n = sum(1 for t in done[: w._pos + w._planned] if t <= elapsed)
    assert w._pos == n
    f = sum(1 for s in starts if s < elapsed)
    assert w.folded == f
    faulted = [] if plan.fold is None else plan.fold.gfns[:f].tolist()
    for g in range(16):
        if any(x // block == g // block for x in faulted) and before[g] == PLACED:
            assert mem.state[g] == MAPPED
        else:
            assert mem.state[g] == before[g]


def test_plan_stops_at_its_last_fault_within_the_budget() -> None:
    """Nothing in line is left open at the next observation: with the budget ending after
    the second of three faults starts, the plan takes the first in line and stops at the
    second (its own exit); with room for all, it stops at the remote page."""
    mem = memory_of([PLACED, MAPPED, PLACED, PLACED, REMOTE])
    w = writer([1, 0, 1, 2, 3, 4])
    w.fold = MinorFold(250, 300, 1)
    w.fold_budget_ns = 700  # faults would start at 100, 600, 1000
    plan = w.plan(mem)
    assert plan.fold is not None and plan.fold.starts.tolist() == [100]
    assert (plan.kind, plan.gfn, plan.run_ns) == (StopKind.MISS, 2, 600)
    w.fold_budget_ns = 10_000
    plan = w.plan(mem)
    assert plan.fold is not None and plan.fold.starts.tolist() == [100, 600, 1_000]
    assert (plan.kind, plan.gfn, plan.run_ns) == (StopKind.MISS, 4, 1_400)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["x86", "arm64-rfcv2"])
def test_event_on_a_fault_boundary_comes_first_as_with_separate_exits(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a host tick or a kick due at the very nanosecond a fault re-enters or
    the guest runs again. With separate exits the heap runs the event queued first: the
    tick (queued a period ago) before the vCPU's own entry, so the tick finds it in the
    host; a completion's request made at that instant is seen only at the next entry.
    Round costs (1 us accesses, 4 us round trips) put such ties in this run; the results
    must still be those of one exit per fault."""
    from apfsim.guest.cpu import GuestCpu

    ties = 0
    unfold = GuestCpu.unfold

    def counting(self: GuestCpu, now: int) -> None:
        nonlocal ties
        plan = self._plan
        assert plan is not None and plan.fold is not None
        s, rt = plan.fold.starts, plan.fold.round_trip_ns
        offset = now - self._seg_start
        ties += bool(np.isin(offset, np.concatenate([s, s + rt - 500, s + rt])))
        unfold(self, now)

    monkeypatch.setattr(GuestCpu, "unfold", counting)
    d = scenario()
    d["host"].update({"exit_ns": 500, "entry_ns": 500, "stage2_fault_ns": 2000})
    d["host"]["minor_fault_ns"] = 1000
    for task in d["tasks"]:
        task["access_ns"] = 1000
    folded, _, _ = run(d, protocol, fold=True)
    assert ties > 0
    plain, _, _ = run(d, protocol, fold=False)
    assert folded == plain
