"""Typed results; ``to_dict`` gives the JSON schema of docs/results-schema.md and
:meth:`ProtocolResult.from_dict` reads it back, validated (pydantic ``TypeAdapter`` over the
schema's shapes, then the rules no type states), with one-line :class:`InvalidResults`
errors that name the JSON location."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, NotRequired, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

__all__ = [
    "LATENCIES",
    "SCHEMA_CONFIG",
    "VCPU_CATEGORIES",
    "InvalidResults",
    "ProtocolResult",
    "RunResult",
    "TaskResult",
    "VcpuResult",
    "decode",
]

VCPU_CATEGORIES = ("task", "guest_kernel", "idle", "apf_halt", "sync_fault", "host")
"""The vCPU time categories, in the order they are stacked (docs/results-schema.md)."""

LATENCIES = ("fault_in_latency_us", "not_present_to_ready_us")
"""The two latency distributions of ``faults``."""


@dataclass(frozen=True, slots=True)
class TaskResult:
    name: str
    kind: str
    cpu: int
    work_s: float
    ops: int
    completion_s: float | None
    state: str
    # Memory tasks only (None for compute): what ``ops`` count and ops per simulated second.
    ops_unit: str | None = None
    ops_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class VcpuResult:
    vcpu: int
    time_s: dict[str, float]
    # The vCPU thread's run_delay (runnable, waiting for a host CPU); None (and absent from
    # the JSON) when host CPUs are not modelled (host.cpus = 0).
    run_delay_s: float | None = None


@dataclass(frozen=True, slots=True)
class ProtocolResult:
    protocol: str
    sim_time_s: float
    wall_time_s: float
    events: int
    tasks: list[TaskResult]
    vcpus: list[VcpuResult]
    apf: dict[str, int]
    faults: dict[str, Any]
    memory: dict[str, Any]
    tracepoints: dict[str, int] = field(default_factory=dict)
    # Host CPU contention (host.cpus > 0); None, and absent from the JSON, otherwise.
    host_cpu: dict[str, Any] | None = None
    # The exit/entry and per-operation costs the run charged, and the preset they came from
    # (apfsim.host.costs): the scenario leaves them unset to mean "the preset's".
    host_costs: dict[str, int | str] = field(default_factory=dict)
    # Postcopy migration's destination (postcopy.enabled); None, and absent, otherwise.
    postcopy: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "result") -> ProtocolResult:
        """The result of :meth:`to_dict` (``wall_time_s`` optional), validated; raises
        :class:`InvalidResults` naming the location (``where`` is that of ``data``)."""
        return _protocol_result(data, where)

    def task(self, name: str) -> TaskResult:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def flat(self, seed: int) -> dict[str, Any]:
        """One flat row of this run, for tables and DataFrames: protocol, seed,
        ``sim_time_s``, ``task.NAME.FIELD`` (work_s, ops, ops_per_s, completion_s),
        ``vcpu_time_s.STATE`` summed over vCPUs, ``apf.COUNTER``, ``faults.KEY`` (counts,
        ``per_s``, latency p50/p99 in µs) and ``tracepoints.EVENT``."""
        row: dict[str, Any] = {"protocol": self.protocol, "seed": seed}
        row["sim_time_s"] = self.sim_time_s
        for t in self.tasks:
            for name in ("work_s", "ops", "ops_per_s", "completion_s"):
                row[f"task.{t.name}.{name}"] = getattr(t, name)
        for state in self.vcpus[0].time_s if self.vcpus else ():
            row[f"vcpu_time_s.{state}"] = sum(v.time_s.get(state, 0.0) for v in self.vcpus)
        row.update({f"apf.{k}": v for k, v in self.apf.items()})
        for key, value in self.faults.items():
            if isinstance(value, dict):
                for q in ("p50", "p99"):
                    if q in value:
                        row[f"faults.{key}.{q}"] = value[q]
            else:
                row[f"faults.{key}"] = value
        row.update({f"tracepoints.{k}": v for k, v in self.tracepoints.items()})
        if self.host_cpu is not None:
            row.update({f"host_cpu.{k}": v for k, v in self.host_cpu.items()})
        if self.postcopy is not None:
            for k, v in self.postcopy.items():
                if isinstance(v, dict):
                    row.update({f"postcopy.{k}.{q}": v[q] for q in ("p50", "p99") if q in v})
                elif not isinstance(v, list):
                    row[f"postcopy.{k}"] = v
        return row

    def to_dict(self, include_wall: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_wall:
            # Wall-clock figures differ run to run; keep the JSON byte-identical.
            data.pop("wall_time_s")
        # Added in a backward-compatible way: absent when host CPUs are not modelled.
        if data["host_cpu"] is None:
            data.pop("host_cpu")
        if data["postcopy"] is None:
            data.pop("postcopy")
        for vcpu in data["vcpus"]:
            if vcpu["run_delay_s"] is None:
                vcpu.pop("run_delay_s")
        return data


@dataclass(frozen=True, slots=True)
class RunResult:
    scenario: dict[str, Any]
    seed: int
    results: list[ProtocolResult] = field(default_factory=list)
    partial: bool = False  # interrupted: ``results`` holds the protocols that finished

    def protocol(self, name: str) -> ProtocolResult:
        for r in self.results:
            if r.protocol == name:
                return r
        raise KeyError(name)

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per protocol (index: protocol, seed), columns as
        :meth:`ProtocolResult.flat`; needs the ``analysis`` extra."""
        from apfsim.metrics.frames import frame

        return frame((r.flat(self.seed) for r in self.results), ["protocol", "seed"])

    def to_dict(self) -> dict[str, Any]:
        """The JSON document; ``"partial": true`` only in a run cut short."""
        out: dict[str, Any] = {
            "schema_version": 1,
            "scenario": self.scenario,
            "seed": self.seed,
            "results": [r.to_dict() for r in self.results],
        }
        if self.partial:
            out["partial"] = True
        return out


# ----------------------------------------------------------------------------- decoding


class InvalidResults(ValueError):
    """Results JSON that does not follow docs/results-schema.md; ``where`` is the JSON
    location (``runs[3].tasks[0].work_s``), ``problem`` what is wrong there."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


# The schema's shapes. Strict: no number from a string, no integer from a bool or a float;
# numbers finite. Keys the schema does not name are kept (newer files may add some).
SCHEMA_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


@with_config(SCHEMA_CONFIG)
class _TaskJson(TypedDict):
    name: str
    kind: str
    cpu: int
    work_s: float
    ops: int
    completion_s: float | None
    state: str
    ops_unit: NotRequired[str | None]
    ops_per_s: NotRequired[float | None]


@with_config(SCHEMA_CONFIG)
class _VcpuJson(TypedDict):
    vcpu: int
    time_s: dict[str, float]
    run_delay_s: NotRequired[float]


@with_config(SCHEMA_CONFIG)
class _HostCpuJson(TypedDict):
    cpus: int
    run_delay_s: float


@with_config(SCHEMA_CONFIG)
class _LatencyJson(TypedDict):
    count: int
    p50: float | None
    p99: float | None
    cdf_us: NotRequired[list[float]]


# Functional form: "async" is a keyword.
_FaultsJson = TypedDict(
    "_FaultsJson",
    {
        "zero_fill": int,
        "minor": int,
        "needs_io": int,
        "async": int,
        "sync": int,
        "repeated": int,
        "fault_in_latency_us": _LatencyJson,
        "not_present_to_ready_us": _LatencyJson,
    },
)
_FaultsJson.__pydantic_config__ = SCHEMA_CONFIG  # type: ignore[attr-defined]


@with_config(SCHEMA_CONFIG)
class _MemoryJson(TypedDict):
    pages_evicted: float
    swap_reads: float
    swap_writes: float
    context_switches: float
    ipis: float


@with_config(SCHEMA_CONFIG)
class _ProtocolJson(TypedDict):
    tasks: list[_TaskJson]
    vcpus: list[_VcpuJson]
    apf: dict[str, int]
    faults: _FaultsJson
    memory: _MemoryJson
    sim_time_s: float
    protocol: str
    events: int
    tracepoints: NotRequired[dict[str, int]]
    host_cpu: NotRequired[_HostCpuJson]
    host_costs: NotRequired[dict[str, int | str]]
    postcopy: NotRequired[dict[str, Any]]
    wall_time_s: NotRequired[float]


_PROTOCOL = TypeAdapter(_ProtocolJson)
_T = TypeVar("_T")
_PROBLEMS = {
    "dict_type": "expected an object",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "float_type": "expected a finite number",
    "finite_number": "expected a finite number",
}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _at(where: str, loc: Any) -> str:
    """``where`` followed by a pydantic location: keys as ``.key``, indices as ``[i]``."""
    out = where
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out and out != "top level" else str(part)
    return out or "top level"


def decode(adapter: TypeAdapter[_T], data: Any, where: str) -> _T:
    """``data`` validated by ``adapter``; the first problem as :class:`InvalidResults` at
    ``where`` plus its location in ``data``."""
    try:
        return adapter.validate_python(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc, kind = list(first["loc"]), first["type"]
        if kind == "missing":
            key = loc.pop()
            raise InvalidResults(_at(where, loc), f"missing {key!r}") from None
        problem = _PROBLEMS.get(kind, str(first["msg"]).lower())
        raise InvalidResults(
            _at(where, loc), f"{problem}, got {_type_name(first['input'])}"
        ) from None


def _protocol_result(data: Any, where: str) -> ProtocolResult:
    """:meth:`ProtocolResult.from_dict`: the schema's shapes, then its rules."""
    checked = decode(_PROTOCOL, data, where)
    if not checked["tasks"]:
        raise InvalidResults(f"{where}.tasks", "no task")
    if not checked["vcpus"]:
        raise InvalidResults(f"{where}.vcpus", "no vCPU")
    for i, vcpu in enumerate(checked["vcpus"]):
        for category in VCPU_CATEGORIES:
            if category not in vcpu["time_s"]:
                raise InvalidResults(f"{where}.vcpus[{i}].time_s", f"missing {category!r}")
    if any(v["time_s"].keys() != checked["vcpus"][0]["time_s"].keys() for v in checked["vcpus"]):
        raise InvalidResults(f"{where}.vcpus", "the vCPUs have different time categories")
    faults = checked["faults"]
    for key, latency in zip(
        LATENCIES, (faults["fault_in_latency_us"], faults["not_present_to_ready_us"]), strict=True
    ):
        cdf = latency.get("cdf_us")
        here = f"{where}.faults.{key}.cdf_us"
        if cdf is not None and latency["count"] > 0 and len(cdf) < 2:
            raise InvalidResults(here, f"{latency['count']} samples but {len(cdf)} quantiles")
        if cdf is not None and any(b < a for a, b in itertools.pairwise(cdf)):
            raise InvalidResults(here, "quantiles not in increasing order")
    if checked["sim_time_s"] <= 0:
        raise InvalidResults(
            f"{where}.sim_time_s", f"must be positive (got {checked['sim_time_s']})"
        )
    # Built from the document itself: the values are exactly those written (an integer
    # stays an integer), so to_dict gives the same JSON back.
    return ProtocolResult(
        protocol=data["protocol"],
        sim_time_s=data["sim_time_s"],
        wall_time_s=data.get("wall_time_s", 0.0),
        events=data["events"],
        tasks=[TaskResult(**t) for t in data["tasks"]],
        vcpus=[VcpuResult(**v) for v in data["vcpus"]],
        apf=data["apf"],
        faults=data["faults"],
        memory=data["memory"],
        tracepoints=data.get("tracepoints", {}),
        host_cpu=data.get("host_cpu"),
        host_costs=data.get("host_costs", {}),
        postcopy=data.get("postcopy"),
    )
