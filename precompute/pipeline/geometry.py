"""The geometry step: exact cosine neighbours of the SAE's decoder directions, the nulls they are judged
against (isotropic and the decoder's own covariance; the larger flags) with the distribution of every
feature's nearest-neighbour cosine, and the 2-D map (neighbors.npz, features.parquet `umap_x`/`umap_y`).

Needs only the SAE, so it can start a new cache on its own. The computations live in
`precompute.pipeline.knn`, `.null` and `.layout`; this module calls them through its own names.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from precompute.cache import StagedCache
from precompute.errors import FeatureGeomError
from precompute.pipeline.config import RunConfig
from precompute.pipeline.context import RunContext
from precompute.pipeline.features import merge_feature_columns
from precompute.pipeline.knn import knn_cosine
from precompute.pipeline.layout import resolve_umap_backend, umap_layout
from precompute.pipeline.null import (
    CosineNull,
    calibrated_null,
    cosine_z,
    nn_cosine_quantiles,
    null_isotropic,
)
from precompute.schema import NEIGHBORS

log = logging.getLogger(__name__)

# what other code (lab/synth) calls through this module's names
__all__ = ["check_sizes", "cosine_z", "knn_cosine", "neighbor_arrays", "null_isotropic", "run"]


def check_sizes(cfg: RunConfig, n_features: int, d_in: int) -> None:
    """Options whose valid range depends on the SAE's shape, and the UMAP backend asked for, checked
    before any work (run.py calls this before reading the corpus)."""
    if d_in < 2:
        raise FeatureGeomError(f"the SAE reads a {d_in}-dimensional input: cosine geometry needs d_in >= 2")
    if n_features < 4:
        raise FeatureGeomError(
            f"the SAE has {n_features} feature(s); the neighbour graph and map need at least 4"
        )
    if cfg.neighbors >= n_features:
        raise FeatureGeomError(f"--neighbors {cfg.neighbors} must be below the SAE's {n_features} features")
    if cfg.null_samples * cfg.null_fpr < 10:
        raise FeatureGeomError(
            f"--null-samples {cfg.null_samples} x --null-fpr {cfg.null_fpr:g} leaves fewer than 10 random "
            "directions above the covariance null: its quantile would be noise; draw more samples"
        )
    if min(cfg.neighbors, cfg.umap_neighbors) < 2:
        raise FeatureGeomError(
            "the map's kNN graph needs at least 2 neighbours per feature: use --neighbors >= 2"
        )
    resolve_umap_backend(cfg.umap_backend, cfg.device)  # an explicit cuml that cannot run: ConfigError


def _check_cache_width(ctx: RunContext, n_features: int) -> None:
    recorded = ctx.recorded.get("n_features")
    if ctx.recorded and recorded not in (None, n_features):
        raise FeatureGeomError(
            f"--sae has {n_features} features but the cache at {ctx.out} was built with {recorded}; "
            "use another --out"
        )


def neighbor_arrays(indices: np.ndarray, cosine: np.ndarray, null: CosineNull, d: int) -> dict[str, Any]:
    """The arrays of neighbors.npz (docs/cache.md) from the kNN lists and the nulls.

    `z_isotropic` is each cosine's z against the isotropic law only (`cosine_z`): kept to show how far
    that naive null is exceeded, never used to flag. The calibrated reading of a cosine is its
    percentile among `cosine[:, 0]` (every feature's nearest neighbour), summarised in
    `nn_cosine_quantiles`, and whether it exceeds `null_cosine` (= max of the two nulls, `null_kind`).
    """
    return {
        "indices": indices.astype(np.int32),
        "cosine": cosine.astype(np.float32),
        "z_isotropic": np.asarray(cosine_z(cosine, d), np.float32),
        "null_cosine": np.float64(null.cosine),
        "null_kind": np.array(null.kind),
        "null_isotropic": np.float64(null.isotropic),
        "null_covariance": np.float64(null.covariance),
        "null_samples": np.int64(null.samples),
        "nn_cosine_quantiles": nn_cosine_quantiles(cosine[:, 0]).astype(np.float64),
        "fpr": np.float64(null.fpr),
        "d": np.int64(d),
    }


def run(ctx: RunContext, staged: StagedCache) -> None:
    cfg, sae = ctx.cfg, ctx.sae
    check_sizes(cfg, sae.d_sae, sae.d_in)
    _check_cache_width(ctx, sae.d_sae)
    staged.manifest.setdefault("sae", ctx.sae_info)
    start = time.perf_counter()
    directions = sae.unit_directions().cpu()
    n, d = directions.shape
    k = min(cfg.neighbors, n - 1)
    knn_stats: dict[str, int] = {}
    indices, cosine = knn_cosine(
        directions, k=k, device=cfg.device, backend=cfg.knn_backend, progress=cfg.progress, stats=knn_stats
    )
    if n < 4 * d:
        log.warning(
            "covariance null from %d rows in %d dimensions: with few rows per dimension a handful of "
            "close pairs shapes the covariance, and the null errs high (docs/cache.md neighbors.npz)",
            n,
            d,
        )
    null = calibrated_null(directions, cfg.null_fpr, cfg.null_samples, cfg.seed, cfg.device)
    np.savez(staged.path(NEIGHBORS), **neighbor_arrays(indices, cosine, null, d))
    umap_info: dict[str, Any] = {}
    layout = umap_layout(
        indices,
        cosine,
        n_neighbors=min(cfg.umap_neighbors, k),
        seed=cfg.seed,
        min_dist=cfg.umap_min_dist,
        progress=cfg.progress,
        backend=resolve_umap_backend(cfg.umap_backend, cfg.device),
        info=umap_info,
    )
    merge_feature_columns(
        staged,
        n,
        pd.DataFrame(
            {"feature": np.arange(n, dtype=np.int64), "umap_x": layout[:, 0], "umap_y": layout[:, 1]}
        ),
    )
    staged.manifest["n_features"] = n
    staged.manifest["d_in"] = d
    params = {
        "neighbors": k,
        "null_fpr": cfg.null_fpr,
        "null_cosine": null.cosine,
        "null_kind": null.kind,
        "null_isotropic": null.isotropic,
        "null_covariance": null.covariance,
        "null_samples": null.samples,
        "null_shrinkage": null.shrinkage,
        "knn_backend": cfg.knn_backend,
        "knn_stats": knn_stats or None,  # rows, candidates, fallback_rows (redone over all rows)
        "umap_neighbors": cfg.umap_neighbors,
        "umap_min_dist": cfg.umap_min_dist,
        "umap_backend": cfg.umap_backend,  # as asked; the one used and its version follow
        "umap_backend_used": umap_info["umap_backend"],
        "umap_version": umap_info["umap_version"],
        "seed": cfg.seed,
    }
    # timings, not parameters: the one-off warm-up (numba compilation for umap-learn) apart from the fit
    timings = {key: umap_info[key] for key in ("umap_compile_s", "umap_fit_s")}
    staged.record_step("geometry", params, time.perf_counter() - start, extra={"timings": timings})
