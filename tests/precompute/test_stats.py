"""Tests for precompute.stats: exact degenerate cases, seeded sanity checks and loop references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from precompute.stats import (
    bootstrap_ci,
    bootstrap_diff_ci,
    bootstrap_indices,
    feature_change,
    spearman,
    spearman_ci,
)


def test_bootstrap_ci_of_constant_is_a_point() -> None:
    est, lo, hi = bootstrap_ci(np.full(37, 2.5), n_boot=300)
    assert (est, lo, hi) == (2.5, 2.5, 2.5)
    est, lo, hi = bootstrap_ci(np.full(37, 2.5), n_boot=300, clusters=np.arange(37) % 5)
    assert (est, lo, hi) == (2.5, 2.5, 2.5)


def test_bootstrap_ci_contains_mean_of_normal_sample() -> None:
    x = np.random.default_rng(1).normal(3.0, 1.0, size=400)
    est, lo, hi = bootstrap_ci(x, n_boot=1000, seed=0)
    assert est == pytest.approx(x.mean())
    assert lo < est < hi
    assert lo < 3.0 < hi
    # Width close to the normal-theory interval 2 * 1.96 * sd / sqrt(n).
    assert hi - lo == pytest.approx(2 * 1.96 * x.std(ddof=1) / 20, rel=0.2)


def test_bootstrap_ci_is_deterministic_for_a_seed() -> None:
    x = np.random.default_rng(2).normal(size=50)
    assert bootstrap_ci(x, seed=7, n_boot=200) == bootstrap_ci(x, seed=7, n_boot=200)


def test_singleton_clusters_match_plain_bootstrap() -> None:
    x = np.random.default_rng(3).normal(size=60)
    plain = bootstrap_ci(x, n_boot=500, seed=4)
    clustered = bootstrap_ci(x, n_boot=500, seed=4, clusters=np.arange(60))
    np.testing.assert_allclose(clustered, plain, rtol=0, atol=1e-12)


def test_cluster_bootstrap_general_stat_matches_mean_path() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=45)
    clusters = rng.integers(0, 9, size=45)
    fast = bootstrap_ci(x, n_boot=200, seed=1, clusters=clusters)
    slow = bootstrap_ci(x, stat=lambda v: float(np.mean(v)), n_boot=200, seed=1, clusters=clusters)
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_cluster_bootstrap_is_wider_for_correlated_clusters() -> None:
    rng = np.random.default_rng(6)
    cluster_effect = rng.normal(0, 3.0, size=20)
    clusters = np.repeat(np.arange(20), 25)
    x = cluster_effect[clusters] + rng.normal(0, 0.1, size=clusters.size)
    _, lo_p, hi_p = bootstrap_ci(x, n_boot=500)
    _, lo_c, hi_c = bootstrap_ci(x, n_boot=500, clusters=clusters)
    assert hi_c - lo_c > 3 * (hi_p - lo_p)


def test_paired_diff_of_identical_arrays_is_exactly_zero() -> None:
    a = np.random.default_rng(7).normal(size=80)
    assert bootstrap_diff_ci(a, a.copy(), n_boot=300, paired=True) == (0.0, 0.0, 0.0)


def test_unpaired_diff_estimate_and_coverage() -> None:
    rng = np.random.default_rng(8)
    a, b = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 200)
    est, lo, hi = bootstrap_diff_ci(a, b, n_boot=800, paired=False)
    assert est == pytest.approx(a.mean() - b.mean())
    assert lo < est < hi and lo < 1.0 < hi


def _feature_change_reference(before, after, n_boot, seed, alpha=0.05):
    rng = np.random.default_rng(seed)
    idx = bootstrap_indices(before.shape[0], n_boot, rng)
    d = after - before
    los, his = [], []
    for j in range(before.shape[1]):
        boot = d[idx, j].mean(axis=1)
        lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        los.append(lo)
        his.append(hi)
    return np.array(los), np.array(his)


def test_feature_change_matches_per_feature_loop() -> None:
    rng = np.random.default_rng(9)
    before = np.maximum(rng.normal(size=(70, 13)), 0)
    after = np.maximum(before + rng.normal(0.2, 0.5, size=before.shape), 0)
    df = feature_change(before, after, paired=True, n_boot=250, seed=3)
    lo, hi = _feature_change_reference(before, after, 250, 3)
    assert list(df.columns) == [
        "feature", "mean_before", "mean_after", "delta", "delta_lo", "delta_hi",
        "rate_before", "rate_after", "rate_delta",
    ]  # fmt: skip
    np.testing.assert_array_equal(df["feature"], np.arange(13))
    np.testing.assert_allclose(df["delta_lo"], lo, atol=1e-12)
    np.testing.assert_allclose(df["delta_hi"], hi, atol=1e-12)
    np.testing.assert_allclose(df["mean_before"], before.mean(0))
    np.testing.assert_allclose(df["delta"], after.mean(0) - before.mean(0))
    np.testing.assert_allclose(df["rate_before"], (before > 0).mean(0))
    np.testing.assert_allclose(df["rate_delta"], (after > 0).mean(0) - (before > 0).mean(0))


def test_feature_change_unpaired_matches_loop_reference() -> None:
    rng = np.random.default_rng(10)
    before, after = rng.normal(size=(40, 5)), rng.normal(0.5, 1.0, size=(55, 5))
    df = feature_change(before, after, paired=False, n_boot=200, seed=2)
    for j in range(5):
        # feature_change draws before's indices first, then after's, from one generator.
        rng_j = np.random.default_rng(2)
        ia = bootstrap_indices(40, 200, rng_j)
        ib = bootstrap_indices(55, 200, rng_j)
        boot = after[ib, j].mean(1) - before[ia, j].mean(1)
        np.testing.assert_allclose(
            [df["delta_lo"][j], df["delta_hi"][j]], np.quantile(boot, [0.025, 0.975]), atol=1e-12
        )


def test_feature_change_identical_inputs_zero_width() -> None:
    x = np.random.default_rng(11).normal(size=(30, 8))
    df = feature_change(x, x.copy(), n_boot=100)
    assert (df[["delta", "delta_lo", "delta_hi", "rate_delta"]].to_numpy() == 0).all()


def test_spearman_matches_scipy_and_handles_ties() -> None:
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=50), rng.normal(size=50)
    ref = sps.spearmanr(x, y)
    assert spearman(x, y) == pytest.approx((ref.statistic, ref.pvalue))
    xt, yt = np.array([1, 1, 2, 2, 3, 3, 4.0]), np.array([1, 2, 2, 3, 3, 3, 5.0])
    ref = sps.spearmanr(xt, yt)
    rho, p = spearman(xt, yt)
    assert (rho, p) == pytest.approx((ref.statistic, ref.pvalue))
    # Average ranks: Spearman on ties is Pearson of the average ranks.
    assert rho == pytest.approx(np.corrcoef(sps.rankdata(xt), sps.rankdata(yt))[0, 1])
    assert spearman(x, 2 * x + 1)[0] == pytest.approx(1.0)


def test_spearman_ci_contains_rho_and_matches_loop() -> None:
    rng = np.random.default_rng(13)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    rho, lo, hi = spearman_ci(x, y, n_boot=300, seed=5)
    assert rho == pytest.approx(sps.spearmanr(x, y).statistic)
    assert lo < rho < hi
    idx = bootstrap_indices(60, 300, np.random.default_rng(5))
    boot = [sps.spearmanr(x[i], y[i]).statistic for i in idx]
    np.testing.assert_allclose([lo, hi], np.quantile(boot, [0.025, 0.975]), atol=1e-10)


def test_spearman_ci_of_monotone_pair_is_one() -> None:
    x = np.arange(20.0)
    _, lo, hi = spearman_ci(x, x**3, n_boot=100)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_blocked_bootstrap_means_do_not_depend_on_block_size() -> None:
    from precompute.stats import _boot_means

    x = np.random.default_rng(14).normal(size=(25, 6))
    idx = bootstrap_indices(25, 40, np.random.default_rng(0))
    np.testing.assert_allclose(_boot_means(x, idx, block=7), x[idx].mean(axis=1), atol=1e-12)
