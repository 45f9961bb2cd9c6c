"""The 2-D map of the features: UMAP built from the exact kNN graph, and how well it keeps neighbours."""

from __future__ import annotations

import warnings

import numpy as np

from precompute.pipeline.knn import ArrayLike, unit_rows


def _rescale_unit_box(Y: np.ndarray) -> np.ndarray:
    lo, hi = Y.min(axis=0), Y.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = 2.0 * (Y - lo) / span - 1.0
    out[:, hi <= lo] = 0.0
    return out.astype(np.float32)


def umap_layout(
    indices: np.ndarray,
    cosine: np.ndarray,
    n_neighbors: int = 15,
    seed: int = 0,
    min_dist: float = 0.1,
    progress: bool = True,
    directions: ArrayLike | None = None,
) -> np.ndarray:
    """2-D UMAP map of the features, built from our exact kNN lists, scaled to [-1, 1] per axis.

    Reusing the exact graph (``precomputed_knn`` with self in column 0, distance 1 - cos) avoids
    a second, approximate neighbour search and keeps the map faithful to the neighbour lists the
    explorer shows. ``random_state=seed`` makes it reproducible: umap then runs its numba code on one
    thread, and the BLAS calls of its spectral initialisation (ARPACK via scipy) are pinned to one
    thread here too, so the map does not depend on the machine's core count (tested: the same
    coordinates with 1 and 2 threads; numba compiles for the host CPU, so a different instruction
    set is not covered).
    ``directions`` (optional) only serves to place disconnected graph components relative to each
    other; without it, a placeholder is used and only that placement is arbitrary.

    Tiny inputs: below 4 points a layout is meaningless and raises; otherwise n_neighbors is
    reduced to n-1. The kNN lists must hold at least n_neighbors-1 columns.
    """
    indices = np.asarray(indices)
    cosine = np.asarray(cosine)
    if indices.shape != cosine.shape or indices.ndim != 2:
        raise ValueError(f"indices {indices.shape} and cosine {cosine.shape} must be equal 2-D shapes")
    n = indices.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    nn = min(n_neighbors, n - 1)
    if nn < 2:
        raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}")
    if indices.shape[1] < nn - 1:
        raise ValueError(
            f"kNN lists have {indices.shape[1]} columns but n_neighbors={nn} needs {nn - 1}; "
            "compute more neighbours (knn_cosine k) or lower n_neighbors"
        )
    knn_i = np.empty((n, nn), dtype=np.int64)
    knn_d = np.empty((n, nn), dtype=np.float32)
    knn_i[:, 0] = np.arange(n)
    knn_d[:, 0] = 0.0
    knn_i[:, 1:] = indices[:, : nn - 1]
    knn_d[:, 1:] = np.clip(1.0 - cosine[:, : nn - 1].astype(np.float32), 0.0, 2.0)
    X = unit_rows(directions) if directions is not None else np.ones((n, 1), dtype=np.float32)
    if X.shape[0] != n:
        raise ValueError(f"directions has {X.shape[0]} rows but the kNN lists have {n}")

    import umap  # deferred: importing umap sets up numba, which most callers don't need
    from threadpoolctl import threadpool_limits  # declared in pyproject (it also comes with scikit-learn)

    reducer = umap.UMAP(
        n_neighbors=nn,
        n_components=2,
        metric="cosine",
        min_dist=min_dist,
        random_state=seed,
        precomputed_knn=(knn_i, knn_d, None),
        verbose=progress,
        tqdm_kwds={"disable": not progress},
    )
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # Expected and harmless here: no NNDescent index (we never call transform) and
        # "n_jobs overridden to 1" (the price of reproducibility).
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        Y = reducer.fit_transform(X)
    return _rescale_unit_box(np.asarray(Y, dtype=np.float64))


def neighbourhood_preservation(high_indices: np.ndarray, layout_2d: np.ndarray, k: int) -> float:
    """Mean fraction of each point's exact k cosine neighbours that are among its k nearest in 2-D.

    The honest quality number for a map: 1 means every listed neighbour is also a visual
    neighbour, chance is about k/n. Self is excluded by index in both spaces.
    """
    from sklearn.neighbors import NearestNeighbors

    high = np.asarray(high_indices)
    Y = np.asarray(layout_2d, dtype=np.float64)
    n = high.shape[0]
    if Y.shape[0] != n:
        raise ValueError(f"layout has {Y.shape[0]} rows, kNN lists have {n}")
    if not 1 <= k <= min(high.shape[1], n - 1):
        raise ValueError(f"k must be in [1, {min(high.shape[1], n - 1)}], got {k}")
    m = min(n, k + 1)
    _, nbr = NearestNeighbors(n_neighbors=m).fit(Y).kneighbors(Y)
    ids = np.arange(n)[:, None]
    is_self = nbr == ids
    drop = is_self.copy()
    drop[~is_self.any(1), -1] = True
    low = nbr[~drop].reshape(n, m - 1)[:, :k]
    hi = high[:, :k]
    hits = (low[:, :, None] == hi[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)
