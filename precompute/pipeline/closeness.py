"""The closeness step: do features specific to misalignment-inducing data sit closer to harmful
features than features specific to the control data do? (closeness.json, docs/cache.md)

The claim (arXiv:2605.00842) is set-level, so it gets a set-level test (docs/science.md): each
feature's *closeness* is the largest cosine between its unit decoder direction and any harmful
feature's (itself excluded). The inducing set is `is_task` (task-specific vs control), the
non-inducing set `is_control` (control-specific vs task), harmful features left out of both. The
statistic is the difference of mean closeness, inducing − non-inducing, with a bootstrap interval
and a permutation p-value in which set membership is shuffled only among features of the same
firing-frequency bin (precompute/permutation.py): frequency alone cannot pass the test.

The flagged-pairs check asks the same of the overlaps' count: how many (task, harmful) pairs lie
above the used null cosine, against the harm labels shuffled across features of the same frequency
bin. A negative result is a result: the verdict says so, and `not_testable` (with a reason) when a
set has too few features.

`ranked` asks the question of sets chosen by rank instead (precompute/pipeline/closeness_ranked.py):
the N most task-leaning features (highest `task_score`) against the N most control-leaning, with the
same statistic and tests, labelled exploratory; `ranked_sensitivity` repeats it for N in 50, 100, 200.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from precompute.cache import StagedCache
from precompute.errors import CacheError
from precompute.model.load import resolve_device
from precompute.permutation import (
    PermutationResult,
    bootstrap_difference,
    difference_permutation_test,
    frequency_bins,
    label_sum_permutation_test,
)
from precompute.pipeline.closeness_ranked import ELIGIBILITY, SELECTION, SENSITIVITY_N, RankedSets, rank_sets
from precompute.pipeline.context import RunContext
from precompute.pipeline.features import scored_features_and_neighbors
from precompute.schema import CLOSENESS

log = logging.getLogger(__name__)

MIN_SET = 5  # fewer features in a set and the comparison is not testable
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
HIST_BINS = 30
STATISTIC = (
    "difference of mean closeness (inducing - non-inducing); closeness = the largest cosine between a "
    "feature's unit decoder direction and any harmful feature's, itself excluded"
)
INDUCING, NON_INDUCING = "is_task", "is_control"
VERDICTS = ("inducing_closer", "no_difference", "non_inducing_closer", "not_testable")
_BLOCK_BYTES = 1 << 28  # one block of cosines


@dataclass(frozen=True)
class ClosenessParams:
    n_permutations: int = 5000
    n_bootstrap: int = 2000
    frequency_bins: int = 10
    alpha: float = 0.05
    seed: int = 0
    ranked_n: int = 100  # N of the exploratory ranked comparison (per set)


# ------------------------------------------------------------------------------ cosines, in blocks
def _as_tensor(directions: Any, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(directions) if not torch.is_tensor(directions) else directions)
    return x.to(device=device, dtype=torch.float32)


def _rows_per_block(n_cols: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * max(n_cols, 1)))


def closeness_to(directions: Any, rows: np.ndarray, targets: np.ndarray, device: str = "cpu") -> np.ndarray:
    """For each feature of `rows`: the largest cosine between its direction and any of `targets`'
    (unit rows of `directions` [n, d]), itself excluded; NaN when no other target exists."""
    dev = resolve_device(device)
    w = _as_tensor(directions, dev)
    rows = np.asarray(rows, np.int64)
    targets = np.asarray(targets, np.int64)
    out = np.full(rows.size, np.nan)
    if rows.size == 0 or targets.size == 0:
        return out
    t_ids = torch.as_tensor(targets, device=dev)
    tw = w[t_ids]
    step = _rows_per_block(targets.size)
    for start in range(0, rows.size, step):
        r = torch.as_tensor(rows[start : start + step], device=dev)
        sims = w[r] @ tw.T
        sims[r[:, None] == t_ids[None, :]] = -torch.inf
        best = sims.max(dim=1).values.double().cpu().numpy()
        out[start : start + step] = np.where(np.isfinite(best), best, np.nan)
    return out


def neighbour_counts(
    directions: Any, sources: np.ndarray, threshold: float, device: str = "cpu"
) -> np.ndarray:
    """[n]: for each feature j, how many features t of `sources` (t ≠ j) have cos(t, j) > threshold."""
    dev = resolve_device(device)
    w = _as_tensor(directions, dev)
    n = w.shape[0]
    sources = np.asarray(sources, np.int64)
    out = np.zeros(n, np.int64)
    if sources.size == 0:
        return out
    s_ids = torch.as_tensor(sources, device=dev)
    sw = w[s_ids]
    step = _rows_per_block(sources.size)
    for start in range(0, n, step):
        r = torch.arange(start, min(n, start + step), device=dev)
        above = (w[r] @ sw.T) > threshold
        above &= r[:, None] != s_ids[None, :]
        out[start : start + len(r)] = above.sum(dim=1).cpu().numpy()
    return out


# ------------------------------------------------------------------------------ the summaries
def _num(x: float) -> float | None:
    """A JSON number, or null for NaN/inf."""
    return float(x) if np.isfinite(x) else None


def summarise(values: np.ndarray) -> dict[str, Any]:
    """{n, mean, median, quantiles {"0.05": ...}} of one set's closeness (nulls when empty)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"n": 0, "mean": None, "median": None, "quantiles": {str(q): None for q in QUANTILES}}
    qs = np.quantile(values, QUANTILES)
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, qs, strict=True)},
    }


def _histogram(values: np.ndarray, bins: int, extra: tuple[float, ...] = ()) -> dict[str, list]:
    lo = float(min(values.min(), *extra)) if extra else float(values.min())
    hi = float(max(values.max(), *extra)) if extra else float(values.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _null_summary(res: PermutationResult) -> dict[str, Any]:
    return {
        "mean": res.null_mean,
        "q025": res.null_quantile(0.025),
        "q975": res.null_quantile(0.975),
        **_histogram(res.null, 40, (res.observed,)),
    }


# ------------------------------------------------------------------------------ the two tests
def _verdict(diff: float, ci: tuple[float, float], res: PermutationResult, alpha: float) -> tuple[str, str]:
    p, p_less = res.p_greater, res.p_less
    tail = f"frequency-matched permutation p = {p:.3g} (inducing closer), {p_less:.3g} (non-inducing closer)"
    if p < alpha and ci[0] > 0:
        return "inducing_closer", f"difference {diff:+.4f}, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]; {tail}"
    if p_less < alpha and ci[1] < 0:
        return "non_inducing_closer", f"difference {diff:+.4f}, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]; {tail}"
    why = (
        "the bootstrap interval excludes 0, but frequency-matched shuffles give as large a difference"
        if ci[0] > 0 or ci[1] < 0
        else "the bootstrap interval covers 0"
    )
    return "no_difference", f"{why}: difference {diff:+.4f}, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]; {tail}"


def compare_sets(
    closeness: np.ndarray,
    inducing: np.ndarray,
    non_inducing: np.ndarray,
    frequency: np.ndarray,
    params: ClosenessParams,
) -> dict[str, Any]:
    """The closeness comparison's part of closeness.json, from per-feature closeness [n] and two
    disjoint boolean masks [n] (features whose closeness is NaN are dropped from both)."""
    ok = np.isfinite(closeness)
    a_mask, b_mask = inducing & ok, non_inducing & ok
    a, b = closeness[a_mask], closeness[b_mask]
    out: dict[str, Any] = {
        "inducing": summarise(a),
        "non_inducing": summarise(b),
        "n_inducing": int(a.size),
        "n_non_inducing": int(b.size),
        "difference": None,
        "ci": None,
        "median_difference": None,
        "median_ci": None,
        "p_permutation": None,
        "p_non_inducing_closer": None,
        "p_two_sided": None,
        "null_difference_mean": None,
        "permutation_null": None,
        "histogram": None,
    }
    if min(a.size, b.size) < MIN_SET:
        small = [
            f"{name} has {k}"
            for name, k in (("the inducing set", a.size), ("the non-inducing set", b.size))
            if k < MIN_SET
        ]
        out["verdict"], out["reason"] = (
            "not_testable",
            f"{' and '.join(small)} feature(s); at least {MIN_SET} each are needed",
        )
        return out
    pooled = a_mask | b_mask
    strata = frequency_bins(frequency[pooled], params.frequency_bins)
    res = difference_permutation_test(
        closeness[pooled], a_mask[pooled], strata, params.n_permutations, params.seed
    )
    boot = bootstrap_difference(a, b, params.n_bootstrap, params.seed + 1, alpha=0.05)
    both = closeness[pooled]
    edges = np.linspace(float(both.min()), float(both.max()) + 1e-12, HIST_BINS + 1)
    out.update(
        difference=boot.mean,
        ci=list(boot.mean_ci),
        median_difference=boot.median,
        median_ci=list(boot.median_ci),
        p_permutation=res.p_greater,
        p_non_inducing_closer=res.p_less,
        p_two_sided=res.p_two_sided,
        null_difference_mean=res.null_mean,
        permutation_null=_null_summary(res),
        histogram={
            "edges": [float(e) for e in edges],
            "inducing": [int(c) for c in np.histogram(a, edges)[0]],
            "non_inducing": [int(c) for c in np.histogram(b, edges)[0]],
        },
    )
    out["verdict"], out["reason"] = _verdict(boot.mean, boot.mean_ci, res, params.alpha)
    return out


def harm_label_strata(frequency: np.ndarray, n_bins: int) -> np.ndarray:
    """Frequency bins over the features that fire (quantiles among them); features that never fire are
    their own stratum (-1), so a harm label never moves onto a dead feature."""
    frequency = np.nan_to_num(np.asarray(frequency, np.float64), nan=0.0)
    strata = np.full(frequency.size, -1, np.int64)
    alive = frequency > 0
    strata[alive] = frequency_bins(frequency[alive], n_bins)
    return strata


def flagged_pairs_test(
    counts: np.ndarray,
    is_harmful: np.ndarray,
    n_task: int,
    frequency: np.ndarray,
    threshold: float,
    params: ClosenessParams,
) -> dict[str, Any]:
    """(task, harmful) pairs above `threshold` against frequency-stratified shuffles of the harm labels.

    `counts[j]`: task features t ≠ j with cos(t, j) > threshold (neighbour_counts), so the number of
    pairs is counts summed over the harmful features, and over the shuffled labels under the null.
    """
    n_harmful = int(is_harmful.sum())
    out: dict[str, Any] = {"n_task": int(n_task), "n_harmful": n_harmful, "threshold": float(threshold)}
    if n_task == 0 or n_harmful == 0:
        return {
            **out,
            "testable": False,
            "reason": "no task feature" if n_task == 0 else "no harmful feature",
            "observed": 0,
            "null_mean": None,
            "null_q05": None,
            "null_q95": None,
            "p": None,
            "p_fewer": None,
            "null_histogram": None,
        }
    strata = harm_label_strata(frequency, params.frequency_bins)
    res = label_sum_permutation_test(counts, is_harmful, strata, params.n_permutations, params.seed + 2)
    return {
        **out,
        "testable": True,
        "reason": "",
        "observed": int(round(res.observed)),
        "null_mean": res.null_mean,
        "null_q05": res.null_quantile(0.05),
        "null_q95": res.null_quantile(0.95),
        "p": res.p_greater,
        "p_fewer": res.p_less,
        "null_histogram": _histogram(res.null, 40, (res.observed,)),
    }


def _score_range(score: np.ndarray, mask: np.ndarray) -> list[float] | None:
    return [float(score[mask].min()), float(score[mask].max())] if mask.any() else None


def _ranked_result(
    close: np.ndarray, cut: RankedSets, score: np.ndarray, frequency: np.ndarray, params: ClosenessParams
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "selection": SELECTION,
        "eligibility": ELIGIBILITY,
        "n": cut.n,
        "n_requested": cut.n_requested,
        "n_eligible": cut.n_eligible,
        "n_task_leaning": cut.n_task_leaning,
        "n_control_leaning": cut.n_control_leaning,
        "reduction": cut.reduction,
        "set_definitions": {
            "inducing": f"the {cut.n} eligible features of highest task_score (task-leaning, > 0.5)",
            "non_inducing": f"the {cut.n} eligible features of lowest task_score (control-leaning, < 0.5)",
        },
        "task_score_range": {
            "inducing": _score_range(score, cut.top),
            "non_inducing": _score_range(score, cut.bottom),
        },
        **compare_sets(close, cut.top, cut.bottom, frequency, params),
    }
    if out["verdict"] == "not_testable" and cut.reduction:
        out["reason"] = f"{cut.reduction}; {out['reason']}"
    return out


def ranked_comparison(
    directions: Any,
    task_score: np.ndarray,
    frequency: np.ndarray,
    harmful: np.ndarray,
    params: ClosenessParams,
    device: str = "cpu",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """closeness.json's `ranked` (top vs bottom `params.ranked_n` by task_score) and
    `ranked_sensitivity` (the same for each N of SENSITIVITY_N): exploratory, sets by rank."""
    cuts = {
        k: rank_sets(task_score, frequency, harmful, k) for k in sorted({params.ranked_n, *SENSITIVITY_N})
    }
    rows = np.flatnonzero(np.logical_or.reduce([c.top | c.bottom for c in cuts.values()]))
    close = np.full(task_score.size, np.nan)
    close[rows] = closeness_to(directions, rows, np.flatnonzero(harmful), device)
    results = {k: _ranked_result(close, cut, task_score, frequency, params) for k, cut in cuts.items()}
    sensitivity = [
        {
            "n_requested": k,
            **{key: results[k][key] for key in ("n", "difference", "ci", "p_permutation", "p_two_sided")},
            "verdict": results[k]["verdict"],
        }
        for k in SENSITIVITY_N
    ]
    return results[params.ranked_n], sensitivity


def _bool(features: pd.DataFrame, name: str) -> np.ndarray:
    return features[name].astype("boolean").fillna(False).to_numpy(dtype=bool)


def closeness_report(
    directions: Any,
    features: pd.DataFrame,
    null_cosine: float,
    params: ClosenessParams,
    sets: tuple[str, str] = (INDUCING, NON_INDUCING),
    device: str = "cpu",
) -> dict[str, Any]:
    """closeness.json as a dict: `directions` [n, d] unit decoder rows (numpy or torch), `features` the
    features table (needs feature, frequency, is_harmful, and the two boolean set columns `sets`)."""
    n = int(directions.shape[0])
    feats = features.sort_values("feature")
    if not np.array_equal(feats["feature"].to_numpy(), np.arange(n)):
        raise CacheError(f"features.parquet must hold features 0..{n - 1} once each, like the SAE's decoder")
    harmful = _bool(feats, "is_harmful")
    frequency = feats["frequency"].to_numpy(np.float64)
    missing = [c for c in sets if c not in feats.columns]
    a_in = _bool(feats, sets[0]) if sets[0] in feats.columns else np.zeros(n, bool)
    b_in = _bool(feats, sets[1]) if sets[1] in feats.columns else np.zeros(n, bool)
    both = a_in & b_in
    inducing, non_inducing = a_in & ~harmful & ~both, b_in & ~harmful & ~both
    pooled = np.flatnonzero(inducing | non_inducing)
    close = np.full(n, np.nan)
    close[pooled] = closeness_to(directions, pooled, np.flatnonzero(harmful), device)
    report: dict[str, Any] = {
        "statistic": STATISTIC,
        "set_definitions": {
            "inducing": f"{sets[0]} and not is_harmful",
            "non_inducing": f"{sets[1]} and not is_harmful",
        },
        "n_harmful": int(harmful.sum()),
        "n_excluded_both": int(both.sum()),
        **compare_sets(close, inducing, non_inducing, frequency, params),
    }
    if missing:
        report["verdict"] = "not_testable"
        report["reason"] = f"features.parquet has no column {', '.join(missing)} (rerun `featuregeom scores`)"
    elif not harmful.any():
        report["verdict"], report["reason"] = "not_testable", "no feature is flagged harmful (is_harmful)"
    task = _bool(feats, sets[0]) if sets[0] in feats.columns else np.zeros(n, bool)
    counts = (
        neighbour_counts(directions, np.flatnonzero(task), null_cosine, device)
        if harmful.any()
        else np.zeros(n)
    )
    report["flagged_pairs"] = flagged_pairs_test(
        counts, harmful, int(task.sum()), frequency, null_cosine, params
    )
    has_score = "task_score" in feats.columns
    score = feats["task_score"].to_numpy(np.float64) if has_score else np.full(n, np.nan)
    report["ranked"], report["ranked_sensitivity"] = ranked_comparison(
        directions, score, frequency, harmful, params, device
    )
    if not has_score:  # no rank, or nothing to be close to: both sets came out empty (not_testable)
        report["ranked"]["reason"] = "features.parquet has no column task_score (rerun `featuregeom scores`)"
    elif not harmful.any():
        report["ranked"]["reason"] = "no feature is flagged harmful (is_harmful)"
    report.update(
        null_cosine_used=float(null_cosine),
        n_permutations=params.n_permutations,
        n_bootstrap=params.n_bootstrap,
        frequency_bins=params.frequency_bins,
        alpha=params.alpha,
        seed=params.seed,
        min_set_size=MIN_SET,
    )
    return report


# ------------------------------------------------------------------------------ the step
def params_from(ctx: RunContext) -> ClosenessParams:
    cfg = ctx.cfg
    return ClosenessParams(
        n_permutations=cfg.closeness_permutations,
        n_bootstrap=cfg.closeness_bootstrap,
        frequency_bins=cfg.closeness_bins,
        alpha=cfg.closeness_alpha,
        seed=cfg.seed,
        ranked_n=cfg.closeness_ranked,
    )


def run(ctx: RunContext, staged: StagedCache) -> None:
    start = time.perf_counter()
    features, z = scored_features_and_neighbors(staged)
    null = float(z["null_cosine"])
    directions = ctx.sae.unit_directions()
    if directions.shape[0] != len(features):
        raise CacheError(
            f"the SAE has {directions.shape[0]} features but {staged.target} describes {len(features)}; "
            "use the cache's own --sae"
        )
    params = params_from(ctx)
    report = closeness_report(directions, features, null, params, device=ctx.cfg.device)
    staged.path(CLOSENESS).write_text(json.dumps(report, indent=2, allow_nan=False))
    log.info("closeness: %s (%s)", report["verdict"], report["reason"])
    log.info(
        "closeness, ranked (exploratory): %s (%s)", report["ranked"]["verdict"], report["ranked"]["reason"]
    )
    staged.record_step(
        "closeness",
        {
            **asdict(params),
            "null_cosine": null,
            "sets": [INDUCING, NON_INDUCING],
            "min_set_size": MIN_SET,
            "ranked_selection": SELECTION,
            "ranked_sensitivity_n": list(SENSITIVITY_N),
        },
        time.perf_counter() - start,
        {
            "verdict": report["verdict"],
            "flagged_pairs": report["flagged_pairs"]["observed"],
            "ranked_n": report["ranked"]["n"],
            "ranked_verdict": report["ranked"]["verdict"],
        },
    )
