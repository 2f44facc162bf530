"""Reproduce the figures of docs/validation.md for the seed series' benchmark.

    python scripts/validate_rfcv2.py [--seeds N] [--quick]

Runs the built-in scenarios `rfcv2-2020` (memory hog + compute) and `rfcv2-2020-memonly`
under sync and arm64-rfcv2 on N seeds each, plus the sensitivity runs, on both cores (the
runner, through ``compare``), and prints markdown tables: the paired ratio arm64-rfcv2 /
sync per seed, its mean and a 95 % t-interval (``apfsim.stats``). Nothing here is tuned:
every run uses the scenario files as shipped, and each
sensitivity row changes exactly one parameter.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from apfsim.api import compare
from apfsim.metrics.results import ProtocolResult
from apfsim.scenario import Scenario, load_scenario, with_overrides
from apfsim.stats import estimate, paired_ratios


def _metric(result: ProtocolResult, metric: str) -> float:
    if metric == "compute_rate":
        return result.task("compute").work_s / result.sim_time_s
    completion = result.task("memhog").completion_s
    assert completion is not None, "memhog did not finish: raise duration_s"
    return completion


def paired(scenario: Scenario, metric: str, seeds: int) -> dict[str, Any]:
    """sync and arm64-rfcv2 on seeds 0..N-1 through the runner (``compare``, both cores);
    the ratio arm64-rfcv2 / sync paired by seed, its mean and 95 % t-interval."""
    result = compare(scenario, ["sync", "arm64-rfcv2"], seeds, jobs=2)
    sync = [_metric(result.run("sync", s), metric) for s in range(seeds)]
    apf = [_metric(result.run("arm64-rfcv2", s), metric) for s in range(seeds)]
    ratio = estimate(paired_ratios(apf, sync))
    assert ratio.mean is not None
    return {
        "sync": statistics.fmean(sync),
        "apf": statistics.fmean(apf),
        "ratio": ratio.mean,
        "half": float("nan") if ratio.ci95 is None else ratio.ci95,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip the sensitivity study")
    args = parser.parse_args()
    both = load_scenario("rfcv2-2020")
    mem = load_scenario("rfcv2-2020-memonly")
    print("| run | sync | arm64-rfcv2 | ratio (95 % CI) |")
    print("|---|---|---|---|")
    r = paired(both, "compute_rate", args.seeds)
    print(
        f"| compute thread, CPU share (work s / s) | {r['sync']:.4f} | {r['apf']:.4f} | "
        f"{r['ratio']:.3f} ± {r['half']:.3f} |"
    )
    r = paired(mem, "memhog_completion", args.seeds)
    print(
        f"| memory hog alone, completion (s) | {r['sync']:.2f} | {r['apf']:.2f} | "
        f"{r['ratio']:.4f} ± {r['half']:.4f} |"
    )
    if args.quick:
        return
    print()
    print("| change (one parameter) | compute ratio | memory-only ratio |")
    print("|---|---|---|")
    studies: list[tuple[str, dict[str, Any]]] = [
        ("none (as shipped)", {}),
        (
            "scale 1/8 (512 MiB guest, 256 MiB limit)",
            {
                "guest.memory_mib": 512,
                "guest.reserved_mib": 32,
                "host.memory_limit_mib": 256,
                "duration_s": 120.0,
            },
        ),
        ("guest.hz = 100", {"guest.hz": 100}),
        ("guest.hz = 1000, host.tick_hz = 1000", {"guest.hz": 1000, "host.tick_hz": 1000}),
        ("host.tick_hz = 0 (tickless host)", {"host.tick_hz": 0}),
        ("guest.steal_time_accounting = true", {"guest.steal_time_accounting": True}),
        ("guest.sched.wakeup_preemption = false", {"guest.sched.wakeup_preemption": False}),
        ("memory hog passes = 3 (two user passes)", {"tasks.0.passes": 3}),
        (
            "swap mean 0.2 ms",
            {
                "host.swap.mean_us": 200.0,
                "host.swap.min_us": 20.0,
                "host.swap.max_us": 10_000.0,
            },
        ),
        ("swap mean 10 ms", {"host.swap.mean_us": 10_000.0, "host.swap.max_us": 200_000.0}),
        ("page_cluster = 0 (no readahead)", {"host.page_cluster": 0}),
    ]
    for label, overrides in studies:
        c = paired(with_overrides(both, overrides), "compute_rate", args.seeds)
        # duration_s only bounds a memory-only run: it stops when the hog is done.
        mem_over = {k: v for k, v in overrides.items() if k != "duration_s"}
        mem_over["duration_s"] = 7200.0
        m = paired(with_overrides(mem, mem_over), "memhog_completion", args.seeds)
        print(
            f"| {label} | {c['ratio']:.3f} ± {c['half']:.3f} | {m['ratio']:.4f} ± {m['half']:.4f} |"
        )


if __name__ == "__main__":
    main()
