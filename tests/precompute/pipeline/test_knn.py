"""Exact kNN against brute force: both backends, blocks, ties, zero rows, clamping, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.pipeline.knn import knn_bruteforce, knn_cosine, unit_rows

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
