"""saprmarks/dictionary_learning checkpoints: ``ae.pt`` (+ sibling ``config.json``).

``ae.pt`` is a torch state dict. It is always read with ``torch.load(weights_only=True)``: a
pickle that needs anything beyond tensors and plain containers is refused, never executed.

Mapping of each dictionary class (their ``encode`` written out, from ``dictionary.py`` and
``trainers/*.py``):

* ``AutoEncoder``: ``relu(encoder(x - bias))``, decode ``decoder(f) + bias``. Keys
  ``encoder.weight`` [d_sae, d_in], ``encoder.bias``, ``decoder.weight`` [d_in, d_sae], ``bias``.
  -> standard, b_dec = bias, apply_b_dec_to_input=True.
* ``AutoEncoderNew``: ``relu(encoder(x))``, decode ``decoder(f)`` with ``decoder.bias``.
  -> standard, b_dec = decoder.bias, apply_b_dec_to_input=False.
* ``AutoEncoderTopK``: ``topk(relu(encoder(x - b_dec)))``; its scalar ``threshold`` buffer is only
  used when asked (``use_threshold=False`` by default). -> topk with k from the ``k`` buffer.
* ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: at inference ``relu(pre) * (relu(pre) > threshold)``
  with one scalar threshold (``use_threshold=True`` by default), input minus b_dec.
  -> jumprelu with that threshold for every latent (standard when the threshold was never set, < 0).
* ``JumpReluAutoEncoder``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], per-latent
  ``threshold``; does not subtract b_dec. -> jumprelu, apply_b_dec_to_input=False.
* ``GatedAutoEncoder``: refused (no single encoder).

``decoder.weight`` is an nn.Linear weight [d_in, d_sae] and is transposed to W_dec [d_sae, d_in].
Without config.json a checkpoint with a ``k`` buffer is read as AutoEncoderTopK, since
BatchTopKSAE has the same keys; pass the config.json to get BatchTopK's threshold behaviour.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from precompute.errors import SAEFormatError
from precompute.sae.base import SAE
from precompute.sae.format import SAEFormat, directory_names, file_and_siblings
from precompute.sae.formats import build_sae, read_json, require, scalar_int

NAME = "dictionary_learning"
DETECT_PRIORITY = 40  # below Gemma Scope 2, whose folder may also hold a config.json
WEIGHTS_FILENAME = "ae.pt"
CONFIG_FILENAME = "config.json"
CONVENTION = (
    "encoder.weight [d_sae, d_in] and decoder.weight [d_in, d_sae] (nn.Linear, transposed on load), "
    "or W_enc [d_in, d_sae] and W_dec [d_sae, d_in]"
)
_BATCH_TOPK = {"BatchTopKSAE", "MatryoshkaBatchTopKSAE"}
_KNOWN = {"AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "JumpReluAutoEncoder"} | _BATCH_TOPK


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILENAME
    if not p.is_file():
        raise SAEFormatError(f"missing dictionary_learning checkpoint {p}")
    return p


def read_state_dict(file: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``, with refusals and corruption turned into SAEFormatError."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise SAEFormatError(
                f"{file} is not a weights-only checkpoint: it asks the unpickler for arbitrary Python objects "
                "(which could run code), so it was not loaded. Re-save it as a plain state dict "
                "(torch.save(ae.state_dict(), path)) from a trusted environment"
            ) from e
        raise SAEFormatError(
            f"{file} is not a readable torch checkpoint ({e}); it may be truncated or corrupt"
        ) from e
    except Exception as e:  # zip errors, EOFError, RuntimeError from the stream reader
        raise SAEFormatError(
            f"{file} is not a readable torch checkpoint ({type(e).__name__}: {e}); it may be truncated or corrupt"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SAEFormatError(f"{file} holds a {type(obj).__name__}, expected a state dict")
    return obj


def _class_from_keys(sd: dict[str, Any]) -> str:
    """Guess the dictionary class when there is no config.json."""
    if any(k in sd for k in ("mag_bias", "gate_bias", "r_mag")):
        return "GatedAutoEncoder"
    if "W_enc" in sd:
        thr = sd.get("threshold")
        if "k" in sd or (isinstance(thr, torch.Tensor) and thr.ndim == 0):
            return "MatryoshkaBatchTopKSAE"
        return "JumpReluAutoEncoder"
    if "encoder.weight" in sd:
        if "k" in sd:
            return "AutoEncoderTopK"
        if "bias" in sd:
            return "AutoEncoder"
        if "decoder.bias" in sd:
            return "AutoEncoderNew"
        if "b_dec" in sd:
            return "AutoEncoderTopK"
    raise SAEFormatError(
        "cannot tell the dictionary class from the keys "
        f"({', '.join(sorted(sd))}); add the run's config.json next to ae.pt"
    )


def _weights(sd: dict[str, Any], dict_class: str, source: str) -> tuple[Any, Any, Any, Any, bool]:
    """(W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, apply_b_dec_to_input) of a state dict."""
    if "W_enc" in sd:  # parameter-style classes (JumpReluAutoEncoder, Matryoshka)
        require(sd, ("W_enc", "b_enc", "W_dec", "b_dec"), source, NAME)
        return sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"], True
    # nn.Linear-style classes
    bias_key = "b_dec" if "b_dec" in sd else "bias" if "bias" in sd else "decoder.bias"
    require(sd, ("encoder.weight", "encoder.bias", "decoder.weight", bias_key), source, NAME)
    enc, dec = sd["encoder.weight"], sd["decoder.weight"]
    if not (
        isinstance(enc, torch.Tensor) and isinstance(dec, torch.Tensor) and enc.ndim == 2 and dec.ndim == 2
    ):
        raise SAEFormatError(f"{source}: encoder.weight and decoder.weight must be 2-D tensors")
    # AutoEncoderNew: relu(encoder(x)), the decoder has its own bias
    apply_b_dec = not (dict_class == "AutoEncoderNew" or bias_key == "decoder.bias")
    return enc.T, sd["encoder.bias"], dec.T, sd[bias_key], apply_b_dec


def _activation(
    sd: dict[str, Any], trainer: dict[str, Any], dict_class: str, d_sae: int, source: str
) -> tuple[str, int | None, torch.Tensor | None, bool | None]:
    """(architecture, k, threshold, apply_b_dec_to_input override or None) of a dictionary class."""
    if dict_class == "AutoEncoderTopK":
        raw_k = sd.get("k", trainer.get("k"))
        if raw_k is None:
            raise SAEFormatError(
                f"{source}: AutoEncoderTopK needs k (a 'k' buffer or trainer.k in config.json)"
            )
        return "topk", scalar_int(raw_k, "k", source), None, None
    if dict_class in _BATCH_TOPK:
        thr = sd.get("threshold")
        if not isinstance(thr, torch.Tensor) or thr.numel() != 1:
            raise SAEFormatError(f"{source}: {dict_class} needs a scalar 'threshold' buffer")
        value = float(thr.reshape(()).item())
        if value >= 0:
            return "jumprelu", None, torch.full((d_sae,), value, dtype=torch.float32), None
        return "standard", None, None, None  # the threshold was never set
    if dict_class == "JumpReluAutoEncoder":
        require(sd, ("threshold",), source, NAME)
        # JumpReluAutoEncoder.apply_b_dec_to_input defaults to False
        return "jumprelu", None, sd["threshold"], False
    return "standard", None, None, None


def _check_config_sizes(
    trainer: dict[str, Any], d_in: int, d_sae: int, config_path: Path, file: Path
) -> None:
    for key, expected in (("activation_dim", d_in), ("dict_size", d_sae)):
        if key in trainer and scalar_int(trainer[key], key, str(config_path)) != expected:
            raise SAEFormatError(
                f"{config_path} says {key}={trainer[key]} but {file.name} has {expected}; "
                "config.json and ae.pt come from different runs"
            )


def _hook_name(trainer: dict[str, Any]) -> str | None:
    layer = trainer.get("layer")
    submodule = str(trainer.get("submodule_name") or "")
    site = (
        "hook_mlp_out"
        if "mlp" in submodule
        else "hook_attn_out"
        if "attn" in submodule
        else "hook_resid_post"
    )
    return f"blocks.{int(layer)}.{site}" if isinstance(layer, int) else None


def _dict_class(sd: dict[str, Any], trainer: dict[str, Any], source: str) -> str:
    dict_class = trainer.get("dict_class") or _class_from_keys(sd)
    if dict_class == "GatedAutoEncoder" or any(k in sd for k in ("mag_bias", "gate_bias", "r_mag")):
        raise SAEFormatError(f"{source}: GatedAutoEncoder checkpoints are not supported (no single encoder)")
    if dict_class not in _KNOWN:
        raise SAEFormatError(
            f"{source}: dictionary class {dict_class!r} is not supported; known: {', '.join(sorted(_KNOWN))}"
        )
    return str(dict_class)


def load(path: str, device: str = "cpu") -> SAE:
    """Load a dictionary_learning ``ae.pt`` (the file or its directory)."""
    file = _resolve(path)
    source = str(file)
    config_path = file.parent / CONFIG_FILENAME
    config = read_json(config_path) if config_path.is_file() else {}
    trainer_cfg = config.get("trainer")
    trainer: dict[str, Any] = trainer_cfg if isinstance(trainer_cfg, dict) else {}
    sd = read_state_dict(file)
    dict_class = _dict_class(sd, trainer, source)
    W_enc, b_enc, W_dec, b_dec, apply_b_dec = _weights(sd, dict_class, source)
    if not all(isinstance(t, torch.Tensor) for t in (W_enc, b_enc, W_dec, b_dec)):
        raise SAEFormatError(f"{source}: the weights must be tensors")
    if b_enc.ndim != 1 or b_dec.ndim != 1:
        raise SAEFormatError(
            f"{source}: the encoder bias and decoder bias must be 1-D, got {tuple(b_enc.shape)} and {tuple(b_dec.shape)}"
        )
    d_sae, d_in = int(b_enc.shape[0]), int(b_dec.shape[0])
    _check_config_sizes(trainer, d_in, d_sae, config_path, file)
    architecture, k, threshold, apply_override = _activation(sd, trainer, dict_class, d_sae, source)

    metadata: dict[str, Any] = {"dict_class": dict_class}
    if config:
        metadata["config"] = config
    if dict_class == "MatryoshkaBatchTopKSAE" and "group_sizes" in sd:
        metadata["group_sizes"] = [int(x) for x in sd["group_sizes"].tolist()]
    if "k" in sd and dict_class != "AutoEncoderTopK":
        metadata["k"] = scalar_int(sd["k"], "k", source)
    return build_sae(
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        threshold=threshold,
        d_in=d_in,
        d_sae=d_sae,
        source=source,
        convention=CONVENTION,
        device=device,
        architecture=architecture,
        k=k,
        apply_b_dec_to_input=apply_b_dec if apply_override is None else apply_override,
        hook_name=_hook_name(trainer),
        model_name=trainer.get("lm_name"),
        format=NAME,
        metadata=metadata,
    )


def detect(spec: str) -> int:
    """A directory holding ae.pt, any .pt/.pth file, or the config.json beside an ae.pt."""
    names = directory_names(spec)
    if names is not None:
        return DETECT_PRIORITY if WEIGHTS_FILENAME in names else 0
    found = file_and_siblings(spec)
    if found is None:
        return 0
    name, siblings = found
    if name.endswith((".pt", ".pth")) or (name == CONFIG_FILENAME and WEIGHTS_FILENAME in siblings):
        return DETECT_PRIORITY
    return 0


FORMAT = SAEFormat(
    name=NAME,
    files="dictionary_learning ae.pt (+ config.json), or its directory",
    detect=detect,
    load=load,
    aliases=("dictionary-learning",),
)
