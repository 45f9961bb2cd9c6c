"""`featuregeom diff`: what fine-tuning on the task did to the harmful features, beyond what fine-tuning
on the control did, against each harmful feature's predicted risk, over several training seeds.

    featuregeom diff --before runs/base/eval \\
        --after runs/task-s0/eval runs/task-s1/eval runs/task-s2/eval \\
        --control runs/control-s0/eval runs/control-s1/eval runs/control-s2/eval \\
        --cache cache/demo --out cache/demo/finetune/insecure

Inputs are `featuregeom eval-acts` directories (per-prompt feature means and firing rates, and the
log-prob readout when present): one for the base model, one per training seed for each arm. Every
interval is a hierarchical bootstrap (precompute/lab/hboot.py): training seeds, then prompts within
seed, prompts clustered by base question. Per comparison (precompute/lab/diff_stats.py) the summary
gives rho(risk, Δ) against a null band from frequency-matched random reference sets, harmful minus
closeness- and frequency-matched non-harmful features (for task − control: the difference in
differences), and every statistic's single-seed values with whether its interval covers them.

The task set is `is_task` (`--task-set strict`). A cache without task features is a negative result of
the scores step: the diff exits 2 and says so. `--task-set ranked:N` runs the machinery on the N most
task-leaning features instead, and every output says `exploratory`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from precompute.cache import check_replaceable_output, write_dir_atomic
from precompute.errors import FeatureGeomError
from precompute.lab.eval_acts import POSITIONS, PROMPT_SETS, EvalActs, load_eval
from precompute.lab.hboot import PAIRINGS, SEED_CORRECTIONS, Design, Draws, cluster_codes, draw
from precompute.lab.risk import DiffGeometry, diff_geometry, predicted_risk
from precompute.lab.synth.jsonable import jsonable
from precompute.options import Command, option, require
from precompute.schema import FINETUNE_DIFF, FINETUNE_SUMMARY

__all__ = ["DiffOptions", "diff_tables", "predicted_risk", "run_diff"]

# the sidecar that marks a diff output: only a folder holding it may be replaced by a rerun
DIFF_SIDECAR, DIFF_WHAT = FINETUNE_SUMMARY, "diff output"


@dataclass
class Runs:
    """The eval-acts results compared: one base, one per seed of each arm."""

    base: EvalActs
    task: list[EvalActs]
    control: list[EvalActs]

    def all(self) -> list[EvalActs]:
        return [self.base, *self.task, *self.control]

    def check_prompts(self) -> None:
        ref = self.base.prompts["question"]
        for e in self.all()[1:]:
            if not ref.equals(e.prompts["question"]):
                raise FeatureGeomError(
                    f"{e.path} was evaluated on other prompts than {self.base.path}; rerun eval-acts with the "
                    "same options for every model"
                )

    def clusters(self, prompt_set: str) -> np.ndarray:
        """Base-question cluster codes of the set's prompts (older eval-acts: derived from the text)."""
        p = self.base.prompts
        if "base_id" in p.columns:
            ids = p["base_id"].astype(str).tolist()
        else:
            from precompute.lab.em_prompts import base_ids

            ids = base_ids(p["question"].astype(str).tolist(), p["set"].astype(str).tolist())
        return cluster_codes([i for i, s in zip(ids, p["set"], strict=True) if s == prompt_set])

    def stack(
        self, position: str, kind: str, prompt_set: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        base = self.base.matrix(position, kind, prompt_set)
        task = np.stack([e.matrix(position, kind, prompt_set) for e in self.task])
        control = (
            np.stack([e.matrix(position, kind, prompt_set) for e in self.control]) if self.control else None
        )
        return base, task, control


@dataclass(frozen=True)
class Resampling:
    """How intervals are drawn (precompute/lab/hboot.py)."""

    n_boot: int = 1000
    seed: int = 0
    pairing: str = "auto"
    prompt_draw: str = "shared"
    seed_correction: str = "t"

    def pairing_for(self, runs: Runs) -> str:
        """`auto`: seeds paired by index when both arms have as many (task seed s and control seed s share
        the training seed: its LoRA initialisation and batch order), else independent."""
        if self.pairing != "auto":
            return self.pairing
        return "paired" if runs.control and len(runs.control) == len(runs.task) else "independent"

    def draws(self, runs: Runs, clusters: np.ndarray) -> Draws:
        seeds = {"task": len(runs.task)}
        if runs.control:
            seeds["control"] = len(runs.control)
        design = Design(seeds, clusters, self.pairing_for(runs), self.prompt_draw, self.seed_correction)
        return draw(design, self.n_boot, self.seed)


def diff_tables(
    runs: Runs,
    geo: DiffGeometry,
    resampling: Resampling = Resampling(),
    labels: tuple[str, str, str] = ("base", "task", "control"),
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Long table of per-feature changes for every (prompt set, position, comparison) and a summary."""
    from precompute.lab.diff_stats import comparison_summary, comparisons, feature_frame

    runs.check_prompts()
    frames = []
    summary: dict[str, Any] = {"comparisons": {}, "n_harmful": int(len(geo.risk)), "labels": list(labels)}
    summary["clusters"] = {}
    for prompt_set in PROMPT_SETS:
        in_set = runs.base.prompts["set"] == prompt_set
        if not in_set.any():
            continue
        clusters = runs.clusters(prompt_set)
        draws = resampling.draws(runs, clusters)
        summary["clusters"][prompt_set] = {
            "n_prompts": int(in_set.sum()),
            "n_clusters": int(clusters.max() + 1),
        }
        for position in POSITIONS:
            means = comparisons(draws, *runs.stack(position, "mean", prompt_set), labels)
            rates = comparisons(draws, *runs.stack(position, "rate", prompt_set), labels)
            for mean, rate in zip(means, rates, strict=True):
                ch = feature_frame(mean, rate)
                ch.insert(0, "comparison", mean.name)
                ch.insert(0, "position", position)
                ch.insert(0, "prompt_set", prompt_set)
                frames.append(ch)
                summary["comparisons"][f"{prompt_set}/{position}/{mean.name}"] = {
                    **comparison_summary(mean, geo),
                    "n_prompts": int(in_set.sum()),
                    "n_clusters": int(clusters.max() + 1),
                }
    table = pd.concat(frames, ignore_index=True).merge(geo.risk, on="feature", how="left")
    table["is_harmful"] = table["risk_max_cos"].notna()
    table["task_set"] = geo.task_set.label
    return table, summary


def behaviour(runs: Runs, resampling: Resampling, labels: tuple[str, str, str]) -> dict[str, Any]:
    """The log-prob readout (precompute/lab/logprob.py) of every model, when every eval directory has one."""
    from precompute.lab.diff_stats import behaviour_summary, comparisons
    from precompute.lab.logprob import MEASURES, load_logprob

    tables = [load_logprob(e.path) for e in runs.all()]
    missing = [str(e.path) for e, t in zip(runs.all(), tables, strict=True) if t is None]
    if missing:
        return {"available": False, "reason": f"no logprob.parquet in {', '.join(missing)} (rerun eval-acts)"}
    frames = [t for t in tables if t is not None]
    for e, t in zip(runs.all(), frames, strict=True):
        if not t["question_id"].equals(frames[0]["question_id"]):
            raise FeatureGeomError(
                f"{e.path}: its log-prob readout covers other questions than the base model's"
            )
    values = [t[list(MEASURES)].to_numpy(np.float64) for t in frames]
    n_task = len(runs.task)
    base, task = values[0], np.stack(values[1 : 1 + n_task])
    control = np.stack(values[1 + n_task :]) if runs.control else None
    clusters = cluster_codes(frames[0]["base_id"].tolist())
    draws = resampling.draws(runs, clusters)
    levels = {labels[0]: (base.mean(axis=0), draws.prompt_replicates(base))}
    levels[labels[1]] = (task.mean(axis=(0, 1)), draws.replicates("task", task))
    if control is not None:
        levels[labels[2]] = (control.mean(axis=(0, 1)), draws.replicates("control", control))
    out = behaviour_summary(comparisons(draws, base, task, control, labels), levels, MEASURES)
    out.update(available=True, n_prompts=len(frames[0]), n_base_questions=int(clusters.max() + 1))
    return out


def _finetune_info(eval_dir: Path) -> dict | None:
    """The finetune.json beside an eval directory (OUT/eval -> OUT/finetune.json), if any."""
    side = eval_dir.parent / "finetune.json"
    if not side.is_file():
        return None
    info = json.loads(side.read_text())
    keys = ("n_train", "heldout_loss_before", "heldout_loss_after", "train_seconds", "response_token_share")
    return {k: info.get(k) for k in (*keys, "options")} | {"seed": (info.get("options") or {}).get("seed")}


# -------------------------------------------------------------------------------------------- command
@dataclass
class DiffOptions:
    before: str | None = option(None, metavar="DIR", help="eval-acts of the base model")
    after: list[str] = option(
        default_factory=list,
        nargs="+",
        metavar="DIR",
        help="eval-acts of the task fine-tune, one per training seed",
    )
    control: list[str] = option(
        default_factory=list,
        nargs="+",
        metavar="DIR",
        help="eval-acts of the control fine-tune, one per training seed (same recipe, control data)",
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
    task_set: str = option(
        "strict",
        metavar="SET",
        help="task features: 'strict' (is_task) or 'ranked:N' (the N most task-leaning by task_score; exploratory)",
    )
    min_seeds: int = option(
        3,
        low=1,
        bounds="[)",
        help="training seeds each arm needs (fewer: the seed-level interval is not estimable)",
    )
    seed_pairing: str = option(
        "auto",
        choices=("auto", *PAIRINGS),
        help="resample seeds as pairs (after[k] with control[k]: same training seed, or a patch of it) or each "
        "arm on its own; auto: paired when both arms have as many seeds",
    )
    prompt_draw: str = option(
        "shared",
        choices=("shared", "per_seed"),
        help="one prompt-cluster draw for every seed (crossed design: same prompts), or one per seed (nested)",
    )
    seed_correction: str = option(
        "t",
        choices=SEED_CORRECTIONS,
        help="small-sample correction of the seed level (precompute/lab/hboot.py): t quantile, unbiased variance, none",
    )
    n_reference: int = option(
        200, low=1, bounds="[)", help="frequency-matched reference sets of the rho null band"
    )
    frequency_bins: int = option(
        10, low=1, bounds="[)", help="firing-frequency bins the reference sets match"
    )
    match_bins: int = option(
        5, low=1, bounds="[)", help="frequency and closeness bins of the harmful-vs-matched comparison"
    )
    n_boot: int = option(1000, low=1, bounds="[)", help="bootstrap resamples")
    seed: int = option(0, low=0, high=2**32 - 1, help="bootstrap and reference-set seed")

    def validate(self) -> None:
        self.label_names()

    def label_names(self) -> tuple[str, str, str]:
        labels = tuple(x.strip() for x in self.labels.split(","))
        if len(labels) != 3 or len(set(labels)) != 3:
            raise FeatureGeomError("--labels needs three distinct names: before,after,control")
        return labels[0], labels[1], labels[2]


def _load_runs(opts: DiffOptions) -> Runs:
    for name, dirs in (("--after", opts.after), ("--control", opts.control)):
        if dirs and len(dirs) < opts.min_seeds:
            raise FeatureGeomError(
                f"{name} names {len(dirs)} eval director{'y' if len(dirs) == 1 else 'ies'}, one per training seed; "
                f"the diff needs at least {opts.min_seeds} per arm so that its intervals cover the seed-to-seed "
                f"variation (train more seeds, or pass --min-seeds {len(dirs)} and read the intervals as "
                "covering fewer seeds)"
            )
    if opts.seed_pairing == "paired" and opts.control and len(opts.after) != len(opts.control):
        raise FeatureGeomError("--seed-pairing paired needs as many --after as --control directories")
    return Runs(
        load_eval(str(opts.before)), [load_eval(d) for d in opts.after], [load_eval(d) for d in opts.control]
    )


def _print_summary(summary: dict[str, Any], label: str) -> None:
    tag = "EXPLORATORY " if summary["exploratory"] else ""
    print(f"{tag}task set {label}")
    for key, s in summary["comparisons"].items():
        rho, lo, hi = s["spearman_risk_max_cos"]
        null = s["rho_null"]
        m, mlo, mhi = s["harmful_mean_change"]
        did = s["harmful_minus_matched"]
        did_text = (
            f"harmful − matched {did[0]:+.4f} [{did[1]:+.4f}, {did[2]:+.4f}]"
            if did
            else "no matched features"
        )
        print(
            f"{tag}{key:<34} harmful Δ {m:+.4f} [{mlo:+.4f}, {mhi:+.4f}]  ρ(risk, Δ) {rho:+.3f} [{lo:+.3f}, {hi:+.3f}] "
            f"null {null['mean']:+.3f} [{null['lo']:+.3f}, {null['hi']:+.3f}] p {null['p_greater']:.3f}  {did_text}"
        )
    beh = summary["behaviour"]
    if beh.get("available"):
        for name, entry in beh["comparisons"].items():
            est, lo, hi = entry["margin"]
            print(f"{tag}log-prob margin (misaligned − aligned) {name:<22} {est:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    else:
        print(f"log-prob readout: {beh.get('reason')}")


def run_diff(opts: DiffOptions) -> int:
    require(opts, "before", "cache", "out", command="diff")
    if not opts.after:
        raise FeatureGeomError(
            "diff needs --after DIR ... (the task fine-tune's eval-acts, one per training seed)"
        )
    check_replaceable_output(str(opts.out), DIFF_SIDECAR, DIFF_WHAT)
    runs = _load_runs(opts)  # cheap: bad eval directories fail before the SAE loads
    geo = diff_geometry(
        str(opts.cache), opts.task_set, opts.n_reference, opts.frequency_bins, opts.match_bins, opts.seed
    )
    labels = opts.label_names()
    resampling = Resampling(opts.n_boot, opts.seed, opts.seed_pairing, opts.prompt_draw, opts.seed_correction)
    table, summary = diff_tables(runs, geo, resampling, labels)
    summary.update(
        {
            **geo.describe(),
            "exploratory": geo.task_set.exploratory,
            "before": str(runs.base.path),
            "after": [str(e.path) for e in runs.task],
            "control": [str(e.path) for e in runs.control],
            "n_seeds": {"after": len(runs.task), "control": len(runs.control)},
            "cache": str(opts.cache),
            "resampling": {
                "n_boot": opts.n_boot,
                "seed": opts.seed,
                "seed_pairing": resampling.pairing_for(runs),
                "prompt_draw": opts.prompt_draw,
                "seed_correction": opts.seed_correction,
                "clusters": "base question (EM `_json`/`_template` variants share one); neutral prompts their own",
            },
            "n_boot": opts.n_boot,
            "seed": opts.seed,
            "heldout_loss": _heldout(labels, runs),
            "finetune": {
                "after": [_finetune_info(e.path) for e in runs.task],
                "control": [_finetune_info(e.path) for e in runs.control],
            },
            "behaviour": behaviour(runs, resampling, labels),
        }
    )

    def write(d: Path) -> None:
        table.to_parquet(d / FINETUNE_DIFF, index=False)
        # strict JSON: an undefined statistic (NaN) is written as null
        (d / DIFF_SIDECAR).write_text(json.dumps(jsonable(summary), indent=2, default=str, allow_nan=False))

    out = write_dir_atomic(Path(str(opts.out)), write, marker=DIFF_SIDECAR, what=DIFF_WHAT)
    print(f"wrote {out}")
    _print_summary(summary, geo.task_set.label)
    return 0


def _heldout(labels: tuple[str, str, str], runs: Runs) -> dict[str, float | None]:
    """Held-out task loss per label: the base model's, and each arm's mean over its seeds."""

    def mean(evals: list[EvalActs]) -> float | None:
        v = [float(x) for e in evals if isinstance(x := e.meta.get("heldout_loss"), (int, float))]
        return float(np.mean(v)) if v else None

    out = {labels[0]: mean([runs.base]), labels[1]: mean(runs.task)}
    if runs.control:
        out[labels[2]] = mean(runs.control)
    return out


COMMANDS = (
    Command(
        "diff",
        "task vs control fine-tune change of harmful features: seeds × prompts intervals, nulls, matched controls",
        DiffOptions,
        run_diff,
        description="Per-feature change in mean activation and firing rate between eval-acts directories (a "
        "base model, and each arm's training seeds), with hierarchical bootstrap intervals (seeds, then prompts "
        "clustered by base question); per comparison rho(risk, Δ) against a frequency-matched null band, "
        "harmful minus closeness-matched non-harmful features, and the log-prob readout when present.",
    ),
)
