"""Segment ends run in place (Engine.next_is / advance_to) change nothing but the event count.

A guest frame whose end is the next event anyway (a vector stub into ``kernel_entry`` into
its handler), a task burst between two misses, and a vCPU entry after its run-loop iteration
run in the handler that would have scheduled them. Every result must be byte-identical to a
run where each goes through the heap (``Engine(inline=False)``), on every protocol.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from apfsim.registry import PROTOCOLS
from apfsim.scenario import load_scenario
from apfsim.simulation import Simulation


def _run(scenario: str, protocol: str, inline: bool) -> tuple[dict[str, Any], int, int]:
    sim = Simulation(load_scenario(scenario), protocol, seed=3, check=True)
    sim.engine.inline = inline
    result = sim.run(duration_s=0.4).to_dict()
    events = result.pop("events")
    return result, events, sim.engine.inlined


def _same(scenario: str, protocol: str) -> None:
    heap, heap_events, none = _run(scenario, protocol, inline=False)
    fast, fast_events, inlined = _run(scenario, protocol, inline=True)
    assert none == 0
    assert json.dumps(fast, sort_keys=True) == json.dumps(heap, sort_keys=True)
    assert inlined > 0
    assert fast_events + inlined == heap_events


def test_arm64_entry_frames_run_in_place_with_identical_results() -> None:
    _same("writer-compute", "arm64-rfcv2")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["writer-compute", "natapov-2010"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_protocol_gives_identical_results_with_fewer_events(
    scenario: str, protocol: str
) -> None:
    _same(scenario, protocol)
