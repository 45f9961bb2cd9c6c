"""The cosine null against simulation, its scale and monotonicity, and the per-pair z-score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from precompute.pipeline.null import cosine_log10_p, cosine_z, empirical_null, null_cosine, random_max_cosines

BACKENDS = ["torch", "faiss"]


# ----------------------------------------------------------------------------------------- null


@pytest.mark.parametrize("n,d", [(2000, 64), (4000, 128)])
def test_null_cosine_matches_simulation(n: int, d: int) -> None:
    fpr = 0.05
    thr = null_cosine(n, d, fpr)
    maxima = random_max_cosines(n, d, trials=4000, seed=11, method="chi2")
    rate = float((maxima > thr).mean())
    # binomial sd at 4000 trials is 0.0034; allow ~3.5 sd
    assert abs(rate - fpr) < 0.012, (rate, thr)
    assert abs(empirical_null(n, d, fpr, seed=12, trials=4000, method="chi2") - thr) < 0.01


def test_null_cosine_matches_literal_gaussian_vectors() -> None:
    n, d, fpr = 2000, 64, 0.05
    thr = null_cosine(n, d, fpr)
    maxima = random_max_cosines(n, d, trials=400, seed=13, method="vectors")
    assert abs(float((maxima > thr).mean()) - fpr) < 0.035  # sd 0.011 at 400 trials
    assert abs(float(np.quantile(maxima, 1 - fpr)) - thr) < 0.03


def test_null_cosine_scale_and_monotonicity() -> None:
    # docs/science.md 2a: the largest cosine of 16k random directions at d=768 is ~sqrt(2 ln n / d)=0.16
    med = null_cosine(16384, 768, fpr=0.5)
    assert 0.13 < med < math.sqrt(2 * math.log(16384) / 768)
    assert null_cosine(16384, 768, 0.01) > null_cosine(16384, 768, 0.05) > med
    assert null_cosine(16384, 2304, 0.5) < med
    assert null_cosine(1_000_000, 768, 0.01) > null_cosine(16384, 768, 0.01)
    assert 0 < null_cosine(10**9, 4096, 1e-12) < 1  # tiny per-pair tail stays finite
    with pytest.raises(ValueError):
        null_cosine(100, 64, fpr=0.0)


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
    assert cosine_log10_p(null_cosine(n, d, fpr), d) == pytest.approx(math.log10(p), rel=1e-6)
