"""EleutherAI sparsify checkpoints: ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``.

``cfg.json`` is a ``SparseCoderConfig`` (activation, expansion_factor, normalize_decoder,
num_latents, k, multi_topk, skip_connection, transcode) plus ``d_in``. Weights are
``encoder.weight`` [num_latents, d_in] (nn.Linear layout), ``encoder.bias`` [num_latents],
``W_dec`` [num_latents, d_in] (already one row per latent: no transpose) and ``b_dec`` [d_in].

sparsify encodes ``topk(relu(encoder(x - b_dec)))``: the k largest post-ReLU values. Choosing the
top k before the ReLU (SAELens' TopK, our ``SAE.encode``) yields the same dense output, so it maps
to architecture ``topk`` with apply_b_dec_to_input=True. SAELens' own sparsify loader derives
apply_b_dec_to_input from normalize_decoder and transposes W_dec; we follow sparsify's code instead.

A path may be the hookpoint directory, a run directory holding exactly one hookpoint directory,
or ``run_dir:hookpoint`` to pick one of several.
"""

from __future__ import annotations

import re
from pathlib import Path

from precompute.errors import SAEFormatError
from precompute.sae.base import SAE
from precompute.sae.format import SAEFormat, directory_names, file_and_siblings
from precompute.sae.formats import (
    build_sae,
    parse_bool,
    read_json,
    read_safetensors,
    require,
    scalar_int,
)

NAME = "sparsify"
# Detection priorities (see precompute.sae.format): 'run_dir:hookpoint' names the format outright;
# cfg.json + sae.safetensors rank just below SAELens' files; a run directory (hookpoint
# subdirectories only) is the weakest clue, below every other format's own file names.
SPEC_PRIORITY, FILES_PRIORITY, RUN_DIR_PRIORITY = 90, 70, 30
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
CONVENTION = "encoder.weight [num_latents, d_in] (transposed on load) and W_dec [num_latents, d_in]"


def is_hookpoint_dir(p: Path) -> bool:
    return (p / CFG_FILENAME).is_file() and (p / WEIGHTS_FILENAME).is_file()


def hookpoint_dirs(p: Path) -> list[Path]:
    """Subdirectories of a sparsify run directory that hold a sparse coder."""
    if not p.is_dir():
        return []
    return sorted(c for c in p.iterdir() if c.is_dir() and is_hookpoint_dir(c))


def split_spec(spec: str) -> tuple[str, str | None]:
    """``dir:hookpoint`` -> (dir, hookpoint) when dir exists; otherwise (spec, None)."""
    if ":" in spec and not Path(spec).exists():
        base, _, hookpoint = spec.rpartition(":")
        if base and hookpoint and Path(base).exists():
            return base, hookpoint
    return spec, None


def resolve_dir(spec: str) -> Path:
    """The hookpoint directory a spec points to."""
    base, hookpoint = split_spec(spec)
    p = Path(base)
    if p.is_file():
        p = p.parent
    if not p.exists():
        raise SAEFormatError(f"sparsify path {base} does not exist")
    if hookpoint is not None:
        chosen = p / hookpoint
        if not is_hookpoint_dir(chosen):
            found = ", ".join(c.name for c in hookpoint_dirs(p)) or "none"
            raise SAEFormatError(
                f"{p} has no sparsify hookpoint {hookpoint!r} (cfg.json + sae.safetensors); hookpoints there: {found}"
            )
        return chosen
    if is_hookpoint_dir(p):
        return p
    subdirs = hookpoint_dirs(p)
    if len(subdirs) == 1:
        return subdirs[0]
    if not subdirs:
        raise SAEFormatError(
            f"{p} is not a sparsify checkpoint: expected cfg.json + sae.safetensors in it or in one hookpoint subdirectory"
        )
    names = ", ".join(c.name for c in subdirs)
    raise SAEFormatError(
        f"{p} holds {len(subdirs)} sparsify hookpoints ({names}); pick one with '{p}:<hookpoint>', e.g. '{p}:{subdirs[0].name}'"
    )


def _hook_name(hookpoint: str) -> str:
    """Map sparsify module paths onto the SAELens hook names this project resolves."""
    m = re.fullmatch(r"(?:.*\.)?(?:layers|h|blocks)\.(\d+)", hookpoint)
    if m:
        return f"blocks.{m.group(1)}.hook_resid_post"
    m = re.fullmatch(r"(?:.*\.)?(?:layers|h|blocks)\.(\d+)\.(mlp|self_attn|attn|attention)", hookpoint)
    if m:
        site = "hook_mlp_out" if m.group(2) == "mlp" else "hook_attn_out"
        return f"blocks.{m.group(1)}.{site}"
    if hookpoint.endswith("embed_tokens") or hookpoint == "embed_in":
        return "hook_embed"
    return hookpoint


def load(path: str, device: str = "cpu") -> SAE:
    """Load one sparsify sparse coder (see the module docstring for accepted paths)."""
    directory = resolve_dir(str(path))
    source = str(directory)
    cfg = read_json(directory / CFG_FILENAME)
    if parse_bool(cfg.get("transcode", False), "transcode", source):
        raise SAEFormatError(f"{source} is a sparsify transcoder (transcode: true); only SAEs are supported")
    if parse_bool(cfg.get("skip_connection", False), "skip_connection", source):
        raise SAEFormatError(
            f"{source} has a skip connection (skip_connection: true); only plain SAEs are supported"
        )
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAEFormatError(f"{source}: sparsify activation {activation!r} is not supported (only topk)")
    if parse_bool(cfg.get("signed", False), "signed", source):
        raise SAEFormatError(f"{source}: signed sparsify SAEs are not supported")
    for flag in ("matching_pursuit", "slice_encoder", "slice_decoder"):
        if cfg.get(flag):
            raise SAEFormatError(f"{source}: sparsify option {flag} is not supported")

    tensors, _ = read_safetensors(directory / WEIGHTS_FILENAME)
    if "W_skip" in tensors:
        raise SAEFormatError(f"{source} holds W_skip (a skip connection); only plain SAEs are supported")
    require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), source, NAME)
    enc = tensors["encoder.weight"]
    if enc.ndim != 2:
        raise SAEFormatError(
            f"encoder.weight in {source} must be 2-D [num_latents, d_in], got {tuple(enc.shape)}"
        )
    d_in = scalar_int(cfg["d_in"], "d_in", source) if "d_in" in cfg else int(enc.shape[1])
    num_latents = scalar_int(cfg.get("num_latents", 0) or 0, "num_latents", source)
    if num_latents == 0:
        num_latents = d_in * scalar_int(cfg.get("expansion_factor", 32), "expansion_factor", source)
    if tuple(enc.shape) != (num_latents, d_in):
        raise SAEFormatError(
            f"encoder.weight in {source} has shape {tuple(enc.shape)}, expected [num_latents={num_latents}, "
            f"d_in={d_in}] from cfg.json"
        )
    k = scalar_int(cfg.get("k", 32), "k", source)
    hookpoint = directory.name
    metadata = {"hookpoint": hookpoint, "sparsify_cfg": cfg}
    run_config = directory.parent / "config.json"
    model_name = None
    if run_config.is_file():
        run = read_json(run_config)
        model_name = run.get("model") if isinstance(run.get("model"), str) else None
    return build_sae(
        W_enc=enc.T,
        b_enc=tensors["encoder.bias"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        d_in=d_in,
        d_sae=num_latents,
        source=source,
        convention=CONVENTION,
        device=device,
        architecture="topk",
        k=k,
        apply_b_dec_to_input=True,
        hook_name=_hook_name(hookpoint),
        model_name=model_name,
        format=NAME,
        metadata=metadata,
    )


def detect(spec: str) -> int:
    """'run_dir:hookpoint', a hookpoint directory (or one of its two files), or a run directory."""
    if split_spec(spec)[1] is not None:
        return SPEC_PRIORITY
    own = {CFG_FILENAME, WEIGHTS_FILENAME}
    names = directory_names(spec)
    if names is not None:
        if own <= names:
            return FILES_PRIORITY
        return RUN_DIR_PRIORITY if hookpoint_dirs(Path(spec)) else 0
    found = file_and_siblings(spec)
    return FILES_PRIORITY if found and found[0] in own and own <= found[1] else 0


FORMAT = SAEFormat(
    name=NAME,
    files="a hookpoint directory with cfg.json + sae.safetensors, a run directory holding one, "
    "or 'run_dir:hookpoint'",
    detect=detect,
    load=load,
    local_path=lambda spec: split_spec(spec)[0],
)
