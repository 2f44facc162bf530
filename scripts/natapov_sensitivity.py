"""How the natapov-2010 ratios move when one assumption changes (issue 3's sensitivity study).

    python scripts/natapov_sensitivity.py params [--seeds N] [--duration SECONDS]

``params`` changes one unstated parameter at a time (scheduler, ticks, preemption, stall
accounting, per-operation costs, the swap device): rows no sweep file can express, since
each changes another key (or, for the costs, every cost at once). Each row is a ``compare``
on the runner; the table holds the paired work-rate ratios of the counting threads to sync
(mean ± 95 % CI over the seeds, ``apfsim.stats``). The latency study is the built-in sweep
``natapov-swap-latency`` (docs/validation.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from apfsim.api import compare
from apfsim.host.costs import cost_keys, resolve_costs
from apfsim.scenario import Scenario, load_scenario, with_overrides

Overrides = Callable[[Scenario], dict[str, Any]]
PROTOCOLS = ("halt-only", "x86")


def setting(key: str, value: Any) -> Overrides:
    return lambda base: {key: value}


def scale_costs(factor: float) -> Overrides:
    """Every per-operation cost (exits, injections, calls, handlers, context switches)."""

    def overrides(base: Scenario) -> dict[str, Any]:
        host = base.host.model_dump()
        out = {
            f"host.{key}": int(host[key] * factor) for key in ("stage2_fault_ns", "minor_fault_ns")
        }
        # The exit and operation costs as the runs charge them: the scenario's keys over
        # the preset of its arch (every protocol of this study runs on guest.arch, x86).
        costs = resolve_costs(base.host, base.guest.arch)
        out.update({key: int(ns * factor) for key, ns in cost_keys(costs).items()})
        out.update(
            {
                f"guest.costs.{key}": int(ns * factor)
                for key, ns in base.guest.costs.model_dump().items()
            }
        )
        return out

    return overrides


def unchanged(base: Scenario) -> dict[str, Any]:
    return {}


STUDIES: dict[str, list[tuple[str, Overrides]]] = {
    "params": [
        ("none (as shipped)", unchanged),
        ("guest.hz = 250", setting("guest.hz", 250)),
        ("guest.hz = 100", setting("guest.hz", 100)),
        ("host.tick_hz = 0 (tickless host)", setting("host.tick_hz", 0)),
        ("guest.preempt = full", setting("guest.preempt", "full")),
        ("guest.sched.latency_ns = 24 ms", setting("guest.sched.latency_ns", 24_000_000)),
        ("guest.sched.wakeup_preemption = false", setting("guest.sched.wakeup_preemption", False)),
        ("guest.steal_time_accounting = true", setting("guest.steal_time_accounting", True)),
        ("every per-operation cost x 0.1", scale_costs(0.1)),
        ("every per-operation cost x 10", scale_costs(10.0)),
        ("host.swap.queue_depth = 1", setting("host.swap.queue_depth", 1)),
        ("host.page_cluster = 0 (no readahead)", setting("host.page_cluster", 0)),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=None, help="simulated s per run")
    parser.add_argument("--skip", type=int, default=0, help="start at this row (resume)")
    args = parser.parse_args()
    base = load_scenario("natapov-2010")
    print("| change | " + " | ".join(f"{p} / sync" for p in PROTOCOLS) + " |")
    print("|---|" + "---|" * len(PROTOCOLS))
    for label, overrides in STUDIES[args.study][args.skip :]:
        scenario = with_overrides(base, overrides(base))
        result = compare(scenario, ["sync", *PROTOCOLS], args.seeds, duration_s=args.duration)
        summary = result.to_dict()["summary"]
        cells = []
        for proto in PROTOCOLS:
            r = summary[proto]["ratio_to_baseline"]["kind.compute.work_rate"]
            ci = "" if r["ci95"] is None else f" ± {r['ci95']:.3f}"
            cells.append(f"{r['mean']:.3f}{ci}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
