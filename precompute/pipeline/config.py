"""Options of the precompute job (`featuregeom precompute` and its single steps).

Each field is one TOML key and one flag; its help, default, choices and range are written here only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precompute.data.corpus import GROUPS, CorpusSource
from precompute.data.split import (
    DEFAULT_SCORING_FRACTION,
    DOCUMENT_SPLIT_HELP,
    DOCUMENT_SPLITS,
    SCORING_FRACTION_HELP,
)
from precompute.errors import ConfigError
from precompute.options import load_options, option, options_dict, require
from precompute.pipeline.shard_codec import COMPRESSIONS, VALUE_TYPES

# where a harvest's per-token activations live (precompute.pipeline.shard_source)
SHARD_STORAGE = ("disk", "recompute")

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = (
    "'smollm2' (the packaged SmolLM2-135M-Instruct GGUF), a .gguf file, a local transformers directory, "
    "or a hub id (online only)"
)
SAE_HELP = (
    "SAE path: SAELens dir, Gemma Scope params.npz / params.safetensors, sparsify dir, "
    "dictionary_learning ae.pt, plain .safetensors, or release:RELEASE/SAE_ID (needs sae-lens, online)"
)


@dataclass
class RunConfig:
    # --- what to read
    model: str | None = option(None, metavar="M", help=MODEL_HELP)
    adapter: str | None = option(
        None,
        metavar="DIR",
        help="peft adapter (a `featuregeom finetune` output) merged into the model: builds the 'after' "
        "cache of a fine-tune",
    )
    sae: str | None = option(None, metavar="S", help=SAE_HELP)
    sae_format: str | None = option(
        None,
        help="force a format instead of detecting it from the path (saelens, gemmascope, gemmascope2, "
        "sparsify, dictionary_learning, safetensors, release)",
    )
    hook: str | None = option(
        None,
        metavar="H",
        help="module path (model.layers.15) or SAELens hook name (blocks.15.hook_resid_post)",
    )
    out: str | None = option(None, metavar="DIR", help="cache directory to write")
    corpus: list[CorpusSource] = option(
        default_factory=list,
        item=CorpusSource,
        metavar="PATH[:GROUP[:CATEGORY]]",
        help="corpus file (.jsonl/.csv/.txt/.json/.yaml, optionally .gz, or .parquet); repeatable. GROUP is "
        "task, control, harmful, benign or general; CATEGORY a label or @column",
    )
    document_split: str = option("all", choices=DOCUMENT_SPLITS, help=DOCUMENT_SPLIT_HELP)
    scoring_fraction: float = option(
        DEFAULT_SCORING_FRACTION, low=0, high=1, bounds="()", help=SCORING_FRACTION_HELP
    )
    # --- harvest
    context_size: int = option(128, low=2, bounds="[)", help="tokens per context")
    packing: str = option(
        "split",
        choices=("split", "truncate", "pack"),
        help="split long documents into windows, keep only the first window, or pack documents of a "
        "source together",
    )
    max_tokens: int | None = option(
        None, low=0, bounds="()", help="token budget, shared equally by sources without their own max_tokens"
    )
    batch_size: int = option(16, low=1, bounds="[)", help="contexts per forward pass")
    batches_per_shard: int = option(8, low=1, bounds="[)", help="forward passes per activation shard")
    shard_values: str = option(
        "float32",
        choices=VALUE_TYPES,
        help="how activation shards store values: float32 is lossless; float16/bfloat16 halve the values' bytes "
        "and record their largest error in params/harvest.json",
    )
    shard_compression: str = option(
        "zlib",
        choices=COMPRESSIONS,
        help="compress activation shards (zlib level 1, ~8 µs/token of CPU); none for a GPU harvest that "
        "outruns it",
    )
    shard_storage: str = option(
        "disk",
        choices=SHARD_STORAGE,
        help="disk: keep the activation shards in the cache (~96 bytes a token on the demo), so later steps rerun "
        "without the model; recompute: keep none (bounded disk for corpora whose shards would not fit): "
        "every step that reads a shard runs the model over its batches again (3 model passes in a full run, 4 when overlaps flags a pair; "
        "scores, overlaps and explain on the cache then need the model, the SAE and the corpus)",
    )
    outlier_norm_factor: float = option(
        10.0,
        low=0,
        bounds="[)",
        help="drop attention-sink positions whose norm exceeds this many times the median (0: keep all)",
    )
    device: str = option("auto", choices=DEVICES, help="where to run")
    dtype: str = option("float32", choices=DTYPES, help="model weights' dtype")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed for sampling and UMAP")
    top_k_examples: int = option(20, low=1, bounds="[)", help="top-activating contexts per feature")
    top_k_per_group: int = option(
        5,
        low=0,
        bounds="[)",
        help="top-activating contexts per feature within each corpus group, ranked on that group's "
        "documents only (0: none)",
    )
    top_k_per_category: int = option(
        3,
        low=0,
        bounds="[)",
        help="top-activating contexts per feature within each (group, harm or source category) of documents, "
        "ranked on that category's documents only (0: none; memory: features x categories x this x 12 bytes)",
    )
    category_top_groups: str = option(
        "harmful",
        help="corpus groups whose categories get those tops, comma-separated (the explorer filters harmful "
        "documents by harm category)",
    )
    quantile_bins: int = option(5, low=1, bounds="[)", help="activation intervals to sample examples from")
    per_bin: int = option(2, low=1, bounds="[)", help="examples sampled per activation interval")
    per_bin_group: int = option(
        1,
        low=0,
        bounds="[)",
        help="examples sampled per activation interval within each corpus group, on that group's "
        "documents only (the intervals are the feature's own; 0: none)",
    )
    hist_bins: int = option(40, low=1, bounds="[)", help="bins of each feature's activation histogram")
    # --- geometry
    neighbors: int = option(32, low=1, bounds="[)", help="cosine neighbours per feature")
    null_fpr: float = option(
        0.01,
        low=0,
        high=1,
        bounds="()",
        help="false-positive rate of the null threshold: the chance that a random direction's best match "
        "exceeds it",
    )
    null_samples: int = option(
        10_000,
        low=100,
        bounds="[)",
        help="random directions drawn with the decoder's own mean and covariance for the covariance null "
        "(its 1 - null_fpr quantile); null_samples x null_fpr must be at least 10",
    )
    knn_backend: str = option(
        "auto",
        choices=("auto", "torch", "faiss", "torch-bf16"),
        help="exact kNN implementation (torch-bf16: bfloat16 candidates rescored in float32, for GPUs; exact)",
    )
    umap_neighbors: int = option(15, low=2, bounds="[)", help="neighbours of the UMAP graph")
    umap_min_dist: float = option(0.1, low=0, high=1, help="UMAP min_dist (at most its spread, 1)")
    umap_backend: str = option(
        "auto",
        choices=("auto", "umap-learn", "cuml"),
        help="UMAP implementation, fed the same exact kNN graph (auto: cuML when it imports and a CUDA device "
        "is visible and --device is not cpu, else umap-learn on the CPU)",
    )
    # --- scores and overlaps
    harm_threshold: float = option(0.7, low=0, high=1, help="AUROC a harmful feature must reach")
    task_threshold: float = option(
        0.7, low=0, high=1, help="AUROC (task vs control) a task feature must reach; a control feature 1 - it"
    )
    min_docs: int = option(
        3,
        low=1,
        bounds="[)",
        help="windows of its group a flagged feature must fire in (harmful, task, control)",
    )
    harm_heldout: str = option(
        "require",
        choices=("require", "report"),
        help="whether is_harmful also needs the held-out contrast (corpus sources with validation = true, left "
        "out of the harm fit): require it, or only report harm_heldout_auroc",
    )
    harm_heldout_threshold: float = option(
        0.6,
        low=0,
        high=1,
        help="AUROC of held-out harmful vs held-out benign documents (on the harm category the fit chose) a "
        "harmful feature must reach; its lower 95% bound must also exceed 0.5",
    )
    harm_heldout_min_docs: int = option(
        10,
        low=1,
        bounds="[)",
        help="scored held-out documents a held-out set needs: a harm category's own held-out set (else all "
        "held-out harmful documents are used), and the held-out harmful and benign sets (else the check is "
        "skipped and the sidecar says so)",
    )
    score_window: int = option(
        12,
        low=1,
        bounds="[)",
        help="tokens per document window of the harm and task-vs-benign contrasts (documents with fewer tokens "
        "outside the shared template are left out)",
    )
    task_window: int = option(
        64,
        low=1,
        bounds="[)",
        help="tokens per document window of the task vs control contrast (both groups are long documents of "
        "one format; a longer window sees more of each)",
    )
    shared_token_fraction: float = option(
        0.5,
        low=0,
        high=1,
        bounds="(]",
        help="a token id in at least this fraction of the documents of every group (task, control, harmful, "
        "benign) is template, left out of the scores",
    )
    n_task: int = option(50, low=0, bounds="[)", help="task features checked for harmful neighbours")
    neuronpedia: str | None = option(
        None, metavar="PATH", help="Neuronpedia export (dir or JSON) to import labels from"
    )
    # --- closeness
    closeness_permutations: int = option(
        5000,
        low=1000,
        high=1_000_000,
        help="frequency-stratified permutations behind the closeness step's p-values",
    )
    closeness_bootstrap: int = option(
        2000, low=2000, high=1_000_000, help="bootstrap resamples behind the closeness difference's interval"
    )
    closeness_bins: int = option(
        10, low=1, high=100, help="firing-frequency quantile bins the closeness permutations shuffle within"
    )
    closeness_alpha: float = option(
        0.05, low=0, high=0.5, bounds="()", help="significance level of the closeness step's verdict"
    )
    closeness_ranked: int = option(
        100,
        low=5,
        bounds="[)",
        help="N of the closeness step's exploratory ranked comparison: the N most task-leaning features "
        "(highest task_score) vs the N most control-leaning (lowest); fewer when fewer are eligible",
    )
    sae_replicate: str | None = option(
        None,
        metavar="S",
        help="a second SAE of the same recipe and another seed: the stability step matches its features "
        "to --sae's (Hungarian) and says which pairs reappear (stability.json); without it the step is skipped",
    )
    stability_match: float = option(
        0.7,
        low=0,
        high=1,
        bounds="(]",
        help="matched decoder cosine at which a replicate feature counts as the same feature",
    )
    overwrite: bool = option(False, help="replace an --out directory that holds a different cache")
    progress: bool = option(True, help="hide progress bars")

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
        return load_options(cls, path, overrides)

    def to_dict(self) -> dict[str, Any]:
        return options_dict(self)

    def require(self, *names: str, step: str) -> None:
        require(self, *names, command=step)

    def category_groups(self) -> tuple[str, ...]:
        """`category_top_groups` as names; a misspelt group would silently keep no category tops."""
        names = tuple(g.strip() for g in self.category_top_groups.split(",") if g.strip())
        unknown = [g for g in names if g not in GROUPS]
        if unknown:
            raise ConfigError(
                f"--category-top-groups names unknown group(s) {', '.join(map(repr, unknown))}; "
                f"use corpus groups from {', '.join(GROUPS)}, comma-separated"
            )
        return names
