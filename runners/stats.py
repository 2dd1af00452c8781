"""Statistics of success rates, from scipy rather than hand-written formulas.

Wilson's score interval (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it for the small n and
extreme p of robot evaluations) is `scipy.stats.binomtest(...).proportion_ci(method="wilson")`.
"""

from __future__ import annotations

from scipy import stats as _stats


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if n == 0:
        return 0.0, 1.0
    ci = _stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)
