"""`featuregeom steer`: the steering check on a model and SAE, printed and optionally written to a file.

    featuregeom steer --model smollm2 --sae assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk \\
        --hook blocks.15.hook_resid_post --task-feature 123 --harmful-feature 456 --out steer.json

What is measured and how to read it: `precompute.lab.steering`; the result file:
`precompute.lab.steering_results`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pandas as pd

from precompute.defaults import DEFAULT_SAE, relative
from precompute.errors import ConfigError, FeatureGeomError
from precompute.lab.steering_results import ALPHA_UNITS, DEFAULT_ALPHAS
from precompute.options import Command, feature_ids, option
from precompute.pipeline.config import DEVICES, MODEL_HELP

# The steering maths (`precompute.lab.steering`) imports torch: only `run_steer` loads it.


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


@dataclass
class SteerOptions:
    model: str = option("smollm2", help=MODEL_HELP)
    sae: str | None = option(None, help=f"SAE path (default {relative(DEFAULT_SAE)})")
    sae_format: str | None = option(None, help="force an SAE format instead of detecting it")
    hook: str | None = option(None, help="hook to steer and read (default: the SAE's own hook name)")
    task_feature: int | None = option(
        None, low=0, bounds="[)", metavar="N", help="feature whose decoder direction is added (required)"
    )
    harmful_feature: int | None = option(
        None, low=0, bounds="[)", metavar="M", help="feature to report observed vs predicted for"
    )
    features: list[int] | None = option(
        None,
        low=0,
        bounds="[)",
        parse=feature_ids,
        metavar="J,K,...",
        help="restrict the table and fits to these features (default all)",
    )
    alphas: list[float] = option(
        default_factory=lambda: list(DEFAULT_ALPHAS),
        parse=_float_list,
        metavar="A,B,...",
        help="steering strengths in --alpha-unit (default "
        + ",".join(f"{x:g}" for x in DEFAULT_ALPHAS)
        + ")",
    )
    alpha_unit: str = option(
        "norm",
        choices=ALPHA_UNITS,
        help="norm: fraction of the mean residual norm on the prompts; rms: multiples of mean‖h‖/√d; "
        "abs: absolute",
    )
    prompts: str | None = option(
        None,
        metavar="FILE",
        help="neutral prompts (any corpus file, each record one user turn); default: the benign Self-Instruct "
        "seed tasks (assets/data/benign/self_instruct_seed_tasks.jsonl, field instruction)",
    )
    text_field: str | None = option(None, help="field of --prompts holding the text")
    n_prompts: int = option(32, low=1, bounds="[)", help="prompts to use (seeded shuffle)")
    context_size: int = option(128, low=1, bounds="[)", help="tokens kept per prompt")
    batch_size: int = option(8, low=1, bounds="[)", help="prompts per forward pass")
    device: str = option("auto", choices=DEVICES, help="where to run")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed of the prompt shuffle")
    out: str | None = option(None, metavar="FILE.json|FILE.parquet", help="write the per-feature table here")


def _print_fits(df: pd.DataFrame) -> None:
    from precompute.lab.steering_results import summarize

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


def _print_features(df: pd.DataFrame, harmful: int | None) -> None:
    for label, feature in (("task", df.attrs.get("meta", {}).get("task_feature")), ("harmful", harmful)):
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


def run_steer(opts: SteerOptions) -> int:
    """`featuregeom steer`: load model and SAE, run `steering_check`, print and write the result."""
    from precompute.lab.steering import load_prompts, steering_check
    from precompute.lab.steering_results import save_steering
    from precompute.model.load import load_model
    from precompute.sae.registry import load_sae_for_model

    if opts.task_feature is None:  # 0 is a feature, so not `require`
        raise ConfigError("`featuregeom steer` needs --task-feature (on the command line or in --config)")
    lm = load_model(opts.model, device=opts.device)
    sae, _ = load_sae_for_model(
        opts.sae or str(DEFAULT_SAE),
        opts.sae_format,
        d_model=lm.d_model,
        model_name=lm.name,
        device=str(lm.device),
    )
    hook = opts.hook or sae.hook_name
    if not hook:
        raise FeatureGeomError("the SAE names no hook; pass --hook (e.g. blocks.15.hook_resid_post)")
    if opts.harmful_feature is not None and not 0 <= opts.harmful_feature < sae.d_sae:
        raise FeatureGeomError(
            f"harmful feature {opts.harmful_feature} is out of range; the SAE has {sae.d_sae}"
        )
    prompts = load_prompts(opts.prompts, n=opts.n_prompts, text_field=opts.text_field, seed=opts.seed)
    df = steering_check(
        lm,
        hook,
        sae,
        opts.task_feature,
        alphas=opts.alphas,
        prompts=prompts,
        features=opts.features,
        batch_size=opts.batch_size,
        alpha_unit=opts.alpha_unit,
        context_size=opts.context_size,
    )
    _print_fits(df)
    _print_features(df, opts.harmful_feature)
    if opts.out:
        print(f"wrote {save_steering(df, opts.out)}")
    return 0


COMMANDS = (
    Command(
        "steer",
        "steering check: observed vs first-order predicted feature changes",
        SteerOptions,
        run_steer,
        description="Steering check: add α·d̂_task (the task feature's unit decoder row) to the residual at the "
        "hook on neutral prompts, read the SAE at the same hook, and compare every feature's mean change in "
        "activation with the first-order prediction α·(W_enc[:,j]·d̂_task). Prints slope and R² per α. "
        "Example: featuregeom steer --model smollm2 --sae "
        "assets/sae/smollm2-135m-instruct-blocks.15.hook_resid_post-topk --hook blocks.15.hook_resid_post "
        "--task-feature 123 --harmful-feature 456 --out steer.json",
    ),
)
