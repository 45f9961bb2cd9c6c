"""The story's optional last step: what the measured fine-tune did (CACHE/finetune/insecure and its
replicas, patch and random-patch controls, written by bench/mechanism_lab.py).

A run enters the story only when its predicted risk still describes the cache: a diff computed with
task or harmful features the cache no longer flags (it was rescored since) is left out, and
`finetune_withheld` says why, so that the story can say it instead of quoting stale numbers.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from explorer import figures as F
from explorer.data import (
    CacheData,
    basis_problem,
    find_finetune_runs,
    load_finetune_summary,
    read_diff_basis,
)
from explorer.story.base import Step, esc, model_name
from precompute.errors import CacheError

# --------------------------------------------------------------------------------------------------
# the measured fine-tune (CACHE/finetune/insecure, written by bench/mechanism_lab.py): an optional last step

FT_SET, FT_POSITION = "em", "prompt"  # the EM evaluation questions, as the model reads them
RANDOM_PATCH = (
    "patch_random_"  # + N: the patch's random controls (SAE directions now; isotropic in older runs)
)


def _triple(v: Any) -> tuple[float, float, float] | None:
    """[est, lo, hi] as floats, or None unless all three are finite numbers."""
    if not (isinstance(v, (list, tuple)) and len(v) == 3):
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        return None
    return float(v[0]), float(v[1]), float(v[2])


def _num(x: float) -> str:
    """3 significant digits, a true minus sign: '0.027', '−0.009'."""
    return f"{x:.3g}".replace("-", "\u2212")


def _signed(x: float) -> str:
    """'+0.027', '−0.009', '0'."""
    return "0" if x == 0 else _num(x) if x < 0 else f"+{_num(x)}"


def _ci(t: tuple[float, float, float]) -> str:
    return f"95% CI {_num(t[1])} to {_num(t[2])}"


def _stats(summary: dict[str, Any], comparison: str) -> dict[str, Any]:
    entry = (summary.get("comparisons") or {}).get(f"{FT_SET}/{FT_POSITION}/{comparison}")
    return entry if isinstance(entry, dict) else {}


def _loss(summary: dict[str, Any], label: str) -> float | None:
    v = (summary.get("heldout_loss") or {}).get(label)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _count(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def finetune_summaries(cache: CacheData) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """summary.json of the runs the story uses (insecure, insecure_seed*, patch, patch_random_*), by run name,
    and why each run left out is not used: unreadable, or computed with features the cache no longer
    flags (`basis_problem`)."""
    out: dict[str, dict[str, Any]] = {}
    left_out: dict[str, str] = {}
    for path in find_finetune_runs(cache.path):
        if path.name in ("insecure", "patch") or path.name.startswith((RANDOM_PATCH, SEED_RUN)):
            try:
                summary = load_finetune_summary(path)
                problem = basis_problem(cache.features, read_diff_basis(path), summary.get("task_set"))
            except CacheError as exc:
                left_out[path.name] = str(exc)
                continue
            if summary.get("exploratory") and problem is None:
                problem = "it was computed with an exploratory task set (ranked by task_score), not a result to state"
            if problem is None:
                out[path.name] = summary
            else:
                left_out[path.name] = problem
    return out, left_out


def finetune_withheld(cache: CacheData) -> str | None:
    """Why the cache's "insecure" fine-tune diff is not in the story although it is there, or None."""
    return finetune_summaries(cache)[1].get("insecure")


def finetune_result_step(cache: CacheData) -> Step | None:
    """'What fine-tuning did': the top-risk decile's change after the insecure-code fine-tune vs the secure-code one.

    None (no step) unless the cache holds the "insecure" run with all three comparisons on the EM questions'
    prompt tokens. With the "patch" run and at least one "patch_random_N" run, one more sentence and their bars."""
    runs = finetune_summaries(cache)[0]
    ins = runs.get("insecure")
    if ins is None:
        return None
    b, a, c = ins["labels"]
    s_after, s_ctrl, s_direct = (_stats(ins, f"{x} - {y}") for x, y in ((a, b), (c, b), (a, c)))
    after, ctrl, direct = (_triple(s.get("top_risk_decile_mean_change")) for s in (s_after, s_ctrl, s_direct))
    if after is None or ctrl is None or direct is None:
        return None
    size = _count(s_direct.get("top_risk_decile_size")) or _count(s_after.get("top_risk_decile_size"))
    them = (
        "the harmful feature nearest the task features"
        if size == 1
        else f"the {size} harmful features nearest the task features"
        if size
        else "the harmful features nearest the task features (the closest tenth)"
    )
    n_prompts = _count(s_after.get("n_prompts"))
    model = model_name(cache.manifest)
    questions = (
        f"the {n_prompts} emergent-misalignment evaluation questions"
        if n_prompts
        else "the emergent-misalignment evaluation questions"
    )
    sentences = [
        f"We fine-tuned {model} with the same recipe on insecure code and, as a control, on secure code, "
        f"then read its features on the prompt tokens of {questions}."
    ]
    if direct[1] > 0:
        sentences.append(
            f"Fine-tuning on insecure code raised {them} by {_num(direct[0])} ({_ci(direct)}) more "
            f"than fine-tuning on secure code; the interval excludes 0."
        )
    elif direct[2] < 0:
        sentences.append(
            f"Fine-tuning on insecure code lowered {them} by {_num(-direct[0])} more than fine-tuning "
            f"on secure code (difference {_signed(direct[0])}, {_ci(direct)}); the interval excludes 0."
        )
    else:
        sentences.append(
            f"Fine-tuning on insecure code changed {them} by {_signed(direct[0])} ({_ci(direct)}) "
            f"relative to fine-tuning on secure code: the interval includes 0, so no difference was "
            f"detected."
        )
    replicas = _seed_replicas(runs)
    if replicas:
        agree = all((r[1] > 0) == (direct[1] > 0) and (r[2] < 0) == (direct[2] < 0) for _, r in replicas)
        said = "; ".join(f"{_signed(r[0])} ({_ci(r)}) with training seed {esc(name)}" for name, r in replicas)
        sentences.append(
            f"Trained again with another seed, the same difference was {said}: "
            + (
                "the same conclusion."
                if agree
                else "so this difference did not replicate across training seeds."
            )
        )
    their = "its" if size == 1 else "their"
    sentences.append(
        f"Against the model before fine-tuning, {their} mean activation changed by {_signed(after[0])} "
        f"({_ci(after)}) on insecure code and by {_signed(ctrl[0])} ({_ci(ctrl)}) on secure code."
    )
    rows = [
        {
            "name": "insecure code − before",
            "kind": "after",
            "comparison": f"{a} - {b}",
            "est": after[0],
            "lo": after[1],
            "hi": after[2],
            "heldout_loss": _loss(ins, a),
        },
        {
            "name": "secure code − before",
            "kind": "control",
            "comparison": f"{c} - {b}",
            "est": ctrl[0],
            "lo": ctrl[1],
            "hi": ctrl[2],
            "heldout_loss": _loss(ins, c),
        },
        {
            "name": "insecure − secure",
            "kind": "direct",
            "comparison": f"{a} - {c}",
            "est": direct[0],
            "lo": direct[1],
            "hi": direct[2],
            "heldout_loss": None,
        },
    ]
    rows += [
        {
            "name": f"insecure − secure (seed {name})",
            "kind": "direct",
            "comparison": f"{a} - {c}",
            "est": r[0],
            "lo": r[1],
            "hi": r[2],
            "heldout_loss": None,
        }
        for name, r in replicas
    ]
    legend = {
        "after": "insecure-code fine-tune",
        "control": "secure-code fine-tune (control)",
        "direct": "difference",
    }
    patch = _patch_rows(runs, "it" if size == 1 else "them")
    if patch is not None:
        patch_rows, sentence = patch
        rows += patch_rows
        sentences.append(sentence)
        legend.update(patch="patched fine-tune", random="random control patches")
    sentences.append(
        "These are shifts in the model's internal features on these questions, not a test of how it behaves."
    )
    fig = F.change_bars_figure(pd.DataFrame(rows), legend, "change in mean activation", height=400)
    return Step(
        "finetune_result",
        "What fine-tuning did",
        " ".join(sentences),
        figure=fig,
        figure_name=f"{cache.name}-finetune-result",
        figure_title="Change in the harmful features nearest the task features after each fine-tune (95% CI)",
    )


SEED_RUN = "insecure_seed"


def _seed_replicas(runs: dict[str, dict[str, Any]]) -> list[tuple[str, tuple[float, float, float]]]:
    """(seed, task − control top-decile triple) of every "insecure_seed<N>" run: the same experiment retrained."""
    out = []
    for name in sorted(n for n in runs if n.startswith(SEED_RUN)):
        _, a, c = runs[name]["labels"]
        triple = _triple(_stats(runs[name], f"{a} - {c}").get("top_risk_decile_mean_change"))
        if triple is not None:
            out.append((name[len(SEED_RUN) :], triple))
    return out


def _patch_rows(runs: dict[str, dict[str, Any]], pronoun: str) -> tuple[list[dict[str, Any]], str] | None:
    """Bars and the sentence for the patched adapter vs its random controls ('<after> - task'): random
    directions of the same number, SAE features' (featuregeom patch --random-seed) or, in older runs, isotropic."""
    patch = runs.get("patch")
    if patch is None:
        return None

    def direct(summary: dict[str, Any]) -> tuple[tuple[float, float, float] | None, str]:
        _, a, c = summary["labels"]
        return _triple(_stats(summary, f"{a} - {c}").get("top_risk_decile_mean_change")), f"{a} - {c}"

    p, p_name = direct(patch)
    randoms = []

    def seed(name: str) -> str:
        return name[len(RANDOM_PATCH) :]

    for name in sorted(
        (n for n in runs if n.startswith(RANDOM_PATCH)),
        key=lambda n: (not seed(n).isdigit(), int(seed(n)) if seed(n).isdigit() else 0, n),
    ):
        r, r_name = direct(runs[name])
        if r is not None:
            randoms.append((name, r, r_name, _loss(runs[name], runs[name]["labels"][1])))
    if p is None or not randoms:
        return None
    _, a, c = patch["labels"]
    rows = [
        {
            "name": "patched − unpatched",
            "kind": "patch",
            "comparison": p_name,
            "est": p[0],
            "lo": p[1],
            "hi": p[2],
            "heldout_loss": _loss(patch, a),
        }
    ]
    rows += [
        {
            "name": f"random patch {seed(name)} − unpatched",
            "kind": "random",
            "comparison": r_name,
            "est": r[0],
            "lo": r[1],
            "hi": r[2],
            "heldout_loss": loss,
        }
        for name, r, r_name, loss in randoms
    ]
    ctrl = "; ".join(f"{_signed(r[0])} ({_ci(r)})" for _, r, _, _ in randoms)
    n = len(randoms)
    sentence = (
        f"Removing the harmful directions from the insecure-code fine-tune changed {pronoun} by "
        f"{_signed(p[0])} ({_ci(p)}) compared with the unpatched fine-tune, against {ctrl} for "
        f"{'a random control patch' if n == 1 else f'{n} random control patches'} of the same size"
    )
    lp, lt = _loss(patch, a), _loss(patch, c)
    if lp is not None and lt is not None:
        sentence += f"; held-out task loss was {lp:.3f} patched vs {lt:.3f} unpatched"
    return rows, sentence + "."
