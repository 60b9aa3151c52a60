"""Certifying relaxed verification points: Learn then Test (Angelopoulos, Bates, Candes,
Jordan, Lei, arXiv 2110.01052). Plain numpy/scipy (imported when a p-value is asked for,
so the `selfjudge` command starts without it), no vLLM.

A point (a rule and its knob) is compared with the lossless run of the same server on the
same items. Its risk is the share of items whose answer (or text) changes, or the accuracy it
loses; it is certified for budget B at confidence 1 - delta when the p-value of
H0: "risk > B" is at most its share of delta. Each p-value here is valid at finite n:

  binomial_p_value      risks that are shares of items (answer changes, text changes): the
                        count is Binomial(n, r); P(X <= x | n, B) is a valid p-value for
                        r > B because X only grows stochastically with r.
  accuracy_p_value      accuracy lost (per item +1 lost, -1 gained, 0 otherwise; the risk is
                        the mean, P(lost) - P(gained)): an exact unconditional test with Berger
                        and Boos's confidence-set restriction of the nuisance. D = lost - gained
                        grows stochastically with P(lost) at fixed P(gained), so under H0
                        P(D <= d) is largest on the boundary P(lost) = P(gained) + B; the
                        p-value is its maximum over P(gained) among the parameters whose
                        discordant share P(lost) + P(gained) lies in a 1 - gamma Clopper-Pearson
                        upper bound, plus gamma (Berger & Boos 1994: valid at any n for a gamma
                        fixed before the data). Without the restriction the maximum sits where
                        half the items flip each way, and the test has no power. The maximum is
                        found on a grid refined by a bounded search (tests check exact coverage
                        by enumeration). gamma is berger_boos_gamma(level) of the level the
                        p-value is compared with: a fixed gamma at or above the level would
                        make every p-value exceed it.

certify() then tests each rule family's points in order from strictest to loosest
(fixed-sequence testing: no correction inside the sequence, stop at the first point not
certified) and splits delta equally over the families (Bonferroni), so the whole certified
set is family-wise valid: with probability >= 1 - delta every certified point has risk <= B.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Shares of prompts (the exact binomial test): answers, texts or meanings (meaning.py) changed.
SHARE_MEASURES = ("answer_changes", "text_changes", "meaning_changes")
# Net losses, lost - gained over prompts (the accuracy test): against references, or by an
# LLM judge's preference (meaning.py).
NET_LOSS_MEASURES = ("accuracy", "judged_loss")
MEASURES = SHARE_MEASURES + NET_LOSS_MEASURES


def berger_boos_gamma(level: float) -> float:
    """Berger and Boos's gamma for a test at `level`, fixed before any data: their 0.001
    (chosen at 5%), and a tenth of the level below 1%, so it never spends the whole level
    (at or above the level the accuracy test could never certify)."""
    return min(1e-3, level / 10.0)


@lru_cache(maxsize=65536)  # pure; calibrate asks the same few again after every segment
def binomial_p_value(count: int, n: int, budget: float) -> float:
    """p-value of H0 "risk > budget" after `count` of `n` items changed."""
    from scipy import stats

    _check(n, budget)
    return float(stats.binom.cdf(count, n, budget))


def _difference_cdf(d: int, n: int, lost: float, gained: float) -> float:
    """P(#lost - #gained <= d) over n items, each lost with probability `lost` and gained
    with probability `gained` (the pmf of the sum of n iid {-1, 0, 1} steps, by FFT)."""
    m = 2 * n + 1
    z = np.exp(2j * np.pi * np.arange(m) / m)
    generating = (gained / z + (1.0 - lost - gained) + lost * z) ** n
    pmf = np.real(np.fft.fft(generating)) / m  # pmf[j] = P(D = j mod m)
    values = np.arange(-n, n + 1)
    return float(np.clip(pmf[values % m][values <= d].sum(), 0.0, 1.0))


@lru_cache(maxsize=65536)  # pure, and ~200 FFTs each
def accuracy_p_value(lost: int, gained: int, n: int, budget: float, gamma: float, grid: int = 200) -> float:
    """p-value of H0 "accuracy lost > budget" (P(lost) - P(gained) > budget) after `lost`
    items went from right to wrong and `gained` from wrong to right, of n paired items;
    `gamma` is Berger and Boos's, berger_boos_gamma() of the level it is compared with."""
    from scipy import optimize, stats

    _check(n, budget)
    d, discordant = lost - gained, lost + gained
    # A 1 - gamma upper confidence bound of the discordant share.
    discordant_hi = 1.0 if discordant >= n else float(stats.beta.ppf(1.0 - gamma, discordant + 1, n - discordant))
    top = (min(discordant_hi, 1.0) - budget) / 2.0  # the largest P(gained) on the boundary inside it
    if top < 0:
        return gamma  # no parameter of H0 is consistent with so few discordant items

    def tail(g: float) -> float:
        g = min(max(g, 0.0), top)
        return _difference_cdf(d, n, g + budget, g)

    points = np.linspace(0.0, top, grid)
    values = [tail(g) for g in points]
    best = int(np.argmax(values))
    lo, hi = points[max(best - 1, 0)], points[min(best + 1, grid - 1)]
    refined = optimize.minimize_scalar(lambda g: -tail(g), bounds=(lo, hi), method="bounded",
                                       options={"xatol": 1e-9})
    return float(min(1.0, max(values[best], -refined.fun) + gamma))


def p_value(measure: str, n: int, budget: float, changes: int = 0, lost: int = 0, gained: int = 0, *,
            level: float) -> float:
    """The p-value of H0 "risk > budget" for a measure (MEASURES), to be compared with `level`
    (the net-loss p-value's gamma depends on it)."""
    if measure in SHARE_MEASURES:
        return binomial_p_value(changes, n, budget)
    if measure in NET_LOSS_MEASURES:
        return accuracy_p_value(lost, gained, n, budget, berger_boos_gamma(level))
    raise ValueError(f"unknown measure {measure!r}; known: {', '.join(MEASURES)}")


def risk_upper_bound(measure: str, n: int, level: float, changes: int = 0, lost: int = 0, gained: int = 0) -> float:
    """The smallest budget this evidence certifies at `level`: a 1 - level upper confidence
    bound of the risk (Clopper-Pearson for shares; for net losses, by bisection, since the
    p-value only falls as the budget grows). 0.0 when even a budget near 0 certifies."""
    from scipy import stats

    if measure in SHARE_MEASURES:
        return 1.0 if changes >= n else float(stats.beta.ppf(1.0 - level, changes + 1, n - changes))
    lo, hi = 1e-6, 1.0 - 1e-6

    def ok(budget):
        return p_value(measure, n, budget, changes, lost, gained, level=level) <= level

    if ok(lo):
        return 0.0
    if not ok(hi):
        return 1.0
    while hi - lo > 1e-5:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class Candidate:
    family: str  # e.g. "judge", "top_alpha": one fixed sequence each
    point: str  # what it is, e.g. "judge 0.79"
    p_value: float


def certify(candidates: list[Candidate], delta: float) -> list[Candidate]:
    """The certified candidates: per family, in the order given (strictest first), those
    before the first whose p-value exceeds delta / (number of families)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    families: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        families.setdefault(candidate.family, []).append(candidate)
    level = delta / max(1, len(families))
    certified = []
    for sequence in families.values():
        for candidate in sequence:
            if candidate.p_value > level:
                break
            certified.append(candidate)
    return certified


def _check(n: int, budget: float) -> None:
    if n <= 0:
        raise ValueError(f"no paired items to test (n={n})")
    if not 0.0 < budget < 1.0:
        raise ValueError(f"the budget must lie in (0, 1), got {budget}")
