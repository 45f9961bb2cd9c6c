"""The contract itself: file names, and each file's columns, arrays or keys (plain data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from precompute.pipeline.steps import STEPS as _STEP_REGISTRY

# 2: task_score became task vs control (task_control_score removed), z became z_isotropic, the calibrated
# nulls and closeness.json were added (docs/cache.md "Versions"). A reader refuses any other version.
SCHEMA_VERSION = 2

MANIFEST = "manifest.json"
FEATURES = "features.parquet"
NEIGHBORS = "neighbors.npz"
EXAMPLES = "examples.parquet"
OVERLAPS = "overlaps.parquet"
CLOSENESS = "closeness.json"
STABILITY = "stability.json"
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
    optional: bool = False  # added without a schema_version bump: an older cache lacks it


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
LOGIT_VALUES = "scores ran with the model, not in caches scored before logit values"
# Columns added without a schema_version bump: a cache written before them lacks them.
HELDOUT = "not in caches scored before held-out validation"
TAXONOMY = "not in caches harvested before the harm taxonomy"
DOC_HASHES = "not in caches harvested before the document split"
DOC_TEXT = "not in caches harvested before full document text"
LABELS = "not in caches built before the labels step"
EXPLAINED = "only after featuregeom explain, for the features it explained"

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
            ("harm_category_source", STRING, True, HELDOUT),
            ("harm_heldout_auroc", FLOAT64, False, HELDOUT),
            ("harm_heldout_lo", FLOAT64, False, HELDOUT),
            ("harm_heldout_set", STRING, True, HELDOUT),
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
            ("top_promoted_values", FLOAT32S, False, LOGIT_VALUES),
            ("top_suppressed_values", FLOAT32S, False, LOGIT_VALUES),
        )
        + _cols("labels", ("label_source", STRING, True, LABELS))
        + _cols(
            "explain",
            ("auto_explanation", STRING, True, EXPLAINED),
            ("auto_explanation_model", STRING, True, EXPLAINED),
            ("auto_explanation_detection", FLOAT64, True, EXPLAINED),
            ("auto_explanation_scored", INT64, True, EXPLAINED),
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
            ("category_source", STRING, True, TAXONOMY),
            ("validation", BOOL, False, TAXONOMY),
            ("record_index", INT64),
            ("n_tokens", INT64),
            ("text_preview", STRING),
            ("doc_sha256", STRING, False, DOC_HASHES),
            ("text", STRING, True, DOC_TEXT),
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
            Array("counts_group", "int32", ("n", "groups", "bins"), optional=True),
            Array("groups", STRING, ("groups",), optional=True),
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
        tuple(
            Array(name, "uint8", ("bytes",))
            for name in (
                "header",
                "run_context",
                "run_doc",
                "run_rows",
                "position",
                "token_id",
                "row_nnz",
                "feature",
                "value",
            )
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
        + _keys("object", "ranked")
        + _keys("array", "ranked_sensitivity")
        + _keys("number", "null_cosine_used alpha")
        + _keys("integer", "n_permutations n_bootstrap frequency_bins seed min_set_size"),
    ),
    STABILITY: JsonFile(
        STABILITY,
        "stability",
        _keys("object", "replicate match pair_sets params")
        + _keys("number", "null_cosine_replicate")
        + _keys("string", "null_kind_replicate"),
    ),
}
