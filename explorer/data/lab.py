"""Mechanism-lab results inside a cache: CACHE/finetune/<run>/ (`featuregeom diff`) and
CACHE/triage/<name>/ (`featuregeom triage`).

Optional, added after the cache was built, so they are not in its manifest: read without checksums,
each directory on its own (one bad run never hides the others). `explorer/state.py` caches them keyed
by path and file mtimes, so a rerun of `featuregeom diff` or `triage` shows up on the next page rerun.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from precompute import schema
from precompute.errors import CacheError

FINETUNE_FILES = (schema.FINETUNE_DIFF, schema.FINETUNE_SUMMARY)
TRIAGE_FILES = (schema.TRIAGE_RANKED, schema.TRIAGE_TOKENS, schema.TRIAGE_META)
REQUIRED_DIFF_COLUMNS = (
    "prompt_set",
    "position",
    "comparison",
    "feature",
    "delta",
    "delta_lo",
    "delta_hi",
    "rate_delta",
    "rate_delta_lo",
    "rate_delta_hi",
    "risk_max_cos",
    "is_harmful",
)
REQUIRED_RANKED_COLUMNS = ("rank", "key", "score", "direct", "via_overlap", "removed")
REQUIRED_TOKEN_COLUMNS = ("rank", "key", "tokens", "trained", "direct", "via_overlap")
# measure -> (change, CI low, CI high) columns of diff.parquet
MEASURES = {
    "mean": ("delta", "delta_lo", "delta_hi"),
    "rate": ("rate_delta", "rate_delta_lo", "rate_delta_hi"),
}


def _result_dirs(root: Path, files: tuple[str, ...]) -> list[Path]:
    """Sub-directories of `root` holding all `files`, by name. Skips the staging (`.NAME.tmp-…`) and
    outgoing (`NAME.old-…`) copies that an atomic rewrite leaves for a moment."""
    if not root.is_dir():
        return []
    return [
        p
        for p in sorted(root.iterdir())
        if p.is_dir()
        and not p.name.startswith(".")
        and ".old-" not in p.name
        and all((p / f).is_file() for f in files)
    ]


def find_finetune_runs(cache_dir: str | Path) -> list[Path]:
    return _result_dirs(Path(cache_dir) / schema.FINETUNE_DIR, FINETUNE_FILES)


def find_triage_runs(cache_dir: str | Path) -> list[Path]:
    return _result_dirs(Path(cache_dir) / schema.TRIAGE_DIR, TRIAGE_FILES)


def files_stamp(path: str | Path, files: tuple[str, ...]) -> tuple[int, ...]:
    """mtime (ns) of each file: the cache key of a result directory (a rewrite replaces every file)."""
    return tuple((Path(path) / f).stat().st_mtime_ns if (Path(path) / f).is_file() else 0 for f in files)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CacheError(f"{path} must hold a JSON object")
    return data


def _read_parquet(path: Path, required: tuple[str, ...], rerun: str, **kw: Any) -> pd.DataFrame:
    try:
        names = pq.read_schema(path).names
        missing = [c for c in required if c not in names]
        if missing:
            raise CacheError(f"{path} lacks the column(s) {', '.join(missing)}; rerun `{rerun}`")
        return pq.read_table(path, **kw).to_pandas()
    except CacheError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise CacheError(f"{path} could not be read ({type(exc).__name__}: {exc}); rerun `{rerun}`") from exc


@dataclass
class FinetuneRun:
    """One `featuregeom diff` result: per harmful feature, the change of each comparison, and the summary."""

    name: str
    path: Path
    summary: dict[str, Any]
    diff: pd.DataFrame  # harmful features only (the rows with a predicted risk)

    @property
    def labels(self) -> tuple[str, str, str]:
        """(before, after, control) as named in the comparisons."""
        b, a, c = (str(x) for x in self.summary["labels"])
        return b, a, c

    def comparisons(self) -> dict[str, str | None]:
        """{'after': 'A - B', 'control': 'C - B' or None, 'direct': 'A - C' or None} as present in the data."""
        b, a, c = self.labels
        have = set(self.diff["comparison"].unique())
        want = {"after": f"{a} - {b}", "control": f"{c} - {b}", "direct": f"{a} - {c}"}
        return {k: (v if v in have else None) for k, v in want.items()}

    @property
    def prompt_sets(self) -> list[str]:
        return [s for s in ("em", "neutral") if s in set(self.diff["prompt_set"])]

    @property
    def positions(self) -> list[str]:
        return [p for p in ("prompt", "response") if p in set(self.diff["position"])]

    def harmful(self, prompt_set: str, position: str, comparison: str) -> pd.DataFrame:
        """The harmful features' rows of one comparison, by feature id."""
        d = self.diff
        sel = d[
            (d["prompt_set"] == prompt_set) & (d["position"] == position) & (d["comparison"] == comparison)
        ]
        return sel.sort_values("feature").reset_index(drop=True)

    def stats(self, prompt_set: str, position: str, comparison: str) -> dict[str, Any]:
        """summary.json's entry for one comparison ({} when absent)."""
        return dict(
            (self.summary.get("comparisons") or {}).get(f"{prompt_set}/{position}/{comparison}") or {}
        )

    def heldout_loss(self, label: str) -> float | None:
        v = (self.summary.get("heldout_loss") or {}).get(label)
        return float(v) if isinstance(v, (int, float)) and np.isfinite(v) else None


def load_finetune_summary(path: str | Path) -> dict[str, Any]:
    """summary.json of CACHE/finetune/<run>/ alone (no parquet read); CacheError without usable labels."""
    path = Path(path)
    summary = _read_json(path / schema.FINETUNE_SUMMARY)
    labels = summary.get("labels")
    if not (isinstance(labels, list) and len(labels) == 3 and all(isinstance(x, str) for x in labels)):
        raise CacheError(
            f"{path / schema.FINETUNE_SUMMARY} has no 'labels': [before, after, control]; rerun `featuregeom diff`"
        )
    return summary


def load_finetune_run(path: str | Path) -> FinetuneRun:
    """Read CACHE/finetune/<run>/ (harmful rows of diff.parquet + summary.json); CacheError when unusable."""
    path = Path(path)
    rerun = "featuregeom diff"
    summary = load_finetune_summary(path)
    labels = summary["labels"]
    diff = _read_parquet(
        path / schema.FINETUNE_DIFF, REQUIRED_DIFF_COLUMNS, rerun, filters=[("is_harmful", "=", True)]
    )
    for col, default in (
        ("harm_category", None),
        ("risk_task_feature", np.nan),
        ("risk_sum", np.nan),
        ("null_cosine", np.nan),
        ("mean_before", np.nan),
        ("mean_after", np.nan),
    ):
        if col not in diff:
            diff[col] = default
    diff["harm_category"] = diff["harm_category"].astype("string")
    b, a, _ = labels
    if f"{a} - {b}" not in set(diff["comparison"]):
        raise CacheError(
            f"{path / schema.FINETUNE_DIFF} has no '{a} - {b}' rows for harmful features; rerun `{rerun}`"
        )
    return FinetuneRun(name=path.name, path=path, summary=summary, diff=diff.reset_index(drop=True))


def read_diff_basis(path: str | Path) -> pd.DataFrame:
    """The harmful features of a diff and the task feature each one's predicted risk points at
    (`feature`, `risk_task_feature`; NaN when the diff predates that column): what it was computed with."""
    path = Path(path) / schema.FINETUNE_DIFF
    try:
        names = pq.read_schema(path).names
        cols = [c for c in ("feature", "risk_task_feature") if c in names]
        df = pq.read_table(path, columns=cols, filters=[("is_harmful", "=", True)]).to_pandas()
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise CacheError(
            f"{path} could not be read ({type(exc).__name__}: {exc}); rerun `featuregeom diff`"
        ) from exc
    if "feature" not in df:
        raise CacheError(f"{path} lacks the column feature; rerun `featuregeom diff`")
    if "risk_task_feature" not in df:
        df["risk_task_feature"] = np.nan
    return df


def ranked_task_mask(features: pd.DataFrame, task_set: Any) -> np.ndarray | None:
    """For a diff run with an exploratory `--task-set ranked:N` (summary.json `task_set`): the cache's N
    most task-leaning features now, as a mask, or None when the run used the strict set (`is_task`)."""
    if not (isinstance(task_set, dict) and task_set.get("kind") == "ranked"):
        return None
    from precompute.lab.matching import parse_task_set, ranked_task_features

    _, n = parse_task_set(str(task_set.get("spec", "")))
    mask = np.zeros(len(features), dtype=bool)
    if "task_score" in features.columns and "frequency" in features.columns:
        mask[
            ranked_task_features(
                features["task_score"].to_numpy(np.float64),
                features["frequency"].to_numpy(np.float64),
                features["is_harmful"].to_numpy(dtype=bool),
                int(n or 0),
            )
        ] = True
    return mask


def basis_problem(features: pd.DataFrame, basis: pd.DataFrame, task_set: Any = None) -> str | None:
    """Why a diff's predicted risk does not describe this cache now, or None when it may.

    A diff ranks the cache's harmful features by closeness to its task features, as they were when it
    ran; a cache rescored since may flag other features. Necessary conditions, checked here: the cache
    has task features, every task feature the diff's risk points at is one now, and every harmful
    feature of the diff is harmful now (`basis`: `read_diff_basis` or a run's harmful rows). For a run
    with an exploratory ranked task set (`task_set`, from its summary.json) the task features are the
    cache's N most task-leaning ones now (`ranked_task_mask`) instead of `is_task`."""
    n = len(features)
    ranked = ranked_task_mask(features, task_set)
    is_task = ranked if ranked is not None else features["is_task"].to_numpy(dtype=bool)
    is_harm = features["is_harmful"].to_numpy(dtype=bool)
    if ranked is not None and not is_task.any():
        return "no feature of this cache leans towards the task now, so the diff's ranked task set is gone"
    if not is_task.any():
        return (
            "this cache has no task feature now (none passes the task test), so the predicted risk the diff "
            "was computed with, closeness to task features, does not describe it"
        )

    def not_in(ids: np.ndarray, flag: np.ndarray) -> int:
        ok = (ids >= 0) & (ids < n)
        return int((~ok).sum() + (~flag[ids[ok]]).sum())

    harm = np.unique(basis["feature"].to_numpy(dtype=np.int64))
    risk = basis["risk_task_feature"].to_numpy(dtype=np.float64)
    task = np.unique(risk[np.isfinite(risk)].astype(np.int64))
    reasons = []
    if bad := not_in(task, is_task):
        what = "one of its ranked task features" if ranked is not None else "a task feature"
        reasons.append(
            f"{bad} of the {len(task)} task features its predicted risk points at "
            f"{'is' if bad == 1 else 'are'} not {what} in this cache now"
        )
    if bad := not_in(harm, is_harm):
        reasons.append(
            f"{bad} of its {len(harm)} harmful features {'is' if bad == 1 else 'are'} not harmful in this cache now"
        )
    return "; ".join(reasons) or None


def compare_runs_table(runs: list[FinetuneRun], prompt_set: str, position: str) -> pd.DataFrame:
    """Per run and 'after'/'control': the pooled harmful mean change vs before [est, lo, hi] and held-out loss.

    Only runs with the same `before` label as the first run are comparable (same baseline); the
    caller passes those."""
    rows = []
    for run in runs:
        cmp = run.comparisons()
        b, a, c = run.labels
        for kind, label in (("after", a), ("control", c)):
            name = cmp[kind]
            est = run.stats(prompt_set, position, name).get("harmful_mean_change") if name else None
            if not (isinstance(est, list) and len(est) == 3):
                continue
            rows.append(
                {
                    "run": run.name,
                    "kind": kind,
                    "label": label,
                    "comparison": name,
                    "est": float(est[0]),
                    "lo": float(est[1]),
                    "hi": float(est[2]),
                    "heldout_loss": run.heldout_loss(label),
                }
            )
    return pd.DataFrame(
        rows, columns=["run", "kind", "label", "comparison", "est", "lo", "hi", "heldout_loss"]
    )


def spearman_of(
    run: FinetuneRun, prompt_set: str, position: str, comparison: str, measure: str
) -> tuple[float, float, float] | None:
    """Spearman's rho [lo, hi] of risk (max cos) vs the change: the summary's for mean activation; for the
    firing rate (not in the summary) the same bootstrap over features, computed here."""
    if measure == "mean":
        v = run.stats(prompt_set, position, comparison).get("spearman_risk_max_cos")
        return (float(v[0]), float(v[1]), float(v[2])) if isinstance(v, list) and len(v) == 3 else None
    from precompute.stats import spearman_ci

    df = run.harmful(prompt_set, position, comparison)
    col = MEASURES[measure][0]
    ok = np.isfinite(df["risk_max_cos"].to_numpy(float)) & np.isfinite(df[col].to_numpy(float))
    if ok.sum() < 3:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        rho, lo, hi = spearman_ci(
            df["risk_max_cos"].to_numpy(float)[ok],
            df[col].to_numpy(float)[ok],
            seed=int(run.summary.get("seed") or 0),
        )
    return float(rho), float(lo), float(hi)


def triage_basis_problem(features: pd.DataFrame, null_cosine: float, meta: dict[str, Any]) -> str | None:
    """Why a triage's weights do not describe this cache now, or None: triage.json records how many harmful
    and task features (task minus harmful) it weighted and the null it used; a cache rescored since may
    count others."""
    is_harm = features["is_harmful"].to_numpy(dtype=bool)
    now = {
        "harmful features": int(is_harm.sum()),
        "task features": int((features["is_task"].to_numpy(dtype=bool) & ~is_harm).sum()),
    }
    reasons = []
    for (what, have), key in zip(now.items(), ("n_harmful", "n_task"), strict=True):
        was = meta.get(key)
        if isinstance(was, int) and not isinstance(was, bool) and was != have:
            reasons.append(f"it weighted {was:,} {what}, the cache flags {have:,} now")
    was_null = meta.get("null_cosine")
    if isinstance(was_null, (int, float)) and not isinstance(was_null, bool) and np.isfinite(null_cosine):
        if abs(float(was_null) - null_cosine) > 1e-6 * max(1.0, abs(null_cosine)):
            reasons.append(
                f"it used the chance cosine {float(was_null):.3g}, the cache's is {null_cosine:.3g} now"
            )
    return "; ".join(reasons) or None


@dataclass
class TriageRun:
    """One `featuregeom triage` result: the ranking, per-token scores of the kept samples, and its sidecar."""

    name: str
    path: Path
    ranked: pd.DataFrame  # by rank (1 = highest score)
    tokens: pd.DataFrame  # indexed by rank: tokens, trained, direct, via_overlap (lists)
    meta: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        """The lowest score among the removed samples (removal is 'score ≥ this'), or None."""
        rem = self.ranked.loc[self.ranked["removed"].astype(bool), "score"]
        return float(rem.min()) if len(rem) else None

    def sample(self, rank: int) -> dict[str, Any] | None:
        """Tokens and per-token scores of the sample at `rank` (only the top and bottom ones are kept)."""
        if rank not in self.tokens.index:
            return None
        r = self.tokens.loc[rank]
        return {
            "rank": int(rank),
            "key": str(r["key"]),
            "tokens": [str(t) for t in r["tokens"]],
            "trained": [bool(t) for t in r["trained"]],
            "direct": [float(x) for x in r["direct"]],
            "via_overlap": [float(x) for x in r["via_overlap"]],
        }


def load_triage_run(path: str | Path) -> TriageRun:
    """Read CACHE/triage/<name>/ (ranked.parquet, tokens.parquet, triage.json); CacheError when unusable."""
    path = Path(path)
    rerun = "featuregeom triage"
    meta = _read_json(path / schema.TRIAGE_META)
    ranked = _read_parquet(path / schema.TRIAGE_RANKED, REQUIRED_RANKED_COLUMNS, rerun)
    tokens = _read_parquet(path / schema.TRIAGE_TOKENS, REQUIRED_TOKEN_COLUMNS, rerun)
    for col, default in (
        ("index", -1),
        ("n_tokens", 0),
        ("score_sum", np.nan),
        ("preview", ""),
        ("random_removed", False),
    ):
        if col not in ranked:
            ranked[col] = default
    if "top_features" not in ranked:
        ranked["top_features"] = [[] for _ in range(len(ranked))]
    ranked["top_features"] = [[int(x) for x in (v if v is not None else [])] for v in ranked["top_features"]]
    ranked["removed"] = ranked["removed"].fillna(False).astype(bool)
    ranked["random_removed"] = ranked["random_removed"].fillna(False).astype(bool)
    ranked = ranked.sort_values("rank", kind="stable").reset_index(drop=True)
    tokens = (
        tokens.astype({"rank": "int64"}).drop_duplicates("rank").set_index("rank", drop=False).sort_index()
    )
    return TriageRun(name=path.name, path=path, ranked=ranked, tokens=tokens, meta=meta)
