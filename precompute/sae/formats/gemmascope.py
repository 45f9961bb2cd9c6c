"""Gemma Scope SAEs: v1 ``params.npz`` and Gemma Scope 2 ``params.safetensors`` + ``config.json``.

Both are JumpReLU SAEs that do not subtract b_dec from the input (apply_b_dec_to_input=False),
stored in the SAELens layout: W_enc [d_in, d_sae], W_dec [d_sae, d_in].

* v1 (``google/gemma-scope-{2b,9b,27b}-pt-{res,mlp,att}/layer_L/width_W/average_l0_N/params.npz``)
  has no config; layer, width and hook are parsed from the path when it follows that layout.
* Gemma Scope 2 (``.../{resid_post,attn_out,mlp_out}/layer_L_width_W_l0_X/params.safetensors``).
  Its tensor names come from third-party notes (lowercase ``w_enc``/``w_dec``/``b_enc``/``b_dec``/
  ``threshold``, also what SAELens' ``gemma_3_sae_huggingface_loader`` reads) and have not been
  checked against the released files here, so both ``W_*`` and ``w_*`` spellings are accepted.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from precompute.errors import SAEFormatError
from precompute.sae.base import SAE
from precompute.sae.format import SAEFormat, directory_names, file_and_siblings
from precompute.sae.formats import (
    build_sae,
    float_dtype,
    fold_scaling_factor,
    parse_layer,
    read_json,
    read_safetensors,
    rename_lowercase,
    require,
)

NAME = "gemmascope"
NAME_V2 = "gemmascope2"
# Detection priorities (see precompute.sae.format): below SAELens and sparsify file names, above
# dictionary_learning (a v2 folder's config.json must not read as a dictionary_learning config).
PRIORITY_V1, PRIORITY_V2 = 60, 50
NPZ_FILENAME = "params.npz"
SAFETENSORS_FILENAME = "params.safetensors"
CONFIG_FILENAME = "config.json"
CONVENTION = "W_enc [d_in, d_sae] and W_dec [d_sae, d_in] (keys W_* or lowercase w_*)"
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

# The width_* folder names SAELens maps to d_sae.
_WIDTHS = {
    "4k": 4096,
    "16k": 16384,
    "32k": 32768,
    "65k": 65536,
    "131k": 131072,
    "262k": 262144,
    "524k": 524288,
    "1m": 1048576,
}
_MODELS = {"2b": "gemma-2-2b", "9b": "gemma-2-9b", "27b": "gemma-2-27b"}


def _resolve(path: str | Path, filename: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        raise SAEFormatError(f"missing Gemma Scope weights file {p}")
    return p


def parse_v1_path(path: Path) -> dict[str, object]:
    """Layer, width, L0, model and hook from a Gemma Scope v1 path (each None when absent)."""
    text = path.as_posix()
    info: dict[str, object] = {"layer": parse_layer(text)}
    width = re.search(r"width_(\d+[km]?)", text)
    info["width"] = _WIDTHS.get(width.group(1)) if width else None
    if width and info["width"] is None and width.group(1).isdigit():
        info["width"] = int(width.group(1))
    l0 = re.search(r"average_l0_(\d+)", text)
    info["average_l0"] = int(l0.group(1)) if l0 else None
    repo = re.search(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)", text)
    info["model_name"] = None
    info["hook_name"] = None
    if repo:
        size, variant, site = repo.groups()
        info["model_name"] = _MODELS[size] + ("-it" if variant == "it" else "")
        layer = info["layer"]
        if site == "res" and "embedding" in text:
            info["hook_name"] = "hook_embed"
        elif layer is not None:
            info["hook_name"] = {
                "res": f"blocks.{layer}.hook_resid_post",
                "mlp": f"blocks.{layer}.hook_mlp_out",
                "att": f"blocks.{layer}.attn.hook_z",
            }[site]
    return info


def load(path: str, device: str = "cpu") -> SAE:
    """Load a Gemma Scope v1 ``params.npz`` (a directory holding it, or the file)."""
    file = _resolve(path, NPZ_FILENAME)
    source = str(file)
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise SAEFormatError(
            f"{file} is not a readable .npz archive ({type(e).__name__}: {e}); it may be truncated or corrupt"
        ) from e
    try:
        tensors = {key: torch.from_numpy(np.ascontiguousarray(a)) for key, a in arrays.items()}
    except TypeError as e:
        raise SAEFormatError(f"{file} holds a non-numeric array ({e})") from e
    tensors = rename_lowercase(tensors)
    require(tensors, TENSOR_NAMES, source, NAME)
    # Gemma Scope has no config to flag a finetuning scaling factor, so a non-trivial one is refused.
    tensors = fold_scaling_factor(tensors, finetuning=False, source=source)
    d_in, d_sae = int(tensors["b_dec"].shape[0]), int(tensors["b_enc"].shape[0])

    info = parse_v1_path(file.resolve())
    if info["width"] is not None and info["width"] != d_sae:
        raise SAEFormatError(
            f"{file}: the path says width {info['width']} but the weights have d_sae={d_sae}; "
            "the file does not belong to this folder"
        )
    dtype = float_dtype([tensors[n] for n in TENSOR_NAMES])
    W_enc, W_dec = tensors["W_enc"].to(dtype), tensors["W_dec"].to(dtype)
    if "embedding" in file.as_posix() and info["model_name"] is not None:
        # As SAELens does: embedding SAEs were trained on embeddings scaled by sqrt(d_model).
        W_enc, W_dec = W_enc / math.sqrt(d_in), W_dec * math.sqrt(d_in)
    metadata = {k: v for k, v in info.items() if v is not None}
    metadata["license"] = "CC-BY-NC-4.0 (Gemma Scope weights)"
    return build_sae(
        W_enc=W_enc,
        b_enc=tensors["b_enc"],
        W_dec=W_dec,
        b_dec=tensors["b_dec"],
        threshold=tensors["threshold"],
        d_in=d_in,
        d_sae=d_sae,
        source=source,
        convention=CONVENTION,
        device=device,
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        hook_name=info["hook_name"],
        model_name=info["model_name"],
        format=NAME,
        metadata=metadata,
    )


def _v2_hook(folder: str, hf_hook: str | None, layer: int | None) -> str | None:
    """SAELens hook name for a Gemma Scope 2 site (as SAELens' gemma_3 loader maps them)."""
    if layer is None and hf_hook:
        layer = parse_layer(hf_hook)
    if layer is None:
        return None
    site = folder
    if hf_hook and not any(s in folder for s in ("resid_post", "attn_out", "mlp_out")):
        if hf_hook.endswith(f"layers.{layer}.output"):
            site = "resid_post"
        elif "o_proj" in hf_hook:
            site = "attn_out"
        elif "feedforward" in hf_hook:
            site = "mlp_out"
    if "resid_post" in site:
        return f"blocks.{layer}.hook_resid_post"
    if "attn_out" in site:
        return f"blocks.{layer}.attn.hook_z"
    if "mlp_out" in site:
        return f"blocks.{layer}.hook_mlp_out"
    return None


def load_v2(path: str, device: str = "cpu") -> SAE:
    """Load a Gemma Scope 2 folder (``params.safetensors`` + ``config.json``)."""
    file = _resolve(path, SAFETENSORS_FILENAME)
    source = str(file)
    config_path = file.parent / CONFIG_FILENAME
    config = read_json(config_path) if config_path.exists() else {}
    arch = str(config.get("architecture", "jump_relu")).lower()
    if arch not in ("jump_relu", "jumprelu"):
        raise SAEFormatError(f"{config_path}: architecture {arch!r} is not a JumpReLU SAE")
    folder = file.parent.as_posix()
    if (
        config.get("hf_hook_point_out")
        or config.get("affine_connection")
        or "transcoder" in folder
        or "/clt" in folder
    ):
        raise SAEFormatError(
            f"{file} is a Gemma Scope 2 transcoder (it reads one hook and writes another); only SAEs are supported"
        )
    tensors, _ = read_safetensors(file)
    tensors = rename_lowercase(tensors)
    if "affine_skip_connection" in tensors or "W_skip" in tensors:
        raise SAEFormatError(f"{file} has a skip connection (a skip transcoder); only SAEs are supported")
    require(tensors, TENSOR_NAMES, source, NAME_V2)
    tensors = fold_scaling_factor(tensors, finetuning=False, source=source)
    d_in, d_sae = int(tensors["b_dec"].shape[0]), int(tensors["b_enc"].shape[0])

    layer = (
        parse_layer(file.parent.name) if parse_layer(file.parent.name) is not None else parse_layer(folder)
    )
    hf_hook = config.get("hf_hook_point_in")
    model_name = config.get("model_name")
    if isinstance(model_name, str):
        # SAELens' normalisation: gemma-v3-* -> google/gemma-3-*.
        model_name = model_name.replace("-v3", "-3")
        if "/" not in model_name:
            model_name = "google/" + model_name
    metadata = {"config": config, "layer": layer, "license": "see the Gemma Scope 2 model card"}
    if hf_hook:
        metadata["hf_hook_name"] = hf_hook
    return build_sae(
        W_enc=tensors["W_enc"],
        b_enc=tensors["b_enc"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        threshold=tensors["threshold"],
        d_in=d_in,
        d_sae=d_sae,
        source=source,
        convention=CONVENTION,
        device=device,
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        hook_name=_v2_hook(folder, hf_hook, layer),
        model_name=model_name,
        format=NAME_V2,
        metadata=metadata,
    )


def detect(spec: str) -> int:
    """Gemma Scope v1: a directory holding params.npz, or any .npz file."""
    names = directory_names(spec)
    if names is not None:
        return PRIORITY_V1 if NPZ_FILENAME in names else 0
    found = file_and_siblings(spec)
    return PRIORITY_V1 if found and found[0].endswith(".npz") else 0


def detect_v2(spec: str) -> int:
    """Gemma Scope 2: a directory holding params.safetensors, that file, or the config.json beside it.

    params.safetensors is Gemma Scope 2's name; its config.json is optional to the loader, and a
    plain-safetensors guess would silently get apply_b_dec_to_input wrong for these JumpReLU SAEs."""
    names = directory_names(spec)
    if names is not None:
        return PRIORITY_V2 if SAFETENSORS_FILENAME in names else 0
    found = file_and_siblings(spec)
    if found is None:
        return 0
    name, siblings = found
    if name == SAFETENSORS_FILENAME or (name == CONFIG_FILENAME and SAFETENSORS_FILENAME in siblings):
        return PRIORITY_V2
    return 0


FORMAT = SAEFormat(
    name=NAME,
    files="Gemma Scope v1 params.npz (or its directory)",
    detect=detect,
    load=load,
    aliases=("gemma_scope", "gemma-scope", "gemmascope1"),
)
FORMAT_V2 = SAEFormat(
    name=NAME_V2,
    files="Gemma Scope 2 params.safetensors + config.json (or their directory)",
    detect=detect_v2,
    load=load_v2,
    aliases=("gemma_scope_2", "gemma-scope-2"),
)
