"""How strong a check's verdict is: the one-sided 95% Clopper-Pearson upper bound of a rate.

"0 mismatches in 10,000 keys" means the true mismatch rate is below 0.03% with 95%
confidence. The exact binomial bound needs the inverse regularized incomplete beta function;
it is computed here (Lentz's continued fraction + bisection) to avoid a SciPy dependency.
"""

from __future__ import annotations

import math


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """Smallest p with P(X <= k | n, p) <= 1 - confidence: the exact upper bound of k/n."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    alpha = 1.0 - confidence
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)  # closed form of the same bound
    # P(X <= k) = 1 - I_p(k + 1, n - k), decreasing in p: bisect for I_p(k + 1, n - k) = 1 - alpha.
    lo, hi = k / n, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if betainc(k + 1, n - k, mid) < 1.0 - alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return hi


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def format_rate(p: float) -> str:
    """0.000299 → '0.03%'; small rates keep two significant digits."""
    pct = p * 100
    if pct == 0:
        return "0%"
    if pct >= 1:
        return f"{pct:.1f}%"
    digits = max(2, 1 - int(math.floor(math.log10(pct))))
    return f"{pct:.{digits}f}".rstrip("0").rstrip(".") + "%"
