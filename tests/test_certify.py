"""Learn then Test (selfjudge_vllm/certify.py): the guarantees hold, by exact coverage where
the outcomes can be enumerated and by simulation for the whole procedure."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from selfjudge_vllm import certify

DELTA = 0.05


def _enumerated_difference_cdf(d, n, lost, gained):
    total = 0.0
    for x in range(n + 1):
        for y in range(n + 1 - x):
            if x - y <= d:
                total += (math.factorial(n) / (math.factorial(x) * math.factorial(y) * math.factorial(n - x - y))
                          * lost ** x * gained ** y * (1 - lost - gained) ** (n - x - y))
    return total


def test_the_difference_distribution_equals_enumeration():
    for n, lost, gained in ((7, 0.1, 0.05), (12, 0.3, 0.2), (25, 0.02, 0.0), (9, 0.0, 0.4)):
        for d in range(-n, n + 1, 3):
            assert certify._difference_cdf(d, n, lost, gained) == pytest.approx(
                _enumerated_difference_cdf(d, n, lost, gained), abs=1e-12)


@pytest.mark.parametrize("n", [40, 200, 400])
@pytest.mark.parametrize("budget", [0.01, 0.02, 0.05])
def test_binomial_certification_has_exact_coverage(n, budget):
    """With the true change rate exactly at the budget (the worst case of H0) or above it, the
    probability of certifying is at most delta: computed exactly over every count."""
    certifying = [x for x in range(n + 1) if certify.binomial_p_value(x, n, budget) <= DELTA]
    for rate in (budget, budget * 1.2, min(0.99, budget * 3)):
        size = sum(stats.binom.pmf(x, n, rate) for x in certifying)
        assert size <= DELTA + 1e-12, (n, budget, rate, size)


def test_binomial_certification_has_power_well_inside_the_budget():
    n, budget = 400, 0.05
    certifying = [x for x in range(n + 1) if certify.binomial_p_value(x, n, budget) <= DELTA]
    power = sum(stats.binom.pmf(x, n, budget / 3) for x in certifying)
    assert power > 0.95, power


def _trinomial_pmf(n, lost, gained):
    """[x, y] = P(x items lost, y gained) of n."""
    x = np.arange(n + 1)[:, None]
    y = np.arange(n + 1)[None, :]
    rest = n - x - y
    ok = rest >= 0
    log = (math.lgamma(n + 1) - np.vectorize(math.lgamma)(x + 1) - np.vectorize(math.lgamma)(y + 1)
           - np.vectorize(math.lgamma)(np.where(ok, rest, 0) + 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        log = log + x * np.log(lost) + y * np.log(gained) + np.where(ok, rest, 0) * np.log1p(-lost - gained)
    return np.where(ok, np.nan_to_num(np.exp(log)), 0.0)


@pytest.mark.parametrize("n, budget, level", [
    (40, 0.05, DELTA), (60, 0.02, DELTA),
    # at or below the 0.001 a fixed gamma spent (confidence 0.999 with one rule, 0.9995): gamma
    # is a tenth of the level there, so the test certifies and keeps its size
    (40, 0.25, 0.001), (60, 0.2, 0.0005)])
def test_accuracy_certification_has_exact_coverage(n, budget, level):
    """Every outcome (items lost, items gained) of n paired items is enumerated: at parameters
    on H0's boundary (P(lost) = P(gained) + budget, P(gained) on a fine grid) and inside H0,
    the probability of the outcomes that certify at `level` is at most `level`."""
    certifies = np.zeros((n + 1, n + 1), dtype=bool)
    for x in range(n + 1):
        for y in range(n + 1 - x):
            # Outcomes with far more lost than gained cannot certify: skip their p-values.
            if x - y <= budget * n and certify.p_value("accuracy", n, budget, lost=x, gained=y, level=level) <= level:
                certifies[x, y] = True
    assert certifies.any()
    worst = 0.0
    top = (1 - budget) / 2
    for gained in np.linspace(1e-4, top, 120):
        for extra in (0.0, 0.01, 0.05):  # the boundary, then inside H0
            lost = gained + budget + extra
            if lost + gained < 1:
                worst = max(worst, float(_trinomial_pmf(n, lost, gained)[certifies].sum()))
    assert worst <= level, worst


def test_gamma_is_fixed_in_advance_below_the_level():
    """Berger and Boos's 0.001 at the usual levels (the figures in the docs), a tenth of the
    level below 1%: always below the level, so the accuracy test can certify at any confidence."""
    assert certify.berger_boos_gamma(DELTA) == certify.berger_boos_gamma(0.0125) == 1e-3
    for level in (0.001, 0.0005, 1e-5):
        assert certify.berger_boos_gamma(level) == pytest.approx(level / 10)
        assert certify.p_value("accuracy", 5000, 0.05, level=level) <= level  # nothing lost or gained


def test_accuracy_certification_has_power_when_accuracy_holds():
    """400 items, 4% lost and 4% gained (accuracy unchanged): a 5% budget is certified in
    most calibrations (simulated), and never when accuracy drops by 10%."""
    rng = np.random.default_rng(1)
    n, budget = 400, 0.05

    def certified_share(lost, gained, runs=150):
        outcomes = rng.multinomial(n, [lost, gained, 1 - lost - gained], size=runs)
        return float(np.mean([certify.p_value("accuracy", n, budget, lost=int(x), gained=int(y), level=DELTA) <= DELTA
                              for x, y, _ in outcomes]))

    assert certified_share(0.04, 0.04) > 0.8
    assert certified_share(0.12, 0.02) == 0.0


def test_fixed_sequence_stops_at_the_first_failure_and_splits_delta_over_families():
    C = certify.Candidate
    got = certify.certify([C("judge", "0.9", 0.001), C("judge", "0.7", 0.2), C("judge", "0.5", 0.0001),
                           C("top_alpha", "0.9", 0.02), C("top_alpha", "0.5", 0.03)], DELTA)
    # judge: 0.7 fails, so 0.5 is never tested; top_alpha: 0.03 > 0.05 / 2 stops the second.
    assert [c.point for c in got] == ["0.9", "0.9"] and [c.family for c in got] == ["judge", "top_alpha"]
    with pytest.raises(ValueError, match="delta"):
        certify.certify([], 0.0)
    with pytest.raises(ValueError, match="budget"):
        certify.binomial_p_value(0, 10, 1.0)
    with pytest.raises(ValueError, match="no paired items"):
        certify.accuracy_p_value(0, 0, 0, 0.05, 1e-3)
    with pytest.raises(ValueError, match="unknown measure"):
        certify.p_value("speed", 10, 0.05, level=DELTA)


def test_the_whole_procedure_is_family_wise_valid_by_simulation():
    """Three families of four points each, every point's true change rate exactly at the
    budget: over 4000 simulated calibrations the share that certifies anything stays within
    delta plus Monte Carlo error (300 items each); with every rate at a third of the budget
    and enough items (1000), almost every calibration certifies every point."""
    rng = np.random.default_rng(0)
    budget, runs = 0.05, 4000

    def certified_count(rate, n):
        counts = rng.binomial(n, rate, size=(runs, 3, 4))
        out = []
        for run in counts:
            candidates = [certify.Candidate(f"f{f}", f"p{i}", certify.binomial_p_value(int(run[f, i]), n, budget))
                          for f in range(3) for i in range(4)]
            out.append(len(certify.certify(candidates, DELTA)))
        return np.array(out)

    at_budget = certified_count(budget, 300)
    fwer = float((at_budget > 0).mean())
    assert fwer <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / runs), fwer
    inside = certified_count(budget / 3, 1000)
    assert float((inside == 12).mean()) > 0.9
