"""Which features the fine-tune diff compares, and against what: the task set, frequency-matched random
reference sets (the null band of rho(risk, Δ)) and closeness-matched non-harmful features (the
difference in differences). Pure numpy; the cosines come from the caller.

Why these controls (issue 13). Predicted risk = max cosine to any task feature. A random set of
non-harmful features with the task set's size and firing-frequency profile gave rho(risk, Δ) = +0.154
against the observed +0.191: most of the correlation is what closeness to *any* such set of features
predicts, because features that fire often both sit close to many features and move more under any
fine-tune. And non-harmful features as close to the task features as the harmful ones rose as much.
So the diff reports rho against its null band, and harmful minus matched non-harmful features at the
same closeness and firing frequency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from precompute.errors import FeatureGeomError
from precompute.permutation import frequency_bins

STRICT = "strict"
RANKED_SELECTION = (
    "the N most task-leaning features by task_score (task vs control, > 0.5), eligible as in "
    "precompute/pipeline/closeness_ranked.py (not harmful, firing, a finite score): by rank, not by significance"
)


@dataclass(frozen=True)
class TaskSet:
    """The features whose closeness is the predicted risk, and how they were chosen."""

    spec: str  # "strict" or "ranked:N"
    features: np.ndarray  # feature ids
    exploratory: bool
    selection: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "kind": self.spec.split(":")[0],
            "n": int(self.features.size),
            "exploratory": self.exploratory,
            "selection": self.selection,
            "notes": list(self.notes),
            "features": [int(x) for x in self.features],
        }

    @property
    def label(self) -> str:
        """What every output row and printed line carries."""
        return f"{self.spec} (exploratory)" if self.exploratory else self.spec


def parse_task_set(spec: str) -> tuple[str, int | None]:
    """'strict' -> ('strict', None); 'ranked:N' -> ('ranked', N). FeatureGeomError otherwise."""
    spec = spec.strip()
    if spec == STRICT:
        return STRICT, None
    kind, _, n = spec.partition(":")
    if kind == "ranked" and n.isdigit() and int(n) >= 1:
        return "ranked", int(n)
    raise FeatureGeomError(
        f"--task-set {spec!r} is not understood; use 'strict' (is_task) or 'ranked:N' (exploratory, N >= 1)"
    )


def select_task_set(
    spec: str, is_task: np.ndarray, task_score: np.ndarray | None, frequency, harmful
) -> TaskSet:
    """The task set of `spec`; exit-2 errors that say what to do when it is empty."""
    kind, n = parse_task_set(spec)
    if kind == STRICT:
        feats = np.flatnonzero(np.asarray(is_task, bool))
        if not feats.size:
            raise FeatureGeomError(
                "the cache has no task features (no feature passes is_task: task vs control beyond chance, see "
                "params/scores.json n_task and task_permutation), so the strict fine-tune diff is not testable "
                "on it: a negative result of the scores step. To run the machinery anyway, pass "
                "--task-set ranked:100 (the 100 most task-leaning features by task_score); every output is then "
                "labelled exploratory"
            )
        return TaskSet(STRICT, feats, False, "is_task in features.parquet (task vs control, length-proof)")
    if task_score is None:
        raise FeatureGeomError("features.parquet has no task_score column; rerun `featuregeom scores`")
    feats = ranked_task_features(task_score, frequency, harmful, int(n or 0))
    if not feats.size:
        raise FeatureGeomError(
            f"--task-set {spec}: no feature leans towards the task (task_score > 0.5 among eligible features)"
        )
    notes = [f"N reduced from {n} to {feats.size}: only that many eligible features lean towards the task"]
    return TaskSet(f"ranked:{n}", feats, True, RANKED_SELECTION, notes if feats.size < int(n or 0) else [])


def ranked_task_features(
    task_score: np.ndarray, frequency: np.ndarray, harmful: np.ndarray, n: int
) -> np.ndarray:
    """The n most task-leaning eligible features (closeness_ranked.eligible, task_score > 0.5), highest
    score first, ties by feature id; sorted by id. The explorer recomputes it to check a diff's basis."""
    from precompute.pipeline.closeness_ranked import eligible

    score = np.asarray(task_score, np.float64)
    up = np.flatnonzero(eligible(score, frequency, harmful) & (score > 0.5))
    return np.sort(up[np.lexsort((up, -score[up]))][:n])


def _draw_near(
    rng: np.random.Generator, free: np.ndarray, pool_bins: np.ndarray, b: int, count: int
) -> np.ndarray:
    """`count` free pool positions from bin b, or all of bin b and the rest from the nearest bins."""
    own = np.flatnonzero(free & (pool_bins == b))
    if own.size >= count:
        return rng.choice(own, size=count, replace=False)
    rest, width = count - own.size, 1
    while (near := np.flatnonzero(free & (pool_bins != b) & (np.abs(pool_bins - b) <= width))).size < rest:
        width += 1
    return np.concatenate([own, rng.choice(near, size=rest, replace=False)])


def reference_sets(
    target: np.ndarray, pool: np.ndarray, frequency: np.ndarray, n_sets: int, n_bins: int, seed: int
) -> tuple[np.ndarray, dict]:
    """[n_sets, len(target)] random feature sets from `pool`, each with the target set's firing-frequency
    profile: for every quantile bin of `frequency`, as many features from that bin as the target has,
    drawn without replacement. When a bin's pool runs short (a task set crowded into the most frequent
    bin), all of it is taken and the rest comes from the nearest bins on both sides, so a set never
    holds a feature twice; only a pool smaller than the target set is drawn with replacement.
    The info counts the features drawn outside their own bin (`taken_from_nearest_bin`, summed over sets)."""
    target, pool = np.asarray(target, np.int64), np.asarray(pool, np.int64)
    if not pool.size:
        raise FeatureGeomError("no non-harmful, non-task feature is left to draw reference sets from")
    bins = frequency_bins(np.asarray(frequency, np.float64), n_bins)
    pool_bins = bins[pool]
    need = list(zip(*np.unique(bins[target], return_counts=True), strict=True))
    rng = np.random.default_rng(seed)
    out = np.empty((n_sets, target.size), np.int64)
    moved = 0
    replace = pool.size < target.size
    for r in range(n_sets):
        free = np.ones(pool.size, bool)
        col = 0
        for b, count in need:
            count = int(count)
            if replace:
                chosen = rng.choice(pool[pool_bins == b] if (pool_bins == b).any() else pool, size=count)
            else:
                pick = _draw_near(rng, free, pool_bins, int(b), count)
                free[pick] = False
                chosen = pool[pick]
                moved += int((pool_bins[pick] != b).sum())
            out[r, col : col + count] = chosen
            col += count
    info = {"n_sets": int(n_sets), "frequency_bins": int(n_bins), "pool": int(pool.size)}
    info.update(drawn_with_replacement=bool(replace), taken_from_nearest_bin=moved)
    return out, info


def reference_risk(cos_harm_pool: np.ndarray, pool: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """[n_sets, H]: each harmful feature's max cosine to each reference set (`cos_harm_pool` [H, len(pool)])."""
    where = {int(f): i for i, f in enumerate(np.asarray(pool))}
    cols = np.vectorize(where.__getitem__, otypes=[np.int64])(sets)  # [R, T] columns of cos_harm_pool
    return np.stack([cos_harm_pool[:, c].max(axis=1) for c in cols])


@dataclass(frozen=True)
class Matching:
    """Feature weights v with Σ v_f Δ_f = mean over matched harmful features of Δ minus the matched
    non-harmful mean of their stratum (strata: firing-frequency bin × closeness bin)."""

    weights: np.ndarray  # [n_features]
    n_harmful: int  # harmful features with at least one match
    n_unmatched: int  # harmful features whose stratum holds no candidate (left out)
    n_reference: int  # distinct non-harmful features with a non-zero weight
    n_strata: int

    def describe(self) -> dict:
        return {
            "n_harmful_matched": self.n_harmful,
            "n_harmful_unmatched": self.n_unmatched,
            "n_reference": self.n_reference,
            "n_strata": self.n_strata,
        }


def closeness_matching(
    harmful: np.ndarray,
    harmful_close: np.ndarray,
    candidates: np.ndarray,
    candidate_close: np.ndarray,
    frequency: np.ndarray,
    n_features: int,
    freq_bins: int = 5,
    close_bins: int = 5,
) -> Matching:
    """Stratify harmful features and non-harmful `candidates` by firing frequency (quantile bins over all
    features) and closeness to the task set (quantile bins of the harmful features' closeness; a
    candidate outside the harmful range is not used). In each stratum with both kinds, the harmful
    features weigh 1/n_matched each and the candidates share −(harmful in stratum)/n_matched equally."""
    harmful, candidates = np.asarray(harmful, np.int64), np.asarray(candidates, np.int64)
    harmful_close, candidate_close = np.asarray(harmful_close, float), np.asarray(candidate_close, float)
    fbin = frequency_bins(np.asarray(frequency, np.float64), freq_bins)
    edges = np.quantile(harmful_close, np.linspace(0.0, 1.0, close_bins + 1))
    inner = edges[1:-1]
    h_stratum = fbin[harmful] * close_bins + np.searchsorted(inner, harmful_close, side="right")
    inside = (candidate_close >= edges[0]) & (candidate_close <= edges[-1])
    c_stratum = fbin[candidates] * close_bins + np.searchsorted(inner, candidate_close, side="right")
    c_stratum = np.where(inside, c_stratum, -1)
    weights = np.zeros(n_features)
    matched = [s for s in np.unique(h_stratum) if (c_stratum == s).any()]
    h_in = np.isin(h_stratum, matched)
    n_used = int(h_in.sum())
    if n_used:
        for s in matched:
            hs, cs = harmful[h_stratum == s], candidates[c_stratum == s]
            weights[hs] += 1.0 / n_used
            weights[cs] -= hs.size / n_used / cs.size
    return Matching(
        weights=weights,
        n_harmful=n_used,
        n_unmatched=int(harmful.size - n_used),
        n_reference=int((weights[candidates] != 0).sum()) if candidates.size else 0,
        n_strata=len(matched),
    )
