"""Which contexts an explanation is judged on, and its detection score.

For each feature: the explainer is shown its top examples ranks 0..n_shown-1 (marked); the scorer
then sees, unmarked and one at a time, `n_scored` held-out activating contexts (the next top examples,
then quantile samples: the weaker activations) and as many contexts where the feature never fires,
each drawn from the same text group as one of the positives (so an explanation that only names the
dataset, "code", cannot score well: a confound the group match removes). "Never fires" is read from
the harvest shards, not assumed. The score is the AUROC of the scorer's P(Yes) between the two sets
(0.5 = the explanation does not help; delphi's detection score, as an AUROC).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from precompute.explain.prompts import excerpt
from precompute.pipeline.shards import Shard, ShardRef


@dataclass
class FeatureTexts:
    feature: int
    shown: list[str]
    positives: list[str]
    negatives: list[str]
    negative_groups_matched: int = 0
    positive_contexts: list[int] = field(default_factory=list)
    negative_contexts: list[int] = field(default_factory=list)


def firing_contexts(
    shard_paths: Sequence[ShardRef], features: Sequence[int], n_features: int
) -> dict[int, set[int]]:
    """For each feature, every context in which it fires on at least one counted token."""
    out: dict[int, set[int]] = {int(f): set() for f in features}
    cols = np.asarray(sorted(out), dtype=np.int64)
    for path in shard_paths:
        shard = Shard.load(path)
        sub = shard.matrix(n_features)[:, cols].tocoo()
        for row, col in zip(sub.row, sub.col, strict=True):
            out[int(cols[col])].add(int(shard.context_id[row]))
    return out


def _text(row: pd.Series, mark: bool) -> str:
    acts = row["activations"] if mark else None
    peak = int(row["max_position"]) if pd.notna(row["max_position"]) else None
    return excerpt(list(row["tokens"]), None if acts is None else list(acts), peak, mark)


def negative_pool(examples: pd.DataFrame) -> pd.DataFrame:
    """Every context some feature's top examples show, once, in context order: where negatives come from."""
    return examples[examples["kind"] == "top"].drop_duplicates("context_id").sort_values("context_id")


def feature_texts(
    examples: pd.DataFrame,
    feature: int,
    fires: set[int],
    n_shown: int,
    n_scored: int,
    seed: int,
    pool: pd.DataFrame | None = None,
) -> FeatureTexts:
    """The shown, positive and negative excerpts of `feature` (module docstring); `pool`: negative_pool
    (examples), passed in when many features are done from the same examples."""
    own = examples[examples["feature"] == feature]
    top = own[own["kind"] == "top"].sort_values("rank")
    rest = pd.concat(
        [
            top.iloc[n_shown:],
            own[own["kind"] != "top"].sort_values(["quantile", "rank"], ascending=[False, True]),
        ]
    )
    rest = rest.drop_duplicates("context_id").head(n_scored)
    out = FeatureTexts(
        feature,
        shown=[_text(r, True) for _, r in top.head(n_shown).iterrows()],
        positives=[_text(r, False) for _, r in rest.iterrows()],
        negatives=[],
        positive_contexts=rest["context_id"].astype(int).tolist(),
    )
    pool = negative_pool(examples) if pool is None else pool
    pool = pool[~pool["context_id"].isin(fires)]
    rng = np.random.default_rng([seed, feature])
    taken: set[int] = set()
    for group in rest["group"].tolist():
        same = pool[(pool["group"] == group) & ~pool["context_id"].isin(taken)]
        matched = len(same) > 0
        candidates = same if matched else pool[~pool["context_id"].isin(taken)]
        if candidates.empty:
            break
        row = candidates.iloc[int(rng.integers(len(candidates)))]
        taken.add(int(row["context_id"]))
        out.negatives.append(_text(row, False))
        out.negative_contexts.append(int(row["context_id"]))
        out.negative_groups_matched += int(matched)
    return out


def detection_auroc(p_positive: Sequence[float], p_negative: Sequence[float]) -> float:
    """P(score of a random positive > a random negative) + ½ P(tie); NaN with an empty side."""
    if not len(p_positive) or not len(p_negative):
        return float("nan")
    u = mannwhitneyu(p_positive, p_negative, alternative="two-sided").statistic
    return float(u) / (len(p_positive) * len(p_negative))
