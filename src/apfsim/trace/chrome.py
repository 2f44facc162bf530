"""A streaming writer of Chrome trace-event JSON (the format ui.perfetto.dev and
chrome://tracing open).

Events are formatted to text as they happen and written in batches, so memory does not grow
with the length of the run. Timestamps are integer nanoseconds written as microseconds
with three decimals (exact). A viewer adds ``ts + dur`` in binary floating point, which can
land past the next slice's ``ts`` (4782.247 + 1114.649 = 5896.896000000001) and makes
DevTools nest the next slice under this one; so ``dur`` is written as the double for which
that sum is exactly the end's ``ts``. Async slices use process-scoped ids (``id2.local``),
so viewers put their tracks under the process. Every event is clipped to the trace window;
a flow is written only when all its points lie inside it, so every ``s`` has its ``f``.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

from apfsim.trace.output import TraceFile

__all__ = ["ChromeTraceWriter", "json_str"]

FLUSH_EVERY = 2048
CATEGORY = "apf"


def json_str(text: str) -> str:
    """A JSON string literal (names are escaped once, when a track or label is made)."""
    return json.dumps(text)


def _us(ns: int) -> str:
    return f"{ns // 1000}.{ns % 1000:03d}"


def ts_dur(start: int, end: int) -> tuple[str, str]:
    """``ts`` and ``dur`` (µs) of [start, end) ns, such that a viewer's double sum
    ``ts + dur`` is exactly the double of the end's ``ts``: the 3-decimal ``dur`` when it
    already is, else the double nearest the true duration that makes it so (in its
    shortest exact form). When ``ts`` and the end lie in one binade (as all do within
    8.4 s of a slice's start past 16.8 s) one exists; across a binade the sum can be a
    rounding tie that no double reaches, and then the end is the last double before the
    next ``ts`` (never past it: DevTools nests a slice that starts before one ends)."""
    ts, dur = _us(start), _us(end - start)
    ts_f, end_f = float(ts), float(_us(end))
    if ts_f + float(dur) == end_f:
        return ts, dur
    # The reals x with ts_f + x rounding to end_f: half an ulp either side of end_f.
    t, e = Fraction(ts_f), Fraction(end_f)
    lo = e - (e - Fraction(math.nextafter(end_f, -math.inf))) / 2 - t
    hi = e + (Fraction(math.nextafter(end_f, math.inf)) - e) / 2 - t
    d = float(min(max(Fraction(end - start, 1000), lo), hi))
    for _ in range(8):
        total = ts_f + d
        if total == end_f:
            return ts, repr(d)
        d = math.nextafter(d, -math.inf if total > end_f else math.inf)
    while ts_f + d > end_f:  # a tie no double reaches: end just before the next ts
        d = math.nextafter(d, -math.inf)
    return ts, repr(d)


class ChromeTraceWriter:
    """Writes ``{"traceEvents": [...]}`` incrementally; :meth:`close` ends the document."""

    def __init__(self, path: Path, window: tuple[int, int], metadata: dict[str, object]) -> None:
        self._file = TraceFile(path, "--trace")
        self._start, self._end = window
        self._buf: list[str] = []
        self._file.write(
            '{"displayTimeUnit":"ns","otherData":'
            + json.dumps(metadata, sort_keys=True)
            + ',"traceEvents":[\n'
        )
        self._first = True
        self.events_written = 0

    # -- plumbing --------------------------------------------------------------------------
    def _emit(self, event: str) -> None:
        self._buf.append(event)
        if len(self._buf) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        text = ",\n".join(self._buf)
        self._file.write(text if self._first else ",\n" + text)
        self._first = False
        self.events_written += len(self._buf)
        self._buf.clear()

    def close(self) -> None:
        self.flush()
        self._file.write("\n]}\n")
        self._file.close()

    def inside(self, ts: int) -> bool:
        return self._start <= ts < self._end

    # -- events ------------------------------------------------------------------------------
    def name_process(self, pid: int, name: str, sort_index: int) -> None:
        self._emit(
            f'{{"ph":"M","name":"process_name","pid":{pid},"tid":0,'
            f'"args":{{"name":{json_str(name)}}}}}'
        )
        self._emit(
            f'{{"ph":"M","name":"process_sort_index","pid":{pid},"tid":0,'
            f'"args":{{"sort_index":{sort_index}}}}}'
        )

    def name_thread(self, pid: int, tid: int, name: str) -> None:
        self._emit(
            f'{{"ph":"M","name":"thread_name","pid":{pid},"tid":{tid},'
            f'"args":{{"name":{json_str(name)}}}}}'
        )
        self._emit(
            f'{{"ph":"M","name":"thread_sort_index","pid":{pid},"tid":{tid},'
            f'"args":{{"sort_index":{tid}}}}}'
        )

    def slice(self, pid: int, tid: int, name: str, start: int, end: int, args: str = "") -> None:
        """A complete event ``X`` over [start, end), clipped; ``name`` and ``args`` are
        JSON literals."""
        s = start if start > self._start else self._start
        e = end if end < self._end else self._end
        if e <= s:
            return
        ts, dur = ts_dur(s, e)
        extra = f',"args":{args}' if args else ""
        self._emit(
            f'{{"ph":"X","cat":"{CATEGORY}","name":{name},"pid":{pid},"tid":{tid},'
            f'"ts":{ts},"dur":{dur}{extra}}}'
        )

    def marker(self, pid: int, tid: int, name: str, ts: int, args: str = "") -> None:
        """A 1 ns slice at ``ts`` that a flow point can bind to."""
        if not self._start <= ts < self._end:
            return
        start, dur = ts_dur(ts, ts + 1)
        extra = f',"args":{args}' if args else ""
        self._emit(
            f'{{"ph":"X","cat":"{CATEGORY}","name":{name},"pid":{pid},"tid":{tid},'
            f'"ts":{start},"dur":{dur}{extra}}}'
        )

    def async_span(
        self, pid: int, tid: int, ident: int, name: str, start: int, end: int, args: str
    ) -> None:
        """A nestable async slice: a ``b`` and its ``e``, keyed by ``ident`` within the
        process (``id2.local``: its track sits under process ``pid``), clipped."""
        s = start if start > self._start else self._start
        e = end if end < self._end else self._end
        if e < s or (e == s and not self._start <= start < self._end):
            return
        head = f'"cat":"{CATEGORY}","name":{name},"id2":{{"local":{ident}}},"pid":{pid},"tid":{tid}'
        self._emit(f'{{"ph":"b",{head},"ts":{_us(s)},"args":{args}}}')
        self._emit(f'{{"ph":"e",{head},"ts":{_us(e)}}}')

    def flow(self, ident: int, points: list[tuple[int, int, int]]) -> None:
        """Flow ``ident`` through ``points`` (pid, tid, ts), written only if all lie in the
        window: ``s`` then ``t``... then ``f``, each bound to the marker at its ts."""
        if len(points) < 2 or not all(self._start <= ts < self._end for _, _, ts in points):
            return
        last = len(points) - 1
        for i, (pid, tid, ts) in enumerate(points):
            ph = "s" if i == 0 else ("f" if i == last else "t")
            self._emit(
                f'{{"ph":"{ph}","cat":"{CATEGORY}","name":"apf","id":{ident},"pid":{pid},'
                f'"tid":{tid},"ts":{_us(ts)},"bp":"e"}}'
            )

    def counter(self, pid: int, name: str, ts: int, args: str) -> None:
        if self._start <= ts < self._end:
            self._emit(f'{{"ph":"C","name":{name},"pid":{pid},"ts":{_us(ts)},"args":{args}}}')
