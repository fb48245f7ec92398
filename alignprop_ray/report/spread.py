"""The spread of a figure over seeds, and of a curve over seeds: what a comparison shows beside each mean.

    spread([0.31, 0.35, 0.29])          -> Spread(n=3, mean=0.3167, low=0.29, high=0.35, kind="min-max")
    band([(xs, ys), (xs, ys), ...])     -> one row per x: n, mean, low, high (the curves' spread at x)

With fewer than 5 values the spread is their range (min-max): with so few, an interval estimate would mostly
show its own assumptions. With 5 or more it is the 95% confidence interval of the mean, Student's t:
mean +- t(0.975, n-1) x s / sqrt(n), s the sample standard deviation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

MIN_FOR_INTERVAL = 5  # below this many values, the range
RANGE, INTERVAL = "min-max", "95% CI"
# t(0.975, df) for df = 1..30 (scipy.stats.t.ppf); above 30, the Cornish-Fisher expansion in `t_975`.
_T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z_975 = 1.959963984540054


def t_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (within 1e-4 of scipy's)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1 (got {df})")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975  # the expansion of t's quantile in 1/df around the normal's
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


@dataclass(frozen=True)
class Spread:
    """A figure over n seeds: its mean, and the range (`kind` min-max) or 95% interval of the mean."""

    n: int
    mean: float
    low: float
    high: float
    kind: str

    def format(self, spec: str = ".3f") -> str:
        """`0.317 [0.290, 0.350]`; a single value alone; `-` for none."""
        if self.n == 0:
            return "-"
        if self.n == 1:
            return format(self.mean, spec)
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def spread(values: Sequence[float | None]) -> Spread:
    """The spread of the finite values among `values` (None and NaN are not values)."""
    found = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(found)
    if n == 0:
        return Spread(0, math.nan, math.nan, math.nan, RANGE)
    mean = statistics.fmean(found)
    if n < MIN_FOR_INTERVAL:
        return Spread(n, mean, min(found), max(found), RANGE)
    half = t_975(n - 1) * statistics.stdev(found) / math.sqrt(n)
    return Spread(n, mean, mean - half, mean + half, INTERVAL)


def band(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> pd.DataFrame:
    """The spread of several curves y(x) at each x where every curve has a value: columns x, n, mean, low,
    high, kind.

    Each curve is its points (x increasing); between its points it is linear. The x values are every
    curve's own points up to the smallest last x of any curve, so where the curves stop at different x
    (runs with a time budget end a little apart) the band ends with the first of them to stop.
    """
    curves = [(np.asarray(xs, float), np.asarray(ys, float)) for xs, ys in curves if len(xs)]
    columns = ["x", "n", "mean", "low", "high", "kind"]
    if not curves:
        return pd.DataFrame(columns=columns)
    start = max(xs[0] for xs, _ in curves)
    end = min(xs[-1] for xs, _ in curves)
    grid = np.unique(np.concatenate([xs[(xs >= start) & (xs <= end)] for xs, _ in curves]))
    rows = []
    for x in grid:
        s = spread([float(np.interp(x, xs, ys)) for xs, ys in curves])
        rows.append((float(x), s.n, s.mean, s.low, s.high, s.kind))
    return pd.DataFrame(rows, columns=columns)
