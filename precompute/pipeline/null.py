"""The null a cosine is judged against: what random directions reach in the same dimension with the
same number of candidates (docs/science.md section 2a), so thresholds come from `null_cosine`, never a
fixed 0.3. Exact Beta-law tails, per-pair z-scores and a simulated check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import special, stats


def _check_d(d: int) -> float:
    if d < 2:
        raise ValueError(f"dimension d must be >= 2, got {d}")
    return (d - 1) / 2.0


def null_cosine(n: int, d: int, fpr: float = 0.01) -> float:
    """Cosine that the largest of n-1 random unit directions exceeds with probability ``fpr``.

    This is the flagging threshold: a feature's neighbour list holds its n-1 rivals, so a pair
    counts as "close" only if random directions in the same d would beat it no more than
    ``fpr`` of the time. Exact: for a uniform random unit vector, (1+cos)/2 ~ Beta(a, a) with
    a = (d-1)/2, so the per-pair tail is p = 1-(1-fpr)^(1/(n-1)) and the threshold is the
    upper-p quantile. The cosine is signed (as in the kNN lists), one-sided. Roughly
    sqrt(2 ln n / d) for large n (0.141 median, 0.174 at fpr 0.01 for d=768, n=16384).
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    a = _check_d(d)
    p = -math.expm1(math.log1p(-fpr) / (n - 1))  # 1-(1-fpr)^(1/(n-1)) without cancellation
    x = float(stats.beta.isf(p, a, a))
    if not math.isfinite(x):  # pragma: no cover - scipy handles p down to ~1e-300
        raise FloatingPointError(f"beta quantile failed for p={p}, d={d}")
    return 2.0 * x - 1.0


def _log_betainc_small(a: float, y: np.ndarray) -> np.ndarray:
    """log I_y(a, a) for y well below 1/2, via the continued fraction (no underflow).

    I_y(a,b) = y^a (1-y)^b / (a B(a,b)) * CF (Numerical Recipes betacf, modified Lentz);
    only called where scipy's betainc underflows, i.e. far in the tail, where CF converges fast.
    """
    b = a
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(y)
    dd = 1.0 - qab * y / qap
    dd = np.where(np.abs(dd) < tiny, tiny, dd)
    dd = 1.0 / dd
    h = dd.copy()
    for m in range(1, 501):
        m2 = 2 * m
        aa = m * (b - m) * y / ((qam + m2) * (a + m2))
        dd = 1.0 + aa * dd
        dd = np.where(np.abs(dd) < tiny, tiny, dd)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        dd = 1.0 / dd
        h = h * dd * c
        aa = -(a + m) * (qab + m) * y / ((a + m2) * (qap + m2))
        dd = 1.0 + aa * dd
        dd = np.where(np.abs(dd) < tiny, tiny, dd)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        dd = 1.0 / dd
        delta = dd * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    with np.errstate(divide="ignore"):
        return a * np.log(y) + b * np.log1p(-y) - np.log(a) - special.betaln(a, b) + np.log(h)


def _log_sf_upper(c: np.ndarray, a: float) -> np.ndarray:
    """log P(C >= c) for c in [0, 1]: log of the regularised I_{(1-c)/2}(a, a)."""
    y = (1.0 - c) / 2.0
    sf = special.betainc(a, a, y)
    out = np.empty_like(y)
    ok = sf > 1e-280
    out[ok] = np.log(sf[ok])
    small = ~ok
    if small.any():
        ys = y[small]
        res = np.full(ys.shape, -np.inf)
        pos = ys > 0
        if pos.any():
            res[pos] = _log_betainc_small(a, ys[pos])
        out[small] = res
    return out


def _log_sf(cos: np.ndarray, a: float) -> np.ndarray:
    """log P(C >= cos) per pair for any cos in [-1, 1], accurate in both tails."""
    c = np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)
    out = np.empty_like(c)
    pos = c >= 0
    out[pos] = _log_sf_upper(c[pos], a)
    neg = ~pos
    if neg.any():
        # P(C >= -t) = 1 - P(C > t) by symmetry
        out[neg] = np.log1p(-np.exp(_log_sf_upper(-c[neg], a)))
    return out


def _like_input(x: Any, out: np.ndarray) -> float | np.ndarray:
    return float(out) if np.ndim(x) == 0 else out


def cosine_log10_p(cos: Any, d: int) -> float | np.ndarray:
    """log10 of the per-pair tail probability P(C >= cos) for one random direction in d dims.

    Reported instead of p itself because the interesting pairs have p far below 1e-300 at
    d=2304. Per pair, not corrected for the n-1 rivals (`null_cosine` does that correction).
    """
    a = _check_d(d)
    out = _log_sf(np.atleast_1d(np.asarray(cos, dtype=np.float64)), a) / math.log(10.0)
    return _like_input(cos, out.reshape(np.shape(cos)))


def cosine_z(cos: Any, d: int) -> float | np.ndarray:
    """Per-pair z-score of a cosine against the random-direction null in d dimensions.

    The standard normal quantile with the same upper-tail probability as the exact Beta law,
    z = -Phi^-1(P(C >= cos)), computed from log P with ``ndtri_exp`` so it stays finite and
    monotone for every cos < 1 (a naive 1/sqrt(d) scaling overstates large cosines and the
    naive tail underflows). Symmetric: z(-c) = -z(c). Only cos >= 1 gives +inf.
    """
    a = _check_d(d)
    c = np.clip(np.atleast_1d(np.asarray(cos, dtype=np.float64)), -1.0, 1.0)
    z = np.empty_like(c)
    pos = c >= 0
    z[pos] = -special.ndtri_exp(_log_sf_upper(c[pos], a))
    neg = ~pos
    z[neg] = special.ndtri_exp(_log_sf_upper(-c[neg], a))
    return _like_input(cos, z.reshape(np.shape(cos)))


def random_max_cosines(
    n: int, d: int, trials: int = 1000, seed: int = 0, method: str = "vectors"
) -> np.ndarray:
    """Simulated largest cosine of one random direction with n-1 others, one value per trial.

    method="vectors" literally draws n Gaussian vectors per trial in d dims and takes the max
    cosine of the first with the rest (the same computation as a kNN list). method="chi2" uses
    rotation invariance: against a fixed axis, cos = z / sqrt(z^2 + chi2_{d-1}) with z ~ N(0,1),
    which has the same distribution and is d times cheaper (for large n or many trials).
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    _check_d(d)
    rng = np.random.default_rng(seed)
    out = np.empty(trials, dtype=np.float64)
    if method == "vectors":
        chunk = max(1, (8 * 2**20) // (n * d))
        for s in range(0, trials, chunk):
            t = min(trials, s + chunk) - s
            G = rng.standard_normal((t, n, d), dtype=np.float32)
            G /= np.linalg.norm(G, axis=2, keepdims=True)
            cos = np.einsum("tnd,td->tn", G[:, 1:], G[:, 0])
            out[s : s + t] = cos.max(axis=1)
    elif method == "chi2":
        chunk = max(1, (8 * 2**20) // n)
        for s in range(0, trials, chunk):
            t = min(trials, s + chunk) - s
            z = rng.standard_normal((t, n - 1))
            q = rng.chisquare(d - 1, size=(t, n - 1))
            out[s : s + t] = (z / np.sqrt(z * z + q)).max(axis=1)
    else:
        raise ValueError(f"method must be 'vectors' or 'chi2', got {method!r}")
    return out


def empirical_null(
    n: int, d: int, fpr: float = 0.01, seed: int = 0, trials: int = 1000, method: str = "vectors"
) -> float:
    """Simulated counterpart of `null_cosine`: the (1-fpr) quantile of `random_max_cosines`.

    Exists to check the closed form against brute simulation (tests) and to let a user see
    the null they are compared with for their own n and d.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return float(np.quantile(random_max_cosines(n, d, trials, seed, method), 1.0 - fpr))
