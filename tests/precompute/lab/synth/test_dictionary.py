"""The planted dictionary (exact cosines, roles) and the generator (co-firing statistics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from precompute.lab.synth.dictionary import expected_l0, generate_activations, make_dictionary
from precompute.lab.synth.matching import jaccard_pairs

COSINES = (0.9, 0.7, 0.5, 0.3)


# ------------------------------------------------------------------------------ the dictionary
@pytest.mark.parametrize("d,n_task", [(64, 8), (8, 3)])  # blocks mutually orthogonal / not
def test_planted_cosines_are_exact(d: int, n_task: int) -> None:
    dic = make_dictionary(d, n_task, COSINES, n_coactive_orthogonal=n_task + 2, n_decoys=5, seed=3)
    D = dic.directions
    assert D.shape == (n_task * 5 + n_task + 2 + 5, d)
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0, atol=1e-12)
    G = D @ D.T
    for t in dic.ids("task"):
        planted = dic.planted_of(int(t))
        assert planted["target_cosine"].tolist() == sorted(COSINES, reverse=True)
        hs = planted["feature"].to_numpy()
        np.testing.assert_allclose(G[t, hs], planted["target_cosine"].to_numpy(), atol=1e-6)
        # u_k are orthogonal to each other, so cos(h_i, h_j) = rho_i rho_j within a task
        rho = planted["target_cosine"].to_numpy()
        np.testing.assert_allclose(G[np.ix_(hs, hs)], np.outer(rho, rho) + np.diag(1 - rho**2), atol=1e-6)
        for p in dic.partners_of(int(t)):
            assert abs(G[t, p]) < 1e-12  # co-firing partners are exactly orthogonal to their task
    assert dic.blocks_orthogonal == (n_task * 5 <= d)
    if dic.blocks_orthogonal:  # different tasks' blocks do not touch
        r = dic.roles
        block = np.where(r["role"] == "task", r["feature"], r["task"]).astype(int)
        structural = r["role"].isin(["task", "planted"]).to_numpy()
        i, j = np.nonzero(structural[:, None] & structural[None, :] & (block[:, None] != block[None, :]))
        assert np.abs(G[i, j]).max() < 1e-10


def test_roles_table_and_validation() -> None:
    dic = make_dictionary(32, 2, (0.8, 0.4), n_coactive_orthogonal=3, n_decoys=4, seed=0)
    r = dic.roles
    assert list(r.columns) == ["feature", "role", "task", "target_cosine"]
    assert r["role"].value_counts().to_dict() == {"planted": 4, "decoy": 4, "partner": 3, "task": 2}
    assert (r.loc[r["role"] == "partner", "task"].tolist()) == [0, 3, 0]  # partner j -> task j mod n_task
    assert r.loc[r["role"].isin(["task", "decoy"]), "task"].eq(-1).all()
    assert r.loc[r["role"] == "partner", "target_cosine"].eq(0.0).all()
    same = make_dictionary(32, 2, (0.8, 0.4), n_coactive_orthogonal=3, n_decoys=4, seed=0)
    np.testing.assert_array_equal(dic.directions, same.directions)
    with pytest.raises(ValueError):
        make_dictionary(4, 1, (0.9, 0.7, 0.5, 0.3))  # 5 directions per task in d=4
    with pytest.raises(ValueError):
        make_dictionary(16, 1, (1.0,))


# ------------------------------------------------------------------------------ the generator
def test_cofiring_statistics_bernoulli() -> None:
    dic = make_dictionary(32, 4, (0.7, 0.3), n_coactive_orthogonal=4, n_decoys=4, seed=1)
    p, q, solo, n = 0.05, 0.8, 0.25, 80_000
    data = generate_activations(dic, n, firing_prob=p, cofire_prob=q, partner_solo=solo, noise=0.0, seed=2)
    F = data.fires().toarray().astype(bool)
    assert data.x.shape == (n, 32) and data.codes.shape == (n, dic.n)
    np.testing.assert_allclose(data.x, data.codes @ dic.directions.astype(np.float32), atol=1e-5)
    vals = data.codes.data
    assert vals.min() >= 0.5 and vals.max() <= 1.5
    for t in dic.ids("task"):
        on = F[:, t]
        assert abs(on.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
        for j in dic.partners_of(int(t)):  # co-fire with their task, rarely alone
            assert abs(F[on, j].mean() - q) < 5 * math.sqrt(q * (1 - q) / on.sum())
            assert abs(F[~on, j].mean() - p * solo) < 5 * math.sqrt(p * solo / (~on).sum())
        for h in dic.planted_of(int(t))["feature"]:  # independent of their task
            assert abs(F[on, h].mean() - p) < 5 * math.sqrt(p * (1 - p) / on.sum())
    assert abs(data.params["true_l0"] - expected_l0(dic, p, q, solo)) < 0.05
    pairs_p = np.stack([dic.roles.query("role == 'partner'")["task"], dic.ids("partner")], 1)
    pairs_h = np.stack([dic.roles.query("role == 'planted'")["task"], dic.ids("planted")], 1)
    jp, jh = jaccard_pairs(data.fires(), pairs_p), jaccard_pairs(data.fires(), pairs_h)
    assert jp.min() > 0.5 and jh.max() < 0.06  # co-activation high for partners, ~chance for planted


def test_cofiring_statistics_fixed_l0() -> None:
    dic = make_dictionary(32, 4, (0.7, 0.3), n_coactive_orthogonal=4, n_decoys=4, seed=1)
    data = generate_activations(dic, 40_000, cofire_prob=0.6, partner_solo=0.5, n_active=3, seed=4)
    F = data.fires().toarray().astype(bool)
    assert (F.sum(axis=1) == 3).all()
    for t in dic.ids("task"):
        on = F[:, t]
        for j in dic.partners_of(int(t)):
            # a task drawn into the last slots cannot bring its partner along and is passed over,
            # which lowers P(partner | task) somewhat below cofire_prob; still >> the base rate
            assert F[on, j].mean() > 0.45
            assert F[~on, j].mean() < 0.1
        # A fixed L0 makes every pair slightly anti-correlated (one slot is taken); planted neighbours
        # must carry no dependence on their task beyond that, i.e. behave like the decoys.
        decoy_rate = F[np.ix_(on, dic.ids("decoy"))].mean()
        for h in dic.planted_of(int(t))["feature"]:
            assert abs(F[on, h].mean() - decoy_rate) < 0.02
