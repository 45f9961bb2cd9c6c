"""One small seeded end-to-end run of `featuregeom synth`, and its help through `python -m precompute`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from precompute.cli import main as cli_main
from precompute.lab.synth.config import DICTIONARY_FILE, PLOT_FILE, REPORT_FILE, SAE_DIR


# ------------------------------------------------------------------------------ end to end
def test_end_to_end_training_recovers_the_planted_geometry(tmp_path) -> None:
    """Small seeded run through the CLI entry point: train the project's TopK SAE, then check the bars."""
    out = tmp_path / "synth"
    code = cli_main(["synth", *E2E_ARGS, "--out", str(out), "--no-progress"])
    report = json.loads((out / REPORT_FILE).read_text())
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

    assert (out / PLOT_FILE).stat().st_size > 1000
    sae = load(str(out / SAE_DIR))
    assert sae.architecture == "topk" and sae.d_in == report["config"]["d"]
    npz = np.load(out / DICTIONARY_FILE)
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
    """`python -m precompute synth --help` (run in-process through runpy, as -m does)."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["python -m precompute", "synth", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("precompute", run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--cosines" in out and "--out" in out and "--n-active" in out


def test_an_out_of_range_cosine_is_one_line_and_exit_2(capsys) -> None:
    assert cli_main(["synth", "--cosines", "0.5", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "featuregeom: error: --cosines must be in [-1, 1], got 2.0"
    ]
