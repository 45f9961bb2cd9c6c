"""The stability step: Hungarian matching equals brute force, and planted pairs reappear or vanish as
built (the step on a real tiny cache: tests/precompute/pipeline/test_run.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from precompute.pipeline.knn import unit_rows
from precompute.pipeline.stability import StabilityParams, judge_pairs, match_features, stability_report


def _random_unit(n: int, d: int, seed: int) -> np.ndarray:
    return unit_rows(np.random.default_rng(seed).standard_normal((n, d)))


def test_matching_equals_brute_force_over_all_permutations():
    a, b = _random_unit(6, 5, 0), _random_unit(6, 5, 1)
    cos = a @ b.T
    best = max(itertools.permutations(range(6)), key=lambda p: sum(cos[i, p[i]] for i in range(6)))
    partner, matched = match_features(a, b)
    assert partner.tolist() == list(best)
    np.testing.assert_allclose(matched, cos[np.arange(6), list(best)], atol=1e-12)


def test_a_permuted_noisy_copy_is_matched_back():
    a = _random_unit(300, 64, 2)
    perm = np.random.default_rng(3).permutation(300)
    b = unit_rows(a[perm] + 0.01 * np.random.default_rng(4).standard_normal((300, 64)))
    partner, matched = match_features(a, b)
    # b[j] = a[perm[j]], so a's feature perm[j] is matched to j
    assert np.array_equal(partner[perm], np.arange(300))
    assert matched.min() > 0.99


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _orthogonal(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = rng.standard_normal(v.size)
    return _unit(r - (r @ v) * v)


def test_planted_pairs_reappear_or_vanish_as_built():
    rng = np.random.default_rng(5)
    d = 32
    a = _random_unit(40, d, 6)
    for first in (0, 2, 4):  # pairs (0, 1), (2, 3), (4, 5) at cosine 0.8
        a[first + 1] = 0.8 * a[first] + 0.6 * _orthogonal(a[first], rng)
    b = a.copy()
    b[3] = _unit(rng.standard_normal(d))  # feature 3 is not learnt again
    b[5] = _unit(a[5] - 0.6 * a[4])  # cosine 0.82 with a[5] (still matched), 0.32 with a[4]: moved
    partner, matched = match_features(a, b)
    judged = judge_pairs(np.array([[0, 1], [2, 3], [4, 5]]), a, b, partner, matched, 0.4, 0.7)
    assert judged["reappears"].tolist() == [True, False, False]
    assert judged.loc[1, "match_second"] < 0.7  # vanished: no counterpart
    assert judged.loc[2, "match_second"] >= 0.7 and judged.loc[2, "replicate_cosine"] < 0.4  # moved
    np.testing.assert_allclose(judged["cosine"], [a[0] @ a[1], a[2] @ a[3], a[4] @ a[5]])


def _features(n: int, harmful: list[int], task_score: np.ndarray) -> pd.DataFrame:
    is_harmful = np.zeros(n, bool)
    is_harmful[harmful] = True
    return pd.DataFrame(
        {
            "feature": np.arange(n),
            "is_harmful": is_harmful,
            "task_score": task_score,
            "frequency": np.full(n, 0.01),
            "dead": np.zeros(n, bool),
        }
    )


def test_report_on_an_identical_replicate_keeps_every_pair():
    from precompute.pipeline.knn import knn_bruteforce
    from precompute.pipeline.null import calibrated_null

    n, d = 120, 24
    a = _random_unit(n, d, 7)
    perm = np.random.default_rng(8).permutation(n)
    b = a[perm]
    indices, cosine = knn_bruteforce(a, 4)
    null = calibrated_null(a, 0.01, 2000, 0, "cpu")
    z = {"indices": indices, "cosine": cosine, "null_cosine": np.float64(null.cosine)}
    score = np.linspace(0.2, 0.8, n)
    features = _features(n, [0, 1, 2], score)
    overlaps = pd.DataFrame({"task_feature": [119, 118], "harmful_feature": [0, 1]})
    params = StabilityParams(0.7, 5, 0.01, 2000, 0)
    report = stability_report(a, b, features, z, overlaps, params, {"spec": "b"})
    assert report["match"]["share_matched"] == 1.0
    assert report["null_cosine_replicate"] == pytest.approx(null.cosine)  # same decoder, same null
    flagged = report["pair_sets"]["flagged"]
    assert flagged["n_pairs"] == 2
    expected = [a[119] @ a[0] >= null.cosine, a[118] @ a[1] >= null.cosine]
    assert [p["reappears"] for p in flagged["pairs"]] == expected
    assert flagged["n_above_null"] == sum(expected)  # same decoder and null: above in A iff in B
    baseline = report["pair_sets"]["nearest_neighbour"]
    assert baseline["n_pairs"] == int((cosine[:, 0] >= null.cosine).sum()) == baseline["n_above_null"]
    assert baseline["share_reappearing"] in (None, 1.0)
    ranked = report["pair_sets"]["ranked_nearest_harmful"]
    assert ranked["exploratory"] and ranked["n_pairs"] == 5
    top = [p["first"] for p in ranked["pairs"]]
    assert sorted(top) == [115, 116, 117, 118, 119]  # the highest task scores
    for p in ranked["pairs"]:
        assert p["second"] == int(np.argmax(a[p["first"]] @ a[[0, 1, 2]].T))
