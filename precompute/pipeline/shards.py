"""Harvest: stream the corpus through model + SAE and record sparse per-token feature activations.

Phase 1 (`harvest_shards`) runs the model and writes one shard per checkpoint into a work
directory; a run killed at any moment and restarted continues after its last complete shard and
produces byte-identical shards, because batching is deterministic.
Phase 2 (`aggregate`) reads the shards only (no model): firing rates per group/category, max and
mean activation, histograms, top-k contexts and quantile samples per feature, with memory bounded
by one shard plus per-feature state.

Shard (`harvest/shard-NNNNN.npz`), rows = counted token positions, as `Shard.load` returns it:
  context_id int32 [N], position int32 [N], token_id int32 [N], doc_id int32 [N],
  indptr int64 [N+1], feature int32 [nnz], value float32 [nnz]   (CSR of the SAE activations)
stored compactly (precompute.pipeline.shard_codec, format 2); format-1 shards (those arrays as they
are) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse
from tqdm.auto import tqdm

from precompute.atomic import write_atomic
from precompute.cache import StagedCache
from precompute.data.plan import CorpusPlan
from precompute.errors import CacheError
from precompute.model.activations import iter_activations
from precompute.model.hooks import HookReader
from precompute.pipeline.distributed import World
from precompute.pipeline.shard_codec import CodecParams, CodecStats, decode, encode, is_compact
from precompute.sae.base import SAE
from precompute.schema import HARVEST_DIR

SHARD_GLOB = "shard-*.npz"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def _save_shard(path: Path, arrays: dict[str, Any], codec: CodecParams) -> CodecStats:
    """One shard, encoded (shard_codec), on disk (fsync) before its name appears: a resumed run trusts
    every named shard."""
    encoded, stats = encode(arrays, codec)
    packed: dict[str, Any] = dict(encoded)  # np.savez's **kwargs typing would take a name for allow_pickle

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **packed)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)
    stats.bytes = path.stat().st_size
    return stats


def load_arrays(path: Path, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """A shard's format-1 arrays (all, or `names`), whichever format it is stored in."""
    with np.load(path) as z:
        if is_compact(z.files):
            return decode(z, names)
        return {k: z[k] for k in (names or Shard.__dataclass_fields__)}


@dataclass
class HarvestParams:
    batch_size: int = 16
    batches_per_shard: int = 8
    exclude_first: bool = True
    outlier_norm_factor: float | None = 10.0
    codec: CodecParams = field(default_factory=CodecParams)


def harvest_shards(
    plan: CorpusPlan,
    reader: HookReader,
    sae: SAE,
    tokenizer,
    work_dir: Path,
    params: HarvestParams,
    device: torch.device,
    progress: bool = True,
    world: World = World(),
) -> dict:
    """Write activation shards into `work_dir`, skipping those already there (a killed run resumes).
    Under torchrun only the shards `world` owns (precompute.pipeline.distributed)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    batches = plan.batches(params.batch_size)
    n_shards = (len(batches) + params.batches_per_shard - 1) // params.batches_per_shard
    todo = [i for i in range(n_shards) if world.owns(i) and not (work_dir / shard_name(i)).is_file()]
    skip_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def shard_tokens(i: int) -> int:
        return sum(
            len(c.token_ids)
            for b in batches[i * params.batches_per_shard : (i + 1) * params.batches_per_shard]
            for c in b
        )

    bar = tqdm(
        total=sum(shard_tokens(i) for i in todo),
        unit="tok",
        unit_scale=True,
        desc="harvest" if not world.parallel else f"harvest (rank {world.rank}/{world.size})",
        disable=not progress,
        smoothing=0.1,
    )
    timings: dict[str, Any] = {"model_s": 0.0, "sae_s": 0.0, "tokens": 0, "write_wait_s": 0.0}
    written = CodecStats()
    # encoding + compressing a shard (zlib and numpy release the GIL) overlaps the next shard's forwards
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fg-shard-writer")
    pending: Future[CodecStats] | None = None
    for shard in todo:
        first, last = (
            shard * params.batches_per_shard,
            min(len(batches), (shard + 1) * params.batches_per_shard),
        )
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("context_id", "position", "token_id", "doc_id")}
        feats: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        stream = iter_activations(
            reader,
            batches[:last],
            pad_id,
            skip_ids,
            device,
            start_batch=first,
            exclude_first=params.exclude_first,
            outlier_norm_factor=params.outlier_norm_factor,
        )
        while True:
            t0 = time.perf_counter()
            batch = next(stream, None)
            t1 = time.perf_counter()
            if batch is None:
                break
            idx, val = sae.encode_sparse(batch.acts.to(sae.W_enc.device))
            keep = val > 0
            counts.append(keep.sum(dim=1).cpu().numpy().astype(np.int64))
            # Row-major order of a boolean mask keeps each token's features together (CSR).
            feats.append(idx[keep].to(torch.int32).cpu().numpy())
            vals.append(val[keep].float().cpu().numpy())
            for key in parts:
                parts[key].append(getattr(batch, key))
            t2 = time.perf_counter()
            timings["model_s"] += t1 - t0
            timings["sae_s"] += t2 - t1
            n_tokens = sum(len(c.token_ids) for c in batch.contexts)
            timings["tokens"] += n_tokens
            bar.update(n_tokens)
        row_counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        indptr = np.zeros(len(row_counts) + 1, dtype=np.int64)
        np.cumsum(row_counts, out=indptr[1:])
        if pending is not None:  # at most one shard in flight: memory stays one shard's worth
            t3 = time.perf_counter()
            written.add(pending.result())
            timings["write_wait_s"] += time.perf_counter() - t3
        pending = writer.submit(
            _save_shard,
            work_dir / shard_name(shard),
            {
                **{
                    k: np.concatenate(v).astype(np.int32) if v else np.zeros(0, np.int32)
                    for k, v in parts.items()
                },
                "indptr": indptr,
                "feature": np.concatenate(feats) if feats else np.zeros(0, np.int32),
                "value": np.concatenate(vals) if vals else np.zeros(0, np.float32),
            },
            params.codec,
        )
    if pending is not None:
        written.add(pending.result())
    writer.shutdown()
    bar.close()
    timings["shard_encoding"] = {
        **params.codec.__dict__,
        "shards_written": len(todo),
        "bytes_per_token": written.bytes / written.rows if written.rows else None,
        "max_abs_error": written.max_abs_error,
        "max_rel_error": written.max_rel_error,
    }
    timings["shards"] = n_shards
    timings["shards_found"] = n_shards - len(todo) if not world.parallel else None
    return timings


def list_shards(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob(SHARD_GLOB))


def cache_shards(staged: StagedCache) -> list[Path]:
    """The harvest shards a cache carries; scores and overlaps are computed from them."""
    shards = list_shards(staged.dir / HARVEST_DIR)
    if not shards:
        raise CacheError(
            f"{staged.target} has no harvest shards; run `featuregeom harvest` (or precompute) first"
        )
    return shards


@dataclass
class Shard:
    context_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    doc_id: np.ndarray
    indptr: np.ndarray
    feature: np.ndarray
    value: np.ndarray

    @classmethod
    def load(cls, path: Path) -> Shard:
        return cls(**load_arrays(path))

    @property
    def n_rows(self) -> int:
        return len(self.context_id)

    def row_of_entry(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), np.diff(self.indptr))

    def matrix(self, n_features: int) -> sparse.csr_matrix:
        return sparse.csr_matrix((self.value, self.feature, self.indptr), shape=(self.n_rows, n_features))


# ------------------------------------------------------------------------------ aggregation
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


def aggregate(
    shard_paths: list[Path],
    n_features: int,
    doc_group: np.ndarray,
    doc_category: np.ndarray,
    params: AggregateParams,
    progress: bool = True,
) -> dict:
    """Per-feature statistics and example selections from the shards (two passes, no model)."""
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
    total_tokens = 0

    for path in tqdm(shard_paths, desc="aggregate 1/2", disable=not progress):
        shard = Shard.load(path)
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

    # Pass 2: histograms (bins need the max) and quantile samples by activation interval.
    hist = np.zeros((n_features, params.hist_bins), np.int64)
    # the same bins split by the group of each token's document (int32: a bin counts tokens of one shard set)
    hist_group = np.zeros((n_features, n_groups, params.hist_bins), np.int32)
    qb, per_bin = params.quantile_bins, params.per_bin
    q_key = np.full((n_features, qb, per_bin), np.iinfo(np.uint64).max, np.uint64)
    q_ctx = np.full((n_features, qb, per_bin), -1, np.int64)
    q_val = np.zeros((n_features, qb, per_bin), np.float32)
    safe_max = np.where(act_max > 0, act_max, 1.0)
    for path in tqdm(shard_paths, desc="aggregate 2/2", disable=not progress):
        shard = Shard.load(path)
        feat = shard.feature.astype(np.int64)
        b = np.minimum(
            (shard.value / safe_max[feat] * params.hist_bins).astype(np.int64), params.hist_bins - 1
        )
        np.add.at(hist, (feat, b), 1)
        np.add.at(hist_group, (feat, doc_gidx[shard.doc_id.astype(np.int64)[shard.row_of_entry()]], b), 1)
        pf, pc, pv = _pair_max(shard)
        if len(pf) == 0:
            continue
        qbin = np.minimum((pv / safe_max[pf] * qb).astype(np.int64), qb - 1)
        key = _stable_key(params.seed, pf, pc)
        # Bottom-`per_bin` keys per (feature, bin): a uniform, order-independent sample.
        slot_f = np.concatenate([np.repeat(np.arange(n_features), qb * per_bin), pf])
        slot_b = np.concatenate([np.tile(np.repeat(np.arange(qb), per_bin), n_features), qbin])
        slot_k = np.concatenate([q_key.ravel(), key])
        slot_c = np.concatenate([q_ctx.ravel(), pc])
        slot_v = np.concatenate([q_val.ravel(), pv])
        order = np.lexsort((slot_c, slot_k, slot_b, slot_f))
        slot_f, slot_b, slot_k, slot_c, slot_v = (a[order] for a in (slot_f, slot_b, slot_k, slot_c, slot_v))
        group_id = slot_f * qb + slot_b
        starts = np.flatnonzero(np.r_[True, group_id[1:] != group_id[:-1]])
        rank = np.arange(len(group_id)) - np.repeat(starts, np.diff(np.r_[starts, len(group_id)]))
        keep = rank < per_bin
        q_key[slot_f[keep], slot_b[keep], rank[keep]] = slot_k[keep]
        q_ctx[slot_f[keep], slot_b[keep], rank[keep]] = slot_c[keep]
        q_val[slot_f[keep], slot_b[keep], rank[keep]] = slot_v[keep]

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
        "q_ctx": q_ctx,
        "q_val": q_val,
    }


def context_feature_activations(
    shard_paths: list[Path],
    requests: dict[int, list[int]],
    n_features: int,
    context_lengths: dict[int, int],
    progress: bool = True,
) -> dict[tuple[int, int], np.ndarray]:
    """Per-token activations of feature f over context c for every requested (c, [f...]).

    Positions that were not counted (position 0, special tokens) read as 0."""
    out: dict[tuple[int, int], np.ndarray] = {}
    for path in tqdm(shard_paths, desc="examples", disable=not progress):
        shard = Shard.load(path)
        present = np.unique(shard.context_id)
        wanted = [c for c in present.tolist() if c in requests]
        if not wanted:
            continue
        matrix = shard.matrix(n_features)
        order = np.argsort(shard.context_id, kind="stable")
        sorted_ctx = shard.context_id[order]
        for c in wanted:
            lo, hi = np.searchsorted(sorted_ctx, c), np.searchsorted(sorted_ctx, c, side="right")
            rows = order[lo:hi]
            feats = requests[c]
            block = matrix[rows][:, feats].toarray()
            positions = shard.position[rows]
            for j, f in enumerate(feats):
                dense = np.zeros(context_lengths[c], np.float32)
                dense[positions] = block[:, j]
                out[(c, f)] = dense
    return out


def doc_feature_max(
    shard_paths: list[Path], n_features: int, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse per-document max activation: (doc, feature, value) triples, sorted by (feature, doc)."""
    docs_all, feats_all, vals_all = [], [], []
    for path in tqdm(shard_paths, desc="doc max", disable=not progress):
        shard = Shard.load(path)
        if len(shard.feature) == 0:
            continue
        doc = shard.doc_id[shard.row_of_entry()].astype(np.int64)
        feat = shard.feature.astype(np.int64)
        order = np.lexsort((doc, feat))
        doc, feat, val = doc[order], feat[order], shard.value[order]
        starts = np.flatnonzero(np.r_[True, (feat[1:] != feat[:-1]) | (doc[1:] != doc[:-1])])
        docs_all.append(doc[starts])
        feats_all.append(feat[starts])
        vals_all.append(np.maximum.reduceat(val, starts))
    if not docs_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    doc, feat, val = np.concatenate(docs_all), np.concatenate(feats_all), np.concatenate(vals_all)
    # A document can span shards: reduce again across shards.
    order = np.lexsort((doc, feat))
    doc, feat, val = doc[order], feat[order], val[order]
    starts = np.flatnonzero(np.r_[True, (feat[1:] != feat[:-1]) | (doc[1:] != doc[:-1])])
    return doc[starts], feat[starts], np.maximum.reduceat(val, starts)


def plan_fingerprint(plan: CorpusPlan, extra: dict) -> str:
    """Identity of a harvest run: same fingerprint ⇒ same batches ⇒ shards can be reused."""
    h = hashlib.sha256()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for ctx in plan.contexts:
        h.update(np.asarray(ctx.token_ids, dtype=np.int32).tobytes())
        h.update(np.asarray(ctx.doc_ids, dtype=np.int32).tobytes())
    return h.hexdigest()
