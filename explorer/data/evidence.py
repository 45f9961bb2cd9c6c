"""A feature's evidence by text group: which stored examples come from a group (or one harm category),
its activation histogram split by group with each group's share of its firings, and the whole
document an example comes from. Pure data access (no Streamlit); docs/cache.md names the files.

Examples of a group are the harvest's `group_top` rows (the exact top contexts within the group)
joined with every other stored example whose peak lies on that group's documents, strongest first, so
a filter never hides what the cache holds; for one category of it, its `category_top` rows (the exact
top within that category) lead. A cache harvested before `group_top` (`category_top`) shows only what
the other kinds hold, and says so (`GroupExamples.exact`, `exact_category`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from explorer.data.npz_map import map_npz
from precompute import schema

GROUP_TOP = "group_top"  # examples.parquet kind: top contexts within one corpus group
GROUP_QUANTILE = "group_quantile"  # examples.parquet kind: quantile samples within one corpus group
CATEGORY_TOP = "category_top"  # examples.parquet kind: top contexts within one (group, category)


@dataclass
class GroupExamples:
    """The stored examples of one feature on one group (and category), strongest first."""

    examples: list[dict[str, Any]]
    exact: bool  # the cache holds the group's exact top (group_top rows), not only what the global top has
    per_group: int  # group_top examples the cache keeps per group (0 when it has none)
    exact_category: bool = False  # the cache holds the category's exact top (category_top rows)
    per_category: int = 0  # category_top examples the cache keeps per category (0 when it has none)


def group_examples(examples: list[dict[str, Any]], group: str, category: str | None = None) -> GroupExamples:
    """Every stored example of a feature whose peak is on a document of `group` (and `category`),
    one per context, by activation, strongest first. Of a context's rows the most specific wins: with a
    category, its category_top row (peak on that category's tokens), then the group_top row, then a top
    or quantile row; without one, the group_top row first. The group's quantile samples are not among
    them (`group_quantiles`): they are drawn to show weaker activations."""
    kinds = {e.get("kind") for e in examples}
    specific = (CATEGORY_TOP, GROUP_TOP) if category is not None else (GROUP_TOP, CATEGORY_TOP)
    priority = {kind: len(specific) - i for i, kind in enumerate(specific)}  # others 0
    best: dict[Any, dict[str, Any]] = {}
    for e in examples:
        if e.get("group") != group or (category is not None and e.get("category") != category):
            continue
        if e.get("kind") == GROUP_QUANTILE:
            continue
        key = e.get("context_id")
        old = best.get(key)
        if old is None or priority.get(str(e.get("kind")), 0) > priority.get(str(old.get("kind")), 0):
            best[key] = e
    rows = sorted(
        best.values(), key=lambda e: (-float(e.get("max_activation") or 0.0), e.get("context_id") or 0)
    )
    return GroupExamples(
        rows,
        GROUP_TOP in kinds,
        _per_subset(examples, GROUP_TOP),
        CATEGORY_TOP in kinds,
        _per_subset(examples, CATEGORY_TOP),
    )


def _per_subset(examples: list[dict[str, Any]], kind: str) -> int:
    """How many examples of `kind` the cache keeps per group (category): the largest rank + 1 seen."""
    return max((int(e.get("rank") or 0) + 1 for e in examples if e.get("kind") == kind), default=0)


def group_quantiles(
    examples: list[dict[str, Any]], group: str, category: str | None = None
) -> list[dict[str, Any]]:
    """The feature's quantile samples within `group` (and `category`): contexts drawn from each of its
    activation intervals on that group's documents, strongest interval first."""
    rows = [
        e
        for e in examples
        if e.get("kind") == GROUP_QUANTILE
        and e.get("group") == group
        and (category is None or e.get("category") == category)
    ]
    return sorted(rows, key=lambda e: (-float(e.get("quantile") or 0.0), int(e.get("rank") or 0)))


def shown_span(n: int, center: int | None, window: int | None) -> tuple[int, int]:
    """The tokens [lo, hi) of an n-token context that the pages show: `window` tokens either side of the peak
    `center`, or the whole context (no window, no peak, or a context that short)."""
    if window is None or center is None or n <= 2 * window + 1:
        return 0, n
    return max(0, center - window), min(n, center + window + 1)


def same_passage(a: dict[str, Any], b: dict[str, Any], window: int | None) -> bool:
    """Whether two examples show one passage of one document: the same document, and, aligned at their peaks,
    the token windows the page shows overlap over at least half of the shorter one and agree token for token
    there. A document that repeats a passage (code quoted back in an answer, a line of a loop) gives such
    pairs from different contexts; a context kept both as a `top` and a `group_top` example is one trivially."""
    if a.get("doc_id") is None or a.get("doc_id") != b.get("doc_id"):
        return False
    ta, tb = list(a.get("tokens") or []), list(b.get("tokens") or [])
    pa, pb = a.get("max_position"), b.get("max_position")
    if not ta or not tb or pa is None or pb is None or not (0 <= pa < len(ta) and 0 <= pb < len(tb)):
        return False
    (la, ha), (lb, hb) = shown_span(len(ta), pa, window), shown_span(len(tb), pb, window)
    lo, hi = max(la - pa, lb - pb), min(ha - pa, hb - pb)  # offsets from the peak both windows show
    if 2 * (hi - lo) < min(ha - la, hb - lb):
        return False
    return all(ta[pa + o] == tb[pb + o] for o in range(lo, hi))


@dataclass
class MergedExamples:
    """Examples with each passage of a document shown once: each kept example (a copy) carries `repeats`, how
    many weaker examples of the same passage it stands for; `n_merged` is their total."""

    examples: list[dict[str, Any]]
    n_merged: int


def merge_repeats(examples: list[dict[str, Any]], window: int | None) -> MergedExamples:
    """`examples` in their order, but each passage of a document once (`same_passage` at this `window`): the
    example with the higher activation is kept (on a tie the earlier one) and counts the others as repeats."""
    order = sorted(range(len(examples)), key=lambda i: (-float(examples[i].get("max_activation") or 0.0), i))
    kept: dict[int, int] = {}  # index of a kept example -> how many it stands for
    for i in order:
        home = next((k for k in kept if same_passage(examples[k], examples[i], window)), None)
        if home is None:
            kept[i] = 0
        else:
            kept[home] += 1
    rows = [{**examples[i], "repeats": kept[i]} for i in sorted(kept)]
    return MergedExamples(rows, len(examples) - len(rows))


def group_peaks(examples: list[dict[str, Any]], groups: list[str]) -> dict[str, float | None]:
    """Each group's strongest stored activation (its #1 group_top example), None where the cache holds
    no example of the group; empty for a cache without group_top rows."""
    if not any(e.get("kind") == GROUP_TOP for e in examples):
        return {}
    best: dict[str, float | None] = dict.fromkeys(groups)
    for e in examples:
        g = e.get("group")
        if e.get("kind") == GROUP_TOP and g in best:
            v = float(e.get("max_activation") or 0.0)
            best[g] = v if best[g] is None else max(v, best[g])  # type: ignore[type-var]
    return best


def harm_categories(cache: Any, feature: int, examples: list[dict[str, Any]]) -> list[str]:
    """The harm categories a reviewer can filter by: every category of the cache's harmful documents
    (documents.parquet), else those the feature's category rates or examples name; sorted."""
    cats: set[str] = set()
    docs = getattr(cache, "documents", None)
    if docs is not None and "category" in docs and "group" in docs:
        cats |= {str(c) for c in docs.loc[docs["group"] == "harmful", "category"].dropna().unique()}
    if not cats:
        rates = cache.category_rates_of(feature)
        cats |= {str(c) for c in rates.loc[rates["group"] == "harmful", "category"].dropna()}
        cats |= {str(e["category"]) for e in examples if e.get("group") == "harmful" and e.get("category")}
    return sorted(cats)


def category_rate(cache: Any, feature: int, group: str, category: str) -> float:
    """Firing rate of the feature on one category's tokens (category_rates.parquet); 0 when it never
    fires there (the file lists only firing rows), NaN when the cache has no such file."""
    if getattr(cache, "category_rates", None) is None:
        return float("nan")
    rates = cache.category_rates_of(feature)
    hit = rates[(rates["group"] == group) & (rates["category"] == category)]
    return float(hit["frequency"].iloc[0]) if len(hit) else 0.0


# ------------------------------------------------------------------------------ histograms by group
_HIST_LOCK = threading.Lock()
_HIST: dict[tuple[str, float], tuple[np.ndarray, list[str]] | None] = {}


def _group_histograms(path: Path) -> tuple[np.ndarray, list[str]] | None:
    """(counts_group [n, groups, bins], groups) of histograms.npz, read once per file version; None
    for a cache harvested before per-group histograms (or without the file)."""
    file = path / schema.HISTOGRAMS
    if not file.is_file():
        return None
    key = (str(file), file.stat().st_mtime)
    with _HIST_LOCK:
        if key not in _HIST:
            z = map_npz(file)  # mapped: ~210 MB at 262k features, of which a page reads one row
            _HIST[key] = (
                (z["counts_group"], [str(g) for g in z["groups"].tolist()])
                if {"counts_group", "groups"} <= set(z)
                else None
            )
        return _HIST[key]


@dataclass
class GroupHistogram:
    edges: np.ndarray  # [bins + 1]: 0 .. the feature's max activation
    counts: dict[str, np.ndarray]  # group -> firing tokens per bin
    share: dict[str, float]  # group -> its share of all the feature's firing tokens (sums to 1)
    rate: dict[str, float]  # group -> firing rate on the group's tokens (features.parquet freq_<group>)


def group_histogram(cache: Any, feature: int) -> GroupHistogram | None:
    """The feature's activation histogram split by group, or None when the cache has no split."""
    found = _group_histograms(Path(cache.path))
    if found is None:
        return None
    counts, groups = found
    f = int(feature)
    if counts.shape[0] != cache.n:
        return None
    per = {g: counts[f, i].astype(np.int64) for i, g in enumerate(groups)}
    total = sum(int(c.sum()) for c in per.values())
    mx = float(cache.features["max_activation"].to_numpy()[f])
    rates = cache.group_rates(f)
    return GroupHistogram(
        edges=np.linspace(0.0, mx if mx > 0 else 1.0, counts.shape[2] + 1),
        counts=per,
        share={g: (int(c.sum()) / total if total else 0.0) for g, c in per.items()},
        rate={g: float(rates.get(g, float("nan"))) for g in groups},
    )


# ------------------------------------------------------------------------------------ documents
@dataclass
class DocumentView:
    doc_id: int
    group: str
    category: str | None
    source: str | None
    n_tokens: int
    text: str | None  # the whole text, None when the cache does not hold it
    preview: str


def document(cache: Any, doc_id: int) -> DocumentView | None:
    """One document of documents.parquet, or None when the cache does not list it."""
    docs = getattr(cache, "documents", None)
    if docs is None or doc_id not in docs.index:
        return None
    row = docs.loc[doc_id]
    text = row.get("text") if "text" in docs else None
    src = row.get("source_path")
    return DocumentView(
        doc_id=int(doc_id),
        group=str(row.get("group") or ""),
        category=row.get("category") if isinstance(row.get("category"), str) else None,
        source=str(src).replace("\\", "/").rsplit("/", 1)[-1] if isinstance(src, str) else None,
        n_tokens=int(row.get("n_tokens") or 0),
        text=text if isinstance(text, str) and not pd.isna(text) else None,
        preview=str(row.get("text_preview") or ""),
    )


def locate(text: str, tokens: list[str], peak: int | None) -> tuple[int, int] | None:
    """Where an example's context lies in its document's text: (start, end) characters of the longest
    stretch of the context's decoded tokens found verbatim, around the peak; None when no stretch of
    at least a few characters is found (chat-template tokens are not in the text)."""
    if not tokens or not text:
        return None
    center = peak if peak is not None and 0 <= peak < len(tokens) else len(tokens) // 2
    lo, hi = center, center + 1
    at = text.find("".join(tokens[lo:hi])) if "".join(tokens[lo:hi]).strip() else -1
    if at < 0:
        return None
    while True:  # grow the stretch while it still occurs in the text
        grown = False
        for a, b in ((lo - 1, hi), (lo, hi + 1)):
            if 0 <= a and b <= len(tokens):
                pos = text.find("".join(tokens[a:b]))
                if pos >= 0:
                    lo, hi, at, grown = a, b, pos, True
                    break
        if not grown:
            break
    piece = "".join(tokens[lo:hi])
    return (at, at + len(piece)) if len(piece.strip()) >= 3 else None
