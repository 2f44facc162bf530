"""Reading results files for the report: validation, merging seeds, the statistics.

Two inputs are accepted (docs/report.md): the file of ``apfsim run --json`` (one seed, every
protocol) and the file of ``apfsim compare --json`` (several seeds). Files of one scenario are
merged run by run, keyed by (protocol, seed); the statistics are those of ``apfsim compare``
(:func:`apfsim.stats.estimate`, seed-paired ratios). A lone compare file's own summary is
used as it is for the metrics it holds; the rest (absolute work rates, every counter, the
latency CDFs) is computed from its runs.

Nothing here imports matplotlib or jinja2.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, with_config
from typing_extensions import TypedDict

from apfsim.metrics.results import (
    LATENCIES,
    SCHEMA_CONFIG,
    VCPU_CATEGORIES,
    InvalidResults,
    ProtocolResult,
    decode,
)
from apfsim.metrics.summary import run_metrics
from apfsim.metrics.units import ops_unit, rate_unit
from apfsim.stats import Estimate, estimate, paired_ratios

__all__ = [
    "LATENCIES",
    "MAX_TASK_GROUPS",
    "VCPU_CATEGORIES",
    "Group",
    "ReportData",
    "ReportError",
    "RunRecord",
    "Source",
    "load_results",
]

MAX_TASK_GROUPS = 4
"""Up to this many tasks, throughput is shown per task; beyond, per task kind (summed)."""

_FAULT_COUNTS = ("zero_fill", "minor", "needs_io", "async", "sync", "repeated")
_MEMORY_KEYS = ("pages_evicted", "swap_reads", "swap_writes", "context_switches", "ipis")
_FIX = "give files written by 'apfsim run --json' or 'apfsim compare --json'"


class ReportError(Exception):
    """Bad input or output for a report; the message is one line naming the problem and the
    fix."""


@dataclass(frozen=True, slots=True)
class Source:
    """One input file, as shown in the report."""

    name: str  # file name without its directory: the report must not depend on where it ran
    kind: str  # "run" or "compare"
    protocols: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One protocol on one seed; ``cdf_us`` is None for a latency whose quantiles the file
    does not hold (written before apfsim recorded them)."""

    seed: int
    result: ProtocolResult
    cdf_us: dict[str, list[float] | None]
    source: str


@dataclass(frozen=True, slots=True)
class Group:
    """A bar group of the throughput figures: one task, or every task of one kind."""

    key: str  # "task.<name>" or "kind.<kind>"; metrics add ".work_rate" or ".ops_rate"
    label: str
    kind: str = "compute"

    @property
    def rate_key(self) -> str:
        """The throughput metric: ops/s for a memory task, CPU s/s for a compute one."""
        return f"{self.key}.{'work_rate' if ops_unit(self.kind) is None else 'ops_rate'}"

    @property
    def unit(self) -> str:
        """The throughput's unit: ``writes/s``, ``pages/s``, ``accesses/s``, ``CPU s/s``."""
        return rate_unit(self.kind)


@dataclass(frozen=True, slots=True)
class ReportData:
    """Everything the figures and tables show."""

    scenario: dict[str, Any]
    sources: list[Source]
    protocols: list[str]  # in the order first given
    baseline: str  # the ratios' denominator: compare's baseline, else sync, else the first
    runs: list[RunRecord]  # ordered by (protocol, seed)
    metrics: dict[str, dict[str, Estimate]]  # protocol -> metric -> estimate over seeds
    ratios: dict[str, dict[str, Estimate]]  # protocol -> "<group>.work_rate" -> paired ratio

    def protocol_runs(self, protocol: str) -> list[RunRecord]:
        return [r for r in self.runs if r.result.protocol == protocol]

    def seeds(self, protocol: str) -> list[int]:
        return [r.seed for r in self.protocol_runs(protocol)]

    def groups(self) -> list[Group]:
        """Per task for a few tasks; per kind (the sum of its tasks) for many."""
        tasks = self.runs[0].result.tasks
        if len(tasks) <= MAX_TASK_GROUPS:
            return [Group(f"task.{t.name}", f"{t.name} ({t.kind})", t.kind) for t in tasks]
        counts: dict[str, int] = {}
        for t in tasks:
            counts[t.kind] = counts.get(t.kind, 0) + 1
        return [
            Group(f"kind.{kind}", f"all {kind} ({n} task{'s' if n > 1 else ''})", kind)
            for kind, n in counts.items()
        ]

    def per_task(self) -> bool:
        return len(self.runs[0].result.tasks) <= MAX_TASK_GROUPS

    def mean_cdf(self, protocol: str, latency: str) -> list[float] | None:
        """The protocol's quantiles averaged over its seeds with samples (None: no samples)."""
        cdfs = [
            cdf
            for r in self.protocol_runs(protocol)
            if (cdf := r.cdf_us[latency]) is not None and cdf
        ]
        if not cdfs:
            return None
        return [statistics.fmean(values) for values in zip(*cdfs, strict=True)]

    def runs_without_cdf(self, latency: str) -> list[RunRecord]:
        """Runs with samples whose file holds no quantiles (an older apfsim's file)."""
        return [
            r
            for r in self.runs
            if r.cdf_us[latency] is None and r.result.faults[latency]["count"] > 0
        ]


# ----------------------------------------------------------------------------- validation


def parse_protocol_result(
    data: Any, where: str
) -> tuple[ProtocolResult, dict[str, list[float] | None]]:
    """One protocol's result (:meth:`ProtocolResult.from_dict`) and its latency quantiles
    (None for a distribution the file holds none of)."""
    result = ProtocolResult.from_dict(data, where)
    return result, {key: result.faults[key].get("cdf_us") for key in LATENCIES}


@with_config(SCHEMA_CONFIG)
class _EstimateJson(TypedDict):
    mean: float | None
    ci95: float | None
    n: int


@with_config(SCHEMA_CONFIG)
class _Header(TypedDict):
    schema_version: int
    scenario: _ScenarioJson


@with_config(SCHEMA_CONFIG)
class _ScenarioJson(TypedDict):
    name: str


@with_config(SCHEMA_CONFIG)
class _CompareJson(TypedDict):
    runs: list[dict[str, Any]]
    protocols: list[str]
    baseline: str
    summary: dict[str, dict[str, Any]]


@with_config(SCHEMA_CONFIG)
class _RunJson(TypedDict):
    seed: int
    results: list[Any]


@with_config(SCHEMA_CONFIG)
class _Seed(TypedDict):
    seed: int


_ESTIMATES = TypeAdapter(dict[str, _EstimateJson])
_HEADER = TypeAdapter(_Header)
_COMPARE = TypeAdapter(_CompareJson)
_RUN = TypeAdapter(_RunJson)
_SEED = TypeAdapter(_Seed)
_OBJECT = TypeAdapter(dict[str, Any])


def _summary(data: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """compare's ``summary``: protocol -> metric -> Estimate, and ``ratio_to_baseline``."""
    out: dict[str, dict[str, Any]] = {}
    for protocol, metrics in data.items():
        here = f"summary.{protocol}"
        own = dict(metrics)
        ratios = own.pop("ratio_to_baseline", None)
        table: dict[str, Any] = {k: Estimate(**e) for k, e in decode(_ESTIMATES, own, here).items()}
        if ratios is not None:
            checked = decode(_ESTIMATES, ratios, f"{here}.ratio_to_baseline")
            table["ratio_to_baseline"] = {k: Estimate(**e) for k, e in checked.items()}
        out[protocol] = table
    return out


@dataclass(frozen=True, slots=True)
class _File:
    path: str  # as given, for error messages
    name: str
    kind: str
    scenario: dict[str, Any]
    runs: list[RunRecord]
    protocols: list[str]
    baseline: str | None
    summary: dict[str, dict[str, Any]] | None


def _parse(name: str, data: Any) -> _File:
    doc = decode(_OBJECT, data, "top level")
    if "schema_version" not in doc:
        raise InvalidResults("top level", "no 'schema_version'")
    version = doc["schema_version"]
    if version != 1:
        raise InvalidResults("schema_version", f"{version!r}, but this apfsim reads version 1")
    decode(_HEADER, doc, "top level")
    scenario = doc["scenario"]
    kind = doc.get("kind", "run")
    runs: list[RunRecord] = []
    if kind == "compare":
        compare = decode(_COMPARE, doc, "top level")
        for i, item in enumerate(compare["runs"]):
            where = f"runs[{i}]"
            seed = decode(_SEED, item, where)["seed"]
            result, cdfs = parse_protocol_result(item, where)
            runs.append(RunRecord(seed, result, cdfs, name))
        protocols = list(compare["protocols"])
        baseline: str | None = compare["baseline"]
        summary: dict[str, dict[str, Any]] | None = _summary(compare["summary"])
    elif kind == "run":
        run = decode(_RUN, doc, "top level")
        for i, item in enumerate(run["results"]):
            result, cdfs = parse_protocol_result(item, f"results[{i}]")
            runs.append(RunRecord(run["seed"], result, cdfs, name))
        protocols = [r.result.protocol for r in runs]
        baseline, summary = None, None
    else:
        raise InvalidResults("kind", f"unknown {kind!r} (expected 'compare' or none)")
    if not runs:
        raise InvalidResults("top level", "no results")
    return _File("", name, kind, scenario, runs, protocols, baseline, summary)


def _read(path: Path) -> _File:
    shown = repr(str(path))
    if not path.exists():
        raise ReportError(f"results file {shown} does not exist; {_FIX}")
    if path.is_dir():
        raise ReportError(f"{shown} is a directory, not a results file; {_FIX}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ReportError(f"cannot read {shown} ({err.strerror}); check its permissions") from None
    except UnicodeDecodeError:
        raise ReportError(f"{shown} is not JSON (not UTF-8 text); {_FIX}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(
            f"{shown} is not JSON ({err.msg} at line {err.lineno}, column {err.colno}); {_FIX}"
        ) from None
    try:
        parsed = _parse(path.name, data)
    except InvalidResults as err:
        raise ReportError(f"{shown} is not an apfsim results file ({err}); {_FIX}") from None
    return replace(parsed, path=str(path))


# ----------------------------------------------------------------------------- statistics


def _run_values(result: ProtocolResult) -> dict[str, float | None]:
    """Every per-run figure the report summarises; compare's metric names where they exist."""
    values = run_metrics(result)
    sim = result.sim_time_s
    kinds: dict[str, float] = {}
    for t in result.tasks:
        values[f"task.{t.name}.work_rate"] = t.work_s / sim
        kinds[t.kind] = kinds.get(t.kind, 0.0) + t.work_s
    for kind, work in kinds.items():
        values[f"kind.{kind}.work_rate"] = work / sim
    for key, count in result.apf.items():
        values[f"apf.{key}"] = float(count)
    for key in _FAULT_COUNTS:
        values[f"faults.{key}"] = float(result.faults[key])
    for lat in LATENCIES:
        for q in ("count", "p50", "p99"):
            value = result.faults[lat][q]
            values[f"{lat}.{q}"] = None if value is None else float(value)
    for key in _MEMORY_KEYS:
        values[f"memory.{key}"] = float(result.memory[key])
    values["sim_time_s"] = sim
    return values


def run_estimates(runs: list[RunRecord]) -> dict[str, Estimate]:
    per_seed = [_run_values(r.result) for r in runs]
    keys: dict[str, None] = {}
    for values in per_seed:
        keys.update(dict.fromkeys(values))
    return {k: estimate([values.get(k) for values in per_seed]) for k in keys}


def run_ratios(runs: list[RunRecord], base: list[RunRecord]) -> dict[str, Estimate]:
    """Per-seed work and ops rates / the baseline's on the same seed, for the seeds both
    have."""
    base_by_seed = {r.seed: _run_values(r.result) for r in base}
    paired = [(_run_values(r.result), base_by_seed[r.seed]) for r in runs if r.seed in base_by_seed]
    if not paired:
        return {}
    keys = [k for k in paired[0][0] if k.endswith((".work_rate", ".ops_rate"))]
    return {
        k: estimate(paired_ratios([v.get(k) for v, _ in paired], [b.get(k) for _, b in paired]))
        for k in keys
    }


def setting_differences(a: Any, b: Any, prefix: str = "", limit: int = 3) -> list[str]:
    """The scenario settings that differ, as ``key: A vs B`` (dotted keys, list items by
    index), at most ``limit`` of them and then ``...``."""
    out: list[str] = []

    def walk(x: Any, y: Any, key: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k), y.get(k), f"{key}.{k}" if key else str(k))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{key}[{i}]")
        elif x != y:
            out.append(f"{key or 'scenario'}: {_setting(x)} vs {_setting(y)}")

    walk(a, b, prefix)
    return out if len(out) <= limit else [*out[:limit], "..."]


def _setting(value: Any) -> str:
    """A setting as TOML-ish text; a missing one is "unset"."""
    if value is None:
        return "unset"
    if isinstance(value, float):
        return f"{value:g}"
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_results(paths: list[Path]) -> ReportData:
    """Read, check and merge results files of one scenario (raises ReportError)."""
    if not paths:
        raise ReportError(f"no results file given; {_FIX}")
    files = [_read(Path(p)) for p in paths]
    first = files[0]
    for f in files[1:]:
        if f.scenario != first.scenario:
            a, b = first.scenario["name"], f.scenario["name"]
            diff = ", ".join(setting_differences(first.scenario, f.scenario))
            what = f"{a!r} and {b!r}" if a != b else f"both {a!r} but {diff}"
            raise ReportError(
                f"{first.path!r} and {f.path!r} hold different scenarios ({what}); "
                "make one report per scenario"
            )
    protocols: list[str] = []
    seen: dict[tuple[str, int], str] = {}  # -> the path of the file holding it
    for f in files:
        protocols += [p for p in f.protocols if p not in protocols]
        for r in f.runs:
            key = (r.result.protocol, r.seed)
            if key in seen:
                raise ReportError(
                    f"{seen[key]!r} and {f.path!r} both hold protocol {key[0]!r} on seed "
                    f"{key[1]}; give each (protocol, seed) once"
                )
            seen[key] = f.path
            if r.result.protocol not in protocols:
                protocols.append(r.result.protocol)
    runs = sorted(
        (r for f in files for r in f.runs),
        key=lambda r: (protocols.index(r.result.protocol), r.seed),
    )
    task_names = [t.name for t in runs[0].result.tasks]
    for r in runs:
        if [t.name for t in r.result.tasks] != task_names:
            first_run = runs[0]
            raise ReportError(
                f"{r.source!r}: {r.result.protocol} on seed {r.seed} has other tasks than "
                f"{first_run.result.protocol} on seed {first_run.seed} in "
                f"{first_run.source!r} although the scenario is the same; the file was "
                "edited or damaged: write it again with apfsim"
            )
    protocols = [p for p in protocols if p in {r.result.protocol for r in runs}]
    baseline = "sync" if "sync" in protocols else protocols[0]
    if len(files) == 1 and first.baseline is not None and first.baseline in protocols:
        baseline = first.baseline
    by_protocol = {p: [r for r in runs if r.result.protocol == p] for p in protocols}
    metrics = {p: run_estimates(by_protocol[p]) for p in protocols}
    ratios = {p: run_ratios(by_protocol[p], by_protocol[baseline]) for p in protocols}
    if len(files) == 1 and first.summary is not None:
        # A lone compare file: its own figures, for every metric it has.
        for p, table in first.summary.items():
            if p in metrics:
                own = dict(table)
                ratios[p].update(own.pop("ratio_to_baseline", {}))
                metrics[p].update(own)
    sources = [
        Source(
            f.name,
            f.kind,
            tuple(f.protocols),
            tuple(sorted({r.seed for r in f.runs})),
        )
        for f in files
    ]
    return ReportData(
        scenario=first.scenario,
        sources=sources,
        protocols=protocols,
        baseline=baseline,
        runs=runs,
        metrics=metrics,
        ratios=ratios,
    )
