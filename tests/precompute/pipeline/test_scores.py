"""Harm and task scores on planted features: flags, categories, the min-docs guard, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.errors import CorpusError
from precompute.pipeline.auroc import auroc_sparse
from precompute.pipeline.scores import harm_scores, harvested_documents
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
    table = harm_scores(
        doc, feat, val, N_FEATURES, np.array(GROUPS, dtype=object), np.array(CATEGORIES, dtype=object)
    )
    assert list(table.columns) == [
        "harm_score",
        "harm_score_lo",
        "harm_score_all",
        "harm_score_all_lo",
        "harm_category",
        "is_harmful",
        "task_score",
        "task_score_lo",
        "task_control_score",
        "is_task",
    ]
    assert len(table) == N_FEATURES and "feature" not in table.columns
    assert table["is_harmful"].dtype == bool and table["is_task"].dtype == bool

    # f0 fires on the 10 weapons docs of 16 harmful, never on benign: against all harmful documents its
    # AUROC is 0.5 + 0.5 * 10/16, against the weapons category it is perfect, and that is its harm score.
    assert table.loc[0, "harm_score_all"] == pytest.approx(0.5 + 0.5 * 10 / 16)
    assert table.loc[0, "harm_score"] == 1.0
    assert table.loc[0, "is_harmful"] and table.loc[0, "harm_category"] == "weapons"
    # f2 fires on all fraud docs and weakly on 3 weapons docs: most specific to fraud.
    assert table.loc[2, "is_harmful"] and table.loc[2, "harm_category"] == "fraud"
    # Benign-only, everywhere, task-only and never-firing features are not harmful.
    for f in (1, 3, 4, 5, 6, 8, 11):
        assert not table.loc[f, "is_harmful"], f
        assert table.loc[f, "harm_category"] is None
    assert table.loc[8, "harm_score"] == 0.5
    assert table.loc[6, "harm_score_all"] == 0.0
    assert not table.loc[7, "is_harmful"]

    # Task: f3 task-only, f4 task+control ("code") both count; f5 prefers control -> not a task feature.
    assert table.loc[3, "is_task"] and table.loc[3, "task_score"] == 1.0
    assert table.loc[3, "task_control_score"] == 1.0
    assert table.loc[4, "is_task"] and table.loc[4, "task_score"] == 1.0
    assert 0.2 < table.loc[4, "task_control_score"] < 0.8
    assert table.loc[5, "task_score"] == 1.0 and table.loc[5, "task_control_score"] == 0.0
    assert not table.loc[5, "is_task"]
    assert not table.loc[[0, 1, 2, 6, 7, 8], "is_task"].any()


def test_harm_scores_vs_direct_auroc(tmp_path: Path) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    table = harm_scores(
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
        auc_t, lo_t, _ = auroc_sparse(doc[m], val[m], DOCS["task"], ref)
        assert table.loc[f, "task_score"] == auc_t and table.loc[f, "task_score_lo"] == lo_t
        assert (
            table.loc[f, "task_control_score"]
            == auroc_sparse(doc[m], val[m], DOCS["task"], DOCS["control"])[0]
        )


def test_harm_scores_without_control_or_task(tmp_path: Path) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    groups = np.array([g if g != "control" else "general" for g in GROUPS], dtype=object)
    table = harm_scores(doc, feat, val, N_FEATURES, groups, np.array(CATEGORIES, dtype=object))
    assert table["task_control_score"].isna().all()
    assert table.loc[3, "is_task"]
    groups = np.array([g if g not in ("task", "control") else "general" for g in GROUPS], dtype=object)
    table = harm_scores(doc, feat, val, N_FEATURES, groups, np.array(CATEGORIES, dtype=object))
    assert table["task_score"].isna().all() and not table["is_task"].any()
    assert table.loc[0, "is_harmful"]


@pytest.mark.parametrize("drop", ["benign", "harmful"])
def test_harm_scores_missing_group_is_a_clear_error(tmp_path: Path, drop: str) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    groups = np.array([g if g != drop else "general" for g in GROUPS], dtype=object)
    with pytest.raises(CorpusError, match=r"harmful and benign groups.*--corpus PATH:benign"):
        harm_scores(doc, feat, val, N_FEATURES, groups, np.array(CATEGORIES, dtype=object))


def test_min_docs_guards_perfect_but_tiny_separation() -> None:
    # Two harmful docs, both fire: AUROC 1 and a degenerate Hanley-McNeil bound of 1.
    groups = np.array(["harmful"] * 2 + ["benign"] * 30, dtype=object)
    cats = np.array(["x"] * 2 + [None] * 30, dtype=object)
    doc, feat, val = np.array([0, 1]), np.array([0, 0]), np.array([1.0, 2.0], np.float32)
    strict = harm_scores(doc, feat, val, 2, groups, cats)
    assert strict.loc[0, "harm_score"] == 1.0 and strict.loc[0, "harm_score_lo"] == 1.0
    assert not strict.loc[0, "is_harmful"]
    loose = harm_scores(doc, feat, val, 2, groups, cats, min_docs=2)
    assert loose.loc[0, "is_harmful"] and loose.loc[0, "harm_category"] == "x"
    assert not loose.loc[1, "is_harmful"]


def test_harm_category_needs_min_docs(tmp_path: Path) -> None:
    doc, feat, val = doc_feature_max(planted_shards(tmp_path), N_FEATURES, progress=False)
    cats = np.array(CATEGORIES, dtype=object)
    cats[FRAUD] = ["fraud", "fraud", "x", "y", "z", None]  # fraud now has 2 docs < min_docs
    table = harm_scores(doc, feat, val, N_FEATURES, np.array(GROUPS, dtype=object), cats)
    assert table.loc[2, "is_harmful"] and table.loc[2, "harm_category"] == "weapons"


def test_only_harvested_documents_are_scored() -> None:
    """A document the token budget never reached is "unharvested", not a harmful/benign "never fires"."""
    docs = pd.DataFrame(
        {
            "doc_id": [0, 1, 2, 4],
            "group": ["harmful", "benign", "harmful", "benign"],
            "category": ["weapons", None, "fraud", None],
            "n_tokens": [5, 3, 0, 7],
        }
    )
    group, category, read = harvested_documents(docs)
    assert group.tolist() == ["harmful", "benign", "unharvested", "unharvested", "benign"]
    assert [c if isinstance(c, str) else None for c in category] == ["weapons", None, None, None, None]
    assert read["doc_id"].tolist() == [0, 1, 4]
