"""Aggregation of the harvest shards (two passes, no model): per-feature firing counts by group and
category, activation sums and maxima, top contexts overall, per group and per (group, category),
histograms overall and per group, and quantile samples overall and per group, each selection
order-independent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from precompute.pipeline.shards import Shard, ShardRef


def _stable_key(seed: int, feature: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random keys for (feature, context), independent of processing order."""
    x = (
        (feature.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        ^ (context.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
        ^ np.uint64(seed * 0x165667B19E3779F9 + 1)
    )
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    return x


def _pair_max(
    shard: Shard, feature_key: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max activation per (feature, context) pair in one shard; with `feature_key` (one key per
    entry, e.g. feature x group) per (key, context) pair instead."""
    if len(shard.feature) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    ctx = shard.context_id[shard.row_of_entry()].astype(np.int64)
    feat = shard.feature.astype(np.int64) if feature_key is None else feature_key
    order = np.lexsort((ctx, feat))
    feat, ctx, val = feat[order], ctx[order], shard.value[order]
    starts = np.flatnonzero(np.r_[True, (feat[1:] != feat[:-1]) | (ctx[1:] != ctx[:-1])])
    return feat[starts], ctx[starts], np.maximum.reduceat(val, starts)


def _merge_topk(
    best_val: np.ndarray, best_ctx: np.ndarray, feat: np.ndarray, ctx: np.ndarray, val: np.ndarray
) -> None:
    """Merge candidate (feature, context, value) into per-feature top-k arrays in place.

    Order: value descending, then context id ascending (deterministic ties)."""
    k = best_val.shape[1]
    touched = np.unique(feat)
    if len(touched) == 0:
        return
    cand_f = np.concatenate([np.repeat(touched, k), feat])
    cand_v = np.concatenate([best_val[touched].ravel(), val])
    cand_c = np.concatenate([best_ctx[touched].ravel(), ctx])
    valid = cand_c >= 0
    cand_f, cand_v, cand_c = cand_f[valid], cand_v[valid], cand_c[valid]
    order = np.lexsort((cand_c, -cand_v, cand_f))
    cand_f, cand_v, cand_c = cand_f[order], cand_v[order], cand_c[order]
    starts = np.searchsorted(cand_f, touched)
    rank = np.arange(len(cand_f)) - np.repeat(starts, np.diff(np.r_[starts, len(cand_f)]))
    keep = rank < k
    best_val[touched] = -np.inf
    best_ctx[touched] = -1
    best_val[cand_f[keep], rank[keep]] = cand_v[keep]
    best_ctx[cand_f[keep], rank[keep]] = cand_c[keep]


@dataclass
class AggregateParams:
    top_k: int = 20
    quantile_bins: int = 5
    per_bin: int = 2
    hist_bins: int = 40
    seed: int = 0
    top_k_group: int = 0  # top contexts per (feature, group), ranked on the group's tokens only
    per_bin_group: int = 0  # quantile samples per (feature, group, interval), on the group's tokens only
    top_k_category: int = 0  # top contexts per (feature, (group, category)), ranked on that category's tokens
    category_groups: tuple[str, ...] = ()  # the groups whose categories get those tops


# the values of `aggregate`'s result that hold one row per feature (the others describe the corpus)
PER_FEATURE = (
    "fires", "fires_group", "fires_cat", "act_sum", "act_max", "top_val", "top_ctx", "hist", "hist_group",
    "gtop_val", "gtop_ctx", "ctop_val", "ctop_ctx", "q_ctx", "q_val", "gq_ctx", "gq_val",
)  # fmt: skip


def feature_ranges(n_features: int, parts: int) -> list[tuple[int, int]]:
    """`n_features` split into `parts` contiguous ranges [lo, hi) whose sizes differ by at most one."""
    bounds = [n_features * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def restrict_to_features(shard: Shard, lo: int, hi: int) -> Shard:
    """The shard's entries of features lo..hi-1, renumbered from 0; every token row is kept."""
    keep = (shard.feature >= lo) & (shard.feature < hi)
    counts = np.bincount(shard.row_of_entry()[keep], minlength=shard.n_rows)
    indptr = np.zeros(shard.n_rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    feature = (shard.feature[keep] - lo).astype(shard.feature.dtype)
    return replace(shard, indptr=indptr, feature=feature, value=shard.value[keep])


def join_feature_ranges(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`aggregate`'s results over consecutive feature ranges, in order, as one result over their union:
    each per-feature array is concatenated, the corpus values (the same in every part) taken once."""
    joined = dict(parts[0])
    for key in PER_FEATURE:
        joined[key] = np.concatenate([p[key] for p in parts])
    return joined


def aggregate(
    shard_paths: Sequence[ShardRef],
    n_features: int,
    doc_group: np.ndarray,
    doc_category: np.ndarray,
    params: AggregateParams,
    progress: bool = True,
    feature_range: tuple[int, int] | None = None,
) -> dict:
    """Per-feature statistics and example selections from the shards (two passes, no model). With
    `feature_range` (lo, hi), those of features lo..hi-1 only, in rows 0..hi-lo-1: every feature's
    statistics are computed from its own entries alone, in the same order, so the ranges of a split,
    joined (`join_feature_ranges`), equal the whole (the ranks of a torchrun harvest split it so)."""
    lo, hi = feature_range if feature_range is not None else (0, n_features)
    if not 0 <= lo <= hi <= n_features:
        raise ValueError(f"feature range {lo}..{hi} is not inside 0..{n_features}")
    n_features = hi - lo
    groups = sorted(set(doc_group.tolist()))
    group_index = {g: i for i, g in enumerate(groups)}
    doc_gidx = np.array([group_index[g] for g in doc_group], dtype=np.int64)
    cats = sorted(
        {(g, c) for g, c in zip(doc_group.tolist(), doc_category.tolist(), strict=True)},
        key=lambda x: (x[0], str(x[1])),
    )
    cat_index = {gc: i for i, gc in enumerate(cats)}
    doc_cidx = np.array(
        [cat_index[(g, c)] for g, c in zip(doc_group.tolist(), doc_category.tolist(), strict=True)],
        dtype=np.int64,
    )

    fires = np.zeros(n_features, np.int64)
    fires_group = np.zeros((n_features, len(groups)), np.int64)
    fires_cat = np.zeros((n_features, len(cats)), np.int64)
    tokens_group = np.zeros(len(groups), np.int64)
    tokens_cat = np.zeros(len(cats), np.int64)
    act_sum = np.zeros(n_features, np.float64)
    act_max = np.zeros(n_features, np.float32)
    top_val = np.full((n_features, params.top_k), -np.inf, np.float32)
    top_ctx = np.full((n_features, params.top_k), -1, np.int64)
    n_groups, kg = len(groups), params.top_k_group
    # per (feature, group): row f * n_groups + g; a packed context can hold several groups' documents
    gtop_val = np.full((n_features * n_groups, kg), -np.inf, np.float32)
    gtop_ctx = np.full((n_features * n_groups, kg), -1, np.int64)
    # per (feature, (group, category)) of the category groups: row f * n_ctop + c, as the group tops; the
    # other documents share one extra slot, dropped at the end
    ctop_cats = [gc for gc in cats if gc[0] in params.category_groups and gc[1]]
    doc_ctop = np.array([{gc: i for i, gc in enumerate(ctop_cats)}.get(gc, len(ctop_cats)) for gc in cats])[
        doc_cidx
    ]
    n_ctop, kc = len(ctop_cats) + 1, params.top_k_category if ctop_cats else 0
    ctop_val = np.full((n_features * n_ctop, kc), -np.inf, np.float32)
    ctop_ctx = np.full((n_features * n_ctop, kc), -1, np.int64)
    total_tokens = 0

    def load(path: ShardRef) -> Shard:
        shard = Shard.load(path)
        return shard if feature_range is None else restrict_to_features(shard, lo, hi)

    for path in tqdm(shard_paths, desc="aggregate 1/2", disable=not progress):
        shard = load(path)
        total_tokens += shard.n_rows
        row_doc = shard.doc_id.astype(np.int64)
        tokens_group += np.bincount(doc_gidx[row_doc], minlength=len(groups))
        tokens_cat += np.bincount(doc_cidx[row_doc], minlength=len(cats))
        rows = shard.row_of_entry()
        feat = shard.feature.astype(np.int64)
        fires += np.bincount(feat, minlength=n_features)
        np.add.at(fires_group, (feat, doc_gidx[row_doc[rows]]), 1)
        np.add.at(fires_cat, (feat, doc_cidx[row_doc[rows]]), 1)
        act_sum += np.bincount(feat, weights=shard.value.astype(np.float64), minlength=n_features)
        np.maximum.at(act_max, feat, shard.value)
        pf, pc, pv = _pair_max(shard)
        _merge_topk(top_val, top_ctx, pf, pc, pv)
        if kg:
            gf, gc, gv = _pair_max(shard, feat * n_groups + doc_gidx[row_doc[rows]])
            _merge_topk(gtop_val, gtop_ctx, gf, gc, gv)
        if kc:
            cf, cc, cv = _pair_max(shard, feat * n_ctop + doc_ctop[row_doc[rows]])
            _merge_topk(ctop_val, ctop_ctx, cf, cc, cv)

    # Pass 2: histograms (bins need the max) and quantile samples by activation interval.
    hist = np.zeros((n_features, params.hist_bins), np.int64)
    # the same bins split by the group of each token's document (int32: a bin counts tokens of one shard set)
    hist_group = np.zeros((n_features, n_groups, params.hist_bins), np.int32)
    qb, per_bin = params.quantile_bins, params.per_bin
    q_key = np.full((n_features, qb, per_bin), np.iinfo(np.uint64).max, np.uint64)
    q_ctx = np.full((n_features, qb, per_bin), -1, np.int64)
    q_val = np.zeros((n_features, qb, per_bin), np.float32)
    # the same per (feature, group) row f * n_groups + g, ranked on the group's tokens only
    kq = params.per_bin_group
    gq_key = np.full((n_features * n_groups, qb, kq), np.iinfo(np.uint64).max, np.uint64)
    gq_ctx = np.full((n_features * n_groups, qb, kq), -1, np.int64)
    gq_val = np.zeros((n_features * n_groups, qb, kq), np.float32)
    safe_max = np.where(act_max > 0, act_max, 1.0)
    for path in tqdm(shard_paths, desc="aggregate 2/2", disable=not progress):
        shard = load(path)
        feat = shard.feature.astype(np.int64)
        b = np.minimum(
            (shard.value / safe_max[feat] * params.hist_bins).astype(np.int64), params.hist_bins - 1
        )
        np.add.at(hist, (feat, b), 1)
        entry_group = doc_gidx[shard.doc_id.astype(np.int64)[shard.row_of_entry()]]
        np.add.at(hist_group, (feat, entry_group, b), 1)
        pf, pc, pv = _pair_max(shard)
        if len(pf) == 0:
            continue
        qbin = np.minimum((pv / safe_max[pf] * qb).astype(np.int64), qb - 1)
        _merge_bottom_keys(q_key, q_ctx, q_val, pf, qbin, _stable_key(params.seed, pf + lo, pc), pc, pv)
        if kq:
            gf, gc, gv = _pair_max(shard, feat * n_groups + entry_group)
            gbin = np.minimum((gv / safe_max[gf // n_groups] * qb).astype(np.int64), qb - 1)
            key = _stable_key(params.seed, gf // n_groups + lo, gc)
            _merge_bottom_keys(gq_key, gq_ctx, gq_val, gf, gbin, key, gc, gv)

    return {
        "groups": groups,
        "categories": cats,
        "total_tokens": total_tokens,
        "fires": fires,
        "fires_group": fires_group,
        "fires_cat": fires_cat,
        "tokens_group": tokens_group,
        "tokens_cat": tokens_cat,
        "act_sum": act_sum,
        "act_max": act_max,
        "top_val": top_val,
        "top_ctx": top_ctx,
        "hist": hist,
        "hist_group": hist_group,
        "gtop_val": gtop_val.reshape(n_features, n_groups, kg),
        "gtop_ctx": gtop_ctx.reshape(n_features, n_groups, kg),
        "ctop_categories": ctop_cats,
        "ctop_val": ctop_val.reshape(n_features, n_ctop, kc)[:, :-1],
        "ctop_ctx": ctop_ctx.reshape(n_features, n_ctop, kc)[:, :-1],
        "q_ctx": q_ctx,
        "q_val": q_val,
        "gq_ctx": gq_ctx.reshape(n_features, n_groups, qb, kq),
        "gq_val": gq_val.reshape(n_features, n_groups, qb, kq),
    }


def _merge_bottom_keys(
    q_key: np.ndarray,
    q_ctx: np.ndarray,
    q_val: np.ndarray,
    row: np.ndarray,
    qbin: np.ndarray,
    key: np.ndarray,
    ctx: np.ndarray,
    val: np.ndarray,
) -> None:
    """Merge candidates (row, interval, key, context, value) into the samples `q_*` [rows, intervals,
    k] in place, keeping per (row, interval) the k smallest (key, context): a uniform sample that does
    not depend on the order of the shards. Only the rows with a candidate are re-sorted."""
    qb, k = q_key.shape[1], q_key.shape[2]
    touched = np.unique(row)
    slot_r = np.concatenate([np.repeat(touched, qb * k), row])
    slot_b = np.concatenate([np.tile(np.repeat(np.arange(qb), k), len(touched)), qbin])
    slot_k = np.concatenate([q_key[touched].ravel(), key])
    slot_c = np.concatenate([q_ctx[touched].ravel(), ctx])
    slot_v = np.concatenate([q_val[touched].ravel(), val])
    order = np.lexsort((slot_c, slot_k, slot_b, slot_r))
    slot_r, slot_b, slot_k, slot_c, slot_v = (a[order] for a in (slot_r, slot_b, slot_k, slot_c, slot_v))
    cell = slot_r * qb + slot_b
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
    rank = np.arange(len(cell)) - np.repeat(starts, np.diff(np.r_[starts, len(cell)]))
    keep = rank < k
    q_key[slot_r[keep], slot_b[keep], rank[keep]] = slot_k[keep]
    q_ctx[slot_r[keep], slot_b[keep], rank[keep]] = slot_c[keep]
    q_val[slot_r[keep], slot_b[keep], rank[keep]] = slot_v[keep]
