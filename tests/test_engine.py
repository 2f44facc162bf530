"""The event engine: at/after/cancel/run(until) semantics and the named random streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from apfsim.engine import COMPACT_MIN, Engine, EventHandle, RandomStreams

# ---------------------------------------------------------------------- ordering


def test_equal_times_run_in_scheduling_order() -> None:
    """Ties break FIFO by seq, whether scheduled with at() or after()."""
    eng = Engine()
    seen: list[str] = []
    eng.at(10, seen.append, "a")
    eng.after(10, seen.append, "b")
    eng.at(10, seen.append, "c")
    eng.after(3, seen.append, "early")
    eng.run(until=10)
    assert seen == ["early", "a", "b", "c"]


def test_events_scheduled_for_now_by_a_callback_run_after_those_already_queued() -> None:
    eng = Engine()
    seen: list[str] = []

    def first(_: object) -> None:
        seen.append("first")
        eng.after(0, seen.append, "spawned")

    eng.at(5, first)
    eng.at(5, seen.append, "second")
    eng.run(until=5)
    assert seen == ["first", "second", "spawned"]


def test_times_are_honoured_in_order_regardless_of_scheduling_order() -> None:
    eng = Engine()
    seen: list[int] = []
    for t in (40, 10, 30, 20, 0):
        eng.at(t, seen.append, t)
    eng.run(until=100)
    assert seen == [0, 10, 20, 30, 40]


def test_callback_sees_now_equal_to_its_event_time() -> None:
    eng = Engine()
    stamps: list[tuple[int, int]] = []
    for t in (7, 3, 11):
        eng.at(t, lambda t0: stamps.append((t0, eng.now)), t)
    eng.run(until=20)
    assert stamps == [(3, 3), (7, 7), (11, 11)]


# ---------------------------------------------------------------------- run(until)


def test_run_until_includes_events_at_until_and_leaves_later_ones() -> None:
    eng = Engine()
    seen: list[int] = []
    for t in (50, 100, 101):
        eng.at(t, seen.append, t)
    eng.run(until=100)
    assert seen == [50, 100]
    assert eng.now == 100
    assert eng.pending() == 1
    eng.run(until=200)
    assert seen == [50, 100, 101]
    assert eng.now == 200


def test_now_equals_until_after_run_even_with_an_empty_queue() -> None:
    eng = Engine()
    eng.run(until=1234)
    assert eng.now == 1234
    eng.run(until=1234)
    assert eng.now == 1234


def test_after_is_relative_to_now_after_a_run() -> None:
    eng = Engine()
    seen: list[int] = []
    eng.run(until=1000)
    eng.after(5, lambda _: seen.append(eng.now))
    eng.run(until=2000)
    assert seen == [1005]


def test_self_rescheduling_callback() -> None:
    eng = Engine()
    times: list[int] = []

    def tick(_: object) -> None:
        times.append(eng.now)
        eng.after(10, tick)

    eng.after(0, tick)
    eng.run(until=95)
    assert times == list(range(0, 100, 10))
    assert eng.events_run == 10
    assert eng.pending() == 1  # the tick at 100


def test_callback_receives_its_argument() -> None:
    eng = Engine()
    got: list[object] = []
    payload = {"gfn": 42}
    eng.after(1, got.append, payload)
    eng.after(2, got.append)  # arg defaults to None
    eng.run(until=2)
    assert got[0] is payload
    assert got[1] is None


# ---------------------------------------------------------------------- past and negative


def test_scheduling_in_the_past_raises() -> None:
    eng = Engine()
    eng.run(until=10)
    with pytest.raises(ValueError, match="before now"):
        eng.at(9, print)
    eng.at(10, print)  # now itself is allowed
    assert eng.pending() == 1


def test_negative_delay_raises() -> None:
    eng = Engine()
    with pytest.raises(ValueError, match="negative delay"):
        eng.after(-1, print)
    eng.after(0, print)
    assert eng.pending() == 1


def test_a_rejected_schedule_leaves_the_queue_untouched() -> None:
    eng = Engine()
    eng.run(until=10)
    bads: tuple[Callable[[], EventHandle], ...] = (
        lambda: eng.at(0, print),
        lambda: eng.after(-5, print),
    )
    for bad in bads:
        with pytest.raises(ValueError):
            bad()
    assert eng.pending() == 0
    eng.run(until=20)
    assert eng.events_run == 0


# ---------------------------------------------------------------------- cancel


def test_cancel_tombstones_an_event() -> None:
    eng = Engine()
    seen: list[int] = []
    keep = eng.after(3, seen.append, 1)
    drop = eng.after(2, seen.append, 2)
    eng.cancel(drop)
    assert not Engine.is_pending(drop)
    assert Engine.is_pending(keep)
    assert eng.pending() == 1
    eng.run(until=10)
    assert seen == [1]


def test_cancel_twice_is_harmless() -> None:
    eng = Engine()
    seen: list[int] = []
    drop = eng.after(2, seen.append, 2)
    eng.after(2, seen.append, 1)
    eng.cancel(drop)
    eng.cancel(drop)
    eng.run(until=10)
    assert seen == [1]
    assert eng.events_run == 1


def test_cancel_after_run_is_harmless() -> None:
    eng = Engine()
    seen: list[int] = []
    handle = eng.after(2, seen.append, 2)
    eng.run(until=10)
    eng.cancel(handle)
    eng.cancel(handle)
    eng.run(until=20)
    assert seen == [2]
    assert eng.events_run == 1


def test_cancel_none_is_harmless() -> None:
    Engine().cancel(None)
    assert not Engine.is_pending(None)


def test_tombstones_far_in_the_future_are_compacted_away() -> None:
    """A compute segment's end "forever" away, cancelled by every interrupt, never reaches
    the top of the heap: without compaction the heap grows with the run."""
    eng = Engine()
    seen: list[int] = []
    forever = 1 << 62

    def interrupt(i: int) -> None:
        seen.append(i)
        eng.cancel(ends[-1])
        ends.append(eng.after(forever, seen.append, -1))
        if i < 100_000:
            eng.after(10, interrupt, i + 1)

    ends = [eng.after(forever, seen.append, -1)]
    eng.after(10, interrupt, 0)
    most = 0
    for until in [*range(0, 1_000_000, 10_000), 1_000_100]:
        eng.run(until)
        most = max(most, eng.queued())
    assert seen == list(range(100_001))
    assert eng.pending() == 1
    assert most <= 2 * COMPACT_MIN + 4
    assert eng.compactions > 1000


def test_compaction_keeps_the_order_of_events() -> None:
    eng = Engine()
    seen: list[int] = []
    handles = [eng.at(1000 - (i % 7) * 10, seen.append, i) for i in range(500)]
    for i, h in enumerate(handles):
        if i % 4:
            eng.cancel(h)
    assert eng.compactions >= 1
    eng.run(2000)
    kept = [i for i in range(500) if i % 4 == 0]
    assert seen == sorted(kept, key=lambda i: (1000 - (i % 7) * 10, i))


def test_a_callback_may_cancel_an_event_queued_for_the_same_instant() -> None:
    eng = Engine()
    seen: list[str] = []
    victim: list[EventHandle] = []
    eng.at(5, lambda _: eng.cancel(victim[0]))
    victim.append(eng.at(5, seen.append, "cancelled"))
    eng.at(5, seen.append, "kept")
    eng.run(until=5)
    assert seen == ["kept"]
    assert eng.events_run == 2


def test_events_run_counts_only_live_events() -> None:
    eng = Engine()
    handles = [eng.after(i, lambda _: None) for i in range(10)]
    for h in handles[::2]:
        eng.cancel(h)
    assert eng.pending() == 5
    eng.run(until=100)
    assert eng.events_run == 5
    assert eng.pending() == 0
    # Accumulates across runs.
    eng.after(1, lambda _: None)
    eng.run(until=200)
    assert eng.events_run == 6


def test_cancelled_events_do_not_advance_now_past_until() -> None:
    eng = Engine()
    h = eng.at(50, print)
    eng.cancel(h)
    eng.run(until=30)
    assert eng.now == 30
    eng.run(until=60)
    assert eng.now == 60
    assert eng.events_run == 0


# ---------------------------------------------------------------------- RandomStreams


def _draws(streams: RandomStreams, name: str, n: int = 8) -> list[float]:
    draws: list[float] = streams.stream(name).random(n).tolist()
    return draws


def test_same_name_same_sequence_across_instances() -> None:
    assert _draws(RandomStreams(7), "task:a") == _draws(RandomStreams(7), "task:a")


def test_stream_is_cached_per_name_within_an_instance() -> None:
    s = RandomStreams(7)
    assert s.stream("x") is s.stream("x")
    first = s.stream("x").random(4).tolist()
    rest = s.stream("x").random(4).tolist()
    assert first + rest == _draws(RandomStreams(7), "x", 8)


def test_different_names_give_different_sequences() -> None:
    s = RandomStreams(7)
    assert _draws(s, "task:a") != _draws(s, "task:b")
    assert _draws(s, "swap-read") != _draws(s, "swap-write")


def test_different_names_are_independent() -> None:
    """Drawing from one stream does not move another (common random numbers)."""
    a, b = RandomStreams(3), RandomStreams(3)
    a.stream("swap-read").random(10_000)
    a.stream("initial-memory").integers(0, 100, 500)
    assert _draws(a, "task:w") == _draws(b, "task:w")
    # And the creation order of streams does not matter.
    c = RandomStreams(3)
    c.stream("zzz")
    assert _draws(c, "task:w") == _draws(RandomStreams(3), "task:w")


def test_different_names_are_uncorrelated() -> None:
    s = RandomStreams(11)
    x = s.stream("a").random(20_000)
    y = s.stream("b").random(20_000)
    corr = float(((x - x.mean()) * (y - y.mean())).mean() / (x.std() * y.std()))
    assert abs(corr) < 0.03  # ~4 standard errors of 1/sqrt(20000)


def test_same_seed_identical_and_different_seed_different() -> None:
    assert _draws(RandomStreams(1), "x") == _draws(RandomStreams(1), "x")
    assert _draws(RandomStreams(1), "x") != _draws(RandomStreams(2), "x")


_CHILD = (
    "import json, sys\n"
    "from apfsim.engine import RandomStreams\n"
    "s = RandomStreams(5)\n"
    "names = ['task:a', 'swap-read', 'initial-memory', 'guest-kzalloc']\n"
    "print(json.dumps({n: s.stream(n).random(3).tolist() for n in names}))\n"
)


@pytest.mark.parametrize("hashseed", ["0", "12345"])
def test_stream_names_are_stable_across_processes(hashseed: str) -> None:
    """Streams derive from sha256 of the name, not the per-process salted hash()."""
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
    )
    child = json.loads(proc.stdout)
    here = RandomStreams(5)
    assert child == {n: here.stream(n).random(3).tolist() for n in child}


def _inline_chain(eng: Engine, ends: list[int], seen: list[tuple[str, int]]) -> None:
    """A handler that runs its successor in place while next_is allows, else schedules it."""
    if not ends:
        return
    t = ends.pop(0)
    if eng.next_is(t):
        eng.advance_to(t)
        seen.append(("inline", eng.now))
        _inline_chain(eng, ends, seen)
    else:

        def from_the_heap(_: object) -> None:
            seen.append(("heap", eng.now))
            _inline_chain(eng, ends, seen)

        eng.at(t, from_the_heap)


def test_next_is_only_before_every_queued_event_and_within_the_horizon() -> None:
    eng = Engine()
    assert not eng.next_is(0)  # outside run(): never
    answers: list[bool] = []

    def probe(_: object) -> None:
        answers.extend([eng.next_is(14), eng.next_is(15), eng.next_is(16), eng.next_is(21)])

    eng.at(10, probe)
    eng.at(15, lambda _: None)
    eng.run(until=20)
    # 14: before the event at 15. 15: that event was queued first, so it runs first.
    # 16: after it. 21: past the run's horizon (the outer loop must see the boundary).
    assert answers == [True, False, False, False]


def test_an_event_run_in_place_keeps_the_heap_order() -> None:
    seen: list[tuple[str, int]] = []
    eng = Engine()
    eng.at(25, lambda _: seen.append(("other", eng.now)))
    chain = [10, 20, 25, 30]
    eng.at(0, lambda _: _inline_chain(eng, chain, seen))
    eng.run(until=100)
    # 10 and 20 are next anyway; 25 ties with the event queued earlier, which runs first.
    assert seen == [("inline", 10), ("inline", 20), ("other", 25), ("heap", 25), ("inline", 30)]
    assert eng.inlined == 3 and eng.events_run == 3


def test_inline_off_sends_every_event_through_the_heap() -> None:
    seen: list[tuple[str, int]] = []
    eng = Engine(inline=False)
    chain = [10, 20]
    eng.at(0, lambda _: _inline_chain(eng, chain, seen))
    eng.run(until=100)
    assert seen == [("heap", 10), ("heap", 20)] and eng.inlined == 0
