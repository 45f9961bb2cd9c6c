"""``release:RELEASE_ID/SAE_ID``: a SAELens registry release, fetched through the optional sae-lens package.

The split is at the first ``/``: release ids have none, SAE ids often do
(``release:gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical``). SAELens resolves the
release to a Hugging Face repo, downloads it, applies its own conversion and folds any
``norm_scaling_factor`` from its registry; the result is converted to our SAE here.
"""

from __future__ import annotations

from typing import Any

import torch

from precompute.errors import SAEFormatError
from precompute.sae.base import SAE
from precompute.sae.format import SAEFormat
from precompute.sae.formats import build_sae

NAME = "release"
DETECT_PRIORITY = 100  # the spec's prefix names the format; it is not a path
PREFIX = "release:"
CONVENTION = "SAELens module parameters W_enc [d_in, d_sae] and W_dec [d_sae, d_in]"
_HOW_TO_FIX = (
    "install it with `pip install sae-lens` (or `pip install featuregeom[saelens]`) and be online for the first "
    "download, or download the SAELens directory (cfg.json + sae_weights.safetensors) yourself and pass its path"
)


def parse_spec(spec: str) -> tuple[str, str]:
    """``release:RELEASE/SAE_ID`` -> (RELEASE, SAE_ID)."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    release, sep, sae_id = body.partition("/")
    if not release or not sep or not sae_id:
        raise SAEFormatError(
            f"release spec {spec!r} must look like 'release:RELEASE_ID/SAE_ID', e.g. "
            "'release:gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical'"
        )
    return release, sae_id


def from_saelens_object(obj: Any, source: str = "", device: str = "cpu") -> SAE:
    """Convert an ``sae_lens.SAE`` (v6) instance to our SAE."""
    cfg = obj.cfg
    arch_attr = getattr(cfg, "architecture", "standard")
    architecture = arch_attr() if callable(arch_attr) else arch_attr
    if architecture not in ("standard", "jumprelu", "topk"):
        raise SAEFormatError(
            f"{source}: SAELens architecture {architecture!r} is not supported here (standard, jumprelu, topk)"
        )
    meta_obj = getattr(cfg, "metadata", None)
    if meta_obj is not None and hasattr(meta_obj, "to_dict"):
        metadata = dict(meta_obj.to_dict())
    elif isinstance(meta_obj, dict):
        metadata = dict(meta_obj)
    else:
        metadata = {}
    normalize = getattr(cfg, "normalize_activations", "none") or "none"

    def tensor(name: str) -> torch.Tensor | None:
        value = getattr(obj, name, None)
        return value.detach().cpu() if isinstance(value, torch.Tensor) else None

    W_dec = tensor("W_dec")
    if W_dec is None:
        raise SAEFormatError(f"{source}: the SAELens object has no W_dec")
    return build_sae(
        W_enc=tensor("W_enc"),
        b_enc=tensor("b_enc"),
        W_dec=W_dec,
        b_dec=tensor("b_dec"),
        threshold=tensor("threshold") if architecture == "jumprelu" else None,
        d_in=int(cfg.d_in),
        d_sae=int(cfg.d_sae),
        source=source,
        convention=CONVENTION,
        device=device,
        architecture=architecture,
        k=int(cfg.k) if architecture == "topk" else None,
        apply_b_dec_to_input=bool(getattr(cfg, "apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        rescale_acts_by_decoder_norm=bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)),
        hook_name=metadata.get("hook_name"),
        model_name=metadata.get("model_name"),
        format=NAME,
        metadata=metadata,
    )


def load(path: str, device: str = "cpu") -> SAE:
    """Fetch ``release:RELEASE/SAE_ID`` with SAELens and convert it."""
    release, sae_id = parse_spec(path)
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError as e:
        raise SAEFormatError(
            f"loading {path!r} needs the optional sae-lens package, which is not installed; {_HOW_TO_FIX}"
        ) from e
    try:
        obj = SAELensSAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:
        if type(e) is ValueError:  # unknown release / SAE id: SAELens lists the valid ones
            raise SAEFormatError(f"SAELens does not know {path!r}: {e}") from e
        # Network, Hugging Face hub, or nothing cached while offline.
        raise SAEFormatError(
            f"SAELens could not fetch {path!r} ({type(e).__name__}: {e}); you may be offline. {_HOW_TO_FIX}"
        ) from e
    if isinstance(obj, tuple):  # SAELens < 6 returned (sae, cfg_dict, sparsity)
        obj = obj[0]
    return from_saelens_object(obj, source=path, device=device)


def detect(spec: str) -> int:
    return DETECT_PRIORITY if spec.startswith(PREFIX) else 0


FORMAT = SAEFormat(
    name=NAME,
    files="'release:RELEASE_ID/SAE_ID' (needs the sae-lens package and, once, the network)",
    detect=detect,
    load=load,
    local_path=lambda spec: None,
)
