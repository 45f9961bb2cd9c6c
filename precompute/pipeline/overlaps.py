"""The overlaps step: task features whose decoder neighbours (above the cosine null) are harmful features.

The null is neighbors.npz's `null_cosine`, the larger of the isotropic and the decoder-covariance
nulls (`null_kind` names it; precompute.pipeline.null); each pair also gets its cosine's percentile
among every feature's nearest-neighbour cosine, so "above chance" and "closer than usual" are both
on the row.

This is the explorer's headline table (docs/cache.md `overlaps.parquet`). Geometry and
co-activation are kept as separate columns on purpose (docs/science.md section 2e and 4.4): two
features can share a direction without ever firing together, or fire together while orthogonal,
and the table must let a reader tell those apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from precompute.cache import StagedCache
from precompute.pipeline.context import RunContext
from precompute.pipeline.features import scored_features_and_neighbors
from precompute.pipeline.null import cosine_percentile
from precompute.pipeline.shard_source import cache_shard_refs
from precompute.pipeline.shards import Shard, ShardRef
from precompute.schema import OVERLAPS

log = logging.getLogger(__name__)

OVERLAP_COLUMNS = {
    "task_feature": "int64",
    "harmful_feature": "int64",
    "cosine": "float64",
    "cosine_percentile": "float64",
    "cosine_excess": "float64",
    "z_isotropic": "float64",
    "null_cosine": "float64",
    "coactivation": "float64",
    "cond_coactivation": "float64",
    "harm_score": "float64",
    "task_score": "float64",
    "harm_category": "object",
    "neighbor_rank": "int64",
    "risk": "float64",
}


def _binary_columns(shard: Shard, lookup: np.ndarray, n_cols: int) -> sparse.csr_matrix:
    """Rows = the shard's tokens, columns = the features mapped by `lookup` (-1 = dropped), 1 where > 0."""
    col = lookup[shard.feature.astype(np.int64)]
    keep = (col >= 0) & (shard.value > 0)
    rows = shard.row_of_entry()[keep]
    m = sparse.csr_matrix(
        (np.ones(int(keep.sum()), np.int64), (rows, col[keep])), shape=(shard.n_rows, n_cols)
    )
    m.sum_duplicates()
    m.data[:] = 1
    return m


def coactivation(
    shard_paths: Sequence[ShardRef], pairs: np.ndarray, n_features: int
) -> dict[str, np.ndarray]:
    """Token-level co-firing of (task, harmful) feature pairs over the harvest shards.

    A feature "fires" on a token when its SAE activation is > 0. Each shard's CSR matrix is
    reduced to binary columns of only the features involved (task side and harmful side
    separately, so a feature may be on both), and co-firing counts come from one sparse product
    T^T H per shard. Returns arrays [m]: int64 `both`, `task_fires`, `harm_fires`; float64
    `jaccard` = both / (task + harm - both) (0 when neither ever fires) and `cond` =
    P(harmful fires | task fires) = both / task_fires (NaN when the task feature never fires).
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    m = len(pairs)
    if m and (pairs.min() < 0 or pairs.max() >= n_features):
        raise ValueError(f"feature ids in pairs must lie in [0, {n_features})")
    t_feats, t_col = np.unique(pairs[:, 0], return_inverse=True)
    h_feats, h_col = np.unique(pairs[:, 1], return_inverse=True)
    t_lookup = np.full(n_features, -1, np.int64)
    t_lookup[t_feats] = np.arange(len(t_feats))
    h_lookup = np.full(n_features, -1, np.int64)
    h_lookup[h_feats] = np.arange(len(h_feats))

    both = np.zeros(m, np.int64)
    t_count = np.zeros(len(t_feats), np.int64)
    h_count = np.zeros(len(h_feats), np.int64)
    if m:
        for path in shard_paths:
            shard = Shard.load(path)
            if shard.n_rows == 0:
                continue
            T = _binary_columns(shard, t_lookup, len(t_feats))
            H = _binary_columns(shard, h_lookup, len(h_feats))
            t_count += np.asarray(T.sum(axis=0)).ravel()
            h_count += np.asarray(H.sum(axis=0)).ravel()
            C = (T.T.tocsr() @ H).tocsr()
            both += np.asarray(C[t_col, h_col]).ravel().astype(np.int64)
    task_fires, harm_fires = t_count[t_col], h_count[h_col]
    union = task_fires + harm_fires - both
    with np.errstate(invalid="ignore", divide="ignore"):
        jaccard = np.where(union > 0, both / np.maximum(union, 1), 0.0)
        cond = np.where(task_fires > 0, both / np.maximum(task_fires, 1), np.nan)
    return {
        "both": both,
        "task_fires": task_fires,
        "harm_fires": harm_fires,
        "jaccard": jaccard.astype(np.float64),
        "cond": cond.astype(np.float64),
    }


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in OVERLAP_COLUMNS.items()})


def _bool_column(features: pd.DataFrame, name: str) -> np.ndarray:
    col = features[name]
    if col.dtype == bool:
        return col.to_numpy()
    return col.astype("boolean").fillna(False).to_numpy(dtype=bool)


def find_overlaps(
    features: pd.DataFrame,
    indices: np.ndarray,
    cosine: np.ndarray,
    z_isotropic: np.ndarray,
    null_cosine: float,
    shard_paths: Sequence[ShardRef],
    n_task: int = 50,
    min_cosine: float | None = None,
) -> pd.DataFrame:
    """Flag (task feature, harmful neighbour) pairs; columns exactly as docs/cache.md `overlaps.parquet`.

    Task features: the `n_task` features with the highest `task_score` among `is_task` (ties by
    feature id). For each, every entry of its neighbour list (`indices`/`cosine`/`z_isotropic` rows
    from neighbors.npz, all n of them, self excluded, descending cosine) that is `is_harmful`, is not
    the task feature itself, and has cosine > max(null_cosine, min_cosine) is a pair; `null_cosine`
    is the flagging null (neighbors.npz: the larger of the isotropic and covariance nulls). A feature may be
    both a task and a harmful feature: it can then appear on either side of a pair (only the
    self-pair is excluded), because a task feature that is itself harmful next to another
    harmful feature is exactly what the table should surface.

    A feature that is both task and harmful can make the same unordered pair twice ((a, b) from a's
    list and (b, a) from b's): only the row with the higher risk is kept (ties: the smaller task
    feature id), so the table lists each unordered pair once and its `task_feature` says which
    side was the task feature of the kept row.

    `neighbor_rank` is the 0-based position in the task feature's neighbour list.
    `cosine_percentile` is the pair's cosine's percentile among all n features' nearest-neighbour
    cosines (`cosine[:, 0]`; null.cosine_percentile), `cosine_excess` = cosine - null_cosine.
    `coactivation` is the token-level Jaccard index, `cond_coactivation` P(harmful fires | task
    fires) (NaN when no shards are given or the task feature never fires; coactivation is then
    NaN / 0). risk = clip((cos - null)/(1 - null), 0, 1) x clip(2 harm_score - 1, 0, 1) x
    clip(2 task_score - 1, 0, 1). Rows are sorted by risk descending, then (task_feature,
    harmful_feature). No pair gives an empty DataFrame with the same columns and dtypes.
    """
    indices = np.asarray(indices)
    cosine = np.asarray(cosine)
    z = np.asarray(z_isotropic)
    if indices.ndim != 2 or cosine.shape != indices.shape or z.shape != indices.shape:
        raise ValueError(
            f"indices {indices.shape}, cosine {cosine.shape} and z_isotropic {z.shape} must be equal "
            "[n, k] arrays"
        )
    missing = {"feature", "task_score", "is_task", "harm_score", "is_harmful", "harm_category"} - set(
        features.columns
    )
    if missing:
        raise ValueError(f"features table lacks column(s) {sorted(missing)}; run the scores step first")
    n = indices.shape[0]
    feat_ids = features["feature"].to_numpy(dtype=np.int64)
    if len(feat_ids) and (feat_ids.min() < 0 or feat_ids.max() >= n):
        raise ValueError(f"feature ids must lie in [0, {n}) to match the neighbour lists")

    task_score = np.full(n, np.nan)
    harm_score = np.full(n, np.nan)
    is_task = np.zeros(n, bool)
    is_harmful = np.zeros(n, bool)
    harm_category = np.full(n, None, dtype=object)
    task_score[feat_ids] = features["task_score"].to_numpy(dtype=np.float64, na_value=np.nan)
    harm_score[feat_ids] = features["harm_score"].to_numpy(dtype=np.float64, na_value=np.nan)
    is_task[feat_ids] = _bool_column(features, "is_task")
    is_harmful[feat_ids] = _bool_column(features, "is_harmful")
    cats = features["harm_category"].astype(object).to_numpy()
    harm_category[feat_ids] = [
        None if (c is None or c is pd.NA or (isinstance(c, float) and np.isnan(c))) else c for c in cats
    ]

    candidates = np.flatnonzero(is_task & np.isfinite(task_score))
    order = np.lexsort((candidates, -task_score[candidates]))
    tasks = candidates[order][: max(0, int(n_task))]
    threshold = float(null_cosine) if min_cosine is None else max(float(null_cosine), float(min_cosine))

    if tasks.size == 0 or indices.shape[1] == 0:
        return _empty()
    nb = indices[tasks].astype(np.int64)  # [t, k]
    cs = cosine[tasks].astype(np.float64)
    valid = (nb >= 0) & (nb < n)
    nb_safe = np.where(valid, nb, 0)
    keep = valid & (nb_safe != tasks[:, None]) & is_harmful[nb_safe] & (cs > threshold) & np.isfinite(cs)
    ti, rank = np.nonzero(keep)
    if ti.size == 0:
        return _empty()
    task_f = tasks[ti]
    harm_f = nb[ti, rank]
    cos = cs[ti, rank]
    zz = z[tasks][ti, rank].astype(np.float64)

    paths = list(shard_paths)
    if paths:
        co = coactivation(paths, np.stack([task_f, harm_f], axis=1), n)
        jac, cond = co["jaccard"], co["cond"]
    else:
        jac = cond = np.full(len(task_f), np.nan)

    from precompute.excess import scaled_excess_over_null

    null = float(null_cosine)
    excess = scaled_excess_over_null(cos, null)
    hs, ts = harm_score[harm_f], task_score[task_f]
    risk = excess * np.clip(2.0 * hs - 1.0, 0.0, 1.0) * np.clip(2.0 * ts - 1.0, 0.0, 1.0)

    out = pd.DataFrame(
        {
            "task_feature": task_f.astype(np.int64),
            "harmful_feature": harm_f.astype(np.int64),
            "cosine": cos,
            "cosine_percentile": np.asarray(cosine_percentile(cos, cosine[:, 0]), np.float64),
            "cosine_excess": cos - null,
            "z_isotropic": zz,
            "null_cosine": np.full(len(cos), null),
            "coactivation": np.asarray(jac, np.float64),
            "cond_coactivation": np.asarray(cond, np.float64),
            "harm_score": hs,
            "task_score": ts,
            "harm_category": pd.Series(harm_category[harm_f], dtype=object),
            "neighbor_rank": rank.astype(np.int64),
            "risk": risk,
        }
    )
    out = out.sort_values(
        ["risk", "task_feature", "harmful_feature"],
        ascending=[False, True, True],
        kind="mergesort",
        na_position="last",
    ).reset_index(drop=True)
    out = _one_row_per_unordered_pair(out)
    log.info("overlaps: %d task features, %d flagged pairs (cosine > %.4f)", tasks.size, len(out), threshold)
    return out.astype(OVERLAP_COLUMNS)


def _one_row_per_unordered_pair(out: pd.DataFrame) -> pd.DataFrame:
    """Keep the first row of each {task, harmful} pair; `out` is already sorted best first."""
    t = out["task_feature"].to_numpy(dtype=np.int64)
    h = out["harmful_feature"].to_numpy(dtype=np.int64)
    key = pd.DataFrame({"a": np.minimum(t, h), "b": np.maximum(t, h)})
    return out[~key.duplicated(keep="first").to_numpy()].reset_index(drop=True)


def run(ctx: RunContext, staged: StagedCache) -> None:
    start = time.perf_counter()
    features, z = scored_features_and_neighbors(staged)
    indices, cosine, zs = z["indices"], z["cosine"], z["z_isotropic"]
    null, kind = float(z["null_cosine"]), str(z["null_kind"])
    table = find_overlaps(
        features, indices, cosine, zs, null, cache_shard_refs(staged, ctx), n_task=ctx.cfg.n_task
    )
    table.to_parquet(staged.path(OVERLAPS), index=False)
    staged.record_step(
        "overlaps",
        {"n_task": ctx.cfg.n_task, "null_cosine": null, "null_kind": kind},
        time.perf_counter() - start,
        {"pairs": len(table)},
    )
