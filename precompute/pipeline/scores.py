"""The scores step: how harmful and how task-specific each feature is, what it writes to the logits,
and what Neuronpedia calls it (columns of features.parquet).

Scores are AUROCs of a feature's *per-document max activation* (docs/science.md section 2, and
docs/cache.md `features.parquet`; the AUROC itself is `precompute.pipeline.auroc`), which puts 16k
features on one axis with a natural null of 0.5. Hanley-McNeil bounds collapse to [1, 1] on a
handful of documents, which is why every flag below also asks the feature to fire on at least
`min_docs` documents of the group it is said to detect.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pandas as pd

from precompute.cache import StagedCache
from precompute.errors import CacheError, CorpusError
from precompute.pipeline.auroc import Z95, aurocs_prepared, prepare_triples
from precompute.pipeline.config import RunConfig
from precompute.pipeline.context import RunContext
from precompute.pipeline.features import merge_feature_columns
from precompute.pipeline.logit_lens import logit_lens, model_unembedding
from precompute.pipeline.neuronpedia import import_neuronpedia
from precompute.pipeline.shards import cache_shards, doc_feature_max
from precompute.schema import DOCUMENTS, HARVEST_DIR

log = logging.getLogger(__name__)

# Document groups (precompute.data.corpus.GROUPS).
HARMFUL, BENIGN, TASK, CONTROL, GENERAL = "harmful", "benign", "task", "control", "general"


def _category_key(c: Any) -> str | None:
    if c is None or (isinstance(c, float) and math.isnan(c)) or c is pd.NA:
        return None
    s = str(c)
    return s or None


def _norm_isf(p: float) -> float:
    from scipy.special import ndtri

    return float(-ndtri(p))


def harm_scores(
    doc: np.ndarray,
    feat: np.ndarray,
    val: np.ndarray,
    n_features: int,
    doc_group: np.ndarray,
    doc_category: np.ndarray,
    harm_threshold: float = 0.7,
    min_docs: int = 3,
    task_threshold: float = 0.7,
) -> pd.DataFrame:
    """Harm and task scores of every feature from its per-document max activations.

    `doc_group[i]` / `doc_category[i]` describe document id i (documents.parquet order).
    Returns a DataFrame with one row per feature (RangeIndex = feature id, no `feature` column):

    - `harm_score`, `harm_score_lo`: AUROC harmful vs benign documents and its lower 95% bound.
    - `is_harmful`: harm_score >= harm_threshold AND harm_score_lo > 0.5 AND the feature fires
      on >= min_docs harmful documents. The AUROC threshold is the effect size (how well the
      feature alone tells harmful from benign), the lower bound > 0.5 is the significance (the
      separation is not chance at this corpus size), and the firing count stops a feature that
      fires on one or two harmful documents (where Hanley-McNeil collapses to [1, 1]) from being
      flagged. Requiring the *lower bound* to reach 0.7 would instead make the flag depend mostly
      on corpus size: with 20 + 20 documents even a 0.8 AUROC has lo ~ 0.66.
    - `harm_category`: for harmful features only, the harm category (among categories with
      >= min_docs documents) whose documents vs benign documents give the highest AUROC lower
      bound (ties: higher AUROC, then name); None otherwise or when no category qualifies.
    - `task_score`, `task_score_lo`: AUROC task vs benign+general documents (NaN without task docs).
    - `task_control_score`: AUROC task vs control documents (NaN without a control group).
    - `is_task`: task_score >= task_threshold AND task_score_lo > 0.5 AND fires on >= min_docs
      task documents AND, when a control group exists, the task-vs-control AUROC is not
      significantly below 0.5 (its upper 95% bound >= 0.5). A feature that detects what task and
      control share (e.g. "code" for insecure vs secure code) is a genuine task feature and
      stays in - task_control_score then ranks how task-*specific* it is - while a feature that
      clearly prefers the control over the task is not a feature of the task. (A point-estimate
      rule task_control_score >= 0.5 would drop about half of the indifferent features by noise.)

    Raises CorpusError when the harmful or the benign group has no documents.
    """
    doc_group = np.asarray(doc_group, dtype=object)
    doc_category = np.asarray(doc_category, dtype=object)
    if len(doc_category) != len(doc_group):
        raise ValueError(
            f"doc_group ({len(doc_group)}) and doc_category ({len(doc_category)}) differ in length"
        )
    doc, feat, val = prepare_triples(doc, feat, val, n_features)
    if len(doc) and doc.max() >= len(doc_group):
        raise CacheError(
            f"the harvest shards refer to document id {int(doc.max())} but only {len(doc_group)} documents are "
            f"listed; {DOCUMENTS} and {HARVEST_DIR}/ come from different runs - rerun `featuregeom harvest`"
        )
    groups = np.array([str(g) for g in doc_group.tolist()], dtype=object)
    ids = {g: np.flatnonzero(groups == g) for g in (HARMFUL, BENIGN, TASK, CONTROL, GENERAL)}
    missing = [g for g in (HARMFUL, BENIGN) if ids[g].size == 0]
    if missing:
        present = (
            ", ".join(f"{g}: {int((groups == g).sum())}" for g in sorted(set(groups.tolist()))) or "none"
        )
        raise CorpusError(
            f"harm score needs documents in both the harmful and benign groups, but {' and '.join(missing)} "
            f"has none (documents per group: {present}); add --corpus PATH:benign and/or "
            "--corpus PATH:harmful[:CATEGORY]"
        )

    # A harmful feature usually responds to one kind of harm (weapons, fraud...), so a feature that
    # fires on every weapons prompt and nothing else scores only ~0.6 against *all* harmful prompts.
    # The harm score is therefore the AUROC of the best-separated set, all harmful documents or one
    # category, chosen by a lower bound corrected for the number of sets compared (Bonferroni).
    overall = aurocs_prepared(doc, feat, val, n_features, ids[HARMFUL], ids[BENIGN])
    by_cat: dict[str, list[int]] = {}
    for d in ids[HARMFUL].tolist():
        key = _category_key(doc_category[d])
        if key is not None:
            by_cat.setdefault(key, []).append(d)
    cats = {c: np.asarray(v, np.int64) for c, v in sorted(by_cat.items()) if len(v) >= min_docs}
    z_adj = float(_norm_isf(0.025 / (1 + len(cats))))

    def adjusted_lo(r: dict) -> np.ndarray:
        se = (r["auroc"] - r["lo"]) / Z95
        return np.clip(r["auroc"] - z_adj * se, 0.0, 1.0)

    harm_score = overall["auroc"].astype(np.float64).copy()
    harm_lo = adjusted_lo(overall)
    pos_fires = overall["pos_fires"].copy()
    harm_category = np.full(n_features, None, dtype=object)
    best_cat_lo = np.full(n_features, -np.inf)
    best_cat = np.full(n_features, None, dtype=object)
    for c, docs_c in cats.items():
        r = aurocs_prepared(doc, feat, val, n_features, docs_c, ids[BENIGN])
        lo_c = adjusted_lo(r)
        better_cat = lo_c > best_cat_lo
        best_cat_lo[better_cat], best_cat[better_cat] = lo_c[better_cat], c
        wins = lo_c > harm_lo
        harm_score[wins], harm_lo[wins], pos_fires[wins] = r["auroc"][wins], lo_c[wins], r["pos_fires"][wins]
        harm_category[wins] = c
    is_harmful = (harm_score >= harm_threshold) & (harm_lo > 0.5) & (pos_fires >= min_docs)
    # where "all harmful" wins, still name the category the feature leans to
    lean = is_harmful & (harm_category == None)  # noqa: E711 - elementwise on an object array
    harm_category[lean] = best_cat[lean]
    harm_category[~is_harmful] = None
    harm = {"auroc": harm_score, "lo": harm_lo, "all": overall["auroc"], "all_lo": overall["lo"]}

    reference = np.concatenate([ids[BENIGN], ids[GENERAL]])
    if ids[TASK].size:
        task = aurocs_prepared(doc, feat, val, n_features, ids[TASK], reference)
        task_score, task_lo = task["auroc"], task["lo"]
        is_task = (task_score >= task_threshold) & (task_lo > 0.5) & (task["pos_fires"] >= min_docs)
    else:
        task_score = task_lo = np.full(n_features, np.nan)
        is_task = np.zeros(n_features, bool)
    if ids[TASK].size and ids[CONTROL].size:
        tc = aurocs_prepared(doc, feat, val, n_features, ids[TASK], ids[CONTROL])
        task_control = tc["auroc"]
        is_task &= tc["hi"] >= 0.5
    else:
        task_control = np.full(n_features, np.nan)

    log.info(
        "harm scores: %d harmful / %d benign docs, %d features flagged harmful; task: %d task docs, "
        "%d control docs, %d features flagged task",
        ids[HARMFUL].size,
        ids[BENIGN].size,
        int(is_harmful.sum()),
        ids[TASK].size,
        ids[CONTROL].size,
        int(is_task.sum()),
    )
    return pd.DataFrame(
        {
            "harm_score": harm["auroc"],
            "harm_score_lo": harm["lo"],
            "harm_score_all": harm["all"],
            "harm_score_all_lo": harm["all_lo"],
            "harm_category": pd.Series(harm_category, dtype=object),
            "is_harmful": is_harmful.astype(bool),
            "task_score": np.asarray(task_score, np.float64),
            "task_score_lo": np.asarray(task_lo, np.float64),
            "task_control_score": np.asarray(task_control, np.float64),
            "is_task": np.asarray(is_task, bool),
        }
    )


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def check_corpus_groups(cfg: RunConfig) -> None:
    """Harm scores compare harmful with benign documents: refuse a corpus without both, before any work."""
    groups = {c.group for c in cfg.corpus}
    if not {HARMFUL, BENIGN} <= groups:
        missing = sorted({HARMFUL, BENIGN} - groups)
        raise CorpusError(
            f"harm scores need documents in both the harmful and benign groups; no corpus source has group "
            f"{' or '.join(repr(m) for m in missing)}: add --corpus PATH:{missing[0]}"
        )


def harvested_documents(docs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Group and category per document id, counting only documents the harvest read.

    A token budget leaves most of a large source unread, and counting those documents as "never
    fires" would pull every AUROC towards 0.5: they get the group "unharvested", which no score
    compares. Returns (doc_group, doc_category, the harvested documents' rows)."""
    n_docs = int(docs["doc_id"].max()) + 1 if len(docs) else 0
    doc_group = np.full(n_docs, "unharvested", dtype=object)
    doc_category = np.full(n_docs, None, dtype=object)
    read = docs[docs["n_tokens"] > 0]
    doc_group[read["doc_id"].to_numpy()] = read["group"].to_numpy(object)
    doc_category[read["doc_id"].to_numpy()] = read["category"].to_numpy(object)
    return doc_group, doc_category, read


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
    doc, feat, val = doc_feature_max(cache_shards(staged), n, progress=cfg.progress)
    doc_group, doc_category, read = harvested_documents(docs)
    table = harm_scores(
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
    if sae is not None:
        lm = ctx.model
        unembed, norm_w = model_unembedding(lm.model)
        promoted, suppressed = logit_lens(
            sae.unit_directions().to(unembed.device), unembed, norm_w, lm.tokenizer
        )
        table["top_promoted"] = promoted
        table["top_suppressed"] = suppressed
    if cfg.neuronpedia:
        table = table.merge(import_neuronpedia(cfg.neuronpedia, n), on="feature", how="left")
    else:
        table["label"] = pd.Series([None] * n, dtype=object)
        table["explanation"] = pd.Series([None] * n, dtype=object)
    merge_feature_columns(staged, n, table)
    params = {
        "harm_threshold": cfg.harm_threshold,
        "task_threshold": cfg.task_threshold,
        "neuronpedia": cfg.neuronpedia,
        "logit_lens": ctx.with_model,
        "documents_scored": read["group"].value_counts().sort_index().to_dict(),
    }
    staged.record_step("scores", params, time.perf_counter() - start)
