"""Feature search ranked by how strongly each feature matches the query, with a snippet per result.

Why a score and not "label hits first, then task score": a query names text, so the best answer is the
feature that *fires on that text*, not the one that happens to score high on the task; and a feature
that fires on a large share of all tokens fires on the query too without being about it.

The score (case-insensitive substring match of the query q):

    score(f) = (W_ACT * A + W_LABEL * L + W_LENS * T) * D

    A  activation on the match: the largest activation of f on a token overlapping an occurrence of q
       in f's first top examples (kind "top", rank < MAX_RANK), divided by f's `max_activation`,
       clipped to [0, 1]; 0 when q occurs in none of them or f is silent on it.
    L  1 when f's `label` contains q, else 0.
    T  1 when f's `explanation` or logit-lens promoted tokens (`top_promoted`) contain q, else 0.
    D  density penalty: min(1, dense / frequency), dense = DENSE_FACTOR x the median `frequency` of the
       features that fire; a feature firing on more than `dense` of all tokens is flagged `dense`.

Features with L, T or a text occurrence are results (even at score 0: they match, weakly); ties are
broken by lower frequency (the more specific feature), then by id. An id query ("17", "#17") puts that
feature first and is not looked for in example text (CacheData.search). Nothing here depends on Streamlit.
"""

from __future__ import annotations

import html
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

W_ACT, W_LABEL, W_LENS = 0.6, 0.3, 0.1
DENSE_FACTOR = 10.0  # "dense": fires on more than 10x the median feature's share of tokens
MAX_RANK = 3  # top examples per feature that are searched (the index holds their text)
SNIPPET_TOKENS = 12  # tokens shown either side of the match
RESULT_COLUMNS = ["score", "act_match", "label_match", "lens_match", "dense", "ex_rank", "ex_start"]


@dataclass(frozen=True)
class SearchIndex:
    """The searched examples, one row each: lower-cased text and the tokens where the feature fires."""

    feature: np.ndarray  # int64 [rows]
    rank: np.ndarray  # int64 [rows]
    text: pa.Array  # lower-cased joined tokens (arrow utf8_lower keeps one code point per code point)
    nz_ptr: np.ndarray  # int64 [rows + 1]: row r's firing tokens are nz_*[nz_ptr[r]:nz_ptr[r + 1]]
    nz_start: np.ndarray  # int32: first code point of a firing token in the row's text
    nz_end: np.ndarray  # int32: one past its last code point
    nz_val: np.ndarray  # float32: its activation


def _flat_offsets(lst: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row of each flattened value, value count per row) of a list array (slices handled)."""
    counts = pc.fill_null(pc.list_value_length(lst), 0).to_numpy().astype(np.int64)
    return np.repeat(np.arange(len(counts)), counts), counts


def build_index(chunks: Iterable[pa.Table], max_rank: int = MAX_RANK) -> SearchIndex:
    """The index over tables with columns feature, kind, rank, tokens, activations."""
    feats, ranks, texts, ptrs, starts, ends, vals = [], [], [], [], [], [], []
    n_nz = 0
    for t in chunks:
        t = t.filter(pc.and_(pc.equal(t.column("kind"), "top"), pc.less(t.column("rank"), max_rank)))
        if t.num_rows == 0:
            continue
        toks = t.column("tokens").combine_chunks()
        acts = t.column("activations").combine_chunks()
        row_of, counts = _flat_offsets(toks)
        low = pc.utf8_lower(pc.list_flatten(toks))
        length = pc.fill_null(pc.utf8_length(low), 0).to_numpy().astype(np.int64)
        end = np.cumsum(length)
        row_start = np.concatenate([[0], np.cumsum(counts)])[:-1]
        base = np.concatenate([[0], end])[row_start]  # text offset of each row's first token
        end = end - base[row_of]
        a = pc.fill_null(pc.list_flatten(acts), 0.0).to_numpy(zero_copy_only=False).astype(np.float32)
        if len(a) != len(length):  # a malformed row: no activations to rank by, the text still searchable
            a = np.zeros(len(length), np.float32)
        nz = a > 0
        feats.append(t.column("feature").to_numpy().astype(np.int64))
        ranks.append(t.column("rank").to_numpy().astype(np.int64))
        joined = pc.binary_join(toks, "")
        texts.append(pc.fill_null(pc.utf8_lower(joined), ""))
        ptrs.append(n_nz + np.cumsum(np.bincount(row_of[nz], minlength=t.num_rows)))
        starts.append((end - length)[nz])
        ends.append(end[nz])
        vals.append(a[nz])
        n_nz += int(nz.sum())

    def cat(xs: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)

    return SearchIndex(
        feature=cat(feats, np.int64),
        rank=cat(ranks, np.int64),
        text=pa.concat_arrays(texts) if texts else pa.array([], pa.string()),
        nz_ptr=np.concatenate([[0], cat(ptrs, np.int64)]).astype(np.int64),
        nz_start=cat(starts, np.int32),
        nz_end=cat(ends, np.int32),
        nz_val=cat(vals, np.float32),
    )


def lower(text: str) -> str:
    """Lower-case exactly as the index does (arrow's utf8_lower, not str.lower)."""
    return str(pc.utf8_lower(pa.scalar(text, pa.string())).as_py())


def occurrences(text: str, q: str) -> np.ndarray:
    """Start of every (possibly overlapping) occurrence of q in text."""
    out, i = [], text.find(q)
    while i >= 0:
        out.append(i)
        i = text.find(q, i + 1)
    return np.asarray(out, np.int64)


def match_activation(idx: SearchIndex, row: int, starts: np.ndarray, lq: int) -> tuple[float, int]:
    """(largest activation on a token overlapping an occurrence, that occurrence's start) of one row;
    (0, first occurrence) when the feature is silent on every occurrence."""
    lo, hi = idx.nz_ptr[row], idx.nz_ptr[row + 1]
    a, b = idx.nz_start[lo:hi].astype(np.int64), idx.nz_end[lo:hi].astype(np.int64)
    v = idx.nz_val[lo:hi]
    # token [a, b) overlaps occurrence [s, s + lq) when a - lq < s < b: the first start after a - lq
    k = np.searchsorted(starts, a - lq + 1, side="left")
    s = starts[np.minimum(k, len(starts) - 1)]
    hit = (k < len(starts)) & (s < b) & (b > a)
    if not np.any(hit):
        return 0.0, int(starts[0])
    j = int(np.argmax(np.where(hit, v, -np.inf)))
    return float(v[j]), int(s[j])


def dense_threshold(frequency: np.ndarray) -> float:
    f = frequency[np.isfinite(frequency) & (frequency > 0)]
    return float(DENSE_FACTOR * np.median(f)) if len(f) else float("inf")


def rank_features(
    features: pd.DataFrame, lens_text: pa.Array, idx: SearchIndex | None, query: str
) -> pd.DataFrame:
    """Every feature matching `query`, best first: the features rows plus RESULT_COLUMNS and 'match'."""
    q = query.strip()
    n = len(features)
    empty = features.iloc[:0].assign(**{c: pd.Series(dtype="float64") for c in RESULT_COLUMNS}, match="")
    if not q:
        return empty
    ql = lower(q)
    lab = features["label"].fillna("").astype(str).to_numpy(dtype=object)
    label_hit = pc.match_substring(pa.array(lab, pa.string()), ql, ignore_case=True)
    L = label_hit.to_numpy(zero_copy_only=False).astype(np.float64)
    T = pc.match_substring(lens_text, ql, ignore_case=True).to_numpy(zero_copy_only=False).astype(np.float64)
    act = np.zeros(n)
    text_hit = np.zeros(n, bool)
    ex_rank = np.full(n, -1, np.int64)
    ex_start = np.full(n, -1, np.int64)
    if idx is not None and len(idx.feature):
        rows = np.flatnonzero(pc.match_substring(idx.text, ql).to_numpy(zero_copy_only=False))
        texts = idx.text.take(pa.array(rows, pa.int64())).to_pylist()
        for r, t in zip(rows.tolist(), texts, strict=True):
            f = int(idx.feature[r])
            if not 0 <= f < n:
                continue
            v, s = match_activation(idx, r, occurrences(t, ql), len(ql))
            if not text_hit[f] or v > act[f]:
                act[f], ex_rank[f], ex_start[f] = v, idx.rank[r], s
            text_hit[f] = True
    mx = features["max_activation"].to_numpy(dtype=np.float64, na_value=np.nan)
    A = np.clip(np.where(mx > 0, act / np.where(mx > 0, mx, 1.0), 0.0), 0.0, 1.0)
    freq = features["frequency"].to_numpy(dtype=np.float64, na_value=0.0)
    dense = dense_threshold(freq)
    D = np.where(freq > dense, dense / np.maximum(freq, 1e-300), 1.0)
    score = (W_ACT * A + W_LABEL * L + W_LENS * T) * D
    ids = np.flatnonzero(text_hit | (L > 0) | (T > 0))
    digits = q.lstrip("#")
    pinned = int(digits) if digits.isdigit() and int(digits) < n else None
    order = ids[np.lexsort((ids, freq[ids], -score[ids]))]
    if pinned is not None:
        order = np.concatenate([[pinned], order[order != pinned]])
    res = features.iloc[order].copy()
    res["score"] = score[order]
    res["act_match"] = A[order]
    res["label_match"] = L[order] > 0
    res["lens_match"] = T[order] > 0
    res["dense"] = freq[order] > dense
    res["ex_rank"] = ex_rank[order]
    res["ex_start"] = ex_start[order]
    why = np.where(L[order] > 0, "label", np.where(T[order] > 0, "logit lens / explanation", "examples"))
    if pinned is not None:
        why[0] = "id"
    res["match"] = why
    return res


def snippet_html(tokens: list[str], start: int, q_len: int, context: int = SNIPPET_TOKENS) -> str:
    """The example's text around the occurrence at code point `start` (of its lower-cased text), escaped,
    the tokens it overlaps in <mark>; '' when there is none."""
    if start < 0 or not tokens:
        return ""
    low_len = np.asarray([len(lower(t)) for t in tokens], np.int64)
    end = np.cumsum(low_len)
    begin = end - low_len
    inside = np.flatnonzero((begin < start + q_len) & (end > start) & (end > begin))
    if not len(inside):
        return ""
    lo, hi = max(0, int(inside[0]) - context), min(len(tokens), int(inside[-1]) + context + 1)
    parts = []
    for i in range(lo, hi):
        t = html.escape(re.sub(r"\s{2,}", " ", tokens[i].replace("\n", " ⏎ ")))
        parts.append(f"<mark>{t}</mark>" if inside[0] <= i <= inside[-1] else t)
    return ("… " if lo > 0 else "") + "".join(parts) + (" …" if hi < len(tokens) else "")


class SearchCache:
    """The last few queries' rankings, shared by every session (a page flip does not search again)."""

    def __init__(self, size: int = 32):
        self._lock = threading.Lock()
        self._items: OrderedDict[str, pd.DataFrame] = OrderedDict()
        self._size = size

    def get(self, key: str) -> pd.DataFrame | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: str, value: pd.DataFrame) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)
