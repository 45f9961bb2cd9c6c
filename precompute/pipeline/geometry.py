"""The geometry step: exact cosine neighbours of the SAE's decoder directions, the null threshold they
are judged against, and the 2-D map (neighbors.npz, features.parquet `umap_x`/`umap_y`).

Needs only the SAE, so it can start a new cache on its own. The computations live in
`precompute.pipeline.knn`, `.null` and `.layout`; this module calls them through its own names.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from precompute.cache import StagedCache
from precompute.errors import FeatureGeomError
from precompute.pipeline.config import RunConfig
from precompute.pipeline.context import RunContext
from precompute.pipeline.features import merge_feature_columns
from precompute.pipeline.knn import knn_cosine
from precompute.pipeline.layout import umap_layout
from precompute.pipeline.null import cosine_z, null_cosine
from precompute.schema import NEIGHBORS


def check_sizes(cfg: RunConfig, n_features: int, d_in: int) -> None:
    """Options whose valid range depends on the SAE's shape, checked before any work."""
    if d_in < 2:
        raise FeatureGeomError(f"the SAE reads a {d_in}-dimensional input: cosine geometry needs d_in >= 2")
    if n_features < 4:
        raise FeatureGeomError(
            f"the SAE has {n_features} feature(s); the neighbour graph and map need at least 4"
        )
    if cfg.neighbors >= n_features:
        raise FeatureGeomError(f"--neighbors {cfg.neighbors} must be below the SAE's {n_features} features")
    if min(cfg.neighbors, cfg.umap_neighbors) < 2:
        raise FeatureGeomError(
            "the map's kNN graph needs at least 2 neighbours per feature: use --neighbors >= 2"
        )


def _check_cache_width(ctx: RunContext, n_features: int) -> None:
    recorded = ctx.recorded.get("n_features")
    if ctx.recorded and recorded not in (None, n_features):
        raise FeatureGeomError(
            f"--sae has {n_features} features but the cache at {ctx.out} was built with {recorded}; "
            "use another --out"
        )


def run(ctx: RunContext, staged: StagedCache) -> None:
    cfg, sae = ctx.cfg, ctx.sae
    check_sizes(cfg, sae.d_sae, sae.d_in)
    _check_cache_width(ctx, sae.d_sae)
    staged.manifest.setdefault("sae", ctx.sae_info)
    start = time.perf_counter()
    directions = sae.unit_directions().cpu()
    n, d = directions.shape
    k = min(cfg.neighbors, n - 1)
    indices, cosine = knn_cosine(
        directions, k=k, device=cfg.device, backend=cfg.knn_backend, progress=cfg.progress
    )
    null = null_cosine(n, d, fpr=cfg.null_fpr)
    z = cosine_z(cosine, d)
    np.savez(
        staged.path(NEIGHBORS),
        indices=indices.astype(np.int32),
        cosine=cosine.astype(np.float32),
        z=np.asarray(z, np.float32),
        null_cosine=np.float64(null),
        fpr=np.float64(cfg.null_fpr),
        d=np.int64(d),
    )
    layout = umap_layout(
        indices,
        cosine,
        n_neighbors=min(cfg.umap_neighbors, k),
        seed=cfg.seed,
        min_dist=cfg.umap_min_dist,
        progress=cfg.progress,
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
        "null_cosine": float(null),
        "knn_backend": cfg.knn_backend,
        "umap_neighbors": cfg.umap_neighbors,
        "umap_min_dist": cfg.umap_min_dist,
        "seed": cfg.seed,
    }
    staged.record_step("geometry", params, time.perf_counter() - start)
