"""Tests for precompute.pipeline.geometry: exact kNN against brute force, the cosine null, UMAP layout."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from precompute.pipeline.geometry import (
    cosine_log10_p,
    cosine_z,
    empirical_null,
    knn_bruteforce,
    knn_cosine,
    neighbourhood_preservation,
    null_cosine,
    random_max_cosines,
    umap_layout,
    unit_rows,
)

BACKENDS = ["torch", "faiss"]


def _random(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _signs(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    """+-1 rows with d a power of 4: unit rows are +-1/sqrt(d) exactly, so every cosine is an
    exact dyadic number in float32 whatever the summation order -> many exact ties."""
    return np.sign(np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32)


# ------------------------------------------------------------------------------------- unit_rows


def test_unit_rows_normalises_and_keeps_zero_rows_zero() -> None:
    W = _random(50, 12) * np.float32(7.0)
    W[[3, 17]] = 0.0
    with pytest.warns(RuntimeWarning, match=r"2 of 50 decoder rows have zero norm.*\[3, 17\]"):
        U = unit_rows(W)
    assert U.dtype == np.float32 and U.shape == W.shape
    norms = np.linalg.norm(U.astype(np.float64), axis=1)
    assert np.all(U[[3, 17]] == 0)
    keep = np.ones(50, bool)
    keep[[3, 17]] = False
    np.testing.assert_allclose(norms[keep], 1.0, atol=1e-6)


def test_unit_rows_accepts_tensors_and_rejects_nan() -> None:
    W = torch.randn(20, 8, dtype=torch.float64)
    np.testing.assert_allclose(unit_rows(W), unit_rows(W.numpy()), atol=1e-7)
    W[4, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        unit_rows(W)


# ------------------------------------------------------------------------------------------ kNN


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 7, 37, 600])
def test_knn_equals_bruteforce(backend: str, block_size: int | None) -> None:
    X = _random(600, 24, seed=1)
    ref_i, ref_c = knn_bruteforce(X, 12)
    idx, cos = knn_cosine(X, k=12, block_size=block_size, backend=backend, device="cpu", progress=False)
    assert idx.dtype == np.int32 and cos.dtype == np.float32 and idx.shape == (600, 12)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(cos, ref_c, atol=1e-6)
    assert np.all(idx != np.arange(600)[:, None])
    assert np.all(np.diff(cos, axis=1) <= 0)


def test_memory_budget_picks_blocks_that_do_not_divide_n() -> None:
    X = _random(333, 8, seed=2)
    ref_i, _ = knn_bruteforce(X, 5)
    # budget for 10 rows of 333 float32 scores -> blocks of 10, last one of 3
    idx, _ = knn_cosine(X, 5, backend="torch", device="cpu", progress=False, memory_budget_bytes=10 * 333 * 4)
    np.testing.assert_array_equal(idx, ref_i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_duplicate_rows_break_by_lower_index(backend: str) -> None:
    X = _signs(400, 16, seed=3)
    X[[50, 90, 91, 300]] = X[7]  # five identical rows: 7, 50, 90, 91, 300
    X[120] = -X[7]
    ref_i, ref_c = knn_bruteforce(X, 20)
    for bs in (None, 33):
        idx, cos = knn_cosine(X, 20, block_size=bs, backend=backend, device="cpu", progress=False)
        np.testing.assert_array_equal(idx, ref_i)
        np.testing.assert_array_equal(cos, ref_c)
    # self is excluded by index; the twins come first, in index order, with cosine 1
    np.testing.assert_array_equal(idx[7, :4], [50, 90, 91, 300])
    np.testing.assert_array_equal(idx[91, :4], [7, 50, 90, 300])
    assert np.all(cos[91, :4] == 1.0)
    # the many exact ties further down are in ascending index order
    same = cos[7][:, None] == cos[7][None, :]
    order_ok = np.where(same, idx[7][:, None] <= idx[7][None, :], True)
    assert np.all(order_ok[np.triu_indices(20, 1)])


@pytest.mark.parametrize("backend,as_tensor", [("torch", False), ("torch", True), ("faiss", False)])
def test_zero_rows(backend: str, as_tensor: bool) -> None:
    X = _random(60, 10, seed=4)
    X[[5, 6]] = 0.0
    inp = torch.from_numpy(X) if as_tensor else X  # tensors take the on-device normalisation path
    with pytest.warns(RuntimeWarning, match="zero norm"):
        idx, cos = knn_cosine(inp, 4, backend=backend, device="cpu", progress=False)
    with pytest.warns(RuntimeWarning):
        ref_i, ref_c = knn_bruteforce(X, 4)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(cos, ref_c, atol=1e-6)
    # a zero row's cosine is 0 with everyone, so it lists the lowest other indices
    np.testing.assert_array_equal(idx[5], [0, 1, 2, 3])
    assert np.all(cos[5] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_at_least_n_minus_1_is_clamped(backend: str) -> None:
    X = _random(9, 5, seed=5)
    ref_i, ref_c = knn_bruteforce(X, 8)
    idx, cos = knn_cosine(X, 8, backend=backend, device="cpu", progress=False)  # k == n-1: exact, no warning
    np.testing.assert_array_equal(idx, ref_i)
    with pytest.warns(RuntimeWarning, match="returning k=8"):
        idx2, cos2 = knn_cosine(X, 32, backend=backend, device="cpu", progress=False)
    assert idx2.shape == (9, 8)
    np.testing.assert_array_equal(idx2, ref_i)
    for row in range(9):
        assert sorted(idx2[row].tolist()) == [j for j in range(9) if j != row]


def test_knn_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        knn_cosine(_random(1, 4), 3, progress=False)
    with pytest.raises(ValueError, match="backend"):
        knn_cosine(_random(5, 4), 2, backend="annoy", progress=False)
    with pytest.raises(ValueError, match="k must be"):
        knn_cosine(_random(5, 4), 0, progress=False)


def test_knn_accepts_torch_tensor() -> None:
    X = _random(100, 6, seed=6)
    a = knn_cosine(torch.from_numpy(X), 7, device="cpu", progress=False)
    b = knn_cosine(X, 7, device="cpu", progress=False)
    np.testing.assert_array_equal(a[0], b[0])


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
    # SCIENCE.md 2a: the largest cosine of 16k random directions at d=768 is ~sqrt(2 ln n / d)=0.16
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


# ----------------------------------------------------------------------------------------- UMAP


@pytest.fixture(scope="module")
def clustered_knn() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(21)
    centres = rng.standard_normal((4, 16))
    X = (np.repeat(centres, 40, axis=0) + 0.3 * rng.standard_normal((160, 16))).astype(np.float32)
    idx, cos = knn_cosine(X, 16, progress=False)
    return X, idx, cos


@pytest.fixture(scope="module")
def layouts(clustered_knn: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """All UMAP runs of the module in one place: umap-learn pays ~45-60 s of numba compilation
    per process, so every test shares these few small fits."""
    X, idx, cos = clustered_knn
    tiny_i, tiny_c = knn_cosine(X[::27], 5, progress=False)  # 6 points: n_neighbors 15 -> 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "a": umap_layout(idx, cos, n_neighbors=10, seed=3, progress=False),
            "b": umap_layout(idx, cos, n_neighbors=10, seed=3, progress=False),
            "other_seed": umap_layout(idx, cos, n_neighbors=10, seed=4, progress=False),
            "tiny": umap_layout(tiny_i, tiny_c, n_neighbors=15, seed=0, progress=False),
        }


def test_umap_reproducible_shape_and_range(
    layouts: dict[str, np.ndarray], clustered_knn: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    a, b = layouts["a"], layouts["b"]
    assert a.shape == (160, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, layouts["other_seed"])
    np.testing.assert_allclose(a.min(axis=0), -1.0)
    np.testing.assert_allclose(a.max(axis=0), 1.0)
    # the four planted clusters stay together: most exact neighbours remain map neighbours
    _, idx, _ = clustered_knn
    assert neighbourhood_preservation(idx, a, 10) > 0.5


def test_umap_tiny_input(layouts: dict[str, np.ndarray]) -> None:
    t = layouts["tiny"]
    assert t.shape == (6, 2) and np.isfinite(t).all()
    with pytest.raises(ValueError, match="at least 4 points"):
        umap_layout(np.zeros((3, 2), np.int32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="columns"):
        umap_layout(np.zeros((50, 3), np.int32), np.zeros((50, 3), np.float32), n_neighbors=15)


# ------------------------------------------------------------------------ neighbourhood preservation


def test_neighbourhood_preservation_trivial_and_random() -> None:
    rng = np.random.default_rng(31)
    theta = np.sort(rng.uniform(0, 2 * np.pi, 300))
    P = np.stack([np.cos(theta), np.sin(theta)], axis=1).astype(np.float32)
    idx, _ = knn_cosine(P, 8, progress=False)
    # on the unit circle, cosine order == Euclidean order, so the points are their own layout
    assert neighbourhood_preservation(idx, P, 8) == 1.0
    assert neighbourhood_preservation(idx, rng.uniform(size=(300, 2)), 8) < 0.15
    with pytest.raises(ValueError):
        neighbourhood_preservation(idx, P, 9)
