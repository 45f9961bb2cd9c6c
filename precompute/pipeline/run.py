"""The precompute job as steps over one staged cache: harvest → geometry → scores → overlaps.

Each step reads what earlier steps left in the cache, writes its own files plus a
`params/<step>.json` sidecar, and can run alone on an existing cache (latent-scope style).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from precompute import cache as cache_io
from precompute.data.activations import CorpusPlan, plan_corpus
from precompute.errors import CacheError, CorpusError, FeatureGeomError
from precompute.model.loading import HookReader, LoadedModel, load_model, resolve_hook
from precompute.pipeline.config import RunConfig
from precompute.pipeline.shards import (
    AggregateParams,
    HarvestParams,
    aggregate,
    context_feature_activations,
    harvest_shards,
    list_shards,
    plan_fingerprint,
)
from precompute.provenance import library_versions
from precompute.sae.base import SAE


def log(msg: str) -> None:
    print(f"[featuregeom] {msg}", flush=True)


# ------------------------------------------------------------------------------ helpers
def load_sae_checked(cfg: RunConfig, d_model: int | None, model_name: str | None) -> tuple[SAE, dict]:
    from precompute.sae.registry import load_sae_for_model

    assert cfg.sae is not None  # required by the caller
    return load_sae_for_model(cfg.sae, cfg.sae_format, d_model=d_model, model_name=model_name)


def merge_feature_columns(staged: cache_io.StagedCache, n_features: int, columns: pd.DataFrame) -> None:
    """Add/replace columns of features.parquet (created when missing), keyed by `feature`."""
    path = staged.dir / "features.parquet"
    if path.is_file():
        base = pd.read_parquet(path)
        base = base.drop(columns=[c for c in columns.columns if c != "feature" and c in base.columns])
    else:
        base = pd.DataFrame({"feature": np.arange(n_features, dtype=np.int64)})
    merged = base.merge(columns, on="feature", how="left")
    merged.to_parquet(staged.path("features.parquet"), index=False)


def _decode_tokens(tokenizer, ids: np.ndarray, memo: dict[int, str]) -> list[str]:
    out = []
    for t in ids.tolist():
        if t not in memo:
            memo[t] = tokenizer.decode([t])
        out.append(memo[t])
    return out


# ------------------------------------------------------------------------------ harvest
def harvest_step(
    staged: cache_io.StagedCache,
    cfg: RunConfig,
    lm: LoadedModel,
    sae: SAE,
    plan: CorpusPlan,
    work_dir: Path,
    fingerprint: str,
) -> None:
    start = time.perf_counter()
    device = lm.device
    hook = resolve_hook(lm.model, cfg.hook)
    reader = HookReader(lm.model, hook)
    sae.to(device)
    run_file = work_dir / "run.json"
    if work_dir.exists():
        previous = json.loads(run_file.read_text()) if run_file.is_file() else {}
        if previous.get("fingerprint") != fingerprint:
            log(f"{work_dir} holds shards of a different run; starting clean")
            shutil.rmtree(work_dir)
        else:
            log(f"resuming from {len(list_shards(work_dir))} finished shards in {work_dir}")
    work_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"fingerprint": fingerprint}))
    hp = HarvestParams(
        batch_size=cfg.batch_size,
        batches_per_shard=cfg.batches_per_shard,
        outlier_norm_factor=cfg.outlier_norm_factor or None,
    )
    timings = harvest_shards(plan, reader, sae, lm.tokenizer, work_dir, hp, device, progress=cfg.progress)
    shards = list_shards(work_dir)
    n = sae.d_sae

    # contexts and documents travel with the cache so later steps never need the corpus again
    lengths = np.array([len(c.token_ids) for c in plan.contexts], np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.savez(
        staged.path("harvest/contexts.npz"),
        offsets=offsets,
        token_ids=np.concatenate([np.asarray(c.token_ids, np.int32) for c in plan.contexts]),
        doc_ids=np.concatenate([np.asarray(c.doc_ids, np.int32) for c in plan.contexts]),
        source=np.array([c.source for c in plan.contexts], np.int32),
    )
    doc_tokens = np.zeros(len(plan.documents), np.int64)
    for c in plan.contexts:
        np.add.at(doc_tokens, np.asarray(c.doc_ids), 1)
    docs = pd.DataFrame(
        {
            "doc_id": [d.doc_id for d in plan.documents],
            "source": [d.source for d in plan.documents],
            "source_path": [plan.sources[d.source].path for d in plan.documents],
            "group": [d.group for d in plan.documents],
            "category": [d.category for d in plan.documents],
            "record_index": [d.index for d in plan.documents],
            "n_tokens": doc_tokens,
            "text_preview": [d.preview(300) for d in plan.documents],
        }
    )
    docs.to_parquet(staged.path("documents.parquet"), index=False)

    doc_group = docs["group"].to_numpy()
    doc_category = docs["category"].fillna("").to_numpy()
    ap = AggregateParams(
        top_k=cfg.top_k_examples,
        quantile_bins=cfg.quantile_bins,
        per_bin=cfg.per_bin,
        hist_bins=cfg.hist_bins,
        seed=cfg.seed,
    )
    agg = aggregate(shards, n, doc_group, doc_category, ap, progress=cfg.progress)
    counted = max(1, agg["total_tokens"])
    feats = pd.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int64),
            "frequency": agg["fires"] / counted,
            "fires": agg["fires"],
            "max_activation": agg["act_max"].astype(np.float64),
            "mean_activation": np.where(agg["fires"] > 0, agg["act_sum"] / np.maximum(agg["fires"], 1), 0.0),
            "dead": agg["fires"] == 0,
        }
    )
    for gi, g in enumerate(agg["groups"]):
        feats[f"freq_{g}"] = agg["fires_group"][:, gi] / max(1, agg["tokens_group"][gi])
    merge_feature_columns(staged, n, feats)

    rows = []
    for ci, (g, c) in enumerate(agg["categories"]):
        col = agg["fires_cat"][:, ci]
        nz = np.flatnonzero(col)
        rows.append(
            pd.DataFrame(
                {
                    "feature": nz,
                    "group": g,
                    "category": c or None,
                    "frequency": col[nz] / max(1, agg["tokens_cat"][ci]),
                    "tokens": int(agg["tokens_cat"][ci]),
                }
            )
        )
    pd.concat(rows, ignore_index=True).to_parquet(staged.path("category_rates.parquet"), index=False)
    np.savez(
        staged.path("histograms.npz"),
        counts=agg["hist"],
        bins=np.int64(cfg.hist_bins),
        max_activation=agg["act_max"],
    )

    # examples: top-k contexts then quantile samples, with this feature's activation per token
    requests: dict[int, list[int]] = {}
    selections = []  # (feature, kind, rank, context, quantile)
    top_ctx = agg["top_ctx"]
    for f in range(n):
        seen = set()
        for r, c in enumerate(top_ctx[f].tolist()):
            if c < 0:
                break
            selections.append((f, "top", r, c, None))
            requests.setdefault(c, []).append(f)
            seen.add(c)
        rank = 0
        for b in range(cfg.quantile_bins):
            for c in agg["q_ctx"][f, b].tolist():
                if c < 0 or c in seen:
                    continue
                seen.add(c)
                selections.append((f, "quantile", rank, c, b / cfg.quantile_bins))
                requests.setdefault(c, []).append(f)
                rank += 1
    context_lengths = {c: int(lengths[c]) for c in requests}
    acts = context_feature_activations(shards, requests, n, context_lengths, progress=cfg.progress)
    memo: dict[int, str] = {}
    token_ids = {c: plan.contexts[c].token_ids for c in requests}
    doc_ids = {c: plan.contexts[c].doc_ids for c in requests}
    rec: dict[str, list[Any]] = {
        k: []
        for k in (
            "feature",
            "rank",
            "kind",
            "group",
            "category",
            "doc_id",
            "context_id",
            "tokens",
            "activations",
            "max_activation",
            "max_position",
            "quantile",
        )
    }
    for f, kind, r, c, q in selections:
        a = acts[(c, f)]
        pos = int(np.argmax(a))
        d = int(doc_ids[c][pos])
        rec["feature"].append(f)
        rec["rank"].append(r)
        rec["kind"].append(kind)
        rec["group"].append(doc_group[d])
        rec["category"].append(doc_category[d] or None)
        rec["doc_id"].append(d)
        rec["context_id"].append(c)
        rec["tokens"].append(_decode_tokens(lm.tokenizer, np.asarray(token_ids[c]), memo))
        rec["activations"].append(a.astype(np.float32))
        rec["max_activation"].append(float(a[pos]))
        rec["max_position"].append(pos)
        rec["quantile"].append(q)
    # sorted by feature in small row groups so a reader can fetch one feature without a huge block
    pd.DataFrame(rec).sort_values(["feature", "kind", "rank"], kind="stable", key=None).to_parquet(
        staged.path("examples.parquet"), index=False, row_group_size=8192
    )

    # move the shards into the cache: scores and overlaps rerun from them without the model
    for shard in shards:
        dest = staged.path(f"harvest/{shard.name}")
        shutil.copyfile(shard, dest)
    timings.update(total_tokens=int(counted), seconds=time.perf_counter() - start)
    params = {
        k: getattr(cfg, k)
        for k in (
            "context_size",
            "packing",
            "max_tokens",
            "batch_size",
            "batches_per_shard",
            "outlier_norm_factor",
            "top_k_examples",
            "quantile_bins",
            "per_bin",
            "hist_bins",
            "seed",
            "device",
        )
    }
    params["fingerprint"] = fingerprint
    params["hook"] = hook.describe()
    staged.record_step("harvest", params, time.perf_counter() - start, {"timings": timings})


# ------------------------------------------------------------------------------ geometry
def geometry_step(staged: cache_io.StagedCache, cfg: RunConfig, sae: SAE) -> None:
    from precompute.pipeline import geometry

    start = time.perf_counter()
    directions = sae.unit_directions().cpu()
    n, d = directions.shape
    k = min(cfg.neighbors, n - 1)
    indices, cosine = geometry.knn_cosine(
        directions, k=k, device=cfg.device, backend=cfg.knn_backend, progress=cfg.progress
    )
    null = geometry.null_cosine(n, d, fpr=cfg.null_fpr)
    z = geometry.cosine_z(cosine, d)
    np.savez(
        staged.path("neighbors.npz"),
        indices=indices.astype(np.int32),
        cosine=cosine.astype(np.float32),
        z=np.asarray(z, np.float32),
        null_cosine=np.float64(null),
        fpr=np.float64(cfg.null_fpr),
        d=np.int64(d),
    )
    layout = geometry.umap_layout(
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


# ------------------------------------------------------------------------------ scores
def _cache_shards(staged: cache_io.StagedCache) -> list[Path]:
    shards = list_shards(staged.dir / "harvest")
    if not shards:
        raise CacheError(
            f"{staged.target} has no harvest shards; run `featuregeom harvest` (or precompute) first"
        )
    return shards


def scores_step(
    staged: cache_io.StagedCache, cfg: RunConfig, sae: SAE | None, lm: LoadedModel | None
) -> None:
    from precompute.pipeline import scores
    from precompute.pipeline.shards import doc_feature_max

    start = time.perf_counter()
    n = int(staged.manifest.get("n_features") or (sae.d_sae if sae else 0))
    docs_path = staged.dir / "documents.parquet"
    if not docs_path.is_file():
        raise CacheError(f"{staged.target} has no documents.parquet; run `featuregeom harvest` first")
    docs = pd.read_parquet(docs_path)
    doc, feat, val = doc_feature_max(_cache_shards(staged), n, progress=cfg.progress)
    # Only documents that were harvested count: a token budget leaves most of a large source unread,
    # and counting those as "never fires" would pull every AUROC towards 0.5.
    n_docs = int(docs["doc_id"].max()) + 1 if len(docs) else 0
    doc_group = np.full(n_docs, "unharvested", dtype=object)
    doc_category = np.full(n_docs, None, dtype=object)
    read = docs[docs["n_tokens"] > 0]
    doc_group[read["doc_id"].to_numpy()] = read["group"].to_numpy(object)
    doc_category[read["doc_id"].to_numpy()] = read["category"].to_numpy(object)
    table = scores.harm_scores(
        doc,
        feat,
        val,
        n,
        doc_group,
        doc_category,
        harm_threshold=cfg.harm_threshold,
        task_threshold=cfg.task_threshold,
    )
    table.insert(0, "feature", np.arange(n, dtype=np.int64))
    if sae is not None and lm is not None:
        unembed, norm_w = scores.model_unembedding(lm.model)
        promoted, suppressed = scores.logit_lens(
            sae.unit_directions().to(unembed.device), unembed, norm_w, lm.tokenizer
        )
        table["top_promoted"] = promoted
        table["top_suppressed"] = suppressed
    if cfg.neuronpedia:
        labels = scores.import_neuronpedia(cfg.neuronpedia, n)
        table = table.merge(labels, on="feature", how="left")
    else:
        table["label"] = pd.Series([None] * n, dtype=object)
        table["explanation"] = pd.Series([None] * n, dtype=object)
    merge_feature_columns(staged, n, table)
    params = {
        "harm_threshold": cfg.harm_threshold,
        "task_threshold": cfg.task_threshold,
        "neuronpedia": cfg.neuronpedia,
        "logit_lens": lm is not None,
        "documents_scored": read["group"].value_counts().sort_index().to_dict(),
    }
    staged.record_step("scores", params, time.perf_counter() - start)


# ------------------------------------------------------------------------------ overlaps
def overlaps_step(staged: cache_io.StagedCache, cfg: RunConfig) -> None:
    from precompute.pipeline import overlaps

    start = time.perf_counter()
    fpath, npath = staged.dir / "features.parquet", staged.dir / "neighbors.npz"
    if not npath.is_file():
        raise CacheError(f"{staged.target} has no neighbors.npz; run `featuregeom geometry` first")
    features = pd.read_parquet(fpath)
    if "harm_score" not in features.columns:
        raise CacheError(f"{staged.target} has no harm scores; run `featuregeom scores` first")
    with np.load(npath) as z:
        indices, cosine, zs, null = z["indices"], z["cosine"], z["z"], float(z["null_cosine"])
    table = overlaps.find_overlaps(
        features, indices, cosine, zs, null, _cache_shards(staged), n_task=cfg.n_task
    )
    table.to_parquet(staged.path("overlaps.parquet"), index=False)
    staged.record_step(
        "overlaps",
        {"n_task": cfg.n_task, "null_cosine": null},
        time.perf_counter() - start,
        {"pairs": len(table)},
    )


# ------------------------------------------------------------------------------ the whole job
def _corpus_manifest(plan: CorpusPlan) -> list[dict]:
    out = []
    for i, src in enumerate(plan.sources):
        st = plan.stats[i]
        out.append(
            {
                "path": src.path,
                "group": src.group,
                "category": src.category or src.category_field,
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


def work_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".work")


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
    else:
        shutil.rmtree(work, ignore_errors=True)


def model_identity(lm: LoadedModel, spec: str) -> str:
    model_id = lm.sha256 or spec
    if lm.info.get("adapter"):  # a fine-tuned model is another model: its cache must not mix with the base's
        model_id = f"{model_id}+adapter:{lm.info['adapter']['sha256']}"
    return model_id


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


def _check_same_source(kind: str, given: str | None, recorded: str | None, out: Path) -> None:
    if given and recorded and given != recorded:
        raise CacheError(
            f"this --{kind} is not the {kind.upper() if kind == 'sae' else kind} the cache at {out} was built with "
            f"(sha256 {given[:12]}… vs {recorded[:12]}…); one cache never mixes two. Use the cache's own "
            f"--{kind} (see `featuregeom info {out}`), or write to another --out"
        )


def run_precompute(
    cfg: RunConfig, steps: tuple[str, ...] = ("harvest", "geometry", "scores", "overlaps")
) -> Path:
    cfg.require("model", "sae", "hook", "out", step="precompute")
    if not cfg.corpus:
        raise FeatureGeomError("`featuregeom precompute` needs at least one --corpus PATH[:GROUP[:CATEGORY]]")
    out = Path(cfg.out)
    with cache_io.output_lock(out):  # a second run on this --out is refused before any work
        return _run_precompute_locked(cfg, steps, out)


def _run_precompute_locked(cfg: RunConfig, steps: tuple[str, ...], out: Path) -> Path:
    groups = {c.group for c in cfg.corpus}
    if "scores" in steps and not {"harmful", "benign"} <= groups:
        missing = sorted({"harmful", "benign"} - groups)
        raise CorpusError(
            f"harm scores need documents in both the harmful and benign groups; no corpus source has group "
            f"{' or '.join(repr(m) for m in missing)}: add --corpus PATH:{missing[0]}"
        )
    t0 = time.perf_counter()
    log(f"loading model {cfg.model}")
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, adapter=cfg.adapter)
    log(f"model loaded in {lm.load_seconds:.1f}s ({lm.describe()['architecture']}, d_model {lm.d_model})")
    resolve_hook(lm.model, cfg.hook)  # fail fast on a bad hook name, before reading the corpus
    sae, sae_info = load_sae_checked(cfg, lm.d_model, lm.name)
    log(f"SAE {sae_info['format']} {sae_info['architecture']} d_sae {sae.d_sae}")
    if "geometry" in steps:
        check_sizes(cfg, sae.d_sae, sae.d_in)  # before the corpus is read
    plan = plan_corpus(cfg.corpus, lm.tokenizer, cfg.context_size, cfg.packing, cfg.max_tokens, cfg.seed)
    for i, src in enumerate(plan.sources):  # skipped records: read_source warns, with reasons
        log(
            f"corpus {src.group:8s} {Path(src.path).name}: {plan.stats[i].documents} docs, "
            f"{plan.tokens_per_source[i]} tokens"
        )
    model_id = model_identity(lm, cfg.model)
    fingerprint = plan_fingerprint(
        plan,
        {
            "model": model_id,
            "sae": sae_info["sha256"],
            "hook": cfg.hook,
            "batch_size": cfg.batch_size,
            "batches_per_shard": cfg.batches_per_shard,
            "outlier_norm_factor": cfg.outlier_norm_factor,
        },
    )
    identity = {"model": model_id, "sae": sae_info["sha256"], "hook": cfg.hook, "corpus": fingerprint}
    cache_io.check_output_dir(out, identity, cfg.overwrite)
    base = {
        "model": lm.describe(),
        "sae": sae_info,
        "hook": cfg.hook,
        "d_in": sae.d_in,
        "n_features": sae.d_sae,
        "corpus": _corpus_manifest(plan),
        "identity": identity,
        "config": cfg.to_dict(),
        "versions": library_versions(),
        "created": cache_io.now_iso(),
    }
    work = work_dir_for(out)
    fresh = cfg.overwrite or not out.exists() or set(steps) == {"harvest", "geometry", "scores", "overlaps"}
    try:
        with cache_io.stage(out, fresh=fresh, base_manifest=base) as staged:
            staged.manifest.update(base)
            if "harvest" in steps:
                harvest_step(staged, cfg, lm, sae, plan, work, fingerprint)
            if "geometry" in steps:
                geometry_step(staged, cfg, sae)
            if "scores" in steps:
                scores_step(staged, cfg, sae, lm)
            if "overlaps" in steps:
                overlaps_step(staged, cfg)
            staged.manifest["timings"]["total"] = round(time.perf_counter() - t0, 3)
            staged.commit()
    except BaseException:
        _keep_work_only_if_resumable(work)
        raise
    shutil.rmtree(work, ignore_errors=True)
    log(f"cache written to {out} in {time.perf_counter() - t0:.1f}s")
    return out


def run_step(step: str, cfg: RunConfig) -> Path:
    """Run one step on an existing cache (geometry may also start a new one)."""
    cfg.require("out", step=step)
    out = Path(cfg.out)
    with cache_io.output_lock(out):
        return _run_step_locked(step, cfg, out)


def _run_step_locked(step: str, cfg: RunConfig, out: Path) -> Path:
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    if fresh and step != "geometry":
        raise CacheError(
            f"{out} does not exist; build it with `featuregeom precompute` (or `geometry` first)"
        )
    manifest = {} if fresh else cache_io.read_manifest(out)
    # fill missing options from what the cache recorded
    recorded = manifest.get("config", {})
    for key in ("model", "sae", "hook", "sae_format"):
        if getattr(cfg, key) is None and recorded.get(key):
            setattr(cfg, key, recorded[key])
    t0 = time.perf_counter()
    base = {"created": cache_io.now_iso(), "config": cfg.to_dict()} if fresh else None
    with cache_io.stage(out, fresh=fresh, base_manifest=base) as staged:
        if step == "geometry":
            cfg.require("sae", step=step)
            sae, info = load_sae_checked(cfg, None, None)
            check_sizes(cfg, sae.d_sae, sae.d_in)
            _check_same_source("sae", info.get("sha256"), (manifest.get("sae") or {}).get("sha256"), out)
            if not fresh and manifest.get("n_features") not in (None, sae.d_sae):
                raise FeatureGeomError(
                    f"--sae has {sae.d_sae} features but the cache at {out} was built with "
                    f"{manifest['n_features']}; use another --out"
                )
            staged.manifest.setdefault("sae", info)
            geometry_step(staged, cfg, sae)
        elif step == "scores":
            lm = sae = None
            if cfg.model and cfg.sae:
                lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, adapter=cfg.adapter)
                sae, info = load_sae_checked(cfg, lm.d_model, lm.name)
                _check_same_source("sae", info.get("sha256"), (manifest.get("sae") or {}).get("sha256"), out)
                _check_same_source(
                    "model", model_identity(lm, cfg.model), (manifest.get("identity") or {}).get("model"), out
                )
            scores_step(staged, cfg, sae, lm)
        elif step == "overlaps":
            overlaps_step(staged, cfg)
        staged.manifest.setdefault("timings", {})
        staged.commit()
    log(f"{step} done on {out} in {time.perf_counter() - t0:.1f}s")
    return out
