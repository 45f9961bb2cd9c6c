"""One loaded cache (`CacheData`) and the per-feature questions the pages ask of it.

Why this shape: every Streamlit session of the server shares one `CacheData` (st.cache_resource in
explorer/state.py), so arrays are loaded once, not per session. Lookups that the pages do on every
rerun (a feature's row, its neighbours, its examples, search) are numpy/arrow indexing, never a scan
of a Python list. Nothing here depends on Streamlit: plain data in, data out, unit-testable.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from explorer.data.examples import ExampleStore
from explorer.data.search import (
    SearchCache,
    SearchIndex,
    build_index,
    dense_threshold,
    digit_rows,
    label_text,
    rank_features,
    snippet_html,
)

T = TypeVar("T")
DERIVED_KEEP = 16  # derived values kept per cache (CacheData.derived): the map's layers are 5 per max_points


@dataclass(frozen=True)
class Neighbors:
    """neighbors.npz: top-k decoder-cosine neighbours of every feature (self excluded), and the nulls."""

    indices: np.ndarray  # int32 [n, k]
    cosine: np.ndarray  # float32 [n, k]
    z_isotropic: np.ndarray  # float32 [n, k]: standard deviations above the isotropic null only
    null_cosine: float  # the flagging null: max(null_isotropic, null_covariance)
    fpr: float  # the probability that random directions exceed either null
    d: int
    null_kind: str = "isotropic"  # which null `null_cosine` is: "covariance" or "isotropic"
    null_isotropic: float = float("nan")  # what uniformly random directions reach
    null_covariance: float = float("nan")  # what random directions with the decoder's moments reach
    nearest_sorted: np.ndarray = field(default_factory=lambda: np.zeros(0))  # sorted finite cosine[:, 0]

    def percentile(self, cos: Any) -> np.ndarray:
        """Percentile (0-100) of each cosine among every feature's nearest-neighbour cosine (as
        overlaps.parquet `cosine_percentile`); NaN where the cosine is NaN or there is no list."""
        c = np.asarray(cos, dtype=np.float64)
        v = self.nearest_sorted
        if v.size == 0:
            return np.full(c.shape, np.nan)
        return np.where(np.isnan(c), np.nan, 100.0 * np.searchsorted(v, c, side="right") / v.size)


@dataclass
class CacheData:
    """Everything the explorer shows, loaded from one cache directory."""

    path: Path
    manifest: dict[str, Any]
    features: pd.DataFrame  # row i = feature i; scalar columns + 'hover'
    lists: pa.Table  # top_promoted, top_suppressed (kept in arrow: cheap for 262k features)
    neighbors: Neighbors
    overlaps: pd.DataFrame
    examples: ExampleStore
    histograms: tuple[np.ndarray, int] | None = None
    category_rates: pa.Table | None = None
    documents: pd.DataFrame | None = None
    groups: list[str] = field(default_factory=list)
    _cr_offsets: np.ndarray | None = None
    _search_text: pa.Array | None = None
    _index: SearchIndex | None = None
    _prep: tuple[pa.Array, pa.Array, tuple[np.ndarray, np.ndarray], float] | None = None
    _prep_lock: threading.Lock = field(default_factory=threading.Lock)
    _index_lock: threading.Lock = field(default_factory=threading.Lock)
    _searches: SearchCache = field(default_factory=SearchCache)
    _derived: OrderedDict[Hashable, Any] = field(default_factory=OrderedDict)
    _derived_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def n(self) -> int:
        return len(self.features)

    @property
    def null_cosine(self) -> float:
        return self.neighbors.null_cosine

    @property
    def null_label(self) -> str:
        """'covariance null' or 'isotropic null': the null `null_cosine` is (captions name it)."""
        return f"{self.neighbors.null_kind} null"

    def derived(self, key: Hashable, build: Callable[[], T]) -> T:
        """The value `build` computes from this cache alone, built once per `key` and kept (the last
        DERIVED_KEEP): e.g. the map's layers, which no selection changes. Every session shares it, so the
        caller must not mutate it."""
        with self._derived_lock:  # one build per key, even when sessions ask at once
            if key in self._derived:
                self._derived.move_to_end(key)
            else:
                self._derived[key] = build()
                while len(self._derived) > DERIVED_KEEP:
                    self._derived.popitem(last=False)
            return cast(T, self._derived[key])

    def valid(self, feature: Any) -> bool:
        try:
            f = int(feature)
        except (TypeError, ValueError):
            return False
        return 0 <= f < self.n

    def row(self, feature: int) -> dict[str, Any]:
        """Scalar columns of one feature as a dict, plus its logit-lens token lists."""
        rec = cast(dict[str, Any], self.features.iloc[int(feature)].to_dict())  # the columns are str
        for col in ("top_promoted", "top_suppressed"):
            val = self.lists.column(col)[int(feature)].as_py() if col in self.lists.column_names else None
            rec[col] = list(val or [])
        return rec

    def group_rates(self, feature: int) -> dict[str, float]:
        """Firing rate per corpus group (freq_<group> columns)."""
        r = self.features.iloc[int(feature)]
        return {g: float(r[f"freq_{g}"]) for g in self.groups}

    def category_rates_of(self, feature: int) -> pd.DataFrame:
        """Long-format (group, category, frequency) rows of one feature; empty without the file."""
        if self.category_rates is None or self._cr_offsets is None:
            return pd.DataFrame(columns=["group", "category", "frequency"])
        lo, hi = self._cr_offsets[int(feature)], self._cr_offsets[int(feature) + 1]
        return self.category_rates.slice(lo, hi - lo).select(["group", "category", "frequency"]).to_pandas()

    def histogram(self, feature: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(bin edges, counts) of the firing activations, or None when absent."""
        if self.histograms is None:
            return None
        counts, bins = self.histograms
        mx = float(self.features["max_activation"].to_numpy()[int(feature)])
        return np.linspace(0.0, mx if mx > 0 else 1.0, bins + 1), counts[int(feature)]

    def neighbours_of(self, feature: int, threshold: float | None = None) -> pd.DataFrame:
        """The feature's neighbour list joined with the neighbours' scores, descending cosine."""
        f = int(feature)
        nb = self.neighbors
        idx = nb.indices[f].astype(np.int64)
        cos = nb.cosine[f].astype(np.float64)
        ok = (idx >= 0) & (idx < self.n) & (idx != f) & np.isfinite(cos)
        z = nb.z_isotropic[f].astype(np.float64)
        df = pd.DataFrame(
            {
                "rank": np.arange(len(idx)),
                "feature": idx,
                "cosine": cos,
                "percentile": nb.percentile(cos),
                "z_isotropic": z,
            }
        )[ok]
        if threshold is not None:
            df = df[df["cosine"] >= threshold]
        cols = ["label", "harm_score", "task_score", "harm_category", "is_harmful", "frequency"]
        info = self.features.iloc[df["feature"].to_numpy()][cols].reset_index(drop=True)
        df = pd.concat([df.reset_index(drop=True), info], axis=1)
        df["ratio"] = df["cosine"] / self.null_cosine if self.null_cosine > 0 else np.nan
        return df

    def examples_of(self, feature: int) -> list[dict[str, Any]]:
        return self.examples.for_feature(int(feature))

    def pair(self, task: int, harmful: int) -> dict[str, Any]:
        """The overlaps row for (task, harmful), or what the neighbour lists say when unflagged."""
        o = self.overlaps
        hit = o[(o["task_feature"] == task) & (o["harmful_feature"] == harmful)]
        if len(hit):
            return cast(dict[str, Any], hit.iloc[0].to_dict())
        nb = self.neighbours_of(task)
        m = nb[nb["feature"] == harmful]
        cos = float(m["cosine"].to_numpy()[0]) if len(m) else float("nan")
        z = float(m["z_isotropic"].to_numpy()[0]) if len(m) else float("nan")
        return {
            "task_feature": task,
            "harmful_feature": harmful,
            "cosine": cos,
            "cosine_percentile": float(self.neighbors.percentile(cos)),
            "cosine_excess": cos - self.null_cosine,
            "z_isotropic": z,
            "risk": float("nan"),
            "coactivation": float("nan"),
            "null_cosine": self.null_cosine,
        }

    def default_pair(self) -> tuple[int, int] | None:
        """The top-risk flagged pair (overlaps.parquet), or None when the cache flags none: a pair the
        cache does not flag is never offered as one."""
        if len(self.overlaps):
            top = self.overlaps.sort_values("risk", ascending=False).iloc[0]
            return int(top["task_feature"]), int(top["harmful_feature"])
        return None

    def default_feature(self) -> int:
        """The feature a page opens on: the top flagged pair's task feature, else the task feature with the
        highest task score, else the harmful feature with the highest harm score, else the highest task
        score (a cache that flags nothing)."""
        pair = self.default_pair()
        if pair:
            return pair[0]
        f = self.features
        for flag, col in (("is_task", "task_score"), ("is_harmful", "harm_score"), (None, "task_score")):
            score = f[col].to_numpy(dtype=np.float64, na_value=np.nan)
            ok = np.isfinite(score) & (f[flag].to_numpy(dtype=bool) if flag else True)
            if np.any(ok):
                return int(np.argmax(np.where(ok, score, -np.inf)))
        return 0

    def search(self, query: str, limit: int | None = None, examples: bool = True) -> pd.DataFrame:
        """Features whose id, label, explanation, logit-lens tokens or top-example text match `query`,
        ranked by match strength (explorer/data/search.py documents the score): the features rows plus
        score, act_match, label_match, lens_match, dense, ex_rank, ex_token and 'match'. All matches
        unless `limit`; rankings are kept per query, so paging does not search again."""
        key = f"{int(examples)}:{query.strip()}"
        res = self._searches.get(key)
        if res is None:
            # an id ("17", "#17") is looked up, not searched for in example text (digits match everywhere)
            examples = examples and not query.strip().lstrip("#").isdigit()
            idx = self.search_index() if examples else None
            labels, lens, digits, dense = self._search_prep()
            res = rank_features(self.features, lens, idx, query, labels, digits, dense)
            self._searches.put(key, res)
        return res if limit is None else res.head(limit)

    def _search_prep(self) -> tuple[pa.Array, pa.Array, tuple[np.ndarray, np.ndarray], float]:
        """What every ranking reads and no query changes, computed once: the labels and lens text, their
        rows holding a digit (an id query tests those alone) and the density threshold."""
        with self._prep_lock:
            if self._prep is None:
                labels, lens = label_text(self.features), self._lens_text()
                freq = self.features["frequency"].to_numpy(dtype=np.float64, na_value=0.0)
                self._prep = (labels, lens, (digit_rows(labels), digit_rows(lens)), dense_threshold(freq))
            return self._prep

    def prepare_search(self) -> None:
        """Everything a search reads, built ahead of the first query (the loader runs it in a thread)."""
        self._search_prep()
        self.search_index()

    def search_index(self) -> SearchIndex:
        """The example-text index (built once per cache, on first use or by the loader's thread)."""
        with self._index_lock:
            if self._index is None:
                self._index = build_index(
                    self.examples.scan(["feature", "kind", "rank", "tokens", "activations"])
                )
            return self._index

    def snippet(self, feature: int, ex_rank: int, ex_token: int, query: str) -> str:
        """Escaped HTML of the searched example (top, `ex_rank`) around the match, the match in <mark>
        (at the firing token starting at byte `ex_token` of its lower-cased text when >= 0); '' if none."""
        if ex_rank < 0:
            return ""
        t = self.examples.rows(int(feature))
        for rec in t.filter(pc.equal(t.column("kind"), "top")).to_pylist():
            if rec.get("rank") == ex_rank:
                return snippet_html(list(rec.get("tokens") or []), query, ex_token)
        return ""

    def _lens_text(self) -> pa.Array:
        """Explanations (imported, and featuregeom explain's) and logit-lens promoted tokens of every
        feature (what T of the score searches)."""
        if self._search_text is None:
            f = self.features
            expl = pa.array(f["explanation"].fillna("").astype(str).to_numpy(dtype=object), pa.string())
            parts = [expl]
            if "auto_explanation" in f.columns:
                auto = f["auto_explanation"].fillna("").astype(str).to_numpy(dtype=object)
                parts.append(pa.array(auto, pa.string()))
            if "top_promoted" in self.lists.column_names:
                toks = self.lists.column("top_promoted").combine_chunks()
                parts.append(pc.fill_null(pc.binary_join(toks, " "), ""))
            self._search_text = pc.binary_join_element_wise(*parts, " | ") if len(parts) > 1 else expl
        return self._search_text
