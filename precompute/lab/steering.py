"""Steering check: add α·d̂_task at the hook and compare each feature's change in activation with the
first-order prediction (docs/science.md §2(b)-(c)).

What is measured. For a task feature t with unit decoder direction d̂_t, every counted token's
residual h at the hook becomes h + α·d̂_t (through a real forward hook, `steer_hook`). The SAE reads
the SAME hook point, so it sees exactly the steered residual, and for every feature j

    observed_j        = mean over counted tokens of  a_j(h + α d̂_t) − a_j(h)
    observed_pre_j    = mean over counted tokens of  pre_j(h + α d̂_t) − pre_j(h)
    predicted_j       = α · s · I_tj,   I_tj = W_enc[:, j] · d̂_t   (SAE-read interference, §2(b))
    predicted_gated_j = mean over counted tokens of  α · s_x · I_tj · 1[a_j(h) > 0]

where s is the SAE's input normalisation scale (1 for none, norm_scaling_factor for
expected_average_only_in; per token √d/‖h‖ or 1/std for constant_norm_rescale/layer_norm, whose
predictions are first-order only; rescale_acts_by_decoder_norm multiplies I_tj by ‖W_dec[j]‖).
`predicted` is exactly the change of the pre-activation for none/expected_average normalisation;
`predicted_gated` is the first-order Taylor prediction of the mean activation change (derivative of
ReLU/JumpReLU/TopK at the unsteered point: only features active on that token move). They differ
where a feature is inactive: its activation stays at 0 (or jumps in when the shift crosses zero, the
JumpReLU threshold or the k-th largest pre-activation, i.e. when the TopK set changes), so a fit of
`observed` on `predicted` over all features is not linear, by construction. `summarize`
(`precompute.lab.steering_results`) reports both, per α:

    pre-activation   observed_pre vs predicted, all features (the linear part; slope 1, R² 1)
    all              observed vs predicted, all features (inactive features break it)
    all (gated)      observed vs predicted_gated, all features
    active           observed vs predicted_gated, features active on ≥1 neutral token

Positions. `steer_hook` shifts every position by default, or only the positions of a boolean mask.
`steering_check` steers only the counted positions (no position 0, no special tokens, no padding),
i.e. exactly the tokens it measures. Because the SAE reads at the steering hook itself, steering
other positions could not change the measured activations anyway (causal model, shift added after
the block). Reading activations at a LATER layer than the steering point (where attention spreads
the shift across positions and the MLPs bend it) is out of scope here.

α units (`--alpha-unit`): `norm` (default) = a fraction of the mean residual norm ‖h‖ over the
counted neutral tokens, the usual way to size a steering vector (§2(f)); `rms` = multiples of
mean‖h‖/√d (the typical size of one coordinate); `abs` = absolute. Default α ∈ {0.01, 0.05, 0.1,
0.25, 0.5, 1.0} × mean‖h‖: from a nudge of 1% of the residual (≈ 0.25 rms coordinates at d = 576) up
to a shift as large as the residual itself.

Why TopK/JumpReLU fits break even at small α. A feature that enters (or leaves) the active set jumps
by about the k-th largest pre-activation (JumpReLU: the threshold), which is not small. The number of
tokens whose set changes grows linearly with α, so these jumps contribute to the mean Δa_j at the SAME
order α as the first-order term, and they dominate it unless α is below every token's top-k gap
(rarely true over thousands of tokens). ReLU has no jump (a feature enters at 0), so it has no such
term. `observed_switch` (the part of `observed` from tokens where j changed state), the meta fields
`switched_per_token` and `switch_share` (share of Σ|Δa| from entries/exits) make this visible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from precompute.data.corpus import Context, CorpusSource, Document, pack_contexts, read_source
from precompute.defaults import NEUTRAL_PROMPTS
from precompute.errors import FeatureGeomError, HookNotFoundError, ShapeMismatchError
from precompute.lab.steering_results import ALPHA_UNITS, DEFAULT_ALPHAS, summarize
from precompute.model.activations import count_mask, pad_batch
from precompute.model.hooks import HookPoint, HookReader, resolve_hook


# ----------------------------------------------------------------------------------------- the hook
def _unit(direction: torch.Tensor) -> torch.Tensor:
    d = direction.detach().flatten().float()
    norm = d.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise FeatureGeomError("the steering direction must be a finite, non-zero vector")
    return d / norm


@contextmanager
def steer_hook(
    model: torch.nn.Module,
    hook: HookPoint,
    direction: torch.Tensor,
    alpha: float,
    positions: torch.Tensor | None = None,
) -> Iterator[None]:
    """Add `alpha * direction / ‖direction‖` to the hook's residual while the context is open.

    Output hooks (resid_post = the block's output hidden states, mlp_out, attn_out, module paths)
    use a forward hook and replace the first element of a tuple output; read_input hooks
    (resid_pre) use a forward pre-hook on the hidden states argument. `positions` is a boolean
    [batch, seq] mask of the positions to shift (every position when None); other positions are
    left bit-for-bit unchanged. The hook is prepended, so readers on the same module (HookReader)
    see the steered residual.
    """
    modules = dict(model.named_modules())
    if hook.module_path not in modules:
        raise HookNotFoundError(f"hook module {hook.module_path!r} is not part of this model")
    module = modules[hook.module_path]
    unit = _unit(direction)

    def shift(h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != unit.shape[0]:
            raise ShapeMismatchError(
                f"steering direction has {unit.shape[0]} dims but the hook's residual has {h.shape[-1]}"
            )
        delta = (float(alpha) * unit).to(device=h.device, dtype=h.dtype)
        if positions is None:
            return h + delta
        mask = positions.to(device=h.device, dtype=torch.bool)
        if tuple(mask.shape) != tuple(h.shape[:-1]):
            raise ShapeMismatchError(
                f"steering positions mask has shape {tuple(mask.shape)}, the residual "
                f"{tuple(h.shape)}; the mask must be [batch, seq]"
            )
        return torch.where(mask[..., None], h + delta, h)

    def on_output(_module, _inputs, output):
        if isinstance(output, tuple):
            return (shift(output[0]), *output[1:])
        return shift(output)

    def on_input(_module, args, kwargs):
        if args:
            return (shift(args[0]), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise HookNotFoundError(f"cannot find the hidden states passed to {hook.module_path!r}")
        return args, {**kwargs, "hidden_states": shift(kwargs["hidden_states"])}

    if hook.read_input:
        handle = module.register_forward_pre_hook(on_input, with_kwargs=True, prepend=True)
    else:
        handle = module.register_forward_hook(on_output, prepend=True)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------- prompts
def load_prompts(
    path: str | Path | None = None, n: int = 32, text_field: str | None = None, seed: int = 0
) -> list[Document]:
    """`n` neutral prompts as user chat turns: by default the benign Self-Instruct seed tasks
    (field `instruction`); any corpus file (.jsonl/.csv/.txt/...) otherwise. A seeded shuffle picks them."""
    if path is None:
        path, text_field = NEUTRAL_PROMPTS, text_field or "instruction"
    source = CorpusSource(path=str(path), group="benign", text_field=text_field, format="user", max_docs=n)
    docs, _ = read_source(source, 0, seed=seed)
    return docs


def _contexts(
    prompts: Sequence[str | Document | Context], tokenizer: Any, context_size: int
) -> list[Context]:
    if not prompts:
        raise FeatureGeomError("the steering check needs at least one prompt")
    if all(isinstance(p, Context) for p in prompts):
        return list(prompts)  # type: ignore[arg-type]
    docs = []
    for i, p in enumerate(prompts):
        if isinstance(p, Document):
            docs.append(Document(i, 0, p.group, p.category, p.text, p.messages, p.index))
        elif isinstance(p, str):
            docs.append(Document(i, 0, "benign", None, messages=[{"role": "user", "content": p}], index=i))
        else:
            raise FeatureGeomError(
                f"prompts must all be strings, Documents or Contexts, got {type(p).__name__}"
            )
    contexts = list(pack_contexts(docs, tokenizer, context_size, "truncate"))
    if not contexts:
        raise FeatureGeomError("the prompts gave no tokens")
    return contexts


# ------------------------------------------------------------------------------------------ check
def read_interference(sae, direction: torch.Tensor) -> torch.Tensor:
    """I_tj = W_enc[:, j] · d̂ in the SAE's input coordinates [d_sae], times ‖W_dec[j]‖ when the SAE
    rescales activations by decoder norm; a layer_norm SAE reads the centred direction."""
    u = _unit(direction).to(sae.W_enc.device)
    if sae.normalize_activations == "layer_norm":
        u = u - u.mean()
    coef = u.to(sae.W_enc.dtype) @ sae.W_enc
    if sae.rescale_acts_by_decoder_norm:
        coef = coef * sae.W_dec.norm(dim=1)
    return coef.float()


def _input_scale(sae, h: torch.Tensor) -> torch.Tensor:
    """Per-token first-order scale of the SAE's input normalisation [N]."""
    n = h.shape[0]
    mode = sae.normalize_activations
    if mode == "expected_average_only_in" and sae.norm_scaling_factor is not None:
        return torch.full((n,), float(sae.norm_scaling_factor), device=h.device)
    if mode == "constant_norm_rescale":
        return (sae.d_in**0.5) / h.norm(dim=-1).clamp_min(1e-12)
    if mode == "layer_norm":
        centred = h - h.mean(dim=-1, keepdim=True)
        return 1.0 / (centred.std(dim=-1) + 1e-5)
    return torch.ones(n, device=h.device)


def alpha_scale(unit: str, mean_norm: float, d_model: int) -> float:
    if unit == "norm":
        return float(mean_norm)
    if unit == "rms":
        return float(mean_norm) / math.sqrt(d_model)
    if unit == "abs":
        return 1.0
    raise FeatureGeomError(f"unknown alpha unit {unit!r}; use one of {', '.join(ALPHA_UNITS)}")


# ------------------------------------------------------------------------------------------ check
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # ids, attention, counted mask, hidden


def _check_request(
    d_sae: int,
    task_feature: int,
    features: Sequence[int] | None,
    alphas: Sequence[float] | None,
    alpha_unit: str,
) -> tuple[list[int] | None, list[float]]:
    """The feature ids and alphas of a steering check as plain lists, after checking their ranges."""
    if not 0 <= int(task_feature) < d_sae:
        raise FeatureGeomError(f"task feature {task_feature} is out of range; the SAE has {d_sae} features")
    selected = None
    if features is not None:
        selected = [int(f) for f in features]
        bad = [f for f in selected if not 0 <= f < d_sae]
        if bad:
            raise FeatureGeomError(f"feature ids {bad[:5]} are out of range; the SAE has {d_sae} features")
    alpha_list = [float(a) for a in (DEFAULT_ALPHAS if alphas is None else alphas)]
    if not alpha_list:
        raise FeatureGeomError("give at least one alpha")
    if alpha_unit not in ALPHA_UNITS:
        raise FeatureGeomError(f"unknown alpha unit {alpha_unit!r}; use one of {', '.join(ALPHA_UNITS)}")
    return selected, alpha_list


def _unsteered_pass(
    reader: HookReader, batches: list[list[Context]], pad_id: int, skip_ids: set[int], device: torch.device
) -> tuple[list[Batch], torch.Tensor]:
    """Pass 1: unsteered residuals (kept whole, to check that unsteered positions stay untouched) and
    the residual norm of every counted token."""
    base: list[Batch] = []
    norms = []
    for batch in batches:
        ids, attention = pad_batch([c.token_ids for c in batch], pad_id)
        mask = count_mask(ids, attention, skip_ids)
        hidden = reader(ids.to(device), attention.to(device))
        base.append((ids, attention, mask, hidden))
        norms.append(hidden[mask.to(hidden.device)].float().norm(dim=-1))
    return base, torch.cat(norms)


@dataclass
class _Sums:
    """Running sums over the counted tokens of every batch: per α (rows) and feature (columns), and
    per feature over the unsteered tokens."""

    n_alphas: int
    d_sae: int
    obs: torch.Tensor = field(init=False)
    obs_pre: torch.Tensor = field(init=False)
    switched: torch.Tensor = field(init=False)
    obs_switch: torch.Tensor = field(init=False)
    active_count: torch.Tensor = field(init=False)
    gated_scale: torch.Tensor = field(init=False)  # Σ_tokens s_x · 1[active]
    base_sum: torch.Tensor = field(init=False)
    scale_sum: float = 0.0
    abs_total: list[float] = field(init=False)  # Σ|Δa| over tokens and features, all / switched
    abs_switch: list[float] = field(init=False)
    hook_err: list[float] = field(init=False)
    untouched_change: list[float] = field(init=False)

    def __post_init__(self) -> None:
        per_alpha = (self.n_alphas, self.d_sae)
        self.obs, self.obs_pre = (
            torch.zeros(per_alpha, dtype=torch.float64),
            torch.zeros(per_alpha, dtype=torch.float64),
        )
        self.switched = torch.zeros(per_alpha, dtype=torch.float64)
        self.obs_switch = torch.zeros(per_alpha, dtype=torch.float64)
        self.active_count = torch.zeros(self.d_sae, dtype=torch.float64)
        self.gated_scale = torch.zeros(self.d_sae, dtype=torch.float64)
        self.base_sum = torch.zeros(self.d_sae, dtype=torch.float64)
        self.abs_total, self.abs_switch = [0.0] * self.n_alphas, [0.0] * self.n_alphas
        self.hook_err, self.untouched_change = [0.0] * self.n_alphas, [0.0] * self.n_alphas


@dataclass
class _Steering:
    """What every batch of one steering check shares."""

    model: torch.nn.Module
    hook: HookPoint
    reader: HookReader
    sae: Any
    direction: torch.Tensor
    alphas_abs: list[float]
    device: torch.device


def _accumulate_batch(run: _Steering, sums: _Sums, batch: Batch) -> None:
    """Add one batch's unsteered statistics and, per α, its steered changes to `sums`."""
    ids, attention, mask, hidden = batch
    sae = run.sae
    m = mask.to(hidden.device)
    h = hidden[m].float()
    h_sae = h.to(sae.W_enc.device)
    pre_b = sae.pre_activations(h_sae).float()
    act_b = sae.encode(h_sae).float()
    on_b = act_b > 0
    s = _input_scale(sae, h_sae).double()
    sums.active_count += on_b.sum(0).double().cpu()
    sums.gated_scale += (s[:, None] * on_b.double()).sum(0).cpu()
    sums.base_sum += act_b.double().sum(0).cpu()
    sums.scale_sum += float(s.sum())
    other = attention.bool().to(hidden.device) & ~m
    for a_index, a_abs in enumerate(run.alphas_abs):
        with steer_hook(run.model, run.hook, run.direction, a_abs, positions=mask):
            steered = run.reader(ids.to(run.device), attention.to(run.device))
        hs = steered[m].float()
        expected = h + (a_abs * _unit(run.direction)).to(h.dtype)
        sums.hook_err[a_index] = max(sums.hook_err[a_index], float((hs - expected).abs().max()))
        if bool(other.any()):
            change = (steered[other] - hidden[other]).abs().max()
            sums.untouched_change[a_index] = max(sums.untouched_change[a_index], float(change))
        hs_sae = hs.to(sae.W_enc.device)
        pre_s = sae.pre_activations(hs_sae).float()
        act_s = sae.encode(hs_sae).float()
        delta = act_s.double() - act_b.double()
        flipped = (act_s > 0) != on_b
        sums.obs[a_index] += delta.sum(0).cpu()
        sums.obs_pre[a_index] += (pre_s.double() - pre_b.double()).sum(0).cpu()
        sums.switched[a_index] += flipped.double().sum(0).cpu()
        sums.obs_switch[a_index] += (delta * flipped).sum(0).cpu()
        sums.abs_total[a_index] += float(delta.abs().sum())
        sums.abs_switch[a_index] += float((delta.abs() * flipped).sum())


def _feature_table(
    sums: _Sums,
    alphas: list[float],
    alphas_abs: list[float],
    coef: torch.Tensor,
    n_tokens: int,
    features: list[int] | None,
    task_feature: int,
) -> pd.DataFrame:
    """One row per (alpha, feature): the columns FEATURE_COLUMNS."""
    mean_scale = sums.scale_sum / n_tokens
    selected = torch.arange(sums.d_sae) if features is None else torch.tensor(features, dtype=torch.long)
    frames = []
    for a_index, (a, a_abs) in enumerate(zip(alphas, alphas_abs, strict=True)):
        frames.append(
            pd.DataFrame(
                {
                    "alpha": a,
                    "alpha_abs": a_abs,
                    "feature": selected.numpy().astype(np.int64),
                    "observed": (sums.obs[a_index] / n_tokens)[selected].numpy(),
                    "predicted": (a_abs * mean_scale * coef)[selected].numpy(),
                    "predicted_gated": (a_abs * coef * sums.gated_scale / n_tokens)[selected].numpy(),
                    "observed_pre": (sums.obs_pre[a_index] / n_tokens)[selected].numpy(),
                    "observed_switch": (sums.obs_switch[a_index] / n_tokens)[selected].numpy(),
                    "interference": coef[selected].numpy(),
                    "active_frac": (sums.active_count / n_tokens)[selected].numpy(),
                    "switched_frac": (sums.switched[a_index] / n_tokens)[selected].numpy(),
                    "base_mean": (sums.base_sum / n_tokens)[selected].numpy(),
                    "is_task": (selected == int(task_feature)).numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@torch.inference_mode()
def steering_check(
    lm: Any,
    hook_name: str | HookPoint,
    sae: Any,
    task_feature: int,
    alphas: Sequence[float] | None = None,
    prompts: Sequence[str | Document | Context] | None = None,
    features: Sequence[int] | None = None,
    batch_size: int = 8,
    alpha_unit: str = "norm",
    context_size: int = 128,
    progress: bool = False,
) -> pd.DataFrame:
    """Steer along task feature `task_feature`'s decoder direction and compare Δa_j with α·s·I_tj.

    `lm` is a LoadedModel (model + tokenizer); `prompts` default to `load_prompts()` (32 benign
    Self-Instruct instructions as user turns). Returns one row per (alpha, feature) with the
    columns FEATURE_COLUMNS (`alpha` in `alpha_unit`, `alpha_abs` absolute); `df.attrs["meta"]`
    describes the run (α scale, token count, hook check) and `df.attrs["summary"]` holds
    `summarize(df)` as records.
    """
    model, tokenizer = lm.model, lm.tokenizer
    hook = resolve_hook(model, hook_name) if isinstance(hook_name, str) else hook_name
    d_sae = sae.d_sae
    selected, alpha_list = _check_request(d_sae, task_feature, features, alphas, alpha_unit)
    contexts = _contexts(load_prompts() if prompts is None else prompts, tokenizer, context_size)
    skip_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    order = sorted(contexts, key=lambda c: (-len(c.token_ids), c.context_id))
    batches = [order[i : i + batch_size] for i in range(0, len(order), max(1, batch_size))]
    device = next(model.parameters()).device
    reader = HookReader(model, hook)

    t0 = time.perf_counter()
    base, norms_all = _unsteered_pass(reader, batches, pad_id, skip_ids, device)
    n_tokens = int(norms_all.numel())
    if n_tokens == 0:
        raise FeatureGeomError("the prompts have no counted tokens (all special or position 0)")
    d_model = int(base[0][3].shape[-1])
    if d_model != sae.d_in:
        raise ShapeMismatchError(f"SAE d_in={sae.d_in} but the hook {hook.name!r} has width {d_model}")
    mean_norm = float(norms_all.mean())
    scale = alpha_scale(alpha_unit, mean_norm, d_model)
    alphas_abs = [a * scale for a in alpha_list]
    direction = sae.unit_directions()[int(task_feature)].to(device)
    coef = read_interference(sae, direction).double().cpu()  # [d_sae]

    run = _Steering(model, hook, reader, sae, direction, alphas_abs, device)
    sums = _Sums(len(alpha_list), d_sae)
    for b_index, batch in enumerate(base):
        _accumulate_batch(run, sums, batch)
        if progress:
            print(f"  batch {b_index + 1}/{len(batches)} done", flush=True)

    df = _feature_table(sums, alpha_list, alphas_abs, coef, n_tokens, selected, task_feature)
    n_a = len(alpha_list)
    df.attrs["meta"] = {
        "hook": hook.name,
        "module": hook.module_path,
        "reads": "input" if hook.read_input else "output",
        "task_feature": int(task_feature),
        "alphas": alpha_list,
        "alphas_abs": alphas_abs,
        "alpha_unit": alpha_unit,
        "alpha_scale": scale,
        "mean_residual_norm": mean_norm,
        "rms_residual_coordinate": mean_norm / math.sqrt(d_model),
        "d_model": d_model,
        "d_sae": d_sae,
        "architecture": sae.architecture,
        "k": sae.k,
        "normalize_activations": sae.normalize_activations,
        "mean_input_scale": sums.scale_sum / n_tokens,
        "n_prompts": len(contexts),
        "n_tokens": n_tokens,
        "switched_per_token": [float(sums.switched[i].sum()) / n_tokens for i in range(n_a)],
        "switch_share": [
            sums.abs_switch[i] / sums.abs_total[i] if sums.abs_total[i] > 0 else 0.0 for i in range(n_a)
        ],
        "hook_max_error": sums.hook_err,
        "untouched_max_change": sums.untouched_change,
        "positions": "counted (no position 0, no special tokens, no padding)",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    df.attrs["summary"] = summarize(df).to_dict("records")
    return df
