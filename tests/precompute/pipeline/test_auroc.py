"""Sparse AUROCs against sklearn, ties at zero, Hanley-McNeil bounds, chunking and unsorted input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from precompute.pipeline import auroc
from precompute.pipeline.auroc import auroc_sparse, feature_aurocs, hanley_mcneil

roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score


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
    monkeypatch.setattr(auroc, "AUROC_CHUNK_ENTRIES", chunk)  # small chunks exercise the split
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
