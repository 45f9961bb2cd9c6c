"""`featuregeom explain --out CACHE`: an explanation of each chosen feature by a language model, and
how well that explanation detects the feature (precompute/explain/detection.py).

Writes features.parquet columns `auto_explanation`, `auto_explanation_model`,
`auto_explanation_detection` (AUROC, 0.5 = chance) and `auto_explanation_scored` (contexts judged),
and params/explain.json, in one atomic update of the cache; features not chosen keep what an earlier
run gave them. The peak-token `label` and an imported `explanation` are left alone.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from precompute.errors import ConfigError
from precompute.options import Command, feature_ids, option

EXPLAIN_COLUMNS = (
    "auto_explanation",
    "auto_explanation_model",
    "auto_explanation_detection",
    "auto_explanation_scored",
)


@dataclass
class ExplainOptions:
    out: str | None = option(
        None, metavar="DIR", help="the cache whose features to explain (updated in place, atomically)"
    )
    explainer: str = option(
        "cache",
        metavar="MODEL",
        help="who writes explanations: 'cache' (the cache's own model, offline), a model as --model takes "
        "(smollm2, a .gguf, a directory, a hub id), or openai:NAME for an OpenAI-compatible endpoint",
    )
    scorer: str | None = option(
        None, metavar="MODEL", help="who judges them, same forms (default: the explainer)"
    )
    api_base: str = option(
        "https://api.openai.com/v1",
        metavar="URL",
        help="the OpenAI-compatible endpoint's base URL (vLLM, Ollama: http://localhost:PORT/v1)",
    )
    api_key_env: str = option(
        "OPENAI_API_KEY", metavar="VAR", help="environment variable holding the endpoint's API key"
    )
    features: list[int] | None = option(
        None,
        low=0,
        bounds="[)",
        parse=feature_ids,
        metavar="J,K,...",
        help="features to explain (default: see --top)",
    )
    top: int = option(
        10,
        low=0,
        bounds="[)",
        help="without --features: every task and harmful feature, plus this many highest by harm and by task score",
    )
    n_shown: int = option(10, low=1, bounds="[)", help="top examples shown to the explainer")
    n_scored: int = option(
        10,
        low=1,
        bounds="[)",
        help="activating contexts (and as many matched non-activating ones) the scorer judges",
    )
    max_new_tokens: int = option(40, low=1, bounds="[)", help="length limit of an explanation, in tokens")
    seed: int = option(0, low=0, help="seed for drawing the non-activating contexts")
    device: str = option("auto", choices=("auto", "cpu", "cuda"), help="where a local model runs")
    progress: bool = option(True, help="hide progress bars")


def choose_features(features: pd.DataFrame, top: int) -> list[int]:
    """Every task and harmful feature, plus the `top` highest by harm score and by task score (firing ones)."""
    live = features[features["frequency"] > 0] if "frequency" in features.columns else features
    chosen: set[int] = set()
    for flag in ("is_task", "is_harmful"):
        if flag in live.columns:
            chosen |= set(live.loc[live[flag].fillna(False).astype(bool), "feature"].astype(int))
    for score in ("harm_score", "task_score"):
        if score in live.columns:
            chosen |= set(live.nlargest(top, score)["feature"].astype(int))
    return sorted(chosen)


def make_model(spec: str, opts: ExplainOptions, cache_model: str | None) -> Any:
    from precompute.explain.clients import LocalModel, OpenAICompatible

    if spec.startswith("openai:"):
        key = os.environ.get(opts.api_key_env)
        local = opts.api_base.startswith(("http://localhost", "http://127.0.0.1"))
        if not key and not local:
            raise ConfigError(
                f"--explainer {spec} needs an API key in ${opts.api_key_env} (or --api-key-env VAR)"
            )
        return OpenAICompatible(opts.api_base, spec.removeprefix("openai:"), key)
    if spec == "cache":
        if not cache_model:
            raise ConfigError("the cache's manifest names no model; pass --explainer MODEL")
        spec = cache_model
    return LocalModel(spec, opts.device)


def explain_features(
    examples: pd.DataFrame,
    fires: dict[int, set[int]],
    chosen: list[int],
    explainer: Any,
    scorer: Any,
    opts: ExplainOptions,
) -> pd.DataFrame:
    """One row per chosen feature: explanation, who wrote it, detection AUROC, contexts judged."""
    from precompute.explain.detection import detection_auroc, feature_texts, negative_pool
    from precompute.explain.prompts import clean_explanation, explainer_messages, scorer_messages

    rows = []
    pool = negative_pool(examples)
    for f in tqdm(chosen, desc="explain", unit="feature", disable=not opts.progress):
        texts = feature_texts(examples, f, fires.get(f, set()), opts.n_shown, opts.n_scored, opts.seed, pool)
        if not texts.shown:
            continue  # never fired: nothing to explain
        explanation = clean_explanation(
            explainer.complete(explainer_messages(texts.shown), opts.max_new_tokens)
        )
        score, n = float("nan"), 0
        if explanation and texts.positives and texts.negatives:
            pos = [scorer.yes_probability(scorer_messages(explanation, t)) for t in texts.positives]
            neg = [scorer.yes_probability(scorer_messages(explanation, t)) for t in texts.negatives]
            score, n = detection_auroc(pos, neg), len(pos) + len(neg)
        rows.append((f, explanation or None, explainer.name, score, n))
    return pd.DataFrame(rows, columns=["feature", *EXPLAIN_COLUMNS]).astype(
        # Int64: nullable, so features never explained stay missing, not 0.0, after the merge
        {"feature": np.int64, "auto_explanation_detection": np.float64, "auto_explanation_scored": "Int64"}
    )


def run_explain(opts: ExplainOptions) -> int:
    from precompute import cache as cache_io
    from precompute.explain.detection import firing_contexts
    from precompute.pipeline.context import log
    from precompute.pipeline.features import merge_feature_columns
    from precompute.pipeline.shard_source import stored_shard_refs
    from precompute.schema import EXAMPLES, FEATURES

    if not opts.out:
        raise ConfigError("`featuregeom explain` needs --out CACHE (a cache built by featuregeom precompute)")
    out = Path(opts.out)
    cache_io.verify_cache(out)
    manifest = cache_io.read_manifest(out)
    features = pd.read_parquet(out / FEATURES)
    n = int(manifest.get("n_features") or len(features))
    chosen = sorted(set(opts.features)) if opts.features else choose_features(features, opts.top)
    bad = [f for f in chosen if not 0 <= f < n]
    if bad:
        raise ConfigError(f"feature ids {bad[:5]} are out of range: the cache has {n} features")
    # where the chosen features never fire: the cache's shards, or the model's for one that keeps none
    shards = stored_shard_refs(out)
    t0 = time.perf_counter()
    cache_model = (manifest.get("model") or {}).get("spec")
    explainer = make_model(opts.explainer, opts, cache_model)
    scorer = (
        explainer
        if opts.scorer in (None, opts.explainer)
        else make_model(str(opts.scorer), opts, cache_model)
    )
    log(f"explaining {len(chosen)} features with {explainer.name}, scored by {scorer.name}")
    examples = pd.read_parquet(out / EXAMPLES)
    table = explain_features(examples, firing_contexts(shards, chosen, n), chosen, explainer, scorer, opts)
    with cache_io.stage(out) as staged:
        current = pd.read_parquet(staged.dir / FEATURES)
        keep = current[["feature", *[c for c in EXPLAIN_COLUMNS if c in current.columns]]]
        keep = keep[~keep["feature"].isin(table["feature"])]  # an earlier run's features not redone now
        merged = pd.concat([keep, table], ignore_index=True) if len(keep.columns) > 1 else table
        merged = merged.astype({"auto_explanation_scored": "Int64"})
        merge_feature_columns(staged, n, merged)
        scored = table["auto_explanation_detection"].dropna()
        staged.record_step(
            "explain",
            {
                k: getattr(opts, k)
                for k in (
                    "explainer",
                    "scorer",
                    "api_base",
                    "n_shown",
                    "n_scored",
                    "max_new_tokens",
                    "seed",
                    "top",
                )
            },
            time.perf_counter() - t0,
            {
                "explainer": explainer.name,
                "scorer": scorer.name,
                "features": table["feature"].tolist(),
                "median_detection": float(scored.median()) if len(scored) else None,
                "above_chance": int((scored > 0.5).sum()),
            },
        )
        staged.commit()
    med = float(scored.median()) if len(scored) else math.nan
    print(f"explained {len(table)} features; median detection AUROC {med:.3f} (0.5 = chance) -> {out}")
    return 0


COMMANDS = (
    Command(
        "explain",
        "explain features with a language model and score each explanation (detection AUROC)",
        ExplainOptions,
        run_explain,
        description="Ask a language model what each chosen feature detects, from its marked top examples, then "
        "score the explanation: a scorer model says whether it applies to held-out activating contexts and to "
        "as many group-matched contexts where the feature never fires; the AUROC between them is stored with "
        "it. Offline by default (the cache's own model); --explainer openai:NAME uses an OpenAI-compatible "
        "endpoint. Example: featuregeom explain --out cache/demo --features 531,49",
    ),
)
