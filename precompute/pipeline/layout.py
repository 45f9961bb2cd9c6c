"""The 2-D map of the features: UMAP built from the exact kNN graph, and how well it keeps neighbours.

Backends (`--umap-backend`): umap-learn on the CPU (the default wherever cuML cannot run) and cuML's
GPU UMAP (`cuml.manifold.UMAP`, from the cuml-cu12 / cuml-cu13 wheels); `auto` takes cuML when it
imports, a CUDA device is visible and the run is not pinned to the CPU. Both get the same exact kNN graph (`_knn_graph`) and the same
rescaling, so a map differs between them only by the optimiser. The cuML path has not been run in
this repository's CI or on its development machine (no GPU there, and no GPU machine was lent when it
was written): bench/gpu_bench.py times it where it is installed. A torch UMAP (torchdr 0.5) was measured
and not added: it cannot take our kNN lists, see bench/README.md "UMAP".
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from precompute.errors import ConfigError
from precompute.pipeline.knn import ArrayLike, unit_rows

UMAP_BACKENDS = ("auto", "umap-learn", "cuml")
# Seconds each backend's one-off set-up (umap-learn: numba compilation) took in this process;
# a backend listed here is warm and never pays it again (one run maps once, tests map many times).
_WARM: dict[str, float] = {}
_WARMUP_POINTS = 64


def _rescale_unit_box(Y: np.ndarray) -> np.ndarray:
    lo, hi = Y.min(axis=0), Y.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = 2.0 * (Y - lo) / span - 1.0
    out[:, hi <= lo] = 0.0
    return out.astype(np.float32)


def cuml_unavailable() -> str | None:
    """Why cuML's UMAP cannot run in this process, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        import cuml  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library the wheel needs failing to load
        return f"cuML does not import ({type(exc).__name__}: {exc})"
    return None


def resolve_umap_backend(requested: str, device: str = "auto") -> str:
    """The backend that will draw the map: 'umap-learn' or 'cuml' (see `UMAP_BACKENDS`).

    'auto' takes cuML when it imports and a CUDA device is visible, unless the run is pinned to the
    CPU (device 'cpu'); an explicit 'cuml' that cannot run is a ConfigError, raised before any work.
    """
    if requested not in UMAP_BACKENDS:
        raise ValueError(f"umap backend must be one of {UMAP_BACKENDS}, got {requested!r}")
    if requested == "umap-learn" or (requested == "auto" and device == "cpu"):
        return "umap-learn"
    why = cuml_unavailable()
    if why is None:
        return "cuml"
    if requested == "auto":
        return "umap-learn"
    raise ConfigError(
        f"--umap-backend cuml cannot run here: {why}. Install cuML for your CUDA on a GPU machine "
        "(pip install cuml-cu12, or cuml-cu13) or use --umap-backend umap-learn"
    )


def backend_version(backend: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    if backend == "cuml":
        import cuml

        return str(cuml.__version__)
    try:
        return version("umap-learn")
    except PackageNotFoundError:  # a source checkout of umap
        return "unknown"


def _knn_graph(
    indices: np.ndarray, cosine: np.ndarray, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Our kNN lists as UMAP's precomputed graph: self in column 0, distance 1 - cos, int64/float32."""
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
    return knn_i, knn_d, nn


def _fit_umap_learn(
    knn_i: np.ndarray, knn_d: np.ndarray, X: np.ndarray, nn: int, min_dist: float, seed: int, progress: bool
) -> np.ndarray:
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
        return np.asarray(reducer.fit_transform(X), dtype=np.float64)


def _fit_cuml(
    knn_i: np.ndarray, knn_d: np.ndarray, X: np.ndarray, nn: int, min_dist: float, seed: int, progress: bool
) -> np.ndarray:
    """cuML's UMAP on the same graph. Not run here (no GPU/cuML on the development machine): the
    arguments follow cuML's documented API (`precomputed_knn=(indices, distances)`, host arrays)."""
    from cuml.manifold import UMAP

    reducer = UMAP(
        n_neighbors=nn,
        n_components=2,
        metric="cosine",  # what the distances are; with precomputed_knn cuML searches nothing
        min_dist=min_dist,
        init="spectral",
        random_state=seed,  # cuML: reproducible runs (at some speed cost)
        precomputed_knn=(knn_i, knn_d),
        verbose=progress,
        output_type="numpy",
    )
    return np.asarray(reducer.fit_transform(X), dtype=np.float64)


_FITS = {"umap-learn": _fit_umap_learn, "cuml": _fit_cuml}


def warm_up(backend: str, d: int = 1) -> float:
    """Pay `backend`'s one-off set-up once per process with a tiny fit through the same code and dtypes
    as the real one; returns the seconds it took (0 when warm). umap-learn: its import and numba
    compilation, 28 s with numba's on-disk cache empty and 6-12 s with it filled (2 cores, load ~3;
    bench/README.md "UMAP"); the tiny fit itself then costs ~0.1 s."""
    if backend in _WARM:
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    W = unit_rows(rng.standard_normal((_WARMUP_POINTS, max(d, 2))).astype(np.float32))
    cos = W @ W.T
    np.fill_diagonal(cos, -np.inf)
    order = np.argsort(-cos, axis=1, kind="stable")[:, :15]
    knn_i, knn_d, nn = _knn_graph(order, np.take_along_axis(cos, order, axis=1), 15)
    X = W if d > 1 else np.ones((_WARMUP_POINTS, 1), dtype=np.float32)
    _FITS[backend](knn_i, knn_d, X, nn, 0.1, 0, False)
    _WARM[backend] = time.perf_counter() - t0
    return _WARM[backend]


def umap_layout(
    indices: np.ndarray,
    cosine: np.ndarray,
    n_neighbors: int = 15,
    seed: int = 0,
    min_dist: float = 0.1,
    progress: bool = True,
    directions: ArrayLike | None = None,
    backend: str = "umap-learn",
    info: dict[str, Any] | None = None,
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

    ``backend``: 'umap-learn', 'cuml' or 'auto' (`resolve_umap_backend`). The first call of a backend
    in a process first runs `warm_up`, so its one-off cost is measured apart from the fit; ``info``
    (optional) receives ``umap_backend`` (the one used), ``umap_version``, ``umap_compile_s`` (that
    warm-up, 0 when the process was already warm) and ``umap_fit_s``.

    Tiny inputs: below 4 points a layout is meaningless and raises; otherwise n_neighbors is
    reduced to n-1. The kNN lists must hold at least n_neighbors-1 columns.
    """
    knn_i, knn_d, nn = _knn_graph(indices, cosine, n_neighbors)
    n = knn_i.shape[0]
    X = unit_rows(directions) if directions is not None else np.ones((n, 1), dtype=np.float32)
    if X.shape[0] != n:
        raise ValueError(f"directions has {X.shape[0]} rows but the kNN lists have {n}")
    used = resolve_umap_backend(backend)
    compile_s = warm_up(used, X.shape[1])
    t0 = time.perf_counter()
    Y = _FITS[used](knn_i, knn_d, X, nn, min_dist, seed, progress)
    if info is not None:
        info.update(
            umap_backend=used,
            umap_version=backend_version(used),
            umap_compile_s=round(compile_s, 3),
            umap_fit_s=round(time.perf_counter() - t0, 3),
        )
    return _rescale_unit_box(Y)


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
