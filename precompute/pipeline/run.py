"""Running the precompute job: every chosen step over one staged cache (`run_precompute`), or one step
on an existing cache (`run_step`). The steps themselves are `precompute.pipeline.steps.STEPS`.

Either way the cache is rewritten atomically: a failed or interrupted run leaves the previous cache
as it was (finished harvest shards are kept beside it, to resume).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from precompute import cache as cache_io
from precompute.data.plan import CorpusPlan
from precompute.data.split import document_hash, sae_training_overlap, split_record
from precompute.errors import CacheError, ConfigError, FeatureGeomError
from precompute.model.hooks import resolve_hook
from precompute.pipeline.checkpoint import has_checkpoints
from precompute.pipeline.config import RunConfig
from precompute.pipeline.context import RunContext, log, required
from precompute.pipeline.distributed import World, barrier, gather_to_main, start, stop, world_from_env
from precompute.pipeline.geometry import check_sizes
from precompute.pipeline.harvest import prepare_work_dir, write_shards
from precompute.pipeline.rank_aggregate import aggregate_my_features
from precompute.pipeline.scores import check_corpus_groups
from precompute.pipeline.shard_source import RECOMPUTE, keeps_no_shards
from precompute.pipeline.shards import list_shards
from precompute.pipeline.steps import CORPUS, MODEL, STEPS, Step
from precompute.provenance import library_versions


def _corpus_manifest(plan: CorpusPlan) -> list[dict]:
    out = []
    for i, src in enumerate(plan.sources):
        st = plan.stats[i]
        out.append(
            {
                "path": src.path,
                "group": src.group,
                "category": src.category or src.category_field,
                "validation": src.validation,
                "sha256": cache_io.sha256_of(src.path),
                "documents": st.documents,
                "tokens": plan.tokens_per_source[i],
                "skipped_non_utf8": st.skipped_non_utf8,
                "skipped_malformed": st.skipped_malformed,
                "skipped_empty": st.skipped_empty,
                "first_malformed": st.first_malformed,
            }
        )
    return out


def _keep_work_only_if_resumable(work: Path) -> None:
    """After a failed or interrupted run: finished shards are kept (a rerun of the same command resumes
    from them, checked by fingerprint) and the user is told; a work dir with nothing to resume goes."""
    if not work.is_dir():
        return
    if list_shards(work):
        log(
            f"kept {len(list_shards(work))} finished harvest shards in {work}: rerun the same command to resume, "
            f"or delete {work} to start clean"
        )
    elif has_checkpoints(work):
        log(
            f"kept the checkpoints of the finished model passes in {work}: rerun the same command to resume, "
            f"or delete {work} to start clean"
        )
    else:
        shutil.rmtree(work, ignore_errors=True)


def _step(name: str) -> Step:
    if name not in STEPS:
        raise FeatureGeomError(f"unknown step {name!r}; steps are {', '.join(STEPS)}")
    return STEPS[name]


# ------------------------------------------------------------------------------ the whole job
def run_precompute(cfg: RunConfig, steps: tuple[str, ...] = tuple(STEPS)) -> Path:
    cfg.require("model", "sae", "hook", "out", step="precompute")
    if not cfg.corpus:
        raise FeatureGeomError("`featuregeom precompute` needs at least one --corpus PATH[:GROUP[:CATEGORY]]")
    for name in steps:
        _step(name)
    if "harvest" in steps:
        cfg.category_groups()  # a misspelt group fails here, before any rank harvests
    out = Path(required(cfg.out, "out"))
    world = world_from_env()
    if world.parallel:
        return _run_parallel(cfg, steps, out, world)
    with cache_io.output_lock(out):  # a second run on this --out is refused before any work
        return _run_precompute_locked(cfg, steps, out)


def _run_parallel(cfg: RunConfig, steps: tuple[str, ...], out: Path, world: World) -> Path:
    """Under torchrun: every rank harvests its shards; rank 0 then runs the job on all of them."""
    if "harvest" not in steps:
        raise ConfigError(
            "under torchrun only the harvest runs in parallel: launch `featuregeom precompute` or "
            "`featuregeom harvest` with torchrun, and the other steps as one process"
        )
    if cfg.shard_storage == RECOMPUTE:
        raise ConfigError(
            "--shard-storage recompute runs in one process (its steps rerun the model over each shard); under "
            "torchrun each rank writes its shards to disk: drop one or the other"
        )
    start(world, cfg.device)
    try:
        # every rank leaves through a last barrier: a rank that tears its process group down while rank 0
        # still works made gloo abort (SIGABRT) in CI
        if not world.main:
            _harvest_my_shards(cfg, steps, out, world)
            barrier(world)
            return out
        with cache_io.output_lock(out):
            ctx = _harvest_my_shards(cfg, steps, out, world)
            written = _run_precompute_locked(cfg, steps, out, ctx)
        barrier(world)
        return written
    finally:
        stop(world)


def _harvest_my_shards(cfg: RunConfig, steps: tuple[str, ...], out: Path, world: World) -> RunContext:
    """Rank 0 checks the output and readies the work directory before any rank writes (a barrier);
    each rank then writes the shards it owns and, once all are written, aggregates its range of features
    over all of them; rank 0 joins the ranges (`ctx.aggregated`) and gathers every rank's timings."""
    if "scores" in steps:
        check_corpus_groups(cfg)
    ctx = RunContext(cfg, out)
    _load_inputs(ctx, steps)
    if world.main:
        cache_io.check_output_dir(out, _identity(ctx), cfg.overwrite)
        prepare_work_dir(ctx.work_dir, ctx.fingerprint)
    barrier(world)
    began = time.perf_counter()
    timings = write_shards(ctx, world)
    timings.update(rank=world.rank, seconds=round(time.perf_counter() - began, 3))
    log(f"rank {world.rank}/{world.size}: {timings['shard_encoding']['shards_written']} shards written")
    barrier(world)  # every shard is written: each rank aggregates its features over all of them
    timings.update(aggregate_my_features(ctx, world))
    # rank 0 records every rank's timings in params/harvest.json (its own second pass writes nothing)
    ctx.rank_timings = gather_to_main(world, timings)
    return ctx


def _identity(ctx: RunContext) -> dict[str, Any]:
    return {
        "model": ctx.model_id,
        "sae": ctx.sae_info["sha256"],
        "hook": ctx.cfg.hook,
        "corpus": ctx.fingerprint,
    }


def _load_inputs(ctx: RunContext, steps: tuple[str, ...]) -> None:
    """Model, SAE and corpus, each checked as soon as it is loaded (before the next is read)."""
    cfg = ctx.cfg
    log(f"loading model {cfg.model}")
    lm = ctx.model
    log(f"model loaded in {lm.load_seconds:.1f}s ({lm.describe()['architecture']}, d_model {lm.d_model})")
    resolve_hook(lm.model, ctx.hook)  # fail fast on a bad hook name, before reading the corpus
    sae = ctx.sae
    log(f"SAE {ctx.sae_info['format']} {ctx.sae_info['architecture']} d_sae {sae.d_sae}")
    if "geometry" in steps:
        check_sizes(cfg, sae.d_sae, sae.d_in)  # before the corpus is read
    plan = ctx.plan
    for i, src in enumerate(plan.sources):  # skipped records: read_source warns, with reasons
        log(
            f"corpus {src.group:8s} {Path(src.path).name}: {plan.stats[i].documents} docs, "
            f"{plan.tokens_per_source[i]} tokens"
        )


def _document_split_manifest(ctx: RunContext) -> dict[str, Any]:
    """Which side of the document split the cache scores, and how many of its scored (harvested)
    documents the SAE was trained on: 0 when the SAE's training report proves none, None when the
    SAE does not say."""
    cfg, plan = ctx.cfg, ctx.plan
    harvested = (
        set(np.unique(np.concatenate([c.doc_ids for c in plan.contexts])).tolist())
        if plan.contexts
        else set()
    )
    scored = [document_hash(d) for d in plan.documents if d.doc_id in harvested]
    record = {**split_record(cfg.document_split, cfg.scoring_fraction)}
    record.update(sae_training_overlap(scored, required(cfg.sae, "sae")))
    seen = record["scored_in_sae_training"]
    if seen:
        log(
            f"warning: {seen} of the {len(scored)} scored documents were in the SAE's training data "
            "(dataset-identity latents can then pass for task or harm features); score the other side "
            "of the split with --document-split scoring"
        )
    return record


def _base_manifest(ctx: RunContext, identity: dict[str, Any]) -> dict[str, Any]:
    """What the manifest says about the run's inputs."""
    return {
        "model": ctx.model.describe(),
        "sae": ctx.sae_info,
        "hook": ctx.cfg.hook,
        "d_in": ctx.sae.d_in,
        "n_features": ctx.sae.d_sae,
        "corpus": _corpus_manifest(ctx.plan),
        "document_split": _document_split_manifest(ctx),
        "identity": identity,
        "config": ctx.cfg.to_dict(),
        "versions": library_versions(),
        "created": cache_io.now_iso(),
    }


def _run_precompute_locked(
    cfg: RunConfig, steps: tuple[str, ...], out: Path, ctx: RunContext | None = None
) -> Path:
    """`ctx`: the inputs already loaded (rank 0 after a parallel harvest)."""
    t0 = time.perf_counter()
    if ctx is None:
        if "scores" in steps:
            check_corpus_groups(cfg)
        ctx = RunContext(cfg, out)
        _load_inputs(ctx, steps)
    identity = _identity(ctx)
    cache_io.check_output_dir(out, identity, cfg.overwrite)
    base = _base_manifest(ctx, identity)
    work = ctx.work_dir
    fresh = cfg.overwrite or not out.exists() or set(steps) == set(STEPS)
    try:
        with cache_io.stage(out, fresh=fresh, base_manifest=base) as staged:
            staged.manifest.update(base)
            for step in STEPS.values():  # in their order, whatever the order asked for
                if step.name in steps:
                    step.run(ctx, staged)
            staged.manifest["timings"]["total"] = round(time.perf_counter() - t0, 3)
            _record_recomputation(ctx, staged)
            staged.commit()
    except BaseException:
        _keep_work_only_if_resumable(work)
        raise
    shutil.rmtree(work, ignore_errors=True)
    log(f"cache written to {out} in {time.perf_counter() - t0:.1f}s")
    return out


def _record_recomputation(ctx: RunContext, staged: cache_io.StagedCache) -> None:
    """For a cache that keeps no shards: how many model passes this run's steps took to recompute them."""
    if ctx.recomputed is not None:
        summary = ctx.recomputed.summary()
        staged.manifest["timings"]["recompute_model_passes"] = summary["model_passes"]
        staged.manifest["timings"]["recompute_s"] = summary["seconds"]
        staged.manifest["timings"]["recompute_mismatched_shards"] = summary["mismatched_shards"]
        log(
            f"shards computed again from the model: {summary['model_passes']} passes, {summary['seconds']:.1f}s"
        )
    elif keeps_no_shards(staged.manifest):  # this run read no shard: no pass
        staged.manifest["timings"]["recompute_model_passes"] = 0.0
        staged.manifest["timings"]["recompute_s"] = 0.0
        staged.manifest["timings"]["recompute_mismatched_shards"] = 0


# ------------------------------------------------------------------------------ one step on a cache
def run_step(step: str, cfg: RunConfig) -> Path:
    """Run one step on an existing cache (a step that reads nothing of it may also start a new one)."""
    spec = _step(step)
    if CORPUS in spec.needs:  # the harvest streams the corpus: it is the whole job's inputs and checks
        return run_precompute(cfg, (step,))
    cfg.require("out", step=step)
    out = Path(required(cfg.out, "out"))
    with cache_io.output_lock(out):
        return _run_step_locked(spec, cfg, out)


def _run_step_locked(step: Step, cfg: RunConfig, out: Path) -> Path:
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    if fresh and not step.starts_cache:
        raise CacheError(
            f"{out} does not exist; build it with `featuregeom precompute` (or `geometry` first)"
        )
    manifest = {} if fresh else cache_io.read_manifest(out)
    # fill missing options from what the cache recorded
    recorded = manifest.get("config", {})
    for key in ("model", "sae", "hook", "sae_format"):
        if getattr(cfg, key) is None and recorded.get(key):
            setattr(cfg, key, recorded[key])
    cfg.require(*step.needs, step=step.name)
    with_model = MODEL in step.needs or (MODEL in step.uses and bool(cfg.model and cfg.sae))
    ctx = RunContext(cfg, out, recorded=manifest, with_model=with_model)
    t0 = time.perf_counter()
    base = {"created": cache_io.now_iso(), "config": cfg.to_dict()} if fresh else None
    with cache_io.stage(out, fresh=fresh, base_manifest=base) as staged:
        step.run(ctx, staged)
        staged.manifest.setdefault("timings", {})
        _record_recomputation(ctx, staged)
        staged.commit()
    log(f"{step.name} done on {out} in {time.perf_counter() - t0:.1f}s")
    return out
