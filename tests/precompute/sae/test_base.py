"""The internal SAE: encode against hand-written references, normalisation, folding, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.errors import SAEFormatError
from precompute.sae.base import SAE
from tests.precompute.sae.helpers import D_IN, D_SAE, inputs, make_sae


def reference_encode(sae: SAE, x: torch.Tensor) -> np.ndarray:
    """The SAE equations written out in float64 numpy, row by row, independent of base.py."""
    W_enc, b_enc = sae.W_enc.double().numpy(), sae.b_enc.double().numpy()
    b_dec = sae.b_dec.double().numpy()
    out = np.zeros((x.shape[0], sae.d_sae))
    for i, row in enumerate(x.double().numpy()):
        if sae.apply_b_dec_to_input:
            row = row - b_dec
        pre = row @ W_enc + b_enc
        if sae.architecture == "standard":
            out[i] = np.maximum(pre, 0)
        elif sae.architecture == "jumprelu":
            thr = sae.threshold.double().numpy()
            out[i] = np.where(pre > thr, np.maximum(pre, 0), 0.0)
        else:
            top = np.argsort(-pre)[: sae.k]
            out[i, top] = np.maximum(pre[top], 0)
    return out


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_matches_hand_written_reference(architecture: str, apply_b_dec: bool) -> None:
    sae = make_sae(architecture, apply_b_dec_to_input=apply_b_dec)
    x = inputs()
    got = sae.encode(x).double().numpy()
    np.testing.assert_allclose(got, reference_encode(sae, x), atol=1e-5)
    if architecture == "topk":
        assert ((got > 0).sum(axis=1) <= sae.k).all()
    if architecture == "jumprelu":
        pre = sae.pre_activations(x)
        assert not ((got > 0) & (pre <= sae.threshold).numpy()).any()


def test_apply_b_dec_to_input_is_honoured() -> None:
    on, off = make_sae(apply_b_dec_to_input=True), make_sae(apply_b_dec_to_input=False)
    x = inputs()
    torch.testing.assert_close(on.pre_activations(x), (x - on.b_dec) @ on.W_enc + on.b_enc)
    torch.testing.assert_close(off.pre_activations(x), x @ off.W_enc + off.b_enc)
    assert not torch.allclose(on.encode(x), off.encode(x))
    # Subtracting b_dec equals folding -b_dec @ W_enc into b_enc.
    folded = make_sae(apply_b_dec_to_input=False)
    folded.b_enc = folded.b_enc - folded.b_dec @ folded.W_enc
    torch.testing.assert_close(folded.encode(x), on.encode(x), atol=1e-5, rtol=1e-5)


def test_encode_sparse_agrees_with_dense() -> None:
    for arch in ("standard", "jumprelu", "topk"):
        sae = make_sae(arch)
        x = inputs(8)
        idx, val = sae.encode_sparse(x)
        dense = torch.zeros(8, sae.d_sae).scatter_(1, idx, val)
        torch.testing.assert_close(dense, sae.encode(x))


def test_constant_norm_rescale_round_trip() -> None:
    sae = make_sae(normalize_activations="constant_norm_rescale")
    x = inputs()
    normed, state = sae._normalize_in(x)
    torch.testing.assert_close(normed.norm(dim=-1), torch.full((x.shape[0],), D_IN**0.5))
    torch.testing.assert_close(sae._normalize_out(normed, state), x)
    # Encoding is invariant to the input's scale, reconstructions scale with it.
    torch.testing.assert_close(sae.encode(3 * x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.reconstruct(3 * x), 3 * sae.reconstruct(x), atol=1e-5, rtol=1e-5)


def test_layer_norm_round_trip() -> None:
    sae = make_sae(normalize_activations="layer_norm")
    x = inputs() + 5.0
    normed, state = sae._normalize_in(x)
    torch.testing.assert_close(normed.mean(dim=-1), torch.zeros(x.shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.std(dim=-1), torch.ones(x.shape[0]), atol=1e-4, rtol=0)
    # SAELens divides by (std + 1e-5) and multiplies by std: a round trip within ~1e-5 relative.
    torch.testing.assert_close(sae._normalize_out(normed, state), x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.encode(2 * x + 1), sae.encode(x), atol=1e-4, rtol=1e-4)


def test_expected_average_only_in_equals_folded_factor() -> None:
    """SAELens folds norm_scaling_factor as W_enc*s, W_dec/s, b_dec/s; ours applies it at run time."""
    s = 2.5
    sae = make_sae("jumprelu", normalize_activations="expected_average_only_in", norm_scaling_factor=s)
    folded = make_sae("jumprelu")
    folded.W_enc, folded.W_dec, folded.b_dec = folded.W_enc * s, folded.W_dec / s, folded.b_dec / s
    x = inputs()
    torch.testing.assert_close(sae.encode(x), folded.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x), folded.reconstruct(x), atol=1e-5, rtol=1e-5)
    # Without a factor the mode is a no-op, as in SAELens.
    plain = make_sae("jumprelu", normalize_activations="expected_average_only_in")
    torch.testing.assert_close(plain.encode(x), make_sae("jumprelu").encode(x))


@pytest.mark.parametrize(
    ("architecture", "rescale"),
    [("standard", False), ("jumprelu", False), ("topk", True), ("jumprelu", True)],
)
def test_fold_decoder_norm_keeps_reconstructions(architecture: str, rescale: bool) -> None:
    sae = make_sae(architecture, rescale_acts_by_decoder_norm=rescale)
    x = inputs()
    before_recon, before_dirs, before_active = sae.reconstruct(x), sae.unit_directions(), sae.encode(x) > 0
    sae.fold_decoder_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.reconstruct(x), before_recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.unit_directions(), before_dirs)
    assert torch.equal(sae.encode(x) > 0, before_active)


def test_fold_decoder_norm_refuses_plain_topk() -> None:
    sae = make_sae("topk")
    with pytest.raises(SAEFormatError, match="top k"):
        sae.fold_decoder_norm()


def test_unit_directions_are_unit() -> None:
    sae = make_sae()
    dirs = sae.unit_directions()
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(dirs * sae.W_dec.norm(dim=1, keepdim=True), sae.W_dec)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda f: f.update(W_dec=f["W_dec"].T.contiguous()), "transposed"),
        (lambda f: f.update(b_enc=torch.zeros(D_SAE + 1)), "b_enc has shape"),
        (lambda f: f["W_enc"].__setitem__((0, 0), float("nan")), "NaN/inf"),
        (lambda f: f["b_dec"].__setitem__(3, float("inf")), "NaN/inf"),
        (lambda f: f.update(architecture="gated"), "unknown SAE architecture"),
        (lambda f: f.update(architecture="topk", k=D_SAE + 1), "0 < k <= d_sae"),
        (lambda f: f.update(architecture="jumprelu"), "threshold"),
        (lambda f: f.update(normalize_activations="whiten"), "normalize_activations"),
    ],
)
def test_validate_rejects_bad_weights(change, match: str) -> None:
    base = make_sae()
    fields = {
        "W_enc": base.W_enc.clone(),
        "b_enc": base.b_enc.clone(),
        "W_dec": base.W_dec.clone(),
        "b_dec": base.b_dec.clone(),
    }
    change(fields)
    with pytest.raises(SAEFormatError, match=match):
        SAE(**fields)
