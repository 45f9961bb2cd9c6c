"""What a cache supports saying, counted once: flagged features, thresholds, the nulls, flagged pairs,
the closeness verdict.

Why: the explorer claims only what the cache shows. A page or the story states a result ("a task
feature", "a flagged pair", "closer than chance") only when these numbers back it, and otherwise
says what the cache found instead. Everything here is read from the cache's own files: the tables
and archives the explorer loaded, the manifest's step parameters, the scores step's sidecar
(params/scores.json, checked against its manifest checksum) and closeness.json. Plain data, no
Streamlit, no text (explorer/claims.py writes the sentences).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from explorer.data.cache_data import CacheData
from explorer.data.closeness import read_closeness
from precompute import schema
from precompute.cache import verify_cache
from precompute.errors import CacheError

LEAN_KEYS = ("lo_above_half", "hi_below_half")  # task_permutation rows: leaning to task, to control


@dataclass(frozen=True)
class Lean:
    """One row of params/scores.json `task_permutation`: a count of features against label shuffles."""

    observed: int
    permuted_mean: float
    permuted_p95: float
    p: float
    n_permutations: int


@dataclass(frozen=True)
class Findings:
    """Counts and levels of one cache, as its files state them (None / NaN: the cache does not say)."""

    n_features: int
    n_dead: int
    n_task_scored: int  # features with a finite task score (task vs control)
    n_task: int  # is_task with task_score_lo > 0.5 (what explorer.claims.fires_on_task asks of one feature)
    n_control: int  # is_control
    n_harmful: int  # is_harmful with harm_score_lo > 0.5 (explorer.claims.fires_on_harm)
    n_flagged: int  # rows of overlaps.parquet
    n_flagged_task: int  # distinct task features among them
    flag_scope: int | None  # the overlaps step looks at this many task features (the best by task score)
    best_task: tuple[int, float] | None  # the feature with the highest task score, and that score
    task_threshold: float | None
    harm_threshold: float | None
    min_docs: int | None
    task_documents: tuple[int, int] | None  # task and control documents scored on the task window
    lean: dict[str, Lean]  # LEAN_KEYS present in the scores sidecar
    harm_categories: list[tuple[str, int]]  # harmful features per category, most first
    null_cosine: float
    null_kind: str
    null_isotropic: float
    null_covariance: float
    fpr: float
    nn_above_isotropic: float  # share of features whose nearest neighbour is above the isotropic null
    nn_above_null: float  # ... above the flagging null
    typical_nn_cosine: float  # median nearest-neighbour cosine over live features
    closeness: dict[str, Any] | None  # closeness.json, None when absent or unreadable
    closeness_problem: str | None = None  # why closeness.json could not be read
    notes: list[str] = field(default_factory=list)  # sidecar problems, for a caption

    @property
    def closeness_verdict(self) -> str | None:
        return None if self.closeness is None else str(self.closeness.get("verdict"))


def step_sidecar(cache: CacheData, step: str) -> dict[str, Any] | None:
    """params/<step>.json of the cache, checked against the manifest checksum; None when absent.
    CacheError when it is damaged or unreadable."""
    name = schema.params_file(step)
    path = cache.path / name
    if not path.is_file():
        return None
    verify_cache(cache.path, (name,))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is not readable JSON ({exc}); rerun `featuregeom {step}`") from exc
    if not isinstance(data, dict):
        raise CacheError(f"{path} must hold a JSON object; rerun `featuregeom {step}`")
    return data


def _number(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _supported(f: Any, flag: str, lower: str) -> int:
    """Features flagged `flag` whose score's lower 95% bound excludes chance: a flag its own bound
    contradicts is not counted (the story states no count the cache does not support)."""
    if lower not in f.columns:
        return int(f[flag].sum())
    lo = f[lower].to_numpy(dtype=np.float64, na_value=np.nan)
    return int((f[flag].to_numpy(dtype=bool) & (lo > 0.5)).sum())


def _count(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _lean(sidecar: dict[str, Any] | None) -> dict[str, Lean]:
    perm = (sidecar or {}).get("task_permutation")
    if not isinstance(perm, dict):
        return {}
    n = _count(perm.get("n_permutations"))
    out = {}
    for key in LEAN_KEYS:
        row = perm.get(key)
        if not isinstance(row, dict):
            continue
        obs = _count(row.get("observed"))
        mean, p95, p = (_number(row.get(k)) for k in ("permuted_mean", "permuted_p95", "p"))
        if obs is None or n is None or mean is None or p95 is None or p is None:
            continue
        out[key] = Lean(obs, mean, p95, p, n)
    return out


def _task_documents(sidecar: dict[str, Any] | None) -> tuple[int, int] | None:
    docs = ((sidecar or {}).get("params") or {}).get("documents_scored_task_window")
    if not isinstance(docs, dict):
        return None
    t, c = _count(docs.get("task")), _count(docs.get("control"))
    return (t, c) if t is not None and c is not None else None


def _closeness(cache: CacheData) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return read_closeness(cache.path), None
    except CacheError as exc:
        return None, str(exc)


def _share_above(nearest_sorted: np.ndarray, level: float) -> float:
    v = nearest_sorted
    if v.size == 0 or not math.isfinite(level):
        return float("nan")
    return float(1.0 - np.searchsorted(v, level, side="right") / v.size)


def cache_findings(cache: CacheData) -> Findings:
    """Everything above, computed from the cache (a few vectorised column sums and two small files)."""
    f = cache.features
    notes: list[str] = []
    try:
        sidecar = step_sidecar(cache, "scores")
    except CacheError as exc:
        sidecar = None
        notes.append(str(exc))
    params = (cache.manifest.get("params") or {}).get("scores") or {}
    task = f["task_score"].to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(task)
    best = int(np.nanargmax(np.where(finite, task, -np.inf))) if finite.any() else None
    cats = f.loc[f["is_harmful"], "harm_category"].dropna().astype(str).value_counts()
    ov = cache.overlaps
    nb = cache.neighbors
    live = ~f["dead"].to_numpy()
    first = nb.cosine[:, 0].astype(np.float64) if nb.cosine.shape[1] else np.zeros(0)
    typical = first[live & np.isfinite(first)] if len(first) == len(live) else np.zeros(0)
    closeness, problem = _closeness(cache)
    min_docs = params.get("min_docs")
    return Findings(
        n_features=cache.n,
        n_dead=int(f["dead"].sum()),
        n_task_scored=int(finite.sum()),
        n_task=_supported(f, "is_task", "task_score_lo"),
        n_control=int(f["is_control"].sum()),
        n_harmful=_supported(f, "is_harmful", "harm_score_lo"),
        n_flagged=len(ov),
        n_flagged_task=int(ov["task_feature"].nunique()),
        flag_scope=_count(((cache.manifest.get("params") or {}).get("overlaps") or {}).get("n_task")),
        best_task=(best, float(task[best])) if best is not None else None,
        task_threshold=_number(params.get("task_threshold")),
        harm_threshold=_number(params.get("harm_threshold")),
        min_docs=_count(min_docs),
        task_documents=_task_documents(sidecar),
        lean=_lean(sidecar),
        harm_categories=[(str(k), int(v)) for k, v in cats.items()],
        null_cosine=float(nb.null_cosine),
        null_kind=str(nb.null_kind),
        null_isotropic=float(nb.null_isotropic),
        null_covariance=float(nb.null_covariance),
        fpr=float(nb.fpr),
        nn_above_isotropic=_share_above(nb.nearest_sorted, nb.null_isotropic),
        nn_above_null=_share_above(nb.nearest_sorted, nb.null_cosine),
        typical_nn_cosine=float(np.median(typical)) if len(typical) else float("nan"),
        closeness=closeness,
        closeness_problem=problem,
        notes=notes,
    )
