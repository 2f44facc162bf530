"""A sweep's runs grouped by the chosen axes and protocol: per group every metric's mean
and 95 % CI (:func:`apfsim.stats.estimate`) and every rate's paired ratio to the baseline
(:func:`apfsim.stats.paired_ratios`), paired by full point and seed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from apfsim.scenario import did_you_mean
from apfsim.stats import Estimate, estimate, paired_ratios
from apfsim.sweep.report.files import SweepInfo, SweepReportError, load_sweep_db
from apfsim.sweep.store import StoredRun


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One group: the runs of one protocol whose grouped axes have these values."""

    values: tuple[Any, ...]  # the grouped axes' values, in ``SweepAggregate.by`` order
    protocol: str
    n: int  # runs in the group
    n_paired: int  # of them, runs with a baseline run of the same point and seed
    points: tuple[int, ...]  # the sweep points pooled into the group
    metrics: dict[str, Estimate]  # every metric -> its estimate over the group's runs
    ratios: dict[str, Estimate]  # every work rate -> estimate of the paired ratios


@dataclass(frozen=True, slots=True)
class SweepAggregate:
    """The groups of a sweep, ordered by the ``by`` axes in turn (each axis's values in the
    order the sweep lists them), then by the sweep's protocol order.

    ``runs`` are read without their full results (``result`` is None): the statistics need
    the metrics only, and a large sweep's results take memory. The HTML page reads the few
    it shows from ``db_path`` (:func:`point_results`).
    """

    info: SweepInfo
    by: tuple[str, ...]
    baseline: str
    metrics: tuple[str, ...]  # every metric with at least one value, sorted
    ratio_metrics: tuple[str, ...]  # the work rates among them
    groups: tuple[GroupStats, ...]
    runs: tuple[StoredRun, ...]  # the completed runs, by (point, protocol, seed)
    db_path: Path | None = None  # where the runs' full results can be read

    def group(self, values: Sequence[Any], protocol: str) -> GroupStats:
        wanted = value_key(tuple(values))
        for g in self.groups:
            if g.protocol == protocol and value_key(g.values) == wanted:
                return g
        raise KeyError((tuple(values), protocol))


def value_key(value: Any) -> str:
    """A hashable, exact identity for axis values (which may be lists or tables)."""
    return json.dumps(value, sort_keys=True)


def aggregate(
    db_path: Path,
    sweep: str | None = None,
    by: Sequence[str] | None = None,
    baseline: str | None = None,
) -> SweepAggregate:
    """Read a sweep from its database and aggregate it (raises SweepReportError)."""
    info, runs = load_sweep_db(db_path, sweep)
    return replace(aggregate_runs(info, runs, by, baseline), db_path=db_path)


def aggregate_runs(
    info: SweepInfo,
    runs: Sequence[StoredRun],
    by: Sequence[str] | None = None,
    baseline: str | None = None,
) -> SweepAggregate:
    """Group ``runs`` by the ``by`` axes (default: all) and protocol; estimates per group."""
    axes = tuple(by) if by is not None else info.axes
    for axis in axes:
        if axis not in info.axes:
            known = ", ".join(info.axes) if info.axes else "none (the sweep has no axis)"
            raise SweepReportError(
                f"--by: {axis!r} is not an axis of sweep {info.name!r}; its axes: {known}"
                f"{did_you_mean(axis, info.axes)}"
            )
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:
        raise SweepReportError(f"--by: axis {repeated[0]!r} given more than once")
    base = info.baseline if baseline is None else baseline
    if base not in info.protocols:
        raise SweepReportError(
            f"--baseline: {base!r} is not a protocol of sweep {info.name!r}; "
            f"its protocols: {', '.join(info.protocols)}{did_you_mean(base, info.protocols)}"
        )
    if not runs:
        failed = info.counts.get("error", 0)
        why = f" ({failed} failed; see their errors in the runs table)" if failed else ""
        raise SweepReportError(
            f"sweep {info.name!r} has no completed run{why}; run 'apfsim sweep' first"
        )
    found: dict[str, None] = {}
    for run in runs:
        found.update(dict.fromkeys(k for k, v in run.metrics.items() if v is not None))
    metrics = tuple(sorted(found))
    ratio_metrics = tuple(m for m in metrics if m.endswith((".work_rate", ".ops_rate")))
    baseline_runs = {(value_key(r.params), r.seed): r for r in runs if r.protocol == base}
    members: dict[tuple[str, str], list[StoredRun]] = {}
    values: dict[str, tuple[Any, ...]] = {}
    ranks: list[dict[str, int]] = [{} for _ in axes]  # per axis: value -> first appearance
    for run in runs:  # in point order: each axis's values as the sweep file lists them
        group_values = tuple(run.params.get(a) for a in axes)
        for rank, value in zip(ranks, group_values, strict=True):
            rank.setdefault(value_key(value), len(rank))
        key = value_key(group_values)
        values.setdefault(key, group_values)
        members.setdefault((key, run.protocol), []).append(run)
    order = sorted(
        values,
        key=lambda k: [r[value_key(v)] for r, v in zip(ranks, values[k], strict=True)],
    )
    protocol_order = list(info.protocols)
    protocol_order += sorted({r.protocol for r in runs} - set(protocol_order))
    groups = []
    for key in order:
        group_values = values[key]
        for protocol in protocol_order:
            group_runs = members.get((key, protocol))
            if group_runs is None:
                continue
            pairs = [
                (r, b)
                for r in group_runs
                if (b := baseline_runs.get((value_key(r.params), r.seed))) is not None
            ]
            groups.append(
                GroupStats(
                    values=group_values,
                    protocol=protocol,
                    n=len(group_runs),
                    n_paired=len(pairs),
                    points=tuple(sorted({r.point for r in group_runs})),
                    metrics={m: estimate([r.metrics.get(m) for r in group_runs]) for m in metrics},
                    ratios={
                        m: estimate(
                            paired_ratios(
                                [r.metrics.get(m) for r, _ in pairs],
                                [b.metrics.get(m) for _, b in pairs],
                            )
                        )
                        for m in ratio_metrics
                    },
                )
            )
    return SweepAggregate(info, axes, base, metrics, ratio_metrics, tuple(groups), tuple(runs))


def default_metric(agg: SweepAggregate) -> str:
    """``kind.compute.work_rate`` if the sweep has it, else its first work rate."""
    if "kind.compute.work_rate" in agg.ratio_metrics:
        return "kind.compute.work_rate"
    if agg.ratio_metrics:
        return agg.ratio_metrics[0]
    raise SweepReportError(
        f"sweep {agg.info.name!r} has no work rate metric; choose one with --metric: "
        f"{', '.join(agg.metrics)}"
    )


def choose_metric(agg: SweepAggregate, metric: str | None) -> str:
    """``metric`` if the sweep has it (raises SweepReportError), else the default."""
    if metric is None:
        return default_metric(agg)
    if metric not in agg.metrics:
        raise SweepReportError(
            f"--metric: sweep {agg.info.name!r} has no metric {metric!r}; it has: "
            f"{', '.join(agg.metrics)}{did_you_mean(metric, agg.metrics)}"
        )
    return metric
