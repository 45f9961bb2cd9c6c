"""The scores step: how harmful and how task-specific each feature is, what it writes to the logits,
and what Neuronpedia calls it (columns of features.parquet; docs/cache.md `features.parquet`).

Scores are AUROCs (`precompute.pipeline.auroc`) of one value per document: the feature's max over
one window of `score_window` consecutive tokens of the document, template tokens left out
(`precompute.pipeline.windows`), so that neither document length nor the chat template every group
shares can make a score (docs/science.md section 2). An AUROC puts 16k features on one axis with a
natural null of 0.5. The task score contrasts task with control documents (same format, different
content); task vs benign is kept apart as `task_vs_benign` and flags nothing. Hanley-McNeil bounds
collapse to [1, 1] on a handful of documents, which is why every flag also asks the feature to fire
in at least `min_docs` windows of the group it is said to detect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from precompute.cache import StagedCache
from precompute.data.taxonomy import unify
from precompute.errors import CacheError, CorpusError
from precompute.pipeline.config import RunConfig
from precompute.pipeline.context import RunContext
from precompute.pipeline.contrasts import (
    BENIGN,
    CONTROL,
    GENERAL,
    HARMFUL,
    TASK,
    contrast_scores_with_summary,
    task_permutation,
)
from precompute.pipeline.features import merge_feature_columns
from precompute.pipeline.heldout import HeldoutCriterion
from precompute.pipeline.logit_lens import logit_lens_values, model_unembedding
from precompute.pipeline.neuronpedia import import_neuronpedia
from precompute.pipeline.shard_source import cache_shard_refs
from precompute.pipeline.shards import ShardRef
from precompute.pipeline.windows import Windowed, token_texts, windowed_values
from precompute.schema import CONTEXTS, DOCUMENTS, EXAMPLES, FEATURES

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def check_corpus_groups(cfg: RunConfig) -> None:
    """Harm scores compare harmful with benign documents: refuse a corpus without both to fit on, or
    with a held-out (validation) source that is neither harmful nor benign, before any work."""
    for c in cfg.corpus:
        if not isinstance(c.validation, bool):  # a TOML string "false" would otherwise hold a source out
            raise CorpusError(
                f"validation of corpus source {c.path} must be true or false, got {c.validation!r}"
            )
    odd = [c for c in cfg.corpus if c.validation and c.group not in (HARMFUL, BENIGN)]
    if odd:
        raise CorpusError(
            f"validation = true holds a source out of the harm fit to check it, so it needs group harmful or "
            f"benign; {odd[0].path} has group {odd[0].group!r}: remove validation or change the group"
        )
    groups = {c.group for c in cfg.corpus if not c.validation}
    if not {HARMFUL, BENIGN} <= groups:
        missing = sorted({HARMFUL, BENIGN} - groups)
        held = " that is not held out (validation = true)" if any(c.validation for c in cfg.corpus) else ""
        raise CorpusError(
            f"harm scores need documents in both the harmful and benign groups; no corpus source{held} has group "
            f"{' or '.join(repr(m) for m in missing)}: add --corpus PATH:{missing[0]}"
        )


def harvested_documents(docs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Group and category per document id, counting only documents the harvest read.

    A token budget leaves most of a large source unread, and counting those documents as "never
    fires" would pull every AUROC towards 0.5: they get the group "unharvested", which no score
    compares. Harmful documents carry their unified harm category (`precompute.data.taxonomy`); a
    cache harvested before the taxonomy (no `category_source` column) gets it mapped here. Returns
    (doc_group, doc_category, the harvested documents' rows)."""
    n_docs = int(docs["doc_id"].max()) + 1 if len(docs) else 0
    doc_group = np.full(n_docs, "unharvested", dtype=object)
    doc_category = np.full(n_docs, None, dtype=object)
    read = docs[docs["n_tokens"] > 0]
    ids = read["doc_id"].to_numpy()
    doc_group[ids] = read["group"].to_numpy(object)
    category = read["category"].to_numpy(object).copy()
    if "category_source" not in read.columns:
        harmful = read["group"].to_numpy(object) == HARMFUL
        category[harmful] = [unify(c) for c in category[harmful].tolist()]
    doc_category[ids] = category
    return doc_group, doc_category, read


def heldout_documents(docs: pd.DataFrame, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per document id: the category its dataset gave (`category_source`; `category` in a cache
    harvested before the taxonomy) and whether its source is held out of the harm fit (`validation`;
    False in a cache without the column)."""
    source = np.full(n_docs, None, dtype=object)
    held = np.zeros(n_docs, bool)
    ids = docs["doc_id"].to_numpy()
    column = "category_source" if "category_source" in docs.columns else "category"
    source[ids] = [c if isinstance(c, str) else None for c in docs[column].tolist()]
    if "validation" in docs.columns:
        held[ids] = docs["validation"].fillna(False).to_numpy(bool)
    return source, held


# Group of a harvested document with fewer eligible tokens than the score window: no contrast compares it.
SHORT = "short"
RETIRED_COLUMNS = ("task_control_score",)  # written by earlier versions; a rerun removes them
TASK_PERMUTATIONS = 200  # label shuffles of the task vs control contrast (sidecar `task_permutation`)


def windowed_groups(
    doc_group: np.ndarray, windowed: Windowed, groups: Sequence[str], required: Sequence[str] = ()
) -> tuple[np.ndarray, dict[str, int], dict[str, int]]:
    """doc_group with SHORT for harvested documents without a window, and the documents of each of
    `groups` scored and left out. CorpusError when every document of a `required` group is too short."""
    doc_group = np.asarray(doc_group, dtype=object)
    short = (doc_group != "unharvested") & ~windowed.has_window
    scored_group = doc_group.copy()
    scored_group[short] = SHORT
    present = [g for g in groups if np.any(doc_group == g)]
    scored = {g: int(np.sum((doc_group == g) & ~short)) for g in present}
    left_out = {g: int(np.sum((doc_group == g) & short)) for g in present}
    for g in required:
        if left_out.get(g) and not scored.get(g):
            longest = int(windowed.n_eligible[doc_group == g].max())
            raise CorpusError(
                f"no {g} document has {windowed.window} tokens outside the shared template (the longest has "
                f"{longest}); lower --score-window to at most {max(1, longest)} or add longer {g} documents"
            )
    return scored_group, scored, left_out


@dataclass
class WindowedScores:
    """The contrast scores (one row per feature) and how the windows were drawn."""

    table: pd.DataFrame
    score: Windowed  # the score window: harm and task-vs-benign contrasts
    task: Windowed  # the task window: task vs control
    scored: dict[str, int]  # documents compared per group, in the score window
    left_out: dict[str, int]  # documents too short for it
    task_scored: dict[str, int]  # task and control documents in the task window
    task_left_out: dict[str, int]
    permutation: dict[str, Any] | None  # `contrasts.task_permutation`: the task contrast vs shuffled labels
    heldout: dict[str, Any]  # `heldout.heldout_contrast`'s summary: the sidecar's `harm_heldout_check`


def score_windows(cfg: RunConfig) -> tuple[int, int]:
    """The window lengths the scores read: the score window, then the task window."""
    return cfg.score_window, cfg.task_window


def windows_key(doc_group: np.ndarray, cfg: RunConfig) -> str:
    """What windowed values depend on besides the shards: a harvest that computed them ahead for its
    scores step hands them over only under the same key."""
    h = hashlib.sha256(json.dumps([score_windows(cfg), cfg.shared_token_fraction, cfg.seed]).encode())
    h.update("\0".join(map(str, doc_group.tolist())).encode())
    return h.hexdigest()


def windowed_scores(
    shard_paths: Sequence[ShardRef],
    doc_group: np.ndarray,
    doc_category: np.ndarray,
    n_features: int,
    cfg: RunConfig,
    doc_category_source: np.ndarray | None = None,
    doc_heldout: np.ndarray | None = None,
    windowed: list[Windowed] | None = None,
) -> WindowedScores:
    """`contrast_scores` on windowed values: the harm and task-vs-benign contrasts on
    `cfg.score_window`-token windows, task vs control on `cfg.task_window`-token windows; documents
    marked in `doc_heldout` validate the harm fit instead of joining it (cfg.harm_heldout*).
    `windowed`: those values already computed (`windowed_values` of the same inputs)."""
    if windowed is None:
        windowed = windowed_values(
            shard_paths,
            doc_group,
            score_windows(cfg),
            cfg.shared_token_fraction,
            cfg.seed,
            progress=cfg.progress,
        )
    score, task = windowed
    all_groups = (TASK, CONTROL, HARMFUL, BENIGN, GENERAL)
    scored_group, scored, left_out = windowed_groups(doc_group, score, all_groups, required=(HARMFUL, BENIGN))
    task_group, task_scored, task_left_out = windowed_groups(doc_group, task, (TASK, CONTROL))
    table, heldout = contrast_scores_with_summary(
        *score.triples,
        n_features,
        scored_group,
        doc_category,
        harm_threshold=cfg.harm_threshold,
        task_threshold=cfg.task_threshold,
        min_docs=cfg.min_docs,
        task_values=task.triples,
        task_doc_group=task_group,
        doc_category_source=doc_category_source,
        doc_heldout=doc_heldout,
        heldout=HeldoutCriterion(cfg.harm_heldout, cfg.harm_heldout_threshold, cfg.harm_heldout_min_docs),
    )
    permutation = task_permutation(
        *task.triples,
        n_features,
        task_group,
        TASK_PERMUTATIONS,
        cfg.seed,
        task_threshold=cfg.task_threshold,
        min_docs=cfg.min_docs,
    )
    return WindowedScores(
        table, score, task, scored, left_out, task_scored, task_left_out, permutation, heldout
    )


def _eligible_summary(doc_group: np.ndarray, windowed: Windowed) -> dict[str, dict[str, float]]:
    groups = np.asarray(doc_group, dtype=object)
    out = {}
    for g in sorted({str(x) for x in groups.tolist()} - {"unharvested"}):
        n = windowed.n_eligible[groups == g]
        out[g] = {"min": int(n.min()), "median": float(np.median(n)), "max": int(n.max())}
    return out


def _drop_retired_columns(staged: StagedCache) -> None:
    path = staged.dir / FEATURES
    if path.is_file():
        names = pq.read_schema(path).names
        if any(c in names for c in RETIRED_COLUMNS):
            table = pd.read_parquet(path)
            table.drop(columns=[c for c in RETIRED_COLUMNS if c in names]).to_parquet(
                staged.path(FEATURES), index=False
            )


def run(ctx: RunContext, staged: StagedCache) -> None:
    cfg = ctx.cfg
    # the logit lens needs the model and the SAE; a run on a cache may have neither
    sae = ctx.sae if ctx.with_model else None
    start = time.perf_counter()
    n = int(staged.manifest.get("n_features") or (sae.d_sae if sae else 0))
    docs_path = staged.dir / DOCUMENTS
    if not docs_path.is_file():
        raise CacheError(f"{staged.target} has no {DOCUMENTS}; run `featuregeom harvest` first")
    docs = pd.read_parquet(docs_path)
    doc_group, doc_category, _ = harvested_documents(docs)
    doc_category_source, doc_heldout = heldout_documents(docs, len(doc_group))
    ahead = ctx.windowed_ahead  # a bounded-disk harvest's examples pass computed them
    windowed = ahead[1] if ahead is not None and ahead[0] == windows_key(doc_group, cfg) else None
    scores = windowed_scores(
        cache_shard_refs(staged, ctx),
        doc_group,
        doc_category,
        n,
        cfg,
        doc_category_source,
        doc_heldout,
        windowed,
    )
    table = scores.table
    table.insert(0, "feature", np.arange(n, dtype=np.int64))
    if sae is not None:
        lm = ctx.model
        unembed, norm_w = model_unembedding(lm.model)
        lens = logit_lens_values(sae.unit_directions().to(unembed.device), unembed, norm_w, lm.tokenizer)
        table["top_promoted"] = lens.promoted
        table["top_suppressed"] = lens.suppressed
        for col, values in (
            ("top_promoted_values", lens.promoted_values),
            ("top_suppressed_values", lens.suppressed_values),
        ):
            table[col] = pd.Series([np.asarray(v, np.float32) for v in values], dtype=object)
    if cfg.neuronpedia:
        table = table.merge(import_neuronpedia(cfg.neuronpedia, n), on="feature", how="left")
        # "neuronpedia" unless a featuregeom export says it computed the label: the labels step
        # keeps imported labels and recomputes the rest
        table["label_source"] = pd.Series(
            [
                s if isinstance(s, str) and isinstance(lab, str) else None
                for lab, s in zip(table["label"], table["label_source"], strict=True)
            ],
            dtype=object,
        )
    else:
        table["label"] = pd.Series([None] * n, dtype=object)
        table["explanation"] = pd.Series([None] * n, dtype=object)
        table["label_source"] = pd.Series([None] * n, dtype=object)
    _drop_retired_columns(staged)
    merge_feature_columns(staged, n, table)
    params = {
        "harm_threshold": cfg.harm_threshold,
        "task_threshold": cfg.task_threshold,
        "min_docs": cfg.min_docs,
        "harm_heldout": cfg.harm_heldout,
        "harm_heldout_threshold": cfg.harm_heldout_threshold,
        "harm_heldout_min_docs": cfg.harm_heldout_min_docs,
        "score_window": cfg.score_window,
        "task_window": cfg.task_window,
        "shared_token_fraction": cfg.shared_token_fraction,
        "seed": cfg.seed,
        "neuronpedia": cfg.neuronpedia,
        "logit_lens": ctx.with_model,
        "documents_scored": scores.scored,
        "documents_scored_task_window": scores.task_scored,
    }
    extra = _sidecar(ctx, staged, scores, doc_group)
    staged.record_step("scores", params, time.perf_counter() - start, extra)


def _task_contrast(scores: WindowedScores, task_window: int) -> str:
    """What the task score compared, or why there is none (sidecar `task_contrast`)."""
    if scores.task_scored.get(TASK) and scores.task_scored.get(CONTROL):
        return "task vs control"
    if any(scores.task_left_out.values()):
        return (
            f"none: the task or the control group has no document with {task_window} tokens outside the "
            "shared template (lower --task-window)"
        )
    return "none: task scores need documents in both the task and control groups"


def _sidecar(
    ctx: RunContext,
    staged: StagedCache,
    scores: WindowedScores,
    doc_group: np.ndarray,
) -> dict[str, Any]:
    """What the sidecar adds to the parameters: the template left out, documents left out, counts."""
    table, shared = scores.table, scores.score.shared
    texts = token_texts(
        shared.ids,
        staged.dir / CONTEXTS,
        staged.dir / EXAMPLES,
        ctx.model.tokenizer if ctx.with_model else None,
    )
    n_task, n_control = int(table["is_task"].sum()), int(table["is_control"].sum())
    task_contrast = _task_contrast(scores, ctx.cfg.task_window)
    if not n_task:
        log.warning("no feature qualifies as a task feature (%s); overlaps will be empty", task_contrast)
    return {
        "shared_tokens": [
            {
                "id": int(t),
                "text": texts.get(int(t)),
                "doc_fraction": {g: round(float(f[i]), 4) for g, f in shared.doc_fraction.items()},
            }
            for i, t in enumerate(shared.ids.tolist())
        ],
        "shared_groups": shared.groups,
        "documents_left_out": scores.left_out,
        "documents_left_out_task_window": scores.task_left_out,
        "eligible_tokens": _eligible_summary(doc_group, scores.score),
        "task_contrast": task_contrast,
        "n_task": n_task,
        "n_control": n_control,
        "n_harmful": int(table["is_harmful"].sum()),
        "harm_heldout_check": scores.heldout,
        "task_permutation": scores.permutation,
    }
