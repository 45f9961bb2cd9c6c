"""A single ``.safetensors`` file with ``W_enc``/``W_dec``/``b_enc``/``b_dec`` (+ ``threshold``, ``k``).

For SAEs exported without a config. Lowercase ``w_enc``/``w_dec`` are accepted. The architecture is
inferred: a ``threshold`` tensor means JumpReLU, a ``k`` (scalar tensor or the file's string
metadata) means TopK, otherwise standard ReLU; metadata keys ``architecture``, ``k``,
``apply_b_dec_to_input``, ``normalize_activations``, ``norm_scaling_factor``,
``rescale_acts_by_decoder_norm``, ``hook_name`` and ``model_name`` override the guesses.

Orientation: b_enc [d_sae] and b_dec [d_in] fix d_in and d_sae. W_enc/W_dec stored in the other
orientation (nn.Linear style) are transposed only when that is unambiguous, i.e. d_in != d_sae;
a square SAE is taken as stored in the SAELens layout. apply_b_dec_to_input defaults to True, as
in SAELens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from precompute.errors import SAEFormatError
from precompute.sae.base import SAE
from precompute.sae.format import SAEFormat, file_and_siblings
from precompute.sae.formats import (
    build_sae,
    parse_bool,
    read_safetensors,
    rename_lowercase,
    require,
    scalar_int,
)

NAME = "safetensors"
DETECT_PRIORITY = 10  # any .safetensors file: the fallback when no format claims it by name
CONVENTION = "W_enc [d_in, d_sae] and W_dec [d_sae, d_in] (either orientation accepted when d_in != d_sae)"


def _orient(
    name: str, tensor: torch.Tensor, shape: tuple[int, int], source: str, notes: list[str]
) -> torch.Tensor:
    """Return ``tensor`` in ``shape``, transposing only when the shapes make that unambiguous."""
    if tensor.ndim != 2:
        raise SAEFormatError(f"{name} in {source} must be 2-D, got shape {tuple(tensor.shape)}")
    got = tuple(tensor.shape)
    if got == shape:
        return tensor
    if got == shape[::-1] and shape[0] != shape[1]:
        notes.append(f"{name} stored as {list(got)}, transposed")
        return tensor.T
    raise SAEFormatError(
        f"{name} in {source} has shape {got}; to match b_enc [d_sae] and b_dec [d_in] it should be "
        f"{shape} or its transpose"
    )


def load(path: str, device: str = "cpu") -> SAE:
    """Load a plain safetensors SAE file (see the module docstring for the inference rules)."""
    file = Path(path)
    source = str(file)
    tensors, meta = read_safetensors(file)
    tensors = rename_lowercase(tensors)
    require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), source, NAME)
    b_enc, b_dec = tensors["b_enc"], tensors["b_dec"]
    if b_enc.ndim != 1 or b_dec.ndim != 1:
        raise SAEFormatError(
            f"b_enc and b_dec in {source} must be 1-D, got {tuple(b_enc.shape)}, {tuple(b_dec.shape)}"
        )
    d_in, d_sae = int(b_dec.shape[0]), int(b_enc.shape[0])
    notes: list[str] = []
    W_enc = _orient("W_enc", tensors["W_enc"], (d_in, d_sae), source, notes)
    W_dec = _orient("W_dec", tensors["W_dec"], (d_sae, d_in), source, notes)

    k: int | None = None
    if "k" in tensors:
        k = scalar_int(tensors["k"], "k", source)
    elif "k" in meta:
        k = scalar_int(meta["k"], "k (metadata)", source)
    threshold = tensors.get("threshold")
    if threshold is not None and threshold.numel() == 1 and d_sae != 1:
        threshold = torch.full((d_sae,), float(threshold.reshape(()).item()))
    architecture = meta.get("architecture") or (
        "jumprelu" if threshold is not None else "topk" if k else "standard"
    )
    architecture = {"jump_relu": "jumprelu", "relu": "standard"}.get(architecture, architecture)
    if architecture == "jumprelu" and threshold is None:
        raise SAEFormatError(f"{source} says architecture jumprelu but holds no threshold tensor")
    if architecture == "topk" and k is None:
        raise SAEFormatError(
            f"{source} says architecture topk but gives no k (a scalar tensor or metadata 'k')"
        )

    fields: dict[str, Any] = {
        "apply_b_dec_to_input": parse_bool(
            meta.get("apply_b_dec_to_input", "true"), "apply_b_dec_to_input", source
        ),
        "normalize_activations": meta.get("normalize_activations", "none"),
        "rescale_acts_by_decoder_norm": parse_bool(
            meta.get("rescale_acts_by_decoder_norm", "false"), "rescale_acts_by_decoder_norm", source
        ),
    }
    if "norm_scaling_factor" in meta:
        try:
            factor = float(meta["norm_scaling_factor"])
        except ValueError as e:
            raise SAEFormatError(f"{source}: norm_scaling_factor metadata must be a number") from e
        if not math.isfinite(factor) or factor <= 0:
            raise SAEFormatError(f"{source}: norm_scaling_factor must be positive and finite, got {factor}")
        fields["norm_scaling_factor"] = factor
    metadata: dict[str, Any] = {"file_metadata": meta}
    if notes:
        metadata["orientation"] = notes
    return build_sae(
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        threshold=threshold if architecture == "jumprelu" else None,
        d_in=d_in,
        d_sae=d_sae,
        source=source,
        convention=CONVENTION,
        device=device,
        architecture=architecture,
        k=k if architecture == "topk" else None,
        hook_name=meta.get("hook_name"),
        model_name=meta.get("model_name"),
        format=NAME,
        metadata=metadata,
        **fields,
    )


def detect(spec: str) -> int:
    found = file_and_siblings(spec)
    return DETECT_PRIORITY if found and found[0].endswith(".safetensors") else 0


FORMAT = SAEFormat(
    name=NAME,
    files="one .safetensors file with W_enc, W_dec, b_enc, b_dec (+ threshold, k)",
    detect=detect,
    load=load,
    aliases=("plain_safetensors", "plain"),
)
