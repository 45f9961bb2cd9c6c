"""AUROCs of one value per (document, feature), on the sparse non-zeros only.

"How well does this feature, read as a document classifier, separate group A from group B". The
value is whatever the caller reduces each document to; the scores step passes the feature's max over
one window of the document (`precompute.pipeline.windows`), because a max over whole documents of
different lengths measures length (docs/science.md section 2). AUROC
is threshold-free, scale-free (an SAE feature's activation scale is arbitrary) and has a natural null
of 0.5. Documents where a feature never fires count as activation 0, so the computation only ever
touches the sparse non-zeros plus one tied block of zeros per side.

Confidence bounds use the Hanley & McNeil (1982) standard error. It is cheap and vectorises, but it
is a normal approximation: at AUROC exactly 0 or 1 its SE is 0, so with a handful of documents a
perfect separation reads as [1, 1] (`precompute.pipeline.scores` guards its flags against that).
"""

from __future__ import annotations

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile

# Entries (non-zero (doc, feature) pairs) handled at once by `feature_aurocs`; bounds the
# temporaries at a few hundred MB whatever the corpus size.
AUROC_CHUNK_ENTRIES = 4_000_000


def hanley_mcneil(auc: np.ndarray | float, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    """95% interval (lo, hi) of an AUROC from the Hanley & McNeil (1982) standard error.

    SE^2 = (A(1-A) + (n1-1)(Q1-A^2) + (n0-1)(Q2-A^2)) / (n1 n0), Q1 = A/(2-A), Q2 = 2A^2/(1+A).
    Bounds are clipped to [0, 1]; NaN where the AUROC is NaN."""
    a = np.asarray(auc, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        q1 = a / (2.0 - a)
        q2 = 2.0 * a * a / (1.0 + a)
        var = (a * (1.0 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
        se = np.sqrt(np.maximum(var, 0.0))
    lo = np.clip(a - Z95 * se, 0.0, 1.0)
    hi = np.clip(a + Z95 * se, 0.0, 1.0)
    return lo, hi


def _side_lookup(positive_docs: np.ndarray, negative_docs: np.ndarray, max_doc: int) -> np.ndarray:
    """int8 array over doc ids: +1 positive, -1 negative, 0 neither."""
    pos = np.unique(np.asarray(positive_docs, dtype=np.int64))
    neg = np.unique(np.asarray(negative_docs, dtype=np.int64))
    if (pos.size and pos[0] < 0) or (neg.size and neg[0] < 0):
        raise ValueError("document ids must be non-negative")
    both = np.intersect1d(pos, neg)
    if both.size:
        raise ValueError(f"{both.size} document(s) are on both sides of the AUROC, e.g. {both[:5].tolist()}")
    size = max(max_doc, int(pos[-1]) if pos.size else -1, int(neg[-1]) if neg.size else -1) + 1
    side = np.zeros(size, np.int8)
    side[pos] = 1
    side[neg] = -1
    return side


def _grouped_u(
    f: np.ndarray, v: np.ndarray, is_pos: np.ndarray, n_groups: int, n_pos: int, n_neg: int
) -> np.ndarray:
    """Mann-Whitney U (ties count half) of every group (feature) at once, without sorting.

    `f, v, is_pos` are the non-zero entries of documents on either side, sorted by (f, v); every
    other document of the group is an implicit 0, which forms one tied block per group sitting
    between its negative and positive values. All counts are integers or halves accumulated in
    float64 far below 2**53, so U is exact."""
    cnt_pos = np.bincount(f[is_pos], minlength=n_groups)
    cnt_neg = np.bincount(f[~is_pos], minlength=n_groups)
    zero_pos = (n_pos - cnt_pos).astype(np.float64)
    zero_neg = (n_neg - cnt_neg).astype(np.float64)
    # Negative-side entries below zero (SAE activations are > 0, but stay general).
    neg_below_zero = np.bincount(f[(v < 0) & ~is_pos], minlength=n_groups).astype(np.float64)
    u = zero_pos * (neg_below_zero + 0.5 * zero_neg)
    if len(f) == 0:
        return u
    starts = np.flatnonzero(np.r_[True, (f[1:] != f[:-1]) | (v[1:] != v[:-1])])
    size = np.diff(np.r_[starts, len(f)])
    gp = np.add.reduceat(is_pos.astype(np.int64), starts)
    gn = size - gp
    gf = f[starts]
    cum = np.cumsum(gn) - gn  # negatives before each tied block, across groups
    first = np.searchsorted(gf, gf, side="left")  # first tied block of the same group
    below = (cum - cum[first]).astype(np.float64) + np.where(v[starts] < 0, 0.0, zero_neg[gf])
    u += np.bincount(gf, weights=gp * (below + 0.5 * gn), minlength=n_groups)
    return u


def _sorted_unique_triples(
    doc: np.ndarray, feat: np.ndarray, val: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, feature, value) sorted by (feature, doc) with duplicate pairs reduced to their max."""
    doc = np.asarray(doc, dtype=np.int64).ravel()
    feat = np.asarray(feat, dtype=np.int64).ravel()
    val = np.asarray(val).ravel()
    if not (len(doc) == len(feat) == len(val)):
        raise ValueError(
            f"doc, feat and val must have the same length, got {len(doc)}, {len(feat)}, {len(val)}"
        )
    if len(doc) == 0:
        return doc, feat, val
    same_f = feat[1:] == feat[:-1]
    in_order = np.all((feat[1:] > feat[:-1]) | (same_f & (doc[1:] >= doc[:-1])))
    if not in_order:
        order = np.lexsort((doc, feat))
        doc, feat, val = doc[order], feat[order], val[order]
        same_f = feat[1:] == feat[:-1]
    dup = same_f & (doc[1:] == doc[:-1])
    if dup.any():
        starts = np.flatnonzero(np.r_[True, ~dup])
        doc, feat, val = doc[starts], feat[starts], np.maximum.reduceat(val, starts)
    return doc, feat, val


def prepare_triples(
    doc: np.ndarray, feat: np.ndarray, val: np.ndarray, n_features: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triples ready for `aurocs_prepared`: deduplicated, zeros dropped (they equal absent
    documents), sorted by (feature, value). The one sort is shared by every comparison."""
    doc, feat, val = _sorted_unique_triples(doc, feat, val)
    if len(feat) and (feat[0] < 0 or feat[-1] >= n_features):
        raise ValueError(f"feature ids must lie in [0, {n_features}), got {feat[0]}..{feat[-1]}")
    if len(doc) and doc.min() < 0:
        raise ValueError("document ids must be non-negative")
    nz = val != 0
    if not nz.all():
        doc, feat, val = doc[nz], feat[nz], val[nz]
    order = _order_by_feature_value(feat, val)
    return doc[order], feat[order], val[order].astype(np.float64)


def _order_by_feature_value(feat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Argsort by (feature, value). For float32 values (what harvest stores) one uint64 key
    (feature << 32 | order-preserving float bits) sorts ~5x faster than np.lexsort."""
    v32 = val.astype(np.float32, copy=False)
    if len(val) == 0 or feat.max() >= 2**32 or not np.array_equal(v32, val):
        return np.lexsort((val, feat))
    bits = v32.view(np.uint32)
    # IEEE order -> unsigned order: flip all bits of negatives, set the sign bit of the rest.
    bits = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    return np.argsort((feat.astype(np.uint64) << np.uint64(32)) | bits, kind="stable")


def aurocs_prepared(
    doc: np.ndarray,
    feat: np.ndarray,
    val: np.ndarray,
    n_features: int,
    positive_docs: np.ndarray,
    negative_docs: np.ndarray,
) -> dict[str, np.ndarray]:
    side = _side_lookup(positive_docs, negative_docs, int(doc.max()) if len(doc) else -1)
    n_pos, n_neg = int((side == 1).sum()), int((side == -1).sum())
    s = side[doc]
    keep = s != 0
    f, v, is_pos = feat[keep], val[keep], s[keep] == 1
    fires = v > 0
    pos_fires = np.bincount(f[is_pos & fires], minlength=n_features).astype(np.int64)
    neg_fires = np.bincount(f[~is_pos & fires], minlength=n_features).astype(np.int64)
    u = np.empty(n_features, np.float64)
    # Chunks of whole features holding about AUROC_CHUNK_ENTRIES entries each bound the temporaries.
    bounds = np.searchsorted(f, np.arange(n_features + 1))
    a = 0
    while a < n_features:
        b = int(np.searchsorted(bounds, bounds[a] + AUROC_CHUNK_ENTRIES, side="right")) - 1
        b = min(n_features, max(b, a + 1))
        lo_e, hi_e = bounds[a], bounds[b]
        u[a:b] = _grouped_u(f[lo_e:hi_e] - a, v[lo_e:hi_e], is_pos[lo_e:hi_e], b - a, n_pos, n_neg)
        a = b
    if n_pos == 0 or n_neg == 0:
        auroc = np.full(n_features, np.nan)
    else:
        auroc = u / (float(n_pos) * float(n_neg))
    lo, hi = hanley_mcneil(auroc, n_pos, n_neg)
    pos_rate = pos_fires / n_pos if n_pos else np.full(n_features, np.nan)
    neg_rate = neg_fires / n_neg if n_neg else np.full(n_features, np.nan)
    return {
        "auroc": auroc,
        "lo": lo,
        "hi": hi,
        "pos_rate": np.asarray(pos_rate, np.float64),
        "neg_rate": np.asarray(neg_rate, np.float64),
        "pos_fires": pos_fires,
        "neg_fires": neg_fires,
    }


def feature_aurocs(
    doc: np.ndarray,
    feat: np.ndarray,
    val: np.ndarray,
    n_features: int,
    positive_docs: np.ndarray,
    negative_docs: np.ndarray,
) -> dict[str, np.ndarray]:
    """AUROC of every feature's per-document value, positive vs negative documents.

    `doc, feat, val` are sparse triples such as `windows.window_feature_max` or
    `shards.doc_feature_max` return (sorted by feature, then doc; unsorted input is sorted,
    duplicate pairs reduced to their max). Documents absent for a
    feature have value 0; documents in neither set are ignored.

    Returns float64 arrays [n_features]: `auroc`, `lo`, `hi` (Hanley-McNeil 95%), `pos_rate`,
    `neg_rate` (fraction of the side's documents where the feature fires, i.e. value > 0), and
    int64 `pos_fires`, `neg_fires` (those counts). A feature without non-zeros gets exactly 0.5;
    with an empty side every AUROC is NaN (and that side's rate too).

    Cost: one sort of the non-zero entries by (feature, value), then O(nnz) per comparison: the
    implicit zeros of a feature are one tied block whose rank is known without sorting.
    """
    return aurocs_prepared(
        *prepare_triples(doc, feat, val, n_features), n_features, positive_docs, negative_docs
    )


def auroc_sparse(
    doc_ids: np.ndarray, values: np.ndarray, positive_docs: np.ndarray, negative_docs: np.ndarray
) -> tuple[float, float, float]:
    """(AUROC, lower95, upper95) of one feature whose non-zero per-document values are given.

    Documents not in `doc_ids` have value 0. AUROC is the Mann-Whitney statistic with ties
    counted half (identical to `sklearn.metrics.roc_auc_score` on the dense vector); bounds are
    Hanley-McNeil, clipped to [0, 1]. NaN for all three when either side has no documents."""
    doc_ids = np.asarray(doc_ids, dtype=np.int64).ravel()
    r = feature_aurocs(
        doc_ids, np.zeros(len(doc_ids), np.int64), np.asarray(values).ravel(), 1, positive_docs, negative_docs
    )
    return float(r["auroc"][0]), float(r["lo"][0]), float(r["hi"][0])
