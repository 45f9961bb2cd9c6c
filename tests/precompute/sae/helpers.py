"""Tiny random SAEs and comparison helpers shared by the SAE format tests."""

from __future__ import annotations

from pathlib import Path

import torch

from precompute.sae.base import SAE
from precompute.sae.formats.saelens import save_saelens
from precompute.sae.registry import load_sae

D_IN, D_SAE = 16, 48


def make_sae(
    architecture: str = "standard",
    *,
    apply_b_dec_to_input: bool = True,
    seed: int = 0,
    k: int = 6,
    d_in: int = D_IN,
    d_sae: int = D_SAE,
    **fields,
) -> SAE:
    """A random SAE whose decoder rows are deliberately not unit-norm and whose biases are non-zero."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g) * (0.5 + torch.rand(d_sae, 1, generator=g))
    W_enc = torch.randn(d_in, d_sae, generator=g) * 0.3
    b_enc = torch.randn(d_sae, generator=g) * 0.1
    b_dec = torch.randn(d_in, generator=g) * 0.5
    threshold = torch.rand(d_sae, generator=g) * 0.5 if architecture == "jumprelu" else None
    return SAE(
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        architecture=architecture,
        threshold=threshold,
        k=k if architecture == "topk" else None,
        apply_b_dec_to_input=apply_b_dec_to_input,
        **fields,
    )


def inputs(n: int = 32, seed: int = 1, d_in: int = D_IN) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)) * 2


def assert_same_sae(a: SAE, b: SAE, x: torch.Tensor | None = None) -> None:
    """Same unit directions and the same encode() output on random inputs."""
    x = inputs() if x is None else x
    assert a.W_dec.shape == b.W_dec.shape == (a.d_sae, a.d_in)
    torch.testing.assert_close(a.unit_directions(), b.unit_directions(), rtol=0, atol=1e-6)
    ea, eb = a.encode(x), b.encode(x)
    assert (ea > 0).any(), "the test inputs should activate some latents"
    torch.testing.assert_close(ea, eb, rtol=0, atol=1e-6)
    assert torch.equal(ea > 0, eb > 0)


def saelens_copy(sae: SAE, directory: Path) -> SAE:
    """Write ``sae`` as a SAELens directory and read it back: the reference every format is compared with."""
    save_saelens(sae, directory)
    return load_sae(str(directory), format="saelens")
