"""Small-sample statistics for comparing runs: t intervals, the paired t-test, exact McNemar,
Holm's correction. Pure Python (no scipy in the environment); checked against textbook values.

    mean_ci([0.88, 0.90, 0.89])          # mean, 95 % half-width (t, n - 1 df), sd, n
    paired_t([0.01, 0.02, 0.015])        # mean diff, 95 % half-width, t, two-sided p
    mcnemar_exact(b=12, c=3)             # two-sided exact binomial p on the discordant pairs
    holm([0.01, 0.04, 0.03])             # Holm-adjusted p-values, same order
    wilson_halfwidth(0.88, 600)          # 95 % Wilson half-width of an accuracy on 600 rows
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p (bisection on t_cdf; p in (0, 1))."""
    if not 0 < p < 1:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def mean_ci(xs: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """mean, the half-width of its `level` t interval (None for one value), sample sd, n."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return {"mean": None, "half": None, "sd": None, "n": 0}
    mean = statistics.fmean(xs)
    if n == 1:
        return {"mean": mean, "half": None, "sd": None, "n": 1}
    sd = statistics.stdev(xs)
    return {"mean": mean, "half": t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n),
            "sd": sd, "n": n}


def paired_t(diffs: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Paired t-test on per-pair differences (H0: mean 0): mean, CI half-width, t, two-sided p.
    Fewer than 2 pairs: no test (None). Identical non-zero differences: p = 0 (sd 0)."""
    ci = mean_ci(diffs, level)
    n = ci["n"]
    if n < 2:
        return {"mean": ci["mean"], "half": None, "t": None, "p": None, "n": n}
    sd = ci["sd"]
    if sd == 0:
        t = math.inf if ci["mean"] != 0 else 0.0
        return {"mean": ci["mean"], "half": 0.0, "t": t, "p": 0.0 if t else 1.0, "n": n}
    t = ci["mean"] / (sd / math.sqrt(n))
    return {"mean": ci["mean"], "half": ci["half"], "t": t,
            "p": min(1.0, 2 * (1 - t_cdf(abs(t), n - 1))), "n": n}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: b rows only the first system got right, c only the second;
    under H0 each discordant row is a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None entries are skipped and stay None)."""
    idx = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, out, running = len(idx), [None] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def wilson_halfwidth(acc: float, n: int, z: float = 1.96) -> float:
    """Half the width of the 95 % Wilson interval of an accuracy on n rows (0 for n = 0)."""
    if n <= 0:
        return 0.0
    den = 1 + z * z / n
    return z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / den
