"""Steering playground: one prompt's greedy completion with and without α·d̂_f added at the SAE's hook,
and the SAE activations of chosen features on every generated token.

What is computed (the same hook and SAE as the cache, so the activations are the cache's features):
- the prompt goes through the model's chat template as one user turn (`eval_acts.encode_prompts`);
- `strength` is in units of the prompt's median residual norm at the hook (over its user tokens; the
  median because a few massive-norm tokens would set a mean): α = strength · median‖h‖, so 1.0 adds
  a vector as long as a typical residual. Every position is shifted, the prompt's and each generated token's (as Neuronpedia's
  steering does); strength 0 is the unsteered model bit for bit;
- both completions are greedy (`generate_responses`: deterministic, no sampling), cut at the first EOS;
- activations: one more forward over prompt + completion (steered for the steered completion, because
  the SAE reads the steered residual there), SAE-encoded at each generated token's position.

The explorer never imports torch: it talks to `precompute.lab.playground_worker` over JSON lines, and
`PlaygroundRequest.from_json` / `PlaygroundResult.to_json` are that protocol.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from precompute.errors import FeatureGeomError
from precompute.lab.eval_acts import encode_prompts, generate_responses
from precompute.lab.steering import steer_hook
from precompute.model.hooks import HookPoint, HookReader

DEFAULT_NEW_TOKENS = 40
MAX_NEW_TOKENS = 200
MAX_PROMPT_CHARS = 4000
MAX_STRENGTH = 50.0
MAX_WATCHED = 8


@dataclass(frozen=True)
class PlaygroundRequest:
    """One playground run: the prompt, the feature to steer along, how hard, how long."""

    prompt: str
    feature: int
    strength: float
    new_tokens: int = DEFAULT_NEW_TOKENS
    watch: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, data: Any, d_sae: int) -> PlaygroundRequest:
        """Validate a request from the explorer; any problem is one FeatureGeomError sentence."""
        if not isinstance(data, dict):
            raise FeatureGeomError("a playground request must be a JSON object")
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise FeatureGeomError("write a prompt to complete")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise FeatureGeomError(
                f"the prompt has {len(prompt):,} characters; the playground takes {MAX_PROMPT_CHARS:,}"
            )
        feature = _feature(data.get("feature"), d_sae, "the steered feature")
        strength = data.get("strength")
        if (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not math.isfinite(strength)
        ):
            raise FeatureGeomError("the steering strength must be a finite number")
        if abs(strength) > MAX_STRENGTH:
            raise FeatureGeomError(f"the steering strength must be within ±{MAX_STRENGTH:g} residual norms")
        new_tokens = data.get("new_tokens", DEFAULT_NEW_TOKENS)
        if (
            isinstance(new_tokens, bool)
            or not isinstance(new_tokens, int)
            or not 1 <= new_tokens <= MAX_NEW_TOKENS
        ):
            raise FeatureGeomError(
                f"the number of new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}"
            )
        watch_in = data.get("watch") or []
        if not isinstance(watch_in, list) or len(watch_in) > MAX_WATCHED:
            raise FeatureGeomError(f"watch at most {MAX_WATCHED} features (a list of feature ids)")
        watch = tuple(dict.fromkeys([feature, *(_feature(w, d_sae, "a watched feature") for w in watch_in)]))
        return cls(prompt, feature, float(strength), new_tokens, watch)


def _feature(value: Any, d_sae: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < d_sae:
        raise FeatureGeomError(f"{what} must be a feature id from 0 to {d_sae - 1}, not {value!r}")
    return value


@dataclass
class Completion:
    """A generated continuation: its tokens (each decoded alone, for display) and, per watched feature,
    the SAE activation at each generated token."""

    token_ids: list[int]
    tokens: list[str]
    text: str
    activations: dict[int, list[float]]
    seconds: float


@dataclass
class PlaygroundResult:
    request: PlaygroundRequest
    alpha: float  # absolute size of the added vector
    norm: float  # the prompt's median residual norm at the hook (the strength unit)
    unsteered: Completion
    steered: Completion
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def side(c: Completion) -> dict[str, Any]:
            return {
                "tokens": c.tokens,
                "token_ids": c.token_ids,
                "text": c.text,
                "activations": {str(k): v for k, v in c.activations.items()},
                "seconds": c.seconds,
            }

        r = self.request
        return {
            "prompt": r.prompt,
            "feature": r.feature,
            "strength": r.strength,
            "new_tokens": r.new_tokens,
            "watch": list(r.watch),
            "alpha": self.alpha,
            "norm": self.norm,
            "unsteered": side(self.unsteered),
            "steered": side(self.steered),
            "timings": self.timings,
        }


def _eos_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    # chat models end a turn with their end-of-turn token, which is not always `eos_token`
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return ids


def _watched_activations(
    model: Any, hook: HookPoint, sae: Any, ids: list[int], start: int, watch: tuple[int, ...]
) -> dict[int, list[float]]:
    """SAE activations of `watch` at positions start.. of `ids` (one forward; hooks already in place)."""
    if start >= len(ids):
        return {f: [] for f in watch}
    device = next(model.parameters()).device
    h = HookReader(model, hook)(torch.tensor([ids], device=device))[0, start:]
    acts = sae.encode(h.to(sae.W_enc.dtype))[:, list(watch)].float().cpu()
    return {f: [float(v) for v in acts[:, i]] for i, f in enumerate(watch)}


@torch.inference_mode()
def run_playground(
    lm: Any, hook: HookPoint, sae: Any, request: PlaygroundRequest, memo: dict[Any, Completion] | None = None
) -> PlaygroundResult:
    """The unsteered and the steered completion of `request.prompt`, with watched activations.

    `memo` keeps unsteered completions by (prompt, new_tokens, watch): moving only the strength slider
    then costs one generation, not two (greedy decoding makes the reuse exact)."""
    model, tokenizer = lm.model, lm.tokenizer
    t0 = time.perf_counter()
    (prompt,) = encode_prompts([request.prompt], tokenizer)
    device = next(model.parameters()).device
    h = HookReader(model, hook)(torch.tensor([prompt.ids], device=device))[0]
    user = h[prompt.prompt_start : prompt.prompt_end] if prompt.prompt_end > prompt.prompt_start else h[1:]
    # the median, not the mean: a few massive-norm tokens (e.g. the first newline) would otherwise set the unit
    norm = float((user if len(user) else h).float().norm(dim=-1).median())
    alpha = request.strength * norm
    direction = sae.unit_directions()[request.feature]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = _eos_ids(tokenizer)
    timings = {"prompt": time.perf_counter() - t0}

    def complete(steer: bool) -> Completion:
        start = time.perf_counter()
        # the unsteered pass installs no hook at all, so it is the plain model
        with steer_hook(model, hook, direction, alpha) if steer else nullcontext():
            (answer,) = generate_responses(model, [prompt], pad_id, eos, request.new_tokens, batch_size=1)
            acts = _watched_activations(model, hook, sae, prompt.ids + answer, len(prompt.ids), request.watch)
        return Completion(
            token_ids=list(answer),
            tokens=[tokenizer.decode([t]) for t in answer],
            text=tokenizer.decode(answer),
            activations=acts,
            seconds=time.perf_counter() - start,
        )

    key = (request.prompt, request.new_tokens, request.watch)
    unsteered = memo.get(key) if memo is not None else None
    timings["unsteered_reused"] = float(unsteered is not None)
    if unsteered is None:
        unsteered = complete(False)
        if memo is not None:
            memo.clear()  # one entry: the explorer's latest prompt
            memo[key] = unsteered
    steered = complete(True)
    timings.update(unsteered=unsteered.seconds, steered=steered.seconds, total=time.perf_counter() - t0)
    return PlaygroundResult(request, alpha, norm, unsteered, steered, timings)
