"""A single .safetensors file: architecture inference, orientation, metadata overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from precompute.errors import SAEFormatError
from precompute.sae.registry import detect_format, load_sae
from tests.precompute.sae.helpers import D_IN, D_SAE, assert_same_sae, inputs, make_sae, saelens_copy


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def tensors_of(sae, lowercase: bool = False) -> dict[str, torch.Tensor]:
    w = "w_" if lowercase else "W_"
    out = {f"{w}enc": sae.W_enc, f"{w}dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        out["threshold"] = sae.threshold
    return out


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_architecture_is_inferred_and_matches_saelens_copy(tmp_path: Path, architecture: str) -> None:
    sae = make_sae(architecture, seed=11)
    tensors = tensors_of(sae)
    if architecture == "topk":
        tensors["k"] = torch.tensor(sae.k)
    path = write(tmp_path / "sae.bin.safetensors", tensors, {"hook_name": "blocks.2.hook_resid_post"})
    assert detect_format(str(path)) == "safetensors"
    loaded = load_sae(str(path))
    assert loaded.architecture == architecture and loaded.k == sae.k
    assert loaded.hook_name == "blocks.2.hook_resid_post" and loaded.apply_b_dec_to_input is True
    assert_same_sae(loaded, saelens_copy(sae, tmp_path / "ref"))


def test_k_in_metadata_and_lowercase_keys(tmp_path: Path) -> None:
    sae = make_sae("topk", k=3, apply_b_dec_to_input=False, seed=12)
    path = write(
        tmp_path / "x.safetensors",
        tensors_of(sae, lowercase=True),
        {"k": "3", "apply_b_dec_to_input": "false", "model_name": "gpt2"},
    )
    loaded = load_sae(str(path))
    assert loaded.k == 3 and loaded.apply_b_dec_to_input is False and loaded.model_name == "gpt2"
    assert_same_sae(loaded, sae)


def test_linear_orientation_is_transposed_when_unambiguous(tmp_path: Path) -> None:
    sae = make_sae("jumprelu", seed=13)
    tensors = tensors_of(sae)
    tensors["W_enc"], tensors["W_dec"] = (
        sae.W_enc.T,
        sae.W_dec.T,
    )  # nn.Linear style: [d_sae, d_in], [d_in, d_sae]
    loaded = load_sae(str(write(tmp_path / "t.safetensors", tensors)))
    assert loaded.metadata["orientation"] == [
        f"W_enc stored as [{D_SAE}, {D_IN}], transposed",
        f"W_dec stored as [{D_IN}, {D_SAE}], transposed",
    ]
    assert_same_sae(loaded, sae)


def test_square_sae_is_taken_as_stored(tmp_path: Path) -> None:
    sae = make_sae(d_in=D_IN, d_sae=D_IN, seed=14)
    loaded = load_sae(str(write(tmp_path / "sq.safetensors", tensors_of(sae))))
    assert "orientation" not in loaded.metadata
    assert torch.equal(loaded.W_dec, sae.W_dec)
    x = inputs()
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


@pytest.mark.parametrize(
    ("change", "metadata", "match"),
    [
        (lambda t: t.update(W_dec=torch.zeros(D_SAE, D_IN + 1)), None, "W_dec .*should be"),
        (lambda t: t.pop("b_enc"), None, "missing b_enc"),
        (lambda t: t.update(b_dec=torch.zeros(2, D_IN)), None, "must be 1-D"),
        (None, {"architecture": "topk"}, "no k"),
        (None, {"architecture": "jumprelu"}, "no threshold"),
        (None, {"apply_b_dec_to_input": "maybe"}, "true or false"),
        (lambda t: t["W_enc"].__setitem__((1, 1), float("inf")), None, "NaN/inf"),
    ],
)
def test_bad_files_raise(tmp_path: Path, change, metadata, match: str) -> None:
    tensors = {k: v.clone() for k, v in tensors_of(make_sae(seed=15)).items()}
    if change:
        change(tensors)
    with pytest.raises(SAEFormatError, match=match):
        load_sae(str(write(tmp_path / "bad.safetensors", tensors, metadata)))
