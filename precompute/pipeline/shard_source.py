"""Where the steps read a harvest's activation shards from: the cache's files, or, for a cache built
with `shard_storage = "recompute"` (bounded disk), the model run again over each shard's batches.

Why recompute rather than aggregate while harvesting: a shard depends only on its own batches
(`ShardComputer`), so a shard computed again is the shard the harvest would have written, and every
step's result equals the two-phase run's by construction, with no second implementation of
aggregation, windows, co-activation or examples to keep equal. The cost is model passes: a full run
runs the model over the corpus 3 times (aggregate twice; then the examples and the scores' window
maxima in one pass, harvest._examples_and_windows), 4 when overlaps flags a pair (co-activation); the
counted-token rows of each shard (16 bytes a token, in memory, never on disk) are kept from the first
pass, so choosing the windows runs no model. Disk holds
no per-token file at any time; the aggregation's state is checkpointed (checkpoint.py).

Recomputing is exact because the forward pass is deterministic for the same batch: MKL's kernel choice
is pinned (`MKL_CBWR`, set in precompute/__init__.py) and the run keeps its thread count. On a GPU the
same should hold for the same device and library versions, but some kernels are not deterministic:
every recomputed shard is checked against its first computation's digest, and a difference is warned
about and counted. A step run alone later uses the cache's recorded device and dtype.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from precompute.cache import StagedCache, read_manifest
from precompute.errors import CacheError
from precompute.model.hooks import HookReader, resolve_hook
from precompute.pipeline.config import RunConfig
from precompute.pipeline.context import RunContext, log
from precompute.pipeline.shard_codec import CodecParams, decode, encode
from precompute.pipeline.shards import HarvestParams, ShardComputer, ShardRef, list_shards, shard_name
from precompute.schema import HARVEST_DIR

RECOMPUTE = "recompute"
ROW_ARRAYS = ("context_id", "position", "token_id", "doc_id")


def harvest_params(cfg: RunConfig) -> HarvestParams:
    return HarvestParams(
        batch_size=cfg.batch_size,
        batches_per_shard=cfg.batches_per_shard,
        outlier_norm_factor=cfg.outlier_norm_factor or None,
        codec=CodecParams(cfg.shard_values, cfg.shard_compression),
    )


def shard_computer(ctx: RunContext) -> ShardComputer:
    """The harvest's shards as a function of their index: ctx's model, SAE, plan and options."""
    lm, sae = ctx.model, ctx.sae
    sae.to(lm.device)
    reader = HookReader(lm.model, resolve_hook(lm.model, ctx.hook))
    return ShardComputer.build(ctx.plan, reader, sae, lm.tokenizer, harvest_params(ctx.cfg), lm.device)


class RecomputedShards:
    """Every shard of a harvest, computed again from the model each time a step reads it."""

    def __init__(self, computer: ShardComputer, values: str) -> None:
        self.computer = computer
        self.codec = CodecParams(values, "none")
        self._rows: dict[int, dict[str, np.ndarray]] = {}
        # each shard's digest when first computed: a later pass must give the same bytes, or the steps
        # would combine two slightly different harvests (nondeterministic kernels, e.g. some GPU atomics)
        self._digests: dict[int, str] = {}
        self.mismatched: set[int] = set()
        self.shards_computed = 0
        self.seconds = 0.0

    def refs(self) -> list[RecomputedShard]:
        return [RecomputedShard(self, i) for i in range(self.computer.n_shards)]

    def arrays(self, index: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        if names is not None and set(names) <= set(ROW_ARRAYS) and index in self._rows:
            return {k: self._rows[index][k] for k in names}
        t0 = time.perf_counter()
        # through the codec, uncompressed: the arrays a disk shard gives back (each token's features in
        # id order, values rounded as float16/bfloat16 would be)
        arrays = decode(encode(self.computer.compute(index), self.codec)[0])
        self._check_same(index, arrays)
        self._rows[index] = {k: arrays[k] for k in ROW_ARRAYS}
        self.shards_computed += 1
        self.seconds += time.perf_counter() - t0
        return arrays if names is None else {k: arrays[k] for k in names}

    def _check_same(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        h = hashlib.sha256()
        for key in sorted(arrays):
            h.update(key.encode())
            h.update(np.ascontiguousarray(arrays[key]).tobytes())
        digest = h.hexdigest()
        first = self._digests.setdefault(index, digest)
        if first != digest and index not in self.mismatched:
            if not self.mismatched:
                log(
                    f"warning: {shard_name(index)} computed again differs from its first computation: the model "
                    "is not deterministic here, so this cache may differ from a disk harvest in near-tied values; "
                    "use --shard-storage disk for an exact cache (the manifest counts such shards)"
                )
            self.mismatched.add(index)

    def passes(self) -> float:
        """Model passes over the whole corpus so far (shards computed / shards)."""
        return self.shards_computed / max(1, self.computer.n_shards)

    def summary(self) -> dict[str, Any]:
        return {
            "shards": self.computer.n_shards,
            "shards_computed": self.shards_computed,
            "model_passes": round(self.passes(), 3),
            "seconds": round(self.seconds, 3),
            "mismatched_shards": len(self.mismatched),
        }


class RecomputedShard:
    """One shard of a `RecomputedShards`, as the steps' readers take it (`shards.load_arrays`)."""

    def __init__(self, source: RecomputedShards, index: int) -> None:
        self.source = source
        self.index = index

    @property
    def name(self) -> str:
        return shard_name(self.index)

    def arrays(self, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        return self.source.arrays(self.index, names)

    def __str__(self) -> str:
        return f"{self.name} (computed again from the model)"


def recomputed_shards(ctx: RunContext) -> RecomputedShards:
    """The run's one `RecomputedShards` (made on first use), so the rows kept from one step serve the next."""
    if ctx.recomputed is None:
        ctx.recomputed = RecomputedShards(shard_computer(ctx), ctx.cfg.shard_values)
    return ctx.recomputed


def keeps_no_shards(manifest: dict[str, Any]) -> bool:
    """Whether a cache was harvested with `shard_storage = "recompute"`."""
    return ((manifest.get("params") or {}).get("harvest") or {}).get("shard_storage") == RECOMPUTE


def _harvest_context(ctx: RunContext | None, out: Path, manifest: dict[str, Any]) -> RunContext:
    """A context that computes the shards this cache was harvested with: `ctx` itself when it has the
    corpus (a whole precompute run, or a step given --corpus), else one built from the cache's recorded
    options; either way its harvest fingerprint must be the cache's."""
    harvest = manifest["params"]["harvest"]
    if ctx is not None and ctx.cfg.corpus:
        hctx = ctx
    else:
        # the run's options as recorded (a `precompute` run also records its `steps`, not a RunConfig option)
        config = {
            k: v for k, v in (manifest.get("config") or {}).items() if k in RunConfig.__dataclass_fields__
        }
        if not config.get("corpus"):
            raise CacheError(f"{out} keeps no activation shards and does not record its corpus; rebuild it")
        config.update(out=str(out), overwrite=False, progress=ctx.cfg.progress if ctx else False)
        hctx = RunContext(RunConfig.load(None, config), out, recorded=manifest)
        log(f"{out} keeps no activation shards: running its model again over its recorded corpus")
    if hctx.fingerprint != harvest.get("fingerprint"):
        raise CacheError(
            f"{out} keeps no activation shards (shard_storage = recompute), and the corpus and options given "
            "now do not make the batches it was harvested from; give the same --corpus and harvest options, "
            "or run `featuregeom precompute` again"
        )
    return hctx


class DeferredShards(Sequence[ShardRef]):
    """A cache's recomputed shards, made when a step first reads them: a step that reads none (overlaps
    with nothing flagged) loads no model."""

    def __init__(self, make: Callable[[], list[ShardRef]]) -> None:
        self._make = make
        self._refs: list[ShardRef] | None = None

    def _get(self) -> list[ShardRef]:
        if self._refs is None:
            self._refs = self._make()
        return self._refs

    def __len__(self) -> int:
        return len(self._get())

    @overload
    def __getitem__(self, i: int) -> ShardRef: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[ShardRef]: ...
    def __getitem__(self, i: int | slice) -> ShardRef | Sequence[ShardRef]:
        return self._get()[i]

    def __iter__(self) -> Iterator[ShardRef]:
        return iter(self._get())


def _shard_refs(
    cache_dir: Path, target: Path, manifest: dict[str, Any], ctx: RunContext | None
) -> Sequence[ShardRef]:
    files = list_shards(cache_dir / HARVEST_DIR)
    if files:
        return files
    if not keeps_no_shards(manifest):
        raise CacheError(f"{target} has no harvest shards; run `featuregeom harvest` (or precompute) first")

    def make() -> list[ShardRef]:
        source = recomputed_shards(_harvest_context(ctx, target, manifest))
        if ctx is not None:
            ctx.recomputed = source  # the run records its passes, and its next step reuses the rows
        return list(source.refs())

    return DeferredShards(make)


def cache_shard_refs(staged: StagedCache, ctx: RunContext | None = None) -> Sequence[ShardRef]:
    """The shards a cache's steps read: its files, or, for a cache that keeps none, the model's (made
    when first read)."""
    return _shard_refs(staged.dir, staged.target, staged.manifest, ctx)


def stored_shard_refs(out: Path) -> list[ShardRef]:
    """`cache_shard_refs` for a command that reads a finished cache outside the pipeline (explain); a
    cache that keeps none is checked against its corpus here, before any other work."""
    return list(_shard_refs(out, out, read_manifest(out), None))
