"""eval/bootstrap.py against bootstrap distributions worked out by hand, and the reason pairing matters."""

import itertools
from collections import Counter

import numpy as np
import pytest

import eval.bootstrap
from eval.bootstrap import mean_interval, paired_difference, verdict

VALUES = [0.0, 1.0, 3.0, 9.0]


def test_the_hand_worked_distributions_tails_are_flat_where_the_quantiles_fall():
    """The premise of the next test, by enumeration: a resample of 4 values is one of 4^4 = 256 equally likely
    ordered draws. The lowest sums: 0 (1 draw), 1 (4: one 1), 2 (6: two 1s), so P(mean < 0.5) = 5/256 = 0.020 and
    P(mean <= 0.5) = 11/256 = 0.043: the 2.5% quantile is mean 2/4 = 0.5, with 0.005 and 0.018 to spare. The
    highest: 36 (1), 30 (4: one 3), 28 (4: one 1), so P(mean > 7) = 5/256 and P(mean >= 7) = 9/256 = 0.035: the
    97.5% quantile is 28/4 = 7."""
    sums = Counter(sum(draw) for draw in itertools.product(VALUES, repeat=4))
    assert sum(sums.values()) == 256
    below = sum(count for total, count in sums.items() if total < 2)
    above = sum(count for total, count in sums.items() if total > 28)
    assert (below, sums[2], above, sums[28]) == (5, 6, 5, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_interval_is_the_exact_bootstrap_distributions_quantiles(seed):
    """With 100,000 resamples the sampled share of means under 0.5 is 5/256 give or take 0.0004 (one standard
    error), far from the 0.025 where the quantile would move: the interval is exactly (0.5, 7) whatever the seed."""
    assert mean_interval(VALUES, resamples=100_000, seed=seed) == (3.25, 0.5, 7.0)


def test_drawing_in_blocks_keeps_the_interval(monkeypatch):
    """A test set too large to resample in one array is resampled a block at a time: 100 blocks here."""
    monkeypatch.setattr(eval.bootstrap, "_BLOCK_VALUES", 4_000)
    assert mean_interval(VALUES, resamples=100_000) == (3.25, 0.5, 7.0)


def test_the_same_seed_gives_the_same_interval_and_a_narrower_level_a_narrower_one():
    values = np.random.default_rng(5).exponential(0.05, size=74)
    assert mean_interval(values) == mean_interval(values)
    mean, low, high = mean_interval(values)
    _, inner_low, inner_high = mean_interval(values, level=0.5)
    assert mean == pytest.approx(values.mean()) and low < inner_low < mean < inner_high < high


def test_a_constant_per_row_difference_has_an_interval_of_that_constant():
    """Every resample of per-row differences that are all c has mean c (values exact in binary, so exactly)."""
    a = [0.5, 0.25, 2.0, 1.0, 0.75]
    b = [value + 0.125 for value in a]
    assert paired_difference(a, b) == (0.125, 0.125, 0.125)
    assert paired_difference(b, a) == (-0.125, -0.125, -0.125)


def test_pairing_finds_a_small_constant_gain_that_the_two_means_intervals_hide():
    """Rows that differ a lot from each other (sd 1) and a B that is 0.05 better on every row, give or take 0.01:
    the two means' intervals (each about +-0.25 wide over 60 rows) overlap, while the paired difference's interval
    stays near 0.05 +- 0.003 and leaves 0 out."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, size=60)
    b = a + 0.05 + rng.normal(0, 0.01, size=60)
    _, _, a_high = mean_interval(a)
    _, b_low, _ = mean_interval(b)
    assert b_low < a_high  # unpaired: the intervals overlap, no difference can be claimed
    difference, low, high = paired_difference(a, b)
    assert 0.04 < low < difference < high < 0.06
    assert verdict(low, high, "higher") == "B better"


@pytest.mark.parametrize("low,high,better,expected", [
    (0.1, 0.3, "higher", "B better"), (0.1, 0.3, "lower", "A better"),
    (-0.3, -0.1, "higher", "A better"), (-0.3, -0.1, "lower", "B better"),
    (-0.1, 0.1, "higher", "no clear difference"), (-0.1, 0.1, "lower", "no clear difference"),
    (0.0, 0.2, "higher", "no clear difference"),  # an interval that reaches 0 does not leave it out
    (-0.2, 0.0, "lower", "no clear difference"),
])
def test_verdict_reads_the_interval_in_the_metrics_direction(low, high, better, expected):
    assert verdict(low, high, better) == expected


def test_bad_arguments_are_bugs_that_raise():
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="one value of each side per row"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one resample"):
        mean_interval([1.0], resamples=0)
    with pytest.raises(ValueError, match="'higher' or 'lower'"):
        verdict(0.1, 0.2, "better")
