"""The SAE formats, detection of a path's format, and the one entry point ``load_sae``.

Each format module in ``precompute.sae.formats`` declares an ``SAEFormat`` (name, aliases, the
files it expects, ``detect`` and ``load``); this module only lists them and asks them. Loaders know
nothing of the model; ``check_compatible`` is the single place that compares an SAE with the model
it will read from.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from precompute.errors import FeatureGeomError, SAEFormatError, ShapeMismatchError
from precompute.provenance import hash_path, is_descriptive
from precompute.sae.base import SAE
from precompute.sae.format import SAEFormat
from precompute.sae.formats import (
    dictionary_learning,
    gemmascope,
    plain_safetensors,
    release,
    saelens,
    sparsify,
)

# Every supported format, in the order `supported_formats` lists them (and detection breaks ties).
FORMAT_LIST: tuple[SAEFormat, ...] = (
    saelens.FORMAT,
    sparsify.FORMAT,
    gemmascope.FORMAT,
    gemmascope.FORMAT_V2,
    dictionary_learning.FORMAT,
    plain_safetensors.FORMAT,
    release.FORMAT,
)


def formats() -> dict[str, SAEFormat]:
    """Format name -> format, from FORMAT_LIST (read at each call, so a test may extend the list)."""
    return {fmt.name: fmt for fmt in FORMAT_LIST}


def supported_formats() -> str:
    """One line per format: its name and the files it expects."""
    return "\n".join(f"  {fmt.name}: {fmt.files}" for fmt in FORMAT_LIST)


def _canonical(name: str) -> SAEFormat:
    """The format a --sae-format value names (its name or an alias, any case)."""
    key = name.strip().lower()
    for fmt in FORMAT_LIST:
        if key == fmt.name or key in fmt.aliases:
            return fmt
    raise SAEFormatError(f"unknown SAE format {name!r}; supported formats:\n{supported_formats()}")


def _detect(spec: str) -> SAEFormat | None:
    """The format whose `detect` claims `spec` with the highest priority (the first on a tie)."""
    best, best_priority = None, 0
    for fmt in FORMAT_LIST:
        priority = fmt.detect(spec)
        if priority > best_priority:
            best, best_priority = fmt, priority
    return best


def detect_format(path: str) -> str:
    """Pick the format from the path alone (file names and layout), never from file contents."""
    spec = os.fspath(path)
    fmt = _detect(spec)
    if fmt is not None:
        return fmt.name
    p = Path(spec)
    if not p.exists():
        raise SAEFormatError(
            f"SAE path {spec} does not exist (for a SAELens registry SAE use 'release:RELEASE_ID/SAE_ID')"
        )
    if p.is_dir():
        found = ", ".join(sorted(c.name for c in p.iterdir())[:12]) or "nothing"
        raise SAEFormatError(
            f"cannot tell the SAE format of directory {p} (it holds: {found}); expected one of:\n{supported_formats()}"
        )
    raise SAEFormatError(f"cannot tell the SAE format of file {p}; expected one of:\n{supported_formats()}")


def load_sae(spec: str, format: str | None = None, device: str = "cpu") -> SAE:
    """Load any supported SAE into the internal representation, or raise SAEFormatError.

    Every failure, including ones raised inside torch/numpy/safetensors, comes out as a
    FeatureGeomError with a message naming the file, so the CLI never prints a library traceback.
    """
    spec = os.fspath(spec)
    fmt = _canonical(format) if format else formats()[detect_format(spec)]
    local = fmt.local_path(spec)
    if local is not None and not Path(local).exists():
        raise SAEFormatError(f"SAE path {local} does not exist")
    try:
        sae = fmt.load(spec, device=device)
    except FeatureGeomError:
        raise
    except Exception as e:  # a library error the loader did not anticipate
        raise SAEFormatError(f"could not load {spec} as {fmt.name}: {type(e).__name__}: {e}") from e
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
    known; soft mismatches go to `warn`), and describe it with the sha256 of the files that make it
    (not its README or training report; None for a `release:` spec, which has no local files)."""
    sae = load_sae(spec, format=format, device=device)
    if d_model is not None:
        for message in check_compatible(sae, d_model, model_name or "the model"):
            warn(message)
    info = sae.describe()
    info["sha256"] = None if str(spec).startswith("release:") else hash_path(spec, skip=is_descriptive)
    return sae, info
