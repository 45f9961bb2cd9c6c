"""The diff's feature sets: task-set choice (strict refuses an empty set; ranked is exploratory),
frequency-matched reference sets, and closeness matching against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from precompute.errors import FeatureGeomError
from precompute.lab.matching import (
    closeness_matching,
    parse_task_set,
    reference_risk,
    reference_sets,
    select_task_set,
)
from precompute.permutation import frequency_bins


def test_task_set_strict_refuses_an_empty_set_and_ranked_is_exploratory() -> None:
    n = 10
    score = np.array([0.9, 0.5, 0.8, 0.3, 0.7, 0.6, 0.2, 0.95, 0.55, 0.4])
    freq = np.full(n, 0.1)
    harmful = np.zeros(n, bool)
    harmful[7] = True  # the most task-leaning feature is harmful: never in a ranked task set
    with pytest.raises(FeatureGeomError, match=r"no task features.*--task-set ranked:100.*exploratory"):
        select_task_set("strict", np.zeros(n, bool), score, freq, harmful)
    strict = select_task_set("strict", score > 0.85, score, freq, harmful)
    assert strict.features.tolist() == [0, 7] and not strict.exploratory and strict.label == "strict"
    ranked = select_task_set("ranked:3", np.zeros(n, bool), score, freq, harmful)
    assert ranked.features.tolist() == [0, 2, 4]  # 0.9, 0.8, 0.7; feature 7 (harmful) left out
    assert ranked.exploratory and ranked.label == "ranked:3 (exploratory)"
    assert ranked.describe()["features"] == [0, 2, 4] and ranked.describe()["exploratory"] is True
    assert parse_task_set(" strict ") == ("strict", None) and parse_task_set("ranked:12") == ("ranked", 12)
    for bad in ("ranked", "ranked:0", "ranked:x", "top:5"):
        with pytest.raises(FeatureGeomError, match="not understood"):
            parse_task_set(bad)
    with pytest.raises(FeatureGeomError, match="no feature leans"):
        select_task_set("ranked:3", np.zeros(n, bool), np.full(n, 0.5), freq, harmful)


def test_reference_sets_copy_the_frequency_profile_from_the_pool() -> None:
    rng = np.random.default_rng(0)
    freq = rng.uniform(0, 1, size=400)
    target = rng.choice(400, size=30, replace=False)
    pool = np.setdiff1d(np.arange(400), target)
    sets, info = reference_sets(target, pool, freq, n_sets=50, n_bins=10, seed=3)
    bins = frequency_bins(freq, 10)
    want = np.bincount(bins[target], minlength=10)
    for row in sets:
        assert np.isin(row, pool).all() and np.unique(row).size == row.size
        np.testing.assert_array_equal(np.bincount(bins[row], minlength=10), want)
    assert info["drawn_with_replacement"] is False and info["taken_from_nearest_bin"] == 0
    np.testing.assert_array_equal(reference_sets(target, pool, freq, 50, 10, 3)[0], sets)
    assert not np.array_equal(reference_sets(target, pool, freq, 50, 10, 4)[0], sets)


def test_a_crowded_bin_widens_to_its_neighbours_without_repeating_a_feature() -> None:
    freq = np.linspace(0.001, 1.0, 400)
    target = np.arange(370, 400)  # the 30 most frequent: the top bin (40 features) keeps only 10 for the pool
    pool = np.setdiff1d(np.arange(400), target)
    sets, info = reference_sets(target, pool, freq, n_sets=20, n_bins=10, seed=0)
    bins = frequency_bins(freq, 10)
    for row in sets:
        assert np.unique(row).size == 30 and np.isin(row, pool).all()
        assert np.isin(pool[bins[pool] == 9], row).all()  # every pool feature of the top bin is used
        assert set(bins[row]) == {8, 9}  # the rest from the next bin down
    assert info["taken_from_nearest_bin"] == 20 * 20
    small, info = reference_sets(target, pool[:5], freq, 3, 10, 0)
    assert info["drawn_with_replacement"] is True and np.isin(small, pool[:5]).all()
    with pytest.raises(FeatureGeomError, match="reference sets"):
        reference_sets(target, np.array([], np.int64), freq, 5, 10, 0)


def test_reference_risk_is_the_max_cosine_to_each_set() -> None:
    rng = np.random.default_rng(1)
    pool = np.array([3, 8, 11, 20])
    cos = rng.uniform(-1, 1, size=(5, 4))  # 5 harmful x the pool
    sets = np.array([[8, 20], [3, 3], [11, 8]])
    risk = reference_risk(cos, pool, sets)
    col = {3: 0, 8: 1, 11: 2, 20: 3}
    for r, s in enumerate(sets):
        for h in range(5):
            assert risk[r, h] == max(cos[h, col[int(f)]] for f in s)


def test_closeness_matching_against_a_hand_computation() -> None:
    """Two frequency bins × two closeness bins. Harmful 0, 1 (low freq, low / high closeness), 2, 3 (high
    freq, high closeness); candidates 10, 11 (low freq, low), 12 (low freq, high), 13 (high freq, low: no
    harmful there), 14 (closeness above every harmful one: unusable)."""
    n = 20
    freq = np.full(n, 0.5)
    freq[[0, 1, 10, 11, 12]] = 0.01
    freq[[2, 3, 13, 14]] = 0.9
    freq[[4, 5, 6, 7, 8]] = 0.01  # fillers: ten features at each frequency, so the median splits them
    freq[[9, 15, 16, 17, 18, 19]] = 0.9
    harmful, h_close = np.array([0, 1, 2, 3]), np.array([0.1, 0.4, 0.35, 0.5])
    cands, c_close = np.array([10, 11, 12, 13, 14]), np.array([0.12, 0.2, 0.45, 0.15, 0.9])
    m = closeness_matching(harmful, h_close, cands, c_close, freq, n, freq_bins=2, close_bins=2)
    # closeness edges: quantiles of [0.1, 0.4, 0.35, 0.5] -> [0.1, 0.375, 0.5]; strata (freq, close):
    # harmful 0 -> (0, 0) with 10, 11;  1 -> (0, 1) with 12;  2 -> (1, 0) with 13 (0.15 < 0.375);
    # 3 -> (1, 1) with none (14 lies above the harmful range). So harmful 0, 1, 2 weigh 1/3 each (3 is
    # left out); 10 and 11 share -1/3; 12 gets -1/3; 13 gets -1/3.
    expected = np.zeros(n)
    expected[[0, 1, 2]] = 1 / 3
    expected[[10, 11]] = -1 / 6
    expected[[12, 13]] = -1 / 3
    np.testing.assert_allclose(m.weights, expected)
    assert (m.n_harmful, m.n_unmatched, m.n_reference, m.n_strata) == (3, 1, 4, 3)
    delta = np.arange(n) * 0.01
    hand = np.mean([delta[0] - (delta[10] + delta[11]) / 2, delta[1] - delta[12], delta[2] - delta[13]])
    assert m.weights @ delta == pytest.approx(hand)
    assert m.weights.sum() == pytest.approx(0.0)  # a shift common to every feature cancels
