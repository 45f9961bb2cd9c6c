"""Patch-back: remove the part of a fine-tuning weight update that writes along chosen residual directions.

If the harmful-feature decoder directions span a subspace S of the residual stream, projecting a
weight update onto the orthogonal complement of S (on the output side) means the patched layer can
no longer write anything into S. Comparing with a random subspace of the same rank tells whether
S matters more than its size would suggest.
"""

from __future__ import annotations

import torch

__all__ = [
    "orthonormal_basis",
    "project_out_output_space",
    "project_lora_B",
    "random_subspace_like",
    "norm_removed",
]


def orthonormal_basis(directions: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis Q [d, r] of the row span of ``directions`` [m, d].

    SVD with a relative rank tolerance, because decoder directions are often nearly collinear and
    a plain QR would keep numerically meaningless directions.
    """
    if directions.ndim == 1:
        directions = directions.unsqueeze(0)
    if directions.ndim != 2:
        raise ValueError("directions must be [m, d]")
    d = directions.shape[1]
    work = directions.detach().to(torch.float64)
    if work.shape[0] == 0:
        return torch.zeros(d, 0, dtype=directions.dtype, device=directions.device)
    _, s, vh = torch.linalg.svd(work, full_matrices=False)
    smax = s.max() if s.numel() else torch.tensor(0.0, dtype=torch.float64)
    r = int((s > rtol * smax).sum()) if smax > 0 else 0
    return vh[:r].T.contiguous().to(dtype=directions.dtype)


def _check(mat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Validate shapes and return Q in mat's dtype/device."""
    if mat.ndim != 2 or q.ndim != 2 or q.shape[0] != mat.shape[0]:
        raise ValueError(f"need mat [d_out, k] and Q [d_out, r]; got {tuple(mat.shape)} and {tuple(q.shape)}")
    return q.to(dtype=mat.dtype, device=mat.device)


def project_out_output_space(delta_W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """delta_W - Q Qᵀ delta_W: the update with everything it writes along span(Q) removed (Q orthonormal)."""
    q = _check(delta_W, Q)
    return delta_W - q @ (q.T @ delta_W)


def project_lora_B(B: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """B - Q Qᵀ B for a LoRA pair; since ΔW = B A, this equals projecting ΔW without materialising it."""
    return project_out_output_space(B, Q)


def random_subspace_like(Q: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random orthonormal [d, r] basis with Q's shape: the same-size control for a targeted removal."""
    d, r = Q.shape
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(d, r, generator=gen, dtype=torch.float64)
    q_rand, _ = torch.linalg.qr(g)
    return q_rand.to(dtype=Q.dtype, device=Q.device)


def norm_removed(delta_W: torch.Tensor, Q: torch.Tensor) -> float:
    """‖Q Qᵀ ΔW‖_F / ‖ΔW‖_F: the fraction of the update's norm that writes into span(Q) (NaN if ΔW = 0)."""
    q = _check(delta_W, Q)
    total = torch.linalg.matrix_norm(delta_W.to(torch.float64))
    if total == 0:
        return float("nan")
    inside = torch.linalg.matrix_norm((q @ (q.T @ delta_W)).to(torch.float64))
    return float(inside / total)
