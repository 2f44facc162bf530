"""Model checker speed: the acceptance world of every protocol, explored completely.

    python benchmarks/bench_check.py [PROTOCOL ...]

Targets (issue 4): the 2 vCPU x 2 task x 2 page world of each protocol completes in under
60 s; at least 100 k states/s. Prints states, transitions, depth, seconds and states/s.
"""

from __future__ import annotations

import sys

from apfsim.check import WorldConfig, check
from apfsim.registry import PROTOCOLS

TARGET_SECONDS = 60.0
TARGET_STATES_PER_S = 100_000


def main(names: list[str]) -> None:
    print(
        f"2x2x2 worlds (targets: complete in < {TARGET_SECONDS:g} s, "
        f">= {TARGET_STATES_PER_S:,} states/s)"
    )
    for name in names or list(PROTOCOLS):
        r = check(WorldConfig(protocol=name), reduce=False)
        time_ok = r.complete and r.seconds < TARGET_SECONDS
        rate_ok = r.states_per_second >= TARGET_STATES_PER_S
        verdict = " ".join(
            [
                "time ok" if time_ok else "TIME MISSED",
                "rate ok" if rate_ok else "RATE MISSED",
                "no violation" if r.violation is None else f"VIOLATION {r.violation.prop}",
            ]
        )
        print(
            f"  {name:16s} {r.states:8d} states {r.transitions:8d} transitions depth "
            f"{r.depth:3d} {r.seconds:6.1f} s {r.states_per_second:8,.0f} states/s  {verdict}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
