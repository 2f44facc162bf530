"""Reading results files for the report: validation, merging seeds, the statistics.

Two inputs are accepted (docs/report.md): the file of ``apfsim run --json`` (one seed, every
protocol) and the file of ``apfsim compare --json`` (several seeds). Files of one scenario are
merged run by run, keyed by (protocol, seed); the statistics are those of ``apfsim compare``
(:func:`apfsim.compare.estimate`, seed-paired ratios). A lone compare file's own summary is
used as it is for the metrics it holds; the rest (absolute work rates, every counter, the
latency CDFs) is computed from its runs.

Nothing here imports matplotlib or jinja2.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from apfsim.compare import Estimate, estimate, paired_ratios, run_metrics
from apfsim.metrics.results import ProtocolResult, TaskResult, VcpuResult
from apfsim.metrics.units import ops_unit, rate_unit

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

VCPU_CATEGORIES = ("task", "guest_kernel", "idle", "apf_halt", "sync_fault", "host")
"""The vCPU time categories, in the order they are stacked (docs/results-schema.md)."""

LATENCIES = ("fault_in_latency_us", "not_present_to_ready_us")
"""The two latency distributions of ``faults``."""

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


class InvalidResults(Exception):
    """A structural problem at a JSON location; turned into a ReportError naming the file."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidResults(where, f"expected an object, got {_type_name(value)}")
    return value


def _get(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise InvalidResults(where, f"missing {key!r}")
    return obj[key]


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidResults(where, f"expected a list, got {_type_name(value)}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidResults(where, f"expected a string, got {_type_name(value)}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidResults(where, f"expected an integer, got {_type_name(value)}")
    return value


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidResults(where, f"expected a finite number, got {_type_name(value)}")
    return float(value)


def _opt_num(value: Any, where: str) -> float | None:
    return None if value is None else _num(value, where)


def _task(data: Any, where: str) -> TaskResult:
    t = _obj(data, where)
    completion = _get(t, "completion_s", where)
    return TaskResult(
        name=_str(_get(t, "name", where), f"{where}.name"),
        kind=_str(_get(t, "kind", where), f"{where}.kind"),
        cpu=_int(_get(t, "cpu", where), f"{where}.cpu"),
        work_s=_num(_get(t, "work_s", where), f"{where}.work_s"),
        ops=_int(_get(t, "ops", where), f"{where}.ops"),
        completion_s=_opt_num(completion, f"{where}.completion_s"),
        state=_str(_get(t, "state", where), f"{where}.state"),
    )


def _vcpu(data: Any, where: str) -> VcpuResult:
    v = _obj(data, where)
    time_s = _obj(_get(v, "time_s", where), f"{where}.time_s")
    for cat in VCPU_CATEGORIES:
        _get(time_s, cat, f"{where}.time_s")
    return VcpuResult(
        vcpu=_int(_get(v, "vcpu", where), f"{where}.vcpu"),
        time_s={k: _num(x, f"{where}.time_s.{k}") for k, x in time_s.items()},
    )


def _latency(data: Any, where: str) -> tuple[dict[str, Any], list[float] | None]:
    lat = _obj(data, where)
    count = _int(_get(lat, "count", where), f"{where}.count")
    p50 = _opt_num(_get(lat, "p50", where), f"{where}.p50")
    p99 = _opt_num(_get(lat, "p99", where), f"{where}.p99")
    cdf: list[float] | None = None
    if "cdf_us" in lat:
        raw = _list(lat["cdf_us"], f"{where}.cdf_us")
        cdf = [_num(x, f"{where}.cdf_us[{i}]") for i, x in enumerate(raw)]
        if count > 0 and len(cdf) < 2:
            raise InvalidResults(f"{where}.cdf_us", f"{count} samples but {len(cdf)} quantiles")
        if any(b < a for a, b in itertools.pairwise(cdf)):
            raise InvalidResults(f"{where}.cdf_us", "quantiles not in increasing order")
    return {"count": count, "p50": p50, "p99": p99}, cdf


def parse_protocol_result(
    data: Any, where: str
) -> tuple[ProtocolResult, dict[str, list[float] | None]]:
    r = _obj(data, where)
    tasks = _list(_get(r, "tasks", where), f"{where}.tasks")
    vcpus = _list(_get(r, "vcpus", where), f"{where}.vcpus")
    if not tasks:
        raise InvalidResults(f"{where}.tasks", "no task")
    if not vcpus:
        raise InvalidResults(f"{where}.vcpus", "no vCPU")
    checked_vcpus = [_vcpu(v, f"{where}.vcpus[{i}]") for i, v in enumerate(vcpus)]
    if any(v.time_s.keys() != checked_vcpus[0].time_s.keys() for v in checked_vcpus):
        raise InvalidResults(f"{where}.vcpus", "the vCPUs have different time categories")
    apf = _obj(_get(r, "apf", where), f"{where}.apf")
    faults = _obj(_get(r, "faults", where), f"{where}.faults")
    memory = _obj(_get(r, "memory", where), f"{where}.memory")
    checked_faults: dict[str, Any] = {}
    for key in _FAULT_COUNTS:
        checked_faults[key] = _int(_get(faults, key, f"{where}.faults"), f"{where}.faults.{key}")
    cdfs: dict[str, list[float] | None] = {}
    for key in LATENCIES:
        lat, cdfs[key] = _latency(_get(faults, key, f"{where}.faults"), f"{where}.faults.{key}")
        checked_faults[key] = lat
    checked_memory: dict[str, Any] = {}
    for key in _MEMORY_KEYS:
        checked_memory[key] = _num(_get(memory, key, f"{where}.memory"), f"{where}.memory.{key}")
    sim_time_s = _num(_get(r, "sim_time_s", where), f"{where}.sim_time_s")
    if sim_time_s <= 0:
        raise InvalidResults(f"{where}.sim_time_s", f"must be positive (got {sim_time_s})")
    result = ProtocolResult(
        protocol=_str(_get(r, "protocol", where), f"{where}.protocol"),
        sim_time_s=sim_time_s,
        wall_time_s=0.0,  # never in the JSON
        events=_int(_get(r, "events", where), f"{where}.events"),
        tasks=[_task(t, f"{where}.tasks[{i}]") for i, t in enumerate(tasks)],
        vcpus=checked_vcpus,
        apf={k: _int(v, f"{where}.apf.{k}") for k, v in apf.items()},
        faults=checked_faults,
        memory=checked_memory,
    )
    return result, cdfs


def _summary(data: Any, where: str) -> dict[str, dict[str, Any]]:
    """compare's ``summary``: protocol -> metric -> Estimate, and ``ratio_to_baseline``."""
    out: dict[str, dict[str, Any]] = {}
    for protocol, metrics in _obj(data, where).items():
        here = f"{where}.{protocol}"
        table: dict[str, Any] = {}
        for key, value in _obj(metrics, here).items():
            if key == "ratio_to_baseline":
                ratios = _obj(value, f"{here}.{key}")
                table[key] = {k: _estimate(v, f"{here}.{key}.{k}") for k, v in ratios.items()}
            else:
                table[key] = _estimate(value, f"{here}.{key}")
        out[protocol] = table
    return out


def _estimate(data: Any, where: str) -> Estimate:
    e = _obj(data, where)
    return Estimate(
        mean=_opt_num(_get(e, "mean", where), f"{where}.mean"),
        ci95=_opt_num(_get(e, "ci95", where), f"{where}.ci95"),
        n=_int(_get(e, "n", where), f"{where}.n"),
    )


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
    doc = _obj(data, "top level")
    if "schema_version" not in doc:
        raise InvalidResults("top level", "no 'schema_version'")
    version = doc["schema_version"]
    if version != 1:
        raise InvalidResults("schema_version", f"{version!r}, but this apfsim reads version 1")
    scenario = _obj(_get(doc, "scenario", "top level"), "scenario")
    _str(_get(scenario, "name", "scenario"), "scenario.name")
    kind = doc.get("kind", "run")
    runs: list[RunRecord] = []
    if kind == "compare":
        for i, item in enumerate(_list(_get(doc, "runs", "top level"), "runs")):
            where = f"runs[{i}]"
            seed = _int(_get(_obj(item, where), "seed", where), f"{where}.seed")
            result, cdfs = parse_protocol_result(item, where)
            runs.append(RunRecord(seed, result, cdfs, name))
        protocols = [
            _str(p, f"protocols[{i}]")
            for i, p in enumerate(_list(_get(doc, "protocols", "top level"), "protocols"))
        ]
        baseline: str | None = _str(_get(doc, "baseline", "top level"), "baseline")
        summary: dict[str, dict[str, Any]] | None = _summary(
            _get(doc, "summary", "top level"), "summary"
        )
    elif kind == "run":
        seed = _int(_get(doc, "seed", "top level"), "seed")
        for i, item in enumerate(_list(_get(doc, "results", "top level"), "results")):
            result, cdfs = parse_protocol_result(item, f"results[{i}]")
            runs.append(RunRecord(seed, result, cdfs, name))
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
