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
from dataclasses import replace
from pathlib import Path
from typing import Any

from apfsim.compare import (
    CompareProgressFn,
    CompareResult,
    Interrupted,
    default_jobs,
    run_compare,
    summary_table,
)
from apfsim.metrics.results import ProtocolResult, RunResult
from apfsim.metrics.units import ops_unit, rate_unit
from apfsim.registry import PROTOCOLS
from apfsim.runner import execute_all, executor_problem
from apfsim.scenario import (
    MAX_DURATION_S,
    Scenario,
    ScenarioError,
    did_you_mean,
    load_scenario,
)
from apfsim.simulation import InvariantViolation
from apfsim.sweep.spec import one_point
from apfsim.trace.hooks import traced_simulation
from apfsim.trace.recorder import TraceOptions, TraceWriteError

__all__ = [
    "DEFAULT_PROTOCOLS",
    "DEFAULT_SEEDS",
    "MAX_DURATION_S",
    "CompareResult",
    "Interrupted",
    "check_protocols",
    "compare",
    "compare_summary_table",
    "compare_table",
    "run",
    "run_protocol",
]

DEFAULT_PROTOCOLS = ("sync", "arm64-rfcv2")
DEFAULT_SEEDS = 5  # `compare`: enough for a t interval, few enough for minute-long runs

ProgressFn = Callable[[str, float], None]


def _resolve(scenario: Scenario | str | Path) -> Scenario:
    if isinstance(scenario, Scenario):
        return scenario
    return load_scenario(scenario)


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
    check: bool = True,
    trace: TraceOptions | None = None,
) -> ProtocolResult:
    """Run one protocol; ``duration_s`` overrides the scenario's duration. With ``check``
    the protocol invariants are checked as it runs (a violation raises InvariantViolation);
    ``trace`` writes a Perfetto timeline and/or a kernel-format text trace of the run."""
    sc = _resolve(scenario)
    _check_duration(duration_s)
    if trace is not None:
        trace.check_duration(sc.duration_s if duration_s is None else duration_s)
    check_protocols([protocol])
    return traced_simulation(sc, protocol, seed, check, trace).run(duration_s, progress)


def run(
    scenario: Scenario | str | Path,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    seed: int = 0,
    duration_s: float | None = None,
    progress: ProgressFn | None = None,
    check: bool = True,
    trace: TraceOptions | None = None,
) -> RunResult:
    """Run ``scenario`` under each protocol on the same seed. If an invariant breaks or a
    trace file cannot be written, the InvariantViolation or TraceWriteError carries the
    protocols finished before it (``partial``, marked partial); ^C raises
    :class:`Interrupted` carrying them (None if none had finished). With ``trace`` and
    several protocols, each protocol's files are tagged with its name."""
    sc = _resolve(scenario)
    _check_duration(duration_s)
    check_protocols(protocols)
    if trace is not None:
        trace.check_duration(sc.duration_s if duration_s is None else duration_s)
    scenario_dict = sc.model_dump(mode="json")
    if duration_s is not None:
        scenario_dict["duration_s"] = duration_s
    specs = one_point(sc, protocols, [seed], duration_s, check)
    if trace is not None:
        specs = [
            replace(r, trace=trace if len(protocols) == 1 else trace.for_run(r.protocol))
            for r in specs
        ]
    results: list[dict[str, Any] | None] = [None] * len(specs)

    def finished(partial: bool = True) -> RunResult:
        done = [ProtocolResult.from_dict(r) for r in results if r is not None]
        return RunResult(scenario=scenario_dict, seed=seed, results=done, partial=partial)

    def each(done: float, total: int) -> None:
        """The batch's progress as the protocol's own: a whole number ends a protocol."""
        assert progress is not None
        i = int(done)
        if done == i:
            if i:
                progress(protocols[i - 1], 1.0)
        else:
            progress(protocols[i], done - i)

    try:
        execute_all(specs, results, progress=each if progress is not None else None)
    except KeyboardInterrupt:
        raise Interrupted(finished() if any(results) else None) from None
    except (InvariantViolation, TraceWriteError) as err:
        err.partial = finished()
        raise
    return finished(partial=False)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.3f}{unit}"


def _rate(value: float) -> str:
    """A rate with 3 significant digits, without exponent below a million."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _fault_rate(r: ProtocolResult) -> float:
    """Stage-2 faults (zero-fill, minor, needing I/O) per simulated second."""
    f = r.faults
    total = f["zero_fill"] + f["minor"] + f["needs_io"]
    return total / r.sim_time_s if r.sim_time_s > 0 else 0.0


def compare_table(result: RunResult, baseline: str = "sync") -> str:
    """A plain-text side-by-side table (tasks, vCPU time, APF counters, latency, speedup)."""
    names = [r.protocol for r in result.results]
    rows: list[tuple[str, list[str]]] = []

    def section(title: str) -> None:
        rows.append((f"[{title}]", ["" for _ in names]))

    section("tasks: work (s) or ops/s / completion (s)")
    for i, task in enumerate(result.results[0].tasks):
        cells = []
        for r in result.results:
            t = r.tasks[i]
            if ops_unit(t.kind) is None:
                cells.append(f"{t.work_s:.3f} s / {_fmt(t.completion_s)}")
            else:
                rate = t.ops / r.sim_time_s if r.sim_time_s > 0 else 0.0
                cells.append(f"{_rate(rate)} {rate_unit(t.kind)} / {_fmt(t.completion_s)}")
        rows.append((f"  {task.name} ({task.kind})", cells))
    section("vCPU time (s)")
    for v in range(len(result.results[0].vcpus)):
        for cat in result.results[0].vcpus[v].time_s:
            cells = [f"{r.vcpus[v].time_s[cat]:.3f}" for r in result.results]
            rows.append((f"  vcpu{v} {cat}", cells))
    if any(r.host_cpu is not None for r in result.results):
        section("host CPUs: run_delay, runnable but waiting (s)")
        for v in range(len(result.results[0].vcpus)):
            cells = [_fmt(r.vcpus[v].run_delay_s) for r in result.results]
            rows.append((f"  vcpu{v}", cells))
        cells = [
            "-" if r.host_cpu is None else _fmt(r.host_cpu["kworker_run_delay_s"])
            for r in result.results
        ]
        rows.append(("  kworkers", cells))
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
    rows.append(("  stage-2 faults/s", [_rate(_fault_rate(r)) for r in result.results]))
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
                elif ops_unit(task.kind) is not None and task.ops > 0 and r.sim_time_s > 0:
                    rate, base_rate = t.ops / r.sim_time_s, task.ops / base.sim_time_s
                    cells.append(f"x{rate / base_rate:.3f} ({rate_unit(task.kind)})")
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
    table = header + "\n" + "\n".join(lines)
    if result.partial:
        table += f"\nPARTIAL: cut short; only {', '.join(names)} finished"
    return table


def check_protocols(protocols: Sequence[str]) -> None:
    """Raise :class:`ScenarioError` unless ``protocols`` names registered designs, each once
    (the message names ``--protocol``: the CLI prints it as it is)."""
    if not protocols:
        raise ScenarioError(f"--protocol: give at least one; choose from {', '.join(PROTOCOLS)}")
    for name in protocols:
        if name not in PROTOCOLS:
            raise ScenarioError(
                f"--protocol: unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}"
                f"{did_you_mean(name, PROTOCOLS)}"
            )
    if len(set(protocols)) != len(protocols):
        raise ScenarioError("--protocol: each protocol may be given once")


def _check_compare(
    protocols: Sequence[str],
    seeds: Sequence[int],
    baseline: str,
    jobs: int | None,
    executor: str | None = None,
    scheduler: str | None = None,
) -> None:
    """Raise :class:`ScenarioError` naming the CLI flag of the first bad argument."""
    check_protocols(protocols)
    if baseline not in protocols:
        raise ScenarioError(
            f"--baseline: {baseline!r} is not among the protocols ({', '.join(protocols)}); "
            "add it to --protocol or pick one of them"
        )
    if not seeds:
        raise ScenarioError("--seeds: must be at least 1 (got 0)")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ScenarioError(f"--seeds: seeds must be distinct and non-negative (got {seeds})")
    if jobs is not None and jobs < 1:
        raise ScenarioError(f"--jobs: must be at least 1 (got {jobs})")
    problem = None if executor is None else executor_problem(executor)
    if problem is not None:
        raise ScenarioError(problem)
    if scheduler is not None and executor != "dask":
        raise ScenarioError("--scheduler: only with --executor dask")


def compare(
    scenario: Scenario | str | Path,
    protocols: Sequence[str] | None = None,
    seeds: int | Sequence[int] = DEFAULT_SEEDS,
    baseline: str = "sync",
    duration_s: float | None = None,
    jobs: int | None = None,
    progress: CompareProgressFn | None = None,
    check: bool = True,
    trace: TraceOptions | None = None,
    executor: str | None = None,
    scheduler: str | None = None,
) -> CompareResult:
    """Run each protocol on each seed and compare them with ``baseline``, paired by seed.

    ``protocols`` defaults to every registered protocol; ``seeds`` is a count N (seeds
    0..N-1) or the seeds themselves; ``jobs`` worker processes (default: the CPUs this
    process may use; 1 runs in this process). ``executor`` is the runner's (serial, process
    or dask; default serial for one job, else process) and ``scheduler`` a dask scheduler's
    address (none: a LocalCluster of ``jobs`` workers). The result depends on neither.
    Worker processes re-import the calling script: call this under
    ``if __name__ == "__main__":`` in a script.

    Example::

        result = compare("natapov-2010", ["sync", "halt-only", "x86"], seeds=3)
        print(compare_summary_table(result))
    """
    names = list(PROTOCOLS) if protocols is None else list(protocols)
    if isinstance(seeds, int):
        if seeds < 1:
            raise ScenarioError(f"--seeds: must be at least 1 (got {seeds})")
        seed_list = list(range(seeds))
    else:
        seed_list = sorted(seeds)
    _check_compare(names, seed_list, baseline, jobs, executor, scheduler)
    _check_duration(duration_s)
    sc = _resolve(scenario)
    if trace is not None:
        trace.check_duration(sc.duration_s if duration_s is None else duration_s)
    n_jobs = default_jobs() if jobs is None else jobs
    return run_compare(
        sc,
        names,
        seed_list,
        baseline,
        duration_s,
        n_jobs,
        progress,
        check,
        trace,
        executor,
        scheduler,
    )


def compare_summary_table(result: CompareResult) -> str:
    """The text table of :func:`compare`: mean ± 95 % CI, then paired ratios to the baseline."""
    return summary_table(result)
