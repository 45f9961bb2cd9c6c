"""The evaluation on a perfect decoder: everything the report claims is exact."""

from __future__ import annotations

import json

import pytest

from precompute.lab.synth.dictionary import generate_activations, make_dictionary
from precompute.lab.synth.evaluate import evaluate_geometry
from precompute.pipeline.geometry import null_isotropic

COSINES = (0.9, 0.7, 0.5, 0.3)


# ------------------------------------------------------------------------------ evaluation
def test_evaluate_geometry_on_the_true_dictionary() -> None:
    """A perfect SAE (decoder = the dictionary): everything the report claims is exact."""
    dic = make_dictionary(64, 6, COSINES, n_coactive_orthogonal=6, n_decoys=12, seed=5)
    data = generate_activations(dic, 20_000, firing_prob=0.05, cofire_prob=0.8, partner_solo=0.25, seed=5)
    fires = data.fires()
    rep = evaluate_geometry(dic, dic.directions, true_fires=fires, learned_fires=fires, fpr=0.01, k=16)
    null = null_isotropic(dic.n, 64, 0.01)
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
