"""The UMAP layout from the exact kNN graph, and neighbourhood preservation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from precompute.pipeline.knn import knn_cosine
from precompute.pipeline.layout import neighbourhood_preservation, umap_layout

BACKENDS = ["torch", "faiss"]


def _random(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _signs(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    """+-1 rows with d a power of 4: unit rows are +-1/sqrt(d) exactly, so every cosine is an
    exact dyadic number in float32 whatever the summation order -> many exact ties."""
    return np.sign(np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32)


# ----------------------------------------------------------------------------------------- UMAP


@pytest.fixture(scope="module")
def clustered_knn() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(21)
    centres = rng.standard_normal((4, 16))
    X = (np.repeat(centres, 40, axis=0) + 0.3 * rng.standard_normal((160, 16))).astype(np.float32)
    idx, cos = knn_cosine(X, 16, progress=False)
    return X, idx, cos


def _map_with_threads(X: np.ndarray, t: int) -> np.ndarray:
    """kNN + UMAP with every thread pool this pipeline touches set to t (restored afterwards)."""
    import faiss
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    before = (torch.get_num_threads(), faiss.omp_get_max_threads(), numba.get_num_threads())
    try:
        torch.set_num_threads(t)
        faiss.omp_set_num_threads(t)
        numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
        with threadpool_limits(limits=t):
            idx, cos = knn_cosine(X, 16, progress=False)
            return umap_layout(idx, cos, n_neighbors=15, seed=0, progress=False)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
        numba.set_num_threads(before[2])


@pytest.fixture(scope="module")
def layouts(clustered_knn: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """All UMAP runs of the module in one place: umap-learn pays ~45-60 s of numba compilation
    per process, so every test shares these few small fits."""
    X, idx, cos = clustered_knn
    tiny_i, tiny_c = knn_cosine(X[::27], 5, progress=False)  # 6 points: n_neighbors 15 -> 5
    # anisotropic rows with a shared mean, as test_knn's: there the old faiss search gave cosines
    # 5e-7 apart with 1 and 2 threads and maps up to 1.9 apart (in the [-1, 1] box)
    rng = np.random.default_rng(7)
    big = (rng.standard_normal((3000, 256)) * np.geomspace(3.0, 0.05, 256) + 0.5).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "a": umap_layout(idx, cos, n_neighbors=10, seed=3, progress=False),
            "b": umap_layout(idx, cos, n_neighbors=10, seed=3, progress=False),
            "other_seed": umap_layout(idx, cos, n_neighbors=10, seed=4, progress=False),
            "tiny": umap_layout(tiny_i, tiny_c, n_neighbors=15, seed=0, progress=False),
            "threads_1": _map_with_threads(big, 1),
            "threads_2": _map_with_threads(big, 2),
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


def test_map_does_not_depend_on_thread_count(layouts: dict[str, np.ndarray]) -> None:
    """kNN and UMAP with 1 and with 2 threads everywhere: the same coordinates bit for bit (the
    cache must not change with the core count of the machine that builds it)."""
    one, two = layouts["threads_1"], layouts["threads_2"]
    assert one.shape == (3000, 2) and np.isfinite(one).all()
    np.testing.assert_array_equal(one, two)


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
