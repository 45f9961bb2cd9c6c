"""GGUF files through transformers: converted once, then kept as a safetensors copy stamped with the
versions that wrote it (a copy is only ever read by those versions)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from precompute.cache import cache_root
from precompute.errors import ModelLoadError
from precompute.provenance import sha256_of

# Bump when the conversion itself changes (what is dropped, how it is saved).
GGUF_CONVERTER_VERSION = 2
CONVERTED_SIDECAR = "featuregeom_source.json"


def _converter_stamp() -> dict[str, str | int]:
    """What wrote a converted copy. A copy saved by transformers 5 loads under 4.x with a wrong RoPE
    base and a broken tokenizer, silently: a copy is only ever read by the versions that wrote it."""
    from importlib.metadata import version

    return {
        "converter": GGUF_CONVERTER_VERSION,
        "transformers": version("transformers"),
        "gguf": version("gguf"),
    }


def _converted_gguf_dir(gguf: Path) -> tuple[Path, str, dict]:
    digest = sha256_of(gguf)
    stamp = _converter_stamp()
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:8]
    return cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}-{key}", digest, stamp


def _copy_is_ours(target: Path, digest: str, stamp: dict) -> bool:
    try:
        written = json.loads((target / CONVERTED_SIDECAR).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(written, dict)
        and written.get("sha256") == digest
        and all(written.get(k) == v for k, v in stamp.items())
    )


def load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """Load a GGUF through transformers once, then keep a safetensors copy (~0.2 s reloads).

    Returns (model, tokenizer, the file's sha256); transformers' own objects, hence Any."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any  # a transformers PreTrainedModel
    target, digest, stamp = _converted_gguf_dir(gguf)
    if (target / "config.json").is_file() and _copy_is_ours(target, digest, stamp):
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(target)
        return model, tokenizer, digest
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"could not load GGUF file {gguf}: {exc}") from exc
    # Dequantized weights are plain tensors now; drop the quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / CONVERTED_SIDECAR).write_text(json.dumps({"gguf": str(gguf), "sha256": digest, **stamp}))
        if target.exists() and not _copy_is_ours(target, digest, stamp):
            shutil.rmtree(target, ignore_errors=True)  # our own cache dir: a half or foreign copy
        try:
            os.replace(staging, target)
        except OSError:  # another process converted it first
            shutil.rmtree(staging, ignore_errors=True)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model, tokenizer, digest
