"""Tests for precompute.lab.patch: projection algebra (orthogonality, idempotence, LoRA equivalence)."""

from __future__ import annotations

import pytest
import torch

from precompute.lab.patch import (
    norm_removed,
    orthonormal_basis,
    project_lora_B,
    project_out_output_space,
    random_subspace_like,
)

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


def test_random_subspace_same_rank_orthonormal_and_seeded() -> None:
    q = _basis(m=7)
    qr = random_subspace_like(q, seed=3)
    assert qr.shape == q.shape and qr.dtype == q.dtype
    torch.testing.assert_close(qr.T @ qr, torch.eye(7, dtype=torch.float64))
    assert torch.linalg.matrix_rank(qr) == 7
    torch.testing.assert_close(random_subspace_like(q, seed=3), qr)
    assert not torch.allclose(random_subspace_like(q, seed=4), qr)


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
