"""The trace-event rules a viewer applies, checked in Python (the browser test checks the
same rules in JavaScript): phases and fields, proper nesting of complete events per
thread with DevTools' arithmetic (``ts + dur`` in doubles, no tolerance: a slice that ends
past the next one's ``ts`` nests it), async ``b``/``e`` pairs with process-scoped ids
(``id2.local``), every flow ``s`` ... ``f`` bound to slices."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

NEEDS = {
    "X": ("name", "cat", "pid", "tid", "ts", "dur"),
    "b": ("name", "cat", "id2", "pid", "tid", "ts"),
    "e": ("name", "cat", "id2", "pid", "tid", "ts"),
    "s": ("cat", "id", "pid", "tid", "ts"),
    "t": ("cat", "id", "pid", "tid", "ts"),
    "f": ("cat", "id", "pid", "tid", "ts"),
    "C": ("name", "pid", "ts", "args"),
    "M": ("name", "pid", "args"),
}


def check_trace(doc: dict[str, Any]) -> dict[str, Any]:
    """Return a summary; raise AssertionError naming the first broken rule."""
    events = doc["traceEvents"]
    named: set[tuple[int, int]] = set()
    slices: dict[tuple[int, int], list[tuple[float, float, str]]] = defaultdict(list)
    starts: dict[tuple[int, int, str], set[float]] = defaultdict(set)
    asyncs: dict[tuple[str, int, Any], list[tuple[str, float]]] = defaultdict(list)
    flows: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    counters: set[str] = set()
    for ev in events:
        ph = ev.get("ph")
        assert ph in NEEDS, f"unknown phase {ph!r}: {ev}"
        for key in NEEDS[ph]:
            assert key in ev, f"{ph} event without {key}: {ev}"
        if ph == "M":
            if ev["name"] == "thread_name":
                named.add((ev["pid"], ev["tid"]))
        elif ph == "X":
            assert ev["dur"] >= 0, ev
            slices[(ev["pid"], ev["tid"])].append((ev["ts"], ev["ts"] + ev["dur"], ev["name"]))
            starts[(ev["pid"], ev["tid"], ev["cat"])].add(ev["ts"])
        elif ph in "be":
            # Process-scoped: viewers key on cat, pid and the local id, and show the track
            # under the process (a global "id" lands under "Global Legacy Events").
            assert "id" not in ev and set(ev["id2"]) == {"local"}, f"async without id2.local: {ev}"
            asyncs[(ev["cat"], ev["pid"], ev["id2"]["local"])].append((ph, ev["ts"]))
        elif ph in "stf":
            flows[(ev["cat"], ev["id"])].append(ev)
        elif ph == "C":
            for v in ev["args"].values():
                assert isinstance(v, int | float), ev
            counters.add(ev["name"])
    touching = 0
    for track, items in slices.items():
        assert track in named, f"slices on unnamed track {track}"
        items.sort(key=lambda s: (s[0], -s[1]))
        stack: list[tuple[float, float, str]] = []
        for begin, end, name in items:
            while stack and stack[-1][1] <= begin:
                touching += stack[-1][1] == begin
                stack.pop()
            if stack:
                assert end <= stack[-1][1], (
                    f"slice {name} [{begin}, {end}] overlaps {stack[-1]} on track {track}"
                )
            stack.append((begin, end, name))
    for async_key, pair in asyncs.items():
        phases = [p for p, _ in pair]
        assert phases == ["b", "e"], f"async {async_key}: phases {phases}"
        assert pair[1][1] >= pair[0][1], f"async {async_key} ends before it begins"
    for flow_key, points in flows.items():
        flow_phases = "".join(ev["ph"] for ev in points)
        assert (
            flow_phases[0] == "s" and flow_phases[-1] == "f" and set(flow_phases[1:-1]) <= {"t"}
        ), f"flow {flow_key}: phases {flow_phases}"
        ts = [ev["ts"] for ev in points]
        assert ts == sorted(ts), f"flow {flow_key} goes back in time"
        for ev in points:
            bound = starts.get((ev["pid"], ev["tid"], ev["cat"]), set())
            assert ev["ts"] in bound, f"flow {flow_key} point {ev} binds to no slice"
    return {
        "tracks": sorted(named),
        "slices": sum(len(v) for v in slices.values()),
        "touching": touching,  # a slice whose end is exactly the next one's ts
        "async_pairs": len(asyncs),
        "flows": len(flows),
        "counters": sorted(counters),
    }
