"""The pipeline's commands: `precompute` (every step), one command per step, and `info`."""

from __future__ import annotations

import json
from dataclasses import dataclass

from precompute.errors import FeatureGeomError
from precompute.options import Command, option
from precompute.pipeline.config import RunConfig
from precompute.pipeline.steps import STEPS as STEP_REGISTRY

STEPS = tuple(STEP_REGISTRY)  # the step names, in the order they run

_COMMON = ("out", "device", "seed", "progress")
_MODEL = ("model", "adapter", "hook", "dtype")
_SAE = ("sae", "sae_format")
_CORPUS = (
    "corpus",
    "document_split",
    "scoring_fraction",
    "context_size",
    "packing",
    "max_tokens",
    "batch_size",
)
_HARVEST = (
    "top_k_examples",
    "top_k_per_group",
    "top_k_per_category",
    "category_top_groups",
    "quantile_bins",
    "per_bin",
    "per_bin_group",
    "hist_bins",
    "batches_per_shard",
    "shard_values",
    "shard_compression",
    "shard_storage",
    "outlier_norm_factor",
)
_GEOMETRY = (
    "neighbors",
    "null_fpr",
    "null_samples",
    "knn_backend",
    "umap_neighbors",
    "umap_min_dist",
    "umap_backend",
)
_SCORES = (
    "harm_threshold",
    "task_threshold",
    "min_docs",
    "harm_heldout",
    "harm_heldout_threshold",
    "harm_heldout_min_docs",
    "score_window",
    "task_window",
    "shared_token_fraction",
    "neuronpedia",
)
_CLOSENESS = (
    "closeness_permutations",
    "closeness_bootstrap",
    "closeness_bins",
    "closeness_alpha",
    "closeness_ranked",
)
_STABILITY = ("sae_replicate", "stability_match")


@dataclass
class PrecomputeOptions(RunConfig):
    steps: str | None = option(None, help="comma-separated subset of " + ",".join(STEPS) + " (default all)")


def parse_steps(text: str | None) -> tuple[str, ...]:
    steps = tuple(s.strip() for s in text.split(",")) if text else STEPS
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise FeatureGeomError(f"unknown step(s) {sorted(unknown)}; steps are {', '.join(STEPS)}")
    return steps


def run_precompute_command(cfg: PrecomputeOptions) -> int:
    from precompute.pipeline.run import run_precompute

    run_precompute(cfg, parse_steps(cfg.steps))
    return 0


def run_harvest_command(cfg: RunConfig) -> int:
    from precompute.pipeline.run import run_precompute

    run_precompute(cfg, ("harvest",))
    return 0


def _single_step(step: str):
    def run(cfg: RunConfig) -> int:
        from precompute.pipeline.run import run_step

        run_step(step, cfg)
        return 0

    return run


@dataclass
class InfoOptions:
    cache: str = option(positional=True, metavar="DIR", help="the cache directory")


def run_info(opts: InfoOptions) -> int:
    from precompute.cache import verify_cache

    manifest = verify_cache(opts.cache)
    keys = (
        "schema_version",
        "hook",
        "d_in",
        "n_features",
        "steps",
        "timings",
        "tool_version",
        "created",
        "updated",
    )
    summary = {k: manifest.get(k) for k in keys}
    summary["model"] = (manifest.get("model") or {}).get("spec")
    summary["sae"] = (manifest.get("sae") or {}).get("source")
    summary["corpus"] = [
        {k: c.get(k) for k in ("path", "group", "documents", "tokens")} for c in manifest.get("corpus", [])
    ]
    print(json.dumps(summary, indent=2))
    print(f"all {len(manifest.get('files', {}))} files match their checksums")
    return 0


COMMANDS = (
    Command(
        "precompute",
        "run the whole job: " + ", ".join(STEPS),
        PrecomputeOptions,
        run_precompute_command,
        description="Load a model and SAE, stream the corpus, and write an explorer cache. "
        "Rerunning the same command after an interruption resumes the harvest.",
        flags=(
            *_COMMON,
            *_MODEL,
            *_SAE,
            *_CORPUS,
            *_HARVEST,
            *_GEOMETRY,
            *_SCORES,
            *_CLOSENESS,
            *_STABILITY,
            "n_task",
            "steps",
            "overwrite",
        ),
    ),
    Command(
        "harvest",
        "only the harvest step (needs model, SAE, hook, corpus)",
        RunConfig,
        run_harvest_command,
        description="Stream the corpus through model and SAE; write firing rates, histograms, examples and "
        "the sparse activation shards into the cache.",
        flags=(*_COMMON, *_MODEL, *_SAE, *_CORPUS, *_HARVEST, "overwrite"),
    ),
    Command(
        "geometry",
        "exact cosine neighbours, null threshold and UMAP (needs --sae, --out)",
        RunConfig,
        _single_step("geometry"),
        description="Unit-normalise the decoder rows, find exact top-k cosine neighbours in blocks, compute "
        "the null threshold and a UMAP layout from the exact kNN graph.",
        flags=(*_COMMON, *_SAE, *_GEOMETRY),
    ),
    Command(
        "scores",
        "harm/task scores, logit lens, imported labels on an existing cache",
        RunConfig,
        _single_step("scores"),
        description="Harm score (AUROC harmful vs benign documents on equal-length windows without the shared "
        "template, with a 95% bound), harm category, task score (task vs control); logit-lens tokens when "
        "--model/--sae are known.",
        flags=(*_COMMON, *_MODEL, *_SAE, *_SCORES),
    ),
    Command(
        "overlaps",
        "flag task features' harmful neighbours above the null",
        RunConfig,
        _single_step("overlaps"),
        description="For the top task features, list harmful neighbours above the null cosine with z, "
        "co-activation and a risk score (overlaps.parquet).",
        flags=(*_COMMON, "n_task"),
    ),
    Command(
        "closeness",
        "test whether task-specific features sit closer to harmful features than control-specific ones",
        RunConfig,
        _single_step("closeness"),
        description="Closeness of each feature to the harmful features (largest decoder cosine); inducing "
        "(is_task) vs non-inducing (is_control) sets compared with a bootstrap interval and a "
        "frequency-stratified permutation test, and the flagged-pair count against shuffled harm labels "
        "(closeness.json). Needs the cache's SAE (read from the cache's config unless --sae is given).",
        flags=(*_COMMON, *_SAE, *_CLOSENESS),
    ),
    Command(
        "stability",
        "check whether the cache's pairs reappear in a second SAE trained with another seed",
        RunConfig,
        _single_step("stability"),
        description="Match the features of --sae-replicate (same recipe, another seed) to the cache's SAE "
        "by the Hungarian algorithm on decoder cosine, then say which flagged pairs, exploratory ranked "
        "pairs and nearest-neighbour pairs reappear above the replicate's own null (stability.json).",
        flags=(*_COMMON, *_SAE, *_STABILITY, "null_fpr", "null_samples", "closeness_ranked"),
    ),
    Command(
        "labels",
        "label every feature from the tokens at its activation peaks (imported labels kept)",
        RunConfig,
        _single_step("labels"),
        description="For each feature without an imported Neuronpedia label, a short label from the most "
        "frequent tokens at the peaks of its top examples and its logit-lens promoted tokens "
        "(features.parquet `label`, `label_source`). Reads only the cache.",
        flags=_COMMON,
    ),
    Command("info", "summarise a cache and verify its checksums", InfoOptions, run_info),
)
