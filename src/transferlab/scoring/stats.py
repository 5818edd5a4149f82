"""The statistics that say how far a figure can be trusted: intervals of proportions, paired differences.

Pure functions of numbers (no storage, no torch), used by the report:
  * `wilson_interval(k, n)`: the Wilson score 95% interval of a proportion, k correct of n;
  * `decimals_for(half_width)` and `percent_with_interval(k, n)`: a percentage printed at the precision its interval
    justifies, "67.4% (95% CI 65.3-69.4)";
  * `paired_difference(a, b)` and `difference_verdict(...)`: the mean difference of two configurations measured on
    the same replicates (seeds, folds) with its 95% t interval, and the words the report uses for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _scipy

CONFIDENCE = 0.95
MAX_DECIMALS = 2
MIN_REPLICATES = 3  # a t interval from 2 values rests on one degree of freedom: too few to state an interval


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval (low, high) of the proportion k / n, as fractions.

    Unlike the normal approximation p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0 or k = n.
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"wilson_interval({k!r}, {n!r}): expected whole counts")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval({k!r}, {n!r}): expected 0 <= k <= n and n >= 1")
    z = float(_scipy.norm.ppf(0.5 + confidence / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at k = 0 (k = n) the bound is exactly 0 (1); rounding would leave it a hair beside
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def decimals_for(half_width: float) -> int:
    """Decimals to print a figure in points (percent, or percentage points) whose 95% interval has this half-width.

    The rule: the last digit shown is the largest power of ten no greater than a third of the half-width, between
    whole points and hundredths. Rounding then moves a figure by at most a sixth of its uncertainty, and no digit is
    printed that the interval already makes noise: a half-width of 3 points or more gives whole points, 0.3 to 3
    points one decimal (2,000 test images at 67%: half-width 2.1, "67.4%"), below 0.3 two decimals, never more.
    """
    if not math.isfinite(half_width) or half_width < 0:
        raise ValueError(f"decimals_for({half_width!r}): expected a half-width >= 0")
    for decimals in range(MAX_DECIMALS + 1):
        if 10.0**-decimals <= half_width / 3 * (1 + 1e-9):  # 0.3 / 3 is 0.0999...: the boundary counts as reached
            return decimals
    return MAX_DECIMALS


def interval_decimals(k: int, n: int) -> int:
    """Decimals a percentage k / n may show: `decimals_for` the larger half of its Wilson interval, and as many more
    as it takes for a figure that is not exactly 0 or 100 not to read as one (99,999 of 100,000 is not "100.00%")."""
    low, high = wilson_interval(k, n)
    p = k / n
    d = decimals_for(100 * max(p - low, high - p))
    while d < 6 and 0 < k < n and round(100 * p, d) in (0, 100):
        d += 1
    return d


def percent(k: int, n: int) -> str:
    """k of n as a percentage at the precision its Wilson interval justifies, without the interval: "67.4%"."""
    return f"{100 * k / n:.{interval_decimals(k, n)}f}%"


def percent_with_interval(k: int, n: int) -> str:
    """k correct of n as a percentage with its Wilson 95% interval, at the precision the interval justifies
    (`interval_decimals`): "67.4% (95% CI 65.3-69.4)", "90% (95% CI 60-98)"."""
    low, high = wilson_interval(k, n)
    d = interval_decimals(k, n)
    return f"{100 * k / n:.{d}f}% (95% CI {100 * low:.{d}f}-{100 * high:.{d}f})"


@dataclass(frozen=True)
class Difference:
    """The paired difference a - b: its mean, the half-width of its t interval (None below MIN_REPLICATES) and n."""

    mean: float
    half_width: float | None
    n: int

    @property
    def measurable(self) -> bool:
        """Whether the interval excludes 0 (with too few replicates there is no interval: not measurable)."""
        return self.half_width is not None and abs(self.mean) > self.half_width

    @property
    def interval(self) -> tuple[float, float] | None:
        return None if self.half_width is None else (self.mean - self.half_width, self.mean + self.half_width)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """Mean of a[i] - b[i] over replicates measured alike (the same seed, the same fold), with the half-width of its
    t interval: t(confidence, n - 1) x the differences' sample std / sqrt(n), from MIN_REPLICATES replicates on (two
    differences that happen to agree would claim a zero-width interval). Units are those of the inputs."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} values; a pair needs one of each per replicate")
    if not a:
        raise ValueError("paired_difference: no replicates")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    if n < MIN_REPLICATES:
        return Difference(mean, None, n)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    return Difference(mean, float(_scipy.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n), n)


def format_difference(d: Difference) -> str:
    """ "+6.1 ± 0.8" (points) at the precision the half-width justifies; "+6.1" alone below MIN_REPLICATES."""
    if d.half_width is None:
        return f"{round(d.mean, MAX_DECIMALS - 1) + 0.0:+.{MAX_DECIMALS - 1}f}"
    places = decimals_for(d.half_width)
    return f"{round(d.mean, places) + 0.0:+.{places}f} ± {d.half_width:.{places}f}"  # + 0.0: no "-0"


def difference_verdict(a: str, b: str, d: Difference) -> str:
    """What the difference a - b (in points) lets the report say: "partial beats frozen by 6.1 ± 0.8 points",
    "no measurable difference" when the interval contains 0, or that too few replicates cannot measure it."""
    if d.half_width is None:
        which = "one replicate" if d.n == 1 else f"{d.n} replicates"
        return f"cannot be measured from {which} (a 95% interval needs {MIN_REPLICATES} or more: repeat or folds)"
    if not d.measurable:
        return "no measurable difference"
    winner, loser = (a, b) if d.mean > 0 else (b, a)
    places = decimals_for(d.half_width)
    return f"{winner} beats {loser} by {abs(d.mean):.{places}f} ± {d.half_width:.{places}f} points"
