"""Sparse autoencoders: one internal representation (`SAE`), loaders per file format."""

from precompute.sae.base import SAE

__all__ = ["SAE"]
