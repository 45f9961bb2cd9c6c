"""Planted ground truth (precompute.lab.synth): the dictionary, the generator, the matching, the
evaluation on a perfect decoder, and one small seeded end-to-end training run."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from precompute.lab import synth
from precompute.pipeline.null import null_cosine

COSINES = (0.9, 0.7, 0.5, 0.3)


# ------------------------------------------------------------------------------ the dictionary
@pytest.mark.parametrize("d,n_task", [(64, 8), (8, 3)])  # blocks mutually orthogonal / not
def test_planted_cosines_are_exact(d: int, n_task: int) -> None:
    dic = synth.make_dictionary(d, n_task, COSINES, n_coactive_orthogonal=n_task + 2, n_decoys=5, seed=3)
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
    dic = synth.make_dictionary(32, 2, (0.8, 0.4), n_coactive_orthogonal=3, n_decoys=4, seed=0)
    r = dic.roles
    assert list(r.columns) == ["feature", "role", "task", "target_cosine"]
    assert r["role"].value_counts().to_dict() == {"planted": 4, "decoy": 4, "partner": 3, "task": 2}
    assert (r.loc[r["role"] == "partner", "task"].tolist()) == [0, 3, 0]  # partner j -> task j mod n_task
    assert r.loc[r["role"].isin(["task", "decoy"]), "task"].eq(-1).all()
    assert r.loc[r["role"] == "partner", "target_cosine"].eq(0.0).all()
    same = synth.make_dictionary(32, 2, (0.8, 0.4), n_coactive_orthogonal=3, n_decoys=4, seed=0)
    np.testing.assert_array_equal(dic.directions, same.directions)
    with pytest.raises(ValueError):
        synth.make_dictionary(4, 1, (0.9, 0.7, 0.5, 0.3))  # 5 directions per task in d=4
    with pytest.raises(ValueError):
        synth.make_dictionary(16, 1, (1.0,))


# ------------------------------------------------------------------------------ the generator
def test_cofiring_statistics_bernoulli() -> None:
    dic = synth.make_dictionary(32, 4, (0.7, 0.3), n_coactive_orthogonal=4, n_decoys=4, seed=1)
    p, q, solo, n = 0.05, 0.8, 0.25, 80_000
    data = synth.generate_activations(
        dic, n, firing_prob=p, cofire_prob=q, partner_solo=solo, noise=0.0, seed=2
    )
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
    assert abs(data.params["true_l0"] - synth.expected_l0(dic, p, q, solo)) < 0.05
    pairs_p = np.stack([dic.roles.query("role == 'partner'")["task"], dic.ids("partner")], 1)
    pairs_h = np.stack([dic.roles.query("role == 'planted'")["task"], dic.ids("planted")], 1)
    jp, jh = synth.jaccard_pairs(data.fires(), pairs_p), synth.jaccard_pairs(data.fires(), pairs_h)
    assert jp.min() > 0.5 and jh.max() < 0.06  # co-activation high for partners, ~chance for planted


def test_cofiring_statistics_fixed_l0() -> None:
    dic = synth.make_dictionary(32, 4, (0.7, 0.3), n_coactive_orthogonal=4, n_decoys=4, seed=1)
    data = synth.generate_activations(dic, 40_000, cofire_prob=0.6, partner_solo=0.5, n_active=3, seed=4)
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


# ------------------------------------------------------------------------------ matching
def test_hungarian_matching_recovers_a_signed_permutation() -> None:
    rng = np.random.default_rng(0)
    true = rng.standard_normal((40, 24))
    perm = rng.permutation(40)
    signs = rng.choice([-1.0, 1.0], size=40)
    learned = (true * 3.0)[perm] * signs[:, None]  # learned row i = sign_i * true[perm[i]] (unnormalised)
    m = synth.match_dictionary(true, learned)
    inverse = np.argsort(perm)
    np.testing.assert_array_equal(m.assignment, inverse)
    np.testing.assert_array_equal(m.learned_to_true, perm)
    assert m.mcc == pytest.approx(1.0, abs=1e-12) and m.mmcs == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(m.matched_cos, signs[inverse], atol=1e-12)
    # extra learned rows (random) change nothing; fewer learned rows leave true rows unmatched
    extra = np.vstack([learned, rng.standard_normal((20, 24))])
    m2 = synth.match_dictionary(true, extra)
    np.testing.assert_array_equal(m2.assignment, inverse)
    assert m2.mcc == pytest.approx(1.0) and (m2.learned_to_true[40:] == -1).all()
    m3 = synth.match_dictionary(true, learned[:30])
    assert (m3.assignment == -1).sum() == 10 and m3.mcc == pytest.approx(0.75)


# ------------------------------------------------------------------------------ evaluation
def test_evaluate_geometry_on_the_true_dictionary() -> None:
    """A perfect SAE (decoder = the dictionary): everything the report claims is exact."""
    dic = synth.make_dictionary(64, 6, COSINES, n_coactive_orthogonal=6, n_decoys=12, seed=5)
    data = synth.generate_activations(
        dic, 20_000, firing_prob=0.05, cofire_prob=0.8, partner_solo=0.25, seed=5
    )
    fires = data.fires()
    rep = synth.evaluate_geometry(dic, dic.directions, true_fires=fires, learned_fires=fires, fpr=0.01, k=16)
    null = null_cosine(dic.n, 64, 0.01)
    assert rep["null_cosine"] == pytest.approx(null)
    assert rep["order_accuracy"] == 1.0 and rep["pairwise_order_accuracy"] == 1.0
    assert rep["recovered_mean_abs_error"] < 1e-6
    for r in rep["recovered_by_rho"]:
        assert r["above_null_fraction"] == float(r["rho"] > null)
    for e in rep["tasks"]:
        top = e["neighbours"][0]
        assert (
            top["role"] == "planted" and top["rho"] == 0.9 and top["cosine"] == pytest.approx(0.9, abs=1e-6)
        )
        assert all(n["role"] != "duplicate" for n in e["neighbours"])
    fp = rep["false_positives"]
    assert fp["partner"]["pairs"] == 6 and fp["decoy"]["pairs"] == 6 * 12
    assert fp["partner"]["max_cosine"] == pytest.approx(0.0, abs=1e-6)  # planted exactly orthogonal
    assert fp["expected_pair_rate"] == pytest.approx(1 - 0.99 ** (1 / (dic.n - 1)))
    co = rep["coactivation"]
    for src in ("true", "latent", "feature"):  # a perfect SAE: all three views agree
        assert co["partner"][f"{src}_jaccard_min"] > 0.5 > 0.06 > co["planted"][f"{src}_jaccard_max"]
        assert co[f"{src}_separated"] and co[f"{src}_separation_auroc"] == 1.0
    json.dumps(rep)  # the report is JSON-ready


# ------------------------------------------------------------------------------ end to end
def test_end_to_end_training_recovers_the_planted_geometry(tmp_path) -> None:
    """Small seeded run through the CLI entry point: train the project's TopK SAE, then check the bars."""
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    out = tmp_path / "synth"
    args = parser.parse_args(E2E_ARGS + ["--out", str(out), "--no-progress"])
    code = synth.run(args)
    report = json.loads((out / synth.REPORT_FILE).read_text())
    geo = report["geometry"]
    assert report["recovery"]["mcc"] >= 0.9 and report["recovery"]["mmcs"] >= 0.9
    assert geo["order_accuracy"] == 1.0  # every task lists its planted neighbours in rho order
    for r in geo["recovered_by_rho"]:
        assert abs(r["mean_cosine"] - r["rho"]) < 0.05
    fp = geo["false_positives"]
    assert fp["flagged"] == 0 and fp["tasks_with_false_flag"] == 0  # expected count at fpr 0.01 is < 0.01
    co = geo["coactivation"]
    assert co["partner"]["true_jaccard_min"] > 5 * co["planted"]["true_jaccard_max"]
    assert co["partner"]["feature_jaccard_min"] > 5 * co["planted"]["feature_jaccard_max"]
    assert co["partner"]["latent_jaccard_mean"] > 5 * co["planted"]["latent_jaccard_mean"]
    assert co["partner"]["above_null_fraction"] == 0.0  # co-firing, yet not geometric neighbours
    assert report["all_bars_met"] and code == 0
    # outputs: plot, dictionary, and an SAE that the project's SAELens loader reads back
    from precompute.sae.formats.saelens import load

    assert (out / synth.PLOT_FILE).stat().st_size > 1000
    sae = load(str(out / synth.SAE_DIR))
    assert sae.architecture == "topk" and sae.d_in == report["config"]["d"]
    npz = np.load(out / synth.DICTIONARY_FILE)
    assert npz["directions"].shape == (report["dictionary"]["n_features"], report["config"]["d"])


E2E_ARGS = [
    "--d",
    "48",
    "--n-task",
    "4",
    "--cosines",
    "0.6",
    "0.45",
    "0.3",
    "--decoys",
    "6",
    "--n-active",
    "3",
    "--samples",
    "30000",
    "--steps",
    "1000",
    "--batch-size",
    "512",
    "--seed",
    "0",
]


def test_module_help_runs(monkeypatch, capsys) -> None:
    """`python -m precompute.lab.synth --help` (run in-process through runpy, as -m does)."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["python -m precompute.lab.synth", "--help"])
    monkeypatch.delitem(sys.modules, "precompute.lab.synth", raising=False)  # as a fresh `-m` run sees it
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("precompute.lab.synth", run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--cosines" in out and "--out" in out and "--n-active" in out
