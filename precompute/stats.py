"""Bootstrap confidence intervals and rank correlations for the fine-tune diff and dataset triage.

Everything here is pure numpy/scipy and deterministic for a seed, so a reported interval can be
reproduced exactly. Bootstrap resamples are drawn as one index matrix and reduced with matrix
products, which keeps a 4096-feature before/after comparison fast (no per-feature Python loop).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats as sps

Stat = Callable[..., np.ndarray]

__all__ = [
    "bootstrap_indices",
    "bootstrap_ci",
    "bootstrap_diff_ci",
    "feature_change",
    "spearman",
    "spearman_ci",
]


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Draw an [n_boot, n] resample index matrix; one draw shared by every statistic keeps them comparable."""
    if n < 1:
        raise ValueError("cannot bootstrap an empty sample")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    return rng.integers(0, n, size=(n_boot, n))


def _percentile(boot: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0 (NaN replicates, e.g. constant resamples, are ignored)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    lo, hi = np.nanquantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return lo, hi


def _apply_stat(stat: Stat, samples: np.ndarray) -> np.ndarray:
    """Apply ``stat`` row-wise; vectorised when it takes ``axis`` (numpy reducers), else a row loop."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=float)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([stat(row) for row in samples], dtype=float)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of n items appears in each resample row: [n_boot, n] float64 weights."""
    n_boot = idx.shape[0]
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def bootstrap_ci(
    values: np.ndarray,
    stat: Stat = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Percentile bootstrap (estimate, lo, hi) for ``stat`` of a 1-D sample.

    With ``clusters`` (one label per value, e.g. the prompt a token came from) whole clusters are
    resampled, because tokens of one prompt are not independent and a token-level bootstrap would
    give falsely narrow intervals. With one value per cluster (labels 0..n-1 in order) it draws the
    same index matrix as the plain bootstrap.
    """
    values = np.asarray(values, dtype=float).ravel()
    rng = np.random.default_rng(seed)
    estimate = float(stat(values))
    if clusters is None:
        idx = bootstrap_indices(values.size, n_boot, rng)
        boot = _apply_stat(stat, values[idx])
    else:
        clusters = np.asarray(clusters).ravel()
        if clusters.shape != values.shape:
            raise ValueError("clusters must have one label per value")
        labels, codes = np.unique(clusters, return_inverse=True)
        k = labels.size
        idx = bootstrap_indices(k, n_boot, rng)
        if stat is np.mean:
            sums = np.bincount(codes, weights=values, minlength=k)
            sizes = np.bincount(codes, minlength=k).astype(float)
            boot = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
        else:
            order = np.argsort(codes, kind="stable")
            members = np.split(values[order], np.cumsum(np.bincount(codes, minlength=k))[:-1])
            boot = np.array([float(stat(np.concatenate([members[c] for c in row]))) for row in idx])
    lo, hi = _percentile(boot, alpha)
    return estimate, float(lo), float(hi)


def bootstrap_diff_ci(
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    paired: bool = True,
) -> tuple[float, float, float]:
    """(estimate, lo, hi) for mean(a) - mean(b).

    Paired resamples (a_i, b_i) together (same prompts before/after fine-tuning), which cancels the
    shared per-item variance; unpaired resamples each group independently.
    """
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if paired:
        if a.shape != b.shape:
            raise ValueError("paired bootstrap needs equal-length a and b")
        return bootstrap_ci(a - b, np.mean, n_boot=n_boot, alpha=alpha, seed=seed)
    rng = np.random.default_rng(seed)
    ia = bootstrap_indices(a.size, n_boot, rng)
    ib = bootstrap_indices(b.size, n_boot, rng)
    boot = a[ia].mean(axis=1) - b[ib].mean(axis=1)
    lo, hi = _percentile(boot, alpha)
    return float(a.mean() - b.mean()), float(lo), float(hi)


def _boot_means(x: np.ndarray, idx: np.ndarray, block: int) -> np.ndarray:
    """Column means of x under every resample row of idx: [n_boot, n_features], via count @ x in blocks."""
    n = x.shape[0]
    out = np.empty((idx.shape[0], x.shape[1]), dtype=np.float64)
    for start in range(0, idx.shape[0], block):
        stop = start + block
        out[start:stop] = _counts(idx[start:stop], n) @ x / n
    return out


def feature_change(
    before: np.ndarray,
    after: np.ndarray,
    paired: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per-feature change in mean activation and firing rate between two models on [n, n_features] inputs.

    All features share one bootstrap index matrix (paired: one over rows; unpaired: one per side,
    drawn in that order from ``seed``), so feature j's interval equals a single-feature bootstrap
    of column j with the same indices, at the cost of a few matrix products instead of a loop.
    Rates are the fraction of rows where the feature fires (> 0).
    """
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    if before.ndim != 2 or after.ndim != 2 or before.shape[1] != after.shape[1]:
        raise ValueError("before and after must be [n, n_features] with the same n_features")
    n_features = before.shape[1]
    # Keep each block's [block, n] count matrix and [block, n_features] result around 2**24 floats.
    rng = np.random.default_rng(seed)
    if paired:
        if before.shape != after.shape:
            raise ValueError("paired feature_change needs before and after of the same shape")
        diff = after - before
        idx = bootstrap_indices(diff.shape[0], n_boot, rng)
        block = max(1, (1 << 24) // max(diff.shape[0], n_features))
        boot = _boot_means(diff, idx, block)
    else:
        ia = bootstrap_indices(before.shape[0], n_boot, rng)
        ib = bootstrap_indices(after.shape[0], n_boot, rng)
        block = max(1, (1 << 24) // max(before.shape[0], after.shape[0], n_features))
        boot = _boot_means(after, ib, block) - _boot_means(before, ia, block)
    lo, hi = _percentile(boot, alpha)
    mean_before = before.mean(axis=0)
    mean_after = after.mean(axis=0)
    rate_before = (before > 0).mean(axis=0)
    rate_after = (after > 0).mean(axis=0)
    return pd.DataFrame(
        {
            "feature": np.arange(n_features, dtype=np.int64),
            "mean_before": mean_before,
            "mean_after": mean_after,
            "delta": mean_after - mean_before,
            "delta_lo": lo,
            "delta_hi": hi,
            "rate_before": rate_before,
            "rate_after": rate_after,
            "rate_delta": rate_after - rate_before,
        }
    )


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman rank correlation and two-sided p-value (average ranks for ties), via scipy."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError("x and y must have the same length")
    res = sps.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def spearman_ci(
    x: np.ndarray,
    y: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """(rho, lo, hi): pair-resampling percentile bootstrap of Spearman's rho, vectorised over resamples.

    Each resample is re-ranked (ties averaged) so the replicate is a true Spearman rho; resamples
    where x or y is constant have no defined rho and are dropped from the percentiles.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    rho, _ = spearman(x, y)
    idx = bootstrap_indices(x.size, n_boot, np.random.default_rng(seed))
    rx = sps.rankdata(x[idx], axis=1)
    ry = sps.rankdata(y[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.where(denom > 0, (rx * ry).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)
    lo, hi = _percentile(boot, alpha)
    return rho, float(lo), float(hi)
