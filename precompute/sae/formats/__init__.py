"""One loader module per SAE file format (SAELens-style), plus the helpers they share.

Each module exposes ``load(path: str, device: str = "cpu") -> SAE`` and knows only its own
on-disk conventions; ``precompute.sae.registry`` maps format names to these loaders. The helpers
here turn library errors (safetensors, json, numpy) into ``SAEFormatError`` messages that name
the file, so a user never sees a raw traceback for a bad file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from precompute.errors import SAEFormatError
from precompute.sae.base import SAE

WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file, or raise SAEFormatError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SAEFormatError(f"missing config file {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"cannot read config file {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SAEFormatError(f"{path} is not valid JSON ({e}); is the file truncated or corrupt?") from e
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the string metadata of a .safetensors file.

    safetensors checks the header against the file size, so a truncated or random file fails
    here with a clear message instead of a SafetensorError traceback later.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SAEFormatError(f"missing weights file {path}")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError, ...
        raise SAEFormatError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
            "it may be truncated, corrupt or a different format"
        ) from e
    return tensors, metadata


def rename_lowercase(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``w_enc``/``w_dec`` (Gemma Scope, some exports) onto ``W_enc``/``W_dec``."""
    out = {}
    for key, value in tensors.items():
        new = "W_" + key[2:] if key.startswith("w_") else key
        if new in out and new != key:
            raise SAEFormatError(f"file holds both {key!r} and {new!r}; cannot tell which one to use")
        out[new] = value
    return out


def require(tensors: dict[str, Any], names: tuple[str, ...] | list[str], source: str, fmt: str) -> None:
    """Raise if any expected tensor is absent, listing what the file does hold."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(
            f"{source} is missing {', '.join(missing)} for the {fmt} format; "
            f"it holds: {', '.join(sorted(tensors)) or 'nothing'}"
        )


def float_dtype(tensors: list[torch.Tensor | None]) -> torch.dtype:
    """float64 stays float64; half precision widens to float32 (lossless, and CPU-friendly)."""
    present = [t for t in tensors if t is not None]
    if any(t.dtype == torch.float64 for t in present):
        return torch.float64
    return torch.float32


def as_float(tensor: torch.Tensor, dtype: torch.dtype, name: str, source: str) -> torch.Tensor:
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise SAEFormatError(f"{name} in {source} has dtype {tensor.dtype}; expected floating point")
    return tensor.detach().to(dtype=dtype).contiguous()


def scalar_int(value: Any, name: str, source: str) -> int:
    """An integer from a JSON number, a numeric string or a 0-d/1-element tensor."""
    try:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"shape {tuple(value.shape)}")
            value = value.item()
        if isinstance(value, str):
            value = float(value.strip())
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise ValueError(f"{value} is not an integer")
        return int(value)
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{name} in {source} must be an integer, got {value!r} ({e})") from e


def parse_bool(value: Any, name: str, source: str) -> bool:
    """A bool from JSON or a safetensors metadata string ("true"/"False"/"1")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no"):
        return False
    raise SAEFormatError(f"{name} in {source} must be true or false, got {value!r}")


def check_layout(
    weights: dict[str, torch.Tensor | None], d_in: int, d_sae: int, source: str, convention: str
) -> None:
    """Assert the SAELens layout (W_dec [d_sae, d_in]) after conversion, naming the likely mistake.

    ``convention`` tells the user how the tensors are stored in *this* format, since a transposed
    matrix is the most common way a file of the wrong format slips through.
    """
    expected = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
        "threshold": (d_sae,),
    }
    for name, shape in expected.items():
        tensor = weights.get(name)
        if tensor is None:
            continue
        got = tuple(tensor.shape)
        if got == shape:
            continue
        hint = ""
        if len(shape) == 2 and got == shape[::-1]:
            hint = " (it looks transposed)"
        raise SAEFormatError(
            f"{name} in {source} has shape {got} after conversion, expected {shape} for "
            f"d_in={d_in}, d_sae={d_sae}{hint}; this format stores {convention}"
        )


def _required_tensor(name: str, tensor: Any, source: str) -> torch.Tensor:
    if tensor is None:
        raise SAEFormatError(f"{source} has no {name}")
    return _tensor(name, tensor, source)


def _tensor(name: str, tensor: Any, source: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise SAEFormatError(f"{name} in {source} is a {type(tensor).__name__}, not a tensor")
    return tensor


def build_sae(
    *,
    W_enc: torch.Tensor | None,
    b_enc: torch.Tensor | None,
    W_dec: torch.Tensor | None,
    b_dec: torch.Tensor | None,
    threshold: torch.Tensor | None = None,
    d_in: int,
    d_sae: int,
    source: str,
    convention: str,
    device: str = "cpu",
    **fields: Any,
) -> SAE:
    """Check layout and dtype, then construct (and so validate) the one internal representation."""
    weights = {
        "W_enc": _required_tensor("W_enc", W_enc, source),
        "b_enc": _required_tensor("b_enc", b_enc, source),
        "W_dec": _required_tensor("W_dec", W_dec, source),
        "b_dec": _required_tensor("b_dec", b_dec, source),
    }
    thr = None if threshold is None else _tensor("threshold", threshold, source)
    check_layout({**weights, "threshold": thr}, d_in, d_sae, source, convention)
    dtype = float_dtype([*weights.values(), thr])
    conv = {name: as_float(t, dtype, name, source) for name, t in weights.items()}
    assert conv["W_dec"].shape == (d_sae, d_in), "every loader must end with W_dec [d_sae, d_in]"
    sae = SAE(  # __post_init__ validates shapes and finiteness
        W_enc=conv["W_enc"],
        b_enc=conv["b_enc"],
        W_dec=conv["W_dec"],
        b_dec=conv["b_dec"],
        threshold=None if thr is None else as_float(thr, dtype, "threshold", source),
        source=source,
        **fields,
    )
    return sae.to(device)


def fold_scaling_factor(
    tensors: dict[str, torch.Tensor], finetuning: bool, source: str
) -> dict[str, torch.Tensor]:
    """Handle a ``scaling_factor`` tensor the way SAELens' readers do.

    All ones: a no-op SAELens used to write, dropped. Otherwise it is the pre-6 SAELens
    ``finetuning_scaling_factor``, which multiplied feature activations before decoding; that is
    exactly a per-row scale of W_dec, so it is folded there (encode() is unchanged). Without the
    cfg flag SAELens refuses the file, and so do we.
    """
    if "scaling_factor" not in tensors:
        return tensors
    tensors = dict(tensors)
    factor = tensors.pop("scaling_factor").detach().float()
    if torch.allclose(factor, torch.ones_like(factor)):
        return tensors
    if not finetuning:
        raise SAEFormatError(
            f"{source} holds a scaling_factor tensor that is not all ones but its config does not set "
            "finetuning_scaling_factor; SAELens refuses such files too. Fold the factor into W_dec rows "
            "(W_dec * scaling_factor[:, None]) and drop it, or set finetuning_scaling_factor: true"
        )
    if "W_dec" not in tensors or factor.shape != (tensors["W_dec"].shape[0],):
        raise SAEFormatError(f"scaling_factor in {source} has shape {tuple(factor.shape)}, expected [d_sae]")
    tensors["W_dec"] = tensors["W_dec"].float() * factor[:, None]
    return tensors


_LAYER = re.compile(r"layer[s]?[_.](\d+)")


def parse_layer(text: str) -> int | None:
    """The layer number in names such as ``layer_12`` or ``layers.12``."""
    match = _LAYER.search(text)
    return int(match.group(1)) if match else None
