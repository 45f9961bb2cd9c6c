"""Per-feature scores: how harmful / how task-specific a feature is, what it writes to the logits,
and what Neuronpedia calls it.

Everything here is a pure function of arrays, tensors or one export path, so the pipeline, the
tests and any notebook call the same code.

Scores are AUROCs of a feature's *per-document max activation* (SCIENCE.md section 2, and
docs/cache.md `features.parquet`): "how well does this feature, read as a document classifier,
separate group A from group B". AUROC is threshold-free, scale-free (an SAE feature's activation
scale is arbitrary) and has a natural null of 0.5, which is what the explorer needs to rank
16k features on one axis. Documents where a feature never fires count as activation 0, so the
computation only ever touches the sparse non-zeros plus one tied block of zeros per side.

Confidence bounds use the Hanley & McNeil (1982) standard error. It is cheap and vectorises,
but it is a normal approximation: at AUROC exactly 0 or 1 its SE is 0, so with a handful of
documents a perfect separation reads as [1, 1]. That is why every flag below also asks the
feature to fire on at least `min_docs` documents of the group it is said to detect.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from precompute.errors import CacheError, CorpusError, ModelLoadError

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # two-sided 95% normal quantile

# Entries (non-zero (doc, feature) pairs) handled at once by `feature_aurocs`; bounds the
# temporaries at a few hundred MB whatever the corpus size.
AUROC_CHUNK_ENTRIES = 4_000_000

# Document groups (precompute.data.corpus.GROUPS).
HARMFUL, BENIGN, TASK, CONTROL, GENERAL = "harmful", "benign", "task", "control", "general"


# --------------------------------------------------------------------------------------------
# AUROC on sparse per-document maxima
# --------------------------------------------------------------------------------------------


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


def _prepare(
    doc: np.ndarray, feat: np.ndarray, val: np.ndarray, n_features: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triples ready for `_aurocs_prepared`: deduplicated, zeros dropped (they equal absent
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


def _aurocs_prepared(
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
    """AUROC of every feature's per-document max activation, positive vs negative documents.

    `doc, feat, val` are the sparse triples of `harvest.doc_feature_max` (sorted by feature, then
    doc; unsorted input is sorted, duplicate pairs reduced to their max). Documents absent for a
    feature have value 0; documents in neither set are ignored.

    Returns float64 arrays [n_features]: `auroc`, `lo`, `hi` (Hanley-McNeil 95%), `pos_rate`,
    `neg_rate` (fraction of the side's documents where the feature fires, i.e. value > 0), and
    int64 `pos_fires`, `neg_fires` (those counts). A feature without non-zeros gets exactly 0.5;
    with an empty side every AUROC is NaN (and that side's rate too).

    Cost: one sort of the non-zero entries by (feature, value), then O(nnz) per comparison: the
    implicit zeros of a feature are one tied block whose rank is known without sorting.
    """
    return _aurocs_prepared(*_prepare(doc, feat, val, n_features), n_features, positive_docs, negative_docs)


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


# --------------------------------------------------------------------------------------------
# Harm and task scores
# --------------------------------------------------------------------------------------------


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
    doc, feat, val = _prepare(doc, feat, val, n_features)
    if len(doc) and doc.max() >= len(doc_group):
        raise CacheError(
            f"the harvest shards refer to document id {int(doc.max())} but only {len(doc_group)} documents are "
            "listed; documents.parquet and harvest/ come from different runs - rerun `featuregeom harvest`"
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
    overall = _aurocs_prepared(doc, feat, val, n_features, ids[HARMFUL], ids[BENIGN])
    by_cat: dict[str, list[int]] = {}
    for d in ids[HARMFUL].tolist():
        key = _category_key(doc_category[d])
        if key is not None:
            by_cat.setdefault(key, []).append(d)
    cats = {c: np.asarray(v, np.int64) for c, v in sorted(by_cat.items()) if len(v) >= min_docs}
    z_adj = float(_norm_isf(0.025 / (1 + len(cats))))

    def adjusted_lo(r: dict) -> np.ndarray:
        se = (r["auroc"] - r["lo"]) / 1.959963984540054
        return np.clip(r["auroc"] - z_adj * se, 0.0, 1.0)

    harm_score = overall["auroc"].astype(np.float64).copy()
    harm_lo = adjusted_lo(overall)
    pos_fires = overall["pos_fires"].copy()
    harm_category = np.full(n_features, None, dtype=object)
    best_cat_lo = np.full(n_features, -np.inf)
    best_cat = np.full(n_features, None, dtype=object)
    for c, docs_c in cats.items():
        r = _aurocs_prepared(doc, feat, val, n_features, docs_c, ids[BENIGN])
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
        task = _aurocs_prepared(doc, feat, val, n_features, ids[TASK], reference)
        task_score, task_lo = task["auroc"], task["lo"]
        is_task = (task_score >= task_threshold) & (task_lo > 0.5) & (task["pos_fires"] >= min_docs)
    else:
        task_score = task_lo = np.full(n_features, np.nan)
        is_task = np.zeros(n_features, bool)
    if ids[TASK].size and ids[CONTROL].size:
        tc = _aurocs_prepared(doc, feat, val, n_features, ids[TASK], ids[CONTROL])
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
# Logit lens
# --------------------------------------------------------------------------------------------

_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def readable_token(tokenizer: Any, token_id: int) -> str:
    """One token as a short readable string with its whitespace made visible.

    Space -> "␣", newline -> "↵", tab -> "⇥", CR -> "␍", other control characters -> \\xNN.
    Uses `tokenizer.decode([id])`; SentencePiece tokenizers drop a word-initial space when
    decoding one token, so a raw token starting with "▁" gets its "␣" back. A token that decodes
    to nothing falls back to its raw vocabulary string, then to "<id>"."""
    try:
        text = tokenizer.decode([int(token_id)])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one id still gets a label
        text = ""
    raw = None
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is not None:
        try:
            raw = convert(int(token_id))
        except Exception:  # noqa: BLE001
            raw = None
    if isinstance(raw, str) and raw.startswith("▁") and not text.startswith(" "):
        text = " " + text if text else raw.replace("▁", " ")
    if not text:
        text = raw if isinstance(raw, str) and raw else f"<{int(token_id)}>"
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) == "Cc":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


@torch.no_grad()
def logit_lens(
    directions: torch.Tensor,
    unembed: torch.Tensor,
    final_norm_weight: torch.Tensor | None,
    tokenizer: Any,
    k: int = 10,
    block: int = 1024,
) -> tuple[list[list[str]], list[list[str]]]:
    """Top-k promoted and bottom-k suppressed tokens of each (unit) decoder direction.

    logits = (direction * final_norm_weight) @ unembed.T: the direct effect of writing the
    direction into the residual stream, through the final norm's elementwise gain (its
    normalisation and bias do not change the ranking of one direction's logits, and final-logit
    soft-capping is monotone). Computed in float32 on `unembed`'s device, `block` directions at
    a time, so memory is O(block x vocab). Promoted lists run from the largest logit down,
    suppressed lists from the most negative up. Tokens are rendered by `readable_token`.
    """
    if directions.ndim != 2 or unembed.ndim != 2 or directions.shape[1] != unembed.shape[1]:
        raise ValueError(
            f"directions {tuple(directions.shape)} and unembed {tuple(unembed.shape)} must be "
            "[n, d] and [vocab, d]"
        )
    if final_norm_weight is not None and final_norm_weight.shape[-1] != unembed.shape[1]:
        raise ValueError(
            f"final_norm_weight {tuple(final_norm_weight.shape)} does not match d={unembed.shape[1]}"
        )
    vocab = unembed.shape[0]
    k = max(0, min(int(k), vocab))
    device = unembed.device
    U = unembed.to(torch.float32)
    w = final_norm_weight.to(device, torch.float32) if final_norm_weight is not None else None
    memo: dict[int, str] = {}

    def render(ids: torch.Tensor) -> list[list[str]]:
        rows = []
        for row in ids.cpu().tolist():
            names = []
            for t in row:
                if t not in memo:
                    memo[t] = readable_token(tokenizer, t)
                names.append(memo[t])
            rows.append(names)
        return rows

    promoted: list[list[str]] = []
    suppressed: list[list[str]] = []
    n = directions.shape[0]
    step = max(1, int(block))
    for s in range(0, n, step):
        D = directions[s : s + step].to(device, torch.float32)
        if w is not None:
            D = D * w
        logits = D @ U.T
        if k == 0:
            promoted.extend([] for _ in range(D.shape[0]))
            suppressed.extend([] for _ in range(D.shape[0]))
            continue
        promoted.extend(render(torch.topk(logits, k, dim=1, largest=True, sorted=True).indices))
        suppressed.extend(render(torch.topk(logits, k, dim=1, largest=False, sorted=True).indices))
    return promoted, suppressed


_FINAL_NORM_PATHS = (
    "model.norm",  # Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM ...
    "model.language_model.norm",  # multimodal wrappers (Gemma-3, Llava-style)
    "language_model.model.norm",
    "transformer.ln_f",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.final_layer_norm",  # Pythia / GPT-NeoX
    "model.decoder.final_layer_norm",  # OPT
    "model.final_layernorm",  # Phi-1/2
    "transformer.norm_f",
    "backbone.norm_f",  # Mamba
)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def model_unembedding(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(unembed [vocab, d], final-norm gain [d] or None) of a Hugging Face causal LM.

    The unembedding is `model.get_output_embeddings().weight`. The final norm is looked up at the
    usual attribute paths (`model.norm` for Llama-like models, `transformer.ln_f`, ...). Gemma's
    RMSNorm multiplies by (1 + weight), so for Gemma models the returned gain is 1 + weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        raise ModelLoadError(
            f"{type(model).__name__} has no output embedding (lm_head); the logit lens needs a causal language "
            "model - skip it by not loading the model for the scores step"
        )
    unembed = weight.detach()
    norm_w = None
    for path in _FINAL_NORM_PATHS:
        module = _get_path(model, path)
        w = getattr(module, "weight", None) if module is not None else None
        if isinstance(w, torch.Tensor) and w.ndim == 1 and w.shape[0] == unembed.shape[1]:
            norm_w = w.detach()
            model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
            if model_type.startswith("gemma") or "Gemma" in type(module).__name__:
                norm_w = norm_w.float() + 1.0
            break
    if norm_w is None:
        log.info("no final norm found on %s; logit lens uses the raw unembedding", type(model).__name__)
    return unembed, norm_w


# --------------------------------------------------------------------------------------------
# Neuronpedia import
# --------------------------------------------------------------------------------------------

_BATCH_RE = re.compile(r"batch-(\d+)\.jsonl?(\.gz)?$")


def _open_text(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_json_records(path: Path) -> Iterator[Any]:
    """Objects of a JSON file (a list, or one object) or a JSONL file (one object a line)."""
    try:
        with _open_text(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CorpusError(f"cannot read Neuronpedia export {path}: {e}") from e
    stripped = text.lstrip()
    if not stripped:
        return
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        data = None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(
                    f"{path} line {lineno} is not JSON ({e.msg}); expected a Neuronpedia export "
                    "(JSON list or JSONL of explanation objects)"
                ) from e
        return
    if isinstance(data, list):
        yield from data
    else:
        yield data


def _explanations_in(record: Any) -> Iterator[dict]:
    """Explanation objects in one record: the record itself, or a feature's `explanations` list."""
    if not isinstance(record, dict):
        return
    if "description" in record and "index" in record:
        yield record
    nested = record.get("explanations")
    if isinstance(nested, list):
        for e in nested:
            if isinstance(e, dict) and "description" in e:
                if "index" not in e and "index" in record:
                    e = {**e, "index": record["index"]}
                if "layer" not in e and "layer" in record:
                    e = {**e, "layer": record["layer"]}
                if "modelId" not in e and "modelId" in record:
                    e = {**e, "modelId": record["modelId"]}
                yield e


def _batch_files(directory: Path) -> list[Path]:
    files = [p for p in directory.iterdir() if p.is_file() and _BATCH_RE.search(p.name)]
    return sorted(files, key=lambda p: (int(_BATCH_RE.search(p.name).group(1)), p.name))  # type: ignore[union-attr]


def _export_files(path: Path) -> list[Path]:
    """JSON(L) files of an export directory: explanations/ first, then features/."""
    roots = sorted(
        {
            p.parent.parent
            for sub in ("explanations", "features")
            for p in path.rglob(f"{sub}/batch-*")
            if _BATCH_RE.search(p.name)
        }
    )
    if not roots:
        raise CorpusError(
            f"{path} is not a Neuronpedia export: no explanations/batch-N.jsonl(.gz) or features/batch-N.jsonl(.gz) "
            "found under it; pass the export's source directory (exports/MODEL/SOURCE) or a JSON/JSONL file of "
            "explanations"
        )
    if len(roots) > 1:
        raise CorpusError(
            f"{path} holds {len(roots)} Neuronpedia sources ({', '.join(str(r) for r in roots[:4])}"
            f"{', ...' if len(roots) > 4 else ''}); pass the directory of the one that matches this SAE"
        )
    root = roots[0]
    files: list[Path] = []
    for sub in ("explanations", "features"):
        if (root / sub).is_dir():
            files.extend(_batch_files(root / sub))
    return files


def import_neuronpedia(path: str | Path, n_features: int) -> pd.DataFrame:
    """Feature labels from a Neuronpedia export: DataFrame[feature int64, label, explanation].

    `path` is either an export directory (`explanations/batch-N.jsonl(.gz)` and/or
    `features/batch-N.jsonl(.gz)`, as written by neuronpedia-utils `export-data.py`; a parent
    holding exactly one such source also works) or one JSON / JSONL file (gzip or not) holding
    explanation objects (`index`, `description`, optionally `typeName`, `explanationModelName`,
    `modelId`, `layer`), or feature objects with an `explanations` list (the API's feature JSON).

    One row per feature that has a non-empty description, sorted by feature. `label` is the first
    description met in reading order (explanation batches in batch order, then feature batches);
    `explanation` is every distinct description of the feature, in that order, joined with " | ".
    The first-met rule is deterministic and keeps the label Neuronpedia lists first (the export
    is ordered by index, then by insertion); no explanation score is exported to choose better.
    Indices >= n_features are ignored with one warning giving the count. Raises CorpusError when
    the path holds no explanation objects at all, or mixes several SAEs (model/layer pairs).
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"Neuronpedia export {path} does not exist")
    files = _export_files(path) if path.is_dir() else [path]

    descriptions: dict[int, list[str]] = {}
    sources: set[tuple[str, str]] = set()
    n_records = n_expl = n_out_of_range = n_bad_index = 0
    for file in files:
        records: Iterable[Any] = _read_json_records(file)
        for record in records:
            n_records += 1
            for e in _explanations_in(record):
                n_expl += 1
                if e.get("modelId") is not None or e.get("layer") is not None:
                    sources.add((str(e.get("modelId")), str(e.get("layer"))))
                try:
                    index = int(str(e["index"]).strip())
                except (TypeError, ValueError):
                    n_bad_index += 1
                    continue
                if index < 0:
                    n_bad_index += 1
                    continue
                if index >= n_features:
                    n_out_of_range += 1
                    continue
                desc = e.get("description")
                if not isinstance(desc, str) or not desc.strip():
                    continue
                lst = descriptions.setdefault(index, [])
                desc = desc.strip()
                if desc not in lst:
                    lst.append(desc)
    if n_expl == 0:
        if path.is_dir() and n_records:
            warnings.warn(
                f"Neuronpedia export {path} has feature records but no explanations; no labels imported",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            raise CorpusError(
                f"{path} is not a Neuronpedia export: found {n_records} record(s) but none with `index` and "
                '`description` (expected explanation objects like {"index": "12", "description": ...})'
            )
    if len(sources) > 1:
        listed = ", ".join(f"{m}/{layer}" for m, layer in sorted(sources)[:4])
        raise CorpusError(
            f"{path} mixes explanations of {len(sources)} SAEs ({listed}); pass an export of the one "
            "SAE this cache uses"
        )
    if n_out_of_range:
        warnings.warn(
            f"ignored {n_out_of_range} Neuronpedia explanation(s) with index >= n_features ({n_features}); "
            "is the export for a different (wider) SAE?",
            RuntimeWarning,
            stacklevel=2,
        )
    if n_bad_index:
        warnings.warn(
            f"ignored {n_bad_index} Neuronpedia explanation(s) with a missing or non-integer index",
            RuntimeWarning,
            stacklevel=2,
        )
    feats = sorted(descriptions)
    return pd.DataFrame(
        {
            "feature": np.asarray(feats, dtype=np.int64),
            "label": pd.Series([descriptions[f][0] for f in feats], dtype=object),
            "explanation": pd.Series([" | ".join(descriptions[f]) for f in feats], dtype=object),
        }
    )
