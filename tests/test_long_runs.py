"""Memory stays flat in run length: the event heap holds the live events, not the history.

Every interrupt of a compute segment cancels its end event, scheduled "forever" away
(guest/cpu.py); those tombstones never reach the top of the heap. Before the engine
compacted them, natapov-2010 under x86 held about 30,000 heap entries after 3 simulated
seconds for about 20 live events.
"""

from __future__ import annotations

import pytest

from apfsim.engine import COMPACT_MIN
from apfsim.scenario import load_scenario
from apfsim.simulation import Simulation


@pytest.mark.slow
def test_the_heap_is_bounded_by_the_live_events_in_a_long_run() -> None:
    sim = Simulation(load_scenario("natapov-2010"), "x86", seed=0, check=False)
    samples: list[tuple[int, int]] = []

    def sample(_: float) -> None:
        samples.append((sim.engine.queued(), sim.engine.pending()))

    sim.run(duration_s=3.0, progress=sample)
    assert len(samples) == 30
    assert sim.engine.compactions > 0
    for queued, live in samples:
        assert queued <= 2 * max(live, COMPACT_MIN) + 1, (queued, live)
