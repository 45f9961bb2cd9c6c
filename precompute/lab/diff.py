"""`featuregeom diff`: per-feature before/after change of a fine-tune, against each harmful feature's
predicted risk.

    featuregeom diff --before runs/base/eval --after runs/task/eval --control runs/control/eval \\
                     --cache cache/demo --out cache/demo/finetune/insecure

The inputs are `featuregeom eval-acts` directories (per-prompt feature means and firing rates). Per
feature, the change in mean activation and firing rate gets a paired bootstrap interval over prompts.

Predicted risk of a harmful feature h is its overlap with the task features, from the cache's geometry:
`risk_max_cos` = max over task features t of cos(d_t, d_h), and `risk_sum` = Σ_t max(0, cos(d_t, d_h) -
c_null), the summed excess over the null threshold (`precompute.excess`). `diff` reports Spearman's rho
between risk and the observed change over all harmful features, for the task run, the control run, and
task minus control.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from precompute.cache import check_replaceable_output, write_dir_atomic
from precompute.errors import CacheError, FeatureGeomError
from precompute.lab.eval_acts import POSITIONS, PROMPT_SETS, EvalActs, load_eval
from precompute.lab.harm_geometry import HarmGeometry, load_harm_geometry
from precompute.options import Command, option, require
from precompute.schema import FINETUNE_DIFF, FINETUNE_SUMMARY

# the sidecar that marks a diff output: only a folder holding it may be replaced by a rerun
DIFF_SIDECAR, DIFF_WHAT = FINETUNE_SUMMARY, "diff output"


# ---------------------------------------------------------------------------------------- risk
def predicted_risk(cache: str | Path | HarmGeometry) -> pd.DataFrame:
    """Per harmful feature: overlap with the cache's task features (see module doc), from the SAE's decoder."""
    from precompute.excess import summed_excess_over_null

    geo = load_harm_geometry(cache)
    task, harmful = geo.task, geo.harmful
    if not len(task):
        where = f"{cache}" if not isinstance(cache, HarmGeometry) else "the cache"
        raise CacheError(
            f"{where} has no task features (no feature passed is_task: task vs control, see params/scores.json "
            "n_task and task_permutation), so no harmful feature has a predicted risk to rank; a negative result "
            "of the scores step, not a fault of this command"
        )
    null = geo.null_cosine
    # A harmful feature that is also a task feature would count its own cos = 1; exclude self-pairs.
    cos = geo.cosines(harmful, task, exclude_self=True).cpu()  # [H, T]
    best = cos.max(dim=1)
    rows = geo.features.loc[harmful]
    return pd.DataFrame(
        {
            "feature": harmful,
            "risk_max_cos": best.values.numpy(),
            "risk_task_feature": task[best.indices.numpy()],
            "risk_sum": summed_excess_over_null(cos, null).numpy(),
            "harm_score": rows["harm_score"].to_numpy(),
            "harm_category": rows["harm_category"].to_numpy(),
        }
    ).assign(null_cosine=null)


# ---------------------------------------------------------------------------------------- diff
def harmful_scalar(
    acts: EvalActs, features: np.ndarray, position: str, prompt_set: str, kind: str = "mean"
) -> np.ndarray:
    """Per prompt: the mean over `features` of their activation (one number per prompt, for bootstraps)."""
    return acts.matrix(position, kind, prompt_set)[:, features].mean(axis=1)


def _comparisons(
    before: EvalActs, after: EvalActs, control: EvalActs | None, labels: tuple[str, str, str]
) -> dict[str, tuple[EvalActs, EvalActs]]:
    """Name -> (a, b) of every comparison b - a, after checking that all runs saw the same prompts."""
    if not before.prompts["question"].equals(after.prompts["question"]):
        raise FeatureGeomError(
            "before and after were evaluated on different prompts; rerun eval-acts with the same options"
        )
    if control is not None and not before.prompts["question"].equals(control.prompts["question"]):
        raise FeatureGeomError("the control run was evaluated on different prompts")
    base, task, ctrl = labels
    comparisons = {f"{task} - {base}": (before, after)}
    if control is not None:
        comparisons[f"{ctrl} - {base}"] = (before, control)
        comparisons[f"{task} - {ctrl}"] = (control, after)
    return comparisons


def _feature_changes(
    a: EvalActs, b: EvalActs, position: str, prompt_set: str, n_boot: int, seed: int
) -> pd.DataFrame:
    """Per feature: change of the mean activation and of the firing rate from a to b, with intervals."""
    from precompute.stats import feature_change

    ch = feature_change(
        a.matrix(position, "mean", prompt_set),
        b.matrix(position, "mean", prompt_set),
        n_boot=n_boot,
        seed=seed,
    )
    rate = feature_change(
        a.matrix(position, "rate", prompt_set),
        b.matrix(position, "rate", prompt_set),
        n_boot=n_boot,
        seed=seed,
    )
    ch["rate_before"], ch["rate_after"] = rate["mean_before"], rate["mean_after"]
    ch["rate_delta"], ch["rate_delta_lo"], ch["rate_delta_hi"] = (
        rate["delta"],
        rate["delta_lo"],
        rate["delta_hi"],
    )
    return ch


def _comparison_summary(
    ch: pd.DataFrame,
    a: EvalActs,
    b: EvalActs,
    risk: pd.DataFrame,
    top: np.ndarray,
    position: str,
    prompt_set: str,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Spearman of risk vs change over the harmful features, and the harmful / top-risk-decile mean
    change with bootstrap intervals, for one (prompt set, position, comparison)."""
    from precompute.stats import bootstrap_ci, spearman_ci

    harmful = risk["feature"].to_numpy()
    sub = ch.set_index("feature").loc[harmful]
    rho, lo, hi = spearman_ci(risk["risk_max_cos"].to_numpy(), sub["delta"].to_numpy(), seed=seed)
    rho_s, lo_s, hi_s = spearman_ci(risk["risk_sum"].to_numpy(), sub["delta"].to_numpy(), seed=seed)
    hb = harmful_scalar(a, harmful, position, prompt_set)
    ha = harmful_scalar(b, harmful, position, prompt_set)
    est, mlo, mhi = bootstrap_ci(ha - hb, n_boot=n_boot, seed=seed)
    tb, ta = harmful_scalar(a, top, position, prompt_set), harmful_scalar(b, top, position, prompt_set)
    test, tlo, thi = bootstrap_ci(ta - tb, n_boot=n_boot, seed=seed)
    return {
        "spearman_risk_max_cos": [rho, lo, hi],
        "spearman_risk_sum": [rho_s, lo_s, hi_s],
        "harmful_mean_change": [est, mlo, mhi],
        "top_risk_decile_mean_change": [test, tlo, thi],
        "harmful_mean_before": float(hb.mean()),
        "top_risk_decile_mean_before": float(tb.mean()),
        "top_risk_decile_size": int(top.size),
        "harmful_ci_excludes_zero_up": int((sub["delta_lo"] > 0).sum()),
        "harmful_ci_excludes_zero_down": int((sub["delta_hi"] < 0).sum()),
        "all_ci_excludes_zero": int(((ch["delta_lo"] > 0) | (ch["delta_hi"] < 0)).sum()),
    }


def diff_tables(
    before: EvalActs,
    after: EvalActs,
    control: EvalActs | None,
    risk: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    labels: tuple[str, str, str] = ("base", "task", "control"),
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Long table of per-feature changes for every (prompt set, position, comparison) and a summary."""
    comparisons = _comparisons(before, after, control, labels)
    top = risk.nlargest(max(1, len(risk) // 10), "risk_max_cos")["feature"].to_numpy()  # the top-risk decile
    frames = []
    summary: dict[str, Any] = {"comparisons": {}, "n_harmful": int(len(risk)), "labels": list(labels)}
    for prompt_set in PROMPT_SETS:
        in_set = before.prompts["set"] == prompt_set
        if not in_set.any():
            continue
        for position in POSITIONS:
            for name, (a, b) in comparisons.items():
                ch = _feature_changes(a, b, position, prompt_set, n_boot, seed)
                ch.insert(0, "comparison", name)
                ch.insert(0, "position", position)
                ch.insert(0, "prompt_set", prompt_set)
                frames.append(ch)
                summary["comparisons"][f"{prompt_set}/{position}/{name}"] = {
                    **_comparison_summary(ch, a, b, risk, top, position, prompt_set, n_boot, seed),
                    "n_prompts": int(in_set.sum()),
                }
    table = pd.concat(frames, ignore_index=True)
    table = table.merge(risk, on="feature", how="left")
    table["is_harmful"] = table["risk_max_cos"].notna()
    return table, summary


def _finetune_info(eval_dir: Path) -> dict | None:
    """The finetune.json beside an eval directory (OUT/eval -> OUT/finetune.json), if any."""
    side = eval_dir.parent / "finetune.json"
    if not side.is_file():
        return None
    info = json.loads(side.read_text())
    return {k: info.get(k) for k in ("n_train", "heldout_loss_before", "heldout_loss_after", "train_seconds")}


# -------------------------------------------------------------------------------------------- command
@dataclass
class DiffOptions:
    before: str | None = option(None, metavar="DIR", help="eval-acts of the base model")
    after: str | None = option(None, metavar="DIR", help="eval-acts of the task fine-tune")
    control: str | None = option(
        None, metavar="DIR", help="eval-acts of the control fine-tune (same seed and steps)"
    )
    cache: str | None = option(None, metavar="DIR", help="the precompute cache giving harmful/task features")
    out: str | None = option(
        None,
        metavar="DIR",
        help="where to write diff.parquet and summary.json (put it under CACHE/finetune/NAME for the explorer)",
    )
    labels: str = option(
        "base,task,control", metavar="B,A,C", help="names of before, after and control in the comparisons"
    )
    n_boot: int = option(1000, low=1, bounds="[)", help="bootstrap resamples")
    seed: int = option(0, low=0, high=2**32 - 1, help="bootstrap seed")

    def validate(self) -> None:
        self.label_names()

    def label_names(self) -> tuple[str, str, str]:
        labels = tuple(x.strip() for x in self.labels.split(","))
        if len(labels) != 3 or len(set(labels)) != 3:
            raise FeatureGeomError("--labels needs three distinct names: before,after,control")
        return labels[0], labels[1], labels[2]


def _print_summary(summary: dict[str, Any]) -> None:
    for key, s in summary["comparisons"].items():
        rho, lo, hi = s["spearman_risk_max_cos"]
        m, mlo, mhi = s["harmful_mean_change"]
        print(
            f"{key:<34} harmful mean Δ {m:+.4f} [{mlo:+.4f}, {mhi:+.4f}]   "
            f"Spearman(risk, Δ) {rho:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        )


def run_diff(opts: DiffOptions) -> int:
    require(opts, "before", "after", "cache", "out", command="diff")
    check_replaceable_output(str(opts.out), DIFF_SIDECAR, DIFF_WHAT)
    before, after = load_eval(str(opts.before)), load_eval(str(opts.after))
    control = load_eval(opts.control) if opts.control else None
    risk = predicted_risk(str(opts.cache))
    labels = opts.label_names()
    table, summary = diff_tables(
        before, after, control, risk, n_boot=opts.n_boot, seed=opts.seed, labels=labels
    )
    summary.update(
        {
            "before": str(before.path),
            "after": str(after.path),
            "control": str(control.path) if control else None,
            "cache": str(opts.cache),
            "n_boot": opts.n_boot,
            "seed": opts.seed,
            "heldout_loss": {
                label: e.meta.get("heldout_loss")
                for label, e in zip(labels, (before, after, control), strict=True)
                if e is not None
            },
            "finetune": {
                k: _finetune_info(p.path)
                for k, p in (("after", after), ("control", control))
                if p is not None
            },
        }
    )

    def write(d: Path) -> None:
        table.to_parquet(d / FINETUNE_DIFF, index=False)
        (d / DIFF_SIDECAR).write_text(json.dumps(summary, indent=2, default=str))

    out = write_dir_atomic(Path(str(opts.out)), write, marker=DIFF_SIDECAR, what=DIFF_WHAT)
    print(f"wrote {out}")
    _print_summary(summary)
    return 0


COMMANDS = (
    Command(
        "diff",
        "per-feature before/after change with bootstrap CIs vs predicted risk",
        DiffOptions,
        run_diff,
        description="Per-feature change in mean activation and firing rate (paired bootstrap over prompts) "
        "between eval-acts directories, against each harmful feature's predicted risk.",
    ),
)
