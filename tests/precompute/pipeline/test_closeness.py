"""Tests for the closeness step: the blockwise cosines against brute force, a planted closeness
difference found (and a reversed one, and none), a difference produced by firing frequency alone not
credited to the sets, the flagged-pairs permutation calibrated and sensitive, `not_testable` for
empty or small sets, and the step run from the command line on a cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute import schema
from precompute.cache import stage, verify_cache
from precompute.cli import main as cli_main
from precompute.pipeline import closeness as C
from precompute.pipeline.closeness import ClosenessParams, closeness_report, closeness_to, neighbour_counts
from precompute.pipeline.features import merge_feature_columns

PARAMS = ClosenessParams(n_permutations=2000, n_bootstrap=2000, frequency_bins=10, alpha=0.05, seed=0)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def at_cosine(rng: np.random.Generator, targets: np.ndarray, cos: np.ndarray) -> np.ndarray:
    """Unit vectors at exactly cosine `cos` to each row of `targets` (unit rows)."""
    u = rng.standard_normal(targets.shape)
    u = unit(u - (u * targets).sum(1, keepdims=True) * targets)
    return cos[:, None] * targets + np.sqrt(1 - cos[:, None] ** 2) * u


def dictionary(
    seed: int, cos_inducing: float | None, cos_non: float | None, d: int = 256, n: tuple = (20, 60, 60, 300)
) -> tuple[np.ndarray, pd.DataFrame]:
    """Unit decoder rows: harmful, inducing (is_task), non-inducing (is_control), the rest isotropic.
    An inducing / non-inducing feature sits at the given cosine to one random harmful direction (None:
    isotropic like the rest). Frequencies are log-uniform and independent of everything; task_score is
    high (0.7-0.9) for the inducing set, low (0.1-0.3) for the non-inducing one, 0.35-0.65 elsewhere."""
    rng = np.random.default_rng(seed)
    n_h, n_a, n_b, n_r = n
    harm = unit(rng.standard_normal((n_h, d)))

    def block(k: int, cos: float | None) -> np.ndarray:
        if cos is None:
            return unit(rng.standard_normal((k, d)))
        return at_cosine(rng, harm[rng.integers(0, n_h, k)], np.clip(rng.normal(cos, 0.03, k), -0.99, 0.99))

    w = np.concatenate(
        [harm, block(n_a, cos_inducing), block(n_b, cos_non), unit(rng.standard_normal((n_r, d)))]
    )
    total = w.shape[0]
    kind = np.repeat(np.array(["harm", "a", "b", "rest"]), n)
    feats = pd.DataFrame(
        {
            "feature": np.arange(total, dtype=np.int64),
            "frequency": np.exp(rng.uniform(np.log(1e-4), np.log(0.1), total)),
            "is_harmful": kind == "harm",
            "is_task": kind == "a",
            "is_control": kind == "b",
        }
    )
    lo, hi = (
        np.select([kind == "a", kind == "b"], [0.7, 0.1], 0.35),
        np.select([kind == "a", kind == "b"], [0.9, 0.3], 0.65),
    )
    feats["task_score"] = rng.uniform(lo, hi)
    return w.astype(np.float32), feats


# ------------------------------------------------------------------------------ the cosines
def test_closeness_and_neighbour_counts_match_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "_BLOCK_BYTES", 4 * 7 * 3)  # blocks of a few rows
    rng = np.random.default_rng(0)
    w = unit(rng.standard_normal((40, 8))).astype(np.float32)
    cos = w.astype(np.float64) @ w.T.astype(np.float64)
    targets = np.array([1, 5, 9, 30])
    rows = np.array([0, 1, 5, 7, 39, 9])
    got = closeness_to(w, rows, targets)
    for i, r in enumerate(rows):
        others = [t for t in targets if t != r]
        assert got[i] == pytest.approx(cos[r, others].max(), abs=1e-6)
    assert np.isnan(closeness_to(w, np.array([5]), np.array([5]))[0])  # only itself: no closeness
    counts = neighbour_counts(w, targets, 0.2)
    brute = [(cos[j, [t for t in targets if t != j]] > 0.2).sum() for j in range(40)]
    np.testing.assert_array_equal(counts, brute)
    assert (neighbour_counts(w, np.array([], np.int64), 0.2) == 0).all()


# ------------------------------------------------------------------------------ the comparison
def test_a_planted_difference_is_found() -> None:
    w, feats = dictionary(0, cos_inducing=0.4, cos_non=0.05)
    rep = closeness_report(w, feats, 0.2, PARAMS)
    cos = w.astype(np.float64) @ w[:20].T.astype(np.float64)
    close = cos.max(axis=1)
    a, b = close[20:80], close[80:140]
    assert rep["n_inducing"] == rep["inducing"]["n"] == 60 and rep["n_non_inducing"] == 60
    assert rep["difference"] == pytest.approx(a.mean() - b.mean(), abs=1e-6)
    assert rep["inducing"]["median"] == pytest.approx(np.median(a), abs=1e-6)
    assert rep["non_inducing"]["quantiles"]["0.95"] == pytest.approx(np.quantile(b, 0.95), abs=1e-6)
    assert rep["difference"] > 0.2 and rep["ci"][0] > 0
    assert rep["p_permutation"] < 0.01 and rep["p_permutation"] == pytest.approx(1 / 2001)
    assert rep["verdict"] == "inducing_closer"
    assert sum(rep["histogram"]["inducing"]) == 60 and sum(rep["histogram"]["non_inducing"]) == 60
    json.dumps(rep, allow_nan=False)  # plain JSON, no NaN
    schema.check_json(schema.CLOSENESS, rep)


def test_a_reversed_difference_says_non_inducing_closer() -> None:
    w, feats = dictionary(1, cos_inducing=0.05, cos_non=0.4)
    rep = closeness_report(w, feats, 0.2, PARAMS)
    assert rep["ci"][1] < 0 and rep["p_non_inducing_closer"] < 0.01 and rep["p_permutation"] > 0.99
    assert rep["verdict"] == "non_inducing_closer"


def test_no_planted_difference_is_not_significant() -> None:
    w, feats = dictionary(2, cos_inducing=None, cos_non=None)
    rep = closeness_report(w, feats, 0.2, PARAMS)
    assert rep["ci"][0] <= 0 <= rep["ci"][1]
    assert rep["p_permutation"] > 0.05 and rep["p_two_sided"] > 0.05
    assert rep["verdict"] == "no_difference" and "covers 0" in rep["reason"]


def test_a_difference_made_by_frequency_alone_is_not_credited_to_the_sets() -> None:
    """Closeness rises with firing frequency and the inducing set fires more often: the raw difference
    is real (its interval excludes 0), but shuffling within frequency bins gives as much."""
    rng = np.random.default_rng(3)
    d, n_h, m = 256, 20, 400
    harm = unit(rng.standard_normal((n_h, d)))
    level = rng.integers(0, 10, m)  # ten frequency levels
    cos = 0.1 + 0.04 * level + rng.normal(0, 0.01, m)
    pooled = at_cosine(rng, harm[rng.integers(0, n_h, m)], cos)
    in_a = rng.random(m) < 0.1 + 0.08 * level  # high-frequency features are more often inducing
    w = np.concatenate([harm, pooled]).astype(np.float32)
    feats = pd.DataFrame(
        {
            "feature": np.arange(n_h + m, dtype=np.int64),
            "frequency": np.concatenate([np.full(n_h, 0.01), 1e-3 * (1 + level)]),
            "is_harmful": np.arange(n_h + m) < n_h,
            "is_task": np.concatenate([np.zeros(n_h, bool), in_a]),
            "is_control": np.concatenate([np.zeros(n_h, bool), ~in_a]),
        }
    )
    rep = closeness_report(w, feats, 0.2, PARAMS)
    assert rep["ci"][0] > 0.05  # the sets differ, by frequency
    assert rep["null_difference_mean"] == pytest.approx(rep["difference"], abs=0.02)
    assert rep["p_permutation"] > 0.05
    assert rep["verdict"] == "no_difference" and "frequency-matched shuffles" in rep["reason"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda f: f.assign(is_control=False), "the non-inducing set has 0 feature(s)"),
        (lambda f: f.drop(columns="is_control"), "no column is_control"),
        (lambda f: f.assign(is_harmful=False), "no feature is flagged harmful"),
        (lambda f: f.assign(is_task=f["feature"].between(20, 23)), "the inducing set has 4 feature(s)"),
    ],
)
def test_empty_or_small_sets_are_not_testable(change, reason: str) -> None:
    w, feats = dictionary(4, cos_inducing=0.4, cos_non=0.05)
    rep = closeness_report(w, change(feats), 0.2, PARAMS)
    assert rep["verdict"] == "not_testable" and reason in rep["reason"]
    assert rep["difference"] is None and rep["p_permutation"] is None and rep["histogram"] is None
    schema.check_json(schema.CLOSENESS, json.loads(json.dumps(rep, allow_nan=False)))


def test_features_in_both_sets_and_harmful_features_are_left_out() -> None:
    w, feats = dictionary(5, cos_inducing=0.4, cos_non=0.05)
    feats.loc[20:24, "is_control"] = True  # five features in both sets
    feats.loc[0:2, "is_task"] = True  # three harmful features also task features
    rep = closeness_report(w, feats, 0.2, PARAMS)
    assert rep["n_excluded_both"] == 5 and rep["n_inducing"] == 55 and rep["n_non_inducing"] == 60
    assert rep["flagged_pairs"]["n_task"] == 63  # the pair count keeps every is_task feature


# ------------------------------------------------------------------------------ flagged pairs
def test_flagged_pairs_count_matches_brute_force_and_is_calibrated() -> None:
    """Harm labels with no geometric structure: the observed count is exact, and across many random
    label sets p < 0.05 about as often as it should (not always small, never all)."""
    rng = np.random.default_rng(6)
    w = unit(rng.standard_normal((500, 32))).astype(np.float32)
    cos = w.astype(np.float64) @ w.T.astype(np.float64)
    freq = np.exp(rng.uniform(np.log(1e-4), np.log(0.1), 500))
    task = rng.random(500) < 0.1
    counts = neighbour_counts(w, np.flatnonzero(task), 0.3)
    params = ClosenessParams(n_permutations=1000, seed=0)
    ps = []
    for trial in range(40):
        harmful = np.random.default_rng(100 + trial).random(500) < 0.1
        fp = C.flagged_pairs_test(counts, harmful, int(task.sum()), freq, 0.3, params)
        if trial == 0:
            t, h = np.flatnonzero(task), np.flatnonzero(harmful)
            brute = sum(1 for i in t for j in h if i != j and cos[i, j] > 0.3)
            assert fp["observed"] == brute and fp["testable"]
            assert fp["p"] > 0.05
        ps.append(fp["p"])
    assert np.mean(np.array(ps) < 0.05) <= 0.15
    assert 0.3 < np.mean(ps) < 0.7


def test_flagged_pairs_with_planted_structure_are_beyond_chance() -> None:
    w, feats = dictionary(7, cos_inducing=0.4, cos_non=0.05)
    rep = closeness_report(w, feats, 0.3, PARAMS)
    fp = rep["flagged_pairs"]
    assert fp["observed"] >= 60 > fp["null_q95"]  # every inducing feature has its harmful partner
    assert fp["p"] < 0.01 and fp["p_fewer"] > 0.99
    none = closeness_report(w, feats.assign(is_task=False), 0.3, PARAMS)["flagged_pairs"]
    assert not none["testable"] and none["reason"] == "no task feature" and none["p"] is None


def test_harm_labels_never_move_onto_features_that_never_fire() -> None:
    strata = C.harm_label_strata(np.array([0.0, 0.0, 0.1, 0.2, 0.3, 0.4, np.nan]), 2)
    np.testing.assert_array_equal(strata, [-1, -1, 0, 0, 1, 1, -1])


# ------------------------------------------------------------------------------ the step
def test_the_step_runs_on_a_cache_from_the_command_line(tiny_sae_dir: Path, tmp_path: Path) -> None:
    from precompute.sae.registry import load_sae

    out = tmp_path / "cache"
    args = ["--sae", str(tiny_sae_dir), "--out", str(out), "--neighbors", "8", "--umap-neighbors", "5"]
    assert cli_main(["geometry", *args, "--no-progress"]) == 0
    rng = np.random.default_rng(8)
    n = 64
    feats = pd.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int64),
            "frequency": rng.uniform(0.001, 0.1, n),
            "is_harmful": np.arange(n) < 8,
            "is_task": (np.arange(n) >= 8) & (np.arange(n) < 30),
            "is_control": np.arange(n) >= 40,
            "task_score": rng.uniform(0.2, 0.8, n),
        }
    )
    with stage(out) as staged:  # the scores step's columns, as a later scores step would write them
        merge_feature_columns(staged, n, feats)
        staged.commit()
    flags = ["--closeness-permutations", "1000", "--closeness-ranked", "10", "--no-progress"]
    assert cli_main(["closeness", "--out", str(out), *flags]) == 0
    manifest = verify_cache(out)
    assert manifest["steps"] == ["geometry", "closeness"]
    report = json.loads((out / schema.CLOSENESS).read_text())
    schema.check_json(schema.CLOSENESS, report)
    with np.load(out / schema.NEIGHBORS) as z:
        null = float(z["null_cosine"])
    w = load_sae(str(tiny_sae_dir)).unit_directions()
    expect = closeness_report(w, feats, null, ClosenessParams(n_permutations=1000, ranked_n=10))
    assert report == json.loads(json.dumps(expect))
    assert report["ranked"]["n_requested"] == 10 and report["ranked"]["n"] == 10
    sidecar = json.loads((out / schema.params_file("closeness")).read_text())
    assert sidecar["params"]["n_permutations"] == 1000 and sidecar["params"]["null_cosine"] == null
    assert sidecar["params"]["n_bootstrap"] == 2000 and sidecar["verdict"] == report["verdict"]
    assert sidecar["params"]["ranked_n"] == 10 and sidecar["ranked_verdict"] == report["ranked"]["verdict"]


def test_bootstrap_below_2000_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["closeness", "--out", str(tmp_path), "--closeness-bootstrap", "500"]) == 2
    assert "closeness-bootstrap" in capsys.readouterr().err
