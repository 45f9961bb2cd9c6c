"""The presenter's story: a few steps on one (task, harmful) pair, and a standalone HTML export.

Why a separate module: the Streamlit story page and the offline HTML file must tell exactly the same
story, so the steps (text, figures, example HTML) are built here once, from the cache, and both
renderers only lay them out. Every cache string in the text is escaped here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from explorer import figures as F
from explorer.data import CacheData, find_finetune_runs, load_finetune_summary
from precompute.errors import CacheError

esc = F.esc


@dataclass
class Step:
    """One slide: title (plain text), lead (safe HTML), an optional figure and optional safe HTML."""

    key: str
    title: str
    lead: str
    figure: go.Figure | None = None
    body: str | None = None
    figure_name: str = "figure"


def _label(row: dict) -> str:
    return esc(row.get("label")) or "an unlabelled feature"


def typical_neighbour_cosine(cache: CacheData) -> float:
    """Median cosine of every live feature's nearest neighbour (what 'usual closeness' looks like)."""
    first = cache.neighbors.cosine[:, 0].astype(np.float64)
    live = ~cache.features["dead"].to_numpy()
    vals = first[live & np.isfinite(first)]
    return float(np.median(vals)) if len(vals) else float("nan")


def _percent_below(cache: CacheData, cos: float) -> str:
    """'97%': the share of features whose nearest neighbour is at most `cos` (the pair's percentile)."""
    pct = float(cache.neighbors.percentile(cos))
    return f"{pct:.1f}%" if math.isfinite(pct) else "—"


def two_columns(left: str, right: str, left_title: str, right_title: str) -> str:
    """Side-by-side HTML (titles are escaped by the caller's helpers: they are our own text + escaped labels)."""
    col = "flex:1 1 420px;min-width:320px"
    return (
        f'<div style="display:flex;gap:28px;flex-wrap:wrap">'
        f'<div style="{col}"><div style="font-weight:650;color:{F.TASK};margin-bottom:4px">{left_title}</div>'
        f"{left}</div>"
        f'<div style="{col}"><div style="font-weight:650;color:{F.HARM};margin-bottom:4px">{right_title}</div>'
        f"{right}</div></div>"
    )


def build_story(cache: CacheData, task: int, harmful: int, max_points: int = 12000) -> list[Step]:
    """The steps for one pair (task feature, harmful neighbour)."""
    t_row = cache.row(task)
    h_row = cache.row(harmful)
    pair = cache.pair(task, harmful)
    cos = float(pair.get("cosine", float("nan")))
    null = cache.null_cosine
    ratio = cos / null if null > 0 and math.isfinite(cos) else float("nan")
    shaped = " shaped like this decoder" if cache.neighbors.null_kind == "covariance" else ""
    m = cache.manifest
    model = esc((m.get("model") or {}).get("spec") or "the model")
    t_ex = [e for e in cache.examples_of(task) if e.get("kind") == "top"]
    h_ex = [e for e in cache.examples_of(harmful) if e.get("kind") == "top"]
    nb = cache.neighbours_of(task)
    sel = F.Selection(
        feature=task,
        neighbours=nb["feature"].tolist(),
        cosines=nb["cosine"].tolist(),
        harmful=nb["is_harmful"].tolist(),
        threshold=null,
    )
    steps: list[Step] = []

    steps.append(
        Step(
            "feature",
            "What is a feature?",
            f"A language model turns every word it reads into a long list of numbers. A <b>sparse autoencoder</b> "
            f"splits that list into thousands of <b>features</b>: directions that each switch on for one "
            f"recognisable kind of text. This map has <b>{cache.n:,}</b> of them, read out of {model}. "
            f"Below, feature #{task} lights up (darker = stronger) on these words:",
            body=F.examples_html(t_ex[:2], color=F.TASK, window=16),
        )
    )
    steps.append(
        Step(
            "map",
            "The map: every feature is a dot",
            "Features whose directions point the same way sit close together. <b style='color:#c81e1e'>Red</b> "
            "dots fire on harmful requests; grey ones do not. The <b style='color:#1d4ed8'>blue star</b> is the "
            "feature we follow, and the lines join it to its closest neighbours (thicker = closer).",
            figure=F.map_figure(cache.features, "harm score", sel, max_points=max_points, height=560),
            figure_name=f"map-{task}",
        )
    )
    steps.append(
        Step(
            "task",
            f"A task feature: #{task}",
            f"Feature #{task} — <b>{_label(t_row)}</b> — fires on the narrow data a model might be fine-tuned on "
            f"(task score {t_row['task_score']:.2f}, where 0.5 means it fires alike on the task and on its control "
            f"text and 1.0 means only on task text). Here is where it fires, by kind of text, and its strongest examples:",
            figure=F.group_rates_figure(cache.group_rates(task), height=260),
            body=F.examples_html(t_ex[:3], color=F.TASK, window=16),
            figure_name=f"rates-{task}",
        )
    )
    cat = esc(h_row.get("harm_category")) or "harmful content"
    steps.append(
        Step(
            "neighbour",
            "Its harmful neighbour is closer than chance",
            f"Feature #{harmful} — <b>{_label(h_row)}</b> — fires on harmful requests ({cat}; harm score "
            f"{h_row['harm_score']:.2f}). The two directions have cosine <b>{cos:.2f}</b>: "
            f"<b>{ratio:.1f}×</b> the level random directions{shaped} reach by chance "
            f"({null:.3g}, the {cache.null_label}); the pair is at least as close as the nearest neighbour of "
            f"{_percent_below(cache, cos)} of all features.",
            figure=F.closeness_figure(
                cos, null, typical_neighbour_cosine(cache), null_label=cache.null_label
            ),
            figure_name=f"closeness-{task}-{harmful}",
        )
    )
    steps.append(
        Step(
            "text",
            "The text that makes each one fire",
            "Left: the task feature on its own data. Right: the harmful neighbour on harmful requests. "
            "Hover a word to see the activation.",
            body=two_columns(
                F.examples_html(t_ex[:4], color=F.TASK, window=14),
                F.examples_html(h_ex[:4], color=F.HARM, window=14),
                f"task feature #{task}",
                f"harmful feature #{harmful}",
            ),
        )
    )
    steps.append(
        Step(
            "finetune",
            "What fine-tuning would do",
            f"Fine-tuning on the task data pushes the model along the task feature's direction. Because the "
            f"harmful direction is only {math.degrees(math.acos(max(-1.0, min(1.0, cos)))):.0f}° away, every "
            f"step along the task also moves about <b>{cos:.0%}</b> as far along the harmful feature — the model "
            f"can grow more harmful without seeing a single harmful example (\u201cemergent misalignment\u201d, "
            f"Betley et al. 2025). Removing the training samples closest to such features reduced it "
            f"(Minegishi et al. 2026).",
            figure=F.finetune_figure(cos),
            figure_name=f"finetune-{task}-{harmful}",
        )
    )
    measured = finetune_result_step(cache)
    if measured is not None:
        steps.append(measured)
    return steps


# --------------------------------------------------------------------------------------------------
# the measured fine-tune (CACHE/finetune/insecure, written by bench/mechanism_lab.py): an optional last step

FT_SET, FT_POSITION = "em", "prompt"  # the EM evaluation questions, as the model reads them
RANDOM_PATCH = "patch_random_"  # + N: the patch's random-subspace controls


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


def finetune_summaries(cache: CacheData) -> dict[str, dict[str, Any]]:
    """summary.json of the runs the story uses (insecure, insecure_seed*, patch, patch_random_*), by run name;
    unreadable ones skipped."""
    out: dict[str, dict[str, Any]] = {}
    for path in find_finetune_runs(cache.path):
        if path.name in ("insecure", "patch") or path.name.startswith((RANDOM_PATCH, SEED_RUN)):
            try:
                out[path.name] = load_finetune_summary(path)
            except CacheError:
                continue
    return out


def finetune_result_step(cache: CacheData) -> Step | None:
    """'What fine-tuning did': the top-risk decile's change after the insecure-code fine-tune vs the secure-code one.

    None (no step) unless the cache holds the "insecure" run with all three comparisons on the EM questions'
    prompt tokens. With the "patch" run and at least one "patch_random_N" run, one more sentence and their bars."""
    runs = finetune_summaries(cache)
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
    model = esc((cache.manifest.get("model") or {}).get("spec") or "the model")
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
        legend.update(patch="patched fine-tune", random="random-subspace patches (controls)")
    sentences.append(
        "These are shifts in the model's internal features on these questions, not a test of how it behaves."
    )
    fig = F.change_bars_figure(pd.DataFrame(rows), legend, "change in mean activation", height=400)
    return Step(
        "finetune_result",
        "What fine-tuning did",
        " ".join(sentences),
        figure=fig,
        figure_name="finetune-result",
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
    """Bars and the sentence for the patched adapter vs its random-subspace controls ('<after> - task')."""
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
        f"Removing the flagged harmful directions from the insecure-code fine-tune changed {pronoun} by "
        f"{_signed(p[0])} ({_ci(p)}) compared with the unpatched fine-tune, against {ctrl} for "
        f"{'a random subspace' if n == 1 else f'{n} random subspaces'} of the same size"
    )
    lp, lt = _loss(patch, a), _loss(patch, c)
    if lp is not None and lt is not None:
        sentence += f"; held-out task loss was {lp:.3f} patched vs {lt:.3f} unpatched"
    return rows, sentence + "."


_HTML_CSS = """
body{font-family:Inter,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;color:#111827;margin:0;background:#fff}
main{max-width:1100px;margin:0 auto;padding:24px 32px 80px}
section{padding:28px 0 36px;border-bottom:1px solid #e5e7eb}
h1{font-size:34px;margin:8px 0 4px} h2{font-size:30px;margin:0 0 12px}
.step{color:#6b7280;font-size:15px;letter-spacing:.04em;text-transform:uppercase}
.lead{font-size:21px;line-height:1.55;max-width:60em}
.meta{color:#6b7280;font-size:14px}
"""


def story_html(steps: list[Step], title: str, subtitle: str = "") -> str:
    """A single self-contained HTML file (plotly.js inlined): opens offline, no network requests."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; script-src 'unsafe-inline' "
        "'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:\">",
        f"<title>{esc(title)}</title><style>{_HTML_CSS}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body><main>",
        f"<h1>{esc(title)}</h1><div class='meta'>{esc(subtitle)}</div>",
    ]
    for i, s in enumerate(steps, 1):
        parts.append(
            f"<section id='step-{i}'><div class='step'>Step {i} of {len(steps)}</div>"
            f"<h2>{esc(s.title)}</h2><p class='lead'>{s.lead}</p>"
        )
        if s.figure is not None:
            parts.append(
                s.figure.to_html(
                    full_html=False,
                    include_plotlyjs=False,
                    config=F.plotly_config("svg", s.figure_name),
                    div_id=f"fig-{i}",
                )
            )
        if s.body:
            parts.append(f"<div style='margin-top:12px'>{s.body}</div>")
        parts.append("</section>")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts.append(
        f"<p class='meta'>Exported from the Feature Geometry Explorer, {stamp}.</p></main></body></html>"
    )
    return "".join(parts)
