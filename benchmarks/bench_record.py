"""The speed record in one run (issue 12): the figures docs/performance.md keeps.

    python benchmarks/bench_record.py [--seconds S] [--json FILE] [--no-compiled]

1. The engine against a bare ``heapq`` loop of the same shape (``bench_engine.micro``:
   1000 self-rescheduling callbacks), as a ratio of events/s (wall time, as there).
2. Every built-in scenario under every protocol, ``S`` simulated seconds (default 2), seed 0,
   invariants on, in each build: events per simulated second (through the heap, and run in
   place: ``Engine.next_is``) and simulated seconds per CPU second. Each run is its own
   interpreter; the compiled build is a copy of ``src`` compiled by ``scripts/compile.py``
   in a temporary directory.
3. The model checker's 2x2x2 world of every protocol: states and states/s, in each build.

CPU time (``time.process_time``) of one run each: on a noisy machine, compare ratios
within one record, not absolute figures across records.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import subprocess
import sys
import tempfile
from itertools import count
from pathlib import Path
from typing import Any

from apfsim.registry import PROTOCOLS
from apfsim.scenario import builtin_scenarios
from bench_engine import events_per_s, micro  # this script's own directory

ROOT = Path(__file__).resolve().parent.parent

_SCENARIO = """
import json, sys, time
import apfsim.engine
from apfsim.scenario import load_scenario
from apfsim.simulation import Simulation
name, protocol, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
sim = Simulation(load_scenario(name), protocol, seed=0, check=True)
t0 = time.process_time()
sim.run(duration_s=seconds)
cpu = time.process_time() - t0
print(json.dumps({"cpu_s": cpu, "events": sim.engine.events_run,
                  "in_place": getattr(sim.engine, "inlined", 0),
                  "compiled": apfsim.engine.__file__.endswith(".so")}))
"""

_CHECK = """
import inspect, json, sys, time
from apfsim.check import WorldConfig, check
full = {"reduce": False} if "reduce" in inspect.signature(check).parameters else {}
t0 = time.process_time()
r = check(WorldConfig(protocol=sys.argv[1]), **full)
print(json.dumps({"cpu_s": time.process_time() - t0, "states": r.states}))
"""


def bare_heapq(processes: int = 1000, iterations: int = 1000) -> int:
    """``bench_engine.micro``'s loop with nothing but ``heapq``: the events it ran."""
    queue: list[list[Any]] = []
    seq = count()
    left = [iterations] * processes
    delays = [1000 + 100 * (i % 7) for i in range(processes)]
    now = 0

    def tick(i: int) -> None:
        left[i] -= 1
        if left[i]:
            heapq.heappush(queue, [now + delays[i], next(seq), tick, i])

    for i in range(processes):
        heapq.heappush(queue, [delays[i], next(seq), tick, i])
    ran = 0
    while queue:
        entry = heapq.heappop(queue)
        if entry[2] is None:
            continue
        now = entry[0]
        entry[2](entry[3])
        ran += 1
    return ran


def _child(code: str, args: list[str], src: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def compile_copy(tmp: Path) -> Path | None:
    """A compiled copy of ``src``, or None (no compiler, or mypyc failed: said on stderr)."""
    shutil.copytree(ROOT / "src", tmp / "src", ignore=shutil.ignore_patterns("*.so", "build"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compile.py"), "--src", str(tmp / "src")],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        print(f"compiled build skipped: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return tmp / "src"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="simulated s per run")
    parser.add_argument("--json", type=Path, help="also write the record here")
    parser.add_argument("--no-compiled", action="store_true", help="pure Python only")
    args = parser.parse_args()
    record: dict[str, Any] = {"seconds": args.seconds, "python": sys.version.split()[0]}

    bare, ours = events_per_s(bare_heapq), events_per_s(micro)
    record["engine"] = {"bare_heapq_events_per_s": bare, "engine_events_per_s": ours}
    print(f"engine: {ours:,.0f} events/s, bare heapq {bare:,.0f}: ratio {ours / bare:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        builds: dict[str, Path | None] = {"pure": None}
        if not args.no_compiled:
            compiled = compile_copy(Path(tmp))
            if compiled is not None:
                builds["compiled"] = compiled
        rows: list[dict[str, Any]] = []
        print(f"\nscenarios, {args.seconds:g} simulated s, seed 0, invariants on")
        print(
            f"  {'scenario':20s} {'protocol':16s} {'build':9s} {'events/sim-s':>13s} "
            f"{'in place/sim-s':>15s} {'sim-s/CPU-s':>11s}"
        )
        for scenario in builtin_scenarios():
            for protocol in PROTOCOLS:
                for build, src in builds.items():
                    out = _child(_SCENARIO, [scenario, protocol, str(args.seconds)], src)
                    row = {
                        "scenario": scenario,
                        "protocol": protocol,
                        "build": build,
                        "events_per_sim_s": out["events"] / args.seconds,
                        "in_place_per_sim_s": out["in_place"] / args.seconds,
                        "sim_s_per_cpu_s": args.seconds / out["cpu_s"],
                    }
                    rows.append(row)
                    print(
                        f"  {scenario:20s} {protocol:16s} {build:9s} "
                        f"{row['events_per_sim_s']:13,.0f} {row['in_place_per_sim_s']:15,.0f} "
                        f"{row['sim_s_per_cpu_s']:11.2f}",
                        flush=True,
                    )
        record["scenarios"] = rows
        checks: list[dict[str, Any]] = []
        print("\nmodel checker, 2x2x2 world")
        for protocol in PROTOCOLS:
            for build, src in builds.items():
                out = _child(_CHECK, [protocol], src)
                rate = out["states"] / out["cpu_s"] if out["cpu_s"] > 0 else 0.0
                checks.append(
                    {
                        "protocol": protocol,
                        "build": build,
                        "states": out["states"],
                        "states_per_s": rate,
                    }
                )
                print(
                    f"  {protocol:16s} {build:9s} {out['states']:8d} states {rate:9,.0f} states/s",
                    flush=True,
                )
        record["checker"] = checks
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
