"""The overlap excess over the null is one definition: the overlaps table's risk, the diff's `risk_sum`
and triage's `w_via` are all made of it, and `risk_sum` is `w_via` seen from the other side."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.excess import excess_over_null, scaled_excess_over_null, summed_excess_over_null
from precompute.lab.diff import predicted_risk
from precompute.lab.harm_geometry import load_harm_geometry
from precompute.lab.triage import feature_weights
from precompute.pipeline.overlaps import find_overlaps
from tests.tiny import write_feature_cache

NULL = 0.05


def test_excess_is_the_part_above_the_null_in_numpy_and_torch() -> None:
    cos = np.array([[-0.5, 0.05, 0.3], [0.9, 0.0, 1.0]])
    expected = np.maximum(cos - NULL, 0.0)
    np.testing.assert_array_equal(excess_over_null(cos, NULL), expected)
    np.testing.assert_array_equal(summed_excess_over_null(cos, NULL), expected.sum(axis=1))
    t = torch.as_tensor(cos, dtype=torch.float32)
    assert torch.equal(
        excess_over_null(t, NULL), (t - NULL).clamp_min(0)
    )  # bit for bit as diff/triage had it
    assert torch.equal(summed_excess_over_null(t, NULL), (t - NULL).clamp_min(0).sum(dim=1))
    scaled = scaled_excess_over_null(cos.ravel(), NULL)
    np.testing.assert_array_equal(scaled, np.clip((cos.ravel() - NULL) / (1 - NULL), 0.0, 1.0))
    np.testing.assert_array_equal(scaled_excess_over_null(cos.ravel(), 1.0), np.zeros(cos.size))


def test_overlaps_risk_is_the_scaled_excess_times_the_scores() -> None:
    rng = np.random.default_rng(0)
    n, k = 40, 6
    indices = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    cosine = -np.sort(-rng.uniform(-0.2, 0.9, (n, k)), axis=1)
    features = pd.DataFrame(
        {
            "feature": np.arange(n),
            "task_score": rng.uniform(0.4, 1.0, n),
            "is_task": rng.random(n) < 0.5,
            "harm_score": rng.uniform(0.4, 1.0, n),
            "is_harmful": rng.random(n) < 0.5,
            "harm_category": ["cat"] * n,
        }
    )
    null = 0.2
    out = find_overlaps(features, indices, cosine, np.zeros_like(cosine), null, [], n_task=n)
    assert len(out) > 5
    hs, ts = out["harm_score"].to_numpy(), out["task_score"].to_numpy()
    expected = (
        scaled_excess_over_null(out["cosine"].to_numpy(), null)
        * np.clip(2.0 * hs - 1.0, 0.0, 1.0)
        * np.clip(2.0 * ts - 1.0, 0.0, 1.0)
    )
    np.testing.assert_array_equal(out["risk"].to_numpy(), expected)  # the same arithmetic, bit for bit


@pytest.fixture(scope="module")
def disjoint_geometry(tiny_sae_dir, tmp_path_factory):
    """Harmful and task sets that do not share a feature, so diff and triage sum the same pairs."""
    cache = write_feature_cache(
        tmp_path_factory.mktemp("cache"), tiny_sae_dir, 64, [1, 9, 12, 20], [2, 7, 30, 40, 41], NULL
    )
    return load_harm_geometry(cache)


def test_risk_sum_is_w_via_transposed(disjoint_geometry) -> None:
    geo = disjoint_geometry
    harmful, task = geo.harmful, geo.task
    assert not set(harmful) & set(task)
    by_harmful = excess_over_null(geo.cosines(harmful, task, exclude_self=True), NULL)  # [H, T], as diff
    by_task = excess_over_null(geo.cosines(task, harmful), NULL)  # [T, H], as triage
    torch.testing.assert_close(by_harmful, by_task.T, rtol=0, atol=1e-6)
    assert float(by_harmful.sum()) > 0  # some pairs are above the null: the comparison is not vacuous

    risk_sum = predicted_risk(geo).set_index("feature")["risk_sum"]
    _, w_via, _ = feature_weights(geo)
    np.testing.assert_array_equal(risk_sum.loc[harmful].to_numpy(), by_harmful.sum(dim=1).numpy())
    np.testing.assert_array_equal(w_via[task], by_task.sum(dim=1).numpy())
    # the row sums of one matrix against the column sums of its transpose: equal up to summation order
    np.testing.assert_allclose(
        risk_sum.loc[harmful].to_numpy(), by_task.sum(dim=0).numpy(), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(w_via[task], by_harmful.sum(dim=0).numpy(), rtol=1e-6, atol=1e-7)
    assert float(risk_sum.sum()) == pytest.approx(float(w_via.sum()), rel=1e-6)


def test_a_feature_in_both_sets_is_never_its_own_overlap(disjoint_geometry) -> None:
    geo = dataclasses.replace(
        disjoint_geometry,
        features=disjoint_geometry.features.assign(
            is_task=disjoint_geometry.features["is_task"] | (disjoint_geometry.features["feature"] == 9)
        ),
    )
    cos = geo.cosines(geo.harmful, geo.task, exclude_self=True)
    i, j = list(geo.harmful).index(9), list(geo.task).index(9)
    assert float(cos[i, j]) == -1.0 and float(excess_over_null(cos, NULL)[i, j]) == 0.0
