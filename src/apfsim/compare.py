"""Multi-seed comparison of protocols: every protocol on seeds 0..N-1, paired statistics.

Each seed is the same workload randomness under every protocol (common random numbers:
:class:`~apfsim.simulation.Simulation` draws each source from its own named stream), so a
protocol is compared with the baseline seed by seed: the per-seed ratio, then its mean and
95 % confidence interval. Runs go to a process pool; results are ordered by (protocol, seed),
never by completion, so the output does not depend on the number of jobs.

Example::

    from apfsim.api import compare, compare_summary_table
    result = compare("natapov-2010", ["sync", "x86"], seeds=3, duration_s=5)
    print(compare_summary_table(result))
    result.summary["x86"].ratio_to_baseline["kind.compute.work_rate"].mean
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from apfsim.checking import InvariantViolation
from apfsim.metrics.results import ProtocolResult
from apfsim.metrics.summary import APF_COUNTERS, ops_rates, run_metrics, work_rates
from apfsim.metrics.summary import kinds as task_kinds
from apfsim.metrics.units import ops_unit, rate_unit
from apfsim.runner import default_jobs, execute_all
from apfsim.scenario import Scenario
from apfsim.stats import Estimate, estimate, paired_ratios
from apfsim.sweep.spec import one_point
from apfsim.trace.recorder import TraceOptions, TraceWriteError

__all__ = [
    "CompareProgressFn",
    "CompareResult",
    "CompareRun",
    "Interrupted",
    "ProtocolSummary",
    "default_jobs",
    "run_compare",
    "summary_table",
]

CompareProgressFn = Callable[[float, int], None]
"""Called with (runs completed, fractional in a serial run; total runs)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`apfsim.api.run` or :func:`apfsim.api.compare`: ``partial`` holds
    what had finished (a RunResult or CompareResult marked partial), None if nothing had."""

    def __init__(self, partial: Any) -> None:
        super().__init__("interrupted")
        self.partial = partial


# ------------------------------------------------------------------------------- running


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class CompareRun:
    """One protocol on one seed."""

    seed: int
    result: ProtocolResult

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **self.result.to_dict()}


@dataclass(frozen=True, slots=True)
class ProtocolSummary:
    """Per-metric estimates over seeds, and paired ratios to the baseline."""

    metrics: dict[str, Estimate]
    ratio_to_baseline: dict[str, Estimate]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: e.to_dict() for k, e in self.metrics.items()}
        out["ratio_to_baseline"] = {k: e.to_dict() for k, e in self.ratio_to_baseline.items()}
        return out


@dataclass(frozen=True, slots=True)
class CompareResult:
    """Every (protocol, seed) run, in that order, and the summary; see docs/compare.md."""

    scenario: dict[str, Any]
    seeds: list[int]
    baseline: str
    protocols: list[str]
    runs: list[CompareRun]
    summary: dict[str, ProtocolSummary]
    jobs: int
    elapsed_s: float  # wall clock of the whole comparison; not in to_dict
    partial: bool = False  # interrupted: ``runs`` holds the runs that finished

    def run(self, protocol: str, seed: int) -> ProtocolResult:
        for r in self.runs:
            if r.result.protocol == protocol and r.seed == seed:
                return r.result
        raise KeyError((protocol, seed))

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per (protocol, seed) run, columns as
        :meth:`ProtocolResult.flat`; needs the ``analysis`` extra."""
        from apfsim.metrics.frames import frame

        return frame((r.result.flat(r.seed) for r in self.runs), ["protocol", "seed"])

    def to_dict(self) -> dict[str, Any]:
        """The JSON document; no wall-clock figure, so equal inputs give equal bytes.
        ``"partial": true`` only in a comparison cut short."""
        out: dict[str, Any] = {
            "schema_version": 1,
            "kind": "compare",
            "scenario": self.scenario,
            "seeds": list(self.seeds),
            "baseline": self.baseline,
            "protocols": list(self.protocols),
            "runs": [r.to_dict() for r in self.runs],
            "summary": {p: s.to_dict() for p, s in self.summary.items()},
        }
        if self.partial:
            out["partial"] = True
        return out


def _ratio_series(
    runs: list[ProtocolResult], base: list[ProtocolResult]
) -> dict[str, list[float | None]]:
    """Per-seed ratios: work rate protocol / baseline, completion baseline / protocol."""
    series: dict[str, list[float | None]] = {}
    rates = [{**work_rates(r), **ops_rates(r)} for r in runs]
    base_rates = [{**work_rates(b), **ops_rates(b)} for b in base]
    for key in rates[0]:
        series[key] = paired_ratios([r[key] for r in rates], [b[key] for b in base_rates])
    for i, t in enumerate(runs[0].tasks):
        if any(r.tasks[i].completion_s is not None for r in runs):
            # Inverted so that > 1 means faster than the baseline, as for the work rate.
            series[f"task.{t.name}.completion_speedup"] = paired_ratios(
                [b.tasks[i].completion_s for b in base], [r.tasks[i].completion_s for r in runs]
            )
    return series


def _summarise(runs: list[CompareRun], base: list[CompareRun]) -> ProtocolSummary:
    """Estimates over ``runs``; ratios over the seeds the baseline ran too (all of them,
    unless the comparison was interrupted)."""
    if not runs:
        return ProtocolSummary({}, {})
    per_seed = [run_metrics(r.result) for r in runs]
    keys = list(per_seed[0])
    for m in per_seed[1:]:
        keys += [k for k in m if k not in keys]
    metrics = {}
    for key in keys:
        values = [m.get(key) for m in per_seed]
        if key.endswith(".completion_s") and all(v is None for v in values):
            continue  # endless tasks have no completion time
        metrics[key] = estimate(values)
    base_by_seed = {b.seed: b.result for b in base}
    paired = [(r.result, base_by_seed[r.seed]) for r in runs if r.seed in base_by_seed]
    series = _ratio_series([r for r, _ in paired], [b for _, b in paired]) if paired else {}
    ratios = {k: estimate(v) for k, v in series.items()}
    return ProtocolSummary(metrics, ratios)


def run_compare(
    scenario: Scenario,
    protocols: Sequence[str],
    seeds: Sequence[int],
    baseline: str,
    duration_s: float | None,
    jobs: int,
    progress: CompareProgressFn | None = None,
    check: bool = True,
    trace: TraceOptions | None = None,
    executor: str | None = None,
    scheduler: str | None = None,
) -> CompareResult:
    """Run every protocol on every seed (arguments already checked) and summarise; with
    ``trace``, every run writes its own files, tagged with protocol and seed.

    The runs go to the runner (:mod:`apfsim.runner`): ``executor`` serial, process or dask
    (default: serial for one job or one run, else a process pool of ``jobs`` workers);
    ``scheduler`` is dask's address (none: a LocalCluster of ``jobs`` workers).

    If a run fails (an invariant, a trace write) or ^C comes, the runs that had finished are
    summarised into a partial result: ``partial`` of the InvariantViolation or
    TraceWriteError, or of the :class:`Interrupted` raised for ^C."""
    start = time.monotonic()
    specs = one_point(scenario, protocols, seeds, duration_s, check)
    if trace is not None:
        specs = [replace(r, trace=trace.for_run(r.protocol, r.seed)) for r in specs]
    results: list[dict[str, Any] | None] = [None] * len(specs)
    shown = scenario.model_dump(mode="json")
    if duration_s is not None:
        shown["duration_s"] = duration_s
    total = len(specs)
    if executor is None:
        executor = "serial" if min(jobs, total) <= 1 else "process"
    workers = min(jobs, total) if executor == "process" else jobs

    def summarised(partial: bool) -> CompareResult:
        runs = [
            CompareRun(spec.seed, ProtocolResult.from_dict(d))
            for spec, d in zip(specs, results, strict=True)
            if d is not None
        ]
        by_protocol = {p: [r for r in runs if r.result.protocol == p] for p in protocols}
        return CompareResult(
            scenario=shown,
            seeds=list(seeds),
            baseline=baseline,
            protocols=list(protocols),
            runs=runs,
            summary={p: _summarise(by_protocol[p], by_protocol[baseline]) for p in protocols},
            jobs=jobs,
            elapsed_s=time.monotonic() - start,
            partial=partial,
        )

    try:
        execute_all(specs, results, executor, workers, scheduler, progress)
    except KeyboardInterrupt:
        raise Interrupted(summarised(True) if any(results) else None) from None
    except (InvariantViolation, TraceWriteError) as err:
        err.partial = summarised(True) if any(results) else None
        raise
    return summarised(False)


# ------------------------------------------------------------------------------- table


def _cell(e: Estimate | None, digits: int, prefix: str = "") -> str:
    if e is None or e.mean is None:
        return "-"
    ci = "-" if e.ci95 is None else f"{e.ci95:.{digits}f}"
    return f"{prefix}{e.mean:.{digits}f} ± {ci}"


def _digits(estimates: list[Estimate | None]) -> int:
    """Decimals giving the row's largest mean 4 significant digits (at most 9)."""
    means = [abs(e.mean) for e in estimates if e is not None and e.mean]
    if not means:
        return 3
    return min(9, max(0, 3 - math.floor(math.log10(max(means)))))


def summary_table(result: CompareResult) -> str:
    """Mean ± 95 % CI per metric and protocol, then the paired ratios to the baseline."""
    names = result.protocols
    first = result.runs[0].result
    rows: list[tuple[str, list[str]]] = []

    def section(title: str) -> None:
        rows.append((f"[{title}]", ["" for _ in names]))

    def metric(label: str, key: str) -> None:
        estimates = [result.summary[p].metrics.get(key) for p in names]
        digits = _digits(estimates)
        rows.append((f"  {label}", [_cell(e, digits) for e in estimates]))

    def ratio(label: str, key: str) -> None:
        cells = [_cell(result.summary[p].ratio_to_baseline.get(key), 3, "x") for p in names]
        rows.append((f"  {label}", cells))

    kinds = task_kinds(first)
    section("tasks: work (s), or ops/s for memory tasks")
    for t in first.tasks:
        if ops_unit(t.kind) is None:
            metric(f"{t.name} ({t.kind}), work (s)", f"task.{t.name}.work_s")
        else:
            metric(f"{t.name} ({t.kind}), {rate_unit(t.kind)}", f"task.{t.name}.ops_rate")
    for kind, tasks in kinds.items():
        if ops_unit(kind) is None:
            metric(f"all {kind} ({len(tasks)}), work (s)", f"kind.{kind}.work_s")
        else:
            metric(f"all {kind} ({len(tasks)}), {rate_unit(kind)}", f"kind.{kind}.ops_rate")
    timed = {k for p in names for k in result.summary[p].metrics if k.endswith(".completion_s")}
    done = [t for t in first.tasks if f"task.{t.name}.completion_s" in timed]
    if done:
        section("tasks: completion (s)")
        for t in done:
            metric(t.name, f"task.{t.name}.completion_s")
    section("vCPU time, all vCPUs (s)")
    for cat in first.vcpus[0].time_s:
        metric(cat, f"vcpu_time_s.{cat}")
    if first.host_cpu is not None:
        section("host CPUs, all vCPUs (s)")
        metric("run_delay (runnable, waiting)", "host_cpu.run_delay_s")
    section("APF counters")
    for key in APF_COUNTERS:
        metric(key, f"apf.{key}")
    section("faults")
    metric("stage-2 faults/s", "faults.per_s")
    section("fault-in latency (us)")
    for q in ("p50", "p99"):
        metric(q, f"fault_in_latency_us.{q}")
    section(f"throughput / {result.baseline}'s (paired by seed)")
    for t in first.tasks:
        rate = "work_rate" if ops_unit(t.kind) is None else "ops_rate"
        ratio(f"{t.name} ({rate_unit(t.kind)})", f"task.{t.name}.{rate}")
    for kind, tasks in kinds.items():
        rate = "work_rate" if ops_unit(kind) is None else "ops_rate"
        ratio(f"all {kind} ({len(tasks)}) ({rate_unit(kind)})", f"kind.{kind}.{rate}")
    if done:
        section(f"completion speedup: {result.baseline}'s time / time (paired by seed)")
        for t in done:
            ratio(t.name, f"task.{t.name}.completion_speedup")
    return _header(result) + "\n" + _layout(names, rows) + "\n" + _footer(result)


def _layout(names: list[str], rows: list[tuple[str, list[str]]]) -> str:
    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(n), *(len(c[i]) for _, c in rows)) for i, n in enumerate(names)]
    lines = [
        " " * width0 + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))
    ]
    for label, cells in rows:
        row = "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
        lines.append(label.ljust(width0) + "  " + row)
    return "\n".join(lines)


def _header(result: CompareResult) -> str:
    seeds = result.seeds
    span = f"{seeds[0]}..{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ""
    shown = span or ",".join(str(s) for s in seeds)
    sim = result.runs[0].result.sim_time_s
    return (
        f"scenario {result.scenario['name']}  seeds {shown} (n={len(seeds)})  "
        f"simulated {sim:.3f} s  baseline {result.baseline}\n"
        "mean ± 95 % CI half-width (Student t, n-1 dof); ratios are per-seed, then averaged"
    )


def _footer(result: CompareResult) -> str:
    walls = []
    for p in result.protocols:
        ws = [r.result.wall_time_s for r in result.runs if r.result.protocol == p]
        walls.append(f"{p} {statistics.fmean(ws):.1f} s" if ws else f"{p} -")
    line = (
        f"wall time: {result.elapsed_s:.1f} s for {len(result.runs)} runs with "
        f"{result.jobs} job(s); mean per run: {', '.join(walls)}"
    )
    if result.partial:
        total = len(result.protocols) * len(result.seeds)
        line += f"\nPARTIAL: cut short after {len(result.runs)} of {total} runs"
    return line
