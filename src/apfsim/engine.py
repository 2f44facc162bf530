"""Deterministic discrete-event core.

The event queue is a binary heap of ``[time_ns, seq, callback, arg]`` entries. Time is
integer nanoseconds; ``seq`` comes from a counter, so events at the same instant run in
the order they were scheduled (FIFO), which makes every run bit-reproducible.
Cancellation marks the entry as a tombstone (its callback becomes ``None``); the loop
skips tombstones when it pops them, so cancel is O(1) and nothing is removed from the
middle of the heap. A tombstone far in the future (a compute segment's end, cancelled by
each interrupt) would never reach the top, so once tombstones outnumber live entries the
heap is compacted: memory stays bounded by the live events, whatever the run length.
Compaction cannot change the order of events, which is fixed by the unique ``(time, seq)``.

Example::

    eng = Engine()
    seen: list[int] = []
    eng.after(10, seen.append, 1)
    handle = eng.after(5, seen.append, 2)
    eng.cancel(handle)
    eng.run(until=100)
    assert seen == [1] and eng.now == 100
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from itertools import count
from typing import Any

import numpy as np

__all__ = ["COMPACT_MIN", "Engine", "EventHandle", "RandomStreams"]

COMPACT_MIN = 64
"""Tombstones tolerated before the heap is compacted (below it a rebuild is not worth it)."""

# An event entry is a mutable list so that cancel() can tombstone it in place.
# NOTE: a list, not a dataclass, for performance: no per-event object beyond the entry.
EventHandle = list[Any]


class Engine:
    """Heap-of-callbacks event loop with integer-nanosecond time."""

    __slots__ = (
        *("_dead", "_queue", "_seq", "_until"),
        *("compactions", "events_run", "inline", "inlined", "now"),
    )

    def __init__(self, inline: bool = True) -> None:
        self.now: int = 0
        self.inline = inline  # False: next_is always says no (every event goes through the heap)
        self._queue: list[EventHandle] = []
        self._seq = count()
        self._dead = 0  # tombstones still in the heap
        self._until = -1  # the horizon of the run() in progress; -1 outside run()
        self.events_run: int = 0
        self.inlined: int = 0  # events run by their scheduler in place (next_is / advance_to)
        self.compactions: int = 0

    def at(self, time_ns: int, callback: Callable[[Any], object], arg: Any = None) -> EventHandle:
        """Schedule ``callback(arg)`` at absolute time ``time_ns`` (never in the past)."""
        if time_ns < self.now:
            raise ValueError(f"cannot schedule at {time_ns} ns, before now={self.now} ns")
        entry: EventHandle = [time_ns, next(self._seq), callback, arg]
        heappush(self._queue, entry)
        return entry

    def after(
        self, delay_ns: int, callback: Callable[[Any], object], arg: Any = None
    ) -> EventHandle:
        """Schedule ``callback(arg)`` ``delay_ns`` after now."""
        if delay_ns < 0:
            raise ValueError(f"negative delay {delay_ns} ns")
        entry: EventHandle = [self.now + delay_ns, next(self._seq), callback, arg]
        heappush(self._queue, entry)
        return entry

    def cancel(self, handle: EventHandle | None) -> None:
        """Tombstone a scheduled event; cancelling twice or after it ran is harmless."""
        if handle is not None and handle[2] is not None:
            handle[2] = None
            self._dead += 1
            if self._dead > COMPACT_MIN and 2 * self._dead > len(self._queue):
                self._compact()

    def _compact(self) -> None:
        """Drop every tombstone, in place (``run`` holds a reference to the list)."""
        queue = self._queue
        queue[:] = [entry for entry in queue if entry[2] is not None]
        heapify(queue)
        self._dead = 0
        self.compactions += 1

    def queued(self) -> int:
        """Entries in the heap, tombstones included (what the heap's memory is)."""
        return len(self._queue)

    @staticmethod
    def is_pending(handle: EventHandle | None) -> bool:
        """True while the event is queued: neither cancelled nor run."""
        return handle is not None and handle[2] is not None

    def pending(self) -> int:
        """Number of live (not cancelled) events still queued."""
        return sum(1 for entry in self._queue if entry[2] is not None)

    def next_is(self, time_ns: int) -> bool:
        """Would an event at ``time_ns``, scheduled now, be the very next to run?

        True when it lies within the current run's horizon and strictly before every queued
        entry (one at the same instant was scheduled earlier, so it would run first; a
        tombstone at the top only makes the answer conservative). Events that can only be
        scheduled by an event running before it cannot exist then, so the handler that would
        schedule it may instead, as its last act, :meth:`advance_to` ``time_ns`` and run it:
        the order of everything is exactly that of the heap.
        """
        queue = self._queue
        return self.inline and time_ns <= self._until and (not queue or time_ns < queue[0][0])

    def advance_to(self, time_ns: int) -> None:
        """Move the clock to an event that :meth:`next_is` allowed to run in place."""
        self.now = time_ns
        self.inlined += 1

    def run(self, until: int) -> None:
        """Run events with time <= ``until``; afterwards ``now == until``.

        The loop ends by testing its condition, never by an exception.
        """
        if until < self.now:
            raise ValueError(f"cannot run until {until} ns, before now={self.now} ns")
        queue = self._queue
        pop = heappop
        ran = 0
        self._until = until
        # NOTE: locals and a single tuple-unpack per event, for performance.
        while queue and queue[0][0] <= until:
            entry = pop(queue)
            callback = entry[2]
            if callback is None:
                self._dead -= 1
                continue
            entry[2] = None  # consumed: is_pending() is False from here on
            self.now = entry[0]
            callback(entry[3])
            ran += 1
        self._until = -1
        self.events_run += ran
        if until > self.now:
            self.now = until


def _stable_key(name: str) -> int:
    """A process-independent integer for a stream name (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


class RandomStreams:
    """Named numpy Generators derived from one scenario seed.

    Each source of randomness (a workload task, the swap device, ...) draws from its own
    stream, so two protocols run on the same seed see the same workload randomness
    (common random numbers) even though they make different numbers of draws elsewhere.
    """

    __slots__ = ("_streams", "seed")

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._streams: dict[str, np.random.Generator] = {}

    def stream(self, name: str) -> np.random.Generator:
        """The generator for ``name``; the same name always yields the same sequence."""
        rng = self._streams.get(name)
        if rng is None:
            seq = np.random.SeedSequence(entropy=self.seed, spawn_key=(_stable_key(name),))
            rng = np.random.Generator(np.random.PCG64(seq))
            self._streams[name] = rng
        return rng
