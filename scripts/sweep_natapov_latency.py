"""How the natapov-2010 ratios move with swap-in latency (issue 3's sensitivity study).

    python scripts/sweep_natapov_latency.py [--seeds N] [--duration SECONDS]

The fitted swap-in distribution (min 36.2 us, mean 1.68 ms, max 55.7 ms) is scaled as a
whole to each mean; nothing else changes. Prints a markdown table of the paired work-rate
ratios of the counting threads to sync (mean ± 95 % CI).
"""

from __future__ import annotations

import argparse

from apfsim.api import compare
from apfsim.scenario import Scenario, load_scenario

MEANS_MS = (0.1, 0.3, 1.0, 3.0, 10.0)


def scaled(base: Scenario, mean_ms: float) -> Scenario:
    data = base.model_dump(mode="python")
    swap = data["host"]["swap"]
    factor = mean_ms * 1000.0 / swap["mean_us"]
    for key in ("min_us", "mean_us", "max_us"):
        swap[key] = swap[key] * factor
    return Scenario.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=None, help="simulated s per run")
    args = parser.parse_args()
    base = load_scenario("natapov-2010")
    print("| mean swap-in | halt-only / sync | x86 / sync |")
    print("|---|---|---|")
    for mean_ms in MEANS_MS:
        result = compare(
            scaled(base, mean_ms),
            ["sync", "halt-only", "x86"],
            args.seeds,
            duration_s=args.duration,
        )
        row = result.to_dict()["summary"]
        cells = []
        for proto in ("halt-only", "x86"):
            r = row[proto]["ratio_to_baseline"]["kind.compute.work_rate"]
            ci = "" if r["ci95"] is None else f" ± {r['ci95']:.3f}"
            cells.append(f"{r['mean']:.3f}{ci}")
        print(f"| {mean_ms:g} ms | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
