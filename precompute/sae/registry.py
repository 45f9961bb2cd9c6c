"""Format name -> loader, format detection from a path, and the one entry point ``load_sae``.

Loaders live in ``precompute.sae.formats`` (one module per format) and know nothing of the model;
``check_compatible`` is the single place that compares an SAE with the model it will read from.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from precompute.errors import FeatureGeomError, SAEFormatError, ShapeMismatchError
from precompute.provenance import hash_path
from precompute.sae.base import SAE
from precompute.sae.formats import (
    dictionary_learning,
    gemmascope,
    plain_safetensors,
    release,
    saelens,
    sparsify,
)

Loader = Callable[..., SAE]

FORMATS: dict[str, Loader] = {
    "saelens": saelens.load,
    "sparsify": sparsify.load,
    "gemmascope": gemmascope.load,
    "gemmascope2": gemmascope.load_v2,
    "dictionary_learning": dictionary_learning.load,
    "safetensors": plain_safetensors.load,
    "release": release.load,
}

# What each format expects on disk; shown whenever a format is unknown or cannot be detected.
FORMAT_FILES: dict[str, str] = {
    "saelens": "a directory with cfg.json + sae_weights.safetensors (+ sparsity.safetensors)",
    "sparsify": "a hookpoint directory with cfg.json + sae.safetensors, a run directory holding one, "
    "or 'run_dir:hookpoint'",
    "gemmascope": "Gemma Scope v1 params.npz (or its directory)",
    "gemmascope2": "Gemma Scope 2 params.safetensors + config.json (or their directory)",
    "dictionary_learning": "dictionary_learning ae.pt (+ config.json), or its directory",
    "safetensors": "one .safetensors file with W_enc, W_dec, b_enc, b_dec (+ threshold, k)",
    "release": "'release:RELEASE_ID/SAE_ID' (needs the sae-lens package and, once, the network)",
}

ALIASES: dict[str, str] = {
    "sae_lens": "saelens",
    "sae-lens": "saelens",
    "gemma_scope": "gemmascope",
    "gemma-scope": "gemmascope",
    "gemmascope1": "gemmascope",
    "gemma_scope_2": "gemmascope2",
    "gemma-scope-2": "gemmascope2",
    "dictionary-learning": "dictionary_learning",
    "dictionary_learning": "dictionary_learning",
    "plain_safetensors": "safetensors",
    "plain": "safetensors",
}


def supported_formats() -> str:
    """One line per format: its name and the files it expects."""
    return "\n".join(f"  {name}: {FORMAT_FILES[name]}" for name in FORMATS)


def _canonical(fmt: str) -> str:
    name = ALIASES.get(fmt.strip().lower(), fmt.strip().lower())
    if name not in FORMATS:
        raise SAEFormatError(f"unknown SAE format {fmt!r}; supported formats:\n{supported_formats()}")
    return name


def detect_format(path: str) -> str:
    """Pick the format from the path alone (file names and layout), never from file contents."""
    spec = os.fspath(path)
    if spec.startswith(release.PREFIX):
        return "release"
    _, hookpoint = sparsify.split_spec(spec)
    if hookpoint is not None:
        return "sparsify"
    p = Path(spec)
    if not p.exists():
        raise SAEFormatError(
            f"SAE path {spec} does not exist (for a SAELens registry SAE use 'release:RELEASE_ID/SAE_ID')"
        )
    if p.is_dir():
        names = {c.name for c in p.iterdir()}
        if {saelens.CFG_FILENAME, saelens.WEIGHTS_FILENAME} <= names:
            return "saelens"
        if {sparsify.CFG_FILENAME, sparsify.WEIGHTS_FILENAME} <= names:
            return "sparsify"
        if gemmascope.NPZ_FILENAME in names:
            return "gemmascope"
        if gemmascope.SAFETENSORS_FILENAME in names:
            return "gemmascope2"
        if dictionary_learning.WEIGHTS_FILENAME in names:
            return "dictionary_learning"
        if sparsify.hookpoint_dirs(p):
            return "sparsify"
        found = ", ".join(sorted(names)[:12]) or "nothing"
        raise SAEFormatError(
            f"cannot tell the SAE format of directory {p} (it holds: {found}); expected one of:\n{supported_formats()}"
        )
    name, siblings = p.name, {c.name for c in p.parent.iterdir()}
    if (
        name in (saelens.CFG_FILENAME, saelens.WEIGHTS_FILENAME, saelens.SPARSITY_FILENAME)
        and {
            saelens.CFG_FILENAME,
            saelens.WEIGHTS_FILENAME,
        }
        <= siblings
    ):
        return "saelens"
    if (
        name in (sparsify.CFG_FILENAME, sparsify.WEIGHTS_FILENAME)
        and {
            sparsify.CFG_FILENAME,
            sparsify.WEIGHTS_FILENAME,
        }
        <= siblings
    ):
        return "sparsify"
    if name.endswith(".npz"):
        return "gemmascope"
    # params.safetensors is Gemma Scope 2's name; its config.json is optional to the loader, and a
    # plain-safetensors guess would silently get apply_b_dec_to_input wrong for these JumpReLU SAEs.
    if name == gemmascope.SAFETENSORS_FILENAME or (
        name == gemmascope.CONFIG_FILENAME and gemmascope.SAFETENSORS_FILENAME in siblings
    ):
        return "gemmascope2"
    if name.endswith((".pt", ".pth")) or (
        name == dictionary_learning.CONFIG_FILENAME and dictionary_learning.WEIGHTS_FILENAME in siblings
    ):
        return "dictionary_learning"
    if name.endswith(".safetensors"):
        return "safetensors"
    raise SAEFormatError(f"cannot tell the SAE format of file {p}; expected one of:\n{supported_formats()}")


def load_sae(spec: str, format: str | None = None, device: str = "cpu") -> SAE:
    """Load any supported SAE into the internal representation, or raise SAEFormatError.

    Every failure, including ones raised inside torch/numpy/safetensors, comes out as a
    FeatureGeomError with a message naming the file, so the CLI never prints a library traceback.
    """
    spec = os.fspath(spec)
    fmt = _canonical(format) if format else detect_format(spec)
    if fmt != "release":
        base, _ = sparsify.split_spec(spec) if fmt == "sparsify" else (spec, None)
        if not Path(base).exists():
            raise SAEFormatError(f"SAE path {base} does not exist")
    try:
        sae = FORMATS[fmt](spec, device=device)
    except FeatureGeomError:
        raise
    except Exception as e:  # a library error the loader did not anticipate
        raise SAEFormatError(f"could not load {spec} as {fmt}: {type(e).__name__}: {e}") from e
    sae.validate()
    return sae


def _short_model_name(name: str | None) -> str:
    return (name or "").rsplit("/", 1)[-1].lower()


def check_compatible(sae: SAE, d_model: int, model_name: str) -> list[str]:
    """Raise ShapeMismatchError when the SAE cannot read this model; return soft warnings.

    A width mismatch is fatal (every encode would fail or be meaningless). A different model name
    with the same width is only a warning: fine-tunes of the SAE's base model are the point.
    """
    if int(sae.d_in) != int(d_model):
        trained_on = f" (it was trained on {sae.model_name} at {sae.hook_name})" if sae.model_name else ""
        raise ShapeMismatchError(
            f"SAE width d_in={sae.d_in} does not match the model's hidden size d_model={d_model} "
            f"of {model_name}{trained_on}; pick an SAE trained on this model"
        )
    warnings = []
    if sae.model_name and _short_model_name(sae.model_name) != _short_model_name(model_name):
        warnings.append(
            f"the SAE was trained on {sae.model_name} but is being applied to {model_name}; "
            "fine if that is a fine-tune of the same base model"
        )
    return warnings


def load_sae_for_model(
    spec: str,
    format: str | None = None,
    *,
    d_model: int | None = None,
    model_name: str | None = None,
    device: str = "cpu",
    warn: Callable[[str], None] = lambda msg: print(f"warning: {msg}", flush=True),
) -> tuple[SAE, dict[str, Any]]:
    """The one way a command loads an SAE: load it, check it can read the model (when `d_model` is
    known; soft mismatches go to `warn`), and describe it with the sha256 of its files (None for a
    `release:` spec, which has no local files)."""
    sae = load_sae(spec, format=format, device=device)
    if d_model is not None:
        for message in check_compatible(sae, d_model, model_name or "the model"):
            warn(message)
    info = sae.describe()
    info["sha256"] = None if str(spec).startswith("release:") else hash_path(spec)
    return sae, info
