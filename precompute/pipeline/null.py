"""The nulls a cosine is judged against (docs/science.md section 2a), so thresholds are never a fixed 0.3.

Two nulls, both stored by the geometry step (docs/cache.md `neighbors.npz`):

* `null_isotropic`: what the best of n-1 uniformly random directions in d dimensions reaches (exact
  Beta-law tail), with per-pair z-scores against that law (`cosine_z`) and a simulated check.
* `null_covariance`: what the best match of a random direction drawn with the decoder's own mean and
  covariance reaches among the decoder rows (Monte Carlo). A real decoder is anisotropic (a shared
  component, an effective dimension well below d), so its rows are closer to each other than
  isotropic directions are, and the isotropic null calls that closeness "above chance".

`calibrated_null` returns both and the one a pair is flagged against (their maximum); the nearest-
neighbour cosines of all features give each pair a percentile (`cosine_percentile`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import special, stats

if TYPE_CHECKING:
    import torch

ISOTROPIC, COVARIANCE = "isotropic", "covariance"  # `null_kind`: which null flags a pair
NN_QUANTILE_LEVELS = np.arange(1, 100) / 100.0  # `nn_cosine_quantiles`: 1%, 2%, ..., 99%
# the [samples, n] float32 score block of `covariance_max_cosines` (as knn.py's CPU block budget)
SCORE_BLOCK_BYTES = 256 * 2**20
FIT_ITERATIONS = 3  # moment-matching corrections of the covariance null's Gaussian (fit_direction_gaussian)
NULL_STREAM = 0x6E756C6C  # its random draws: numpy's generator seeded with [NULL_STREAM, seed]


def _check_d(d: int) -> float:
    if d < 2:
        raise ValueError(f"dimension d must be >= 2, got {d}")
    return (d - 1) / 2.0


def null_isotropic(n: int, d: int, fpr: float = 0.01) -> float:
    """Cosine that the largest of n-1 uniformly random unit directions exceeds with probability ``fpr``.

    The isotropic null: a feature's neighbour list holds its n-1 rivals, so a pair is "close" against
    it when random directions in the same d would beat it no more than ``fpr`` of the time. It is the
    floor of the flagging threshold (`calibrated_null`), not the threshold itself: a real decoder's
    rows are not uniformly spread. Exact: for a uniform random unit vector, (1+cos)/2 ~ Beta(a, a) with
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
    d=2304. Per pair, not corrected for the n-1 rivals (`null_isotropic` does that correction).
    """
    a = _check_d(d)
    out = _log_sf(np.atleast_1d(np.asarray(cos, dtype=np.float64)), a) / math.log(10.0)
    return _like_input(cos, out.reshape(np.shape(cos)))


def cosine_z(cos: Any, d: int) -> float | np.ndarray:
    """Per-pair z-score of a cosine against the isotropic null (uniform random directions in d dimensions).

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
    which has the same distribution and is d times cheaper (for large n or many trials). The isotropic reference of `null_isotropic`.
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
    """Simulated counterpart of `null_isotropic`: the (1-fpr) quantile of `random_max_cosines`.

    Exists to check the closed form against brute simulation (tests) and to let a user see
    the null they are compared with for their own n and d.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return float(np.quantile(random_max_cosines(n, d, trials, seed, method), 1.0 - fpr))


# --------------------------------------------------------------------------------------------
# The decoder's own null: random directions with the decoder's mean and covariance
# --------------------------------------------------------------------------------------------


def _rows_numpy(directions: np.ndarray | torch.Tensor) -> np.ndarray:
    if hasattr(directions, "detach"):
        directions = directions.detach().to("cpu").float().numpy()
    X = np.asarray(directions, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 2:
        raise ValueError(f"directions must be a [n >= 2, d >= 2] array, got shape {X.shape}")
    return X


@dataclass(frozen=True)
class DecoderMoments:
    """Mean [d] and shrunk covariance [d, d] (float64) of the non-zero unit decoder rows."""

    mean: np.ndarray
    cov: np.ndarray
    shrinkage: float  # the Ledoit-Wolf weight of the isotropic target, in [0, 1]
    rows: int  # how many rows they were estimated from


def decoder_moments(directions: np.ndarray | torch.Tensor) -> DecoderMoments:
    """Mean and covariance of the m non-zero unit rows, the covariance shrunk toward isotropy.

    The sample covariance S (divisor m) of m rows in d dimensions spreads its eigenvalues wider than
    the true ones, and is singular when m <= d; drawing from it would make a decoder with few rows
    look low-rank and inflate the null. The Ledoit-Wolf (2004) estimate (1 - a) S + a (tr S / d) I
    picks the weight a from the data: ~0 when m >> d, ~1 when the rows cannot pin S down. Rows of
    zero norm (dead or pruned features, left at zero by `knn.unit_rows`) are not directions and are
    left out. Accumulated in float64 over row chunks, so no float64 copy of the decoder.
    """
    X = _rows_numpy(directions)
    d = X.shape[1]
    chunk = max(1, (32 * 2**20) // (8 * d))
    live = np.flatnonzero(np.any(X != 0, axis=1))
    m = live.size
    if m < 2:
        raise ValueError(f"need at least 2 non-zero directions, got {m}")
    blocks = [live[s : s + chunk] for s in range(0, m, chunk)]
    mean = sum(X[b].astype(np.float64).sum(axis=0) for b in blocks) / m
    S = np.zeros((d, d))
    fourth = 0.0  # sum of ||x_i - mean||^4
    for b in blocks:
        xc = X[b].astype(np.float64) - mean
        S += xc.T @ xc
        fourth += float(np.sum(np.einsum("ij,ij->i", xc, xc) ** 2))
    S /= m
    mu = float(np.trace(S)) / d
    s2 = float(np.sum(S * S))
    delta = (s2 - d * mu * mu) / d  # ||S - mu I||^2 / d
    beta = min(max((fourth - m * s2) / (m * m * d), 0.0), delta)  # sum_i ||x_i x_i^T - S||^2 / (m^2 d)
    a = beta / delta if delta > 0 else 1.0
    cov = (1.0 - a) * S + a * mu * np.eye(d)
    return DecoderMoments(mean, cov, a, m)


def _device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sqrt_psd(S: np.ndarray) -> np.ndarray:
    """A with A A^T = S, negative eigenvalues (rounding) clipped at 0."""
    lam, vec = np.linalg.eigh(S)
    return vec * np.sqrt(np.clip(lam, 0.0, None))


def _normals(seed: int, samples: int, d: int) -> Iterator[np.ndarray]:
    """The same [samples, d] standard normals on every call, in row chunks of <= 32 MiB (float64)."""
    rng = np.random.default_rng([NULL_STREAM, seed])  # not the stream of a plain default_rng(seed)
    chunk = max(1, (32 * 2**20) // (8 * d))
    for s in range(0, samples, chunk):
        yield rng.standard_normal((min(samples, s + chunk) - s, d))


def _unit(g: np.ndarray) -> np.ndarray:
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def fit_direction_gaussian(
    mom: DecoderMoments, samples: int, seed: int = 0, iterations: int = FIT_ITERATIONS
) -> tuple[np.ndarray, np.ndarray]:
    """(mu [d], A [d, d]) of a Gaussian N(mu, A A^T) whose normalised draws have the rows' moments.

    Normalising flattens a Gaussian: the unit vectors of N(m, C) have a less anisotropic covariance
    than C (their long axes are divided by larger norms), so drawing with the rows' own covariance
    and normalising would give directions more spread out than the rows and a null too low wherever
    the decoder's variance sits in few directions. Starting from (m, C) = the rows' mean and
    covariance, each iteration draws the `samples` directions (the same normals every time, those
    of `_normals(seed, ...)`), measures their mean m_t and covariance C_t after normalising, and
    corrects mu += r (m - m_t), Sigma += r^2 (C - C_t) (r^2 = tr Sigma + |mu|^2, the squared norm
    that normalising divides by), clipping Sigma's eigenvalues at 0. Three iterations bring the
    moments of the draws to those of the rows (tests/precompute/pipeline/test_null.py).
    """
    d = mom.mean.size
    mu, S = mom.mean.copy(), mom.cov.copy()
    A = _sqrt_psd(S)
    for _ in range(iterations):
        total, second = np.zeros(d), np.zeros((d, d))
        for z in _normals(seed, samples, d):
            u = _unit(mu + z @ A.T)
            total += u.sum(axis=0)
            second += u.T @ u
        m_t = total / samples
        C_t = second / samples - np.outer(m_t, m_t)
        r2 = float(np.trace(S) + mu @ mu)
        mu = mu + math.sqrt(r2) * (mom.mean - m_t)
        A = _sqrt_psd(S + r2 * (mom.cov - C_t))
        S = A @ A.T
    return mu, A


def covariance_max_cosines(
    directions: np.ndarray | torch.Tensor,
    samples: int = 10_000,
    seed: int = 0,
    device: str = "cpu",
    iterations: int = FIT_ITERATIONS,
    moments: DecoderMoments | None = None,
) -> np.ndarray:
    """Best cosine to any decoder row of each of `samples` random directions with the decoder's moments.

    The directions are the normalised draws of `fit_direction_gaussian`: their mean (the decoder's
    shared component) and covariance (its anisotropy) are those of the unit rows (`decoder_moments`),
    and nothing of the rows' finer structure is. Each is compared with all n rows, so for an
    isotropic decoder this is the isotropic null's experiment with n rivals instead of n-1. The
    [chunk, n] float32 score block runs on `device`. `moments`: those of `directions` when the caller
    already has them. Returns float64 [samples].
    """
    import torch

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    X = _rows_numpy(directions)
    n = X.shape[0]
    mu, A = fit_direction_gaussian(moments or decoder_moments(X), samples, seed, iterations)
    dev = _device(device)
    rows_t = torch.from_numpy(X).to(dev).T
    block = max(1, SCORE_BLOCK_BYTES // (4 * n))
    best: list[np.ndarray] = []
    for z in _normals(seed, samples, X.shape[1]):
        u = _unit(mu + z @ A.T).astype(np.float32)
        for c in range(0, len(u), block):
            scores = torch.from_numpy(u[c : c + block]).to(dev) @ rows_t
            best.append(scores.amax(dim=1).double().cpu().numpy())
    return np.concatenate(best)


def null_covariance(
    directions: np.ndarray | torch.Tensor,
    fpr: float = 0.01,
    samples: int = 10_000,
    seed: int = 0,
    device: str = "cpu",
    iterations: int = FIT_ITERATIONS,
) -> float:
    """The (1 - fpr) quantile of `covariance_max_cosines`: the cosine that the best decoder match of a
    random direction with the decoder's own moments exceeds with probability ``fpr``."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return float(
        np.quantile(covariance_max_cosines(directions, samples, seed, device, iterations), 1.0 - fpr)
    )


@dataclass(frozen=True)
class CosineNull:
    """Both nulls of one decoder at one fpr, and the one pairs are flagged against.

    The flagging threshold `cosine` is the larger of the two: the isotropic law is exact for an
    isotropic decoder and the covariance null is a Monte-Carlo estimate that converges to it there,
    so the maximum never flags more than either null allows; on an anisotropic decoder the
    covariance null is the larger and `kind` is "covariance".
    """

    isotropic: float
    covariance: float
    fpr: float
    samples: int  # random directions behind `covariance`
    shrinkage: float  # Ledoit-Wolf weight of the isotropic target in the decoder's covariance

    @property
    def cosine(self) -> float:
        return max(self.isotropic, self.covariance)

    @property
    def kind(self) -> str:
        return COVARIANCE if self.covariance > self.isotropic else ISOTROPIC


def calibrated_null(
    directions: np.ndarray | torch.Tensor,
    fpr: float = 0.01,
    samples: int = 10_000,
    seed: int = 0,
    device: str = "cpu",
) -> CosineNull:
    """The isotropic and covariance nulls of the unit decoder rows `directions` [n, d] at `fpr`."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    X = _rows_numpy(directions)
    n, d = X.shape
    mom = decoder_moments(X)
    best = covariance_max_cosines(X, samples, seed, device, moments=mom)
    cov = float(np.quantile(best, 1.0 - fpr))
    return CosineNull(null_isotropic(n, d, fpr), cov, float(fpr), int(samples), float(mom.shrinkage))


# --------------------------------------------------------------------------------------------
# How close a typical feature's nearest neighbour is
# --------------------------------------------------------------------------------------------


def _finite_sorted(nearest: np.ndarray) -> np.ndarray:
    v = np.asarray(nearest, dtype=np.float64).ravel()
    v = np.sort(v[np.isfinite(v)])
    if v.size == 0:
        raise ValueError("no finite nearest-neighbour cosine")
    return v


def nn_cosine_quantiles(nearest: np.ndarray) -> np.ndarray:
    """Quantiles at `NN_QUANTILE_LEVELS` (1%..99%) of every feature's nearest-neighbour cosine
    (`nearest` = the first column of the kNN cosines), float64 [99]; non-finite entries ignored."""
    return np.quantile(_finite_sorted(nearest), NN_QUANTILE_LEVELS)


def cosine_percentile(cos: Any, nearest: np.ndarray) -> float | np.ndarray:
    """Percentile (0-100) of each cosine among the nearest-neighbour cosines of all features: 100 x the
    share of features whose nearest neighbour is at most that close (non-finite entries ignored).

    50 means a pair is as close as a typical feature's nearest neighbour, however far above a null
    that is; 99 that only 1% of features have a neighbour closer than this pair."""
    v = _finite_sorted(nearest)
    c = np.asarray(cos, dtype=np.float64)
    out = np.where(np.isnan(c), np.nan, 100.0 * np.searchsorted(v, c, side="right") / v.size)
    return _like_input(cos, np.asarray(out, np.float64).reshape(np.shape(cos)))
