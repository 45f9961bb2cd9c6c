"""What the fine-tune diff takes from a precompute cache: the task set, each harmful feature's predicted
risk, the frequency-matched reference sets of the null band, and the closeness-matched non-harmful
features of the difference in differences (`DiffGeometry`).

Predicted risk of a harmful feature h is its overlap with the task features, from the SAE's decoder:
`risk_max_cos` = max over task features t of cos(d_t, d_h), and `risk_sum` = Σ_t max(0, cos(d_t, d_h) -
c_null), the summed excess over the null threshold (`precompute.excess`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from precompute.errors import CacheError
from precompute.lab.harm_geometry import HarmGeometry, load_harm_geometry
from precompute.lab.matching import (
    Matching,
    TaskSet,
    closeness_matching,
    reference_risk,
    reference_sets,
    select_task_set,
)


def predicted_risk(cache: str | Path | HarmGeometry, task: np.ndarray | None = None) -> pd.DataFrame:
    """Per harmful feature: overlap with the task features (`task`, default the cache's is_task)."""
    from precompute.excess import summed_excess_over_null

    geo = load_harm_geometry(cache)
    task = geo.task if task is None else np.asarray(task, np.int64)
    harmful = geo.harmful
    if not len(task):
        where = f"{cache}" if not isinstance(cache, HarmGeometry) else "the cache"
        raise CacheError(
            f"{where} has no task features (no feature passed is_task: task vs control, see params/scores.json "
            "n_task and task_permutation), so no harmful feature has a predicted risk to rank; a negative result "
            "of the scores step, not a fault of this command"
        )
    null = geo.null_cosine
    # A harmful feature that is also a task feature would count its own cos = 1; exclude self-pairs.
    cos = geo.cosines(harmful, task, exclude_self=True).cpu()  # [H, T]
    best = cos.max(dim=1)
    rows = geo.features.loc[harmful]
    return pd.DataFrame(
        {
            "feature": harmful,
            "risk_max_cos": best.values.numpy(),
            "risk_task_feature": task[best.indices.numpy()],
            "risk_sum": summed_excess_over_null(cos, null).numpy(),
            "harm_score": rows["harm_score"].to_numpy(),
            "harm_category": rows["harm_category"].to_numpy(),
        }
    ).assign(null_cosine=null)


def top_decile(risk: pd.DataFrame) -> np.ndarray:
    """The harmful features with the highest risk_max_cos: the tenth (at least one) fixed before any run."""
    return risk.nlargest(max(1, len(risk) // 10), "risk_max_cos")["feature"].to_numpy()


@dataclass(frozen=True)
class DiffGeometry:
    task_set: TaskSet
    risk: pd.DataFrame  # one row per harmful feature (predicted_risk)
    top: np.ndarray  # top-risk decile feature ids
    reference_risk: np.ndarray  # [R, H]: risk from frequency-matched random reference sets
    reference_info: dict
    matched: Matching  # all harmful features vs closeness- and frequency-matched non-harmful ones
    matched_top: Matching  # the same for the top-risk decile
    n_features: int

    def describe(self) -> dict:
        return {
            "task_set": self.task_set.describe(),
            "n_harmful": int(len(self.risk)),
            "top_risk_decile_size": int(self.top.size),
            "reference_sets": self.reference_info,
            "matching": {"all": self.matched.describe(), "top_risk_decile": self.matched_top.describe()},
        }


def _column(features: pd.DataFrame, name: str) -> np.ndarray | None:
    return features[name].to_numpy(np.float64) if name in features.columns else None


def diff_geometry(
    cache: str | Path | HarmGeometry,
    task_spec: str = "strict",
    n_reference: int = 200,
    frequency_bins: int = 10,
    match_bins: int = 5,
    seed: int = 0,
) -> DiffGeometry:
    """Everything the diff needs from the cache, computed once (module docstring)."""
    geo = load_harm_geometry(cache)
    feats = geo.features.sort_index()
    n = len(feats)
    frequency = _column(feats, "frequency")
    if frequency is None:
        raise CacheError(
            "features.parquet has no frequency column; rebuild the cache with `featuregeom precompute`"
        )
    harmful_mask = feats["is_harmful"].to_numpy(bool)
    task_set = select_task_set(
        task_spec, feats["is_task"].to_numpy(bool), _column(feats, "task_score"), frequency, harmful_mask
    )
    risk = predicted_risk(geo, task_set.features)
    harmful = np.array(risk["feature"], dtype=np.int64)  # a writable copy: torch takes it as is
    is_task = np.zeros(n, bool)
    is_task[task_set.features] = True
    pool = np.flatnonzero(~harmful_mask & ~is_task & (np.nan_to_num(frequency) > 0))
    sets, info = reference_sets(task_set.features, pool, frequency, n_reference, frequency_bins, seed)
    cos_pool = geo.cosines(harmful, pool).cpu().numpy()  # [H, pool]
    ref = reference_risk(cos_pool, pool, sets)
    # closeness of the non-harmful candidates to the task set, as risk_max_cos is for the harmful ones
    cand_close = geo.cosines(pool, task_set.features).cpu().numpy().max(axis=1)
    close = risk["risk_max_cos"].to_numpy(np.float64)
    top = top_decile(risk)
    in_top = np.isin(harmful, top)

    def matching(h: np.ndarray, h_close: np.ndarray) -> Matching:
        return closeness_matching(h, h_close, pool, cand_close, frequency, n, match_bins, match_bins)

    return DiffGeometry(
        task_set=task_set,
        risk=risk,
        top=top,
        reference_risk=ref,
        reference_info=info,
        matched=matching(harmful, close),
        matched_top=matching(harmful[in_top], close[in_top]),
        n_features=n,
    )
