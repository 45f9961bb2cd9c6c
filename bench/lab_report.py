"""Markdown tables from `bench/mechanism_lab.py`'s lab_summary.json (so docs/results.md never hand-copies numbers).

python bench/lab_report.py runs/lab/lab_summary.json > /tmp/lab.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(v: list[float] | None, fmt: str = "+.4f") -> str:
    if not v:
        return "–"
    est, lo, hi = v
    return f"{est:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def rel(s: dict) -> str:
    """Top-risk decile change relative to its mean activation before (of the comparison's first side)."""
    before = s.get("top_risk_decile_mean_before")
    return "–" if not before else f"{s['top_risk_decile_mean_change'][0] / before:+.1%}"


def loss(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def comparison_table(comps: dict, names: list[str]) -> list[str]:
    rows = [
        "| prompts / tokens | comparison | harmful mean Δ [95% CI] | top-risk decile Δ [95% CI] (% of its before) | "
        "Spearman(risk, Δ) [95% CI] | Spearman(risk_sum, Δ) | harmful CI>0 / CI<0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, s in comps.items():
        prompt_set, position, name = key.split("/", 2)
        if name not in names:
            continue
        rows.append(
            f"| {prompt_set} / {position} | {name} | {ci(s['harmful_mean_change'])} | "
            f"{ci(s['top_risk_decile_mean_change'])} ({rel(s)}) | {ci(s['spearman_risk_max_cos'], '+.3f')} | "
            f"{ci(s['spearman_risk_sum'], '+.3f')} | {s['harmful_ci_excludes_zero_up']} / "
            f"{s['harmful_ci_excludes_zero_down']} |"
        )
    return rows


def main(path: str) -> int:
    s = json.loads(Path(path).read_text())
    out = [
        f"Configuration `{s['config']}`, pool {s['pool']} samples per dataset, {s['heldout']} held-out "
        f"insecure samples, seed {s['seed']}.",
        "",
        "| run | training samples | steps × batch | train time | held-out insecure loss |",
        "|---|---|---|---|---|",
        f"| base | – | – | – | {loss(s['heldout_loss']['base'])} |",
    ]
    for name, f in s["finetune"].items():
        o = f["options"]
        out.append(
            f"| {name} | {f['n_train']} | {o['steps']} × {o['batch_size']} | {f['train_seconds']:.0f} s | "
            f"{loss(s['heldout_loss'].get(name))} |"
        )
    for name, p in s["patch"].items():
        out.append(
            f"| {name} (task adapter, {p['subspace']}, rank {p['rank_removed']}, "
            f"{p['mean_norm_removed']:.1%} of ‖ΔW‖ removed) | – | – | – | {loss(s['heldout_loss'].get(name))} |"
        )
    sections = {
        "insecure": (
            "Fine-tune diff: insecure (task) vs secure (control)",
            ["task - base", "control - base", "task - control"],
        ),
        "triage": (
            "Triage: top 20% removed vs 20% removed at random",
            ["top20_removed - base", "random20_removed - base", "top20_removed - random20_removed"],
        ),
        "patch": (
            "Patch-back: task adapter projected off the flagged harmful decoder directions",
            ["patched - base", "task - base", "patched - task"],
        ),
        "patch_encoder": (
            "Patch-back variant: off the same features' encoder directions",
            ["patched_encoder - base", "patched_encoder - task"],
        ),
    }
    for name in s["diffs"]:
        if name.startswith("insecure_seed"):
            sections[name] = (
                f"Fine-tune diff again with training seed {name[len('insecure_seed') :]}",
                ["task - base", "control - base", "task - control"],
            )
        if name.startswith("patch_random_"):
            seed = name.rsplit("_", 1)[1]
            sections[name] = (
                f"Patch-back control: random subspace (seed {seed})",
                [f"random_patch_{seed} - base", f"random_patch_{seed} - task"],
            )
    for name, (title, names) in sections.items():
        if name in s["diffs"]:
            out += ["", f"**{title}**", "", *comparison_table(s["diffs"][name], names)]
    out += ["", "Commands and wall times:", "", "```"]
    out += [f"{c['command']}   # {c['seconds']:.0f} s" for c in s["commands"]]
    out += ["```"]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/lab/lab_summary.json"))
