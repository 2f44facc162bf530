"""The statistics of every comparison: mean and 95 % confidence interval over seeds, and
seed-paired ratios (common random numbers: a seed is the same workload under every
protocol, so a protocol is divided by the baseline run of the same seed, then the ratios
are estimated). Used by ``compare``, ``report``, ``sweep-report`` and the validation
scripts; see docs/compare.md.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Estimate", "estimate", "paired_ratios", "t_quantile_975"]

# Two-sided 95 % Student t quantiles t(0.975, dof) for dof 1..30 (standard tables).
_T975 = (
    12.706204736,
    4.302652730,
    3.182446305,
    2.776445105,
    2.570581836,
    2.446911851,
    2.364624252,
    2.306004135,
    2.262157163,
    2.228138852,
    2.200985160,
    2.178812830,
    2.160368656,
    2.144786688,
    2.131449546,
    2.119905299,
    2.109815578,
    2.100922040,
    2.093024054,
    2.085963447,
    2.079613845,
    2.073873068,
    2.068657610,
    2.063898562,
    2.059538553,
    2.055529439,
    2.051830516,
    2.048407142,
    2.045229642,
    2.042272456,
)
_Z975 = statistics.NormalDist().inv_cdf(0.975)


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (>= 1).

    Exact table up to 30 dof; beyond, the normal quantile with the Cornish-Fisher correction
    for t (error below 1e-4 there, where the bare normal 1.960 would be ~4 % too small).
    """
    if dof < 1:
        raise ValueError(f"dof must be at least 1 (got {dof})")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


@dataclass(frozen=True, slots=True)
class Estimate:
    """Mean and 95 % CI half-width of ``n`` values; ``ci95`` is None below 2 values."""

    mean: float | None
    ci95: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95": self.ci95, "n": self.n}


def estimate(values: Sequence[float | None]) -> Estimate:
    """Mean ± t(0.975, n-1) · s / sqrt(n) over the values that are not None."""
    xs = [v for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return Estimate(None, None, 0)
    mean = statistics.fmean(xs)
    if n == 1:
        return Estimate(mean, None, 1)
    return Estimate(mean, t_quantile_975(n - 1) * statistics.stdev(xs) / math.sqrt(n), n)


def paired_ratios(
    values: Sequence[float | None], base: Sequence[float | None]
) -> list[float | None]:
    """Per-seed ``value / base``; None where either is missing or the base is 0."""
    return [
        None if v is None or b is None or b == 0 else v / b
        for v, b in zip(values, base, strict=True)
    ]
