"""The harvest step: stream the corpus through model and SAE, then write what the explorer reads of
it (firing rates, histograms, examples) and the sparse activation shards later steps rerun from.

Contexts and documents travel with the cache, so no later step needs the corpus again. The shards
are written to a work directory first (`RunContext.work_dir`): a run killed midway resumes after its
last finished shard when the same command is rerun.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from precompute.cache import StagedCache
from precompute.data.corpus import Document
from precompute.data.plan import CorpusPlan
from precompute.data.split import document_hash
from precompute.data.taxonomy import unify
from precompute.model.hooks import resolve_hook
from precompute.pipeline.aggregate import AggregateParams, aggregate
from precompute.pipeline.checkpoint import (
    aggregate_from_state,
    aggregate_state,
    key_of,
    resume_or_run,
)
from precompute.pipeline.config import RunConfig
from precompute.pipeline.context import RunContext, log
from precompute.pipeline.distributed import World
from precompute.pipeline.features import merge_feature_columns
from precompute.pipeline.scores import harvested_documents, score_windows, windows_key
from precompute.pipeline.shard_source import RECOMPUTE, recomputed_shards, shard_computer
from precompute.pipeline.shards import (
    ExampleActivations,
    Shard,
    ShardRef,
    context_feature_activations,
    harvest_shards,
    list_shards,
)
from precompute.pipeline.windows import plan_windows
from precompute.schema import CATEGORY_RATES, CONTEXTS, DOCUMENTS, EXAMPLES, HARVEST_DIR, HISTOGRAMS, TABLES

# The options that shape the harvest, recorded in params/harvest.json.
PARAMS = (
    "context_size",
    "packing",
    "max_tokens",
    "batch_size",
    "batches_per_shard",
    "shard_values",
    "shard_compression",
    "shard_storage",
    "outlier_norm_factor",
    "top_k_examples",
    "top_k_per_group",
    "quantile_bins",
    "per_bin",
    "per_bin_group",
    "top_k_per_category",
    "category_top_groups",
    "hist_bins",
    "seed",
    "device",
)
EXAMPLE_COLUMNS = tuple(c.name for c in TABLES[EXAMPLES].columns)  # the contract's order
# (feature, kind "top"/"quantile"/"group_top"/"group_quantile"/"category_top", rank, context id, quantile of the
#  interval or None, the group a group_* or category_top example was ranked within or None, and the category a
#  category_top example was ranked within or None)
Selection = tuple[int, str, int, int, float | None, str | None, str | None]
GROUP_TOP = "group_top"
GROUP_QUANTILE = "group_quantile"
CATEGORY_TOP = "category_top"


def write_shards(ctx: RunContext, world: World = World()) -> dict[str, Any]:
    """Phase 1: the activation shards of this run (the ones `world` owns) into ctx.work_dir, resuming."""
    return harvest_shards(shard_computer(ctx), ctx.work_dir, progress=ctx.cfg.progress, world=world)


def _shards(ctx: RunContext) -> tuple[list[ShardRef], dict[str, Any]]:
    """The run's shards and the harvest's timings: written to the work directory (resuming), or, with
    `shard_storage = "recompute"`, none written (each read runs the model again: shard_source)."""
    prepare_work_dir(ctx.work_dir, ctx.fingerprint)  # a bounded-disk run keeps its checkpoints there
    if ctx.cfg.shard_storage == RECOMPUTE:
        source = recomputed_shards(ctx)
        return list(source.refs()), {"shard_storage": RECOMPUTE, "shards": source.computer.n_shards}
    timings = write_shards(ctx)
    return list(list_shards(ctx.work_dir)), timings


def run(ctx: RunContext, staged: StagedCache) -> None:
    start = time.perf_counter()
    cfg, lm, sae, plan = ctx.cfg, ctx.model, ctx.sae, ctx.plan
    hook = resolve_hook(lm.model, ctx.hook)
    shards, timings = _shards(ctx)
    n = sae.d_sae

    lengths = write_contexts(staged, plan)
    docs = write_documents(staged, plan)
    doc_group, doc_category = document_labels(plan)
    ap = aggregate_params(cfg)
    # a bounded-disk run checkpoints what its two aggregation passes found (per-feature state), so a rerun
    # after a kill goes on from there
    checkpoints = ctx.work_dir if cfg.shard_storage == RECOMPUTE else None
    key = aggregate_key(ap, n)
    if ctx.aggregated is not None and ctx.aggregated[0] == key:
        agg = ctx.aggregated[1]
        log("aggregation: the torchrun ranks' feature ranges, joined")
    else:
        agg = resume_or_run(
            checkpoints,
            "aggregate",
            key,
            lambda: aggregate(shards, n, doc_group, doc_category, ap, progress=cfg.progress),
            aggregate_state,
            aggregate_from_state,
        )
    write_rates(staged, agg, n, cfg.hist_bins)
    selections, requests = select_examples(agg, n, cfg.quantile_bins)
    selections += select_group_examples(agg, requests)
    selections += select_category_examples(agg, requests)
    context_lengths = {c: int(lengths[c]) for c in requests}
    # not checkpointed: a rerun would still pay a pass for the token rows the windows are chosen from,
    # so the fused pass costs it nothing more
    acts = (
        context_feature_activations(shards, requests, n, context_lengths, progress=cfg.progress)
        if checkpoints is None
        else _examples_and_windows(ctx, docs, shards, requests, context_lengths)
    )
    write_examples(staged, plan, selections, acts, doc_group, doc_category, lm.tokenizer)

    # move the shards into the cache: scores and overlaps rerun from them without the model. An earlier
    # harvest's shards go first: shard_storage is not part of the cache's identity, so a rerun in the
    # other mode would otherwise leave them beside a cache that says it keeps none.
    for stale in list_shards(staged.dir / HARVEST_DIR):
        stale.unlink()
    for shard in shards:
        if isinstance(shard, Path):
            shutil.copyfile(shard, staged.path(f"{HARVEST_DIR}/{shard.name}"))
    timings.update(total_tokens=int(max(1, agg["total_tokens"])), seconds=time.perf_counter() - start)
    if ctx.rank_timings is not None and len(ctx.rank_timings) > 1:
        timings["ranks"] = ctx.rank_timings  # rank 0's own pass above found every shard written
    params = _params(cfg)
    params["fingerprint"] = ctx.fingerprint
    params["hook"] = hook.describe()
    staged.record_step("harvest", params, time.perf_counter() - start, {"timings": timings})


def _examples_and_windows(
    ctx: RunContext,
    docs: pd.DataFrame,
    shards: list[ShardRef],
    requests: dict[int, list[int]],
    context_lengths: dict[int, int],
) -> dict[tuple[int, int], np.ndarray]:
    """A bounded-disk harvest's examples pass, which also computes the scores' window maxima: one model
    pass instead of two. The windows come from the token rows the first pass kept (no model) and the
    documents the harvest wrote; the scores step takes the result only under the same key."""
    cfg = ctx.cfg
    doc_group = harvested_documents(docs)[0]
    plan = plan_windows(shards, doc_group, score_windows(cfg), cfg.shared_token_fraction, cfg.seed)
    examples = ExampleActivations(requests, ctx.sae.d_sae, context_lengths)
    window_max = plan.accumulator()
    for i, ref in enumerate(tqdm(shards, desc="examples + window max", disable=not cfg.progress)):
        shard = Shard.load(ref)
        examples.add(shard)
        window_max.add(i, shard, ref)
    ctx.windowed_ahead = (windows_key(doc_group, cfg), plan.finish(window_max.result()))
    return examples.out


def aggregate_params(cfg: RunConfig) -> AggregateParams:
    return AggregateParams(
        top_k=cfg.top_k_examples,
        quantile_bins=cfg.quantile_bins,
        per_bin=cfg.per_bin,
        hist_bins=cfg.hist_bins,
        seed=cfg.seed,
        top_k_group=cfg.top_k_per_group,
        per_bin_group=cfg.per_bin_group,
        top_k_category=cfg.top_k_per_category,
        category_groups=cfg.category_groups(),
    )


def aggregate_key(params: AggregateParams, n_features: int) -> str:
    """What an aggregation's result depends on besides the harvest (whose fingerprint names the work folder)."""
    return key_of(params.__dict__, n_features)


def document_labels(plan: CorpusPlan) -> tuple[np.ndarray, np.ndarray]:
    """Each document's group and category (unified for harmful documents, "" for none): the columns of
    documents.parquet the aggregation splits by."""
    groups = np.array([d.group for d in plan.documents], dtype=object)
    categories = np.array(["" if pd.isna(c) else c for c in _categories(plan)], dtype=object)
    return groups, categories


def _categories(plan: CorpusPlan) -> list[str | None]:
    return [unify(d.category) if d.group == "harmful" else d.category for d in plan.documents]


def _params(cfg: RunConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in PARAMS}


def prepare_work_dir(work_dir: Path, fingerprint: str) -> None:
    """Keep the finished shards of this same run (to resume); clear those of any other run."""
    run_file = work_dir / "run.json"
    if work_dir.exists():
        previous = json.loads(run_file.read_text()) if run_file.is_file() else {}
        if previous.get("fingerprint") != fingerprint:
            log(f"{work_dir} holds shards of a different run; starting clean")
            shutil.rmtree(work_dir)
        elif list_shards(work_dir):
            log(f"resuming from {len(list_shards(work_dir))} finished shards in {work_dir}")
    work_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"fingerprint": fingerprint}))


def write_contexts(staged: StagedCache, plan: CorpusPlan) -> np.ndarray:
    """harvest/contexts.npz: every context's tokens and documents (CSR by `offsets`); returns the lengths."""
    lengths = np.array([len(c.token_ids) for c in plan.contexts], np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.savez(
        staged.path(CONTEXTS),
        offsets=offsets,
        token_ids=np.concatenate([np.asarray(c.token_ids, np.int32) for c in plan.contexts]),
        doc_ids=np.concatenate([np.asarray(c.doc_ids, np.int32) for c in plan.contexts]),
        source=np.array([c.source for c in plan.contexts], np.int32),
    )
    return lengths


def write_documents(staged: StagedCache, plan: CorpusPlan) -> pd.DataFrame:
    """documents.parquet: one row per document read, with the tokens of it the harvest counted. A harmful
    document's category is its unified harm category (`precompute.data.taxonomy`), the label its
    dataset gave is `category_source`; `validation` marks documents held out of the harm fit."""
    doc_tokens = np.zeros(len(plan.documents), np.int64)
    for c in plan.contexts:
        np.add.at(doc_tokens, np.asarray(c.doc_ids), 1)
    docs = pd.DataFrame(
        {
            "doc_id": [d.doc_id for d in plan.documents],
            "source": [d.source for d in plan.documents],
            "source_path": [plan.sources[d.source].path for d in plan.documents],
            "group": [d.group for d in plan.documents],
            "category": _categories(plan),
            "category_source": [d.category for d in plan.documents],
            "validation": [bool(plan.sources[d.source].validation) for d in plan.documents],
            "record_index": [d.index for d in plan.documents],
            "n_tokens": doc_tokens,
            "text_preview": [d.preview(300) for d in plan.documents],
            "doc_sha256": [document_hash(d) for d in plan.documents],
            # the whole text, for the documents read: an example links to it (explorer)
            "text": pd.Series(
                [full_text(d) if n > 0 else None for d, n in zip(plan.documents, doc_tokens, strict=True)],
                dtype=object,
            ),
        }
    )
    docs.to_parquet(staged.path(DOCUMENTS), index=False)
    return docs


def full_text(d: Document) -> str:
    """A document's whole text as `Document.preview` shows it, uncut: chat messages as `role: content`
    paragraphs."""
    if d.messages:
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in d.messages)
    return d.text or ""


def write_rates(staged: StagedCache, agg: dict[str, Any], n: int, hist_bins: int) -> None:
    """Firing rates and activation sizes (features.parquet), rates per category (category_rates.parquet)
    and activation histograms (histograms.npz)."""
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
    pd.concat(rows, ignore_index=True).to_parquet(staged.path(CATEGORY_RATES), index=False)
    np.savez(
        staged.path(HISTOGRAMS),
        counts=agg["hist"],
        bins=np.int64(hist_bins),
        max_activation=agg["act_max"],
        # the same bins split by the group of each token's document; sums over groups to `counts`
        counts_group=agg["hist_group"],
        groups=np.array(agg["groups"], dtype=str),
    )


def select_examples(
    agg: dict[str, Any], n: int, quantile_bins: int
) -> tuple[list[Selection], dict[int, list[int]]]:
    """Each feature's examples: its top-k contexts, then its quantile samples not already among them.

    Returns the selections and, per context, the features whose activations over it are needed."""
    requests: dict[int, list[int]] = {}
    selections: list[Selection] = []
    top_ctx = agg["top_ctx"]
    for f in range(n):
        seen = set()
        for r, c in enumerate(top_ctx[f].tolist()):
            if c < 0:
                break
            selections.append((f, "top", r, c, None, None, None))
            requests.setdefault(c, []).append(f)
            seen.add(c)
        rank = 0
        for b in range(quantile_bins):
            for c in agg["q_ctx"][f, b].tolist():
                if c < 0 or c in seen:
                    continue
                seen.add(c)
                selections.append((f, "quantile", rank, c, b / quantile_bins, None, None))
                requests.setdefault(c, []).append(f)
                rank += 1
    return selections, requests


def select_group_examples(agg: dict[str, Any], requests: dict[int, list[int]]) -> list[Selection]:
    """Each feature's top contexts within each group (`aggregate`'s `gtop_ctx`), ranked on that
    group's tokens only, so a feature's evidence on harmful documents is kept even when its global
    top is all code. Kept even when the context is also a global top example: each kind is complete
    on its own. Adds the needed (context, feature) activations to `requests`."""
    out: list[Selection] = []
    gtop = agg.get("gtop_ctx")
    if gtop is None:
        return out
    touched = set()
    for f, gi, r in zip(*np.nonzero(gtop >= 0), strict=True):
        c = int(gtop[f, gi, r])
        out.append((int(f), GROUP_TOP, int(r), c, None, agg["groups"][gi], None))
        requests.setdefault(c, []).append(int(f))
        touched.add(c)
    out += _group_quantile_selections(agg, gtop, requests, touched)
    for c in touched:  # a context may be a feature's global and group top: read it once
        requests[c] = list(dict.fromkeys(requests[c]))
    return out


def select_category_examples(agg: dict[str, Any], requests: dict[int, list[int]]) -> list[Selection]:
    """Each feature's top contexts within each (group, category) of documents (`aggregate`'s `ctop_ctx`),
    ranked on that category's tokens only, so a reviewer filtering to e.g. harmful · cybercrime sees the
    feature's exact top there, not only what the group's top happens to hold. Documents without a
    category, and groups outside `category_top_groups`, have none (their group's top is theirs). Adds
    the needed activations to `requests`."""
    ctop = agg.get("ctop_ctx")
    if ctop is None or ctop.shape[2] == 0:
        return []
    out: list[Selection] = []
    touched = set()
    for f, ci, r in zip(*np.nonzero(ctop >= 0), strict=True):
        group, category = agg["ctop_categories"][ci]
        c = int(ctop[f, ci, r])
        out.append((int(f), CATEGORY_TOP, int(r), c, None, group, str(category)))
        requests.setdefault(c, []).append(int(f))
        touched.add(c)
    for c in touched:  # a context may hold a feature's global, group and category tops: read it once
        requests[c] = list(dict.fromkeys(requests[c]))
    return out


def _group_quantile_selections(
    agg: dict[str, Any], gtop: np.ndarray, requests: dict[int, list[int]], touched: set[int]
) -> list[Selection]:
    """Each feature's quantile samples within each group (`aggregate`'s `gq_ctx`), in interval order,
    leaving out the contexts that are already that group's top examples (as `select_examples` does
    for the global ones)."""
    gq = agg.get("gq_ctx")
    if gq is None or gq.shape[3] == 0:
        return []
    out: list[Selection] = []
    n, n_groups, qb, _ = gq.shape
    for f, gi in zip(*np.nonzero((gq >= 0).any(axis=(2, 3))), strict=True):
        seen = set(gtop[f, gi][gtop[f, gi] >= 0].tolist()) if gtop.shape[2] else set()
        rank = 0
        for b in range(qb):
            for c in gq[f, gi, b].tolist():
                if c < 0 or c in seen:
                    continue
                seen.add(c)
                out.append((int(f), GROUP_QUANTILE, rank, c, b / qb, agg["groups"][gi], None))
                requests.setdefault(c, []).append(int(f))
                touched.add(c)
                rank += 1
    return out


def _decode_tokens(tokenizer: Any, ids: np.ndarray, memo: dict[int, str]) -> list[str]:
    out = []
    for t in ids.tolist():
        if t not in memo:
            memo[t] = tokenizer.decode([t])
        out.append(memo[t])
    return out


def write_examples(
    staged: StagedCache,
    plan: CorpusPlan,
    selections: list[Selection],
    acts: dict[tuple[int, int], np.ndarray],
    doc_group: np.ndarray,
    doc_category: np.ndarray,
    tokenizer: Any,
) -> None:
    """examples.parquet: one row per selection, with this feature's activation on every token."""
    memo: dict[int, str] = {}
    rec: dict[str, list[Any]] = {k: [] for k in EXAMPLE_COLUMNS}
    for f, kind, r, c, q, g, cat in selections:
        context = plan.contexts[c]
        a = acts[(c, f)]
        if g is None:
            pos = int(np.argmax(a))
        else:  # the peak on this group's (category's) documents only (a packed context may mix them)
            docs = np.asarray(context.doc_ids)
            on = doc_group[docs] == g
            if cat is not None:
                on &= doc_category[docs] == cat
            pos = int(np.argmax(np.where(on, a, -np.inf)))
        d = int(context.doc_ids[pos])
        rec["feature"].append(f)
        rec["rank"].append(r)
        rec["kind"].append(kind)
        rec["group"].append(doc_group[d])
        rec["category"].append(doc_category[d] or None)
        rec["doc_id"].append(d)
        rec["context_id"].append(c)
        rec["tokens"].append(_decode_tokens(tokenizer, np.asarray(context.token_ids), memo))
        rec["activations"].append(a.astype(np.float32))
        rec["max_activation"].append(float(a[pos]))
        rec["max_position"].append(pos)
        rec["quantile"].append(q)
    # sorted by feature in small row groups so a reader can fetch one feature without a huge block
    pd.DataFrame(rec).sort_values(["feature", "kind", "group", "rank"], kind="stable", key=None).to_parquet(
        staged.path(EXAMPLES), index=False, row_group_size=8192
    )
