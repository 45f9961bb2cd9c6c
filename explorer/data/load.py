"""Open one cache directory: verify it, check every file against the cache contract, load it once.

Every table and archive is checked against `precompute.schema` before it is used, so a cache from an
older or foreign writer fails on open with a CacheError that names the missing column and the step to
rerun, never with a KeyError on some later page. Optional files (histograms, category rates,
documents, overlaps) may be absent; when present they must be complete.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from explorer.data.cache_data import CacheData, Neighbors
from explorer.data.examples import ExampleStore
from explorer.data.npz_map import map_npz
from precompute import schema
from precompute.cache import verify_cache
from precompute.errors import CacheError

GROUP_ORDER = ("task", "control", "harmful", "benign", "general")
NEEDED_FILES = (schema.FEATURES, schema.NEIGHBORS, schema.EXAMPLES)  # the explorer opens nothing less
OPTIONAL_FILES = (schema.HISTOGRAMS, schema.CATEGORY_RATES, schema.DOCUMENTS)
LOGIT_LENS_COLUMNS = (  # kept in arrow: cheap for 262k features
    "top_promoted",
    "top_suppressed",
    "top_promoted_values",
    "top_suppressed_values",
)


def escape_html(arr: pa.Array) -> pa.Array:
    """Vectorised html.escape(quote=True) for an arrow string array, quotes as numeric entities: the map's hover
    labels decode numeric entities but few named ones (plotly shows '&quot;' as written)."""
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&#34;"), ("'", "&#39;")):
        arr = pc.replace_substring(arr, a, b)
    return arr


def read_table(path: Path, name: str) -> pa.Table:
    """A parquet table of the cache, after checking its columns against the contract."""
    schema.check_parquet(path, name)
    return pq.read_table(path)


def _load_features(path: Path) -> tuple[pd.DataFrame, pa.Table, list[str]]:
    """(scalar columns with a 'hover' column, the logit-lens token lists, the corpus groups)."""
    tbl = read_table(path, schema.FEATURES).sort_by("feature")
    list_cols = [c for c in LOGIT_LENS_COLUMNS if c in tbl.column_names]
    lists = tbl.select(list_cols)
    df = tbl.drop_columns(list_cols).to_pandas()
    n = len(df)
    if n == 0:
        raise CacheError(f"{path} has no features")
    if not np.array_equal(df["feature"].to_numpy(), np.arange(n)):
        raise CacheError(f"{path}: the 'feature' column must hold 0..n-1 once each (docs/cache.md)")
    for col in ("label", "explanation", "harm_category"):
        df[col] = df[col].astype("string")
    for col in ("dead", "is_harmful", "is_task", "is_control"):
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


def _read_npz(path: Path, name: str, mapped: bool = False) -> dict[str, np.ndarray]:
    """Every array of an npz file of the cache, after checking them against the contract; `mapped`:
    large arrays as read-only memory maps (for archives a page reads one row of)."""
    schema.check_npz(path, name)
    try:
        if mapped:
            return map_npz(path)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CacheError(f"{path} is not a readable npz file ({exc}); rerun the step that writes it") from exc


def _load_neighbors(path: Path, n: int) -> Neighbors:
    z = _read_npz(path, schema.NEIGHBORS)
    indices, cosine = z["indices"], z["cosine"]
    if indices.shape[0] != n or cosine.shape != indices.shape or z["z_isotropic"].shape != indices.shape:
        raise CacheError(
            f"{path}: indices/cosine/z_isotropic must have shape [{n}, k], got {indices.shape}, "
            f"{cosine.shape} and {z['z_isotropic'].shape}; rerun the geometry step"
        )
    nearest = cosine[:, 0].astype(np.float64) if cosine.shape[1] else np.zeros(0)
    return Neighbors(
        indices=indices,
        cosine=cosine,
        z_isotropic=z["z_isotropic"],
        null_cosine=float(z["null_cosine"]),
        fpr=float(z["fpr"]),
        d=int(z["d"]),
        null_kind=str(z["null_kind"]),
        null_isotropic=float(z["null_isotropic"]),
        null_covariance=float(z["null_covariance"]),
        nearest_sorted=np.sort(nearest[np.isfinite(nearest)]),
    )


def _empty_table(name: str) -> pd.DataFrame:
    """A table of the contract with its columns and no rows."""
    dtypes = {schema.INT64: "int64", schema.FLOAT64: "float64", schema.BOOL: "bool"}
    return pd.DataFrame(
        {c.name: pd.Series(dtype=dtypes.get(c.dtype, "object")) for c in schema.TABLES[name].required}
    )


def _one_row_per_unordered_pair(df: pd.DataFrame) -> pd.DataFrame:
    """Each unordered pair once (caches built before the overlaps step did this listed a pair of two
    task-and-harmful features both ways): the higher-risk row, ties to the smaller task feature;
    `both_ways` marks a pair that was flagged in both directions."""
    t, h = df["task_feature"].to_numpy(), df["harmful_feature"].to_numpy()
    key = pd.DataFrame({"a": np.minimum(t, h), "b": np.maximum(t, h)}, index=df.index)
    both = key.duplicated(keep=False).to_numpy()
    order = (
        df.assign(_r=df["risk"].fillna(-np.inf))
        .sort_values(
            ["_r", "task_feature", "harmful_feature"], ascending=[False, True, True], kind="mergesort"
        )
        .index
    )
    keep = ~key.loc[order].duplicated(keep="first")
    out = df.assign(both_ways=both).loc[order[keep.to_numpy()]].sort_index()
    return out


def _load_overlaps(path: Path, features: pd.DataFrame) -> pd.DataFrame:
    """The flagged pairs with both features' labels; none when the overlaps step has not run."""
    df = read_table(path, schema.OVERLAPS).to_pandas() if path.is_file() else _empty_table(schema.OVERLAPS)
    n = len(features)
    df = df.astype({"task_feature": "int64", "harmful_feature": "int64"})
    bad = ~df["task_feature"].between(0, n - 1) | ~df["harmful_feature"].between(0, n - 1)
    if bad.any():
        raise CacheError(f"{path} names features outside 0..{n - 1}; rebuild the overlaps step")
    df = _one_row_per_unordered_pair(df)
    df["harm_category"] = df["harm_category"].astype("string")
    labels = features["label"].to_numpy()
    df["task_label"] = pd.array(labels[df["task_feature"].to_numpy()], dtype="string")
    df["harmful_label"] = pd.array(labels[df["harmful_feature"].to_numpy()], dtype="string")
    return df.reset_index(drop=True)


def _load_optional(path: Path, n: int) -> dict[str, Any]:
    """histograms.npz, category_rates.parquet and documents.parquet where present (CacheData fields)."""
    out: dict[str, Any] = {}
    if (path / schema.HISTOGRAMS).is_file():
        # mapped: at 262k features the archive is ~290 MB, and a page draws one feature's row
        z = _read_npz(path / schema.HISTOGRAMS, schema.HISTOGRAMS, mapped=True)
        if z["counts"].shape[0] == n:  # a histogram of another SAE width is left out, not misread
            out["histograms"] = (z["counts"], int(z["bins"]))
    if (path / schema.CATEGORY_RATES).is_file():
        cat_rates = read_table(path / schema.CATEGORY_RATES, schema.CATEGORY_RATES).sort_by("feature")
        feat = cat_rates.column("feature").to_numpy()
        out["category_rates"] = cat_rates
        out["_cr_offsets"] = np.searchsorted(feat, np.arange(n + 1)).astype(np.int64)
    if (path / schema.DOCUMENTS).is_file():
        documents = read_table(path / schema.DOCUMENTS, schema.DOCUMENTS).to_pandas()
        out["documents"] = documents.set_index("doc_id", drop=False)
    return out


def load_cache(cache_dir: str | Path, verify: bool = True) -> CacheData:
    """Load and check a cache directory; raises CacheError (with what to do) on any problem."""
    path = Path(cache_dir).expanduser().resolve()
    manifest = verify_cache(path, schema.CORE_FILES + OPTIONAL_FILES) if verify else verify_cache(path, ())
    for name in NEEDED_FILES:
        if not (path / name).is_file():
            raise CacheError(
                f"{path} has no {name}: the cache is incomplete (steps done: "
                f"{', '.join(manifest.get('steps', [])) or 'none'}); run the remaining "
                "`featuregeom precompute` steps"
            )
    try:
        features, lists, groups = _load_features(path / schema.FEATURES)
        neighbors = _load_neighbors(path / schema.NEIGHBORS, len(features))
        overlaps = _load_overlaps(path / schema.OVERLAPS, features)
        examples = ExampleStore(path / schema.EXAMPLES)
        optional = _load_optional(path, len(features))
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
        groups=groups,
        **optional,
    )


def find_caches(root: str | Path) -> list[Path]:
    """Caches directly inside `root` (directories with a manifest.json), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and is_cache(p)]


def is_cache(path: str | Path) -> bool:
    return (Path(path) / schema.MANIFEST).is_file()


def reviews_path_for(cache_dir: Path, override: str | os.PathLike[str] | None = None) -> Path:
    """Where verdicts live: beside the cache (not inside it: a rebuild swaps the whole directory)."""
    if override:
        return Path(override).expanduser()
    return cache_dir.parent / f"{cache_dir.name}.reviews.sqlite"
