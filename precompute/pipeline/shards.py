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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from scipy import sparse
from tqdm.auto import tqdm

from precompute.atomic import write_atomic
from precompute.data.corpus import Context
from precompute.data.plan import CorpusPlan
from precompute.model.activations import iter_activations
from precompute.model.hooks import HookReader
from precompute.pipeline.distributed import World
from precompute.pipeline.heap import release_free_heap
from precompute.pipeline.shard_codec import CodecParams, CodecStats, decode, encode, is_compact
from precompute.sae.base import SAE

SHARD_GLOB = "shard-*.npz"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


class ComputedShard(Protocol):
    """A shard no file holds: its arrays are computed when read (precompute.pipeline.shard_source)."""

    def arrays(self, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]: ...


# What the steps read shards through: a file, or a shard computed again from the model.
ShardRef = Path | ComputedShard


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


def load_arrays(path: ShardRef, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """A shard's format-1 arrays (all, or `names`), whichever format it is stored in, or computed
    again when no file holds it."""
    if not isinstance(path, (str, Path)):
        return path.arrays(names)
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


@dataclass
class ShardComputer:
    """One shard's format-1 arrays, computed from the model and the SAE. The harvest writes them; a
    cache that keeps no shards (`shard_storage = "recompute"`) calls it again whenever a step reads
    that shard. A shard depends only on its own batches, so computing it alone gives what the harvest
    gave."""

    batches: list[list[Context]]
    reader: HookReader
    sae: SAE
    device: torch.device
    params: HarvestParams
    pad_id: int
    skip_ids: set[int]

    @classmethod
    def build(
        cls,
        plan: CorpusPlan,
        reader: HookReader,
        sae: SAE,
        tokenizer: Any,
        params: HarvestParams,
        device: torch.device,
    ) -> ShardComputer:
        skip_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(plan.batches(params.batch_size), reader, sae, device, params, pad_id, skip_ids)

    @property
    def n_shards(self) -> int:
        return (len(self.batches) + self.params.batches_per_shard - 1) // self.params.batches_per_shard

    def batch_range(self, index: int) -> tuple[int, int]:
        per = self.params.batches_per_shard
        return index * per, min(len(self.batches), (index + 1) * per)

    def tokens(self, index: int) -> int:
        first, last = self.batch_range(index)
        return sum(len(c.token_ids) for b in self.batches[first:last] for c in b)

    @torch.no_grad()
    def compute(
        self, index: int, timings: dict[str, Any] | None = None, on_tokens: Callable[[int], Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Shard `index`'s arrays; `timings` (model_s, sae_s, tokens) is added to, `on_tokens` told
        each batch's token count (a progress bar)."""
        first, last = self.batch_range(index)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("context_id", "position", "token_id", "doc_id")}
        feats: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        stream = iter_activations(
            self.reader,
            self.batches[:last],
            self.pad_id,
            self.skip_ids,
            self.device,
            start_batch=first,
            exclude_first=self.params.exclude_first,
            outlier_norm_factor=self.params.outlier_norm_factor,
        )
        sae = self.sae
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
            n_tokens = sum(len(c.token_ids) for c in batch.contexts)
            if timings is not None:
                timings["model_s"] += t1 - t0
                timings["sae_s"] += time.perf_counter() - t1
                timings["tokens"] += n_tokens
            if on_tokens is not None:
                on_tokens(n_tokens)
        row_counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        indptr = np.zeros(len(row_counts) + 1, dtype=np.int64)
        np.cumsum(row_counts, out=indptr[1:])
        return {
            **{
                k: np.concatenate(v).astype(np.int32) if v else np.zeros(0, np.int32)
                for k, v in parts.items()
            },
            "indptr": indptr,
            "feature": np.concatenate(feats) if feats else np.zeros(0, np.int32),
            "value": np.concatenate(vals) if vals else np.zeros(0, np.float32),
        }


def harvest_shards(
    computer: ShardComputer,
    work_dir: Path,
    progress: bool = True,
    world: World = World(),
) -> dict:
    """Write `computer`'s activation shards into `work_dir`, skipping those already there (a killed run
    resumes). Under torchrun only the shards `world` owns (precompute.pipeline.distributed)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    params = computer.params
    n_shards = computer.n_shards
    todo = [i for i in range(n_shards) if world.owns(i) and not (work_dir / shard_name(i)).is_file()]
    bar = tqdm(
        total=sum(computer.tokens(i) for i in todo),
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
        arrays = computer.compute(shard, timings, bar.update)
        if pending is not None:  # at most one shard in flight: memory stays one shard's worth
            t3 = time.perf_counter()
            written.add(pending.result())
            timings["write_wait_s"] += time.perf_counter() - t3
        pending = writer.submit(_save_shard, work_dir / shard_name(shard), arrays, params.codec)
    if pending is not None:
        written.add(pending.result())
    writer.shutdown()
    bar.close()
    release_free_heap()  # the loop's freed buffers, which glibc would otherwise keep for the whole run
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
    def load(cls, path: ShardRef) -> Shard:
        return cls(**load_arrays(path))

    @property
    def n_rows(self) -> int:
        return len(self.context_id)

    def row_of_entry(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), np.diff(self.indptr))

    def matrix(self, n_features: int) -> sparse.csr_matrix:
        return sparse.csr_matrix((self.value, self.feature, self.indptr), shape=(self.n_rows, n_features))


class ExampleActivations:
    """`context_feature_activations` one shard at a time (so that another consumer can share the pass)."""

    def __init__(
        self, requests: dict[int, list[int]], n_features: int, context_lengths: dict[int, int]
    ) -> None:
        self.requests = requests
        self.n_features = n_features
        self.context_lengths = context_lengths
        self.out: dict[tuple[int, int], np.ndarray] = {}

    def add(self, shard: Shard) -> None:
        present = np.unique(shard.context_id)
        wanted = [c for c in present.tolist() if c in self.requests]
        if not wanted:
            return
        matrix = shard.matrix(self.n_features)
        order = np.argsort(shard.context_id, kind="stable")
        sorted_ctx = shard.context_id[order]
        for c in wanted:
            lo, hi = np.searchsorted(sorted_ctx, c), np.searchsorted(sorted_ctx, c, side="right")
            rows = order[lo:hi]
            feats = self.requests[c]
            block = matrix[rows][:, feats].toarray()
            positions = shard.position[rows]
            for j, f in enumerate(feats):
                dense = np.zeros(self.context_lengths[c], np.float32)
                dense[positions] = block[:, j]
                self.out[(c, f)] = dense


def context_feature_activations(
    shard_paths: Sequence[ShardRef],
    requests: dict[int, list[int]],
    n_features: int,
    context_lengths: dict[int, int],
    progress: bool = True,
) -> dict[tuple[int, int], np.ndarray]:
    """Per-token activations of feature f over context c for every requested (c, [f...]).

    Positions that were not counted (position 0, special tokens) read as 0."""
    acc = ExampleActivations(requests, n_features, context_lengths)
    for path in tqdm(shard_paths, desc="examples", disable=not progress):
        acc.add(Shard.load(path))
    return acc.out


def doc_feature_max(
    shard_paths: Sequence[ShardRef], n_features: int, progress: bool = True
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
