"""Contrast scores: how well one value per document and feature separates two groups of documents,
as an AUROC with Hanley-McNeil bounds (`precompute.pipeline.auroc`): harmful vs benign (the harm
score, best category with a Bonferroni bound), task vs control (the task score) and task vs
benign + general. The values are the scores step's windowed maxima (`precompute.pipeline.windows`);
this module only compares them, and says whether the comparison of a set of features beats
shuffled labels (`task_permutation`). Documents of sources marked `validation` stay out of the harm
fit and check it instead (`precompute.pipeline.heldout`). docs/cache.md `features.parquet` documents
the columns.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from precompute.data.taxonomy import UNSPECIFIED
from precompute.errors import CacheError, CorpusError
from precompute.pipeline.auroc import Z95, aurocs_prepared, prepare_triples
from precompute.pipeline.heldout import REQUIRE, HeldoutCriterion, heldout_contrast
from precompute.schema import DOCUMENTS, HARVEST_DIR

log = logging.getLogger(__name__)

# Document groups (precompute.data.corpus.GROUPS).
HARMFUL, BENIGN, TASK, CONTROL, GENERAL = "harmful", "benign", "task", "control", "general"
# Harm categories that never compete as a set of their own: the taxonomy's fallback pools datasets
# whose label names the dataset, not a harm, and "all harmful documents" already covers a mixture.
POOLED_CATEGORIES = (UNSPECIFIED,)


def _category_key(c: Any) -> str | None:
    if c is None or (isinstance(c, float) and math.isnan(c)) or c is pd.NA:
        return None
    s = str(c)
    return s or None


def _norm_isf(p: float) -> float:
    from scipy.special import ndtri

    return float(-ndtri(p))


def _group_ids(doc_group: np.ndarray) -> dict[str, np.ndarray]:
    groups = np.array([str(g) for g in np.asarray(doc_group, dtype=object).tolist()], dtype=object)
    return {g: np.flatnonzero(groups == g) for g in (HARMFUL, BENIGN, TASK, CONTROL, GENERAL)}


def _validated_groups(
    doc: np.ndarray, doc_group: np.ndarray, doc_category: np.ndarray, doc_heldout: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(doc_group, doc_category as object arrays, document ids per group, the harm fit's harmful and
    benign ids: those not held out by `doc_heldout`); CacheError when the triples name a document
    the lists lack, CorpusError without harmful or benign documents to fit on."""
    doc_group = np.asarray(doc_group, dtype=object)
    doc_category = np.asarray(doc_category, dtype=object)
    if len(doc_category) != len(doc_group):
        raise ValueError(
            f"doc_group ({len(doc_group)}) and doc_category ({len(doc_category)}) differ in length"
        )
    if doc_heldout is not None and len(doc_heldout) != len(doc_group):
        raise ValueError(
            f"doc_group ({len(doc_group)}) and doc_heldout ({len(doc_heldout)}) differ in length"
        )
    if len(doc) and doc.max() >= len(doc_group):
        raise CacheError(
            f"the harvest shards refer to document id {int(doc.max())} but only {len(doc_group)} documents are "
            f"listed; {DOCUMENTS} and {HARVEST_DIR}/ come from different runs - rerun `featuregeom harvest`"
        )
    groups = np.array([str(g) for g in doc_group.tolist()], dtype=object)
    ids = _group_ids(groups)
    held = np.zeros(len(groups), bool) if doc_heldout is None else np.asarray(doc_heldout, bool)
    fit = {g: ids[g][~held[ids[g]]] for g in (HARMFUL, BENIGN)}
    missing = [g for g in (HARMFUL, BENIGN) if fit[g].size == 0]
    if missing:
        present = (
            ", ".join(f"{g}: {int((groups == g).sum())}" for g in sorted(set(groups.tolist()))) or "none"
        )
        held_out = (
            f"; {int(held[ids[HARMFUL]].sum())} harmful and {int(held[ids[BENIGN]].sum())} benign are held out "
            "(validation = true) and cannot be the fit"
            if held.any()
            else ""
        )
        raise CorpusError(
            f"harm score needs documents in both the harmful and benign groups, but {' and '.join(missing)} "
            f"has none (documents per group: {present}{held_out}); add --corpus PATH:benign and/or "
            "--corpus PATH:harmful[:CATEGORY]"
        )
    return doc_group, doc_category, ids, fit


def _category_sets(
    docs: np.ndarray, doc_category: np.ndarray, min_docs: int, pooled: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """The documents of each category (not `pooled`) with at least `min_docs` of them, by name."""
    by_cat: dict[str, list[int]] = {}
    for d in docs.tolist():
        key = _category_key(doc_category[d])
        if key is not None and key not in pooled:
            by_cat.setdefault(key, []).append(d)
    return {c: np.asarray(v, np.int64) for c, v in sorted(by_cat.items()) if len(v) >= min_docs}


def _harm_columns(
    triples: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_features: int,
    ids: dict[str, np.ndarray],
    doc_category: np.ndarray,
    harm_threshold: float,
    min_docs: int,
) -> dict[str, np.ndarray]:
    """harm_score(_lo), harm_score_all(_lo), harm_category, is_harmful of the fit (see `contrast_scores`),
    and `fit_set`: the category whose documents won, None where all harmful documents did."""
    # A harmful feature usually responds to one kind of harm (weapons, fraud...), so a feature that
    # fires on every weapons prompt and nothing else scores only ~0.6 against *all* harmful prompts.
    # The harm score is therefore the AUROC of the best-separated set, all harmful documents or one
    # category, chosen by a lower bound corrected for the number of sets compared (Bonferroni).
    overall = aurocs_prepared(*triples, n_features, ids[HARMFUL], ids[BENIGN])
    cats = _category_sets(ids[HARMFUL], doc_category, min_docs, POOLED_CATEGORIES)
    z_adj = float(_norm_isf(0.025 / (1 + len(cats))))

    def adjusted_lo(r: dict) -> np.ndarray:
        se = (r["auroc"] - r["lo"]) / Z95
        return np.clip(r["auroc"] - z_adj * se, 0.0, 1.0)

    harm_score = overall["auroc"].astype(np.float64).copy()
    harm_lo = adjusted_lo(overall)
    pos_fires = overall["pos_fires"].copy()
    fit_set = np.full(n_features, None, dtype=object)
    best_cat_lo = np.full(n_features, -np.inf)
    best_cat = np.full(n_features, None, dtype=object)
    for c, docs_c in cats.items():
        r = aurocs_prepared(*triples, n_features, docs_c, ids[BENIGN])
        lo_c = adjusted_lo(r)
        better_cat = lo_c > best_cat_lo
        best_cat_lo[better_cat], best_cat[better_cat] = lo_c[better_cat], c
        wins = lo_c > harm_lo
        harm_score[wins], harm_lo[wins], pos_fires[wins] = r["auroc"][wins], lo_c[wins], r["pos_fires"][wins]
        fit_set[wins] = c
    is_harmful = (harm_score >= harm_threshold) & (harm_lo > 0.5) & (pos_fires >= min_docs)
    # where "all harmful" wins, still name the category the feature leans to
    harm_category = np.where(fit_set == None, best_cat, fit_set)  # noqa: E711 - elementwise on objects
    harm_category[~is_harmful] = None
    return {
        "harm_score": harm_score,
        "harm_score_lo": harm_lo,
        "harm_score_all": overall["auroc"],
        "harm_score_all_lo": overall["lo"],
        "harm_category": harm_category,
        "is_harmful": is_harmful,
        "fit_set": fit_set,
    }


def _source_categories(
    triples: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_features: int,
    ids: dict[str, np.ndarray],
    doc_category: np.ndarray,
    doc_category_source: np.ndarray,
    harm_category: np.ndarray,
    min_docs: int,
) -> np.ndarray:
    """For each feature with a harm category, the dataset label among those unified into it whose own
    documents (>= min_docs) it separates from benign best (highest lower bound); None elsewhere."""
    out = np.full(n_features, None, dtype=object)
    # one set per (unified, dataset label) pair, so a label competes only under its own unified category
    by_pair: dict[tuple[str, str], list[int]] = {}
    for d in ids[HARMFUL].tolist():
        unified, source = _category_key(doc_category[d]), _category_key(doc_category_source[d])
        if unified is not None and source is not None:
            by_pair.setdefault((unified, source), []).append(d)
    best_lo = np.full(n_features, -np.inf)
    for (unified, source), docs in sorted(by_pair.items()):
        mine = harm_category == unified
        if len(docs) < min_docs or not mine.any():
            continue
        r = aurocs_prepared(*triples, n_features, np.asarray(docs, np.int64), ids[BENIGN])
        better = mine & (r["lo"] > best_lo)
        best_lo[better], out[better] = r["lo"][better], source
    return out


def _task_columns(
    triples: tuple[np.ndarray, np.ndarray, np.ndarray],
    ids: dict[str, np.ndarray],
    task_triples: tuple[np.ndarray, np.ndarray, np.ndarray],
    task_ids: dict[str, np.ndarray],
    n_features: int,
    task_threshold: float,
    min_docs: int,
) -> dict[str, np.ndarray]:
    """task_score(_lo, _hi), is_task, is_control from (task_triples, task_ids); task_vs_benign(_lo)
    from (triples, ids) (see `contrast_scores`)."""
    nan = np.full(n_features, np.nan)
    out = {"task_score": nan, "task_score_lo": nan, "task_score_hi": nan}
    out |= {"is_task": np.zeros(n_features, bool), "is_control": np.zeros(n_features, bool)}
    if task_ids[TASK].size and task_ids[CONTROL].size:
        tc = aurocs_prepared(*task_triples, n_features, task_ids[TASK], task_ids[CONTROL])
        score = tc["auroc"]
        out |= {"task_score": score, "task_score_lo": tc["lo"], "task_score_hi": tc["hi"]}
        out["is_task"] = (score >= task_threshold) & (tc["lo"] > 0.5) & (tc["pos_fires"] >= min_docs)
        out["is_control"] = (1.0 - score >= task_threshold) & (tc["hi"] < 0.5) & (tc["neg_fires"] >= min_docs)
    reference = np.concatenate([ids[BENIGN], ids[GENERAL]])
    out |= {"task_vs_benign": nan, "task_vs_benign_lo": nan}
    if ids[TASK].size and reference.size:
        tb = aurocs_prepared(*triples, n_features, ids[TASK], reference)
        out |= {"task_vs_benign": tb["auroc"], "task_vs_benign_lo": tb["lo"]}
    return out


# The columns of `contrast_scores`, in order; the string ones.
STRING_COLUMNS = ("harm_category", "harm_category_source", "harm_heldout_set")
COLUMN_ORDER = (
    "harm_score",
    "harm_score_lo",
    "harm_score_all",
    "harm_score_all_lo",
    "harm_category",
    "harm_category_source",
    "harm_heldout_auroc",
    "harm_heldout_lo",
    "harm_heldout_set",
    "is_harmful",
    "task_score",
    "task_score_lo",
    "task_score_hi",
    "is_task",
    "is_control",
    "task_vs_benign",
    "task_vs_benign_lo",
)


def contrast_scores(
    doc: np.ndarray,
    feat: np.ndarray,
    val: np.ndarray,
    n_features: int,
    doc_group: np.ndarray,
    doc_category: np.ndarray,
    harm_threshold: float = 0.7,
    min_docs: int = 3,
    task_threshold: float = 0.7,
    task_values: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    task_doc_group: np.ndarray | None = None,
    doc_category_source: np.ndarray | None = None,
    doc_heldout: np.ndarray | None = None,
    heldout: HeldoutCriterion | None = None,
) -> pd.DataFrame:
    """Harm and task scores of every feature from one value per document and feature.

    (doc, feat, val) are sparse triples (absent = 0); in the step they are each document's max over
    its window (`precompute.pipeline.windows`), and documents without a window carry a group no
    contrast compares. `doc_group[i]` / `doc_category[i]` describe document id i; `doc_category_source[i]`
    is the label its dataset gave (default: `doc_category`), and `doc_heldout[i]` marks a harmful or
    benign document held out of the harm fit to validate it (default: none). The task vs control
    contrast reads `task_values` and `task_doc_group` instead when given (the step's longer task
    window). Returns one row per feature (RangeIndex = feature id, no `feature` column), every AUROC
    with Hanley-McNeil bounds:

    - `harm_score`, `harm_score_lo`: AUROC harmful vs benign (documents not held out) and its lower
      95% bound, on the best-separated set: all harmful documents or one harm category (categories
      with >= min_docs documents, `POOLED_CATEGORIES` excepted), whichever has the higher lower
      bound, Bonferroni-corrected for the sets compared.
    - `harm_score_all`, `harm_score_all_lo`: all harmful vs benign.
    - `harm_heldout_auroc`, `harm_heldout_lo`, `harm_heldout_set`: AUROC held-out harmful vs
      held-out benign documents on the set the fit chose (`precompute.pipeline.heldout`); NaN/None
      when the held-out contrast was skipped.
    - `is_harmful`: harm_score >= harm_threshold AND harm_score_lo > 0.5 AND the feature fires in
      >= min_docs documents of the winning set; with `heldout.mode` "require" it must also pass the
      held-out criterion (unless that was skipped). The threshold is the effect size, the bound
      > 0.5 the significance, and the firing count stops a feature firing on one or two documents
      (where Hanley-McNeil collapses to [1, 1]) from being flagged. (Requiring the *lower bound* to
      reach 0.7 would make the flag depend mostly on corpus size.)
    - `harm_category`: for harmful features only, the category whose documents give the highest
      corrected bound (ties: higher AUROC, then name); None otherwise. `harm_category_source`: the
      dataset label within it whose documents the feature separates best.
    - `task_score`, `task_score_lo`, `task_score_hi`: AUROC task vs control (same format, different
      content; 0.5 = no difference); NaN without task or control documents.
    - `is_task`: task_score >= task_threshold AND task_score_lo > 0.5 AND fires in >= min_docs task
      documents. `is_control`, its mirror: 1 - task_score >= task_threshold AND task_score_hi < 0.5
      AND fires in >= min_docs control documents.
    - `task_vs_benign`, `task_vs_benign_lo`: AUROC task vs benign (held out or not) + general
      (format and content together; no flag uses it); NaN without task or benign/general documents.

    Raises CorpusError when the harmful or the benign group has no documents to fit on.
    """
    return contrast_scores_with_summary(**locals())[0]


def contrast_scores_with_summary(
    doc: np.ndarray,
    feat: np.ndarray,
    val: np.ndarray,
    n_features: int,
    doc_group: np.ndarray,
    doc_category: np.ndarray,
    harm_threshold: float = 0.7,
    min_docs: int = 3,
    task_threshold: float = 0.7,
    task_values: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    task_doc_group: np.ndarray | None = None,
    doc_category_source: np.ndarray | None = None,
    doc_heldout: np.ndarray | None = None,
    heldout: HeldoutCriterion | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """`contrast_scores` and the held-out contrast's summary (the scores sidecar's `harm_heldout_check`)."""
    doc_group, doc_category, ids, fit = _validated_groups(
        np.asarray(doc), doc_group, doc_category, doc_heldout
    )
    triples = prepare_triples(doc, feat, val, n_features)
    harm = _harm_columns(triples, n_features, ids | fit, doc_category, harm_threshold, min_docs)
    fit_harmful = harm.pop("is_harmful")
    criterion = heldout or HeldoutCriterion()
    held_harmful = np.setdiff1d(ids[HARMFUL], fit[HARMFUL])
    held = heldout_contrast(
        triples,
        n_features,
        held_harmful,
        [_category_key(doc_category[d]) for d in held_harmful.tolist()],
        np.setdiff1d(ids[BENIGN], fit[BENIGN]),
        harm.pop("fit_set"),
        criterion,
        min_docs,
    )
    gated = criterion.mode == REQUIRE and held.summary["status"] == "applied"
    is_harmful = fit_harmful & held.passes if gated else fit_harmful
    harm["harm_category"][~is_harmful] = None
    sources = doc_category if doc_category_source is None else np.asarray(doc_category_source, dtype=object)
    harm["harm_category_source"] = _source_categories(
        triples, n_features, ids | fit, doc_category, sources, harm["harm_category"], min_docs
    )
    harm |= {"harm_heldout_auroc": held.auroc, "harm_heldout_lo": held.lo, "harm_heldout_set": held.set_name}
    harm["is_harmful"] = is_harmful
    held.summary |= {
        "n_harmful_fit": int(fit_harmful.sum()),
        "n_harmful_fit_passing": int((fit_harmful & held.passes).sum())
        if held.summary["status"] != "skipped"
        else None,
        "n_harmful": int(is_harmful.sum()),
    }
    if task_values is None:
        task_triples, task_ids = triples, ids
    else:
        task_triples = prepare_triples(*task_values, n_features)
        task_ids = _group_ids(doc_group if task_doc_group is None else task_doc_group)
    task = _task_columns(triples, ids, task_triples, task_ids, n_features, task_threshold, min_docs)
    log.info(
        "contrast scores: %d harmful / %d benign docs fit (%d / %d held out), %d features harmful (%d by "
        "the fit alone); %d task / %d control docs, %d task and %d control features",
        fit[HARMFUL].size,
        fit[BENIGN].size,
        held.summary["documents"]["harmful"],
        held.summary["documents"]["benign"],
        int(is_harmful.sum()),
        int(fit_harmful.sum()),
        ids[TASK].size,
        ids[CONTROL].size,
        int(task["is_task"].sum()),
        int(task["is_control"].sum()),
    )
    columns: dict[str, Any] = {}
    for name, values in (harm | task).items():
        if name in STRING_COLUMNS:
            columns[name] = pd.Series(values, dtype=object)
        elif name.startswith("is_"):
            columns[name] = np.asarray(values, bool)
        else:
            columns[name] = np.asarray(values, np.float64)
    return pd.DataFrame({c: columns[c] for c in COLUMN_ORDER}), held.summary


def _task_counts(r: dict[str, np.ndarray], task_threshold: float, min_docs: int) -> dict[str, int]:
    score = r["auroc"]
    return {
        "lo_above_half": int(np.sum(r["lo"] > 0.5)),
        "hi_below_half": int(np.sum(r["hi"] < 0.5)),
        "is_task": int(np.sum((score >= task_threshold) & (r["lo"] > 0.5) & (r["pos_fires"] >= min_docs))),
        "is_control": int(
            np.sum((1.0 - score >= task_threshold) & (r["hi"] < 0.5) & (r["neg_fires"] >= min_docs))
        ),
    }


def task_permutation(
    doc: np.ndarray,
    feat: np.ndarray,
    val: np.ndarray,
    n_features: int,
    doc_group: np.ndarray,
    n_permutations: int,
    seed: int,
    task_threshold: float = 0.7,
    min_docs: int = 3,
) -> dict[str, Any] | None:
    """Does the task vs control contrast find more features than shuffled labels would?

    The task/control labels are shuffled across the documents of the two groups (sizes kept) and the
    counts of features with task_score_lo > 0.5, task_score_hi < 0.5, is_task and is_control are
    recomputed, `n_permutations` times (from `seed`). Per count: observed, the permuted mean and 95th
    percentile, and p = (1 + #permutations >= observed) / (1 + n_permutations). Correlated features
    make the chance counts far more variable than a binomial, which is why the null is permuted.
    None without task or control documents."""
    ids = _group_ids(doc_group)
    pos, neg = ids[TASK], ids[CONTROL]
    if not (pos.size and neg.size):
        return None
    doc, feat, val = prepare_triples(doc, feat, val, n_features)
    both = np.concatenate([pos, neg])
    keep = np.isin(doc, both)
    doc, feat, val = doc[keep], feat[keep], val[keep]
    observed = _task_counts(aurocs_prepared(doc, feat, val, n_features, pos, neg), task_threshold, min_docs)
    rng = np.random.default_rng(seed)
    permuted: dict[str, list[int]] = {k: [] for k in observed}
    for _ in range(int(n_permutations)):
        shuffled = rng.permutation(both)
        r = aurocs_prepared(doc, feat, val, n_features, shuffled[: pos.size], shuffled[pos.size :])
        for k, v in _task_counts(r, task_threshold, min_docs).items():
            permuted[k].append(v)
    out: dict[str, Any] = {"n_permutations": int(n_permutations), "seed": int(seed)}
    for k, obs in observed.items():
        null = np.asarray(permuted[k], np.float64)
        out[k] = {
            "observed": obs,
            "permuted_mean": round(float(null.mean()), 2) if null.size else None,
            "permuted_p95": round(float(np.percentile(null, 95)), 2) if null.size else None,
            "p": round(float((1 + np.sum(null >= obs)) / (1 + null.size)), 4),
        }
    return out
