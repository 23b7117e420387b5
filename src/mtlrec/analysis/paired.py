"""Paired comparison of two models over seeds: the same seed gives both the same split,
encoding and batch order, so the per-seed differences d_s = M_s(a) - M_s(b) remove what the
seed does to both, and what is left is the models' difference.

For n seeds with mean difference d̄ and standard deviation s_d:
    95% interval   d̄ ± t_{0.975, n-1} s_d / sqrt(n)        (paired t; assumes roughly normal d_s)
    p (two-sided)  the exact sign-flip test: the share of the 2^n sign patterns of the d_s
                   whose mean is at least |d̄| in size (no normality assumed; with n seeds the
                   smallest p it can give is 2 / 2^n, e.g. 0.0625 for 5 seeds)
    won            the seeds on which a did better than b.

Example:
    >>> round(t_quantile(0.975, 4), 4)   # Student's t, 4 degrees of freedom
    2.7764
    >>> c = paired([0.91, 0.92, 0.93], [0.90, 0.90, 0.92], higher_is_better=True)
    >>> round(c.mean, 4), c.won, c.seeds, c.p
    (0.0133, 3, 3, 0.25)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np


def _t_density(x: float, df: int) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (Simpson's rule on the density;
    error below 1e-9 for |x| <= 100)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    n = 2000  # even
    h = x / n
    total = _t_density(0.0, df) + _t_density(x, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, n))
    return 0.5 + total * h / 3


def t_quantile(q: float, df: int) -> float:
    """The x with t_cdf(x, df) = q, for 0.5 <= q < 1 (bisection)."""
    if not 0.5 <= q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= q < 1 and df >= 1 (got q={q}, df={df})")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
    return (low + high) / 2


def sign_flip_p(differences: np.ndarray) -> float:
    """Two-sided p of the exact sign-flip (paired randomisation) test of mean difference 0."""
    d = np.asarray(differences, dtype=float)
    if len(d) > 16:
        raise ValueError("the exact sign-flip test enumerates 2^n patterns: at most 16 seeds")
    observed = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).mean())


@dataclass(frozen=True)
class PairedDifference:
    """Model a against model b on one metric, as 'a better by' (positive: a did better)."""

    mean: float
    low: float  # 95% interval (paired t); nan with one seed
    high: float
    p: float  # exact sign-flip test, two-sided
    won: int  # seeds on which a did better
    seeds: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired(a: list[float], b: list[float], higher_is_better: bool) -> PairedDifference:
    """The paired difference of a over b, seed by seed (a[i] and b[i] from the same seed)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs the same seeds for both models (got {len(a)} and {len(b)})")
    d = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) * (1.0 if higher_is_better else -1.0)
    n, mean = len(d), float(d.mean())
    if n > 1:
        half = t_quantile(0.975, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
        low, high = mean - half, mean + half
    else:
        low = high = math.nan
    return PairedDifference(mean, low, high, sign_flip_p(d), int((d > 0).sum()), n)
