"""How far a decoder cosine exceeds the null: the one definition behind the overlaps table's `risk`,
the fine-tune diff's predicted risk (`risk_sum`) and triage's weight of a task feature (`w_via`).

A cosine at or below the null threshold c_null is what random directions reach by chance, so only
the part above it counts: excess = max(0, cos - c_null). Every caller passes neighbors.npz's
`null_cosine`: the larger of the isotropic and the decoder-covariance nulls (docs/cache.md). The functions take numpy arrays or torch
tensors (both have `.clip(min=...)` and `.sum(axis)`), so every caller keeps its own library, dtype
and order of arithmetic: the outputs are bit for bit what each computed on its own before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

__all__ = ["excess_over_null", "scaled_excess_over_null", "summed_excess_over_null"]


def excess_over_null(cosine: ArrayT, null_cosine: float) -> ArrayT:
    """max(0, cos - c_null), elementwise."""
    return (cosine - null_cosine).clip(min=0)


def summed_excess_over_null(cosine: ArrayT, null_cosine: float) -> ArrayT:
    """Σ over the last axis of max(0, cos - c_null): row i of `cosine` [m, n] gives the total overlap of
    feature i with the n features of the other set, beyond chance."""
    return excess_over_null(cosine, null_cosine).sum(-1)


def scaled_excess_over_null(cosine: np.ndarray, null_cosine: float) -> np.ndarray:
    """The excess as a share of the most it can be: max(0, cos - c_null) / (1 - c_null), at most 1
    (0 at the null, 1 for identical directions; 0 everywhere when c_null >= 1)."""
    null = float(null_cosine)
    if null >= 1.0:
        return np.zeros(len(cosine))
    return np.minimum(excess_over_null(cosine, null) / (1.0 - null), 1.0)
