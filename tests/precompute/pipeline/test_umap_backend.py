"""Which UMAP backend draws the map (cuML or umap-learn), what is recorded about it, and that the
umap-learn map is exactly umap-learn's own fit of our exact graph.

cuML cannot run on the machines these tests run on (no GPU, no cuML wheel): what is tested is the
choice and the refusal without it; bench/gpu_bench.py times the cuML path where it is installed.
"""

from __future__ import annotations

import warnings
from importlib.metadata import version

import numpy as np
import pytest

from precompute.errors import ConfigError
from precompute.pipeline import layout
from precompute.pipeline.knn import knn_cosine
from precompute.pipeline.layout import cuml_unavailable, resolve_umap_backend, umap_layout

WHY_NO_CUML = cuml_unavailable()
without_cuml = pytest.mark.skipif(WHY_NO_CUML is None, reason="cuML runs here: the fallback is not visible")


@pytest.fixture(scope="module")
def graph() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((5, 12))
    X = (np.repeat(centres, 40, axis=0) + 0.3 * rng.standard_normal((200, 12))).astype(np.float32)
    return knn_cosine(X, 12, progress=False)


def test_choices_that_never_need_cuml() -> None:
    assert resolve_umap_backend("umap-learn") == "umap-learn"
    assert resolve_umap_backend("auto", device="cpu") == "umap-learn"  # a CPU-pinned run stays on the CPU
    with pytest.raises(ValueError, match="umap backend"):
        resolve_umap_backend("torchdr")


@without_cuml
def test_auto_falls_back_and_an_explicit_cuml_is_refused(graph: tuple[np.ndarray, np.ndarray]) -> None:
    assert isinstance(WHY_NO_CUML, str) and WHY_NO_CUML
    assert resolve_umap_backend("auto") == "umap-learn"
    assert resolve_umap_backend("auto", device="cuda") == "umap-learn"
    with pytest.raises(ConfigError) as refused:
        resolve_umap_backend("cuml")
    message = str(refused.value)
    assert "\n" not in message and WHY_NO_CUML in message
    assert "pip install cuml-cu12" in message and "--umap-backend umap-learn" in message
    with pytest.raises(ConfigError, match="cuml"):
        umap_layout(*graph, n_neighbors=10, backend="cuml", progress=False)


def test_umap_learn_map_is_its_own_fit_of_our_graph(graph: tuple[np.ndarray, np.ndarray]) -> None:
    """The backend plumbing and the once-per-process warm-up leave umap-learn's map as it was: bit for
    bit the fit of umap-learn called directly on the graph built by hand (self first, 1 - cos)."""
    import umap
    from threadpoolctl import threadpool_limits

    idx, cos = graph
    info: dict[str, object] = {}
    got = umap_layout(idx, cos, n_neighbors=10, seed=5, progress=False, backend="umap-learn", info=info)
    n = idx.shape[0]
    knn_i = np.hstack([np.arange(n)[:, None], idx[:, :9]]).astype(np.int64)
    knn_d = np.hstack([np.zeros((n, 1)), 1.0 - cos[:, :9].astype(np.float32)]).astype(np.float32)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(
            n_neighbors=10,
            metric="cosine",
            min_dist=0.1,
            random_state=5,
            precomputed_knn=(knn_i, knn_d, None),
        )
        ref = np.asarray(reducer.fit_transform(np.ones((n, 1), np.float32)), np.float64)
    lo, hi = ref.min(axis=0), ref.max(axis=0)
    np.testing.assert_array_equal(got, (2.0 * (ref - lo) / (hi - lo) - 1.0).astype(np.float32))

    assert info["umap_backend"] == "umap-learn" and info["umap_version"] == version("umap-learn")
    assert isinstance(info["umap_fit_s"], float) and info["umap_fit_s"] > 0
    assert isinstance(info["umap_compile_s"], float) and info["umap_compile_s"] >= 0
    # warm once per process: a second map pays no compilation, and records that it paid none
    again: dict[str, object] = {}
    np.testing.assert_array_equal(
        umap_layout(idx, cos, n_neighbors=10, seed=5, progress=False, info=again), got
    )
    assert again["umap_compile_s"] == 0.0 and layout.warm_up("umap-learn") == 0.0
    assert layout._WARM["umap-learn"] > 0
