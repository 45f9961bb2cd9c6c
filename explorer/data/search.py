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
    T  1 when f's `explanation`, `auto_explanation` (featuregeom explain) or logit-lens promoted tokens
       (`top_promoted`) contain q, else 0.
    D  density penalty: min(1, dense / frequency), dense = DENSE_FACTOR x the median `frequency` of the
       features that fire; a feature firing on more than `dense` of all tokens is flagged `dense`.

Features with L, T or a text occurrence are results (even at score 0: they match, weakly); ties are
broken by lower frequency (the more specific feature), then by id. An id query ("17", "#17") puts that
feature first (pinned_id) and is not looked for in example text (CacheData.search). Nothing here depends on Streamlit.
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
RESULT_COLUMNS = ["score", "act_match", "label_match", "lens_match", "dense", "ex_rank", "ex_token"]
WINDOW_CHUNK = 1 << 20  # firing tokens tested per vectorised batch (bounds the gather's memory)


@dataclass(frozen=True)
class SearchIndex:
    """The searched examples, one row each: lower-cased text and the tokens where the feature fires.
    Offsets are in bytes of the lower-cased UTF-8 text (a query occurrence overlaps a token in bytes
    exactly when it does in characters)."""

    feature: np.ndarray  # int64 [rows]
    rank: np.ndarray  # int64 [rows]
    text: pa.Array  # large_string: lower-cased joined tokens (arrow utf8_lower, as the query)
    nz_row: np.ndarray  # int32: the row of each firing token
    nz_start: np.ndarray  # int32: its first byte in the row's text
    nz_end: np.ndarray  # int32: one past its last byte
    nz_val: np.ndarray  # float32: its activation

    def buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """(row offsets [rows + 1], text bytes) of `text`, zero-copy."""
        bufs = self.text.buffers()
        off = np.frombuffer(bufs[1], dtype=np.int64)[self.text.offset : self.text.offset + len(self.text) + 1]
        data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
        return off, data


def _flat_offsets(lst: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row of each flattened value, value count per row) of a list array (slices handled)."""
    counts = pc.fill_null(pc.list_value_length(lst), 0).to_numpy().astype(np.int64)
    return np.repeat(np.arange(len(counts)), counts), counts


def build_index(chunks: Iterable[pa.Table], max_rank: int = MAX_RANK) -> SearchIndex:
    """The index over tables with columns feature, kind, rank, tokens, activations."""
    feats, ranks, texts, rows, starts, ends, vals = [], [], [], [], [], [], []
    n_rows = 0
    for t in chunks:
        t = t.filter(pc.and_(pc.equal(t.column("kind"), "top"), pc.less(t.column("rank"), max_rank)))
        if t.num_rows == 0:
            continue
        toks = t.column("tokens").combine_chunks()
        acts = t.column("activations").combine_chunks()
        row_of, counts = _flat_offsets(toks)
        low = pc.fill_null(pc.utf8_lower(pc.list_flatten(toks)), "")
        length = pc.binary_length(low).to_numpy(zero_copy_only=False).astype(np.int64)
        end = np.cumsum(length)
        row_start = np.concatenate([[0], np.cumsum(counts)])[:-1]
        end = end - np.concatenate([[0], end])[row_start][row_of]  # offsets within each row
        a = pc.fill_null(pc.list_flatten(acts), 0.0).to_numpy(zero_copy_only=False).astype(np.float32)
        if len(a) != len(length):  # a malformed row: no activations to rank by, the text still searchable
            a = np.zeros(len(length), np.float32)
        nz = (a > 0) & (length > 0)
        feats.append(t.column("feature").to_numpy().astype(np.int64))
        ranks.append(t.column("rank").to_numpy().astype(np.int64))
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        joined = pc.binary_join(pa.ListArray.from_arrays(offsets, low), "")
        texts.append(pc.cast(pc.fill_null(joined, ""), pa.large_string()))
        rows.append(row_of[nz] + n_rows)
        starts.append((end - length)[nz])
        ends.append(end[nz])
        vals.append(a[nz])
        n_rows += t.num_rows

    def cat(xs: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)

    return SearchIndex(
        feature=cat(feats, np.int64),
        rank=cat(ranks, np.int64),
        text=pa.concat_arrays(texts) if texts else pa.array([], pa.large_string()),
        nz_row=cat(rows, np.int32),
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


def firing_on_match(idx: SearchIndex, matched: np.ndarray, q: bytes) -> np.ndarray:
    """Per firing token of the index: does it overlap an occurrence of q (False outside `matched` rows)?

    Token [a, b) overlaps an occurrence starting at s when a - len(q) < s < b, i.e. when the window
    [a - len(q) + 1, b + len(q) - 1) of its row contains q: one vectorised substring test per token."""
    hit = np.zeros(len(idx.nz_row), bool)
    cand = np.flatnonzero(matched[idx.nz_row])
    if not len(cand) or not q:
        return hit
    off, data = idx.buffers()
    lq = len(q)
    for c in range(0, len(cand), WINDOW_CHUNK):
        k = cand[c : c + WINDOW_CHUNK]
        r = idx.nz_row[k].astype(np.int64)
        lo = np.maximum(off[r], off[r] + idx.nz_start[k] - (lq - 1))
        hi = np.minimum(off[r + 1], off[r] + idx.nz_end[k] + (lq - 1))
        n = np.maximum(hi - lo, 0)
        w_off = np.concatenate([[0], np.cumsum(n)])
        gather = np.arange(w_off[-1], dtype=np.int64) - np.repeat(w_off[:-1] - lo, n)
        windows = pa.BinaryArray.from_buffers(
            pa.large_binary(),
            len(k),
            [None, pa.py_buffer(w_off.astype(np.int64)), pa.py_buffer(data[gather])],
        )
        hit[k] = pc.match_substring(windows, q.decode("utf-8")).to_numpy(zero_copy_only=False)
    return hit


def dense_threshold(frequency: np.ndarray) -> float:
    f = frequency[np.isfinite(frequency) & (frequency > 0)]
    return float(DENSE_FACTOR * np.median(f)) if len(f) else float("inf")


def label_text(features: pd.DataFrame) -> pa.Array:
    return pa.array(features["label"].fillna("").astype(str).to_numpy(dtype=object), pa.string())


def pinned_id(query: str, n: int) -> int | None:
    """The feature an id query ("17", "#17") names, put first by rank_features; None for any other query
    (or an id out of range)."""
    digits = query.strip().lstrip("#")
    if not digits.isdigit():
        return None
    try:
        f = int(digits)
    except ValueError:  # digits int() does not read ('²')
        return None
    return f if f < n else None


ASCII_DIGITS = frozenset("0123456789")


def digit_rows(text: pa.Array) -> np.ndarray:
    """Rows of `text` holding an ASCII digit. A query with one matches only there: case-insensitive
    matching folds letters, and an ASCII digit matches nothing but itself (rank_features' `digit_rows`)."""
    has = pc.fill_null(pc.match_substring_regex(text, "[0-9]"), False)
    return np.flatnonzero(has.to_numpy(zero_copy_only=False))


def _text_hits(text: pa.Array, ql: str, rows: np.ndarray | None) -> np.ndarray:
    """1.0 where `text` contains ql (case-insensitive), else 0.0; only `rows` are tested when given (the
    others are known not to match)."""
    if rows is None:
        return (
            pc.match_substring(text, ql, ignore_case=True).to_numpy(zero_copy_only=False).astype(np.float64)
        )
    out = np.zeros(len(text))
    if len(rows):
        hit = pc.match_substring(text.take(pa.array(rows)), ql, ignore_case=True)
        out[rows] = hit.to_numpy(zero_copy_only=False).astype(np.float64)
    return out


def rank_features(
    features: pd.DataFrame,
    lens_text: pa.Array,
    idx: SearchIndex | None,
    query: str,
    labels: pa.Array | None = None,
    digit_rows: tuple[np.ndarray, np.ndarray] | None = None,
    dense: float | None = None,
) -> pd.DataFrame:
    """Every feature matching `query`, best first: the features rows plus RESULT_COLUMNS and 'match'.
    What a caller may keep between queries (the same results, quicker): `labels` = label_text(features),
    `digit_rows` = (digit_rows(labels), digit_rows(lens_text)): a query holding an ASCII digit (an id) is
    then tested on those rows only, and `dense` = dense_threshold(frequency)."""
    q = query.strip()
    n = len(features)
    if not q:
        return features.iloc[:0].assign(**{c: pd.Series(dtype="float64") for c in RESULT_COLUMNS}, match="")
    ql = lower(q)
    only = digit_rows if digit_rows is not None and not ASCII_DIGITS.isdisjoint(ql) else (None, None)
    L = _text_hits(label_text(features) if labels is None else labels, ql, only[0])
    T = _text_hits(lens_text, ql, only[1])
    act = np.zeros(n)
    text_hit = np.zeros(n, bool)
    ex_rank = np.full(n, -1, np.int64)
    ex_token = np.full(n, -1, np.int64)
    if idx is not None and len(idx.feature):
        matched = pc.match_substring(idx.text, ql).to_numpy(zero_copy_only=False).astype(bool)
        ok = matched & (idx.feature >= 0) & (idx.feature < n)
        rows = np.flatnonzero(ok)
        f_rows = idx.feature[rows]
        text_hit[f_rows] = True
        first = rows[np.unique(f_rows, return_index=True)[1]]  # a feature's first matching example
        ex_rank[idx.feature[first]] = idx.rank[first]
        hit = np.flatnonzero(firing_on_match(idx, ok, ql.encode("utf-8")))
        if len(hit):
            f_hit = idx.feature[idx.nz_row[hit]]
            best = hit[np.lexsort((-idx.nz_val[hit], f_hit))]  # by feature, strongest first
            f_best = idx.feature[idx.nz_row[best]]
            keep = np.concatenate([[True], f_best[1:] != f_best[:-1]])
            best, f_best = best[keep], f_best[keep]
            act[f_best] = idx.nz_val[best]
            ex_rank[f_best] = idx.rank[idx.nz_row[best]]
            ex_token[f_best] = idx.nz_start[best]
    ids = np.flatnonzero(text_hit | (L > 0) | (T > 0))
    pinned = pinned_id(q, n)
    # the score of the results alone (and of a pinned id that matches nothing): elementwise, as over all
    cand = ids if pinned is None else np.union1d(ids, [pinned])
    mx = features["max_activation"].to_numpy(dtype=np.float64, na_value=np.nan)[cand]
    A = np.clip(np.where(mx > 0, act[cand] / np.where(mx > 0, mx, 1.0), 0.0), 0.0, 1.0)
    freq_all = features["frequency"].to_numpy(dtype=np.float64, na_value=0.0)
    dense = dense_threshold(freq_all) if dense is None else dense
    freq = freq_all[cand]
    D = np.where(freq > dense, dense / np.maximum(freq, 1e-300), 1.0)
    score = (W_ACT * A + W_LABEL * L[cand] + W_LENS * T[cand]) * D
    at = np.searchsorted(cand, ids)  # each result's place in cand
    o = at[np.lexsort((ids, freq[at], -score[at]))]
    if pinned is not None:
        p = int(np.searchsorted(cand, pinned))
        o = np.concatenate([[p], o[o != p]])
    order = cand[o]
    res = features.iloc[order].copy()
    res["score"] = score[o]
    res["act_match"] = A[o]
    res["label_match"] = L[order] > 0
    res["lens_match"] = T[order] > 0
    res["dense"] = freq[o] > dense
    res["ex_rank"] = ex_rank[order]
    res["ex_token"] = ex_token[order]
    why = np.where(L[order] > 0, "label", np.where(T[order] > 0, "logit lens / explanation", "examples"))
    if pinned is not None:
        why[0] = "id"
    res["match"] = why
    return res


def snippet_html(tokens: list[str], query: str, token_byte: int = -1, context: int = SNIPPET_TOKENS) -> str:
    """The example's text around an occurrence of the query (the one overlapping the token that starts at
    byte `token_byte` of the lower-cased text, else the first), escaped, the tokens it covers in <mark>;
    '' when the query does not occur."""
    q = lower(query.strip())
    low = [lower(t) for t in tokens]
    text = "".join(low)
    occ = occurrences(text, q) if q else np.zeros(0, np.int64)
    if not len(occ):
        return ""
    chars = np.asarray([len(t) for t in low], np.int64)
    end = np.cumsum(chars)
    begin = end - chars
    s = int(occ[0])
    byte_starts = np.cumsum([0] + [len(t.encode("utf-8")) for t in low])[:-1]
    at = np.flatnonzero(byte_starts == token_byte)
    if token_byte >= 0 and len(at):
        i = int(at[0])
        over = occ[(occ < end[i]) & (occ + len(q) > begin[i])]
        s = int(over[0]) if len(over) else s
    inside = np.flatnonzero((begin < s + len(q)) & (end > s) & (end > begin))
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
