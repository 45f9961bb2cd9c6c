"""Steering check: add α·d̂_task at the hook and compare each feature's change in activation with the
first-order prediction (SCIENCE.md §2(b)-(c)).

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
`observed` on `predicted` over all features is not linear, by construction. `summarize` reports
both, per α:

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

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from precompute.argtypes import non_negative_int, positive_int, seed_int
from precompute.data.corpus import Context, CorpusSource, Document, pack_contexts, read_source
from precompute.errors import FeatureGeomError, HookNotFoundError, ShapeMismatchError
from precompute.model.activations import pad_batch
from precompute.model.hooks import HookPoint, HookReader, resolve_hook

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = ROOT / "assets/data/benign/self_instruct_seed_tasks.jsonl"
DEFAULT_SAE = ROOT / "assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk"
DEFAULT_ALPHAS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
ALPHA_UNITS = ("norm", "rms", "abs")
SUBSETS = ("pre-activation", "all", "all (gated)", "active")
FEATURE_COLUMNS = (
    "alpha",
    "alpha_abs",
    "feature",
    "observed",
    "predicted",
    "predicted_gated",
    "observed_pre",
    "observed_switch",
    "interference",
    "active_frac",
    "switched_frac",
    "base_mean",
    "is_task",
)


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


# -------------------------------------------------------------------------------------------- fits
def fit_slope(observed: Any, predicted: Any) -> tuple[float, float, int]:
    """Least-squares slope of observed = slope · predicted (through the origin), its R², and n.

    R² is the centred one, 1 − Σ(y − b·x)² / Σ(y − ȳ)² (it can be negative for a bad fit). NaN
    where undefined (no points, all predictions zero, or constant observations not fit exactly).
    """
    x = np.asarray(predicted, dtype=np.float64).ravel()
    y = np.asarray(observed, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"observed has {y.size} values, predicted {x.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    sxx = float(x @ x)
    if n == 0 or sxx == 0.0:
        return math.nan, math.nan, n
    slope = float(x @ y) / sxx
    ss_res = float(((y - slope * x) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        r2 = 1.0 if ss_res <= 1e-30 else math.nan
    else:
        r2 = 1.0 - ss_res / ss_tot
    return slope, r2, n


def pearson_r(observed: Any, predicted: Any) -> float:
    x = np.asarray(predicted, dtype=np.float64).ravel()
    y = np.asarray(observed, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


# ---------------------------------------------------------------------------------------- prompts
def load_prompts(
    path: str | Path | None = None, n: int = 32, text_field: str | None = None, seed: int = 0
) -> list[Document]:
    """`n` neutral prompts as user chat turns: by default the benign Self-Instruct seed tasks
    (field `instruction`); any corpus file (.jsonl/.csv/.txt/...) otherwise. A seeded shuffle picks them."""
    if path is None:
        path, text_field = DEFAULT_PROMPTS, text_field or "instruction"
    source = CorpusSource(path=str(path), group="benign", text_field=text_field, format="user", max_docs=n)
    docs, _ = read_source(source, 0, seed=seed)
    return docs


def _contexts(prompts: Sequence[str | Document | Context], tokenizer, context_size: int) -> list[Context]:
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


@torch.inference_mode()
def steering_check(
    lm,
    hook_name: str | HookPoint,
    sae,
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
    if not 0 <= int(task_feature) < d_sae:
        raise FeatureGeomError(f"task feature {task_feature} is out of range; the SAE has {d_sae} features")
    if features is not None:
        features = [int(f) for f in features]
        bad = [f for f in features if not 0 <= f < d_sae]
        if bad:
            raise FeatureGeomError(f"feature ids {bad[:5]} are out of range; the SAE has {d_sae} features")
    alphas = [float(a) for a in (DEFAULT_ALPHAS if alphas is None else alphas)]
    if not alphas:
        raise FeatureGeomError("give at least one alpha")
    if alpha_unit not in ALPHA_UNITS:
        raise FeatureGeomError(f"unknown alpha unit {alpha_unit!r}; use one of {', '.join(ALPHA_UNITS)}")
    contexts = _contexts(load_prompts() if prompts is None else prompts, tokenizer, context_size)
    skip_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    order = sorted(contexts, key=lambda c: (-len(c.token_ids), c.context_id))
    batches = [order[i : i + batch_size] for i in range(0, len(order), max(1, batch_size))]
    device = next(model.parameters()).device
    sae_device = sae.W_enc.device
    reader = HookReader(model, hook)

    from precompute.model.activations import count_mask

    t0 = time.perf_counter()
    # pass 1: unsteered residuals (kept whole, to check that unsteered positions stay untouched)
    base: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    norms = []
    for batch in batches:
        ids, attention = pad_batch([c.token_ids for c in batch], pad_id)
        mask = count_mask(ids, attention, skip_ids)
        hidden = reader(ids.to(device), attention.to(device))
        base.append((ids, attention, mask, hidden))
        norms.append(hidden[mask.to(hidden.device)].float().norm(dim=-1))
    norms_all = torch.cat(norms)
    n_tokens = int(norms_all.numel())
    if n_tokens == 0:
        raise FeatureGeomError("the prompts have no counted tokens (all special or position 0)")
    d_model = int(base[0][3].shape[-1])
    if d_model != sae.d_in:
        raise ShapeMismatchError(f"SAE d_in={sae.d_in} but the hook {hook.name!r} has width {d_model}")
    mean_norm = float(norms_all.mean())
    scale = alpha_scale(alpha_unit, mean_norm, d_model)
    alphas_abs = [a * scale for a in alphas]
    direction = sae.unit_directions()[int(task_feature)].to(device)
    coef = read_interference(sae, direction).double().cpu()  # [d_sae]

    n_a = len(alphas)
    obs = torch.zeros(n_a, d_sae, dtype=torch.float64)
    obs_pre = torch.zeros(n_a, d_sae, dtype=torch.float64)
    switched = torch.zeros(n_a, d_sae, dtype=torch.float64)
    obs_switch = torch.zeros(n_a, d_sae, dtype=torch.float64)
    abs_total, abs_switch = [0.0] * n_a, [0.0] * n_a  # Σ|Δa| over tokens and features, all / switched
    active_count = torch.zeros(d_sae, dtype=torch.float64)
    gated_scale = torch.zeros(d_sae, dtype=torch.float64)  # Σ_tokens s_x · 1[active]
    base_sum = torch.zeros(d_sae, dtype=torch.float64)
    scale_sum = 0.0
    hook_err = [0.0] * n_a
    untouched_change = [0.0] * n_a
    for b_index, (ids, attention, mask, hidden) in enumerate(base):
        m = mask.to(hidden.device)
        h = hidden[m].float()
        h_sae = h.to(sae_device)
        pre_b = sae.pre_activations(h_sae).float()
        act_b = sae.encode(h_sae).float()
        on_b = act_b > 0
        s = _input_scale(sae, h_sae).double()
        active_count += on_b.sum(0).double().cpu()
        gated_scale += (s[:, None] * on_b.double()).sum(0).cpu()
        base_sum += act_b.double().sum(0).cpu()
        scale_sum += float(s.sum())
        other = attention.bool().to(hidden.device) & ~m
        for a_index, a_abs in enumerate(alphas_abs):
            with steer_hook(model, hook, direction, a_abs, positions=mask):
                steered = reader(ids.to(device), attention.to(device))
            hs = steered[m].float()
            expected = h + (a_abs * _unit(direction)).to(h.dtype)
            hook_err[a_index] = max(hook_err[a_index], float((hs - expected).abs().max()))
            if bool(other.any()):
                change = (steered[other] - hidden[other]).abs().max()
                untouched_change[a_index] = max(untouched_change[a_index], float(change))
            hs_sae = hs.to(sae_device)
            pre_s = sae.pre_activations(hs_sae).float()
            act_s = sae.encode(hs_sae).float()
            delta = act_s.double() - act_b.double()
            flipped = (act_s > 0) != on_b
            obs[a_index] += delta.sum(0).cpu()
            obs_pre[a_index] += (pre_s.double() - pre_b.double()).sum(0).cpu()
            switched[a_index] += flipped.double().sum(0).cpu()
            obs_switch[a_index] += (delta * flipped).sum(0).cpu()
            abs_total[a_index] += float(delta.abs().sum())
            abs_switch[a_index] += float((delta.abs() * flipped).sum())
        if progress:
            print(f"  batch {b_index + 1}/{len(batches)} done", flush=True)

    mean_scale = scale_sum / n_tokens
    selected = torch.arange(d_sae) if features is None else torch.tensor(features, dtype=torch.long)
    frames = []
    for a_index, (a, a_abs) in enumerate(zip(alphas, alphas_abs, strict=True)):
        frames.append(
            pd.DataFrame(
                {
                    "alpha": a,
                    "alpha_abs": a_abs,
                    "feature": selected.numpy().astype(np.int64),
                    "observed": (obs[a_index] / n_tokens)[selected].numpy(),
                    "predicted": (a_abs * mean_scale * coef)[selected].numpy(),
                    "predicted_gated": (a_abs * coef * gated_scale / n_tokens)[selected].numpy(),
                    "observed_pre": (obs_pre[a_index] / n_tokens)[selected].numpy(),
                    "observed_switch": (obs_switch[a_index] / n_tokens)[selected].numpy(),
                    "interference": coef[selected].numpy(),
                    "active_frac": (active_count / n_tokens)[selected].numpy(),
                    "switched_frac": (switched[a_index] / n_tokens)[selected].numpy(),
                    "base_mean": (base_sum / n_tokens)[selected].numpy(),
                    "is_task": (selected == int(task_feature)).numpy(),
                }
            )
        )
    df = pd.concat(frames, ignore_index=True)
    df.attrs["meta"] = {
        "hook": hook.name,
        "module": hook.module_path,
        "reads": "input" if hook.read_input else "output",
        "task_feature": int(task_feature),
        "alphas": alphas,
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
        "mean_input_scale": mean_scale,
        "n_prompts": len(contexts),
        "n_tokens": n_tokens,
        "switched_per_token": [float(switched[i].sum()) / n_tokens for i in range(n_a)],
        "switch_share": [abs_switch[i] / abs_total[i] if abs_total[i] > 0 else 0.0 for i in range(n_a)],
        "hook_max_error": hook_err,
        "untouched_max_change": untouched_change,
        "positions": "counted (no position 0, no special tokens, no padding)",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    df.attrs["summary"] = summarize(df).to_dict("records")
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per α and subset (SUBSETS): slope through the origin, R², Pearson r and n (see module doc)."""
    rows = []
    for (alpha, alpha_abs), part in df.groupby(["alpha", "alpha_abs"], sort=True):
        active = part[part["active_frac"] > 0]
        pairs = {
            "pre-activation": (part["observed_pre"], part["predicted"]),
            "all": (part["observed"], part["predicted"]),
            "all (gated)": (part["observed"], part["predicted_gated"]),
            "active": (active["observed"], active["predicted_gated"]),
        }
        for subset, (y, x) in pairs.items():
            slope, r2, n = fit_slope(y, x)
            rows.append(
                {
                    "alpha": float(alpha),
                    "alpha_abs": float(alpha_abs),
                    "subset": subset,
                    "slope": slope,
                    "r2": r2,
                    "pearson_r": pearson_r(y, x),
                    "n": n,
                }
            )
    return pd.DataFrame(rows, columns=["alpha", "alpha_abs", "subset", "slope", "r2", "pearson_r", "n"])


# ----------------------------------------------------------------------------------------- files
def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def _is_steering_output(path: Path) -> bool:
    try:
        df = load_steering(path)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return "meta" in df.attrs and set(FEATURE_COLUMNS) <= set(df.columns)


def save_steering(df: pd.DataFrame, path: str | Path) -> Path:
    """`.json`: {"meta", "summary", "features"}; `.parquet`: the feature rows, meta/summary in attrs.

    Written to a temporary file and renamed into place (a reader never sees half a file); an existing
    file is replaced only when it is an earlier steering output, never anything else."""
    import os
    import tempfile

    path = Path(path)
    if path.suffix not in (".json", ".parquet"):
        raise FeatureGeomError(f"--out must end in .json or .parquet, got {path.name!r}")
    if path.exists() and not (path.is_file() and _is_steering_output(path)):
        raise FeatureGeomError(
            f"--out {path} exists and is not an earlier steering output; featuregeom never "
            "replaces it. Choose another --out"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    meta, summary = df.attrs.get("meta", {}), df.attrs.get("summary") or summarize(df).to_dict("records")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if path.suffix == ".json":
            payload = {"meta": meta, "summary": summary, "features": df.to_dict("records")}
            tmp.write_text(json.dumps(_clean(payload), indent=1))
        else:
            out = df.copy()
            out.attrs = {"meta": _clean(meta), "summary": _clean(summary)}
            out.to_parquet(tmp, index=False)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_steering(path: str | Path) -> pd.DataFrame:
    """Read `save_steering`'s file back; meta and summary in `df.attrs`."""
    path = Path(path)
    if path.suffix == ".json":
        payload = json.loads(path.read_text())
        df = pd.DataFrame(payload["features"], columns=list(FEATURE_COLUMNS))
        df.attrs = {"meta": payload.get("meta", {}), "summary": payload.get("summary", [])}
        return df
    return pd.read_parquet(path)


# ---------------------------------------------------------------------------------------- figure
_ALPHA_COLORS = ["#93c5fd", "#60a5fa", "#3b82f6", "#1d4ed8", "#1e3a8a", "#172554"]
_TASK, _HARM, _INK = "#1d4ed8", "#c81e1e", "#111827"


def steering_figure(
    df: pd.DataFrame,
    task_feature: int,
    harmful_feature: int | None = None,
    x: str = "predicted_gated",
    show_task: bool = True,
):
    """Observed vs first-order predicted Δa per α, the y = x line, the task feature and the selected
    harmful feature highlighted. `x` is `predicted_gated` (first-order Taylor of the mean activation,
    default) or `predicted` (α·s·I_tj, the pre-activation shift). The steered feature itself moves
    by far the most at large α; `show_task=False` leaves it out so the other features fill the axes.
    Legend slopes/R² are fits over the plotted points."""
    import plotly.graph_objects as go

    if x not in ("predicted_gated", "predicted"):
        raise ValueError("x must be 'predicted_gated' or 'predicted'")
    if not show_task:
        df = df[df["feature"] != int(task_feature)]
    fig = go.Figure()
    meta = df.attrs.get("meta", {}) if hasattr(df, "attrs") else {}
    unit = {"norm": "·mean‖h‖", "rms": "·rms", "abs": ""}.get(meta.get("alpha_unit", "abs"), "")
    alphas = sorted(df["alpha"].unique()) if len(df) else []
    lo, hi = 0.0, 0.0
    for i, alpha in enumerate(alphas):
        part = df[df["alpha"] == alpha]
        y_col = "observed"
        slope, r2, _ = fit_slope(part[y_col], part[x])
        lo = min(lo, float(part[x].min()), float(part[y_col].min()))
        hi = max(hi, float(part[x].max()), float(part[y_col].max()))
        fig.add_trace(
            go.Scattergl(
                x=part[x],
                y=part[y_col],
                mode="markers",
                name=f"α={alpha:g}{unit} (slope {slope:.2f}, R² {r2:.2f})",
                marker={"size": 4, "color": _ALPHA_COLORS[i % len(_ALPHA_COLORS)], "opacity": 0.6},
                customdata=np.stack([part["feature"], part["active_frac"], part["predicted"]], axis=-1),
                hovertemplate="feature %{customdata[0]}<br>observed Δa %{y:.4g}<br>predicted %{x:.4g}"
                "<br>α·s·I %{customdata[2]:.4g}<br>active on %{customdata[1]:.1%} of tokens<extra></extra>",
            )
        )
    for feature, color, symbol, label in (
        (task_feature if show_task else None, _TASK, "diamond", "task"),
        (harmful_feature, _HARM, "star", "harmful"),
    ):
        if feature is None:
            continue
        sel = df[df["feature"] == int(feature)].sort_values("alpha")
        if sel.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=sel[x],
                y=sel["observed"],
                mode="markers+lines+text",
                name=f"{label} feature {int(feature)}",
                text=[f"α={a:g}" for a in sel["alpha"]],
                textposition="top center",
                marker={
                    "size": 13 if label == "harmful" else 11,
                    "color": color,
                    "symbol": symbol,
                    "line": {"width": 1, "color": "white"},
                },
                line={"color": color, "width": 1, "dash": "dot"},
            )
        )
    pad = 0.05 * (hi - lo or 1.0)
    fig.add_trace(
        go.Scatter(
            x=[lo - pad, hi + pad],
            y=[lo - pad, hi + pad],
            mode="lines",
            name="y = x",
            line={"color": _INK, "width": 1, "dash": "dash"},
            hoverinfo="skip",
        )
    )
    x_title = (
        "first-order predicted Δa (active features only)"
        if x == "predicted_gated"
        else "α·s·(W_enc[:,j]·d̂_t)"
    )
    fig.update_layout(
        title=f"Steering along feature {int(task_feature)}: observed vs predicted Δ activation",
        xaxis_title=x_title,
        yaxis_title="observed mean Δa_j",
        template="plotly_white",
        legend={"orientation": "v"},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


# -------------------------------------------------------------------------------------------- CLI
def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated feature ids, got {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `featuregeom steer`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Steering check: add α·d̂_task (the task feature's unit decoder row) to the residual at the hook on "
        "neutral prompts, read the SAE at the same hook, and compare every feature's mean change in activation "
        "with the first-order prediction α·(W_enc[:,j]·d̂_task). Prints slope and R² per α."
    )
    parser.epilog = (
        "Example:\n  featuregeom steer --model smollm2 --sae assets/sae/smollm2-135m-instruct-blocks.15."
        "hook_resid_post-topk \\\n      --hook blocks.15.hook_resid_post --task-feature 123 --harmful-feature 456 "
        "--out steer.json"
    )
    a = parser.add_argument
    a(
        "--model",
        default="smollm2",
        help="'smollm2' (packaged GGUF, default), a .gguf file, a local directory or a hub id",
    )
    a("--sae", default=None, help=f"SAE path (default {DEFAULT_SAE.relative_to(ROOT)})")
    a("--sae-format", default=None, help="force an SAE format instead of detecting it")
    a("--hook", default=None, help="hook to steer and read (default: the SAE's own hook name)")
    a(
        "--task-feature",
        type=non_negative_int,
        required=True,
        metavar="N",
        help="feature whose decoder direction is added",
    )
    a(
        "--harmful-feature",
        type=non_negative_int,
        default=None,
        metavar="M",
        help="feature to report observed vs predicted for",
    )
    a(
        "--features",
        type=_int_list,
        default=None,
        metavar="J,K,...",
        help="restrict the table and fits to these features (default all)",
    )
    a(
        "--alphas",
        type=_float_list,
        default=list(DEFAULT_ALPHAS),
        metavar="A,B,...",
        help="steering strengths in --alpha-unit (default "
        + ",".join(f"{x:g}" for x in DEFAULT_ALPHAS)
        + ")",
    )
    a(
        "--alpha-unit",
        choices=ALPHA_UNITS,
        default="norm",
        help="norm: fraction of the mean residual norm on the prompts (default); rms: multiples of mean‖h‖/√d; "
        "abs: absolute",
    )
    a(
        "--prompts",
        default=None,
        metavar="FILE",
        help="neutral prompts (any corpus file, each record one user turn); default: the benign Self-Instruct "
        "seed tasks (assets/data/benign/self_instruct_seed_tasks.jsonl, field instruction)",
    )
    a("--text-field", default=None, help="field of --prompts holding the text")
    a("--n-prompts", type=positive_int, default=32, help="prompts to use (seeded shuffle; default 32)")
    a("--context-size", type=positive_int, default=128, help="tokens kept per prompt (default 128)")
    a("--batch-size", type=positive_int, default=8, help="prompts per forward pass (default 8)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--seed", type=seed_int, default=0, help="seed of the prompt shuffle")
    a("--out", default=None, metavar="FILE.json|FILE.parquet", help="write the per-feature table here")


def _print_summary(df: pd.DataFrame, harmful: int | None) -> None:
    meta = df.attrs.get("meta", {})
    summary = pd.DataFrame(df.attrs.get("summary") or summarize(df).to_dict("records"))
    print(
        f"hook {meta.get('hook')}  task feature {meta.get('task_feature')}  {meta.get('n_prompts')} prompts, "
        f"{meta.get('n_tokens')} counted tokens  mean‖h‖ {meta.get('mean_residual_norm', float('nan')):.3g}  "
        f"SAE {meta.get('architecture')} k={meta.get('k')} norm={meta.get('normalize_activations')}"
    )
    header = f"{'alpha':>7} {'|α|':>9} {'subset':<15} {'slope':>8} {'R²':>8} {'r':>7} {'n':>7}"
    print(header)
    print("-" * len(header))
    for row in summary.itertuples(index=False):
        print(
            f"{row.alpha:>7g} {row.alpha_abs:>9.4g} {row.subset:<15} {row.slope:>8.4f} {row.r2:>8.4f} "
            f"{row.pearson_r:>7.4f} {row.n:>7d}"
        )
    switched, share = meta.get("switched_per_token") or [], meta.get("switch_share") or []
    if switched:
        print(
            "features entering/leaving the active set per token: "
            + ", ".join(f"α={a:g}: {s:.2f}" for a, s in zip(meta["alphas"], switched, strict=False))
        )
    if share:
        print(
            "share of Σ|Δa| from those entries/exits (not first-order): "
            + ", ".join(f"α={a:g}: {s:.0%}" for a, s in zip(meta["alphas"], share, strict=False))
        )
    for label, feature in (("task", meta.get("task_feature")), ("harmful", harmful)):
        if feature is None:
            continue
        sel = df[df["feature"] == int(feature)].sort_values("alpha")
        if sel.empty:
            continue
        print(
            f"{label} feature {int(feature)}: I = W_enc·d̂_t = {float(sel['interference'].iloc[0]):.4g}, "
            f"active on {float(sel['active_frac'].iloc[0]):.1%} of tokens"
        )
        for r in sel.itertuples(index=False):
            print(
                f"  α={r.alpha:g}: observed Δa {r.observed:+.4g}  predicted (gated) {r.predicted_gated:+.4g}  "
                f"α·s·I {r.predicted:+.4g}  Δpre {r.observed_pre:+.4g}  switched {r.switched_frac:.1%}"
            )


def run(args: argparse.Namespace) -> int:
    """`featuregeom steer`: load model and SAE, run `steering_check`, print and write the result."""
    from precompute.model.load import load_model
    from precompute.sae.registry import check_compatible, load_sae

    sae_path = args.sae or str(DEFAULT_SAE)
    lm = load_model(args.model, device=args.device)
    sae = load_sae(sae_path, format=args.sae_format, device=str(lm.device))
    for warning in check_compatible(sae, lm.d_model, lm.name):
        print(f"warning: {warning}")
    hook = args.hook or sae.hook_name
    if not hook:
        raise FeatureGeomError("the SAE names no hook; pass --hook (e.g. blocks.15.hook_resid_post)")
    if args.harmful_feature is not None and not 0 <= args.harmful_feature < sae.d_sae:
        raise FeatureGeomError(
            f"harmful feature {args.harmful_feature} is out of range; the SAE has {sae.d_sae}"
        )
    prompts = load_prompts(args.prompts, n=args.n_prompts, text_field=args.text_field, seed=args.seed)
    df = steering_check(
        lm,
        hook,
        sae,
        args.task_feature,
        alphas=args.alphas,
        prompts=prompts,
        features=args.features,
        batch_size=args.batch_size,
        alpha_unit=args.alpha_unit,
        context_size=args.context_size,
    )
    _print_summary(df, args.harmful_feature)
    if args.out:
        print(f"wrote {save_steering(df, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m precompute.lab.steer ...` is `featuregeom steer ...` (one place handles errors)."""
    from precompute.cli import main as cli_main

    return cli_main(["steer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
