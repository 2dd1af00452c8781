"""Statistics of success rates, from scipy rather than hand-written formulas where scipy has them.

Wilson's score interval (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it for the small n and
extreme p of robot evaluations) is `scipy.stats.binomtest(...).proportion_ci(method="wilson")`.

Paired comparisons (two configurations run on the same episodes):

* the exact McNemar test: conditional on the b + c discordant pairs, the A-only successes are
  Binomial(b + c, 1/2) under "no difference"; two-sided p = `scipy.stats.binomtest(b, b + c, 0.5)`
  (McNemar 1947; Agresti, Categorical Data Analysis, 3rd ed., section 11.1).
* the 95% interval for the paired difference of success rates: Newcombe's method 10 (Newcombe 1998,
  "Improved confidence intervals for the difference between binomial proportions based on paired
  data", Stat Med 17:2635-2650): the two marginal Wilson intervals combined with a correction for
  their correlation (phi). It keeps within [-1, 1], is not degenerate when there are no discordant
  pairs, and had close to nominal coverage in Newcombe's evaluation.
  Written out here because neither scipy nor a released statsmodels (0.15.0) has it: statsmodels'
  `confint_proportions_paired` exists only in its development branch, and statsmodels would bring
  pandas, patsy and formulaic (its 0.15.0 wheel alone is 12 MB) for one formula. It is tested against Newcombe's
  published worked examples (tests/test_compare.py).
"""

from __future__ import annotations

import math

from scipy import stats as _stats

PAIRED_CI_METHOD = "Newcombe 1998 method 10 (Wilson score intervals with a phi correction)"
PAIRED_TEST = "exact McNemar (two-sided binomial test on the discordant pairs)"


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if n == 0:
        return 0.0, 1.0
    ci = _stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (b: only A succeeded, c: only B);
    1.0 when there are no discordant pairs (nothing speaks for a difference)."""
    if b + c == 0:
        return 1.0
    return float(_stats.binomtest(int(b), int(b) + int(c), 0.5).pvalue)


def paired_difference_ci(n11: int, n12: int, n21: int, n22: int,
                         confidence: float = 0.95) -> tuple[float, float, float] | None:
    """Difference p1 - p2 of two paired proportions and its interval by Newcombe's method 10.

    The 2x2 table counts pairs: rows the first classification, columns the second, success first:
    n11 both succeeded, n12 only the first, n21 only the second, n22 neither; p1 = (n11 + n12) / n,
    p2 = (n11 + n21) / n. None when there are no pairs. (Newcombe's e, f, g, h are n11, n12, n21, n22.)
    """
    n = n11 + n12 + n21 + n22
    if n == 0:
        return None
    p1, p2 = (n11 + n12) / n, (n11 + n21) / n
    l1, u1 = wilson_interval(n11 + n12, n, confidence)
    l2, u2 = wilson_interval(n11 + n21, n, confidence)
    # phi, the correlation of the two classifications, with Newcombe's adjustment: a positive
    # numerator is reduced by n/2 (floored at 0), a negative one is kept; 0 when a margin is empty.
    margins = (n11 + n12) * (n21 + n22) * (n11 + n21) * (n12 + n22)
    numerator = n11 * n22 - n12 * n21
    if numerator > n / 2:
        numerator -= n / 2
    elif numerator >= 0:
        numerator = 0
    phi = numerator / math.sqrt(margins) if margins > 0 else 0.0
    d = p1 - p2
    lower = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = d + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return d, max(lower, -1.0), min(upper, 1.0)
