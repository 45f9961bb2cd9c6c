"""precompute.lab.patch: projection algebra (orthogonality, idempotence, LoRA equivalence), and a
patched adapter writes nothing along the removed subspace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from precompute.errors import FeatureGeomError
from precompute.lab.patch import (
    harmful_basis,
    norm_removed,
    orthonormal_basis,
    patch_adapter,
    project_lora_B,
    project_out_output_space,
)
from precompute.sae.registry import load_sae
from tests.precompute.lab.conftest import HARMFUL, TASK

D_OUT, D_IN = 24, 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _basis(m: int = 5, seed: int = 0) -> torch.Tensor:
    return orthonormal_basis(torch.randn(m, D_OUT, generator=_gen(seed), dtype=torch.float64))


def test_orthonormal_basis_spans_directions_and_drops_dependent_ones() -> None:
    dirs = torch.randn(4, D_OUT, generator=_gen(1), dtype=torch.float64)
    dirs = torch.cat([dirs, dirs[:1] * 2 + dirs[1:2], torch.zeros(1, D_OUT, dtype=torch.float64)])
    q = orthonormal_basis(dirs)
    assert q.shape == (D_OUT, 4)
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64))
    # Every input direction lies in span(Q).
    torch.testing.assert_close(q @ (q.T @ dirs.T), dirs.T)
    assert orthonormal_basis(dirs[0]).shape == (D_OUT, 1)
    assert orthonormal_basis(torch.zeros(3, D_OUT)).shape == (D_OUT, 0)


def test_projection_is_orthogonal_idempotent_and_keeps_complement() -> None:
    q = _basis()
    dw = torch.randn(D_OUT, D_IN, generator=_gen(2), dtype=torch.float64)
    out = project_out_output_space(dw, q)
    assert (q.T @ out).abs().max() < 1e-6
    torch.testing.assert_close(project_out_output_space(out, q), out)
    # A component already orthogonal to span(Q) passes through unchanged.
    ortho = dw - q @ (q.T @ dw)
    torch.testing.assert_close(project_out_output_space(ortho, q), ortho)
    # Removing span(Q) from a sum removes exactly the inside part.
    inside = q @ torch.randn(q.shape[1], D_IN, generator=_gen(3), dtype=torch.float64)
    torch.testing.assert_close(project_out_output_space(ortho + inside, q), ortho)


def test_projection_float32_tolerance() -> None:
    q = orthonormal_basis(torch.randn(6, D_OUT, generator=_gen(4)))
    out = project_out_output_space(torch.randn(D_OUT, D_IN, generator=_gen(5)), q)
    assert out.dtype == torch.float32
    assert (q.T @ out).abs().max() < 1e-6


def test_lora_b_projection_equals_projecting_delta_w() -> None:
    q = _basis(seed=6)
    b = torch.randn(D_OUT, 4, generator=_gen(7), dtype=torch.float64)
    a = torch.randn(4, D_IN, generator=_gen(8), dtype=torch.float64)
    torch.testing.assert_close(project_lora_B(b, q) @ a, project_out_output_space(b @ a, q))


def test_projection_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        project_out_output_space(torch.randn(D_IN, D_OUT), _basis())


def test_control_basis_is_frequency_matched_non_harmful_sae_directions(cache, tiny_sae_dir) -> None:
    from precompute.lab.patch import control_basis

    freq = np.array([0.01, 0.02, 0.05, 0.1])[np.arange(64) % 4]  # tests/tiny.py's default profile
    feats = [1, 9, 12, 20]  # frequencies 0.02, 0.02, 0.01, 0.01
    q, chosen = control_basis(cache, feats, seed=3)
    assert len(chosen) == 4 and not set(chosen) & set(HARMFUL + TASK)
    assert sorted(freq[chosen]) == sorted(freq[feats])
    d = load_sae(str(tiny_sae_dir)).unit_directions().float()[chosen]
    assert q.shape == (32, 4)
    torch.testing.assert_close(q @ (q.T @ d.T), d.T, atol=1e-5, rtol=1e-5)  # spans exactly those directions
    assert control_basis(cache, feats, seed=3)[1] == chosen
    assert control_basis(cache, feats, seed=4)[1] != chosen
    q_enc, same = control_basis(cache, feats, seed=3, directions="encoder")
    w = load_sae(str(tiny_sae_dir)).W_enc.float()[:, chosen]
    assert same == chosen and torch.allclose(q_enc @ (q_enc.T @ w), w, atol=1e-5)


def test_norm_removed_inside_orthogonal_and_partial() -> None:
    q = _basis()
    inside = q @ torch.randn(q.shape[1], D_IN, generator=_gen(9), dtype=torch.float64)
    dw = torch.randn(D_OUT, D_IN, generator=_gen(10), dtype=torch.float64)
    ortho = project_out_output_space(dw, q)
    assert norm_removed(inside, q) == pytest.approx(1.0, abs=1e-12)
    assert norm_removed(ortho, q) == pytest.approx(0.0, abs=1e-12)
    # Pythagoras: removed^2 + kept^2 = 1.
    kept = torch.linalg.matrix_norm(ortho) / torch.linalg.matrix_norm(dw)
    assert norm_removed(dw, q) ** 2 + float(kept) ** 2 == pytest.approx(1.0)
    assert norm_removed(torch.zeros(D_OUT, D_IN), q) != norm_removed(torch.zeros(D_OUT, D_IN), q)  # NaN


# ------------------------------------------------------------------------------ the adapter
def _fake_adapter(directory: Path, d: int = 32, r: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in (0, 1):
        for mod, d_in in (("self_attn.o_proj", d), ("mlp.down_proj", 2 * d), ("self_attn.q_proj", d)):
            d_out = d if mod != "self_attn.q_proj" else 16  # q_proj does not write the residual
            pre = f"base_model.model.model.layers.{layer}.{mod}"
            weights[f"{pre}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
            weights[f"{pre}.lora_B.weight"] = torch.randn(d_out, r, generator=g)
    directory.mkdir(parents=True)
    save_file(weights, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 2 * r}))
    return weights


def test_patch_removes_exactly_what_the_update_writes_into_the_subspace(cache, tmp_path) -> None:
    from safetensors.torch import load_file

    weights = _fake_adapter(tmp_path / "run" / "adapter")
    q, feats = harmful_basis(cache, "flagged")
    assert feats == [1, 9] and q.shape == (32, 2)
    report = patch_adapter(tmp_path / "run", q, tmp_path / "patched", {"subspace": "harmful"})
    patched = load_file(str(tmp_path / "patched" / "adapter" / "adapter_model.safetensors"))
    assert report["modules"] == 4 and len(report["skipped"]) == 2
    for name, b in weights.items():
        if "lora_A" in name or "q_proj" in name:
            assert torch.equal(patched[name], b)  # A and non-residual writers untouched
            continue
        a = weights[name.replace("lora_B", "lora_A")]
        delta, delta_p = b @ a, patched[name] @ a
        torch.testing.assert_close(q.T @ delta_p, torch.zeros(2, a.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(delta_p, delta - q @ (q.T @ delta), atol=1e-5, rtol=1e-5)
    side = json.loads((tmp_path / "patched" / "patch.json").read_text())
    assert side["rank_removed"] == 2 and side["modules_patched"] == 4
    q_all, feats_all = harmful_basis(cache, "all")
    assert feats_all == HARMFUL and q_all.shape == (32, 5)
    torch.testing.assert_close(q_all.T @ q_all, torch.eye(5), atol=1e-5, rtol=0)
    assert orthonormal_basis(q_all.T).shape == (32, 5)
    with pytest.raises(FeatureGeomError, match="no adapter_model.safetensors"):
        patch_adapter(tmp_path, q, tmp_path / "x", {})


def test_cli_patch_and_diff_report_clear_errors(cache, tmp_path, capsys) -> None:
    from precompute.cli import main

    _fake_adapter(tmp_path / "run" / "adapter")
    assert (
        main(
            [
                "patch",
                "--adapter",
                str(tmp_path / "run"),
                "--cache",
                str(cache),
                "--random-seed",
                "2",
                "--out",
                str(tmp_path / "rand"),
            ]
        )
        == 0
    )
    assert (
        "rank-2 random SAE features, frequency-matched (decoder, seed 2) subspace" in capsys.readouterr().out
    )
    side = json.loads((tmp_path / "rand" / "patch.json").read_text())
    assert side["features"] == [1, 9] and len(side["control_features"]) == 2
    assert not set(side["control_features"]) & set(HARMFUL + TASK)
    assert (
        main(
            [
                "diff",
                "--before",
                str(tmp_path / "missing"),
                "--after",
                str(tmp_path / "missing"),
                "--min-seeds",
                "1",
                "--cache",
                str(cache),
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 2
    )
    assert "no eval activations" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_encoder_basis_spans_the_features_encoder_columns(cache, tiny_sae_dir) -> None:
    q_enc, feats = harmful_basis(cache, "flagged", directions="encoder")
    w = load_sae(str(tiny_sae_dir)).W_enc.float()[:, feats]
    assert q_enc.shape == (32, 2)
    torch.testing.assert_close(q_enc @ (q_enc.T @ w), w, atol=1e-5, rtol=1e-5)
    with pytest.raises(FeatureGeomError, match="unknown directions"):
        harmful_basis(cache, "flagged", directions="sideways")
    with pytest.raises(FeatureGeomError, match="unknown harmful set"):
        harmful_basis(cache, "some")


def test_patch_by_risk_against_an_exploratory_task_set(tiny_sae_dir, tmp_path, capsys) -> None:
    """No strict task features: --harmful risk needs --task-set ranked:N; the control then avoids the ranked
    set as well as the harmful features, and the harmful features are the brute-force top by max cosine."""
    from precompute.cli import main
    from tests.tiny import write_feature_cache

    score = np.full(64, 0.5)
    ranked = [2, 7, 30]
    score[ranked] = [0.9, 0.8, 0.7]
    cache = write_feature_cache(tmp_path / "cache", tiny_sae_dir, 64, HARMFUL, [], 0.1, task_score=score)
    _fake_adapter(tmp_path / "run" / "adapter")
    args = [
        "patch",
        "--adapter",
        str(tmp_path / "run"),
        "--cache",
        str(cache),
        "--harmful",
        "risk",
        "--top",
        "2",
    ]
    assert main([*args, "--out", str(tmp_path / "p")]) == 2
    assert "--task-set ranked:100" in capsys.readouterr().err
    assert main([*args, "--task-set", "ranked:3", "--random-seed", "1", "--out", str(tmp_path / "p")]) == 0
    side = json.loads((tmp_path / "p" / "patch.json").read_text())
    d = load_sae(str(tiny_sae_dir)).unit_directions().double()
    best = sorted(HARMFUL, key=lambda h: -max(float(d[h] @ d[t]) for t in ranked))[:2]
    assert sorted(side["features"]) == sorted(best) and side["task_set"] == "ranked:3"
    assert not set(side["control_features"]) & set(HARMFUL + ranked)
