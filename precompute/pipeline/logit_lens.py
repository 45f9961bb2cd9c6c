"""The logit lens of a feature: which tokens its decoder direction promotes and suppresses when written
into the residual stream (its direct effect on the logits, through the final norm's gain)."""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from typing import Any

import torch

from precompute.errors import ModelLoadError

log = logging.getLogger(__name__)

_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def readable_token(tokenizer: Any, token_id: int) -> str:
    """One token as a short readable string with its whitespace made visible.

    Space -> "␣", newline -> "↵", tab -> "⇥", CR -> "␍", other control characters -> \\xNN.
    Uses `tokenizer.decode([id])`; SentencePiece tokenizers drop a word-initial space when
    decoding one token, so a raw token starting with "▁" gets its "␣" back. A token that decodes
    to nothing falls back to its raw vocabulary string, then to "<id>"."""
    try:
        text = tokenizer.decode([int(token_id)])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one id still gets a label
        text = ""
    raw = None
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is not None:
        try:
            raw = convert(int(token_id))
        except Exception:  # noqa: BLE001
            raw = None
    if isinstance(raw, str) and raw.startswith("▁") and not text.startswith(" "):
        text = " " + text if text else raw.replace("▁", " ")
    if not text:
        text = raw if isinstance(raw, str) and raw else f"<{int(token_id)}>"
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) == "Cc":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass
class LogitLens:
    """Each direction's promoted and suppressed tokens, and their logits (same order)."""

    promoted: list[list[str]]
    suppressed: list[list[str]]
    promoted_values: list[list[float]]
    suppressed_values: list[list[float]]


def logit_lens(
    directions: torch.Tensor,
    unembed: torch.Tensor,
    final_norm_weight: torch.Tensor | None,
    tokenizer: Any,
    k: int = 10,
    block: int = 1024,
) -> tuple[list[list[str]], list[list[str]]]:
    """Top-k promoted and bottom-k suppressed tokens of each direction (`logit_lens_values`, tokens only)."""
    lens = logit_lens_values(directions, unembed, final_norm_weight, tokenizer, k, block)
    return lens.promoted, lens.suppressed


@torch.no_grad()
def logit_lens_values(
    directions: torch.Tensor,
    unembed: torch.Tensor,
    final_norm_weight: torch.Tensor | None,
    tokenizer: Any,
    k: int = 10,
    block: int = 1024,
) -> LogitLens:
    """Top-k promoted and bottom-k suppressed tokens of each (unit) decoder direction, with their logits.

    logits = (direction * final_norm_weight) @ unembed.T: the direct effect of writing the
    direction into the residual stream, through the final norm's elementwise gain (its
    normalisation and bias do not change the ranking of one direction's logits, and final-logit
    soft-capping is monotone). The values are these logits for a unit-norm direction: comparable
    between features and tokens, not the logit change of a real activation (that scales with the
    activation and the norm's division). Computed in float32 on `unembed`'s device, `block`
    directions at a time, so memory is O(block x vocab). Promoted lists run from the largest logit
    down, suppressed lists from the most negative up. Tokens are rendered by `readable_token`.
    """
    if directions.ndim != 2 or unembed.ndim != 2 or directions.shape[1] != unembed.shape[1]:
        raise ValueError(
            f"directions {tuple(directions.shape)} and unembed {tuple(unembed.shape)} must be "
            "[n, d] and [vocab, d]"
        )
    if final_norm_weight is not None and final_norm_weight.shape[-1] != unembed.shape[1]:
        raise ValueError(
            f"final_norm_weight {tuple(final_norm_weight.shape)} does not match d={unembed.shape[1]}"
        )
    vocab = unembed.shape[0]
    k = max(0, min(int(k), vocab))
    device = unembed.device
    U = unembed.to(torch.float32)
    w = final_norm_weight.to(device, torch.float32) if final_norm_weight is not None else None
    memo: dict[int, str] = {}

    def render(ids: torch.Tensor) -> list[list[str]]:
        rows = []
        for row in ids.cpu().tolist():
            names = []
            for t in row:
                if t not in memo:
                    memo[t] = readable_token(tokenizer, t)
                names.append(memo[t])
            rows.append(names)
        return rows

    out = LogitLens([], [], [], [])
    n = directions.shape[0]
    step = max(1, int(block))
    for s in range(0, n, step):
        D = directions[s : s + step].to(device, torch.float32)
        if w is not None:
            D = D * w
        logits = D @ U.T
        if k == 0:
            for lst in (out.promoted, out.suppressed, out.promoted_values, out.suppressed_values):
                lst.extend([] for _ in range(D.shape[0]))
            continue
        top = torch.topk(logits, k, dim=1, largest=True, sorted=True)
        bottom = torch.topk(logits, k, dim=1, largest=False, sorted=True)
        out.promoted.extend(render(top.indices))
        out.suppressed.extend(render(bottom.indices))
        out.promoted_values.extend(top.values.cpu().tolist())
        out.suppressed_values.extend(bottom.values.cpu().tolist())
    return out


_FINAL_NORM_PATHS = (
    "model.norm",  # Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM ...
    "model.language_model.norm",  # multimodal wrappers (Gemma-3, Llava-style)
    "language_model.model.norm",
    "transformer.ln_f",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.final_layer_norm",  # Pythia / GPT-NeoX
    "model.decoder.final_layer_norm",  # OPT
    "model.final_layernorm",  # Phi-1/2
    "transformer.norm_f",
    "backbone.norm_f",  # Mamba
)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def model_unembedding(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(unembed [vocab, d], final-norm gain [d] or None) of a Hugging Face causal LM.

    The unembedding is `model.get_output_embeddings().weight`. The final norm is looked up at the
    usual attribute paths (`model.norm` for Llama-like models, `transformer.ln_f`, ...). Gemma's
    RMSNorm multiplies by (1 + weight), so for Gemma models the returned gain is 1 + weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        raise ModelLoadError(
            f"{type(model).__name__} has no output embedding (lm_head); the logit lens needs a causal language "
            "model - skip it by not loading the model for the scores step"
        )
    unembed = weight.detach()
    norm_w = None
    for path in _FINAL_NORM_PATHS:
        module = _get_path(model, path)
        w = getattr(module, "weight", None) if module is not None else None
        if isinstance(w, torch.Tensor) and w.ndim == 1 and w.shape[0] == unembed.shape[1]:
            norm_w = w.detach()
            model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
            if model_type.startswith("gemma") or "Gemma" in type(module).__name__:
                norm_w = norm_w.float() + 1.0
            break
    if norm_w is None:
        log.info("no final norm found on %s; logit lens uses the raw unembedding", type(model).__name__)
    return unembed, norm_w
