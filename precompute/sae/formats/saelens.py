"""SAELens directories: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``).

Reads both SAELens 6 configs (``architecture``, ``k``, ``metadata{model_name, hook_name, ...}``)
and pre-6 flat configs (``hook_point``, ``activation_fn_str``, ``activation_fn_kwargs.k``), as
SAELens' own ``handle_pre_6_0_config`` does, and writes SAELens 6 directories atomically.
Tensors follow SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
threshold [d_sae] for JumpReLU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from precompute.errors import SAEFormatError
from precompute.sae.base import SAE
from precompute.sae.format import SAEFormat, directory_names, file_and_siblings
from precompute.sae.formats import (
    build_sae,
    fold_scaling_factor,
    parse_bool,
    read_json,
    read_safetensors,
    require,
    scalar_int,
)

NAME = "saelens"
DETECT_PRIORITY = 80  # its file names win over every other format's
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
CONVENTION = "W_enc [d_in, d_sae] and W_dec [d_sae, d_in] (SAELens layout)"
# Written into metadata.sae_lens_version so SAELens does not re-run its pre-6 migration on our cfg.
V6_VERSION = "6.0.0"

_ARCHITECTURES = {
    "standard": "standard",
    "relu": "standard",
    "jumprelu": "jumprelu",
    "jump_relu": "jumprelu",
    "topk": "topk",
}
# SAELens 6 keys that live at the top level of cfg.json rather than in metadata.
_TOP_LEVEL = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "k",
    "rescale_acts_by_decoder_norm",
    "metadata",
    "norm_scaling_factor",
}
# SAELens' LLM_METADATA_KEYS: pre-6 flat keys that SAELens moves into metadata.
_PRE6_METADATA = (
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
)
# Metadata entries that are ours, not the cfg's: never written into cfg.json.
_INTERNAL_METADATA = {"sparsity"}


def _version_major(version: Any) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _architecture_and_k(flat: dict[str, Any], source: str) -> tuple[str, int | None]:
    """The architecture and, for TopK, k of a v6 or pre-6 cfg."""
    activation_fn = flat.get("activation_fn", flat.get("activation_fn_str"))
    fn_kwargs = flat.get("activation_fn_kwargs") or {}
    if not isinstance(fn_kwargs, dict):
        fn_kwargs = {}
    raw_arch = flat.get("architecture") or "standard"
    architecture = _ARCHITECTURES.get(str(raw_arch).lower())
    if architecture is None:
        raise SAEFormatError(
            f"{source}: SAELens architecture {raw_arch!r} is not supported here (only standard, jumprelu and "
            "topk SAEs: gated SAEs, transcoders and other variants do not have a single encoder we can map)"
        )
    k_value = flat.get("k", fn_kwargs.get("k"))
    if architecture == "standard" and activation_fn == "topk":
        architecture = "topk"  # pre-6: architecture "standard" + activation_fn_str "topk"
    elif activation_fn not in (None, "relu", "topk"):
        raise SAEFormatError(f"{source}: activation function {activation_fn!r} is not supported (relu, topk)")
    if architecture != "topk":
        return architecture, None
    if k_value is None:
        raise SAEFormatError(f"{source}: a TopK SAE config needs k (or activation_fn_kwargs.k)")
    return architecture, scalar_int(k_value, "k", source)


def _normalization(flat: dict[str, Any], source: str) -> tuple[str, float | None]:
    """normalize_activations and norm_scaling_factor of a v6 or pre-6 cfg."""
    normalize = flat.get("normalize_activations")
    if isinstance(normalize, bool):  # pre-6 boolean meant the April-update scaling
        normalize = "expected_average_only_in" if normalize else "none"
    normalize = normalize or "none"
    if normalize == "covariance_whitening":
        raise SAEFormatError(
            f"{source}: normalize_activations 'covariance_whitening' needs the whitening matrices; fold them "
            "into the weights with SAELens (sae.fold_activation_whitening) and save again"
        )
    factor = flat.get("norm_scaling_factor")
    if factor is not None:
        try:
            factor = float(factor)
        except (TypeError, ValueError) as e:
            raise SAEFormatError(f"{source}: norm_scaling_factor must be a number, got {factor!r}") from e
        if not math.isfinite(factor) or factor <= 0:
            raise SAEFormatError(
                f"{source}: norm_scaling_factor must be a positive finite number, got {factor}"
            )
    return normalize, factor


def parse_cfg(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Normalise a v6 or pre-6 cfg.json into SAE constructor fields (plus d_in/d_sae/finetuning)."""
    meta = cfg.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    flat = dict(cfg)
    if "hook_point" in flat and "hook_name" not in flat:  # pre-6 spelling
        flat["hook_name"] = flat["hook_point"]
    for key in _PRE6_METADATA:
        if key in flat and key not in meta:
            meta[key] = flat[key]
    architecture, k = _architecture_and_k(flat, source)
    normalize, factor = _normalization(flat, source)
    try:
        d_in, d_sae = scalar_int(flat["d_in"], "d_in", source), scalar_int(flat["d_sae"], "d_sae", source)
    except KeyError as e:
        raise SAEFormatError(f"{source}: cfg.json lacks {e.args[0]}") from e

    return {
        "d_in": d_in,
        "d_sae": d_sae,
        "architecture": architecture,
        "k": k,
        "apply_b_dec_to_input": parse_bool(
            flat.get("apply_b_dec_to_input", True), "apply_b_dec_to_input", source
        ),
        "normalize_activations": normalize,
        "norm_scaling_factor": factor,
        "rescale_acts_by_decoder_norm": parse_bool(
            flat.get("rescale_acts_by_decoder_norm", False), "rescale_acts_by_decoder_norm", source
        ),
        "hook_name": meta.get("hook_name"),
        "model_name": meta.get("model_name"),
        "metadata": meta,
        "finetuning_scaling_factor": bool(flat.get("finetuning_scaling_factor", False)),
    }


def resolve_dir(path: str | Path) -> Path:
    """Accept the directory or any file inside it (cfg.json, sae_weights.safetensors)."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise SAEFormatError(f"SAELens directory {path} does not exist")
    return p


def load(path: str, device: str = "cpu") -> SAE:
    """Load a SAELens directory into the internal SAE."""
    directory = resolve_dir(path)
    source = str(directory)
    cfg = read_json(directory / CFG_FILENAME)
    fields = parse_cfg(cfg, source)
    tensors, _ = read_safetensors(directory / WEIGHTS_FILENAME)
    if "log_threshold" in tensors and "threshold" not in tensors:  # older JumpReLU checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").float().exp()
    tensors = fold_scaling_factor(tensors, fields.pop("finetuning_scaling_factor"), source)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (
        ["threshold"] if fields["architecture"] == "jumprelu" else []
    )
    require(tensors, names, f"{directory / WEIGHTS_FILENAME}", NAME)
    if any(key in tensors for key in ("b_gate", "b_mag", "r_mag")):
        raise SAEFormatError(
            f"{source} holds gated-SAE tensors (b_gate/b_mag/r_mag); gated SAEs are not supported"
        )

    sparsity_path = directory / SPARSITY_FILENAME
    if sparsity_path.exists():
        sparse_tensors, _ = read_safetensors(sparsity_path)
        if "sparsity" in sparse_tensors:
            fields["metadata"]["sparsity"] = sparse_tensors["sparsity"].float()

    return build_sae(
        W_enc=tensors["W_enc"],
        b_enc=tensors["b_enc"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        threshold=tensors.get("threshold") if fields["architecture"] == "jumprelu" else None,
        source=source,
        convention=CONVENTION,
        device=device,
        format=NAME,
        **fields,
    )


def detect(spec: str) -> int:
    """A directory with cfg.json + sae_weights.safetensors, or one of its files."""
    own = {CFG_FILENAME, WEIGHTS_FILENAME}
    names = directory_names(spec)
    if names is not None:
        return DETECT_PRIORITY if own <= names else 0
    found = file_and_siblings(spec)
    if found and found[0] in (*own, SPARSITY_FILENAME) and own <= found[1]:
        return DETECT_PRIORITY
    return 0


FORMAT = SAEFormat(
    name=NAME,
    files="a directory with cfg.json + sae_weights.safetensors (+ sparsity.safetensors)",
    detect=detect,
    load=load,
    aliases=("sae_lens", "sae-lens"),
)


# --------------------------------------------------------------------------------------- writer
def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def build_cfg(sae: SAE, extra_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SAELens 6 cfg.json for ``sae`` (``extra_cfg`` merged in at the top level)."""
    metadata = {k: v for k, v in sae.metadata.items() if k not in _INTERNAL_METADATA and _json_safe(v)}
    metadata["model_name"] = sae.model_name
    metadata["hook_name"] = sae.hook_name
    major = _version_major(metadata.get("sae_lens_version"))
    if major is None or major < 6:
        metadata["sae_lens_version"] = V6_VERSION
    dtype = str(sae.W_dec.dtype).replace("torch.", "")
    cfg: dict[str, Any] = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input),
        "normalize_activations": sae.normalize_activations,
        "reshape_activations": "none",
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.top_k
        cfg["rescale_acts_by_decoder_norm"] = bool(sae.rescale_acts_by_decoder_norm)
    elif sae.rescale_acts_by_decoder_norm and not torch.allclose(
        sae.W_dec.norm(dim=1),
        torch.ones(sae.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device),
        atol=1e-5,
    ):  # with unit decoder rows the flag is a no-op and can be dropped
        raise SAEFormatError(
            f"rescale_acts_by_decoder_norm on a {sae.architecture} SAE has no SAELens cfg equivalent; "
            "call sae.fold_decoder_norm() first (it keeps encode() and reconstructions)"
        )
    if sae.norm_scaling_factor is not None:
        # SAELens itself folds this factor only for registry releases; our loader reads it back.
        cfg["norm_scaling_factor"] = float(sae.norm_scaling_factor)
    if extra_cfg:
        clash = set(extra_cfg) & (_TOP_LEVEL - {"metadata"})
        if clash:
            raise SAEFormatError(
                f"extra_cfg may not override {', '.join(sorted(clash))}; they come from the SAE"
            )
        for key, value in extra_cfg.items():
            if key == "metadata":
                if not isinstance(value, dict):
                    raise SAEFormatError(
                        "extra_cfg['metadata'] must be a dict (it is merged into cfg metadata)"
                    )
                metadata = {**metadata, **value}
            else:
                cfg[key] = value
    cfg["metadata"] = metadata
    if not _json_safe(cfg):
        raise SAEFormatError("extra_cfg must be JSON-serialisable")
    return cfg


def save_saelens(
    sae: SAE,
    directory: str | Path,
    extra_cfg: dict[str, Any] | None = None,
    sparsity: torch.Tensor | None = None,
) -> Path:
    """Write ``sae`` as a SAELens 6 directory that SAELens and ``load`` both read.

    Atomic: a new directory is assembled under a temporary name and renamed into place; an
    existing directory gets each file through a temporary file and ``os.replace``, cfg.json last,
    so a reader never sees new weights with an old config. A stale sparsity file is removed.
    """
    from safetensors.torch import save_file

    sae.validate()
    directory = Path(directory)
    if sparsity is None and isinstance(sae.metadata.get("sparsity"), torch.Tensor):
        sparsity = sae.metadata["sparsity"]
    if sparsity is not None and tuple(sparsity.shape) != (sae.d_sae,):
        raise SAEFormatError(f"sparsity must have shape [d_sae={sae.d_sae}], got {tuple(sparsity.shape)}")
    cfg = build_cfg(sae, extra_cfg)
    tensors = {
        "W_enc": sae.W_enc,
        "b_enc": sae.b_enc,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    if sae.architecture == "jumprelu" and sae.threshold is not None:  # validate() requires it
        tensors["threshold"] = sae.threshold
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write_all(target: Path, suffix: str = "") -> list[tuple[Path, Path]]:
        """Write the files into ``target`` (with ``suffix``); return (written, final) pairs."""
        pairs = []
        weights = target / (WEIGHTS_FILENAME + suffix)
        save_file(tensors, str(weights), metadata={"format": "pt"})
        pairs.append((weights, target / WEIGHTS_FILENAME))
        if sparsity is not None:
            sp = target / (SPARSITY_FILENAME + suffix)
            save_file({"sparsity": sparsity.detach().cpu().float().contiguous()}, str(sp))
            pairs.append((sp, target / SPARSITY_FILENAME))
        cfg_path = target / (CFG_FILENAME + suffix)
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        pairs.append((cfg_path, target / CFG_FILENAME))
        return pairs

    directory.parent.mkdir(parents=True, exist_ok=True)
    if not directory.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            write_all(tmp)
            os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    if not directory.is_dir():
        raise SAEFormatError(f"{directory} exists and is not a directory")
    suffix = f".tmp-{os.getpid()}"
    pairs: list[tuple[Path, Path]] = []
    try:
        pairs = write_all(directory, suffix)
        for written, final in pairs:  # weights first, cfg.json last
            os.replace(written, final)
    except BaseException:
        for written, _ in pairs:
            written.unlink(missing_ok=True)
        for name in (WEIGHTS_FILENAME, SPARSITY_FILENAME, CFG_FILENAME):
            (directory / (name + suffix)).unlink(missing_ok=True)
        raise
    if sparsity is None:
        (directory / SPARSITY_FILENAME).unlink(missing_ok=True)
    return directory
