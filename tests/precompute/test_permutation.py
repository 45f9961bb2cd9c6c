"""Tests for precompute.permutation: quantile bins, within-stratum shuffles (exact distributions by
enumeration), the two permutation tests against brute force, and the two-sample bootstrap."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from precompute.permutation import (
    bootstrap_difference,
    difference_permutation_test,
    frequency_bins,
    label_sum_permutation_test,
    stratified_permutations,
)


# ------------------------------------------------------------------------------ bins
def test_frequency_bins_are_equal_quantile_bins() -> None:
    values = np.random.default_rng(0).permutation(np.arange(100, dtype=float))
    bins = frequency_bins(values, 10)
    np.testing.assert_array_equal(bins, (values // 10).astype(int))


def test_frequency_bins_keep_ties_together_and_handle_edge_cases() -> None:
    values = np.array([0.0] * 50 + [1.0, 2.0, 3.0, np.nan])
    # NaN counts as 0, so 51 of 54 values are 0: every quartile edge is 0 and all share the top bin
    np.testing.assert_array_equal(frequency_bins(values, 4), np.full(54, 3))
    np.testing.assert_array_equal(frequency_bins(np.array([5.0, 1.0, 1.0, 9.0]), 2), [1, 0, 0, 1])
    np.testing.assert_array_equal(frequency_bins(np.array([3.0, 1.0]), 1), [0, 0])
    assert frequency_bins(np.array([]), 5).size == 0
    with pytest.raises(ValueError, match="n_bins"):
        frequency_bins(values, 0)


# ------------------------------------------------------------------------------ shuffles
def test_stratified_permutations_swap_only_within_a_stratum() -> None:
    rng = np.random.default_rng(1)
    strata = rng.integers(0, 6, 200)
    labels = rng.random(200) < 0.3
    perms = stratified_permutations(strata, 300, rng)
    assert perms.shape == (300, 200)
    for perm in perms:
        assert sorted(perm) == list(range(200))  # a permutation
        np.testing.assert_array_equal(strata[perm], strata)  # every position keeps its stratum
        shuffled = labels[perm]
        for s in range(6):  # so the labels per stratum are preserved
            assert shuffled[strata == s].sum() == labels[strata == s].sum()
    assert (perms != np.arange(200)).any(axis=1).all()  # they do shuffle


def test_stratified_permutations_are_uniform_within_strata() -> None:
    strata = np.array([1, 0, 1, 0, 1])  # 3! * 2! = 12 permutations keep the strata
    perms = stratified_permutations(strata, 24000, np.random.default_rng(2))
    counts = Counter(map(tuple, perms))
    assert len(counts) == 12
    freq = np.array(list(counts.values())) / 24000
    np.testing.assert_allclose(freq, 1 / 12, atol=0.006)


# ------------------------------------------------------------------------------ difference test
def exact_difference_null(values: np.ndarray, in_a: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """The difference of means under every within-stratum relabelling (all equally likely)."""
    per_stratum = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        per_stratum.append([set(c) for c in itertools.combinations(idx, int(in_a[idx].sum()))])
    out = []
    for choice in itertools.product(*per_stratum):
        a = np.zeros(values.size, bool)
        a[list(set().union(*choice))] = True
        out.append(values[a].mean() - values[~a].mean())
    return np.array(out)


def test_difference_test_matches_exact_enumeration() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=10)
    strata = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    in_a = np.array([1, 1, 0, 0, 0, 1, 1, 1, 0, 0], bool)
    res = difference_permutation_test(values, in_a, strata, 20000, seed=4)
    assert res.observed == pytest.approx(values[in_a].mean() - values[~in_a].mean(), abs=1e-12)
    exact = exact_difference_null(values, in_a, strata)
    p_exact = (exact >= res.observed - 1e-12).mean()
    assert res.p_greater == pytest.approx(p_exact, abs=0.01)
    assert res.p_less == pytest.approx((exact <= res.observed + 1e-12).mean(), abs=0.01)
    assert res.null_mean == pytest.approx(exact.mean(), abs=0.04)  # 5 standard errors (sd 1.14)
    assert res.p_two_sided == pytest.approx(min(1.0, 2 * min(res.p_greater, res.p_less)))


def test_difference_p_value_counts_the_observed_and_is_never_zero() -> None:
    values = np.arange(20, dtype=float)
    in_a = values >= 10  # the most extreme split there is
    res = difference_permutation_test(values, in_a, np.zeros(20, int), 999, seed=0)
    assert res.p_greater == pytest.approx((1 + np.count_nonzero(res.null >= res.observed)) / 1000)
    assert 0 < res.p_greater <= 0.01 and res.p_less == 1.0
    const = difference_permutation_test(np.ones(8), in_a[:8] | (np.arange(8) < 3), np.zeros(8, int), 50, 0)
    assert const.p_greater == 1.0 and const.p_less == 1.0  # ties count as at least as extreme


def test_difference_test_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="both sets"):
        difference_permutation_test(np.ones(4), np.ones(4, bool), np.zeros(4, int), 10, 0)
    with pytest.raises(ValueError, match="equal 1-D"):
        difference_permutation_test(np.ones(4), np.ones(3, bool), np.zeros(4, int), 10, 0)


# ------------------------------------------------------------------------------ label-sum test
def test_label_sum_null_matches_exact_enumeration() -> None:
    weights = np.array([0.0, 3.0, 0.0, 1.0, 5.0, 0.0, 2.0, 0.0])
    strata = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    labels = np.array([1, 0, 1, 0, 0, 1, 0, 0], bool)  # 2 of stratum 0, 1 of stratum 1
    res = label_sum_permutation_test(weights, labels, strata, 30000, seed=5)
    assert res.observed == 0.0
    exact = Counter(
        weights[list(a)].sum() + weights[b]
        for a in itertools.combinations(range(4), 2)
        for b in range(4, 8)  # 6 * 4 = 24 equally likely relabellings
    )
    got = Counter(res.null.tolist())
    assert set(got) == set(exact)
    for value, k in exact.items():
        assert got[value] / 30000 == pytest.approx(k / 24, abs=0.01), value
    assert res.p_greater == pytest.approx((1 + 30000) / 30001)  # nothing is below 0


def test_label_sum_with_no_zero_weights_and_empty_strata() -> None:
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    res = label_sum_permutation_test(weights, np.array([1, 1, 0, 0], bool), np.array([0, 0, 0, 0]), 4000, 6)
    exact = [weights[list(c)].sum() for c in itertools.combinations(range(4), 2)]
    assert res.null_mean == pytest.approx(np.mean(exact), abs=0.05)
    assert set(res.null.tolist()) == set(exact)
    none = label_sum_permutation_test(weights, np.zeros(4, bool), np.zeros(4, int), 10, 0)
    assert none.observed == 0.0 and (none.null == 0).all() and none.p_greater == 1.0


# ------------------------------------------------------------------------------ bootstrap
def test_bootstrap_difference_equals_a_brute_force_resample() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 2.0, 20)
    got = bootstrap_difference(a, b, 500, seed=8)
    r = np.random.default_rng(8)  # one chunk: a's indices, then b's
    ia, ib = r.integers(0, 30, (500, 30)), r.integers(0, 20, (500, 20))
    means = a[ia].mean(1) - b[ib].mean(1)
    medians = np.median(a[ia], 1) - np.median(b[ib], 1)
    assert got.mean == pytest.approx(a.mean() - b.mean())
    assert got.median == pytest.approx(np.median(a) - np.median(b))
    np.testing.assert_allclose(got.mean_ci, np.quantile(means, [0.025, 0.975]))
    np.testing.assert_allclose(got.median_ci, np.quantile(medians, [0.025, 0.975]))


def test_bootstrap_of_constant_samples_is_exact_and_empty_is_refused() -> None:
    got = bootstrap_difference(np.full(5, 2.0), np.full(7, 0.5), 100, seed=0)
    assert got.mean_ci == (1.5, 1.5) and got.median_ci == (1.5, 1.5)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_difference(np.array([]), np.ones(3), 10, 0)
