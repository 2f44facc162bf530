"""Sweep files: a base scenario, fixed overrides and axes, expanded into runs.

A sweep file is TOML::

    name = "latency-map"
    scenario = "rfcv2-2020"        # built-in name, or a path relative to the sweep file
    duration_s = 60.0              # optional: overrides the scenario's
    protocols = ["sync", "x86"]
    seeds = 3                      # N (seeds 0..N-1) or a list of seeds
    baseline = "sync"              # what sweep-report pairs ratios with
    [set]                          # fixed overrides for every run (dotted scenario paths)
    "host.swap.distribution" = "exponential"
    [grid]                         # every combination of these axes
    "host.swap.mean_us" = { logspace = [36.0, 55000.0], num = 7 }
    "host.memory_limit_mib" = [171, 128, 85]
    [zip]                          # lists of one length, varied together: one more axis
    "guest.vcpus" = [1, 2]
    "tasks.1.count" = [1, 2]

Every run's scenario is built and validated before anything runs, so a bad path, an empty
axis or a value of the wrong type fails at once, naming the axis.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from apfsim.registry import PROTOCOLS
from apfsim.scenario import (
    Scenario,
    ScenarioError,
    load_scenario,
    one_line,
    parse_toml,
    with_overrides,
)

__all__ = ["RunSpec", "SweepError", "SweepSpec", "builtin_sweeps", "load_sweep"]

MAX_RUNS = 1_000_000
_KEYS = {"name", "description", "scenario", "duration_s", "protocols", "seeds", "baseline"}
_KEYS |= {"check", "set", "grid", "zip"}


class SweepError(ValueError):
    """A sweep file that cannot be run; the message is one line naming the field."""


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One run of a sweep: a point of the axes, a protocol and a seed."""

    key: str  # content hash: the resolved scenario, protocol, seed, duration, check
    point: int
    params: tuple[tuple[str, Any], ...]  # the axis values of this point, in axis order
    protocol: str
    seed: int
    scenario: dict[str, Any]  # resolved (JSON-able) scenario with every override applied
    duration_s: float | None
    check: bool


@dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str
    axes: tuple[str, ...]
    protocols: tuple[str, ...]
    seeds: tuple[int, ...]
    baseline: str
    runs: tuple[RunSpec, ...]
    source: dict[str, Any]

    @property
    def points(self) -> int:
        return len({r.point for r in self.runs})


def _builtin_names() -> set[str]:
    return {
        e.name[:-5] for e in resources.files("apfsim.sweeps").iterdir() if e.name.endswith(".toml")
    }


def builtin_sweeps() -> dict[str, str]:
    """Built-in sweep names mapped to their descriptions."""
    out: dict[str, str] = {}
    for entry in sorted(resources.files("apfsim.sweeps").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text())
            out[entry.name[:-5]] = str(data.get("description", ""))
    return out


def load_sweep(name_or_path: str | Path) -> SweepSpec:
    """A built-in sweep by name, or a sweep file by path; raises :class:`SweepError`."""
    base_dir = Path(".")
    source = one_line(str(name_or_path))
    if str(name_or_path) in _builtin_names():
        text = (resources.files("apfsim.sweeps") / f"{name_or_path}.toml").read_text()
    else:
        path = Path(name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            known = ", ".join(builtin_sweeps())
            raise SweepError(
                f"{source}: no such sweep file or built-in sweep (built-in: {known})"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise SweepError(f"{source}: cannot read the sweep file ({reason})") from None
        base_dir = path.parent
    try:
        data = parse_toml(text)
    except tomllib.TOMLDecodeError as err:
        raise SweepError(f"{source}: not valid TOML ({err})") from None
    return parse_sweep(data, source, base_dir)


def _fail(source: str, field: str, message: str) -> SweepError:
    return SweepError(f"{source}: {field}: {message}")


def _axis_values(source: str, field: str, raw: Any) -> list[Any]:
    """A list, or ``{logspace = [a, b], num = n}`` / ``{linspace = [a, b], num = n}``
    (``integer = true`` rounds to ints)."""
    if isinstance(raw, dict):
        kind = "logspace" if "logspace" in raw else "linspace" if "linspace" in raw else None
        extra = set(raw) - {"logspace", "linspace", "num", "integer"}
        if kind is None or extra:
            raise _fail(
                source,
                field,
                "a table axis needs logspace = [start, stop] or linspace = "
                "[start, stop], num = N (and optional integer = true)",
            )
        ends, num = raw[kind], raw.get("num")
        if (
            not isinstance(ends, list)
            or len(ends) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in ends)
        ):
            raise _fail(source, field, f"{kind} needs two numbers [start, stop]")
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise _fail(source, field, "num must be a positive integer")
        start, stop = float(ends[0]), float(ends[1])
        if kind == "logspace":
            if start <= 0 or stop <= 0:
                raise _fail(source, field, "logspace ends must be positive")
            ratio = stop / start
            values = [start * ratio ** (i / (num - 1)) if num > 1 else start for i in range(num)]
        else:
            values = [
                start + (stop - start) * i / (num - 1) if num > 1 else start for i in range(num)
            ]
        if raw.get("integer", False):
            return sorted(set(round(v) for v in values))
        return [float(f"{v:.6g}") for v in values]
    if not isinstance(raw, list):
        raise _fail(source, field, f"expected a list of values (got {raw!r})")
    if not raw:
        raise _fail(source, field, "empty axis; give at least one value")
    return raw


def parse_sweep(data: dict[str, Any], source: str, base_dir: Path = Path(".")) -> SweepSpec:
    """Validate ``data`` and expand it into runs (every scenario built and checked)."""
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise _fail(source, unknown[0], f"unknown key; allowed: {', '.join(sorted(_KEYS))}")
    name = data.get("name", Path(source).stem)
    scenario_ref = data.get("scenario")
    if not isinstance(scenario_ref, str):
        raise _fail(source, "scenario", "give a built-in scenario name or a TOML path")
    ref = scenario_ref if "/" not in scenario_ref else str(base_dir / scenario_ref)
    try:
        base = load_scenario(ref)
    except ScenarioError as err:
        raise _fail(source, "scenario", str(err)) from None
    duration = data.get("duration_s")
    if duration is not None and (
        not isinstance(duration, int | float) or isinstance(duration, bool) or duration <= 0
    ):
        raise _fail(
            source, "duration_s", f"must be a positive number of seconds (got {duration!r})"
        )
    protocols = data.get("protocols", ["sync", "arm64-rfcv2"])
    if not isinstance(protocols, list) or not protocols:
        raise _fail(source, "protocols", "give a non-empty list of protocol names")
    for p in protocols:
        if p not in PROTOCOLS:
            raise _fail(
                source, "protocols", f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}"
            )
    if len(set(protocols)) != len(protocols):
        raise _fail(source, "protocols", "each protocol may be given once")
    seeds_raw = data.get("seeds", 1)
    if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool) and seeds_raw >= 1:
        seeds = list(range(seeds_raw))
    elif (
        isinstance(seeds_raw, list)
        and seeds_raw
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_raw)
        and len(set(seeds_raw)) == len(seeds_raw)
    ):
        seeds = list(seeds_raw)
    else:
        raise _fail(
            source, "seeds", f"a count >= 1 or a list of distinct seeds >= 0 (got {seeds_raw!r})"
        )
    baseline = str(data.get("baseline", "sync" if "sync" in protocols else protocols[0]))
    if baseline not in protocols:
        raise _fail(source, "baseline", f"{baseline!r} is not one of the sweep's protocols")
    check = data.get("check", True)
    if not isinstance(check, bool):
        raise _fail(source, "check", "true or false")
    fixed = data.get("set", {})
    grid = data.get("grid", {})
    zipped = data.get("zip", {})
    for section, table in (("set", fixed), ("grid", grid), ("zip", zipped)):
        if not isinstance(table, dict):
            raise _fail(source, section, "must be a table of dotted scenario paths")
    axes: list[tuple[str, list[Any]]] = []
    for path, raw in grid.items():
        axes.append((path, _axis_values(source, f"grid.{path}", raw)))
    zip_values: list[tuple[str, list[Any]]] = [
        (path, _axis_values(source, f"zip.{path}", raw)) for path, raw in zipped.items()
    ]
    if zip_values and len({len(v) for _, v in zip_values}) != 1:
        lengths = ", ".join(f"{p}: {len(v)}" for p, v in zip_values)
        raise _fail(source, "zip", f"lists must have one length ({lengths})")
    names = [p for p, _ in axes] + [p for p, _ in zip_values]
    overlap = sorted(set(names) & set(fixed)) or sorted(p for p in names if names.count(p) > 1)
    if overlap:
        raise _fail(source, overlap[0], "set more than once (in set, grid and zip)")
    try:
        fixed_scenario = with_overrides(base, fixed) if fixed else base
    except ScenarioError as err:
        raise _fail(source, "set", str(err)) from None
    section_of = {p: "grid" for p, _ in axes} | {p: "zip" for p, _ in zip_values}
    combos: list[list[tuple[str, Any]]] = [
        list(zip([p for p, _ in axes], combo, strict=True))
        for combo in itertools.product(*(v for _, v in axes))
    ]
    if zip_values:
        n = len(zip_values[0][1])
        combos = [c + [(p, v[i]) for p, v in zip_values] for c in combos for i in range(n)]
    total = len(combos) * len(protocols) * len(seeds)
    if total > MAX_RUNS:
        raise _fail(source, "grid", f"{total} runs is more than {MAX_RUNS}; split the sweep")
    runs: list[RunSpec] = []
    for point, params in enumerate(combos):
        try:
            scenario = with_overrides(fixed_scenario, dict(params)) if params else fixed_scenario
        except ScenarioError as err:
            # Blame the axis whose value is bad on its own; else the combination.
            for path, value in params:
                try:
                    with_overrides(fixed_scenario, {path: value})
                except ScenarioError as alone:
                    raise _fail(source, f"{section_of[path]}.{path}", str(alone)) from None
            shown = ", ".join(f"{p}={v!r}" for p, v in params)
            raise _fail(source, f"point {point} ({shown})", str(err)) from None
        resolved = scenario.model_dump(mode="json")
        for protocol in protocols:
            for seed in seeds:
                runs.append(
                    RunSpec(
                        _run_key(resolved, protocol, seed, duration, check),
                        point,
                        tuple(params),
                        protocol,
                        seed,
                        resolved,
                        None if duration is None else float(duration),
                        check,
                    )
                )
    return SweepSpec(
        name=str(name),
        description=str(data.get("description", "")),
        axes=tuple(names),
        protocols=tuple(protocols),
        seeds=tuple(seeds),
        baseline=baseline,
        runs=tuple(runs),
        source=data,
    )


def _run_key(
    scenario: dict[str, Any], protocol: str, seed: int, duration: float | None, check: bool
) -> str:
    """What identifies a run's result: the same key, the same result (byte for byte)."""
    blob = json.dumps(
        {
            "scenario": scenario,
            "protocol": protocol,
            "seed": seed,
            "duration_s": duration,
            "check": check,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def scenario_of(run: RunSpec) -> Scenario:
    from apfsim.scenario import scenario_from_dict

    return scenario_from_dict(run.scenario)
