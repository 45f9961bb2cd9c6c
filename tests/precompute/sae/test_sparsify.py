"""EleutherAI sparsify checkpoints: layout, hookpoint selection, encode faithful to sparsify's code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from precompute.errors import SAEFormatError
from precompute.sae.registry import detect_format, load_sae
from tests.precompute.sae.helpers import D_IN, D_SAE, assert_same_sae, inputs, make_sae, saelens_copy


def sparsify_sae(seed: int = 4):
    return make_sae("topk", apply_b_dec_to_input=True, k=5, seed=seed)


def write_hookpoint(
    directory: Path, sae, cfg_extra: dict | None = None, **extra_tensors: torch.Tensor
) -> Path:
    """Write like SparseCoder.save_to_disk: encoder is an nn.Linear [num_latents, d_in], W_dec [num_latents, d_in]."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "encoder.bias": sae.b_enc,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
        **extra_tensors,
    }
    save_file(tensors, str(directory / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
        **(cfg_extra or {}),
    }
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def sparsify_reference_encode(directory: Path, x: torch.Tensor) -> torch.Tensor:
    """sparsify's SparseCoder.encode + fused_encoder, written out: topk(relu(encoder(x - b_dec)))."""
    from safetensors.torch import load_file

    t = load_file(str(directory / "sae.safetensors"))
    k = json.loads((directory / "cfg.json").read_text())["k"]
    pre = torch.nn.functional.relu(
        torch.nn.functional.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"])
    )
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


def test_hookpoint_dir_matches_saelens_copy_and_sparsify(tmp_path: Path) -> None:
    sae = sparsify_sae()
    run = tmp_path / "run"
    hook = write_hookpoint(run / "layers.6", sae)
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m"}))
    assert detect_format(str(hook)) == "sparsify"
    loaded = load_sae(str(hook))
    assert loaded.architecture == "topk" and loaded.k == 5 and loaded.apply_b_dec_to_input is True
    assert loaded.hook_name == "blocks.6.hook_resid_post" and loaded.metadata["hookpoint"] == "layers.6"
    assert loaded.model_name == "EleutherAI/pythia-160m"
    assert_same_sae(loaded, saelens_copy(sae, tmp_path / "ref"))
    x = inputs()
    torch.testing.assert_close(loaded.encode(x), sparsify_reference_encode(hook, x), atol=1e-6, rtol=0)


def test_parent_with_one_hookpoint_and_selection(tmp_path: Path) -> None:
    sae = sparsify_sae()
    write_hookpoint(tmp_path / "one" / "layers.3.mlp", sae)
    assert detect_format(str(tmp_path / "one")) == "sparsify"
    loaded = load_sae(str(tmp_path / "one"))
    assert loaded.hook_name == "blocks.3.hook_mlp_out"
    assert_same_sae(loaded, sae)

    other = sparsify_sae(seed=9)
    write_hookpoint(tmp_path / "two" / "layers.1", sae)
    write_hookpoint(tmp_path / "two" / "layers.2", other)
    with pytest.raises(SAEFormatError, match=r"2 sparsify hookpoints \(layers.1, layers.2\).*:<hookpoint>"):
        load_sae(str(tmp_path / "two"))
    spec = f"{tmp_path / 'two'}:layers.2"
    assert detect_format(spec) == "sparsify"
    assert_same_sae(load_sae(spec), other)
    with pytest.raises(SAEFormatError, match="no sparsify hookpoint 'layers.9'.*layers.1, layers.2"):
        load_sae(f"{tmp_path / 'two'}:layers.9")


def test_num_latents_zero_uses_expansion_factor(tmp_path: Path) -> None:
    sae = sparsify_sae()
    hook = write_hookpoint(tmp_path / "h", sae, {"num_latents": 0, "expansion_factor": D_SAE // D_IN})
    assert load_sae(str(hook)).d_sae == D_SAE


@pytest.mark.parametrize(
    ("cfg_extra", "tensors", "match"),
    [
        ({"transcode": True}, {}, "transcoder"),
        ({"skip_connection": True}, {}, "skip connection"),
        ({}, {"W_skip": torch.zeros(D_IN, D_IN)}, "W_skip"),
        ({"activation": "groupmax"}, {}, "groupmax"),
        ({"num_latents": D_SAE + 2}, {}, "expected"),
    ],
)
def test_unsupported_variants_are_rejected(
    tmp_path: Path, cfg_extra: dict, tensors: dict, match: str
) -> None:
    hook = write_hookpoint(tmp_path / "h", sparsify_sae(), cfg_extra, **tensors)
    with pytest.raises(SAEFormatError, match=match):
        load_sae(str(hook))


def test_decoder_in_wrong_orientation_is_rejected(tmp_path: Path) -> None:
    sae = sparsify_sae()
    hook = tmp_path / "h"
    write_hookpoint(hook, sae)
    save_file(
        {
            "encoder.weight": sae.W_enc.T.contiguous(),
            "encoder.bias": sae.b_enc,
            "W_dec": sae.W_dec.T.contiguous(),
            "b_dec": sae.b_dec,
        },
        str(hook / "sae.safetensors"),
    )
    with pytest.raises(SAEFormatError, match="looks transposed"):
        load_sae(str(hook))


def test_empty_directory_is_not_sparsify(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEFormatError, match="not a sparsify checkpoint"):
        load_sae(str(tmp_path / "empty"), format="sparsify")
