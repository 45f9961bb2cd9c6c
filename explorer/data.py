"""Read one explorer cache into memory once per process, and answer per-feature lookups fast.

Why this shape: every Streamlit session of the server shares one `CacheData` (st.cache_resource in
explorer/state.py), so arrays are loaded once, not per session. Lookups that the pages do on every
rerun (a feature's row, its neighbours, its examples, search) are numpy/arrow indexing, never a scan
of a Python list. Big example files that are sorted by feature are read lazily, one parquet row group
at a time, so a 262k-feature cache does not hold every example in memory.

Nothing here depends on Streamlit: it is plain data in, data out, and unit-testable.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from precompute.cache import CORE_FILES, verify_cache
from precompute.errors import CacheError

GROUP_ORDER = ("task", "control", "harmful", "benign", "general")
OPTIONAL_FILES = ("histograms.npz", "category_rates.parquet", "documents.parquet")
REQUIRED_FEATURE_COLUMNS = (
    "feature",
    "umap_x",
    "umap_y",
    "frequency",
    "max_activation",
    "harm_score",
    "task_score",
)
REQUIRED_EXAMPLE_COLUMNS = ("feature", "rank", "kind", "tokens", "activations")
REQUIRED_OVERLAP_COLUMNS = ("task_feature", "harmful_feature", "cosine")
LAZY_EXAMPLES_BYTES = 48 << 20  # examples files above this (and sorted by feature) are read lazily


def escape_html(arr: pa.Array) -> pa.Array:
    """Vectorised html.escape(quote=True) for an arrow string array."""
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&#x27;")):
        arr = pc.replace_substring(arr, a, b)
    return arr


@dataclass(frozen=True)
class Neighbors:
    """neighbors.npz: top-k decoder-cosine neighbours of every feature (self excluded)."""

    indices: np.ndarray  # int32 [n, k]
    cosine: np.ndarray  # float32 [n, k]
    z: np.ndarray | None  # float32 [n, k]
    null_cosine: float
    fpr: float | None
    d: int | None


class ExampleStore:
    """Per-feature access to examples.parquet: in memory when small, by row group when big."""

    def __init__(self, path: Path, force_lazy: bool | None = None, cache_groups: int = 24):
        self.path = path
        pf = pq.ParquetFile(path)
        self._meta = pf.metadata
        names = pf.schema_arrow.names
        missing = [c for c in REQUIRED_EXAMPLE_COLUMNS if c not in names]
        if missing:
            raise CacheError(
                f"{path} lacks the column(s) {', '.join(missing)} (docs/cache.md); "
                "rerun the harvest step with this version of featuregeom"
            )
        self.columns = names
        feat = pf.read(columns=["feature"]).column("feature").to_numpy().astype(np.int64, copy=False)
        self.n_rows = len(feat)
        sorted_ = bool(np.all(feat[1:] >= feat[:-1])) if len(feat) > 1 else True
        big = path.stat().st_size > LAZY_EXAMPLES_BYTES
        self.lazy = (sorted_ and self._meta.num_row_groups > 1) and (
            big if force_lazy is None else force_lazy
        )
        self._lock = threading.Lock()
        self._search_lock = threading.Lock()
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()
        self._cache_groups = cache_groups
        self._search: tuple[np.ndarray, pa.Array] | None = None
        if sorted_:
            self._order = None
            self._sorted_feature = feat
        else:
            self._order = np.argsort(feat, kind="stable")
            self._sorted_feature = feat[self._order]
        rg_rows = [self._meta.row_group(i).num_rows for i in range(self._meta.num_row_groups)]
        self._rg_start = np.concatenate([[0], np.cumsum(rg_rows)]).astype(np.int64)
        self._table: pa.Table | None = None if self.lazy else pf.read()

    def _row_range(self, feature: int) -> tuple[int, int]:
        lo = int(np.searchsorted(self._sorted_feature, feature, side="left"))
        hi = int(np.searchsorted(self._sorted_feature, feature, side="right"))
        return lo, hi

    def _row_group(self, i: int) -> pa.Table:
        with self._lock:
            if i in self._groups:
                self._groups.move_to_end(i)
                return self._groups[i]
        with pq.ParquetFile(self.path, metadata=self._meta) as pf:  # own handle: thread-safe
            tbl = pf.read_row_group(i)
        with self._lock:
            self._groups[i] = tbl
            while len(self._groups) > self._cache_groups:
                self._groups.popitem(last=False)
        return tbl

    def rows(self, feature: int) -> pa.Table:
        """All example rows of one feature as an arrow table (may be empty)."""
        lo, hi = self._row_range(feature)
        if hi <= lo:
            empty = self._table if self._table is not None else self._row_group(0)
            return empty.slice(0, 0)
        if self._table is not None:
            if self._order is None:
                return self._table.slice(lo, hi - lo)
            return self._table.take(pa.array(self._order[lo:hi]))
        first = int(np.searchsorted(self._rg_start, lo, side="right") - 1)
        last = int(np.searchsorted(self._rg_start, hi - 1, side="right") - 1)
        parts = []
        for g in range(first, last + 1):
            g_lo, g_hi = self._rg_start[g], self._rg_start[g + 1]
            a, b = max(lo, g_lo) - g_lo, min(hi, g_hi) - g_lo
            parts.append(self._row_group(g).slice(a, b - a))
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def for_feature(self, feature: int) -> list[dict[str, Any]]:
        """Example dicts of one feature, top examples first (by rank), then quantile samples."""
        recs = self.rows(feature).to_pylist()
        recs.sort(key=lambda r: (r.get("kind") != "top", -(r.get("quantile") or 0.0), r.get("rank") or 0))
        return recs

    def search_index(self, max_rank: int = 3) -> tuple[np.ndarray, pa.Array]:
        """(feature ids, lower-cased text) of each feature's first top examples; built once."""
        with self._search_lock:  # a second caller waits for the first build instead of repeating it
            if self._search is None:
                self._search = self._build_search_index(max_rank)
            return self._search

    def _build_search_index(self, max_rank: int) -> tuple[np.ndarray, pa.Array]:
        feats: list[np.ndarray] = []
        texts: list[pa.Array] = []
        if self._table is not None:
            chunks: Any = [self._table.select(["feature", "kind", "rank", "tokens"])]
        else:  # stream the row groups, four columns only, bypassing the LRU
            chunks = (_read_cols(self.path, self._meta, i) for i in range(self._meta.num_row_groups))
        for t in chunks:
            mask = pc.and_(pc.equal(t.column("kind"), "top"), pc.less(t.column("rank"), max_rank))
            t = t.filter(mask)
            if t.num_rows == 0:
                continue
            feats.append(t.column("feature").to_numpy().astype(np.int64, copy=False))
            joined = pc.binary_join(t.column("tokens"), "")
            texts.append(
                pc.utf8_lower(joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined)
            )
        f = np.concatenate(feats) if feats else np.zeros(0, np.int64)
        txt = pa.concat_arrays(texts) if texts else pa.array([], pa.string())
        return f, txt


def _read_cols(path: Path, meta: Any, i: int) -> pa.Table:
    with pq.ParquetFile(path, metadata=meta) as pf:
        return pf.read_row_group(i, columns=["feature", "kind", "rank", "tokens"])


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

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def n(self) -> int:
        return len(self.features)

    @property
    def null_cosine(self) -> float:
        return self.neighbors.null_cosine

    def valid(self, feature: Any) -> bool:
        try:
            f = int(feature)
        except (TypeError, ValueError):
            return False
        return 0 <= f < self.n

    def row(self, feature: int) -> dict[str, Any]:
        """Scalar columns of one feature as a dict, plus its logit-lens token lists."""
        rec = self.features.iloc[int(feature)].to_dict()
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
        mx = float(self.features["max_activation"].iat[int(feature)])
        return np.linspace(0.0, mx if mx > 0 else 1.0, bins + 1), counts[int(feature)]

    def neighbours_of(self, feature: int, threshold: float | None = None) -> pd.DataFrame:
        """The feature's neighbour list joined with the neighbours' scores, descending cosine."""
        f = int(feature)
        nb = self.neighbors
        idx = nb.indices[f].astype(np.int64)
        cos = nb.cosine[f].astype(np.float64)
        ok = (idx >= 0) & (idx < self.n) & (idx != f) & np.isfinite(cos)
        z = nb.z[f].astype(np.float64) if nb.z is not None else np.full(len(idx), np.nan)
        df = pd.DataFrame({"rank": np.arange(len(idx)), "feature": idx, "cosine": cos, "z": z})[ok]
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
            return hit.iloc[0].to_dict()
        nb = self.neighbours_of(task)
        m = nb[nb["feature"] == harmful]
        cos = float(m["cosine"].iat[0]) if len(m) else float("nan")
        z = float(m["z"].iat[0]) if len(m) else float("nan")
        return {
            "task_feature": task,
            "harmful_feature": harmful,
            "cosine": cos,
            "z": z,
            "risk": float("nan"),
            "coactivation": float("nan"),
            "null_cosine": self.null_cosine,
        }

    def default_pair(self) -> tuple[int, int] | None:
        """The top-risk flagged pair, else the best task feature's nearest harmful neighbour."""
        if len(self.overlaps):
            col = "risk" if "risk" in self.overlaps else "cosine"
            top = self.overlaps.sort_values(col, ascending=False).iloc[0]
            return int(top["task_feature"]), int(top["harmful_feature"])
        f = self.features
        order = f.sort_values("task_score", ascending=False)["feature"].to_numpy()[:50]
        for t in order:
            nb = self.neighbours_of(int(t))
            h = nb[nb["is_harmful"]]
            if len(h):
                return int(t), int(h["feature"].iat[0])
        return None

    def default_feature(self) -> int:
        pair = self.default_pair()
        if pair:
            return pair[0]
        return int(self.features["task_score"].to_numpy().argmax()) if self.n else 0

    def search(self, query: str, limit: int = 50, examples: bool = True) -> pd.DataFrame:
        """Features whose id, label, explanation, logit-lens tokens or top-example text match.

        Case-insensitive substring match; label/token hits rank before example-text hits, then by
        task score. Returns the features rows (at most `limit`) with a 'match' column.
        """
        q = query.strip()
        if not q:
            return self.features.iloc[:0].assign(match=pd.Series(dtype="string"))
        digits = q.lstrip("#")
        hits: list[tuple[np.ndarray, str]] = []
        if digits.isdigit() and self.valid(digits):
            hits.append((np.array([int(digits)]), "id"))
        ql = q.lower()
        text = self._feature_search_text()
        m = pc.match_substring(text, ql, ignore_case=True).to_numpy(zero_copy_only=False)
        hits.append((np.flatnonzero(m), "label / tokens"))
        if examples and not digits.isdigit() and len(hits[-1][0]) < limit:
            ef, et = self.examples.search_index()
            if len(ef):
                em = pc.match_substring(et, ql).to_numpy(zero_copy_only=False)
                hits.append((np.unique(ef[em]), "top examples"))
        seen: set[int] = set()
        out_ids: list[int] = []
        out_match: list[str] = []
        for ids, why in hits:
            if why != "id":
                ids = ids[np.argsort(-self.features["task_score"].to_numpy()[ids], kind="stable")]
            for i in ids.tolist():
                if i not in seen:
                    seen.add(i)
                    out_ids.append(i)
                    out_match.append(why)
                if len(out_ids) >= limit:
                    break
            if len(out_ids) >= limit:
                break
        res = self.features.iloc[out_ids].copy()
        res["match"] = out_match
        return res

    def _feature_search_text(self) -> pa.Array:
        if self._search_text is None:
            f = self.features
            label = pa.array(f["label"].fillna("").astype(str).to_numpy(dtype=object), pa.string())
            expl = pa.array(f["explanation"].fillna("").astype(str).to_numpy(dtype=object), pa.string())
            parts = [label, expl]
            if "top_promoted" in self.lists.column_names:
                toks = self.lists.column("top_promoted").combine_chunks()
                parts.append(pc.fill_null(pc.binary_join(toks, " "), ""))
            self._search_text = pc.binary_join_element_wise(*parts, " | ")
        return self._search_text


# --------------------------------------------------------------------------------------------------
# loading


def _load_features(path: Path) -> tuple[pd.DataFrame, pa.Table, list[str]]:
    tbl = pq.read_table(path)
    missing = [c for c in REQUIRED_FEATURE_COLUMNS if c not in tbl.column_names]
    if missing:
        raise CacheError(
            f"{path} lacks the column(s) {', '.join(missing)} (docs/cache.md); "
            "rerun the geometry and scores steps with this version of featuregeom"
        )
    list_cols = [c for c in ("top_promoted", "top_suppressed") if c in tbl.column_names]
    tbl = tbl.sort_by("feature")
    lists = tbl.select(list_cols)
    scalar = tbl.drop_columns(list_cols)
    df = scalar.to_pandas()
    n = len(df)
    if n == 0:
        raise CacheError(f"{path} has no features")
    if not np.array_equal(df["feature"].to_numpy(), np.arange(n)):
        raise CacheError(f"{path}: the 'feature' column must hold 0..n-1 once each (docs/cache.md)")
    defaults: dict[str, Any] = {
        "label": None,
        "explanation": None,
        "harm_category": None,
        "mean_activation": np.nan,
        "harm_score_lo": np.nan,
        "task_control_score": np.nan,
    }
    for col, val in defaults.items():
        if col not in df:
            df[col] = val
    for col in ("label", "explanation", "harm_category"):
        df[col] = df[col].astype("string")
    if "dead" not in df:
        df["dead"] = df["frequency"].fillna(0) <= 0
    if "is_harmful" not in df:
        df["is_harmful"] = df["harm_score"].fillna(0.5) > 0.75
    if "is_task" not in df:
        df["is_task"] = df["task_score"].fillna(0.5) > 0.75
    for col in ("dead", "is_harmful", "is_task"):
        df[col] = df[col].fillna(False).astype(bool)
    groups = [g for g in GROUP_ORDER if f"freq_{g}" in df]
    groups += sorted(c[5:] for c in df if c.startswith("freq_") and c[5:] not in groups)
    df["hover"] = pd.Series(_hover_text(df, lists), dtype=object)  # object: free to_numpy() per rerun
    return df, lists, groups


def _hover_text(df: pd.DataFrame, lists: pa.Table) -> np.ndarray:
    """Per-feature hover text for the map, HTML-escaped (plotly renders tags in hover labels)."""
    ids = pa.array(df["feature"].astype(str).to_numpy(dtype=object), pa.string())
    label = pa.array(
        df["label"].fillna("(no label)").astype(str).str.slice(0, 80).to_numpy(dtype=object), pa.string()
    )
    scores = pa.array(
        (
            "harm "
            + df["harm_score"].map("{:.2f}".format)
            + " · task "
            + df["task_score"].map("{:.2f}".format)
            + " · fires "
            + (df["frequency"] * 100).map("{:.3g}%".format)
        ).to_numpy(dtype=object),
        pa.string(),
    )
    if "top_promoted" in lists.column_names:
        toks = pc.list_slice(lists.column("top_promoted").combine_chunks(), 0, 5)
        toks = pc.fill_null(pc.binary_join(toks, " "), "")
        toks = pc.replace_substring(toks, "\n", "↵")
        toks = pc.binary_join_element_wise("↑ ", escape_html(toks), "")
    else:
        toks = pa.array([""] * len(df), pa.string())
    parts = [
        pa.array(["#"] * len(df)),
        ids,
        pa.array([" "] * len(df)),
        escape_html(label),
        pa.array(["<br>"] * len(df)),
        scores,
        pa.array(["<br>"] * len(df)),
        toks,
    ]
    return np.asarray(pc.binary_join_element_wise(*parts, "").to_numpy(zero_copy_only=False), dtype=object)


def _load_neighbors(path: Path, n: int) -> Neighbors:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            for key in ("indices", "cosine", "null_cosine"):
                if key not in keys:
                    raise CacheError(f"{path} lacks '{key}' (docs/cache.md); rerun the geometry step")
            nb = Neighbors(
                indices=z["indices"].astype(np.int32, copy=False),
                cosine=z["cosine"].astype(np.float32, copy=False),
                z=z["z"].astype(np.float32, copy=False) if "z" in keys else None,
                null_cosine=float(z["null_cosine"]),
                fpr=float(z["fpr"]) if "fpr" in keys else None,
                d=int(z["d"]) if "d" in keys else None,
            )
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is not a readable npz file ({exc}); rerun the geometry step") from exc
    if nb.indices.ndim != 2 or nb.indices.shape[0] != n or nb.cosine.shape != nb.indices.shape:
        raise CacheError(
            f"{path}: indices/cosine must have shape [{n}, k], got {nb.indices.shape} and "
            f"{nb.cosine.shape}; rerun the geometry step"
        )
    return nb


def _load_overlaps(path: Path, features: pd.DataFrame) -> pd.DataFrame:
    if not path.is_file():
        df = pd.DataFrame(columns=list(REQUIRED_OVERLAP_COLUMNS))
    else:
        df = pq.read_table(path).to_pandas()
    missing = [c for c in REQUIRED_OVERLAP_COLUMNS if c not in df]
    if missing:
        raise CacheError(
            f"{path} lacks the column(s) {', '.join(missing)} (docs/cache.md); rerun the overlaps step"
        )
    n = len(features)
    df = df.astype({"task_feature": "int64", "harmful_feature": "int64"})
    bad = ~df["task_feature"].between(0, n - 1) | ~df["harmful_feature"].between(0, n - 1)
    if bad.any():
        raise CacheError(f"{path} names features outside 0..{n - 1}; rebuild the overlaps step")
    for col in ("z", "coactivation", "cond_coactivation", "risk", "null_cosine"):
        if col not in df:
            df[col] = np.nan
    if "harm_category" not in df:
        df["harm_category"] = features["harm_category"].to_numpy()[df["harmful_feature"].to_numpy()]
    for col, src in (("harm_score", "harm_score"), ("task_score", "task_score")):
        if col not in df:
            df[col] = features[src].to_numpy()[
                df["harmful_feature" if col == "harm_score" else "task_feature"]
            ]
    df["harm_category"] = df["harm_category"].astype("string")
    df["task_label"] = features["label"].to_numpy()[df["task_feature"].to_numpy()]
    df["harmful_label"] = features["label"].to_numpy()[df["harmful_feature"].to_numpy()]
    df["task_label"] = df["task_label"].astype("string")
    df["harmful_label"] = df["harmful_label"].astype("string")
    return df.reset_index(drop=True)


def load_cache(cache_dir: str | Path, verify: bool = True) -> CacheData:
    """Load and check a cache directory; raises CacheError (with what to do) on any problem."""
    path = Path(cache_dir).expanduser().resolve()
    manifest = verify_cache(path, CORE_FILES + OPTIONAL_FILES) if verify else verify_cache(path, ())
    for name in ("features.parquet", "neighbors.npz", "examples.parquet"):
        if not (path / name).is_file():
            raise CacheError(
                f"{path} has no {name}: the cache is incomplete (steps done: "
                f"{', '.join(manifest.get('steps', [])) or 'none'}); run the remaining "
                "`featuregeom precompute` steps"
            )
    try:
        features, lists, groups = _load_features(path / "features.parquet")
        neighbors = _load_neighbors(path / "neighbors.npz", len(features))
        overlaps = _load_overlaps(path / "overlaps.parquet", features)
        examples = ExampleStore(path / "examples.parquet")
        histograms = None
        if (path / "histograms.npz").is_file():
            with np.load(path / "histograms.npz", allow_pickle=False) as z:
                counts = z["counts"]
                if counts.shape[0] == len(features):
                    histograms = (counts, int(z["bins"]) if "bins" in z.files else counts.shape[1])
        cat_rates = None
        cr_offsets = None
        if (path / "category_rates.parquet").is_file():
            cat_rates = pq.read_table(path / "category_rates.parquet").sort_by("feature")
            feat = cat_rates.column("feature").to_numpy()
            cr_offsets = np.searchsorted(feat, np.arange(len(features) + 1)).astype(np.int64)
        documents = None
        if (path / "documents.parquet").is_file():
            documents = pq.read_table(path / "documents.parquet").to_pandas().set_index("doc_id", drop=False)
    except CacheError:
        raise
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError) as exc:
        raise CacheError(
            f"{path} could not be read ({type(exc).__name__}: {exc}); the cache may be from an "
            "incompatible version — rebuild it with `featuregeom precompute --overwrite`"
        ) from exc
    return CacheData(
        path=path,
        manifest=manifest,
        features=features,
        lists=lists,
        neighbors=neighbors,
        overlaps=overlaps,
        examples=examples,
        histograms=histograms,
        category_rates=cat_rates,
        documents=documents,
        groups=groups,
        _cr_offsets=cr_offsets,
    )


def find_caches(root: str | Path) -> list[Path]:
    """Caches directly inside `root` (directories with a manifest.json), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [
        p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file()
    ]
    return out


def is_cache(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def reviews_path_for(cache_dir: Path, override: str | os.PathLike[str] | None = None) -> Path:
    """Where verdicts live: beside the cache (not inside it: a rebuild swaps the whole directory)."""
    if override:
        return Path(override).expanduser()
    return cache_dir.parent / f"{cache_dir.name}.reviews.sqlite"


# --------------------------------------------------------------------------------------------------
# mechanism-lab results inside a cache: CACHE/finetune/<run>/ (`featuregeom diff`) and
# CACHE/triage/<name>/ (`featuregeom triage`). Optional, added after the cache was built, so they are
# not in its manifest: read without checksums, each directory on its own (one bad run never hides the others).

FINETUNE_FILES = ("diff.parquet", "summary.json")
TRIAGE_FILES = ("ranked.parquet", "tokens.parquet", "triage.json")
REQUIRED_DIFF_COLUMNS = (
    "prompt_set",
    "position",
    "comparison",
    "feature",
    "delta",
    "delta_lo",
    "delta_hi",
    "rate_delta",
    "rate_delta_lo",
    "rate_delta_hi",
    "risk_max_cos",
    "is_harmful",
)
REQUIRED_RANKED_COLUMNS = ("rank", "key", "score", "direct", "via_overlap", "removed")
REQUIRED_TOKEN_COLUMNS = ("rank", "key", "tokens", "trained", "direct", "via_overlap")
# measure -> (change, CI low, CI high) columns of diff.parquet
MEASURES = {
    "mean": ("delta", "delta_lo", "delta_hi"),
    "rate": ("rate_delta", "rate_delta_lo", "rate_delta_hi"),
}


def _result_dirs(root: Path, files: tuple[str, ...]) -> list[Path]:
    """Sub-directories of `root` holding all `files`, by name. Skips the staging (`.NAME.tmp-…`) and
    outgoing (`NAME.old-…`) copies that an atomic rewrite leaves for a moment."""
    if not root.is_dir():
        return []
    return [
        p
        for p in sorted(root.iterdir())
        if p.is_dir()
        and not p.name.startswith(".")
        and ".old-" not in p.name
        and all((p / f).is_file() for f in files)
    ]


def find_finetune_runs(cache_dir: str | Path) -> list[Path]:
    return _result_dirs(Path(cache_dir) / "finetune", FINETUNE_FILES)


def find_triage_runs(cache_dir: str | Path) -> list[Path]:
    return _result_dirs(Path(cache_dir) / "triage", TRIAGE_FILES)


def files_stamp(path: str | Path, files: tuple[str, ...]) -> tuple[int, ...]:
    """mtime (ns) of each file: the cache key of a result directory (a rewrite replaces every file)."""
    return tuple((Path(path) / f).stat().st_mtime_ns if (Path(path) / f).is_file() else 0 for f in files)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CacheError(f"{path} must hold a JSON object")
    return data


def _read_parquet(path: Path, required: tuple[str, ...], rerun: str, **kw: Any) -> pd.DataFrame:
    try:
        names = pq.read_schema(path).names
        missing = [c for c in required if c not in names]
        if missing:
            raise CacheError(f"{path} lacks the column(s) {', '.join(missing)}; rerun `{rerun}`")
        return pq.read_table(path, **kw).to_pandas()
    except CacheError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise CacheError(f"{path} could not be read ({type(exc).__name__}: {exc}); rerun `{rerun}`") from exc


@dataclass
class FinetuneRun:
    """One `featuregeom diff` result: per harmful feature, the change of each comparison, and the summary."""

    name: str
    path: Path
    summary: dict[str, Any]
    diff: pd.DataFrame  # harmful features only (the rows with a predicted risk)

    @property
    def labels(self) -> tuple[str, str, str]:
        """(before, after, control) as named in the comparisons."""
        b, a, c = (str(x) for x in self.summary["labels"])
        return b, a, c

    def comparisons(self) -> dict[str, str | None]:
        """{'after': 'A - B', 'control': 'C - B' or None, 'direct': 'A - C' or None} as present in the data."""
        b, a, c = self.labels
        have = set(self.diff["comparison"].unique())
        want = {"after": f"{a} - {b}", "control": f"{c} - {b}", "direct": f"{a} - {c}"}
        return {k: (v if v in have else None) for k, v in want.items()}

    @property
    def prompt_sets(self) -> list[str]:
        return [s for s in ("em", "neutral") if s in set(self.diff["prompt_set"])]

    @property
    def positions(self) -> list[str]:
        return [p for p in ("prompt", "response") if p in set(self.diff["position"])]

    def harmful(self, prompt_set: str, position: str, comparison: str) -> pd.DataFrame:
        """The harmful features' rows of one comparison, by feature id."""
        d = self.diff
        sel = d[
            (d["prompt_set"] == prompt_set) & (d["position"] == position) & (d["comparison"] == comparison)
        ]
        return sel.sort_values("feature").reset_index(drop=True)

    def stats(self, prompt_set: str, position: str, comparison: str) -> dict[str, Any]:
        """summary.json's entry for one comparison ({} when absent)."""
        return dict(
            (self.summary.get("comparisons") or {}).get(f"{prompt_set}/{position}/{comparison}") or {}
        )

    def heldout_loss(self, label: str) -> float | None:
        v = (self.summary.get("heldout_loss") or {}).get(label)
        return float(v) if isinstance(v, (int, float)) and np.isfinite(v) else None


def load_finetune_summary(path: str | Path) -> dict[str, Any]:
    """summary.json of CACHE/finetune/<run>/ alone (no parquet read); CacheError without usable labels."""
    path = Path(path)
    summary = _read_json(path / "summary.json")
    labels = summary.get("labels")
    if not (isinstance(labels, list) and len(labels) == 3 and all(isinstance(x, str) for x in labels)):
        raise CacheError(
            f"{path / 'summary.json'} has no 'labels': [before, after, control]; rerun `featuregeom diff`"
        )
    return summary


def load_finetune_run(path: str | Path) -> FinetuneRun:
    """Read CACHE/finetune/<run>/ (harmful rows of diff.parquet + summary.json); CacheError when unusable."""
    path = Path(path)
    rerun = "featuregeom diff"
    summary = load_finetune_summary(path)
    labels = summary["labels"]
    diff = _read_parquet(
        path / "diff.parquet", REQUIRED_DIFF_COLUMNS, rerun, filters=[("is_harmful", "=", True)]
    )
    for col, default in (
        ("harm_category", None),
        ("risk_task_feature", np.nan),
        ("risk_sum", np.nan),
        ("null_cosine", np.nan),
        ("mean_before", np.nan),
        ("mean_after", np.nan),
    ):
        if col not in diff:
            diff[col] = default
    diff["harm_category"] = diff["harm_category"].astype("string")
    b, a, _ = labels
    if f"{a} - {b}" not in set(diff["comparison"]):
        raise CacheError(
            f"{path / 'diff.parquet'} has no '{a} - {b}' rows for harmful features; rerun `{rerun}`"
        )
    return FinetuneRun(name=path.name, path=path, summary=summary, diff=diff.reset_index(drop=True))


def compare_runs_table(runs: list[FinetuneRun], prompt_set: str, position: str) -> pd.DataFrame:
    """Per run and 'after'/'control': the pooled harmful mean change vs before [est, lo, hi] and held-out loss.

    Only runs with the same `before` label as the first run are comparable (same baseline); the
    caller passes those."""
    rows = []
    for run in runs:
        cmp = run.comparisons()
        b, a, c = run.labels
        for kind, label in (("after", a), ("control", c)):
            name = cmp[kind]
            est = run.stats(prompt_set, position, name).get("harmful_mean_change") if name else None
            if not (isinstance(est, list) and len(est) == 3):
                continue
            rows.append(
                {
                    "run": run.name,
                    "kind": kind,
                    "label": label,
                    "comparison": name,
                    "est": float(est[0]),
                    "lo": float(est[1]),
                    "hi": float(est[2]),
                    "heldout_loss": run.heldout_loss(label),
                }
            )
    return pd.DataFrame(
        rows, columns=["run", "kind", "label", "comparison", "est", "lo", "hi", "heldout_loss"]
    )


def spearman_of(
    run: FinetuneRun, prompt_set: str, position: str, comparison: str, measure: str
) -> tuple[float, float, float] | None:
    """Spearman's rho [lo, hi] of risk (max cos) vs the change: the summary's for mean activation; for the
    firing rate (not in the summary) the same bootstrap over features, computed here."""
    if measure == "mean":
        v = run.stats(prompt_set, position, comparison).get("spearman_risk_max_cos")
        return (float(v[0]), float(v[1]), float(v[2])) if isinstance(v, list) and len(v) == 3 else None
    from precompute.stats import spearman_ci

    df = run.harmful(prompt_set, position, comparison)
    col = MEASURES[measure][0]
    ok = np.isfinite(df["risk_max_cos"].to_numpy(float)) & np.isfinite(df[col].to_numpy(float))
    if ok.sum() < 3:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        rho, lo, hi = spearman_ci(
            df["risk_max_cos"].to_numpy(float)[ok],
            df[col].to_numpy(float)[ok],
            seed=int(run.summary.get("seed") or 0),
        )
    return float(rho), float(lo), float(hi)


@dataclass
class TriageRun:
    """One `featuregeom triage` result: the ranking, per-token scores of the kept samples, and its sidecar."""

    name: str
    path: Path
    ranked: pd.DataFrame  # by rank (1 = highest score)
    tokens: pd.DataFrame  # indexed by rank: tokens, trained, direct, via_overlap (lists)
    meta: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        """The lowest score among the removed samples (removal is 'score ≥ this'), or None."""
        rem = self.ranked.loc[self.ranked["removed"].astype(bool), "score"]
        return float(rem.min()) if len(rem) else None

    def sample(self, rank: int) -> dict[str, Any] | None:
        """Tokens and per-token scores of the sample at `rank` (only the top and bottom ones are kept)."""
        if rank not in self.tokens.index:
            return None
        r = self.tokens.loc[rank]
        return {
            "rank": int(rank),
            "key": str(r["key"]),
            "tokens": [str(t) for t in r["tokens"]],
            "trained": [bool(t) for t in r["trained"]],
            "direct": [float(x) for x in r["direct"]],
            "via_overlap": [float(x) for x in r["via_overlap"]],
        }


def load_triage_run(path: str | Path) -> TriageRun:
    """Read CACHE/triage/<name>/ (ranked.parquet, tokens.parquet, triage.json); CacheError when unusable."""
    path = Path(path)
    rerun = "featuregeom triage"
    meta = _read_json(path / "triage.json")
    ranked = _read_parquet(path / "ranked.parquet", REQUIRED_RANKED_COLUMNS, rerun)
    tokens = _read_parquet(path / "tokens.parquet", REQUIRED_TOKEN_COLUMNS, rerun)
    for col, default in (
        ("index", -1),
        ("n_tokens", 0),
        ("score_sum", np.nan),
        ("preview", ""),
        ("random_removed", False),
    ):
        if col not in ranked:
            ranked[col] = default
    if "top_features" not in ranked:
        ranked["top_features"] = [[] for _ in range(len(ranked))]
    ranked["top_features"] = [[int(x) for x in (v if v is not None else [])] for v in ranked["top_features"]]
    ranked["removed"] = ranked["removed"].fillna(False).astype(bool)
    ranked["random_removed"] = ranked["random_removed"].fillna(False).astype(bool)
    ranked = ranked.sort_values("rank", kind="stable").reset_index(drop=True)
    tokens = (
        tokens.astype({"rank": "int64"}).drop_duplicates("rank").set_index("rank", drop=False).sort_index()
    )
    return TriageRun(name=path.name, path=path, ranked=ranked, tokens=tokens, meta=meta)
