"""Frequency-stratified permutation tests and a two-sample bootstrap, for set-level claims.

Why stratified: how close a feature's decoder direction sits to others, and whether a score flags it,
both depend on how often it fires (docs/science.md). A plain permutation test would credit a
difference in firing frequency to the sets' labels. Here labels are shuffled only among features of
the same firing-frequency bin, so the null keeps each set's frequency profile and a result beyond it
is not a frequency effect.

Everything is numpy and deterministic for a seed. p-values count the observed statistic as one of
the permutations, (1 + #{null ≥ observed}) / (1 + n), so none is ever 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BootstrapDifference",
    "PermutationResult",
    "bootstrap_difference",
    "difference_permutation_test",
    "frequency_bins",
    "label_sum_permutation_test",
    "stratified_permutations",
]

_CHUNK_ELEMENTS = 1 << 22  # random keys per chunk of permutations (~32 MiB of float64)


def frequency_bins(frequency: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bin (0..n_bins-1) of each value: edges at the 1/n_bins, 2/n_bins, ... quantiles of
    `frequency` itself. Equal values always share a bin (ties at an edge can leave some bins empty or
    unequal); NaN counts as 0."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    freq = np.nan_to_num(np.asarray(frequency, dtype=np.float64), nan=0.0)
    if freq.size == 0 or n_bins == 1:
        return np.zeros(freq.size, np.int64)
    edges = np.quantile(freq, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    return np.searchsorted(edges, freq, side="right").astype(np.int64)


def _chunks(n_perm: int, m: int) -> Iterator[int]:
    per = max(1, _CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, n_perm, per):
        yield min(per, n_perm - start)


def stratified_permutations(strata: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """[n_perm, m] index arrays: row r maps each position i to a position perm[r, i] of the same stratum,
    uniformly at random among the permutations that keep every stratum in place (labels[perm[r]] is
    the labels shuffled within strata)."""
    strata = np.asarray(strata, dtype=np.int64)
    m = strata.size
    base = np.argsort(strata, kind="stable")  # positions grouped by stratum
    keys = strata[base][None, :] + rng.random((n_perm, m))  # stratum + a random fraction < 1
    order = np.argsort(keys, axis=1)  # a random order within each stratum's block
    perm = np.empty((n_perm, m), np.int64)
    perm[:, base] = base[order]
    return perm


@dataclass(frozen=True)
class PermutationResult:
    """The observed statistic against its permutation null (`null`: one value per permutation)."""

    observed: float
    null: np.ndarray
    p_greater: float  # P(null >= observed), the observed counted as one permutation
    p_less: float  # P(null <= observed)

    @property
    def p_two_sided(self) -> float:
        """Twice the smaller one-sided p (capped at 1): valid for a null that is not symmetric."""
        return float(min(1.0, 2.0 * min(self.p_greater, self.p_less)))

    @property
    def null_mean(self) -> float:
        return float(self.null.mean())

    def null_quantile(self, q: float) -> float:
        return float(np.quantile(self.null, q))


def _result(observed: float, null: np.ndarray) -> PermutationResult:
    tol = 1e-12 * max(1.0, abs(observed))  # the same value computed in another order counts as equal
    n = null.size
    return PermutationResult(
        observed=float(observed),
        null=null,
        p_greater=float((1 + np.count_nonzero(null >= observed - tol)) / (1 + n)),
        p_less=float((1 + np.count_nonzero(null <= observed + tol)) / (1 + n)),
    )


def _mean_difference(values: np.ndarray, in_a: np.ndarray) -> np.ndarray:
    """mean(values[in_a]) - mean(values[~in_a]) for each row of the boolean [r, m] `in_a`."""
    n_a = in_a.sum(axis=-1)
    total = values.sum()
    sum_a = in_a.astype(np.float64) @ values
    return sum_a / n_a - (total - sum_a) / (values.size - n_a)


def difference_permutation_test(
    values: np.ndarray, in_a: np.ndarray, strata: np.ndarray, n_perm: int, seed: int
) -> PermutationResult:
    """mean(a) - mean(b) over a pooled sample (`in_a` marks set a, the rest is set b), against the same
    difference after shuffling set membership within `strata` (set sizes per stratum are kept)."""
    values = np.asarray(values, dtype=np.float64)
    in_a = np.asarray(in_a, dtype=bool)
    strata = np.asarray(strata, dtype=np.int64)
    if not (values.shape == in_a.shape == strata.shape) or values.ndim != 1:
        raise ValueError("values, in_a and strata must be equal 1-D arrays")
    if not 0 < in_a.sum() < in_a.size:
        raise ValueError("both sets need at least one member")
    if n_perm < 1:
        raise ValueError("n_perm must be >= 1")
    rng = np.random.default_rng(seed)
    observed = float(_mean_difference(values, in_a[None, :])[0])
    null = np.concatenate(
        [
            _mean_difference(values, in_a[stratified_permutations(strata, c, rng)])
            for c in _chunks(n_perm, values.size)
        ]
    )
    return _result(observed, null)


def label_sum_permutation_test(
    weights: np.ndarray, labels: np.ndarray, strata: np.ndarray, n_perm: int, seed: int
) -> PermutationResult:
    """sum(weights[labels]) against the same sum after shuffling `labels` within `strata`.

    Exact and cheap for many items: a shuffle puts a uniform random k_s-subset of stratum s under the
    labels, so the number of items with a non-zero weight it catches is hypergeometric, and which of
    them it catches is a uniform subset of that size. Only the non-zero weights are ever drawn.
    """
    weights = np.asarray(weights, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    strata = np.asarray(strata, dtype=np.int64)
    if not (weights.shape == labels.shape == strata.shape) or weights.ndim != 1:
        raise ValueError("weights, labels and strata must be equal 1-D arrays")
    if n_perm < 1:
        raise ValueError("n_perm must be >= 1")
    rng = np.random.default_rng(seed)
    observed = float(weights[labels].sum())
    null = np.zeros(n_perm, np.float64)
    for s in np.unique(strata):
        members = strata == s
        k = int(labels[members].sum())
        w = weights[members]
        w = w[w != 0]
        n_zero = int(members.sum()) - w.size
        if k == 0 or w.size == 0:
            continue
        caught = rng.hypergeometric(w.size, n_zero, k, size=n_perm) if n_zero else np.full(n_perm, k)
        start = 0
        for c in _chunks(n_perm, w.size):
            order = np.argsort(rng.random((c, w.size)), axis=1)
            sums = np.concatenate([np.zeros((c, 1)), np.cumsum(w[order], axis=1)], axis=1)
            null[start : start + c] += sums[np.arange(c), caught[start : start + c]]
            start += c
    return _result(observed, null)


@dataclass(frozen=True)
class BootstrapDifference:
    """Percentile intervals of mean(a) - mean(b) and median(a) - median(b), each set resampled alone."""

    mean: float
    mean_ci: tuple[float, float]
    median: float
    median_ci: tuple[float, float]


def bootstrap_difference(
    a: np.ndarray, b: np.ndarray, n_boot: int, seed: int, alpha: float = 0.05
) -> BootstrapDifference:
    """Unpaired percentile bootstrap: each replicate resamples a and b with replacement, separately."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    rng = np.random.default_rng(seed)
    means, medians = [], []
    for c in _chunks(n_boot, a.size + b.size):
        ra = a[rng.integers(0, a.size, size=(c, a.size))]
        rb = b[rng.integers(0, b.size, size=(c, b.size))]
        means.append(ra.mean(axis=1) - rb.mean(axis=1))
        medians.append(np.median(ra, axis=1) - np.median(rb, axis=1))
    q = [alpha / 2.0, 1.0 - alpha / 2.0]
    m_lo, m_hi = np.quantile(np.concatenate(means), q)
    d_lo, d_hi = np.quantile(np.concatenate(medians), q)
    return BootstrapDifference(
        mean=float(a.mean() - b.mean()),
        mean_ci=(float(m_lo), float(m_hi)),
        median=float(np.median(a) - np.median(b)),
        median_ci=(float(d_lo), float(d_hi)),
    )
