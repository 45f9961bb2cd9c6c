"""Exact kNN against brute force: both backends, blocks, ties, zero rows, clamping, input errors; the
same arrays bit for bit whatever the backend, block size and thread count."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from precompute.pipeline.knn import knn_bruteforce, knn_cosine, unit_rows
from precompute.pipeline.knn_rescore import exact_cosines

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


# ------------------------------------------------------------- reproducibility (exact rescoring)


def _anisotropic(n: int = 3000, d: int = 256, seed: int = 7) -> np.ndarray:
    """Rows with decaying per-axis scales and a shared mean, like a trained decoder (crowded
    cosines), big enough that BLAS and faiss tile the products differently with 1 and 2 threads."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * np.geomspace(3.0, 0.05, d) + 0.5).astype(np.float32)


def _threads(t: int) -> None:
    import faiss

    torch.set_num_threads(t)
    faiss.omp_set_num_threads(t)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    import faiss

    before = (torch.get_num_threads(), faiss.omp_get_max_threads())
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.mark.usefixtures("restore_threads")
def test_raw_faiss_scores_depend_on_threads() -> None:
    """The precondition of the test below: the search itself is not reproducible here, so equal
    outputs there come from the exact rescoring, not from a search that happens to repeat."""
    import faiss

    U = unit_rows(_anisotropic())
    scores = []
    for t in (1, 2):
        _threads(t)
        index = faiss.IndexFlatIP(U.shape[1])
        index.add(U)
        scores.append(index.search(U, 20)[0])
    assert not np.array_equal(scores[0], scores[1])


@pytest.mark.usefixtures("restore_threads")
def test_bit_identical_across_threads_backends_and_blocks() -> None:
    X = _anisotropic()
    ref_i, ref_c = knn_bruteforce(X, 16)
    first: tuple[np.ndarray, np.ndarray] | None = None
    for backend in ("faiss", "torch", "torch-bf16"):
        for t in (1, 2):
            _threads(t)
            for bs in (None, 333):
                stats: dict[str, int] = {}
                got = knn_cosine(
                    X, 16, block_size=bs, backend=backend, device="cpu", progress=False, stats=stats
                )
                what = f"{backend}, {t} thread(s), block {bs}"
                if first is None:
                    first = got
                    np.testing.assert_array_equal(got[0], ref_i)  # the brute-force neighbours
                    np.testing.assert_allclose(got[1], ref_c, rtol=0, atol=1e-7)
                np.testing.assert_array_equal(got[0], first[0], err_msg=what)
                np.testing.assert_array_equal(got[1], first[1], err_msg=what)
                assert stats["rows"] == 3000


@pytest.mark.parametrize("backend", ["faiss", "torch", "torch-bf16"])
def test_twins_beyond_the_margin_follow_the_lower_index_rule(backend: str) -> None:
    """60 copies of one row: more tied candidates than k + margin, so the search's choice among
    them is arbitrary; the fallback must return the lowest-index twins, as brute force does."""
    X = _anisotropic(600, 64, seed=8)
    X[100:160] = X[5]
    stats: dict[str, int] = {}
    idx, cos = knn_cosine(X, 12, backend=backend, device="cpu", progress=False, stats=stats)
    ref_i, ref_c = knn_bruteforce(X, 12)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(cos, ref_c, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(idx[5], np.arange(100, 112))
    np.testing.assert_array_equal(idx[130], [5, *range(100, 111)])
    assert stats["fallback_rows"] >= 61  # every twin's boundary is a tie


def test_margin_zero_falls_back_everywhere_with_the_same_answer() -> None:
    X = _anisotropic(800, 48, seed=9)
    base = knn_cosine(X, 10, backend="faiss", progress=False)
    stats: dict[str, int] = {}
    none = knn_cosine(X, 10, backend="torch", device="cpu", progress=False, margin=0, stats=stats)
    assert stats["fallback_rows"] == 800  # the k-th candidate can never beat itself + eps
    wide = knn_cosine(X, 10, backend="faiss", progress=False, margin=200)
    for got in (none, wide):
        np.testing.assert_array_equal(got[0], base[0])
        np.testing.assert_array_equal(got[1], base[1])
    with pytest.raises(ValueError, match="margin"):
        knn_cosine(X, 10, progress=False, margin=-1)


def test_exact_cosines_do_not_depend_on_the_batch() -> None:
    U = unit_rows(_anisotropic(500, 96, seed=10))
    X = torch.from_numpy(U)
    rng = np.random.default_rng(0)
    rows = np.arange(40, 60)
    cand = rng.integers(0, 500, (20, 30))
    block = exact_cosines(X, rows, cand)
    one_by_one = np.array(
        [[exact_cosines(X, rows[[i]], cand[i : i + 1, [j]])[0, 0] for j in range(30)] for i in range(20)]
    )
    full_rows = exact_cosines(X, rows, np.broadcast_to(np.arange(500), (20, 500)).copy())
    np.testing.assert_array_equal(block, one_by_one)
    np.testing.assert_array_equal(block, np.take_along_axis(full_rows, cand, 1))
    U64 = U.astype(np.float64)
    np.testing.assert_allclose(block, np.einsum("bd,bmd->bm", U64[rows], U64[cand]), rtol=0, atol=1e-15)
    assert exact_cosines(X, rows, cand).dtype == np.float64
