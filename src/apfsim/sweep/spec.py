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

The number of runs is counted from the axes' lengths before anything is built, and a sweep
of more than :data:`MAX_RUNS` runs or :data:`MAX_POINTS` points is refused. Then every
point's scenario is built and validated once, before anything runs, so a bad path, an
empty axis or a value of the wrong type fails at once, naming the axis. The runs
themselves (:class:`SweepRuns`) are made on demand, point by point, as a sweep goes.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, overload

from pydantic import ValidationError

from apfsim.registry import PROTOCOLS
from apfsim.runner import RunSpec
from apfsim.scenario import (
    MAX_DURATION_S,
    Scenario,
    ScenarioError,
    did_you_mean,
    load_scenario,
    one_line,
    parse_toml,
    scenario_from_dict,
    set_path,
    short_repr,
    with_overrides,
)

__all__ = [
    "MAX_POINTS",
    "MAX_RUNS",
    "RunSpec",
    "SweepError",
    "SweepRuns",
    "SweepSpec",
    "builtin_sweeps",
    "load_sweep",
    "one_point",
    "parse_sweep",
]

MAX_RUNS = 1_000_000
# Every point is validated before the sweep starts (about 20 µs each): 100 000 points take
# about 2 s.
MAX_POINTS = 100_000
MAX_SEED = (1 << 63) - 1  # a seed is an SQLite INTEGER
_KEYS = {"name", "description", "scenario", "duration_s", "protocols", "seeds", "baseline"}
_KEYS |= {"check", "set", "grid", "zip"}


class SweepError(ValueError):
    """A sweep file that cannot be run; the message is one line naming the field."""


Params = tuple[tuple[str, Any], ...]


class SweepRuns(Sequence[RunSpec]):
    """A sweep's runs in order (point, then protocol, then seed), each made when asked for:
    a point's scenario is built once for all its runs, and no list of runs is kept."""

    def __init__(
        self,
        base: dict[str, Any],
        grid: Sequence[tuple[str, Sequence[Any]]],
        zipped: Sequence[tuple[str, Sequence[Any]]],
        protocols: Sequence[str],
        seeds: Sequence[int],
        duration: float | None,
        check: bool,
    ) -> None:
        self._base = base  # the scenario with [set] applied, model_dump(mode="python")
        self._grid = tuple(grid)
        self._zip = tuple(zipped)
        self._zip_len = len(zipped[0][1]) if zipped else 1
        self.protocols = tuple(protocols)
        self.seeds = seeds
        self._duration = duration  # as the file gives it: part of the key
        self._check = check
        self.points = math.prod(len(v) for _, v in self._grid) * self._zip_len
        self._per_point = len(self.protocols) * len(seeds)
        self._cached: tuple[int, dict[str, Any], list[Any]] | None = None

    def __len__(self) -> int:
        return self.points * self._per_point

    @overload
    def __getitem__(self, index: int) -> RunSpec: ...
    @overload
    def __getitem__(self, index: slice) -> list[RunSpec]: ...
    def __getitem__(self, index: int | slice) -> RunSpec | list[RunSpec]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        point, rest = divmod(index, self._per_point)
        p, s = divmod(rest, len(self.seeds))
        return self._run(point, p, s)

    def __iter__(self) -> Iterator[RunSpec]:
        for point in range(self.points):
            for p in range(len(self.protocols)):
                for s in range(len(self.seeds)):
                    yield self._run(point, p, s)

    def run_keys(self) -> Iterator[str]:
        """Every run's key, in order (cheaper than the runs themselves)."""
        for point in range(self.points):
            heads = self._point(point)[1]
            for head in heads:
                for seed in self.seeds:
                    digest = head.copy()
                    digest.update(f"{seed}}}".encode())
                    yield digest.hexdigest()[:32]

    def params(self, point: int) -> Params:
        """The axis values of ``point``: grid axes (the last varies fastest), then zip."""
        combo, row = divmod(point, self._zip_len)
        values: list[tuple[str, Any]] = []
        for path, axis in reversed(self._grid):
            combo, i = divmod(combo, len(axis))
            values.append((path, axis[i]))
        values.reverse()
        values += [(path, axis[row]) for path, axis in self._zip]
        return tuple(values)

    def scenario_data(self, params: Params) -> dict[str, Any]:
        """The scenario dict of a point, not yet validated."""
        data = self._base
        for path, value in params:
            data = set_path(data, path, value)
        return data

    def _point(self, point: int) -> tuple[dict[str, Any], list[Any]]:
        """The resolved scenario of ``point`` and, per protocol, the hash of its run keys
        up to the seed (the last key of the JSON hashed)."""
        if self._cached is not None and self._cached[0] == point:
            return self._cached[1], self._cached[2]
        scenario = scenario_from_dict(self.scenario_data(self.params(point)))
        resolved = scenario.model_dump(mode="json")
        # json.dumps(..., sort_keys=True) of {check, duration_s, protocol, scenario, seed}
        # written out: the same bytes, so the same keys as every earlier apfsim.
        # Keys added later are left out at their defaults (scenario._LaterKeys).
        scenario_json = json.dumps(resolved, sort_keys=True)
        heads = []
        for protocol in self.protocols:
            head = (
                f'{{"check": {json.dumps(self._check)}, '
                f'"duration_s": {json.dumps(self._duration)}, '
                f'"protocol": {json.dumps(protocol)}, "scenario": {scenario_json}, "seed": '
            )
            heads.append(hashlib.sha256(head.encode()))
        self._cached = (point, resolved, heads)
        return resolved, heads

    def _run(self, point: int, p: int, s: int) -> RunSpec:
        resolved, heads = self._point(point)
        seed = self.seeds[s]
        digest = heads[p].copy()
        digest.update(f"{seed}}}".encode())
        return RunSpec(
            digest.hexdigest()[:32],
            point,
            self.params(point),
            self.protocols[p],
            seed,
            resolved,
            None if self._duration is None else float(self._duration),
            self._check,
        )


def one_point(
    scenario: Scenario,
    protocols: Sequence[str],
    seeds: Sequence[int],
    duration_s: float | None,
    check: bool,
) -> list[RunSpec]:
    """A sweep of one point, the scenario as it is: every protocol on every seed, in that
    order, with the keys a sweep of that scenario gives them (``run`` and ``compare``)."""
    return list(SweepRuns(scenario.model_dump(), (), (), protocols, seeds, duration_s, check))


@dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str
    axes: tuple[str, ...]
    protocols: tuple[str, ...]
    seeds: tuple[int, ...]
    baseline: str
    runs: SweepRuns
    source: dict[str, Any]

    @property
    def points(self) -> int:
        return self.runs.points


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
            hint = did_you_mean(str(name_or_path), _builtin_names())
            raise SweepError(
                f"{source}: no such sweep file or built-in sweep (built-in: {known}){hint}"
            ) from None
        except (OSError, ValueError) as err:  # ValueError: not UTF-8, a NUL in the name
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise SweepError(f"{source}: cannot read the sweep file ({reason})") from None
        base_dir = path.parent
    try:
        data = parse_toml(text)
    except tomllib.TOMLDecodeError as err:
        raise SweepError(f"{source}: not valid TOML ({err})") from None
    return parse_sweep(data, source, base_dir)


def _fail(source: str, field: str, message: str) -> SweepError:
    return SweepError(one_line(f"{source}: {field}: {message}"))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number that is a finite float (a TOML integer of 400 digits is not)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _axis_values(source: str, field: str, raw: Any, each_once: bool = True) -> list[Any]:
    """A list, or ``{logspace = [a, b], num = n}`` / ``{linspace = [a, b], num = n}``
    (``integer = true`` rounds to ints). A grid axis gives each value once (a zip axis may
    repeat a value: its rows must differ)."""
    if isinstance(raw, dict):
        kind = "logspace" if "logspace" in raw else "linspace" if "linspace" in raw else None
        extra = set(raw) - {"logspace", "linspace", "num", "integer"}
        if kind is None or extra or ("logspace" in raw and "linspace" in raw):
            raise _fail(
                source,
                field,
                "a table axis needs logspace = [start, stop] or linspace = "
                "[start, stop], num = N (and optional integer = true)",
            )
        ends, integer = raw[kind], raw.get("integer", False)
        if not isinstance(ends, list) or len(ends) != 2 or not all(_is_finite(v) for v in ends):
            raise _fail(source, field, f"{kind} needs two finite numbers [start, stop]")
        num = _check_num(source, field, raw.get("num"))
        if not isinstance(integer, bool):
            raise _fail(source, field, "integer must be true or false")
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
        if not all(math.isfinite(v) for v in values):
            raise _fail(source, field, f"{kind} overflows; give ends closer together")
        if integer:
            return sorted(set(round(v) for v in values))
        return list(dict.fromkeys(float(f"{v:.6g}") for v in values))
    if not isinstance(raw, list):
        raise _fail(source, field, f"expected a list of values (got {short_repr(raw)})")
    if not raw:
        raise _fail(source, field, "empty axis; give at least one value")
    twice = _repeated(raw) if each_once else None
    if twice is not None:
        raise _fail(source, field, f"{short_repr(twice)} is given twice; give each value once")
    return raw


def _check_num(source: str, field: str, num: Any) -> int:
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= MAX_POINTS:
        raise _fail(source, field, f"num must be an integer from 1 to {MAX_POINTS}")
    return num


def _repeated(values: Sequence[Any]) -> Any:
    """The first value equal to an earlier one (None if none; unhashable values are let
    through: no scenario field takes them)."""
    seen: set[Any] = set()
    for value in values:
        try:
            if value in seen:
                return value
            seen.add(value)
        except TypeError:
            continue
    return None


def _parse_seeds(source: str, raw: Any) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        if raw > MAX_RUNS:
            raise _fail(source, "seeds", f"{raw} seeds is more than {MAX_RUNS} runs; split it")
        return tuple(range(raw))
    if (
        isinstance(raw, list)
        and raw
        and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in raw)
        and len(set(raw)) == len(raw)
    ):
        return tuple(raw)
    raise _fail(
        source,
        "seeds",
        f"a count >= 1 or a list of distinct seeds from 0 to 2**63 - 1 (got {short_repr(raw)})",
    )


def parse_sweep(data: dict[str, Any], source: str, base_dir: Path = Path(".")) -> SweepSpec:
    """Validate ``data``, count its runs, and check every point's scenario once."""
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise _fail(
            source,
            unknown[0],
            f"unknown key; allowed: {', '.join(sorted(_KEYS))}{did_you_mean(unknown[0], _KEYS)}",
        )
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise _fail(source, "name", f"must be a non-empty string (got {short_repr(name)})")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(source, "description", "must be a string")
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
        not _is_number(duration) or not 0 < duration <= MAX_DURATION_S  # NaN fails too
    ):
        raise _fail(
            source,
            "duration_s",
            f"must be a number of seconds in (0, {MAX_DURATION_S:g}] (got {short_repr(duration)})",
        )
    protocols = data.get("protocols", ["sync", "arm64-rfcv2"])
    if not isinstance(protocols, list) or not protocols:
        raise _fail(source, "protocols", "give a non-empty list of protocol names")
    for p in protocols:
        if not isinstance(p, str) or p not in PROTOCOLS:
            raise _fail(
                source,
                "protocols",
                f"unknown protocol {short_repr(p)}; choose from {', '.join(PROTOCOLS)}"
                f"{did_you_mean(p, PROTOCOLS)}",
            )
    if len(set(protocols)) != len(protocols):
        raise _fail(source, "protocols", "each protocol may be given once")
    seeds = _parse_seeds(source, data.get("seeds", 1))
    baseline = data.get("baseline", "sync" if "sync" in protocols else protocols[0])
    if not isinstance(baseline, str) or baseline not in protocols:
        raise _fail(source, "baseline", f"{short_repr(baseline)} is not one of the protocols")
    check = data.get("check", True)
    if not isinstance(check, bool):
        raise _fail(source, "check", "true or false")
    fixed = data.get("set", {})
    grid = data.get("grid", {})
    zipped = data.get("zip", {})
    for section, table in (("set", fixed), ("grid", grid), ("zip", zipped)):
        if not isinstance(table, dict):
            raise _fail(source, section, "must be a table of dotted scenario paths")
    axes, zip_values = _count_axes(source, grid, zipped, len(protocols) * len(seeds))
    names = [p for p, _ in axes] + [p for p, _ in zip_values]
    twice = [p for p, n in Counter(names).items() if n > 1]
    overlap = sorted(set(names) & set(fixed)) or twice
    if overlap:
        raise _fail(source, overlap[0], "set more than once (in set, grid and zip)")
    try:
        fixed_scenario = with_overrides(base, fixed) if fixed else base
    except ScenarioError as err:
        raise _fail(source, "set", str(err)) from None
    runs = SweepRuns(
        fixed_scenario.model_dump(mode="python"),
        axes,
        zip_values,
        protocols,
        seeds,
        duration,
        check,
    )
    _validate_points(source, runs, fixed_scenario, axes, zip_values)
    return SweepSpec(
        name=name,
        description=description,
        axes=tuple(names),
        protocols=tuple(protocols),
        seeds=seeds,
        baseline=baseline,
        runs=runs,
        source=data,
    )


def _count_axes(
    source: str, grid: dict[str, Any], zipped: dict[str, Any], runs_per_point: int
) -> tuple[list[tuple[str, list[Any]]], list[tuple[str, list[Any]]]]:
    """The grid and zip axes' values, refusing a sweep over the limits before any value
    is made: a table axis is only expanded once its num is known to fit."""
    tables = [
        (f"{section}.{path}", raw)
        for section, axes in (("grid", grid), ("zip", zipped))
        for path, raw in axes.items()
        if isinstance(raw, dict) and "num" in raw
    ]
    for field, raw in tables:
        _check_num(source, field, raw["num"])
    nums = sum(raw["num"] for _, raw in tables)
    if nums > MAX_RUNS:
        raise _fail(source, "grid", f"the axes' num add up to {nums}, more than {MAX_RUNS}")
    zip_values = [
        (p, _axis_values(source, f"zip.{p}", raw, each_once=False)) for p, raw in zipped.items()
    ]
    if zip_values and len({len(v) for _, v in zip_values}) != 1:
        lengths = ", ".join(f"{p}: {len(v)}" for p, v in zip_values)
        raise _fail(source, "zip", f"lists must have one length ({lengths})")
    if zip_values:
        twice = _repeated(list(zip(*(v for _, v in zip_values), strict=True)))
        if twice is not None:
            raise _fail(
                source, "zip", f"the values {short_repr(twice)} are given twice; give each once"
            )
    points = len(zip_values[0][1]) if zip_values else 1
    axes: list[tuple[str, list[Any]]] = []
    for path, raw in grid.items():
        axes.append((path, _axis_values(source, f"grid.{path}", raw)))
        points *= len(axes[-1][1])
        _check_size(source, points, runs_per_point)
    _check_size(source, points, runs_per_point)
    return axes, zip_values


def _check_size(source: str, points: int, runs_per_point: int) -> None:
    if points * runs_per_point > MAX_RUNS:
        raise _fail(
            source,
            "grid",
            f"{points * runs_per_point} runs is more than {MAX_RUNS}; split the sweep",
        )
    if points > MAX_POINTS:
        raise _fail(source, "grid", f"{points} points is more than {MAX_POINTS}; split the sweep")


def _validate_points(
    source: str,
    runs: SweepRuns,
    fixed_scenario: Scenario,
    axes: Sequence[tuple[str, Sequence[Any]]],
    zip_values: Sequence[tuple[str, Sequence[Any]]],
) -> None:
    """Build and validate every point's scenario, once each; blame an axis whose value is
    bad on its own, else the combination."""
    section_of = {p: "grid" for p, _ in axes} | {p: "zip" for p, _ in zip_values}
    for point in range(runs.points):
        params = runs.params(point)
        try:
            Scenario.model_validate(runs.scenario_data(params))
        except (ScenarioError, ValidationError):
            for path, value in params:
                try:
                    with_overrides(fixed_scenario, {path: value})
                except ScenarioError as alone:
                    raise _fail(source, f"{section_of[path]}.{path}", str(alone)) from None
            message = "invalid together"
            try:
                scenario_from_dict(runs.scenario_data(params), "override")
            except ScenarioError as full:
                message = str(full)
            shown = ", ".join(f"{p}={short_repr(v)}" for p, v in params)
            raise _fail(source, f"point {point} ({shown})", message) from None


def scenario_of(run: RunSpec) -> Scenario:
    return scenario_from_dict(run.scenario)
