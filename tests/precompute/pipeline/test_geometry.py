"""The geometry step's neighbors.npz: the kNN lists as before, both nulls, the flagging one named, the
nearest-neighbour quantiles, and the sidecar; the option check on the covariance null's samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from precompute import schema
from precompute.cli import main as cli_main
from precompute.errors import FeatureGeomError
from precompute.pipeline.config import RunConfig
from precompute.pipeline.geometry import check_sizes, neighbor_arrays
from precompute.pipeline.knn import knn_bruteforce
from precompute.pipeline.layout import backend_version, cuml_unavailable
from precompute.pipeline.null import COVARIANCE, ISOTROPIC, CosineNull, calibrated_null, cosine_z


def test_neighbor_arrays_hold_both_nulls_and_the_one_used(tmp_path) -> None:
    rng = np.random.default_rng(0)
    U = rng.standard_normal((50, 8)).astype(np.float32)
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    indices, cosine = knn_bruteforce(U, 6)
    for null, kind in [
        (CosineNull(0.3, 0.4, 0.01, 1000, 0.1), COVARIANCE),
        (CosineNull(0.3, 0.25, 0.01, 1000, 0.1), ISOTROPIC),
    ]:
        arrays = neighbor_arrays(indices, cosine, null, 8)
        np.savez(tmp_path / "nb.npz", **arrays)
        schema.check_npz(tmp_path / "nb.npz", schema.NEIGHBORS)  # the contract, a string array included
        with np.load(tmp_path / "nb.npz", allow_pickle=False) as z:
            assert str(z["null_kind"]) == kind
            assert float(z["null_cosine"]) == max(0.3, float(z["null_covariance"]))
            assert (float(z["null_isotropic"]), int(z["null_samples"]), float(z["fpr"])) == (0.3, 1000, 0.01)
            np.testing.assert_array_equal(z["indices"], indices)
            np.testing.assert_array_equal(z["cosine"], cosine)
            np.testing.assert_array_equal(z["z_isotropic"], np.asarray(cosine_z(cosine, 8), np.float32))
            np.testing.assert_array_equal(
                z["nn_cosine_quantiles"],
                np.quantile(cosine[:, 0].astype(np.float64), np.arange(1, 100) / 100),
            )
            assert "z" not in z.files


def test_geometry_step_writes_the_calibrated_null(tiny_sae_dir, tmp_path) -> None:
    from precompute.sae.registry import load_sae

    out = tmp_path / "geo"
    args = ["--neighbors", "8", "--umap-neighbors", "5", "--null-fpr", "0.05", "--null-samples", "2000"]
    assert cli_main(["geometry", "--sae", str(tiny_sae_dir), "--out", str(out), *args, "--no-progress"]) == 0
    U = load_sae(str(tiny_sae_dir)).unit_directions()
    expected = calibrated_null(U, fpr=0.05, samples=2000, seed=0)
    with np.load(out / schema.NEIGHBORS, allow_pickle=False) as z:
        assert float(z["null_isotropic"]) == expected.isotropic
        assert float(z["null_covariance"]) == pytest.approx(expected.covariance, abs=1e-6)
        assert float(z["null_cosine"]) == pytest.approx(expected.cosine, abs=1e-6)
        assert str(z["null_kind"]) == expected.kind and int(z["null_samples"]) == 2000
    params = json.loads((out / schema.params_file("geometry")).read_text())["params"]
    assert params["null_kind"] == expected.kind and params["null_samples"] == 2000
    assert params["null_cosine"] == pytest.approx(expected.cosine, abs=1e-6)
    assert params["null_shrinkage"] == pytest.approx(expected.shrinkage)
    assert params["null_fpr"] == 0.05
    sidecar = json.loads((out / schema.params_file("geometry")).read_text())
    if cuml_unavailable() is not None:  # auto picks cuML only where it runs
        assert params["umap_backend"] == "auto" and params["umap_backend_used"] == "umap-learn"
    assert params["umap_version"] == backend_version(params["umap_backend_used"])
    assert set(sidecar["timings"]) == {"umap_compile_s", "umap_fit_s"}
    assert sidecar["timings"]["umap_fit_s"] > 0 and sidecar["timings"]["umap_compile_s"] >= 0


def test_an_explicit_cuml_that_cannot_run_stops_before_any_work(tiny_sae_dir, tmp_path, capsys) -> None:
    if cuml_unavailable() is None:
        pytest.skip("cuML runs here")
    out = tmp_path / "geo"
    argv = [
        "geometry",
        "--sae",
        str(tiny_sae_dir),
        "--out",
        str(out),
        "--umap-backend",
        "cuml",
        "--no-progress",
    ]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install cuml-cu12" in err[0] and "--umap-backend umap-learn" in err[0]
    assert not (out / schema.NEIGHBORS).exists()


def test_too_few_samples_for_the_fpr_is_refused() -> None:
    cfg = RunConfig(null_fpr=0.001, null_samples=9999)
    with pytest.raises(FeatureGeomError, match="fewer than 10 random directions above the covariance null"):
        check_sizes(cfg, 5000, 64)
    check_sizes(RunConfig(null_fpr=0.001, null_samples=10_000), 5000, 64)
