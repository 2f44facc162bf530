"""The event engine: ordering, cancellation, time, and named random streams."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from apfsim.engine import Engine, RandomStreams


def test_events_at_the_same_time_run_in_scheduling_order() -> None:
    eng = Engine()
    seen: list[str] = []
    for name in "abc":
        eng.at(10, seen.append, name)
    eng.after(5, seen.append, "early")
    eng.run(until=10)
    assert seen == ["early", "a", "b", "c"]


def test_cancel_is_a_tombstone_and_harmless_twice_or_late() -> None:
    eng = Engine()
    seen: list[int] = []
    keep = eng.after(3, seen.append, 1)
    drop = eng.after(2, seen.append, 2)
    eng.cancel(drop)
    eng.cancel(drop)
    assert not Engine.is_pending(drop) and Engine.is_pending(keep)
    assert eng.pending() == 1
    eng.run(until=100)
    eng.cancel(keep)
    assert seen == [1]
    assert eng.events_run == 1


def test_run_stops_at_until_and_sets_now() -> None:
    eng = Engine()
    seen: list[int] = []
    eng.at(50, seen.append, 50)
    eng.at(150, seen.append, 150)
    eng.run(until=100)
    assert seen == [50] and eng.now == 100
    eng.run(until=200)
    assert seen == [50, 150] and eng.now == 200


def test_callbacks_can_schedule_more_events() -> None:
    eng = Engine()
    count = [0]

    def tick(_: object) -> None:
        count[0] += 1
        eng.after(10, tick)

    eng.after(0, tick)
    eng.run(until=95)
    assert count[0] == 10


def test_scheduling_in_the_past_or_with_negative_delay_raises() -> None:
    eng = Engine()
    eng.run(until=10)
    with pytest.raises(ValueError, match="before now"):
        eng.at(5, print)
    with pytest.raises(ValueError, match="negative delay"):
        eng.after(-1, print)


def test_streams_repeat_per_name_and_differ_between_names() -> None:
    a, b = RandomStreams(7), RandomStreams(7)
    assert a.stream("x").random(4).tolist() == b.stream("x").random(4).tolist()
    assert a.stream("y").random(4).tolist() != RandomStreams(7).stream("x").random(4).tolist()
    assert (
        RandomStreams(8).stream("x").random(4).tolist()
        != RandomStreams(7).stream("x").random(4).tolist()
    )


def test_a_stream_does_not_depend_on_draws_from_other_streams() -> None:
    """Common random numbers: the workload stream is the same whatever else was drawn."""
    a, b = RandomStreams(3), RandomStreams(3)
    a.stream("swap-read").random(1000)
    assert a.stream("task:w").random(3).tolist() == b.stream("task:w").random(3).tolist()


def test_stream_names_are_stable_across_processes() -> None:
    """Derived with sha256, not the per-process salted hash()."""
    code = (
        "from apfsim.engine import RandomStreams; print(RandomStreams(5).stream('task:a').random())"
    )
    outs = set()
    for salt in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=salt)
        outs.add(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
    assert len(outs) == 1
    assert float(outs.pop()) == RandomStreams(5).stream("task:a").random()
