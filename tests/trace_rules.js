// The trace-event rules a viewer applies (Perfetto's JSON importer, chrome://tracing),
// checked in the browser on a parsed trace: the same rules as trace_rules.py.
// Nesting uses DevTools' arithmetic (ts + dur in doubles, no tolerance), and async events
// must carry process-scoped ids (id2.local).
// checkTrace(doc) returns {ok, error, tracks, slices, touching, asyncPairs, flows, counters}.
"use strict";

function checkTrace(doc) {
  const NEEDS = {
    X: ["name", "cat", "pid", "tid", "ts", "dur"],
    b: ["name", "cat", "id2", "pid", "tid", "ts"],
    e: ["name", "cat", "id2", "pid", "tid", "ts"],
    s: ["cat", "id", "pid", "tid", "ts"],
    t: ["cat", "id", "pid", "tid", "ts"],
    f: ["cat", "id", "pid", "tid", "ts"],
    C: ["name", "pid", "ts", "args"],
    M: ["name", "pid", "args"],
  };
  const out = { ok: false, error: null, tracks: [], slices: 0, touching: 0, asyncPairs: 0, flows: 0, counters: [] };
  const fail = (msg) => { out.error = msg; return out; };
  if (!doc || !Array.isArray(doc.traceEvents)) return fail("no traceEvents array");
  const named = new Set();
  const slices = new Map();
  const starts = new Map();
  const asyncs = new Map();
  const flows = new Map();
  const counters = new Set();
  for (const ev of doc.traceEvents) {
    const need = NEEDS[ev.ph];
    if (!need) return fail("unknown phase " + JSON.stringify(ev.ph));
    for (const key of need) if (!(key in ev)) return fail(ev.ph + " event without " + key);
    const track = ev.pid + "/" + ev.tid;
    if (ev.ph === "M") {
      if (ev.name === "thread_name") { named.add(track); out.tracks.push(ev.args.name); }
    } else if (ev.ph === "X") {
      if (!(ev.dur >= 0)) return fail("negative duration");
      if (!slices.has(track)) slices.set(track, []);
      slices.get(track).push([ev.ts, ev.ts + ev.dur, ev.name]);
      const key = track + "/" + ev.cat;
      if (!starts.has(key)) starts.set(key, new Set());
      starts.get(key).add(ev.ts);
    } else if (ev.ph === "b" || ev.ph === "e") {
      if ("id" in ev || ev.id2 === null || typeof ev.id2 !== "object" || !("local" in ev.id2)) {
        return fail("async event without id2.local");
      }
      const key = ev.cat + "|" + ev.pid + "|" + ev.id2.local;  // process-scoped
      if (!asyncs.has(key)) asyncs.set(key, []);
      asyncs.get(key).push([ev.ph, ev.ts]);
    } else if (ev.ph === "s" || ev.ph === "t" || ev.ph === "f") {
      const key = ev.cat + "|" + ev.id;
      if (!flows.has(key)) flows.set(key, []);
      flows.get(key).push(ev);
    } else if (ev.ph === "C") {
      for (const v of Object.values(ev.args)) if (typeof v !== "number") return fail("counter value not a number");
      counters.add(ev.name);
    }
  }
  for (const [track, items] of slices) {
    if (!named.has(track)) return fail("slices on unnamed track " + track);
    items.sort((a, b) => a[0] - b[0] || b[1] - a[1]);
    const stack = [];
    for (const [begin, end, name] of items) {
      while (stack.length && stack[stack.length - 1][1] <= begin) {
        if (stack[stack.length - 1][1] === begin) out.touching++;
        stack.pop();
      }
      if (stack.length && end > stack[stack.length - 1][1]) {
        return fail("slice " + name + " overlaps " + stack[stack.length - 1][2] + " on " + track);
      }
      stack.push([begin, end, name]);
    }
    out.slices += items.length;
  }
  for (const [key, items] of asyncs) {
    if (items.length !== 2 || items[0][0] !== "b" || items[1][0] !== "e") return fail("async " + key + " not one b then one e");
    if (items[1][1] < items[0][1]) return fail("async " + key + " ends before it begins");
  }
  out.asyncPairs = asyncs.size;
  for (const [key, items] of flows) {
    const phases = items.map((ev) => ev.ph).join("");
    if (!/^st*f$/.test(phases)) return fail("flow " + key + " phases " + phases);
    for (let i = 1; i < items.length; i++) if (items[i].ts < items[i - 1].ts) return fail("flow " + key + " goes back in time");
    for (const ev of items) {
      const bound = starts.get(ev.pid + "/" + ev.tid + "/" + ev.cat);
      if (!bound || !bound.has(ev.ts)) return fail("flow " + key + " point at " + ev.ts + " binds to no slice");
    }
  }
  out.flows = flows.size;
  out.counters = Array.from(counters).sort();
  out.ok = true;
  return out;
}
