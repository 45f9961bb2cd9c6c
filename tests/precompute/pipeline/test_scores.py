"""Harm and task contrast scores on planted features: flags, categories, task vs control, the min-docs
guard, clear errors (precompute.pipeline.contrasts; the windows are tested in test_windows.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.errors import CorpusError
from precompute.pipeline.auroc import auroc_sparse
from precompute.pipeline.contrasts import contrast_scores, task_permutation
from precompute.pipeline.scores import harvested_documents, heldout_documents
from precompute.pipeline.shards import doc_feature_max, shard_name


def write_shard(
    path: Path,
    doc_ids: np.ndarray,
    token_features: list[dict[int, float]],
    context_ids: np.ndarray | None = None,
) -> None:
    """A shard in harvest's format: one row per counted token, CSR of its (feature, value)."""
    n = len(doc_ids)
    counts = np.array([len(t) for t in token_features], np.int64)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    feats = [np.array(sorted(t), np.int32) for t in token_features]
    vals = [np.array([t[f] for f in sorted(t)], np.float32) for t in token_features]
    np.savez(
        path,
        context_id=(np.asarray(context_ids) if context_ids is not None else np.asarray(doc_ids)).astype(
            np.int32
        ),
        position=np.arange(n, dtype=np.int32),
        token_id=np.zeros(n, np.int32),
        doc_id=np.asarray(doc_ids, np.int32),
        indptr=indptr,
        feature=np.concatenate(feats) if feats else np.zeros(0, np.int32),
        value=np.concatenate(vals) if vals else np.zeros(0, np.float32),
    )


# ------------------------------------------------------------------------------- harm / task flags

# Document layout of the planted corpus (doc id = position).
GROUPS = (
    ["harmful"] * 10 + ["harmful"] * 6 + ["benign"] * 12 + ["task"] * 10 + ["control"] * 10 + ["general"] * 6
)
CATEGORIES = ["weapons"] * 10 + ["fraud"] * 6 + [None] * 12 + ["code"] * 10 + ["code"] * 10 + [None] * 6
DOCS = {g: np.flatnonzero(np.array(GROUPS) == g) for g in set(GROUPS)}
WEAPONS, FRAUD = np.arange(10), np.arange(10, 16)
N_FEATURES = 12
# f0: weapons only (strong)     f2: fraud + 3 weapons docs     f1: everywhere (noise)
# f3: task only                  f4: task + control ("code")    f5: control >> task
# f6: benign only                f7: 2 harmful docs only        f8..11: never fire


def planted_shards(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(3)
    n_docs = len(GROUPS)
    rows_doc, rows_feats = [], []
    for d in range(n_docs):
        g = GROUPS[d]
        for _ in range(4):  # 4 tokens per document
            t: dict[int, float] = {}
            if rng.random() < 0.5:
                t[1] = float(rng.uniform(0.1, 3))
            rows_doc.append(d)
            rows_feats.append(t)
        toks = rows_feats[-4:]
        if d in WEAPONS:
            toks[1][0] = 5.0 + d
        if d in FRAUD or d in WEAPONS[:3]:
            toks[2][2] = 3.0 if d in FRAUD else 0.5
        if g == "task":
            toks[0][3] = 2.0
            toks[3][4] = 1.0 + rng.random()
            toks[1][5] = 1.0
        if g == "control":
            toks[3][4] = 1.0 + rng.random()
            toks[1][5] = 5.0
        if g == "benign":
            toks[2][6] = 1.0
        if d in (0, 12):  # f7: two harmful docs only
            toks[0][7] = 9.0
    # Two shards; document 20 straddles them.
    split = rows_doc.index(20) + 2
    p0, p1 = tmp_path / shard_name(0), tmp_path / shard_name(1)
    write_shard(p0, np.array(rows_doc[:split]), rows_feats[:split])
    write_shard(p1, np.array(rows_doc[split:]), rows_feats[split:])
    return [p0, p1]


def test_planted_harmful_feature_is_flagged_with_its_category(tmp_path: Path) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    table = contrast_scores(
        doc, feat, val, N_FEATURES, np.array(GROUPS, dtype=object), np.array(CATEGORIES, dtype=object)
    )
    assert list(table.columns) == [
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
    ]
    assert len(table) == N_FEATURES and "feature" not in table.columns
    assert all(table[c].dtype == bool for c in ("is_harmful", "is_task", "is_control"))

    # f0 fires on the 10 weapons docs of 16 harmful, never on benign: against all harmful documents its
    # AUROC is 0.5 + 0.5 * 10/16, against the weapons category it is perfect, and that is its harm score.
    assert table.loc[0, "harm_score_all"] == pytest.approx(0.5 + 0.5 * 10 / 16)
    assert table.loc[0, "harm_score"] == 1.0
    assert table.loc[0, "is_harmful"] and table.loc[0, "harm_category"] == "weapons"
    # without dataset labels of their own, each category is its own source; no held-out documents
    assert table["harm_category_source"].equals(table["harm_category"])
    assert table[["harm_heldout_auroc", "harm_heldout_lo"]].isna().all().all()
    # f2 fires on all fraud docs and weakly on 3 weapons docs: most specific to fraud.
    assert table.loc[2, "is_harmful"] and table.loc[2, "harm_category"] == "fraud"
    # Benign-only, everywhere, task-only and never-firing features are not harmful.
    for f in (1, 3, 4, 5, 6, 8, 11):
        assert not table.loc[f, "is_harmful"], f
        assert table.loc[f, "harm_category"] is None
    assert table.loc[8, "harm_score"] == 0.5
    assert table.loc[6, "harm_score_all"] == 0.0
    assert not table.loc[7, "is_harmful"]

    # Task = task vs control. f3 fires on task documents only: a task feature. f4 fires alike on task
    # and control ("code"): it tells task from benign text, not task from control - not a task feature.
    # f5 fires on both but far more strongly on control: a control feature.
    assert (
        table.loc[3, "is_task"]
        and table.loc[3, "task_score"] == 1.0
        and table.loc[3, "task_vs_benign"] == 1.0
    )
    assert not table.loc[3, "is_control"]
    assert table.loc[4, "task_vs_benign"] == 1.0 and 0.2 < table.loc[4, "task_score"] < 0.8
    assert not table.loc[4, "is_task"] and not table.loc[4, "is_control"]
    assert table.loc[5, "task_score"] == 0.0 and table.loc[5, "task_score_hi"] == 0.0
    assert (
        table.loc[5, "is_control"] and not table.loc[5, "is_task"] and table.loc[5, "task_vs_benign"] == 1.0
    )
    assert table["is_task"].tolist() == [f == 3 for f in range(N_FEATURES)]
    assert table["is_control"].tolist() == [f == 5 for f in range(N_FEATURES)]


def test_harm_scores_vs_direct_auroc(tmp_path: Path) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    table = contrast_scores(
        doc, feat, val, N_FEATURES, np.array(GROUPS, dtype=object), np.array(CATEGORIES, dtype=object)
    )
    ref = np.r_[DOCS["benign"], DOCS["general"]]
    for f in range(N_FEATURES):
        m = feat == f
        auc, lo, _ = auroc_sparse(doc[m], val[m], DOCS["harmful"], DOCS["benign"])
        assert table.loc[f, "harm_score_all"] == auc and table.loc[f, "harm_score_all_lo"] == lo
        # the harm score is the all-harmful or a per-category AUROC, whichever has the higher bound
        candidates = [auc] + [
            auroc_sparse(doc[m], val[m], docs_c, DOCS["benign"])[0] for docs_c in (WEAPONS, FRAUD)
        ]
        assert any(table.loc[f, "harm_score"] == c for c in candidates)
        assert table.loc[f, "harm_score_lo"] <= table.loc[f, "harm_score"]
        auc_t, lo_t, hi_t = auroc_sparse(doc[m], val[m], DOCS["task"], DOCS["control"])
        assert table.loc[f, "task_score"] == auc_t and table.loc[f, "task_score_lo"] == lo_t
        assert table.loc[f, "task_score_hi"] == hi_t
        auc_b, lo_b, _ = auroc_sparse(doc[m], val[m], DOCS["task"], ref)
        assert table.loc[f, "task_vs_benign"] == auc_b and table.loc[f, "task_vs_benign_lo"] == lo_b


def test_harm_scores_without_control_or_task(tmp_path: Path) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    groups = np.array([g if g != "control" else "general" for g in GROUPS], dtype=object)
    table = contrast_scores(doc, feat, val, N_FEATURES, groups, np.array(CATEGORIES, dtype=object))
    # without a control group there is no task score and no task or control feature
    assert table[["task_score", "task_score_lo", "task_score_hi"]].isna().all().all()
    assert not table["is_task"].any() and not table["is_control"].any()
    assert table.loc[3, "task_vs_benign"] == 1.0
    groups = np.array([g if g not in ("task", "control") else "general" for g in GROUPS], dtype=object)
    table = contrast_scores(doc, feat, val, N_FEATURES, groups, np.array(CATEGORIES, dtype=object))
    assert table[["task_score", "task_vs_benign", "task_vs_benign_lo"]].isna().all().all()
    assert not table["is_task"].any()
    assert table.loc[0, "is_harmful"]


@pytest.mark.parametrize("drop", ["benign", "harmful"])
def test_harm_scores_missing_group_is_a_clear_error(tmp_path: Path, drop: str) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    groups = np.array([g if g != drop else "general" for g in GROUPS], dtype=object)
    with pytest.raises(CorpusError, match=r"harmful and benign groups.*--corpus PATH:benign"):
        contrast_scores(doc, feat, val, N_FEATURES, groups, np.array(CATEGORIES, dtype=object))


def test_min_docs_guards_perfect_but_tiny_separation() -> None:
    # Two harmful docs, both fire: AUROC 1 and a degenerate Hanley-McNeil bound of 1.
    groups = np.array(["harmful"] * 2 + ["benign"] * 30, dtype=object)
    cats = np.array(["x"] * 2 + [None] * 30, dtype=object)
    doc, feat, val = np.array([0, 1]), np.array([0, 0]), np.array([1.0, 2.0], np.float32)
    strict = contrast_scores(doc, feat, val, 2, groups, cats)
    assert strict.loc[0, "harm_score"] == 1.0 and strict.loc[0, "harm_score_lo"] == 1.0
    assert not strict.loc[0, "is_harmful"]
    loose = contrast_scores(doc, feat, val, 2, groups, cats, min_docs=2)
    assert loose.loc[0, "is_harmful"] and loose.loc[0, "harm_category"] == "x"
    assert not loose.loc[1, "is_harmful"]


def test_harm_category_needs_min_docs(tmp_path: Path) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    cats = np.array(CATEGORIES, dtype=object)
    cats[FRAUD] = ["fraud", "fraud", "x", "y", "z", None]  # fraud now has 2 docs < min_docs
    table = contrast_scores(doc, feat, val, N_FEATURES, np.array(GROUPS, dtype=object), cats)
    assert table.loc[2, "is_harmful"] and table.loc[2, "harm_category"] == "weapons"


def test_only_harvested_documents_are_scored() -> None:
    """A document the token budget never reached is "unharvested", not a harmful/benign "never fires"."""
    docs = pd.DataFrame(
        {
            "doc_id": [0, 1, 2, 4],
            "group": ["harmful", "benign", "harmful", "benign"],
            "category": ["weapons", None, "fraud", None],
            "category_source": ["Violence", None, "Fraud/Deception", None],
            "validation": [False, False, True, True],
            "n_tokens": [5, 3, 0, 7],
        }
    )
    group, category, read = harvested_documents(docs)
    assert group.tolist() == ["harmful", "benign", "unharvested", "unharvested", "benign"]
    assert [c if isinstance(c, str) else None for c in category] == ["weapons", None, None, None, None]
    assert read["doc_id"].tolist() == [0, 1, 4]
    source, held = heldout_documents(docs, 5)
    assert source.tolist() == ["Violence", None, "Fraud/Deception", None, None]
    assert held.tolist() == [False, False, True, False, True]


def test_a_cache_harvested_before_the_taxonomy_gets_unified_harm_categories() -> None:
    """Without `category_source`, harmful documents' dataset labels are unified when scored; other groups'
    categories and the dataset labels themselves are kept, and nothing is held out."""
    docs = pd.DataFrame(
        {
            "doc_id": [0, 1, 2, 3],
            "group": ["harmful", "harmful", "benign", "harmful"],
            "category": ["Malware/Hacking", "advbench", "writing", "no such label"],
            "n_tokens": [5, 3, 4, 2],
        }
    )
    _, category, _ = harvested_documents(docs)
    assert category.tolist() == ["cybercrime", "unspecified", "writing", "unspecified"]
    source, held = heldout_documents(docs, 4)
    assert source.tolist() == ["Malware/Hacking", "advbench", "writing", "no such label"]
    assert not held.any()


# ------------------------------------------------------------------------------ task window, permutation


def test_task_contrast_reads_its_own_values(tmp_path: Path) -> None:
    """task_values / task_doc_group (the step's longer task window) feed task vs control only."""
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    groups, cats = np.array(GROUPS, dtype=object), np.array(CATEGORIES, dtype=object)
    same = contrast_scores(doc, feat, val, N_FEATURES, groups, cats)
    # task values: f9 fires on every task document, and the first two control documents are left out
    t_doc = np.r_[DOCS["task"], DOCS["control"][2:]]
    t_feat = np.r_[np.full(10, 9), np.full(8, 10)]
    t_val = np.ones(18, np.float32)
    t_group = groups.copy()
    t_group[DOCS["control"][:2]] = "short"
    table = contrast_scores(
        doc, feat, val, N_FEATURES, groups, cats, task_values=(t_doc, t_feat, t_val), task_doc_group=t_group
    )
    assert table.loc[9, "task_score"] == 1.0 and table.loc[9, "is_task"]
    assert table.loc[10, "task_score"] == 0.0 and table.loc[10, "is_control"]
    auc, lo, hi = auroc_sparse(np.r_[DOCS["control"][2:]], np.ones(8), DOCS["task"], DOCS["control"][2:])
    assert (table.loc[10, "task_score"], table.loc[10, "task_score_lo"], table.loc[10, "task_score_hi"]) == (
        auc,
        lo,
        hi,
    )
    assert table["task_score"].drop([9, 10]).eq(0.5).all()
    other = [c for c in same.columns if not c.startswith(("task_score", "is_task", "is_control"))]
    pd.testing.assert_frame_equal(table[other], same[other])


def test_task_permutation_counts_against_brute_force(tmp_path: Path) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    groups = np.array(GROUPS, dtype=object)
    out = task_permutation(doc, feat, val, N_FEATURES, groups, 6, seed=4)
    assert out is not None and out["n_permutations"] == 6

    def counts(pos: np.ndarray, neg: np.ndarray) -> dict[str, int]:
        c = dict.fromkeys(("lo_above_half", "hi_below_half", "is_task", "is_control"), 0)
        for f in range(N_FEATURES):
            m = feat == f
            a, lo, hi = auroc_sparse(doc[m], val[m], pos, neg)
            fires_pos, fires_neg = np.isin(doc[m], pos).sum(), np.isin(doc[m], neg).sum()
            c["lo_above_half"] += lo > 0.5
            c["hi_below_half"] += hi < 0.5
            c["is_task"] += a >= 0.7 and lo > 0.5 and fires_pos >= 3
            c["is_control"] += 1 - a >= 0.7 and hi < 0.5 and fires_neg >= 3
        return c

    observed = counts(DOCS["task"], DOCS["control"])
    assert observed["is_task"] == 1 and observed["is_control"] == 1  # f3 and f5 (test above)
    both = np.r_[DOCS["task"], DOCS["control"]]
    rng = np.random.default_rng(4)
    null = [counts(s[:10], s[10:]) for s in (rng.permutation(both) for _ in range(6))]
    for k, obs in observed.items():
        values = np.array([n[k] for n in null], float)
        assert out[k]["observed"] == obs
        assert out[k]["permuted_mean"] == round(values.mean(), 2)
        assert out[k]["permuted_p95"] == round(np.percentile(values, 95), 2)
        assert out[k]["p"] == round((1 + (values >= obs).sum()) / 7, 4)
    no_control = np.array([g if g != "control" else "general" for g in GROUPS], dtype=object)
    assert task_permutation(doc, feat, val, N_FEATURES, no_control, 6, seed=4) is None
