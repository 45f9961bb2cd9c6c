"""The hierarchical bootstrap equals a brute-force resampler that follows the documented draw order with
the same generator; its interval covers what single seeds give where a prompt-only interval does not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from precompute.lab.hboot import (
    Design,
    cluster_codes,
    draw,
    percentile_interval,
    point_estimate,
    spearman_rows,
)

CLUSTERS = np.array([0, 0, 1, 2, 2, 2, 3])  # 7 prompts, 4 base questions (one with 3 variants)


def brute_force(
    design: Design, values: dict[str, np.ndarray], n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """One replicate at a time: draw seeds per arm (or once, paired), then clusters, build each slot's
    resampled prompt list explicitly and average; the documented draw order, nothing vectorised."""
    rng = np.random.default_rng(seed)
    arms = list(design.n_seeds)
    if design.pairing == "paired":
        s = design.n_seeds[arms[0]]
        shared = rng.integers(0, s, size=(n_boot, s))
        seeds = {a: shared for a in arms}
    else:
        seeds = {a: rng.integers(0, design.n_seeds[a], size=(n_boot, design.n_seeds[a])) for a in arms}
    n_c = int(CLUSTERS.max()) + 1
    k = 1 if design.prompt_draw == "shared" else max(design.n_seeds.values())
    draws = rng.integers(0, n_c, size=(n_boot, k, n_c))
    members = {c: [p for p in range(CLUSTERS.size) if CLUSTERS[p] == c] for c in range(n_c)}
    out = {}
    for a in arms:
        x = values[a]
        s_n = x.shape[0]
        if design.seed_correction != "none" and s_n > 1:  # the documented spread about the seed mean
            c = np.sqrt(s_n / (s_n - 1))
            if design.seed_correction == "t":
                c *= sps.t.ppf(0.975, s_n - 1) / sps.norm.ppf(0.975)
            x = x.mean(axis=0) + c * (x - x.mean(axis=0))
        reps = []
        for b in range(n_boot):
            slot_means = []
            for slot, s in enumerate(seeds[a][b]):
                drawn = draws[b, slot if k > 1 else 0]
                prompts = [p for c in drawn for p in members[int(c)]]
                slot_means.append(np.mean([x[s, p] for p in prompts], axis=0))
            reps.append(np.mean(slot_means, axis=0))
        out[a] = np.array(reps)
    return out


@pytest.mark.parametrize(
    ("pairing", "prompt_draw", "n_seeds", "correct"),
    [
        ("independent", "shared", {"task": 3, "control": 2}, "t"),
        ("independent", "per_seed", {"task": 3, "control": 2}, "unbiased"),
        ("independent", "shared", {"task": 3, "control": 1}, "none"),
        ("paired", "shared", {"task": 3, "control": 3}, "t"),
        ("paired", "per_seed", {"task": 3, "control": 3}, "none"),
    ],
)
def test_replicates_equal_brute_force_resampling(pairing, prompt_draw, n_seeds, correct) -> None:
    rng = np.random.default_rng(11)
    values = {a: rng.normal(size=(s, CLUSTERS.size, 4)) for a, s in n_seeds.items()}
    design = Design(n_seeds, CLUSTERS, pairing, prompt_draw, seed_correction=correct)
    draws = draw(design, n_boot=60, seed=5)
    expected = brute_force(design, values, n_boot=60, seed=5)
    for arm in n_seeds:
        np.testing.assert_allclose(draws.replicates(arm, values[arm]), expected[arm], rtol=1e-12, atol=1e-12)
        # one feature at a time gives the same as all at once ([S, P] input)
        np.testing.assert_allclose(
            draws.replicates(arm, values[arm][:, :, 2]), expected[arm][:, 2], atol=1e-12
        )
    w = draws.weights
    np.testing.assert_allclose(w.sum(axis=2), 1.0)
    assert w.shape[1] == (1 if prompt_draw == "shared" else 3)


def test_design_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="pairing"):
        Design({"a": 2}, CLUSTERS, "sideways")
    with pytest.raises(ValueError, match="same number"):
        Design({"a": 2, "b": 3}, CLUSTERS, "paired")
    with pytest.raises(ValueError, match="codes"):
        Design({"a": 2}, np.array([0, 2, 2]))
    with pytest.raises(ValueError, match="seed_correction"):
        Design({"a": 2}, CLUSTERS, seed_correction="yes")
    with pytest.raises(ValueError, match="at least one seed"):
        Design({"a": 0}, CLUSTERS)
    with pytest.raises(ValueError, match="n_seeds=2"):
        draw(Design({"a": 2}, CLUSTERS), 5, 0).replicates("a", np.zeros((3, CLUSTERS.size)))


def test_cluster_codes_follow_first_appearance() -> None:
    assert cluster_codes(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]


def test_spearman_rows_equal_scipy() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 12)), rng.normal(size=(5, 12))
    y[0, :3] = y[0, 3]  # ties
    rho = spearman_rows(x, y)
    for i in range(4):
        for j in range(5):
            assert rho[i, j] == pytest.approx(sps.spearmanr(x[i], y[j]).statistic, abs=1e-12)
    assert spearman_rows(x[0], y[1]) == pytest.approx(sps.spearmanr(x[0], y[1]).statistic)
    assert spearman_rows(x[0], y).shape == (5,) and spearman_rows(x, y[0]).shape == (4,)
    assert np.isnan(spearman_rows(np.ones(12), y[0]))


def test_interval_covers_the_seeds_where_a_prompt_only_interval_does_not() -> None:
    """Three seeds whose effects differ by far more than the prompt noise: each single-seed estimate lies
    in the seed-clustered interval; a prompt-only bootstrap of one seed excludes the other seeds."""
    rng = np.random.default_rng(0)
    n_prompts = 40
    clusters = cluster_codes([i // 2 for i in range(n_prompts)])
    seed_effect = np.array([0.040, 0.047, 0.055])
    values = seed_effect[:, None] + rng.normal(0, 0.004, size=(3, n_prompts))
    draws = draw(Design({"task": 3}, clusters), n_boot=2000, seed=1)
    lo, hi = percentile_interval(draws.replicates("task", values))
    per_seed = values.mean(axis=1)
    assert point_estimate(values) == pytest.approx(per_seed.mean())
    assert (per_seed >= lo).all() and (per_seed <= hi).all()
    # without the small-sample correction the percentile interval misses the lowest seed here
    raw = draw(Design({"task": 3}, clusters, seed_correction="none"), n_boot=2000, seed=1)
    raw_lo, _ = percentile_interval(raw.replicates("task", values))
    assert per_seed[0] < raw_lo
    one = draw(Design({"task": 1}, clusters), n_boot=2000, seed=1)
    lo1, hi1 = percentile_interval(one.replicates("task", values[:1]))
    assert not (lo1 <= per_seed[2] <= hi1)  # seed 0's prompt-only interval misses seed 2
    assert hi - lo > 3 * (hi1 - lo1)


def test_seed_scale_values() -> None:
    from precompute.lab.hboot import seed_scale

    assert seed_scale(1) == 1.0 and seed_scale(3, "none") == 1.0
    assert seed_scale(3, "unbiased") == pytest.approx(np.sqrt(1.5))
    assert seed_scale(3, "t") == pytest.approx(np.sqrt(1.5) * 4.302653 / 1.959964, rel=1e-6)
    assert seed_scale(30, "t") == pytest.approx(np.sqrt(30 / 29) * 2.045230 / 1.959964, rel=1e-6)


def test_shared_prompt_draws_keep_the_prompt_effect_that_per_seed_draws_average_away() -> None:
    """Prompts with large own effects (the same for every seed), seeds identical: the variance of the mean
    comes from the prompts alone; the shared draw keeps it, independent per-seed draws shrink it ~S times."""
    rng = np.random.default_rng(2)
    prompt_effect = rng.normal(0, 1.0, size=30)
    values = np.tile(prompt_effect, (3, 1))
    clusters = np.arange(30)
    shared = draw(Design({"task": 3}, clusters, prompt_draw="shared"), 4000, 0).replicates("task", values)
    nested = draw(Design({"task": 3}, clusters, prompt_draw="per_seed"), 4000, 0).replicates("task", values)
    plain = prompt_effect.var() / 30  # the bootstrap variance of a mean of 30 prompts
    assert shared.var() == pytest.approx(plain, rel=0.1)
    assert nested.var() == pytest.approx(plain / 3, rel=0.1)
