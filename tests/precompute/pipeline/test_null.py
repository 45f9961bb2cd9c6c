"""The isotropic null against simulation, its scale and monotonicity, and the per-pair z-score; the
covariance null's calibration on anisotropic dictionaries without structure (where the isotropic null
flags nearly every feature), planted pairs still flagged, and the nearest-neighbour percentile."""

from __future__ import annotations

import math

import numpy as np
import pytest

from precompute.pipeline.null import (
    COVARIANCE,
    ISOTROPIC,
    NN_QUANTILE_LEVELS,
    calibrated_null,
    cosine_log10_p,
    cosine_percentile,
    cosine_z,
    decoder_moments,
    empirical_null,
    fit_direction_gaussian,
    nn_cosine_quantiles,
    null_isotropic,
    random_max_cosines,
)

BACKENDS = ["torch", "faiss"]


# ----------------------------------------------------------------------------------------- null


@pytest.mark.parametrize("n,d", [(2000, 64), (4000, 128)])
def test_null_isotropic_matches_simulation(n: int, d: int) -> None:
    fpr = 0.05
    thr = null_isotropic(n, d, fpr)
    maxima = random_max_cosines(n, d, trials=4000, seed=11, method="chi2")
    rate = float((maxima > thr).mean())
    # binomial sd at 4000 trials is 0.0034; allow ~3.5 sd
    assert abs(rate - fpr) < 0.012, (rate, thr)
    assert abs(empirical_null(n, d, fpr, seed=12, trials=4000, method="chi2") - thr) < 0.01


def test_null_isotropic_matches_literal_gaussian_vectors() -> None:
    n, d, fpr = 2000, 64, 0.05
    thr = null_isotropic(n, d, fpr)
    maxima = random_max_cosines(n, d, trials=400, seed=13, method="vectors")
    assert abs(float((maxima > thr).mean()) - fpr) < 0.035  # sd 0.011 at 400 trials
    assert abs(float(np.quantile(maxima, 1 - fpr)) - thr) < 0.03


def test_null_isotropic_scale_and_monotonicity() -> None:
    # docs/science.md 2a: the largest cosine of 16k random directions at d=768 is ~sqrt(2 ln n / d)=0.16
    med = null_isotropic(16384, 768, fpr=0.5)
    assert 0.13 < med < math.sqrt(2 * math.log(16384) / 768)
    assert null_isotropic(16384, 768, 0.01) > null_isotropic(16384, 768, 0.05) > med
    assert null_isotropic(16384, 2304, 0.5) < med
    assert null_isotropic(1_000_000, 768, 0.01) > null_isotropic(16384, 768, 0.01)
    assert 0 < null_isotropic(10**9, 4096, 1e-12) < 1  # tiny per-pair tail stays finite
    with pytest.raises(ValueError):
        null_isotropic(100, 64, fpr=0.0)


def test_cosine_z_monotone_finite_and_consistent() -> None:
    for d in (2, 64, 768, 2304):
        c = np.linspace(-1, 1, 20001)[1:-1]
        z = cosine_z(c, d)
        lp = cosine_log10_p(c, d)
        assert np.isfinite(z).all() and np.isfinite(lp).all()
        assert np.all(np.diff(z) > 0)
        assert np.all(np.diff(lp) <= 0)
        np.testing.assert_allclose(z, -z[::-1], atol=1e-9)  # symmetric
    assert abs(cosine_z(0.0, 768)) < 1e-9
    # near 0 the null is ~N(0, 1/d)
    assert cosine_z(0.02, 2304) == pytest.approx(0.02 * math.sqrt(2304), rel=0.01)
    assert cosine_log10_p(0.0, 768) == pytest.approx(math.log10(0.5))
    # far tail: finite where a naive tail probability underflows
    assert np.isfinite(cosine_z(0.9999, 2304)) and cosine_log10_p(0.9, 2304) < -300
    assert cosine_z(1.0, 64) == np.inf
    # the null threshold's per-pair tail matches
    n, d, fpr = 16384, 768, 0.01
    p = 1 - (1 - fpr) ** (1 / (n - 1))
    assert cosine_log10_p(null_isotropic(n, d, fpr), d) == pytest.approx(math.log10(p), rel=1e-6)


# ------------------------------------------------------------------------ the decoder's own null


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shared_component(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Every row = 0.5 x one shared unit direction + isotropic noise of norm ~1, normalised: pairwise
    cosine ~0.2 everywhere, and no pair closer than the model makes it."""
    s = unit(rng.standard_normal((1, d)))[0]
    return unit(0.5 * s + rng.standard_normal((n, d)) / math.sqrt(d))


def low_rank_plus_noise(n: int, d: int, rng: np.random.Generator, rank: int = 8, share: float = 0.5):
    """Rows from a Gaussian whose covariance is rank-8 (half the variance) + isotropic, with a small
    mean, normalised: a decoder whose variance sits in few directions, and no planted structure."""
    basis = unit(rng.standard_normal((rank, d)))
    low = rng.standard_normal((n, rank)) @ basis * math.sqrt(share / rank)
    noise = rng.standard_normal((n, d)) * math.sqrt((1 - share) / d)
    return unit(low + noise + 0.2 * unit(rng.standard_normal((1, d))))


def nearest_cosines(U: np.ndarray) -> np.ndarray:
    """Brute force: every row's largest cosine with another row."""
    G = U @ U.T
    np.fill_diagonal(G, -np.inf)
    return G.max(axis=1)


@pytest.mark.parametrize("model", [shared_component, low_rank_plus_noise])
def test_covariance_null_flags_about_its_rate_where_the_isotropic_null_flags_most(model) -> None:
    n, d, fpr = 2000, 128, 0.05
    U = model(n, d, np.random.default_rng(1)).astype(np.float32)
    nn = nearest_cosines(U.astype(np.float64))
    null = calibrated_null(U, fpr=fpr, samples=8000, seed=1)
    assert null.isotropic == null_isotropic(n, d, fpr)
    assert null.kind == COVARIANCE and null.cosine == null.covariance > null.isotropic
    # the isotropic null calls most features "close to a neighbour"; its nominal rate is 5%
    assert float(np.mean(nn > null.isotropic)) > 0.9
    # the calibrated one flags about its rate: within 4 binomial sd above, and not trivially fewer
    rate = float(np.mean(nn > null.cosine))
    assert fpr / 2 < rate < fpr + 4 * math.sqrt(fpr * (1 - fpr) / n), rate


def test_planted_pairs_stay_flagged_above_the_covariance_null() -> None:
    n, d, fpr = 2000, 256, 0.05
    rng = np.random.default_rng(2)
    U = shared_component(n, d, rng)
    planted = rng.choice(n, (20, 2), replace=False)
    target = np.linspace(0.5, 0.9, 20)
    for (i, j), c in zip(planted, target, strict=True):
        w = U[j] - (U[j] @ U[i]) * U[i]  # row j's own direction, made orthogonal to row i
        U[j] = c * U[i] + math.sqrt(1 - c * c) * w / np.linalg.norm(w)
    cos = np.einsum("pd,pd->p", U[planted[:, 0]], U[planted[:, 1]])
    np.testing.assert_allclose(cos, target, atol=1e-9)
    null = calibrated_null(U.astype(np.float32), fpr=fpr, samples=8000, seed=2)
    assert null.kind == COVARIANCE and null.isotropic < null.cosine < 0.5
    assert (cos > null.cosine).all()
    # and the rest of the dictionary is still flagged at about the nominal rate
    nn = nearest_cosines(U)
    rest = np.setdiff1d(np.arange(n), planted.ravel())
    assert float(np.mean(nn[rest] > null.cosine)) < fpr + 4 * math.sqrt(fpr * (1 - fpr) / len(rest))


def test_on_an_isotropic_decoder_the_two_nulls_agree() -> None:
    n, d, fpr = 2000, 64, 0.05
    # the rows come from default_rng(0) and the null from seed 0: its draws use their own stream
    U = unit(np.random.default_rng(0).standard_normal((n, d))).astype(np.float32)
    null = calibrated_null(U, fpr=fpr, samples=8000, seed=0)
    assert abs(null.covariance - null.isotropic) < 0.01
    assert null.cosine == max(null.isotropic, null.covariance)
    assert null.kind == (COVARIANCE if null.covariance > null.isotropic else ISOTROPIC)
    assert null.shrinkage > 0.5  # nothing but noise in the sample covariance: shrunk to isotropy


def test_decoder_moments_are_the_ledoit_wolf_estimate_of_the_live_rows() -> None:
    rng = np.random.default_rng(3)
    X = low_rank_plus_noise(300, 24, rng).astype(np.float32)  # float32, as the decoder's unit rows
    X[[5, 77]] = 0.0  # dead features' zero rows are not directions
    mom = decoder_moments(X)
    live = np.delete(X, [5, 77], axis=0).astype(np.float64)
    m, d = live.shape
    mean = live.mean(axis=0)
    S = (live - mean).T @ (live - mean) / m
    mu = np.trace(S) / d
    delta = np.sum((S - mu * np.eye(d)) ** 2) / d
    beta = sum(np.sum((np.outer(x, x) - S) ** 2) for x in live - mean) / (m * m * d)
    a = min(beta, delta) / delta
    assert mom.rows == m and mom.shrinkage == pytest.approx(a, rel=1e-9)
    np.testing.assert_allclose(mom.mean, mean, atol=1e-12)
    np.testing.assert_allclose(mom.cov, (1 - a) * S + a * mu * np.eye(d), atol=1e-12)


def test_the_fitted_gaussian_gives_directions_with_the_rows_moments() -> None:
    """Normalising flattens a Gaussian; the fit undoes it: the draws' mean and covariance after
    normalising are the rows' (`decoder_moments`), which the first guess's are not."""
    U = low_rank_plus_noise(3000, 32, np.random.default_rng(4), rank=3, share=0.8)
    mom = decoder_moments(U)
    rng = np.random.default_rng([0x6E756C6C, 5])  # the draws `fit_direction_gaussian` makes with seed 5
    z = rng.standard_normal((20_000, 32))

    def moments_of_draws(iterations: int) -> tuple[float, float]:
        mu, A = fit_direction_gaussian(mom, 20_000, seed=5, iterations=iterations)
        g = unit(mu + z @ A.T)
        return (
            float(np.abs(g.mean(axis=0) - mom.mean).max()),
            float(np.abs(np.cov(g, rowvar=False, bias=True) - mom.cov).max() / np.abs(mom.cov).max()),
        )

    first_mean, first_cov = moments_of_draws(0)
    fit_mean, fit_cov = moments_of_draws(3)
    assert first_cov > 0.05  # without the correction the directions are too spread out
    assert fit_cov < 0.01 and fit_mean < 0.01 and fit_cov < first_cov / 10


def test_cosine_percentile_and_quantiles_match_brute_force() -> None:
    rng = np.random.default_rng(6)
    U = shared_component(400, 32, rng)
    nn = nearest_cosines(U)
    probes = np.concatenate([np.linspace(-0.2, 1.0, 61), nn[:10], [np.nan]])
    got = cosine_percentile(probes, nn)
    for c, p in zip(probes, got, strict=True):
        if np.isnan(c):
            assert np.isnan(p)
        else:
            assert p == 100.0 * sum(v <= c for v in nn) / len(nn)
    assert cosine_percentile(float(nn.max()), nn) == 100.0 and cosine_percentile(-1.0, nn) == 0.0
    assert isinstance(cosine_percentile(0.3, nn), float)
    with_nan = np.concatenate([nn, [np.nan]])  # a non-finite entry is not a feature's neighbour
    assert cosine_percentile(0.3, with_nan) == cosine_percentile(0.3, nn)
    q = nn_cosine_quantiles(with_nan)
    assert q.shape == (99,) and NN_QUANTILE_LEVELS[0] == 0.01 and NN_QUANTILE_LEVELS[-1] == 0.99
    np.testing.assert_allclose(q, [np.quantile(nn, p / 100) for p in range(1, 100)], rtol=0, atol=0)
