"""Paired comparisons over seeds: the mean difference with its Student-t 95 % confidence interval.

Seeds pair the runs of two methods: the same seed gives both the same data order, initial noise draws and
evaluation noise, so the per-seed differences carry less noise than either method's scores. No SciPy here: the
t quantile comes from the t density integrated numerically (Simpson) and inverted by bisection, checked against
the printed table values in tests/test_bench.py.
"""
from __future__ import annotations

import math
import statistics


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with df degrees of freedom."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    n = 2000  # Simpson intervals on [0, x]; the density is smooth, so the error is far below the table's digits
    h = x / n
    area = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + area * h / 3


def t_quantile(p: float, df: int) -> float:
    """The x with P(T <= x) = p, for 0.5 <= p < 1."""
    if not 0.5 <= p < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1, got {p}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean of a − b, lower, upper) over paired samples; the interval is the t interval of the differences."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired interval needs two or more pairs, got {len(a)} and {len(b)} values")
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(d)
    half = t_quantile(0.5 + level / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mean, mean - half, mean + half
