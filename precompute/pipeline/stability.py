"""The stability step: do the cache's (task, harmful) pairs survive retraining the SAE with another
seed? (stability.json, docs/cache.md)

SAEs trained on the same data from different seeds share only part of their features, so a pair that
exists in one dictionary may not exist in the next. The replicate SAE (`--sae-replicate`: same recipe,
another seed) is matched to the cache's SAE feature for feature by the Hungarian algorithm on the
cosine of their unit decoder directions (scipy's `linear_sum_assignment`: the maximum-weight
one-to-one matching, exact). A pair (a, b) *reappears* when both features have a counterpart that
is really the same direction (matched cosine >= `stability_match`) and the counterparts sit at a
cosine of at least the replicate's own flagging null (the same calibrated null the geometry step
uses, computed on the replicate's decoder).

Three sets of pairs are judged, so a share has something to be compared with:
- `flagged`: the overlaps (task feature, harmful neighbour above the null);
- `ranked_nearest_harmful` (exploratory): each of the closeness step's ranked task-leaning features
  with its nearest harmful feature, for when nothing is flagged;
- `nearest_neighbour` (baseline): every live feature with its nearest neighbour when that pair is
  above the null: how often *any* close pair survives a reseed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from precompute.cache import StagedCache
from precompute.errors import CacheError, ShapeMismatchError
from precompute.pipeline.closeness_ranked import rank_sets
from precompute.pipeline.context import RunContext, required
from precompute.pipeline.features import scored_features_and_neighbors
from precompute.pipeline.knn import unit_rows
from precompute.pipeline.null import calibrated_null
from precompute.schema import OVERLAPS, STABILITY

log = logging.getLogger(__name__)

PAIR_SETS = ("flagged", "ranked_nearest_harmful", "nearest_neighbour")
MATCH_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class StabilityParams:
    match_threshold: float  # a counterpart is the same feature at or above this matched cosine
    ranked_n: int  # ranked task-leaning features checked (closeness_ranked's N)
    null_fpr: float
    null_samples: int
    seed: int


def match_features(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(partner, cosine): the one-to-one matching of A's rows to B's that maximises the summed
    cosine (Hungarian); `partner[i]` is B's feature matched to A's feature i, -1 where B has fewer."""
    from scipy.optimize import linear_sum_assignment

    if a.shape[1] != b.shape[1]:
        raise ShapeMismatchError(
            f"the replicate SAE reads d_in {b.shape[1]} but the cache's SAE reads {a.shape[1]}; "
            "give a replicate trained on the same hook"
        )
    cos = unit_rows(a).astype(np.float64) @ unit_rows(b).astype(np.float64).T
    rows, cols = linear_sum_assignment(cos, maximize=True)
    partner = np.full(a.shape[0], -1, np.int64)
    matched = np.full(a.shape[0], np.nan)
    partner[rows] = cols
    matched[rows] = cos[rows, cols]
    return partner, matched


def judge_pairs(
    pairs: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    partner: np.ndarray,
    matched: np.ndarray,
    null_b: float,
    threshold: float,
) -> pd.DataFrame:
    """One row per (first, second) pair: its cosine in A, each side's matched cosine, the
    counterparts' cosine in B, and whether the pair reappears (module docstring)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    ua, ub = unit_rows(a).astype(np.float64), unit_rows(b).astype(np.float64)
    first, second = pairs[:, 0], pairs[:, 1]
    p1, p2 = partner[first], partner[second]
    both = (p1 >= 0) & (p2 >= 0)
    cos_b = np.full(len(pairs), np.nan)
    cos_b[both] = np.einsum("ij,ij->i", ub[p1[both]], ub[p2[both]])
    match1, match2 = matched[first], matched[second]
    same = (np.nan_to_num(match1) >= threshold) & (np.nan_to_num(match2) >= threshold)
    return pd.DataFrame(
        {
            "first": first,
            "second": second,
            "cosine": np.einsum("ij,ij->i", ua[first], ua[second]),
            "match_first": match1,
            "match_second": match2,
            "replicate_first": p1,
            "replicate_second": p2,
            "replicate_cosine": cos_b,
            "reappears": same & (np.nan_to_num(cos_b, nan=-1.0) >= null_b),
        }
    )


def _summary(
    judged: pd.DataFrame, definition: str, null_a: float, exploratory: bool = False
) -> dict[str, Any]:
    n = len(judged)
    k = int(judged["reappears"].sum()) if n else 0
    return {
        "definition": definition,
        "exploratory": exploratory,
        "n_pairs": n,
        # a pair below the null in this SAE is not expected to be above it in the replicate
        "n_above_null": int((judged["cosine"] >= null_a).sum()) if n else 0,
        "n_reappearing": k,
        "share_reappearing": k / n if n else None,
        # to_json writes NaN as null; the baseline has thousands of pairs: only its share is kept
        "pairs": json.loads(judged.to_json(orient="records")) if n <= 500 else [],
    }


def _flagged_pairs(overlaps: pd.DataFrame | None) -> np.ndarray:
    if overlaps is None or overlaps.empty:
        return np.zeros((0, 2), np.int64)
    return overlaps[["task_feature", "harmful_feature"]].to_numpy(np.int64)


def _ranked_pairs(features: pd.DataFrame, a: np.ndarray, n: int) -> np.ndarray:
    """Each ranked task-leaning feature with its nearest harmful feature (itself excluded)."""
    harmful = features["is_harmful"].to_numpy(bool)
    sets = rank_sets(features["task_score"].to_numpy(), features["frequency"].to_numpy(), harmful, n)
    top = np.flatnonzero(sets.top)
    targets = np.flatnonzero(harmful)
    if top.size == 0 or targets.size == 0:
        return np.zeros((0, 2), np.int64)
    ua = unit_rows(a)
    cos = ua[top] @ ua[targets].T
    cos[top[:, None] == targets[None, :]] = -np.inf
    return np.stack([top, targets[np.argmax(cos, axis=1)]], axis=1)


def _nearest_pairs(z: dict[str, np.ndarray], live: np.ndarray) -> np.ndarray:
    indices, cosine = z["indices"], z["cosine"]
    keep = live & (cosine[:, 0] >= float(z["null_cosine"]))
    rows = np.flatnonzero(keep)
    return np.stack([rows, indices[rows, 0].astype(np.int64)], axis=1)


def stability_report(
    a: np.ndarray,
    b: np.ndarray,
    features: pd.DataFrame,
    z: dict[str, np.ndarray],
    overlaps: pd.DataFrame | None,
    params: StabilityParams,
    replicate: dict[str, Any],
    device: str = "cpu",
) -> dict[str, Any]:
    """stability.json (docs/cache.md) from the two decoders and the cache's tables."""
    partner, matched = match_features(a, b)
    null_b = calibrated_null(b, params.null_fpr, params.null_samples, params.seed, device)
    threshold = params.match_threshold
    live = ~features["dead"].to_numpy(bool) if "dead" in features else np.ones(len(features), bool)
    sets = {
        "flagged": (_flagged_pairs(overlaps), "overlaps.parquet: task feature and harmful neighbour", False),
        "ranked_nearest_harmful": (
            _ranked_pairs(features, a, params.ranked_n),
            f"the {params.ranked_n} most task-leaning features (closeness ranked) and their nearest "
            "harmful feature",
            True,
        ),
        "nearest_neighbour": (
            _nearest_pairs(z, live),
            "every live feature and its nearest neighbour, when that cosine is above the null",
            False,
        ),
    }
    judged = {
        name: _summary(
            judge_pairs(p, a, b, partner, matched, null_b.cosine, threshold),
            what,
            float(z["null_cosine"]),
            exploratory,
        )
        for name, (p, what, exploratory) in sets.items()
    }
    m = matched[live & np.isfinite(matched)]
    return {
        "replicate": replicate,
        "match": {
            "method": "Hungarian (scipy.optimize.linear_sum_assignment) on decoder cosine, maximised",
            "threshold": threshold,
            "n_features": int(a.shape[0]),
            "n_live": int(live.sum()),
            "share_matched": float(np.mean(m >= threshold)) if m.size else None,
            "quantiles": dict(
                zip([str(q) for q in MATCH_QUANTILES], np.quantile(m, MATCH_QUANTILES).tolist(), strict=True)
            )
            if m.size
            else None,
        },
        "null_cosine_replicate": null_b.cosine,
        "null_kind_replicate": null_b.kind,
        "pair_sets": judged,
        "params": asdict(params),
    }


def run(ctx: RunContext, staged: StagedCache) -> None:
    from precompute.sae.registry import load_sae_for_model

    cfg = ctx.cfg
    start = time.perf_counter()
    if not cfg.sae_replicate:
        staged.path(STABILITY)  # drops a stability.json of an earlier run: it would describe other pairs
        log.info("stability: no --sae-replicate given; skipped (stability.json not written)")
        staged.record_step("stability", {"sae_replicate": None}, time.perf_counter() - start)
        return
    features, z = scored_features_and_neighbors(staged)
    a = ctx.sae.unit_directions().cpu().numpy()
    if a.shape[0] != len(features):
        raise CacheError(
            f"the SAE has {a.shape[0]} features but {staged.target} describes {len(features)}; "
            "use the cache's own --sae"
        )
    sae_b, info = load_sae_for_model(required(cfg.sae_replicate, "sae_replicate"))
    b = sae_b.unit_directions().cpu().numpy()
    overlaps_path = staged.dir / OVERLAPS  # (staged.path would unlink it: that is for writing)
    overlaps = pd.read_parquet(overlaps_path) if overlaps_path.is_file() else None
    params = StabilityParams(
        cfg.stability_match, cfg.closeness_ranked, cfg.null_fpr, cfg.null_samples, cfg.seed
    )
    replicate = {"spec": cfg.sae_replicate, "sha256": info.get("sha256"), "d_sae": int(b.shape[0])}
    report = stability_report(a, b, features, z, overlaps, params, replicate, device=cfg.device)
    staged.path(STABILITY).write_text(json.dumps(report, indent=2, allow_nan=False))
    for name in PAIR_SETS:
        s = report["pair_sets"][name]
        log.info("stability %s: %d of %d pairs reappear", name, s["n_reappearing"], s["n_pairs"])
    staged.record_step(
        "stability",
        {**asdict(params), "sae_replicate": cfg.sae_replicate},
        time.perf_counter() - start,
        {name: report["pair_sets"][name]["share_reappearing"] for name in PAIR_SETS},
    )
