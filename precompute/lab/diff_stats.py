"""The fine-tune diff's statistics on arrays (no files): per-feature changes with hierarchical intervals,
and per comparison the pooled changes, rho(risk, Δ) against its null band, and harmful minus
closeness-matched non-harmful features (the difference in differences for task − control).

Arms: `base` (one model, [P, F] per prompt), `task` and `control` ([S, P, F]: one row per training
seed). Comparisons and what each replicate is (precompute/lab/hboot.py for the draws):
    task − base      the task arm's replicate of (task_s − base) per prompt
    control − base   the same for control
    task − control   task arm's replicate of task_s minus control arm's replicate of control_s
                     (slot k of both arms reads the same prompt draw, so prompts stay paired)
"Per seed" values are what a single-seed experiment would have reported: task seed s − base, and for
task − control task seed s − control seed s (the same training seed: the single-seed experiments as
run, and the pairs the default resampling keeps together; every task seed against every control seed
when the arms have different seed counts). The interval of a pooled statistic "covers the seeds" when
every per-seed value lies inside it; it is recorded, not assumed (with three seeds a 95% interval
usually does, see tests/precompute/lab/test_hboot.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from precompute.lab.hboot import Draws, percentile_interval, spearman_rows
from precompute.lab.risk import DiffGeometry


@dataclass(frozen=True)
class Comparison:
    """One comparison's point estimate, replicates and single-seed values for [..., F] features."""

    name: str
    before: np.ndarray  # [F] mean of the reference arm
    after: np.ndarray  # [F]
    point: np.ndarray  # [F]
    boot: np.ndarray  # [B, F]
    per_seed: np.ndarray  # [n_single, F]


def comparisons(
    draws: Draws, base: np.ndarray, task: np.ndarray, control: np.ndarray | None, labels: tuple[str, str, str]
) -> list[Comparison]:
    """task − base, control − base and task − control (module docstring) on [P, F] / [S, P, F] arrays."""
    b, a, c = labels
    base, task = np.asarray(base, np.float64), np.asarray(task, np.float64)
    out = [
        Comparison(
            f"{a} - {b}",
            base.mean(axis=0),
            task.mean(axis=(0, 1)),
            (task - base[None]).mean(axis=(0, 1)),
            draws.replicates("task", task - base[None]),
            (task - base[None]).mean(axis=1),
        )
    ]
    if control is None:
        return out
    control = np.asarray(control, np.float64)
    out.append(
        Comparison(
            f"{c} - {b}",
            base.mean(axis=0),
            control.mean(axis=(0, 1)),
            (control - base[None]).mean(axis=(0, 1)),
            draws.replicates("control", control - base[None]),
            (control - base[None]).mean(axis=1),
        )
    )
    t_seed, c_seed = task.mean(axis=1), control.mean(axis=1)  # [S, F]
    if t_seed.shape[0] == c_seed.shape[0]:
        single = t_seed - c_seed
    else:
        single = (t_seed[:, None] - c_seed[None, :]).reshape(-1, task.shape[2])
    out.append(
        Comparison(
            f"{a} - {c}",
            control.mean(axis=(0, 1)),
            task.mean(axis=(0, 1)),
            task.mean(axis=(0, 1)) - control.mean(axis=(0, 1)),
            draws.replicates("task", task) - draws.replicates("control", control),
            single,
        )
    )
    return out


def interval(point: float, boot: np.ndarray, alpha: float = 0.05) -> list[float]:
    lo, hi = percentile_interval(np.asarray(boot, np.float64), alpha)
    return [float(point), float(lo), float(hi)]


def covers(ci: list[float], values: np.ndarray) -> bool:
    """Every single-seed value inside [lo, hi] (a tolerance for float noise)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    tol = 1e-12 * max(1.0, float(np.abs(values).max()) if values.size else 1.0)
    return bool(((values >= ci[1] - tol) & (values <= ci[2] + tol)).all())


def feature_frame(mean: Comparison, rate: Comparison, alpha: float = 0.05) -> pd.DataFrame:
    """Per feature: before/after/Δ of the mean activation and the firing rate, hierarchical intervals, and
    the range of single-seed Δs."""
    lo, hi = percentile_interval(mean.boot, alpha)
    rlo, rhi = percentile_interval(rate.boot, alpha)
    return pd.DataFrame(
        {
            "feature": np.arange(mean.point.size, dtype=np.int64),
            "mean_before": mean.before,
            "mean_after": mean.after,
            "delta": mean.point,
            "delta_lo": lo,
            "delta_hi": hi,
            "delta_seed_min": mean.per_seed.min(axis=0),
            "delta_seed_max": mean.per_seed.max(axis=0),
            "rate_before": rate.before,
            "rate_after": rate.after,
            "rate_delta": rate.point,
            "rate_delta_lo": rlo,
            "rate_delta_hi": rhi,
        }
    )


def _pooled(cmp: Comparison, feats: np.ndarray, alpha: float) -> tuple[list[float], list[float], bool]:
    """Mean Δ over `feats`: [est, lo, hi], its single-seed values, and whether the interval covers them."""
    ci = interval(float(cmp.point[feats].mean()), cmp.boot[:, feats].mean(axis=1), alpha)
    seeds = cmp.per_seed[:, feats].mean(axis=1)
    return ci, [float(x) for x in seeds], covers(ci, seeds)


def _weighted(cmp: Comparison, weights: np.ndarray, alpha: float) -> tuple[list[float], list[float], bool]:
    ci = interval(float(cmp.point @ weights), cmp.boot @ weights, alpha)
    seeds = cmp.per_seed @ weights
    return ci, [float(x) for x in seeds], covers(ci, seeds)


def rho_with_null(cmp: Comparison, geo: DiffGeometry, alpha: float = 0.05) -> dict[str, Any]:
    """Spearman rho(risk_max_cos, Δ) over the harmful features, its hierarchical interval and single-seed
    values, and the null band: the same rho with risk computed from each frequency-matched reference set
    instead of the task set (at the point Δ), its p (share of reference sets reaching the observed rho,
    the observed counted once), and the excess rho - mean null rho with a hierarchical interval."""
    harmful = geo.risk["feature"].to_numpy(np.int64)
    risk = geo.risk["risk_max_cos"].to_numpy(np.float64)
    rho = float(spearman_rows(risk, cmp.point[harmful]))
    boot = spearman_rows(risk, cmp.boot[:, harmful])  # [B]
    ci = interval(rho, boot, alpha)
    seeds = spearman_rows(risk, cmp.per_seed[:, harmful])
    ref = geo.reference_risk
    null = spearman_rows(ref, cmp.point[harmful])  # [R]
    null_boot = spearman_rows(ref, cmp.boot[:, harmful])  # [R, B]
    finite = null[np.isfinite(null)]
    null_mean = float(finite.mean()) if finite.size else float("nan")
    with warnings.catch_warnings():  # a reference set whose risk is constant has no rho (NaN), skipped
        warnings.simplefilter("ignore", RuntimeWarning)
        excess_boot = boot - np.nanmean(null_boot, axis=0)
    lo, hi = percentile_interval(null, alpha)
    return {
        "spearman_risk_max_cos": ci,
        "spearman_seeds": [float(x) for x in np.atleast_1d(seeds)],
        "spearman_covers_seeds": covers(ci, np.atleast_1d(seeds)),
        "rho_null": {
            "n_sets": int(ref.shape[0]),
            "mean": null_mean,
            "lo": float(lo),
            "hi": float(hi),
            "p_greater": float((1 + np.count_nonzero(finite >= rho - 1e-12)) / (1 + finite.size)),
            "excess": interval(rho - null_mean, excess_boot, alpha),
        },
    }


def comparison_summary(cmp: Comparison, geo: DiffGeometry, alpha: float = 0.05) -> dict[str, Any]:
    """summary.json's entry for one (prompt set, position, comparison): mean activation only."""
    harmful = geo.risk["feature"].to_numpy(np.int64)
    lo, hi = percentile_interval(cmp.boot, alpha)
    harm_ci, harm_seeds, harm_cover = _pooled(cmp, harmful, alpha)
    top_ci, top_seeds, top_cover = _pooled(cmp, geo.top, alpha)
    did, did_seeds, did_cover = _weighted(cmp, geo.matched.weights, alpha)
    did_top, did_top_seeds, top_covers = _weighted(cmp, geo.matched_top.weights, alpha)
    did_top_cover: bool | None = top_covers
    if not geo.matched_top.n_harmful:  # nothing matched: no estimate, and no seeds for it to cover
        did_top_seeds, did_top_cover = [], None
    rs = geo.risk["risk_sum"].to_numpy(np.float64)
    # rho is undefined when risk_sum is constant, e.g. 0 for every harmful feature: no task feature is
    # above the null cosine for any of them; null says so instead of an interval of NaNs
    rho_sum = (
        interval(float(spearman_rows(rs, cmp.point[harmful])), spearman_rows(rs, cmp.boot[:, harmful]), alpha)
        if np.unique(rs).size > 1
        else None
    )
    return {
        **rho_with_null(cmp, geo, alpha),
        "spearman_risk_sum": rho_sum,
        "harmful_mean_change": harm_ci,
        "top_risk_decile_mean_change": top_ci,
        "harmful_minus_matched": did if geo.matched.n_harmful else None,
        "harmful_minus_matched_top_decile": did_top if geo.matched_top.n_harmful else None,
        "harmful_mean_before": float(cmp.before[harmful].mean()),
        "top_risk_decile_mean_before": float(cmp.before[geo.top].mean()),
        "top_risk_decile_size": int(geo.top.size),
        "harmful_ci_excludes_zero_up": int((lo[harmful] > 0).sum()),
        "harmful_ci_excludes_zero_down": int((hi[harmful] < 0).sum()),
        "all_ci_excludes_zero": int(((lo > 0) | (hi < 0)).sum()),
        "per_seed": {
            "harmful_mean_change": harm_seeds,
            "top_risk_decile_mean_change": top_seeds,
            "harmful_minus_matched": did_seeds,
            "harmful_minus_matched_top_decile": did_top_seeds,
        },
        "covers_seeds": {
            "harmful_mean_change": harm_cover,
            "top_risk_decile_mean_change": top_cover,
            "harmful_minus_matched": did_cover,
            "harmful_minus_matched_top_decile": did_top_cover,
        },
    }


def behaviour_summary(
    cmps: list[Comparison], levels: dict[str, tuple[np.ndarray, np.ndarray]], measures, alpha=0.05
):
    """The log-prob readout: each model's level and each comparison, per measure [est, lo, hi], with the
    single-seed values and whether the interval covers them. `levels`: label -> (point [M], boot [B, M])."""
    out: dict[str, Any] = {
        "levels": {
            label: {m: interval(float(p[i]), b[:, i], alpha) for i, m in enumerate(measures)}
            for label, (p, b) in levels.items()
        },
        "comparisons": {},
    }
    for cmp in cmps:
        entry: dict[str, Any] = {}
        for i, m in enumerate(measures):
            ci = interval(float(cmp.point[i]), cmp.boot[:, i], alpha)
            entry[m] = ci
            entry[f"{m}_seeds"] = [float(x) for x in cmp.per_seed[:, i]]
            entry[f"{m}_covers_seeds"] = covers(ci, cmp.per_seed[:, i])
        out["comparisons"][cmp.name] = entry
    return out
