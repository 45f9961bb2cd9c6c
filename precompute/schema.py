"""The cache contract in code: what a cache directory holds, file by file, column by column.

The writer (`precompute.pipeline`), the reader (`explorer.data`), the synthetic fixture
(`bench/synthetic_cache.py`) and `docs/cache.md` (checked by tests/test_schema_doc.py) all use these
names. Plain data and the standard library only, so importing it costs nothing; the helpers that read
a file's column types import pyarrow or numpy when they are called.

Types are logical names ("int64", "float32", "string", "list<string>", ...): how a library spells them
on disk (arrow `string` or `large_string`, `list` or `large_list`) does not matter, and a nullable column
whose values are all missing may be stored with arrow's `null` type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precompute.errors import CacheError
from precompute.pipeline.steps import STEPS as _STEP_REGISTRY

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
FEATURES = "features.parquet"
NEIGHBORS = "neighbors.npz"
EXAMPLES = "examples.parquet"
OVERLAPS = "overlaps.parquet"
CLOSENESS = "closeness.json"
DOCUMENTS = "documents.parquet"
CATEGORY_RATES = "category_rates.parquet"
HISTOGRAMS = "histograms.npz"
HARVEST_DIR = "harvest"
CONTEXTS = f"{HARVEST_DIR}/contexts.npz"
SHARDS = f"{HARVEST_DIR}/shard-<NNNNN>.npz"  # one per harvest checkpoint (precompute.pipeline.shards)
PARAMS_DIR = "params"  # one `<step>.json` sidecar per step

# Files whose checksums are verified on every open (cheap, and what the explorer reads).
CORE_FILES = (FEATURES, NEIGHBORS, EXAMPLES, OVERLAPS)

# Mechanism-lab result folders inside a cache: each is its own atomic output with its own sidecar
# (`featuregeom diff/triage --out CACHE/finetune/RUN`, `steer --out CACHE/steering/task-T.parquet`),
# carried along when a step rewrites the cache but not part of its manifest, so a rerun of the lab
# never invalidates the cache's checksums.
FINETUNE_DIR = "finetune"
TRIAGE_DIR = "triage"
STEERING_DIR = "steering"
LAB_DIRS = (FINETUNE_DIR, TRIAGE_DIR, STEERING_DIR)
FINETUNE_DIFF = "diff.parquet"  # in finetune/<run>/ (`featuregeom diff`)
FINETUNE_SUMMARY = "summary.json"
TRIAGE_RANKED = "ranked.parquet"  # in triage/<name>/ (`featuregeom triage`)
TRIAGE_TOKENS = "tokens.parquet"
TRIAGE_META = "triage.json"

# the steps of `featuregeom precompute`, in order; each can rerun alone on a cache
STEPS = tuple(_STEP_REGISTRY)

# logical types
INT32, INT64, FLOAT32, FLOAT64 = "int32", "int64", "float32", "float64"
BOOL, STRING, STRINGS, FLOAT32S = "bool", "string", "list<string>", "list<float32>"
NULL = "null"  # arrow's type for a column with no values at all


def params_file(step: str) -> str:
    return f"{PARAMS_DIR}/{step}.json"


def steering_file(task_feature: int) -> str:
    return f"{STEERING_DIR}/task-{task_feature}.parquet"


@dataclass(frozen=True)
class Column:
    """One column of a table. A name with `<...>` is a family (`freq_<group>`: one per corpus group)."""

    name: str
    dtype: str
    step: str  # the step that writes it
    nullable: bool = False
    when: str = ""  # "": always written; else when it is (an optional column)

    @property
    def required(self) -> bool:
        return not self.when

    @property
    def prefix(self) -> str | None:
        """`freq_` for the family `freq_<group>`; None for a plain column."""
        return self.name.split("<", 1)[0] if "<" in self.name else None

    def matches(self, name: str) -> bool:
        prefix = self.prefix
        return name == self.name if prefix is None else name.startswith(prefix) and len(name) > len(prefix)

    def accepts(self, dtype: str) -> bool:
        return dtype == self.dtype or (self.nullable and dtype == NULL)


@dataclass(frozen=True)
class Table:
    """A parquet file of the cache."""

    file: str
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column | None:
        """The column (or family) `name` belongs to, or None for a column the contract does not know."""
        return next((c for c in self.columns if c.matches(name)), None)

    @property
    def required(self) -> tuple[Column, ...]:
        """Always written, one name each (families are not counted: a cache may lack a group)."""
        return tuple(c for c in self.columns if c.required and c.prefix is None)

    @property
    def optional(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if not c.required)


@dataclass(frozen=True)
class Array:
    """One array of an npz archive; `shape` names its axes (() for a scalar)."""

    name: str
    dtype: str
    shape: tuple[str, ...]


@dataclass(frozen=True)
class Archive:
    """An npz file of the cache. `internal`: read only by later precompute steps, never by the explorer."""

    file: str
    step: str
    arrays: tuple[Array, ...]
    internal: bool = False


def _cols(step: str, *specs: tuple[Any, ...]) -> tuple[Column, ...]:
    return tuple(Column(spec[0], spec[1], step, *spec[2:]) for spec in specs)


LOGIT_LENS = "scores ran with the model (logit lens)"

TABLES: dict[str, Table] = {
    FEATURES: Table(
        FEATURES,
        _cols(
            "harvest",
            ("feature", INT64),
            ("frequency", FLOAT64),
            ("fires", INT64),
            ("max_activation", FLOAT64),
            ("mean_activation", FLOAT64),
            ("dead", BOOL),
            ("freq_<group>", FLOAT64),
        )
        + _cols("geometry", ("umap_x", FLOAT32), ("umap_y", FLOAT32))
        + _cols(
            "scores",
            ("harm_score", FLOAT64),
            ("harm_score_lo", FLOAT64),
            ("harm_score_all", FLOAT64),
            ("harm_score_all_lo", FLOAT64),
            ("harm_category", STRING, True),
            ("is_harmful", BOOL),
            ("task_score", FLOAT64),
            ("task_score_lo", FLOAT64),
            ("task_score_hi", FLOAT64),
            ("is_task", BOOL),
            ("is_control", BOOL),
            ("task_vs_benign", FLOAT64),
            ("task_vs_benign_lo", FLOAT64),
            ("label", STRING, True),
            ("explanation", STRING, True),
            ("top_promoted", STRINGS, False, LOGIT_LENS),
            ("top_suppressed", STRINGS, False, LOGIT_LENS),
        ),
    ),
    EXAMPLES: Table(
        EXAMPLES,
        _cols(
            "harvest",
            ("feature", INT64),
            ("rank", INT64),
            ("kind", STRING),
            ("group", STRING),
            ("category", STRING, True),
            ("doc_id", INT64),
            ("context_id", INT64),
            ("tokens", STRINGS),
            ("activations", FLOAT32S),
            ("max_activation", FLOAT64),
            ("max_position", INT64),
            ("quantile", FLOAT64, True),
        ),
    ),
    OVERLAPS: Table(
        OVERLAPS,
        _cols(
            "overlaps",
            ("task_feature", INT64),
            ("harmful_feature", INT64),
            ("cosine", FLOAT64),
            ("cosine_percentile", FLOAT64),
            ("cosine_excess", FLOAT64),
            ("z_isotropic", FLOAT64),
            ("null_cosine", FLOAT64),
            ("coactivation", FLOAT64),
            ("cond_coactivation", FLOAT64),
            ("harm_score", FLOAT64),
            ("task_score", FLOAT64),
            ("harm_category", STRING, True),
            ("neighbor_rank", INT64),
            ("risk", FLOAT64),
        ),
    ),
    DOCUMENTS: Table(
        DOCUMENTS,
        _cols(
            "harvest",
            ("doc_id", INT64),
            ("source", INT64),
            ("source_path", STRING),
            ("group", STRING),
            ("category", STRING, True),
            ("record_index", INT64),
            ("n_tokens", INT64),
            ("text_preview", STRING),
        ),
    ),
    CATEGORY_RATES: Table(
        CATEGORY_RATES,
        _cols(
            "harvest",
            ("feature", INT64),
            ("group", STRING),
            ("category", STRING, True),
            ("frequency", FLOAT64),
            ("tokens", INT64),
        ),
    ),
}

ARCHIVES: dict[str, Archive] = {
    NEIGHBORS: Archive(
        NEIGHBORS,
        "geometry",
        (
            Array("indices", "int32", ("n", "k")),
            Array("cosine", "float32", ("n", "k")),
            Array("z_isotropic", "float32", ("n", "k")),
            Array("null_cosine", "float64", ()),
            Array("null_kind", STRING, ()),
            Array("null_isotropic", "float64", ()),
            Array("null_covariance", "float64", ()),
            Array("null_samples", "int64", ()),
            Array("nn_cosine_quantiles", "float64", ("99",)),
            Array("fpr", "float64", ()),
            Array("d", "int64", ()),
        ),
    ),
    HISTOGRAMS: Archive(
        HISTOGRAMS,
        "harvest",
        (
            Array("counts", "int64", ("n", "bins")),
            Array("bins", "int64", ()),
            Array("max_activation", "float32", ("n",)),
        ),
    ),
    CONTEXTS: Archive(
        CONTEXTS,
        "harvest",
        (
            Array("offsets", "int64", ("contexts+1",)),
            Array("token_ids", "int32", ("tokens",)),
            Array("doc_ids", "int32", ("tokens",)),
            Array("source", "int32", ("contexts",)),
        ),
        internal=True,
    ),
    SHARDS: Archive(
        SHARDS,
        "harvest",
        (
            Array("context_id", "int32", ("N",)),
            Array("position", "int32", ("N",)),
            Array("token_id", "int32", ("N",)),
            Array("doc_id", "int32", ("N",)),
            Array("indptr", "int64", ("N+1",)),
            Array("feature", "int32", ("nnz",)),
            Array("value", "float32", ("nnz",)),
        ),
        internal=True,
    ),
}


@dataclass(frozen=True)
class Key:
    """A top-level key of a JSON result file; `kind`: object, array, number, integer, string or boolean."""

    name: str
    kind: str
    nullable: bool = False


@dataclass(frozen=True)
class JsonFile:
    """A JSON result file of the cache, written whole by one step."""

    file: str
    step: str
    keys: tuple[Key, ...]


def _keys(kind: str, names: str, nullable: bool = False) -> tuple[Key, ...]:
    return tuple(Key(name, kind, nullable) for name in names.split())


JSON_FILES: dict[str, JsonFile] = {
    CLOSENESS: JsonFile(
        CLOSENESS,
        "closeness",
        _keys("string", "verdict reason statistic")
        + _keys("object", "set_definitions inducing non_inducing flagged_pairs")
        + _keys("integer", "n_inducing n_non_inducing n_harmful n_excluded_both")
        + _keys("number", "difference median_difference p_permutation p_non_inducing_closer", True)
        + _keys("number", "p_two_sided null_difference_mean", True)
        + _keys("array", "ci median_ci", True)
        + _keys("object", "permutation_null histogram", True)
        + _keys("number", "null_cosine_used alpha")
        + _keys("integer", "n_permutations n_bootstrap frequency_bins seed min_set_size"),
    ),
}


# ------------------------------------------------------------------------------ checking a file
def _step_names(steps: Iterable[str]) -> str:
    """'the geometry step', 'the harvest and scores steps', in pipeline order."""
    given = set(steps)
    names = [s for s in STEPS if s in given]
    if len(names) == 1:
        return f"the {names[0]} step"
    return f"the {', '.join(names[:-1])} and {names[-1]} steps"


def _rebuild_hint(steps: Iterable[str]) -> str:
    given = set(steps)
    reruns = ", then ".join(f"`featuregeom {s}`" for s in STEPS if s in given)
    return (
        "rebuild the cache with this version of featuregeom (`featuregeom precompute ... --overwrite`, "
        f"or rerun {reruns} on it)"
    )


def table_problems(file: str, dtypes: Mapping[str, str]) -> tuple[list[Column], list[tuple[Column, str]]]:
    """(required columns missing, (column, its type on disk) for each of the wrong type) of table `file`
    (a name in TABLES) whose columns have the logical `dtypes` (see parquet_dtypes). Columns the
    contract does not know are allowed: a cache may be extended, never renamed."""
    spec = TABLES[file]
    missing = [c for c in spec.required if c.name not in dtypes]
    wrong = []
    for name, dtype in dtypes.items():
        col = spec.column(name)
        if col is not None and not col.accepts(dtype):
            wrong.append((Column(name, col.dtype, col.step, col.nullable, col.when), dtype))
    return missing, wrong


def check_table(file: str, dtypes: Mapping[str, str], where: str | Path | None = None) -> None:
    """Raise CacheError naming each missing required column (and the step that writes it), or each
    column of the wrong type, of table `file`; `where` is the path for the message."""
    missing, wrong = table_problems(file, dtypes)
    if missing:
        steps = [c.step for c in missing]
        raise CacheError(
            f"{where or file} lacks the column(s) {', '.join(c.name for c in missing)} (written by "
            f"{_step_names(steps)}; docs/cache.md): {_rebuild_hint(steps)}"
        )
    if wrong:
        what = "; ".join(f"column {c.name} is {dtype}, the cache format says {c.dtype}" for c, dtype in wrong)
        raise CacheError(
            f"{where or file}: {what} (docs/cache.md): {_rebuild_hint(c.step for c, _ in wrong)}"
        )


def check_archive(
    file: str, arrays: Mapping[str, tuple[str, tuple[int, ...]]], where: str | Path | None = None
) -> None:
    """Raise CacheError when npz `file` (a name in ARCHIVES) lacks an array or holds one of the wrong
    type or number of axes; `arrays` maps each array's name to (dtype, shape) (see npz_arrays)."""
    spec = ARCHIVES[file]
    missing = [a.name for a in spec.arrays if a.name not in arrays]
    if missing:
        raise CacheError(
            f"{where or file} lacks the array(s) {', '.join(missing)} (written by {_step_names([spec.step])}; "
            f"docs/cache.md): {_rebuild_hint([spec.step])}"
        )
    wrong = [
        f"{a.name} is {arrays[a.name][0]} with {len(arrays[a.name][1])} axes, the cache format says "
        f"{a.dtype} with {len(a.shape)}"
        for a in spec.arrays
        if (arrays[a.name][0], len(arrays[a.name][1])) != (a.dtype, len(a.shape))
    ]
    if wrong:
        raise CacheError(f"{where or file}: {'; '.join(wrong)} (docs/cache.md): {_rebuild_hint([spec.step])}")


_JSON_KINDS: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "number": (int, float),
    "integer": int,
    "string": str,
    "boolean": bool,
}


def check_json(file: str, data: Any, where: str | Path | None = None) -> None:
    """Raise CacheError when the JSON result `file` (a name in JSON_FILES), parsed as `data`, lacks a
    key or holds one of the wrong kind (a bool is not a number; null only where the key is nullable)."""
    spec, data = JSON_FILES[file], data if isinstance(data, dict) else {}
    rerun = _rebuild_hint([spec.step])
    missing = [k.name for k in spec.keys if k.name not in data]
    if missing:
        raise CacheError(
            f"{where or file} lacks the key(s) {', '.join(missing)} (written by {_step_names([spec.step])}; "
            f"docs/cache.md): {rerun}"
        )
    wrong = [
        f"{k.name} is {type(v).__name__}, the cache format says {k.kind}"
        for k, v in ((k, data[k.name]) for k in spec.keys)
        if not (v is None and k.nullable)
        and (not isinstance(v, _JSON_KINDS[k.kind]) or (isinstance(v, bool) and k.kind != "boolean"))
    ]
    if wrong:
        raise CacheError(f"{where or file}: {'; '.join(wrong)} (docs/cache.md): {rerun}")


# ------------------------------------------------------------------------------ reading types from disk
def arrow_dtype(dtype: Any) -> str:
    """The logical name of a pyarrow DataType (`large_string` -> "string", `list<float>` -> "list<float32>")."""
    import pyarrow as pa

    if pa.types.is_dictionary(dtype):
        return arrow_dtype(dtype.value_type)
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return STRING
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return f"list<{arrow_dtype(dtype.value_type)}>"
    if pa.types.is_floating(dtype):
        return f"float{dtype.bit_width}"
    return {"bool": BOOL, "null": NULL}.get(str(dtype), str(dtype))


def arrow_dtypes(arrow_schema: Any) -> dict[str, str]:
    """Column name -> logical type of a pyarrow Schema."""
    return {name: arrow_dtype(t) for name, t in zip(arrow_schema.names, arrow_schema.types, strict=True)}


def parquet_dtypes(path: str | Path) -> dict[str, str]:
    """Column name -> logical type of a parquet file, from its footer (no data is read)."""
    import pyarrow.parquet as pq

    return arrow_dtypes(pq.read_schema(path))


def npz_arrays(path: str | Path, step: str = "") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Array name -> (dtype, shape) of an npz file, from each array's header (no data is read).
    CacheError when the file is not an npz archive (`step`: the step that writes it, for the message)."""
    import zipfile

    import numpy as np

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                # a numpy unicode array ('<U10', any width) is the logical "string"
                name = STRING if np.dtype(dtype).kind == "U" else str(dtype)
                out[info.filename[: -len(".npy")]] = (name, tuple(shape))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        rerun = f"rerun the {step} step" if step else "rerun the step that writes it"
        raise CacheError(f"{path} is not a readable npz file ({exc}); {rerun}") from exc
    return out


def check_parquet(path: str | Path, name: str) -> None:
    """check_table() on the parquet file at `path`, which holds table `name` (a key of TABLES)."""
    check_table(name, parquet_dtypes(path), path)


def check_npz(path: str | Path, name: str) -> None:
    """check_archive() on the npz file at `path`, which holds archive `name` (a key of ARCHIVES)."""
    check_archive(name, npz_arrays(path, ARCHIVES[name].step), path)
