"""Markdown tables from `bench/mechanism_lab.py`'s lab_summary.json (so docs/results.md never hand-copies numbers).

python bench/lab_report.py runs/lab/lab_summary.json > /tmp/lab.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(v: list[float] | None, fmt: str = "+.4f") -> str:
    if not v or any(x is None for x in v):  # null: the statistic is undefined (diff_stats says why)
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
        "ρ(risk, Δ) [95% CI] | ρ null band [p] | harmful − matched [95% CI] | CIs cover each seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, s in comps.items():
        prompt_set, position, name = key.split("/", 2)
        if name not in names:
            continue
        null = s.get("rho_null") or {}
        band = (
            f"{ci([null['mean'], null['lo'], null['hi']], '+.3f')} [p {null['p_greater']:.3f}]"
            if null
            else "–"
        )
        # None: a statistic without an estimate, so there is nothing for its interval to cover
        covered = [ok for ok in (s.get("covers_seeds") or {}).values() if ok is not None]
        seeds = "–" if not covered else ("yes" if all(covered) else "no")
        rows.append(
            f"| {prompt_set} / {position} | {name} | {ci(s['harmful_mean_change'])} | "
            f"{ci(s['top_risk_decile_mean_change'])} ({rel(s)}) | {ci(s['spearman_risk_max_cos'], '+.3f')} | "
            f"{band} | {ci(s.get('harmful_minus_matched'))} | {seeds} |"
        )
    return rows


def behaviour_table(beh: dict) -> list[str]:
    if not beh.get("available"):
        return [f"No log-prob readout: {beh.get('reason')}"]
    rows = [
        "| model or comparison | margin (misaligned − aligned) | misaligned | aligned |",
        "|---|---|---|---|",
    ]
    for part in ("levels", "comparisons"):
        for name, e in beh[part].items():
            rows.append(f"| {name} | {ci(e['margin'])} | {ci(e['lp_misaligned'])} | {ci(e['lp_aligned'])} |")
    return rows


def main(path: str) -> int:
    s = json.loads(Path(path).read_text())
    out = [
        f"Configuration `{s['config']}`, pool {s['pool']} samples per dataset, {s['heldout']} held-out "
        f"insecure samples, training seeds {s['seeds']}, task set `{s['task_set']}`.",
        "",
        "| run | training samples | response tokens trained | steps × batch | train time | held-out insecure loss |",
        "|---|---|---|---|---|---|",
        f"| base | – | – | – | – | {loss(s['heldout_loss']['base'])} |",
    ]
    for name, f in s["finetune"].items():
        o = f["options"]
        share = f.get("response_token_share")
        out.append(
            f"| {name} | {f['n_train']} | {'–' if share is None else f'{share:.1%}'} | {o['steps']} × "
            f"{o['batch_size']} | {f['train_seconds']:.0f} s | {loss(s['heldout_loss'].get(name))} |"
        )
    for name, p in s["patch"].items():
        out.append(
            f"| {name} ({p['subspace']}, rank {p['rank_removed']}, {p['mean_norm_removed']:.1%} of ‖ΔW‖ "
            f"removed) | – | – | – | – | {loss(s['heldout_loss'].get(name))} |"
        )
    for name, d in s["diffs"].items():
        b, a, c = d["labels"]
        tag = " (EXPLORATORY task set)" if d.get("exploratory") else ""
        out += ["", f"**{name}: {a} vs {c}, over seeds{tag}**", ""]
        out += comparison_table(d["comparisons"], [f"{a} - {b}", f"{c} - {b}", f"{a} - {c}"])
        if name == "insecure":
            out += [
                "",
                "**Behaviour (log-prob of fixed answers)**",
                "",
                *behaviour_table(d.get("behaviour") or {}),
            ]
    out += ["", "Commands and wall times:", "", "```"]
    out += [f"{c['command']}   # {c['seconds']:.0f} s" for c in s["commands"]]
    out += ["```"]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/lab/lab_summary.json"))
