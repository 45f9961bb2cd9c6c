"""The one internal SAE representation every loader ends in.

Conventions follow SAELens: ``W_enc`` is [d_in, d_sae], ``W_dec`` is [d_sae, d_in] (one row per
feature), so a feature's direction in the residual stream is a row of ``W_dec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from precompute.errors import SAEFormatError

ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclass
class SAE:
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str = "standard"  # standard (ReLU) | jumprelu | topk
    threshold: torch.Tensor | None = None  # [d_sae], jumprelu only
    k: int | None = None  # topk only
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    # For expected_average_only_in: inputs are multiplied by this before encoding and
    # reconstructions divided by it (SAELens' norm_scaling_factor).
    norm_scaling_factor: float | None = None
    rescale_acts_by_decoder_norm: bool = False
    hook_name: str | None = None
    model_name: str | None = None
    format: str = "unknown"
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture == "relu":
            self.architecture = "standard"
        self.validate()

    # ------------------------------------------------------------------ checks
    @property
    def d_in(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_dec.shape[0])

    def validate(self) -> None:
        """Assert shapes and finiteness; raise SAEFormatError naming the bad tensor."""
        if self.architecture not in ARCHITECTURES:
            raise SAEFormatError(
                f"unknown SAE architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEFormatError(
                f"unsupported normalize_activations {self.normalize_activations!r}; "
                f"supported: {', '.join(NORMALIZATIONS)}"
            )
        if self.W_dec.ndim != 2:
            raise SAEFormatError(f"W_dec must be 2-D [d_sae, d_in], got shape {tuple(self.W_dec.shape)}")
        d_sae, d_in = self.W_dec.shape
        expected = {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
        }
        if self.threshold is not None:
            expected["threshold"] = (d_sae,)
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                raise SAEFormatError(
                    f"{name} has shape {tuple(tensor.shape)}, expected {shape} "
                    f"(W_dec is [d_sae={d_sae}, d_in={d_in}]); is the file transposed or truncated?"
                )
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise SAEFormatError(
                    f"{name} contains {bad} NaN/inf values ({self.source or 'SAE'}); the weights are corrupt"
                )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise SAEFormatError("a JumpReLU SAE needs a 'threshold' tensor [d_sae]")
        if self.architecture == "topk" and (self.k is None or not 0 < int(self.k) <= d_sae):
            raise SAEFormatError(f"a TopK SAE needs 0 < k <= d_sae ({d_sae}), got k={self.k}")

    # ---------------------------------------------------------------- geometry
    def unit_directions(self) -> torch.Tensor:
        """Decoder rows scaled to unit norm [d_sae, d_in] (rows are not guaranteed unit-norm)."""
        w = self.W_dec.float()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def fold_decoder_norm(self) -> SAE:
        """Make decoder rows unit-norm without changing reconstructions (SAELens fold_W_dec_norm).

        A TopK SAE without rescale_acts_by_decoder_norm is refused, as SAELens does: scaling each
        pre-activation by its decoder norm would change which latents win the top k.
        """
        if self.architecture == "topk" and not self.rescale_acts_by_decoder_norm:
            raise SAEFormatError(
                "folding decoder norms into a TopK SAE without rescale_acts_by_decoder_norm would change which "
                "latents win the top k (SAELens refuses too); use unit_directions() for geometry instead"
            )
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec = self.W_dec / norms[:, None]
        self.W_enc = self.W_enc * norms[None, :]
        self.b_enc = self.b_enc * norms
        # With rescale_acts_by_decoder_norm the threshold already compared pre * norm, which is
        # exactly the folded pre-activation, so it stays as it is.
        if self.threshold is not None and not self.rescale_acts_by_decoder_norm:
            self.threshold = self.threshold * norms
        return self

    # ------------------------------------------------------------ forward pass
    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SAE:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype or t.dtype))
        return self

    def _normalize_in(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        mode = self.normalize_activations
        if mode == "expected_average_only_in" and self.norm_scaling_factor is not None:
            return x * self.norm_scaling_factor, None
        if mode == "constant_norm_rescale":
            scale = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * scale, scale
        if mode == "layer_norm":
            # As SAELens: divide by (std + 1e-5) on the way in, multiply by std on the way out.
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            return x / (std + 1e-5), (mu, std)
        return x, None

    def _normalize_out(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        mode = self.normalize_activations
        if mode == "expected_average_only_in" and self.norm_scaling_factor is not None:
            return x / self.norm_scaling_factor
        if mode == "constant_norm_rescale":
            return x / state
        if mode == "layer_norm":
            mu, std = state
            return x * std + mu
        return x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._normalize_in(x.to(self.W_enc.dtype))
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=1)
        return pre

    @property
    def top_k(self) -> int:
        """k of a TopK SAE (validate() guarantees one)."""
        if self.k is None:
            raise SAEFormatError("a TopK SAE needs k")
        return int(self.k)

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense activations from pre-activations: TopK, ReLU, or ReLU gated by the JumpReLU threshold."""
        if self.architecture == "topk":
            top = pre.topk(self.top_k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        acts = pre.relu()
        if self.architecture == "jumprelu" and self.threshold is not None:
            acts = acts * (pre > self.threshold)
        return acts

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations [..., d_sae]."""
        return self._activate(self.pre_activations(x))

    def encode_sparse(
        self, x: torch.Tensor, max_active: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations of [N, d_in] inputs as (indices [N, m], values [N, m]); zeros pad rows.

        TopK SAEs give m = k without a dense intermediate; other architectures keep the
        ``max_active`` largest (all non-zeros when None).
        """
        pre = self.pre_activations(x)
        if self.architecture == "topk":
            top = pre.topk(self.top_k, dim=-1)
            return top.indices, top.values.relu()
        acts = self._activate(pre)
        m = max_active or int((acts > 0).sum(dim=-1).max().item()) or 1
        top = acts.topk(min(m, self.d_sae), dim=-1)
        return top.indices, top.values

    def decode(self, acts: torch.Tensor, norm_state: Any = None) -> torch.Tensor:
        if self.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=1)
        out = acts @ self.W_dec + self.b_dec
        return self._normalize_out(out, norm_state)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        x_norm, state = self._normalize_in(x.to(self.W_enc.dtype))
        pre_x = x_norm - self.b_dec if self.apply_b_dec_to_input else x_norm
        pre = pre_x @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=1)
        return self.decode(self._activate(pre), state)

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "source": self.source,
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "hook_name": self.hook_name,
            "model_name": self.model_name,
        }
