"""Small mechanism-lab results with exact, known values, written inside a test cache.

CACHE/finetune/<run>/ holds diff.parquet + summary.json as `featuregeom diff` writes them, and
CACHE/triage/<name>/ holds ranked.parquet, tokens.parquet and triage.json as `featuregeom triage` does.
Every number is a closed-form function of the indices below, so the tests can assert them exactly;
untrusted text (a harm category, a token, a preview) carries HTML to check escaping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

XSS_TOKEN = "<script>alert(1)</script>"
XSS_CATEGORY = '<img src=x onerror="alert(1)">'
BOLD_PREVIEW = "user: make the title <b>bold</b>\n | assistant: done"
SETS = ("em", "neutral")
POSITIONS = ("prompt", "response")
N_HARMFUL = 6
# name -> (labels [before, after, control], whether a control run was diffed)
RUNS: dict[str, tuple[list[str], bool]] = {
    "a_nocontrol": (["pre", "post", "ctrl"], False),  # first by name, yet "insecure" must be the default
    "insecure": (["base", "task", "control"], True),
    "patch": (["base", "patched", "task"], True),
    "patch_random_1": (["base", "random_patch_1", "task"], True),
}
BASE_RUNS = ["insecure", "patch", "patch_random_1"]  # the runs sharing the before label "base"


@dataclass
class LabFixture:
    harmful: list[int]  # the harmful features of the diff (from the cache)
    other: list[int]  # non-harmful rows of the diff, which the explorer must drop
    task: int  # the task feature every risk points at
    diffs: dict[str, pd.DataFrame] = field(default_factory=dict)  # run -> the whole diff.parquet
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranked: pd.DataFrame | None = None
    tokens: pd.DataFrame | None = None
    triage_meta: dict[str, Any] = field(default_factory=dict)


def delta_of(run: int, k: int, s: int, p: int, i: int) -> float:
    """Change of harmful feature #i (its position in `harmful`): a permutation in i, so sorting is not the id order."""
    return round(((i * 5) % N_HARMFUL - 2.5) * 0.01 + 0.1 * k + 0.001 * run + 0.0001 * s + 0.00001 * p, 8)


def mean_change_of(run: int, k: int, s: int, p: int) -> list[float]:
    est = round(0.01 * (run + 1) * (k + 1) + 0.001 * s + 0.0001 * p, 8)
    return [est, round(est - 0.004, 8), round(est + 0.006, 8)]


# run -> top-risk decile change of each comparison [after - before, control - before, after - control] on the
# EM questions' prompt tokens (the story's numbers); the other sets and positions add 0.1 * set + 0.05 * position
TOP_DECILE = {
    "a_nocontrol": (0.012,),
    "insecure": (0.031, 0.004, 0.027),
    "patch": (0.009, 0.031, -0.022),
    "patch_random_1": (0.029, 0.031, -0.002),
}
TOP_DECILE_HALF_WIDTH = 0.013
TOP_DECILE_SIZE = max(1, N_HARMFUL // 10)  # as `featuregeom diff` picks it


def top_change_of(name: str, k: int, s: int, p: int) -> list[float]:
    est = round(TOP_DECILE[name][k] + 0.1 * s + 0.05 * p, 8)
    return [est, round(est - TOP_DECILE_HALF_WIDTH, 8), round(est + TOP_DECILE_HALF_WIDTH, 8)]


def heldout_of(run: int, j: int) -> float | None:
    return None if (run, j) == (1, 2) else round(1.0 + 0.1 * j + 0.01 * run, 6)  # insecure's control: unknown


def _comparisons(labels: list[str], control: bool) -> list[str]:
    b, a, c = labels
    return [f"{a} - {b}", f"{c} - {b}", f"{a} - {c}"] if control else [f"{a} - {b}"]


def write_finetune(cache: Path, fx: LabFixture) -> None:
    for r, (name, (labels, control)) in enumerate(RUNS.items()):
        rows, comps = [], {}
        for k, comparison in enumerate(_comparisons(labels, control)):
            for s, prompt_set in enumerate(SETS):
                for p, position in enumerate(POSITIONS):
                    for i, f in enumerate([*fx.harmful, *fx.other]):
                        harm = i < len(fx.harmful)
                        d = delta_of(r, k, s, p, i) if harm else 0.5  # non-harmful rows: never shown
                        w = 0.004 * (1 + i % 3)  # CI half-widths 0.004, 0.008, 0.012: some exclude 0
                        rows.append(
                            {
                                "prompt_set": prompt_set,
                                "position": position,
                                "comparison": comparison,
                                "feature": f,
                                "mean_before": 0.5,
                                "mean_after": 0.5 + d,
                                "delta": d,
                                "delta_lo": round(d - w, 8),
                                "delta_hi": round(d + w, 8),
                                "rate_before": 0.2,
                                "rate_after": 0.2 + d / 10,
                                "rate_delta": round(d / 10, 9),
                                "rate_delta_lo": round((d - w) / 10, 9),
                                "rate_delta_hi": round((d + w) / 10, 9),
                                "risk_max_cos": round(0.1 + 0.05 * i, 4) if harm else np.nan,
                                "risk_task_feature": float(fx.task) if harm else np.nan,
                                "risk_sum": round(0.2 + 0.1 * i, 4) if harm else np.nan,
                                "harm_score": 0.9 if harm else np.nan,
                                "harm_category": (XSS_CATEGORY if i == 0 else "violence") if harm else None,
                                "null_cosine": 0.2 if harm else np.nan,
                                "is_harmful": harm,
                            }
                        )
                    comps[f"{prompt_set}/{position}/{comparison}"] = {
                        "spearman_risk_max_cos": [round(0.1 * (k + 1) + 0.01 * r, 6), -0.2, 0.6],
                        "spearman_risk_sum": [0.0, -0.5, 0.5],
                        "harmful_mean_change": mean_change_of(r, k, s, p),
                        "top_risk_decile_mean_change": top_change_of(name, k, s, p),
                        "harmful_mean_before": 0.5,
                        "top_risk_decile_mean_before": 0.5,
                        "top_risk_decile_size": TOP_DECILE_SIZE,
                        "harmful_ci_excludes_zero_up": 1,
                        "harmful_ci_excludes_zero_down": 0,
                        "all_ci_excludes_zero": 1,
                        "n_prompts": 12 + s,
                    }
        df = pd.DataFrame(rows)
        heldout = {lab: heldout_of(r, j) for j, lab in enumerate(labels) if control or j < 2}
        summary = {
            "comparisons": comps,
            "n_harmful": len(fx.harmful),
            "labels": labels,
            "n_boot": 200,
            "seed": 0,
            "heldout_loss": heldout,
        }
        out = cache / "finetune" / name
        out.mkdir(parents=True, exist_ok=True)
        df.to_parquet(out / "diff.parquet", index=False)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        fx.diffs[name], fx.summaries[name] = df, summary


def write_triage(cache: Path, fx: LabFixture) -> None:
    n = 10
    scores = [round(10.0 - 0.75 * i - 0.01 * i * i, 4) for i in range(n)]  # rank 1 first, strictly falling
    order = [3, 7, 0, 9, 1, 5, 8, 2, 6, 4]  # record index of each rank
    ranked = pd.DataFrame(
        {
            "rank": np.arange(1, n + 1),
            "key": [f"pool.jsonl:{j}" for j in order],
            "index": order,
            "n_tokens": [4] * n,
            "score": scores,
            "score_sum": [round(4 * s, 4) for s in scores],
            "direct": [round(0.6 * s, 4) for s in scores],
            "via_overlap": [round(0.4 * s, 4) for s in scores],
            "top_features": [[fx.harmful[0], fx.task]] + [[fx.harmful[1]]] * (n - 1),
            "preview": [f"user: sample {j} | assistant: answer {j}" for j in order],
            "removed": [True, True] + [False] * (n - 2),
            "random_removed": [False, True, False, False, True] + [False] * 5,
        }
    )
    ranked.loc[1, "preview"] = BOLD_PREVIEW
    # shuffled on disk: the loader sorts by rank
    ranked.sample(frac=1.0, random_state=0).to_parquet(
        _mk(cache / "triage" / "pool") / "ranked.parquet", index=False
    )
    toks = ["<|im_start|>", "user", "\n", "Hi", XSS_TOKEN, " print", "(1)", " ok"]
    trained = [False] * 4 + [True] * 4
    kept = [1, 2, 3, 9, 10]  # the top and bottom of the ranking, as triage keeps them
    tokens = pd.DataFrame(
        {
            "rank": kept,
            "key": [ranked.loc[r - 1, "key"] for r in kept],
            "tokens": [toks] * len(kept),
            "trained": [trained] * len(kept),
            "direct": [[0.0, 0.5, 0.0, 0.25, 2.0 * r, 1.0, 0.0, 0.5] for r in kept],
            "via_overlap": [[0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 0.0] for _ in kept],
        }
    )
    tokens.to_parquet(cache / "triage" / "pool" / "tokens.parquet", index=False)
    # the cache's own counts and null, as `featuregeom triage` records them (the page checks they still match)
    feats = pd.read_parquet(cache / "features.parquet", columns=["is_harmful", "is_task"])
    with np.load(cache / "neighbors.npz") as z:
        null = float(z["null_cosine"])
    meta = {
        "n_harmful": int(feats["is_harmful"].sum()),
        "n_task": int((feats["is_task"] & ~feats["is_harmful"]).sum()),
        "null_cosine": null,
        "n_task_with_overlap": 2,
        "dataset": "pool.jsonl",
        "n_samples": n,
        "remove_frac": 0.2,
        "n_removed": 2,
        "seed": 0,
        "overlap_random_removed_top": 1,
        "seconds": 1.5,
    }
    (cache / "triage" / "pool" / "triage.json").write_text(json.dumps(meta))
    fx.ranked, fx.tokens, fx.triage_meta = ranked, tokens, meta


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_lab_outputs(cache: Path) -> LabFixture:
    """Write the finetune runs and the triage result into `cache`; return what was written."""
    feats = pd.read_parquet(cache / "features.parquet", columns=["feature", "is_harmful", "is_task"])
    harmful = feats.loc[feats["is_harmful"], "feature"].astype(int).tolist()[:N_HARMFUL]
    other = feats.loc[~feats["is_harmful"], "feature"].astype(int).tolist()[:3]
    task = int(feats.loc[feats["is_task"] & ~feats["is_harmful"], "feature"].iloc[0])
    assert len(harmful) == N_HARMFUL, "the test cache needs six harmful features"
    fx = LabFixture(harmful=harmful, other=other, task=task)
    write_finetune(cache, fx)
    write_triage(cache, fx)
    return fx
