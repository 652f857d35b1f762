r"""CLAIR's decision from per-client scores (:func:`lowrank_fed.robust.threshold_flags`, the gap rule).

Properties of the gap rule ``t_j = (s_(j) - s_(j+1)) / (s_(j+1) - s_(K))``, flag the top ``j*`` when
``max_j t_j > c(K, level)``: invariance to ``s -> a s + b`` (``a > 0``), permutation equivariance, no flag
for equal scores, a clear outlier flagged, at most a strict minority flagged, and the false-alarm rate
under no contamination within its stated level (Gaussian scores, and CLAIR's scores on synthetic federations).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_fed.robust import ClairWarning, clair, gap_critical, gap_flags, threshold_flags
from lowrank_fed.synthetic import make_lora_clients

# scores on a coarse grid, scaled by powers of two and shifted by integers: every operation below is exact
grid_scores = st.lists(st.integers(-40, 40).map(lambda v: v / 8), min_size=3, max_size=16)


@settings(max_examples=200, deadline=None)
@given(grid_scores, st.integers(-6, 6), st.integers(-5, 5))
def test_gap_rule_is_invariant_to_scaling_and_shifting_all_scores(scores, log2_a, b):
    s = np.array(scores)
    assert gap_flags(2.0 ** log2_a * s + b).tolist() == gap_flags(s).tolist()


@settings(max_examples=200, deadline=None)
@given(grid_scores, st.randoms(use_true_random=False))
def test_gap_rule_is_permutation_equivariant(scores, rnd):
    s = np.array(scores)
    perm = np.array(rnd.sample(range(len(s)), len(s)))
    assert gap_flags(s[perm]).tolist() == gap_flags(s)[perm].tolist()


@settings(max_examples=100, deadline=None)
@given(grid_scores)
def test_gap_rule_flags_a_strict_minority_from_the_top(scores):
    s = np.array(scores)
    f = gap_flags(s)
    assert f.sum() < len(s) / 2
    if f.any():  # everything flagged scores above everything kept
        assert s[f].min() > s[~f].max()


@pytest.mark.parametrize("n", [3, 5, 10, 40])
def test_equal_scores_flag_nobody(n):
    assert not gap_flags(np.full(n, 1.7)).any()
    assert not threshold_flags(np.full(n, 1.7), "gap").any()


def test_a_clear_outlier_is_flagged_and_two_are_flagged_together():
    rng = np.random.default_rng(3)
    benign = rng.standard_normal(9)
    assert gap_flags(np.r_[benign, 20.0]).tolist() == [False] * 9 + [True]
    two = gap_flags(np.r_[benign[:8], 19.0, 20.0])
    assert two.tolist() == [False] * 8 + [True, True]
    # a number is a plain cut: the former fixed cut z > 3
    assert threshold_flags(np.r_[benign, 20.0], 3.0).tolist() == (np.r_[benign, 20.0] > 3.0).tolist()


def test_false_alarm_rate_under_gaussian_scores_is_the_stated_level():
    # fresh draws (not the critical value's own seeded ones): P(any flag) = level up to Monte Carlo error
    rng = np.random.default_rng(12345)
    for n, level in ((10, 0.05), (10, 0.01), (20, 0.05)):
        draws = rng.standard_normal((4000, n))
        rate = np.mean([gap_flags(d, level=level).any() for d in draws])
        se = np.sqrt(level * (1 - level) / 4000)
        assert abs(rate - level) < 4 * se + 0.003, (n, level, rate)


def test_critical_value_decreases_with_more_clients_and_a_looser_level():
    assert gap_critical(5) > gap_critical(10) > gap_critical(20)
    assert gap_critical(10, 0.01) > gap_critical(10, 0.05)
    assert gap_critical(2) == float("inf") and not gap_flags(np.array([0.0, 9.0])).any()


def test_false_flag_rate_on_uncontaminated_synthetic_federations_is_within_the_level():
    # CLAIR's own scores (noisy LoRA updates, no attacker, one module): at most `level` of the rounds flag anyone,
    # allowing 3 binomial standard errors over 60 rounds
    rounds = 60
    flagged_rounds = 0
    for seed in range(rounds):
        fed = make_lora_clients(10, 32, 32, 2, noise=0.3, seed=500 + seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ClairWarning)
            scores = clair(fed.pairs, rank=2, lam="default", gamma_bar=0.3).scores
        flagged_rounds += bool(threshold_flags(scores, "gap").any())
    assert flagged_rounds / rounds <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / rounds)


@pytest.mark.parametrize("bad", ["calibrated", float("nan"), float("inf"), True])
def test_a_bad_threshold_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="threshold"):
        threshold_flags(np.zeros(4), bad)


def test_gap_rule_refuses_non_finite_scores_and_a_bad_level():
    with pytest.raises(ValueError, match="finite 1-d"):
        gap_flags(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="level"):
        gap_flags(np.zeros(5), level=1.5)
