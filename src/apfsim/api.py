"""The public Python API: load a scenario, run it under protocols, get typed results.

Example::

    from apfsim import load_scenario, run
    scenario = load_scenario("rfcv2-2020")
    result = run(scenario, protocols=["sync", "arm64-rfcv2"], seed=7, duration_s=5)
    data = result.to_dict()          # plain dicts, the JSON schema of docs/results-schema.md
    print(compare_table(result))     # the side-by-side text table

Every protocol is run on the same seed, so they see the same workload randomness (each
source draws from its own named stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from apfsim.metrics.results import ProtocolResult, RunResult
from apfsim.protocols import PROTOCOLS
from apfsim.scenario import Scenario, ScenarioError, load_scenario
from apfsim.simulation import Simulation

__all__ = ["DEFAULT_PROTOCOLS", "compare_table", "run", "run_protocol"]

DEFAULT_PROTOCOLS = ("sync", "arm64-rfcv2")

ProgressFn = Callable[[str, float], None]


def _resolve(scenario: Scenario | str | Path) -> Scenario:
    if isinstance(scenario, Scenario):
        return scenario
    return load_scenario(scenario)


MAX_DURATION_S = 86_400.0  # the scenario schema's bound on duration_s


def _check_duration(duration_s: float | None) -> None:
    if duration_s is not None and not 0 < duration_s <= MAX_DURATION_S:
        raise ScenarioError(
            f"duration_s: must be a number of seconds in (0, {MAX_DURATION_S:g}] (got {duration_s})"
        )


def run_protocol(
    scenario: Scenario | str | Path,
    protocol: str,
    seed: int = 0,
    duration_s: float | None = None,
    progress: Callable[[float], None] | None = None,
) -> ProtocolResult:
    """Run one protocol; ``duration_s`` overrides the scenario's duration."""
    sc = _resolve(scenario)
    _check_duration(duration_s)
    if protocol not in PROTOCOLS:
        raise ScenarioError(
            f"--protocol: unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}"
        )
    return Simulation(sc, protocol, seed).run(duration_s, progress)


def run(
    scenario: Scenario | str | Path,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    seed: int = 0,
    duration_s: float | None = None,
    progress: ProgressFn | None = None,
) -> RunResult:
    """Run ``scenario`` under each protocol on the same seed."""
    sc = _resolve(scenario)
    _check_duration(duration_s)
    for name in protocols:
        if name not in PROTOCOLS:
            raise ScenarioError(
                f"--protocol: unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}"
            )
    scenario_dict = sc.model_dump(mode="json")
    if duration_s is not None:
        scenario_dict["duration_s"] = duration_s
    out = RunResult(scenario=scenario_dict, seed=seed)
    for name in protocols:
        cb = None if progress is None else (lambda f, n=name: progress(n, f))
        out.results.append(run_protocol(sc, name, seed, duration_s, cb))
    return out


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.3f}{unit}"


def compare_table(result: RunResult, baseline: str = "sync") -> str:
    """A plain-text side-by-side table (tasks, vCPU time, APF counters, latency, speedup)."""
    names = [r.protocol for r in result.results]
    rows: list[tuple[str, list[str]]] = []

    def section(title: str) -> None:
        rows.append((f"[{title}]", ["" for _ in names]))

    section("tasks: work (s) / completion (s)")
    for i, task in enumerate(result.results[0].tasks):
        cells = []
        for r in result.results:
            t = r.tasks[i]
            cells.append(f"{t.work_s:.3f} / {_fmt(t.completion_s)}")
        rows.append((f"  {task.name} ({task.kind})", cells))
    section("vCPU time (s)")
    for v in range(len(result.results[0].vcpus)):
        for cat in result.results[0].vcpus[v].time_s:
            cells = [f"{r.vcpus[v].time_s[cat]:.3f}" for r in result.results]
            rows.append((f"  vcpu{v} {cat}", cells))
    section("APF counters")
    keys: list[str] = []
    for r in result.results:
        for k in r.apf:
            if k not in keys:
                keys.append(k)
    for k in keys:
        rows.append((f"  {k}", [str(r.apf.get(k, "-")) for r in result.results]))
    section("faults")
    for k in ("zero_fill", "minor", "needs_io", "async", "sync", "repeated"):
        rows.append((f"  {k}", [str(r.faults[k]) for r in result.results]))
    for q in ("p50", "p99"):
        rows.append(
            (
                f"  fault-in latency {q} (us)",
                [_fmt(r.faults["fault_in_latency_us"][q]) for r in result.results],
            )
        )
    for q in ("p50", "p99"):
        cells = [_fmt(r.faults["not_present_to_ready_us"][q]) for r in result.results]
        rows.append((f"  not-present->ready {q} (us)", cells))
    if baseline in names:
        base = result.protocol(baseline)
        section(f"speedup over {baseline}")
        for i, task in enumerate(base.tasks):
            cells = []
            for r in result.results:
                t = r.tasks[i]
                if task.completion_s is not None and t.completion_s:
                    cells.append(f"x{task.completion_s / t.completion_s:.3f} (time)")
                elif task.work_s > 0 and r.sim_time_s > 0:
                    rate, base_rate = t.work_s / r.sim_time_s, task.work_s / base.sim_time_s
                    cells.append(f"x{rate / base_rate:.3f} (work/s)")
                else:
                    cells.append("-")
            rows.append((f"  {task.name}", cells))
    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(n), *(len(c[i]) for _, c in rows)) for i, n in enumerate(names)]
    lines = [
        " " * width0 + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))
    ]
    for label, cells in rows:
        lines.append(
            label.ljust(width0)
            + "  "
            + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
        )
    header = (
        f"scenario {result.scenario['name']}  seed {result.seed}  "
        f"simulated {result.results[0].sim_time_s:.3f} s"
    )
    return header + "\n" + "\n".join(lines)
