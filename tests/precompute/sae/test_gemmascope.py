"""Gemma Scope v1 (params.npz) and Gemma Scope 2 (params.safetensors + config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from precompute.errors import SAEFormatError
from precompute.sae.registry import detect_format, load_sae
from tests.precompute.sae.helpers import D_SAE, assert_same_sae, make_sae, saelens_copy


def gemma_sae():
    # Gemma Scope SAEs are JumpReLU and do not subtract b_dec from the input.
    return make_sae("jumprelu", apply_b_dec_to_input=False, seed=3)


def write_npz(path: Path, sae, lowercase: bool = False, **extra: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = "w_" if lowercase else "W_"
    np.savez(
        path,
        **{f"{w}enc": sae.W_enc.numpy(), f"{w}dec": sae.W_dec.numpy()},
        b_enc=sae.b_enc.numpy(),
        b_dec=sae.b_dec.numpy(),
        threshold=sae.threshold.numpy(),
        **extra,
    )
    return path


def v1_dir(root: Path) -> Path:
    return root / "gemma-scope-2b-pt-res" / "layer_7" / f"width_{D_SAE}" / "average_l0_12"


@pytest.mark.parametrize("lowercase", [False, True])
def test_v1_npz_matches_saelens_copy(tmp_path: Path, lowercase: bool) -> None:
    sae = gemma_sae()
    path = write_npz(v1_dir(tmp_path) / "params.npz", sae, lowercase)
    assert detect_format(str(path.parent)) == "gemmascope" and detect_format(str(path)) == "gemmascope"
    loaded = load_sae(str(path.parent))
    assert loaded.architecture == "jumprelu" and loaded.apply_b_dec_to_input is False
    assert loaded.hook_name == "blocks.7.hook_resid_post" and loaded.model_name == "gemma-2-2b"
    assert loaded.metadata["layer"] == 7 and loaded.metadata["average_l0"] == 12
    assert_same_sae(loaded, saelens_copy(sae, tmp_path / "ref"))
    assert_same_sae(loaded, sae)


def test_v1_without_layout_still_loads(tmp_path: Path) -> None:
    sae = gemma_sae()
    loaded = load_sae(str(write_npz(tmp_path / "any" / "params.npz", sae)))
    assert loaded.hook_name is None and loaded.model_name is None
    assert_same_sae(loaded, sae)


def test_v1_width_in_path_must_match(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "layer_3" / "width_16k" / "params.npz", gemma_sae())
    with pytest.raises(SAEFormatError, match="width 16384.*d_sae=48"):
        load_sae(str(path))


def test_v1_corrupt_and_incomplete_files(tmp_path: Path) -> None:
    bad = tmp_path / "a" / "params.npz"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(SAEFormatError, match="not a readable .npz"):
        load_sae(str(bad))
    good = write_npz(tmp_path / "b" / "params.npz", gemma_sae())
    truncated = tmp_path / "c" / "params.npz"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SAEFormatError, match="truncated"):
        load_sae(str(truncated))
    sae = gemma_sae()
    missing = tmp_path / "d" / "params.npz"
    missing.parent.mkdir()
    np.savez(
        missing,
        W_enc=sae.W_enc.numpy(),
        W_dec=sae.W_dec.numpy(),
        b_enc=sae.b_enc.numpy(),
        b_dec=sae.b_dec.numpy(),
    )
    with pytest.raises(SAEFormatError, match="missing threshold"):
        load_sae(str(missing))


def test_v1_transposed_decoder_is_rejected(tmp_path: Path) -> None:
    sae = gemma_sae()
    path = tmp_path / "params.npz"
    np.savez(
        path,
        W_enc=sae.W_enc.numpy(),
        W_dec=sae.W_dec.T.numpy(),
        b_enc=sae.b_enc.numpy(),
        b_dec=sae.b_dec.numpy(),
        threshold=sae.threshold.numpy(),
    )
    with pytest.raises(SAEFormatError, match="W_dec .*looks transposed"):
        load_sae(str(path))


def test_v1_nan_weights_are_rejected(tmp_path: Path) -> None:
    sae = gemma_sae()
    sae.W_dec[2, 3] = float("nan")
    with pytest.raises(SAEFormatError, match="NaN"):
        load_sae(str(write_npz(tmp_path / "params.npz", sae)))


# -------------------------------------------------------------------------------- Gemma Scope 2
def write_v2(folder: Path, sae, lowercase: bool = True, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w = "w_" if lowercase else "W_"
    save_file(
        {
            f"{w}enc": sae.W_enc,
            f"{w}dec": sae.W_dec,
            "b_enc": sae.b_enc,
            "b_dec": sae.b_dec,
            "threshold": sae.threshold,
        },
        str(folder / "params.safetensors"),
    )
    cfg = (
        config
        if config is not None
        else {
            "architecture": "jump_relu",
            "model_name": "gemma-v3-270m-pt",
            "hf_hook_point_in": "model.layers.5.output",
        }
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("lowercase", [True, False])
def test_v2_matches_saelens_copy(tmp_path: Path, lowercase: bool) -> None:
    sae = gemma_sae()
    folder = write_v2(tmp_path / "resid_post" / "layer_5_width_16k_l0_small", sae, lowercase)
    assert detect_format(str(folder)) == "gemmascope2"
    assert detect_format(str(folder / "params.safetensors")) == "gemmascope2"
    loaded = load_sae(str(folder))
    assert loaded.format == "gemmascope2" and loaded.apply_b_dec_to_input is False
    assert loaded.hook_name == "blocks.5.hook_resid_post"
    assert loaded.model_name == "google/gemma-3-270m-pt"
    assert loaded.metadata["hf_hook_name"] == "model.layers.5.output"
    assert_same_sae(loaded, saelens_copy(sae, tmp_path / "ref"))


def test_v2_transcoders_are_rejected(tmp_path: Path) -> None:
    cfg = {
        "architecture": "jump_relu",
        "model_name": "gemma-v3-1b-pt",
        "hf_hook_point_in": "model.layers.2.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.2.post_feedforward_layernorm.output",
    }
    folder = write_v2(tmp_path / "transcoder" / "layer_2_width_16k_l0_small", gemma_sae(), config=cfg)
    with pytest.raises(SAEFormatError, match="transcoder"):
        load_sae(str(folder))


def test_v2_wrong_architecture_is_rejected(tmp_path: Path) -> None:
    folder = write_v2(tmp_path / "resid_post" / "layer_1", gemma_sae(), config={"architecture": "topk"})
    with pytest.raises(SAEFormatError, match="not a JumpReLU"):
        load_sae(str(folder))


def test_v2_truncated_weights(tmp_path: Path) -> None:
    folder = write_v2(tmp_path / "resid_post" / "layer_1", gemma_sae())
    weights = folder / "params.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(SAEFormatError, match="not a readable safetensors"):
        load_sae(str(folder))


def test_scaling_factor_without_config_is_rejected(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "params.npz", gemma_sae(), scaling_factor=np.full(D_SAE, 2.0, dtype=np.float32)
    )
    with pytest.raises(SAEFormatError, match="scaling_factor"):
        load_sae(str(path))
    ones = write_npz(
        tmp_path / "ok" / "params.npz", gemma_sae(), scaling_factor=np.ones(D_SAE, dtype=np.float32)
    )
    assert_same_sae(load_sae(str(ones)), gemma_sae())


def test_tensor_types_survive(tmp_path: Path) -> None:
    sae = gemma_sae()
    path = tmp_path / "params.npz"
    np.savez(
        path,
        W_enc=sae.W_enc.double().numpy(),
        W_dec=sae.W_dec.half().numpy(),
        b_enc=sae.b_enc.numpy(),
        b_dec=sae.b_dec.numpy(),
        threshold=sae.threshold.numpy(),
    )
    loaded = load_sae(str(path))
    assert loaded.W_dec.dtype == loaded.W_enc.dtype == torch.float64
