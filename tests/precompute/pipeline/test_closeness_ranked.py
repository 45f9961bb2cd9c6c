"""Tests for the closeness step's exploratory ranked comparison (closeness.json `ranked`): a closeness
that rises with task_score is found (and a falling one, and none), a difference made by firing
frequency alone is not credited, ineligible features are never selected, a too-large N shrinks (and is
recorded) or makes the comparison not testable, and the sensitivity rows match runs at each N."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute import schema
from precompute.cli import main as cli_main
from precompute.pipeline.closeness import ClosenessParams, closeness_report
from precompute.pipeline.closeness_ranked import SELECTION, SENSITIVITY_N, eligible, rank_sets
from tests.precompute.pipeline.test_closeness import at_cosine, unit

PARAMS = ClosenessParams(n_permutations=2000, n_bootstrap=2000, frequency_bins=10, alpha=0.05, seed=0)
N_H = 20


def ranked_world(seed: int, slope: float, m: int = 600, d: int = 256) -> tuple[np.ndarray, pd.DataFrame]:
    """N_H harmful directions, then m features each at a cosine drawn from U(0.05, 0.45) to one harmful
    direction; task_score = 0.5 + slope * (that cosine - 0.25) + noise, so it leans with closeness when
    slope > 0. No feature is is_task / is_control (the strict comparison has nothing to test).
    Frequencies are log-uniform and independent of everything."""
    rng = np.random.default_rng(seed)
    harm = unit(rng.standard_normal((N_H, d)))
    cos = rng.uniform(0.05, 0.45, m)
    w = np.concatenate([harm, at_cosine(rng, harm[rng.integers(0, N_H, m)], cos)]).astype(np.float32)
    score = np.clip(0.5 + slope * (cos - 0.25) + rng.normal(0, 0.05, m), 0.01, 0.99)
    total = N_H + m
    feats = pd.DataFrame(
        {
            "feature": np.arange(total, dtype=np.int64),
            "frequency": np.exp(rng.uniform(np.log(1e-4), np.log(0.1), total)),
            "is_harmful": np.arange(total) < N_H,
            "is_task": False,
            "is_control": False,
            "task_score": np.concatenate([rng.uniform(0.3, 0.7, N_H), score]),
        }
    )
    return w, feats


def brute_closeness(w: np.ndarray, harmful: np.ndarray) -> np.ndarray:
    cos = w.astype(np.float64) @ w[harmful].T.astype(np.float64)
    cos[np.flatnonzero(harmful), np.arange(harmful.sum())] = -np.inf  # itself excluded
    return cos.max(axis=1)


def brute_sets(feats: pd.DataFrame, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The top and bottom n by a plain sort of the eligible features (score, then id); n shrinks to the
    smaller side's count."""
    ok = feats[
        ~feats["is_harmful"]
        & (feats["frequency"] > 0)
        & np.isfinite(feats["task_score"])
        & (feats["task_score"] != 0.5)
    ]
    up = ok[ok["task_score"] > 0.5].sort_values(["task_score", "feature"], ascending=[False, True])
    down = ok[ok["task_score"] < 0.5].sort_values(["task_score", "feature"])
    n = min(n, len(up), len(down))
    return up["feature"].to_numpy()[:n], down["feature"].to_numpy()[:n]


# ------------------------------------------------------------------------------ the comparison
def test_closeness_rising_with_task_score_is_found_by_rank() -> None:
    w, feats = ranked_world(0, slope=0.8)
    rep = closeness_report(w, feats, 0.2, PARAMS)
    assert rep["verdict"] == "not_testable"  # no strict set, yet the ranked comparison can be made
    r = rep["ranked"]
    top, bottom = brute_sets(feats, 100)
    close = brute_closeness(w, feats["is_harmful"].to_numpy())
    assert r["n"] == r["n_inducing"] == r["n_non_inducing"] == 100 and r["n_requested"] == 100
    assert r["difference"] == pytest.approx(close[top].mean() - close[bottom].mean(), abs=1e-6)
    assert r["inducing"]["median"] == pytest.approx(np.median(close[top]), abs=1e-6)
    assert r["task_score_range"]["inducing"] == pytest.approx(
        [feats["task_score"][top].min(), feats["task_score"][top].max()]
    )
    assert r["ci"][0] > 0 and r["p_permutation"] < 0.01 and r["p_two_sided"] < 0.01
    assert r["verdict"] == "inducing_closer" and r["selection"] == SELECTION and r["reduction"] == ""
    schema.check_json(schema.CLOSENESS, json.loads(json.dumps(rep, allow_nan=False)))


def test_closeness_falling_with_task_score_says_non_inducing_closer() -> None:
    r = closeness_report(*ranked_world(1, slope=-0.8), 0.2, PARAMS)["ranked"]
    assert r["ci"][1] < 0 and r["p_non_inducing_closer"] < 0.01 and r["p_permutation"] > 0.99
    assert r["verdict"] == "non_inducing_closer"


def test_task_score_unrelated_to_closeness_gives_an_interval_covering_zero() -> None:
    """Nothing planted: the interval covers 0 and the verdict says no difference; over 40 such worlds
    the two-sided p falls below 0.05 about as often as it should, and the interval covers 0 about 95%
    of the time."""
    r = closeness_report(*ranked_world(100, slope=0.0), 0.2, PARAMS)["ranked"]
    assert r["ci"][0] <= 0 <= r["ci"][1] and r["p_two_sided"] > 0.05
    assert r["verdict"] == "no_difference" and "covers 0" in r["reason"]
    params = replace(PARAMS, n_permutations=1000)
    runs = [closeness_report(*ranked_world(100 + s, slope=0.0), 0.2, params)["ranked"] for s in range(40)]
    p = np.array([x["p_two_sided"] for x in runs])
    assert np.mean(p < 0.05) <= 0.15 and 0.3 < p.mean() < 0.7
    assert np.mean([x["ci"][0] <= 0 <= x["ci"][1] for x in runs]) >= 0.85


def test_a_ranked_difference_made_by_frequency_alone_is_not_credited() -> None:
    """Closeness and task_score both rise with firing frequency: the top set is closer (its interval
    excludes 0), but shuffling within frequency bins gives as much."""
    rng = np.random.default_rng(3)
    m, level = 400, np.random.default_rng(4).integers(0, 10, 400)
    harm = unit(rng.standard_normal((N_H, 256)))
    pooled = at_cosine(rng, harm[rng.integers(0, N_H, m)], 0.1 + 0.03 * level + rng.normal(0, 0.01, m))
    feats = pd.DataFrame(
        {
            "feature": np.arange(N_H + m, dtype=np.int64),
            "frequency": np.concatenate([np.full(N_H, 0.01), 1e-3 * (1 + level)]),
            "is_harmful": np.arange(N_H + m) < N_H,
            "is_task": False,
            "is_control": False,
            "task_score": np.concatenate([np.full(N_H, 0.6), 0.3 + 0.04 * level + rng.normal(0, 0.05, m)]),
        }
    )
    r = closeness_report(np.concatenate([harm, pooled]).astype(np.float32), feats, 0.2, PARAMS)["ranked"]
    assert r["ci"][0] > 0.05
    assert r["p_permutation"] > 0.05 and r["verdict"] == "no_difference"
    assert "frequency-matched shuffles" in r["reason"]


# ------------------------------------------------------------------------------ the selection
def test_ineligible_features_are_never_selected_whatever_their_score() -> None:
    w, feats = ranked_world(5, slope=0.8)
    feats = feats.copy()
    extreme = np.tile([0.999, 0.001], N_H // 2)
    feats.loc[: N_H - 1, "task_score"] = extreme  # harmful: the most extreme scores of all
    silent = np.arange(N_H, N_H + 10)
    feats.loc[silent, "frequency"] = 0.0  # never fires
    feats.loc[silent, "task_score"] = extreme[:10]
    feats.loc[N_H + 10 : N_H + 19, "task_score"] = np.nan
    feats.loc[N_H + 20 : N_H + 29, "task_score"] = 0.5  # fires in no scored window
    bad = np.arange(N_H + 30)
    ok = eligible(feats["task_score"], feats["frequency"], feats["is_harmful"])
    assert not ok[bad].any() and ok[N_H + 30 :].all()
    for n in (100, 10_000):  # also when N asks for every eligible feature
        cut = rank_sets(feats["task_score"], feats["frequency"], feats["is_harmful"], n)
        assert not (cut.top | cut.bottom)[bad].any()
        top, bottom = brute_sets(feats, n)
        np.testing.assert_array_equal(np.flatnonzero(cut.top), np.sort(top))
        np.testing.assert_array_equal(np.flatnonzero(cut.bottom), np.sort(bottom))
        assert (feats["task_score"][cut.top] > 0.5).all() and (feats["task_score"][cut.bottom] < 0.5).all()
    r = closeness_report(w, feats, 0.2, PARAMS)["ranked"]
    assert r["n_eligible"] == len(feats) - bad.size and r["n"] == 100


def test_ties_at_the_cut_go_to_the_lower_feature_id() -> None:
    score = np.array([0.9, 0.7, 0.7, 0.7, 0.2, 0.1, 0.1, 0.4])
    cut = rank_sets(score, np.ones(8), np.zeros(8, bool), 2)
    assert np.flatnonzero(cut.top).tolist() == [0, 1] and np.flatnonzero(cut.bottom).tolist() == [5, 6]


def test_n_larger_than_available_is_reduced_and_recorded() -> None:
    w, feats = ranked_world(6, slope=0.8)
    up, down = int((feats["task_score"][N_H:] > 0.5).sum()), int((feats["task_score"][N_H:] < 0.5).sum())
    r = closeness_report(w, feats, 0.2, replace(PARAMS, ranked_n=1000))["ranked"]
    n = min(up, down)
    assert r["n"] == r["n_inducing"] == r["n_non_inducing"] == n and r["n_requested"] == 1000
    assert (r["n_task_leaning"], r["n_control_leaning"]) == (up, down)
    assert r["reduction"].startswith(f"N reduced from 1000 to {n}") and r["verdict"] == "inducing_closer"
    # only four control-leaning features: not testable, and the reason says why
    few = feats.assign(task_score=np.where(feats["feature"] < N_H + 4, 0.2, 0.5 + feats["feature"] / 1e4))
    r = closeness_report(w, few, 0.2, PARAMS)["ranked"]
    assert r["n"] == 4 and r["verdict"] == "not_testable" and r["difference"] is None
    assert "N reduced from 100 to 4" in r["reason"] and "at least 5" in r["reason"]


def test_sensitivity_rows_match_runs_at_each_n() -> None:
    w, feats = ranked_world(7, slope=0.8, m=300)  # about 150 per side: N = 200 is reduced
    rep = closeness_report(w, feats, 0.2, PARAMS)
    assert [row["n_requested"] for row in rep["ranked_sensitivity"]] == list(SENSITIVITY_N)
    for row in rep["ranked_sensitivity"]:
        alone = closeness_report(w, feats, 0.2, replace(PARAMS, ranked_n=row["n_requested"]))["ranked"]
        for key in ("n", "difference", "ci", "p_permutation", "p_two_sided", "verdict"):
            assert row[key] == alone[key], key
    assert rep["ranked_sensitivity"][2]["n"] < 200


def test_without_task_score_or_harmful_features_the_ranked_comparison_is_not_testable() -> None:
    w, feats = ranked_world(8, slope=0.8)
    for change, reason in (
        (lambda f: f.drop(columns="task_score"), "no column task_score"),
        (lambda f: f.assign(is_harmful=False), "no feature is flagged harmful"),
    ):
        rep = closeness_report(w, change(feats), 0.2, PARAMS)
        assert rep["ranked"]["verdict"] == "not_testable" and reason in rep["ranked"]["reason"]
        assert all(row["verdict"] == "not_testable" for row in rep["ranked_sensitivity"])
        schema.check_json(schema.CLOSENESS, json.loads(json.dumps(rep, allow_nan=False)))


# ------------------------------------------------------------------------------ the option
def test_ranked_n_below_5_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["closeness", "--out", str(tmp_path), "--closeness-ranked", "4"]) == 2
    assert "closeness-ranked" in capsys.readouterr().err
