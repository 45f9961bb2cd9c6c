"""Tests for precompute.pipeline.scores: sparse AUROC vs sklearn, harm/task flags on planted features,
logit lens vs brute force, Neuronpedia import."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.errors import CorpusError, ModelLoadError
from precompute.pipeline import scores
from precompute.pipeline.scores import (
    auroc_sparse,
    feature_aurocs,
    hanley_mcneil,
    harm_scores,
    import_neuronpedia,
    logit_lens,
    model_unembedding,
    readable_token,
)
from precompute.pipeline.shards import doc_feature_max, shard_name

roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score


# ------------------------------------------------------------------------------------- helpers


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


def dense_auc(dense: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(y, np.r_[dense[pos], dense[neg]]))


def random_case(rng: np.random.Generator, n_docs: int, n_features: int):
    """Random sparse triples with heavy ties (few distinct values) and some empty features."""
    density = rng.uniform(0, 0.7, n_features)
    density[rng.random(n_features) < 0.2] = 0.0  # empty features
    dense = np.zeros((n_docs, n_features), np.float32)
    for f in range(n_features):
        fires = rng.random(n_docs) < density[f]
        levels = rng.integers(1, 4)  # 1..3 distinct values -> many ties
        dense[fires, f] = rng.integers(1, levels + 1, fires.sum()).astype(np.float32) * 0.5
    doc, feat = np.nonzero(dense.T)[1], np.nonzero(dense.T)[0]  # sorted by (feature, doc)
    val = dense[doc, feat]
    perm = rng.permutation(n_docs)
    n_pos = rng.integers(1, n_docs - 1)
    n_neg = rng.integers(1, n_docs - n_pos + 1)
    pos, neg = perm[:n_pos], perm[n_pos : n_pos + n_neg]  # the rest are in neither group
    return dense, doc, feat, val, pos, neg


# ----------------------------------------------------------------------------------------- AUROC


def test_auroc_sparse_matches_sklearn_on_random_cases() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_docs = int(rng.integers(3, 40))
        dense, doc, feat, val, pos, neg = random_case(rng, n_docs, 1)
        auc, lo, hi = auroc_sparse(doc, val, pos, neg)
        assert auc == pytest.approx(dense_auc(dense[:, 0], pos, neg), abs=1e-12)
        assert 0.0 <= lo <= auc <= hi <= 1.0


def test_auroc_sparse_ties_at_zero_and_explicit_zeros() -> None:
    pos, neg = np.arange(0, 6), np.arange(6, 12)
    dense = np.zeros(12, np.float32)
    dense[[0, 1, 7]] = [2.0, 2.0, 2.0]  # ties among non-zeros across sides, rest tied at 0
    docs = np.array([0, 1, 7, 3, 9])  # 3 and 9 listed with an explicit 0
    vals = np.array([2.0, 2.0, 2.0, 0.0, 0.0], np.float32)
    auc, _, _ = auroc_sparse(docs, vals, pos, neg)
    assert auc == pytest.approx(dense_auc(dense, pos, neg), abs=1e-12)
    # No non-zeros at all: exactly 0.5.
    assert auroc_sparse(np.zeros(0, np.int64), np.zeros(0), pos, neg)[0] == 0.5
    # Perfect separation and its mirror.
    assert auroc_sparse(pos, np.ones(6), pos, neg)[0] == 1.0
    assert auroc_sparse(neg, np.ones(6), pos, neg)[0] == 0.0


def test_feature_aurocs_with_negative_values_matches_sklearn() -> None:
    # SAE activations are > 0, but the rank computation must not assume it.
    rng = np.random.default_rng(4)
    for _ in range(30):
        n_docs, n_features = int(rng.integers(4, 40)), 6
        dense = rng.choice([-1.0, -0.5, 0.0, 0.0, 0.0, 0.5, 1.0], (n_docs, n_features)).astype(np.float32)
        feat, doc = np.nonzero(dense.T)
        perm = rng.permutation(n_docs)
        cut = int(rng.integers(1, n_docs))
        pos, neg = perm[:cut], perm[cut:]
        r = feature_aurocs(doc, feat, dense[doc, feat], n_features, pos, neg)
        for f in range(n_features):
            assert r["auroc"][f] == pytest.approx(dense_auc(dense[:, f], pos, neg), abs=1e-12)
            assert r["pos_fires"][f] == (dense[pos, f] > 0).sum()


def test_auroc_sparse_empty_side_is_nan() -> None:
    auc, lo, hi = auroc_sparse(
        np.array([0, 1]), np.array([1.0, 2.0]), np.array([0, 1]), np.zeros(0, np.int64)
    )
    assert math.isnan(auc) and math.isnan(lo) and math.isnan(hi)
    assert math.isnan(auroc_sparse(np.array([0]), np.array([1.0]), np.zeros(0, np.int64), np.array([0]))[0])


def test_auroc_rejects_documents_on_both_sides() -> None:
    with pytest.raises(ValueError, match="both sides"):
        auroc_sparse(np.array([0]), np.array([1.0]), np.array([0, 1]), np.array([1, 2]))


def test_hanley_mcneil_matches_formula() -> None:
    for a, n1, n0 in [(0.5, 10, 12), (0.8, 20, 20), (0.95, 5, 40), (1.0, 3, 3), (0.1, 7, 9)]:
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        se = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
        lo, hi = hanley_mcneil(a, n1, n0)
        assert float(lo) == pytest.approx(max(0.0, a - 1.959963984540054 * se))
        assert float(hi) == pytest.approx(min(1.0, a + 1.959963984540054 * se))


@pytest.mark.parametrize("chunk", [3, 10**9])
def test_feature_aurocs_matches_sklearn_per_feature(monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(scores, "AUROC_CHUNK_ENTRIES", chunk)  # small chunks exercise the split
    rng = np.random.default_rng(1)
    for _ in range(15):
        n_docs, n_features = int(rng.integers(4, 50)), int(rng.integers(1, 30))
        dense, doc, feat, val, pos, neg = random_case(rng, n_docs, n_features)
        r = feature_aurocs(doc, feat, val, n_features, pos, neg)
        for f in range(n_features):
            assert r["auroc"][f] == pytest.approx(dense_auc(dense[:, f], pos, neg), abs=1e-12)
            if not dense[:, f].any():
                assert r["auroc"][f] == 0.5
            assert r["pos_rate"][f] == pytest.approx((dense[pos, f] > 0).mean())
            assert r["neg_rate"][f] == pytest.approx((dense[neg, f] > 0).mean())
            assert r["pos_fires"][f] == (dense[pos, f] > 0).sum()
        lo, hi = hanley_mcneil(r["auroc"], len(pos), len(neg))
        np.testing.assert_array_equal(r["lo"], lo)
        np.testing.assert_array_equal(r["hi"], hi)


def test_feature_aurocs_accepts_unsorted_and_duplicate_triples() -> None:
    rng = np.random.default_rng(2)
    dense, doc, feat, val, pos, neg = random_case(rng, 30, 8)
    expected = feature_aurocs(doc, feat, val, 8, pos, neg)
    perm = rng.permutation(len(doc))
    # Duplicates carry a smaller value: the max per (doc, feature) must win.
    d2 = np.r_[doc[perm], doc[:5]]
    f2 = np.r_[feat[perm], feat[:5]]
    v2 = np.r_[val[perm], val[:5] * 0.1]
    got = feature_aurocs(d2, f2, v2, 8, pos, neg)
    np.testing.assert_array_equal(got["auroc"], expected["auroc"])


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


# ----------------------------------------------------------------------------------- logit lens


class StubTokenizer:
    def __init__(self, vocab: list[str], raw: list[str] | None = None) -> None:
        self.vocab, self.raw = vocab, raw

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.raw[i] if self.raw else self.vocab[i]


def test_logit_lens_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, vocab, k = 37, 8, 50, 6
    dirs = torch.randn(n, d, generator=gen)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    unembed = torch.randn(vocab, d, generator=gen)
    norm_w = torch.rand(d, generator=gen) + 0.5
    tok = StubTokenizer([f"t{i}" for i in range(vocab)])
    for w in (norm_w, None):
        promoted, suppressed = logit_lens(dirs, unembed, w, tok, k=k, block=5)
        logits = (dirs * (w if w is not None else 1.0)).double() @ unembed.double().T
        top = torch.argsort(logits, dim=1, descending=True)[:, :k]
        bottom = torch.argsort(logits, dim=1)[:, :k]
        assert promoted == [[f"t{i}" for i in row] for row in top.tolist()]
        assert suppressed == [[f"t{i}" for i in row] for row in bottom.tolist()]
    # k larger than the vocabulary is capped; block larger than n is fine.
    p, s = logit_lens(dirs[:2], unembed[:4], None, tok, k=10, block=4096)
    assert [len(r) for r in p] == [4, 4] and sorted(p[0]) == sorted(s[0])


def test_readable_token_makes_whitespace_visible() -> None:
    tok = StubTokenizer([" hello", "\n", "\t x", "", "a\x00"])
    assert [readable_token(tok, i) for i in range(5)] == ["␣hello", "↵", "⇥␣x", "<3>", "a\\x00"]
    # SentencePiece: decode drops the word-initial space; the raw piece "▁the" gives it back.
    sp = StubTokenizer(["the", "", "of"], raw=["▁the", "<pad>", "of"])
    assert [readable_token(sp, i) for i in range(3)] == ["␣the", "<pad>", "of"]

    class NoRaw:
        def decode(self, ids: list[int]) -> str:
            return ""

    assert readable_token(NoRaw(), 7) == "<7>"


class _Head(torch.nn.Module):
    def __init__(self, vocab: int, d: int, norm: bool, model_type: str = "llama") -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        self.model = torch.nn.Module()
        if norm:
            self.model.norm = torch.nn.LayerNorm(d)
            torch.nn.init.uniform_(self.model.norm.weight)
        self.config = type("Cfg", (), {"model_type": model_type})()

    def get_output_embeddings(self):
        return self.lm_head


def test_model_unembedding_finds_head_and_norm() -> None:
    m = _Head(11, 4, norm=True)
    unembed, w = model_unembedding(m)
    assert torch.equal(unembed, m.lm_head.weight) and torch.equal(w, m.model.norm.weight)
    gemma = _Head(11, 4, norm=True, model_type="gemma2")
    _, wg = model_unembedding(gemma)
    assert torch.allclose(wg, gemma.model.norm.weight + 1.0)
    assert model_unembedding(_Head(11, 4, norm=False))[1] is None

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ModelLoadError, match="output embedding"):
        model_unembedding(NoHead())


# ------------------------------------------------------------------------------------ Neuronpedia


def _expl(index, description, layer="6-res-jb", model="gpt2-small", **extra) -> dict:
    return {
        "id": f"e{index}{description[:3]}",
        "modelId": model,
        "layer": layer,
        "index": index,
        "description": description,
        "authorId": "x",
        "typeName": "oai_token-act-pair",
        "explanationModelName": "gpt-4o-mini",
        **extra,
    }


def test_import_neuronpedia_export_directory(tmp_path: Path) -> None:
    source = tmp_path / "exports" / "gpt2-small" / "6-res-jb"
    (source / "explanations").mkdir(parents=True)
    (source / "features").mkdir()
    b0 = [_expl("3", "the word 'bomb'"), _expl("3", "weapons"), _expl("0", " code ")]
    b1 = [_expl("7", "fraud"), _expl("9999", "too far"), _expl("3", "the word 'bomb'")]
    with gzip.open(source / "explanations" / "batch-0.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(e) for e in b0) + "\n")
    (source / "explanations" / "batch-1.jsonl").write_text("\n".join(json.dumps(e) for e in b1) + "\n")
    (source / "features" / "batch-0.jsonl").write_text(
        json.dumps({"modelId": "gpt2-small", "layer": "6-res-jb", "index": "5", "maxActApprox": 3.0}) + "\n"
    )
    (source / "release.jsonl").write_text("{}\n")

    for path in (source, tmp_path / "exports"):
        with pytest.warns(
            RuntimeWarning, match=r"ignored 1 Neuronpedia explanation\(s\) with index >= n_features"
        ):
            df = import_neuronpedia(path, 100)
        assert list(df.columns) == ["feature", "label", "explanation"]
        assert df["feature"].tolist() == [0, 3, 7] and df["feature"].dtype == np.int64
        assert df["label"].tolist() == ["code", "the word 'bomb'", "fraud"]
        assert df.loc[1, "explanation"] == "the word 'bomb' | weapons"


def test_import_neuronpedia_single_files(tmp_path: Path) -> None:
    items = [_expl(2, "negation"), _expl("4", "insecure code", typeName=None)]
    as_json = tmp_path / "explanations.json"
    as_json.write_text(json.dumps(items))
    as_jsonl_gz = tmp_path / "explanations.jsonl.gz"
    with gzip.open(as_jsonl_gz, "wt") as f:
        f.write("\n".join(json.dumps(e) for e in items))
    # The API's feature JSON: explanations nested in a feature object.
    feature_json = tmp_path / "feature.json"
    feature_json.write_text(
        json.dumps(
            {
                "modelId": "gpt2-small",
                "layer": "6-res-jb",
                "index": "4",
                "explanations": [{"description": "insecure code"}],
            }
        )
    )
    for p in (as_json, as_jsonl_gz):
        df = import_neuronpedia(p, 5)
        assert df.to_dict("list") == {
            "feature": [2, 4],
            "label": ["negation", "insecure code"],
            "explanation": ["negation", "insecure code"],
        }
    assert import_neuronpedia(feature_json, 5).to_dict("list") == {
        "feature": [4],
        "label": ["insecure code"],
        "explanation": ["insecure code"],
    }


def test_import_neuronpedia_rejects_other_files(tmp_path: Path) -> None:
    not_export = tmp_path / "config.json"
    not_export.write_text(json.dumps({"d_sae": 16384, "hook_name": "blocks.6.hook_resid_post"}))
    with pytest.raises(CorpusError, match="not a Neuronpedia export"):
        import_neuronpedia(not_export, 10)
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(CorpusError):
        import_neuronpedia(garbage, 10)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match=r"explanations/batch-N"):
        import_neuronpedia(tmp_path / "empty_dir", 10)
    with pytest.raises(CorpusError, match="does not exist"):
        import_neuronpedia(tmp_path / "nope", 10)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([_expl(1, "a"), _expl(1, "b", layer="8-res-jb")]))
    with pytest.raises(CorpusError, match="mixes explanations of 2 SAEs"):
        import_neuronpedia(mixed, 10)


def test_import_neuronpedia_features_only_export_warns(tmp_path: Path) -> None:
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "batch-0.jsonl").write_text(json.dumps({"index": "1", "maxActApprox": 2}) + "\n")
    with pytest.warns(RuntimeWarning, match="no explanations"):
        df = import_neuronpedia(tmp_path, 10)
    assert df.empty and list(df.columns) == ["feature", "label", "explanation"]
    merged = pd.DataFrame({"feature": np.arange(3)}).merge(df, on="feature", how="left")
    assert merged["label"].isna().all()
