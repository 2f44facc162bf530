"""Typed results; ``to_dict`` gives the JSON schema of docs/results-schema.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ProtocolResult", "RunResult", "TaskResult", "VcpuResult"]


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
        return row

    def to_dict(self, include_wall: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_wall:
            # Wall-clock figures differ run to run; keep the JSON byte-identical.
            data.pop("wall_time_s")
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
