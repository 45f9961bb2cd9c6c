"""The presenter's story: a few steps on one (task, harmful) pair, and a standalone HTML export.

Why a separate module: the Streamlit story page and the offline HTML file must tell exactly the same
story, so the steps (text, figures, example HTML) are built here once, from the cache, and both
renderers only lay them out. Every cache string in the text is escaped here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from explorer import figures as F
from explorer.data import CacheData

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


def two_columns(left: str, right: str, left_title: str, right_title: str) -> str:
    """Side-by-side HTML (titles are escaped by the caller's helpers: they are our own text + escaped labels)."""
    col = "flex:1 1 420px;min-width:320px"
    return (f'<div style="display:flex;gap:28px;flex-wrap:wrap">'
            f'<div style="{col}"><div style="font-weight:650;color:{F.TASK};margin-bottom:4px">{left_title}</div>'
            f"{left}</div>"
            f'<div style="{col}"><div style="font-weight:650;color:{F.HARM};margin-bottom:4px">{right_title}</div>'
            f"{right}</div></div>")


def build_story(cache: CacheData, task: int, harmful: int, max_points: int = 12000) -> list[Step]:
    """The steps for one pair (task feature, harmful neighbour)."""
    t_row = cache.row(task)
    h_row = cache.row(harmful)
    pair = cache.pair(task, harmful)
    cos = float(pair.get("cosine", float("nan")))
    null = cache.null_cosine
    ratio = cos / null if null > 0 and math.isfinite(cos) else float("nan")
    m = cache.manifest
    model = esc((m.get("model") or {}).get("spec") or "the model")
    t_ex = [e for e in cache.examples_of(task) if e.get("kind") == "top"]
    h_ex = [e for e in cache.examples_of(harmful) if e.get("kind") == "top"]
    nb = cache.neighbours_of(task)
    sel = F.Selection(feature=task, neighbours=nb["feature"].tolist(), cosines=nb["cosine"].tolist(),
                      harmful=nb["is_harmful"].tolist(), threshold=null)
    steps: list[Step] = []

    steps.append(Step(
        "feature", "What is a feature?",
        f"A language model turns every word it reads into a long list of numbers. A <b>sparse autoencoder</b> "
        f"splits that list into thousands of <b>features</b>: directions that each switch on for one "
        f"recognisable kind of text. This map has <b>{cache.n:,}</b> of them, read out of {model}. "
        f"Below, feature #{task} lights up (darker = stronger) on these words:",
        body=F.examples_html(t_ex[:2], color=F.TASK, window=16),
    ))
    steps.append(Step(
        "map", "The map: every feature is a dot",
        "Features whose directions point the same way sit close together. <b style='color:#c81e1e'>Red</b> "
        "dots fire on harmful requests; grey ones do not. The <b style='color:#1d4ed8'>blue star</b> is the "
        "feature we follow, and the lines join it to its closest neighbours (thicker = closer).",
        figure=F.map_figure(cache.features, "harm score", sel, max_points=max_points, height=560),
        figure_name=f"map-{task}",
    ))
    steps.append(Step(
        "task", f"A task feature: #{task}",
        f"Feature #{task} — <b>{_label(t_row)}</b> — fires on the narrow data a model might be fine-tuned on "
        f"(task score {t_row['task_score']:.2f}, where 0.5 means no preference and 1.0 means only on task "
        f"text). Here is where it fires, by kind of text, and its strongest examples:",
        figure=F.group_rates_figure(cache.group_rates(task), height=260),
        body=F.examples_html(t_ex[:3], color=F.TASK, window=16),
        figure_name=f"rates-{task}",
    ))
    cat = esc(h_row.get("harm_category")) or "harmful content"
    steps.append(Step(
        "neighbour", "Its harmful neighbour is closer than chance",
        f"Feature #{harmful} — <b>{_label(h_row)}</b> — fires on harmful requests ({cat}; harm score "
        f"{h_row['harm_score']:.2f}). The two directions have cosine <b>{cos:.2f}</b>: "
        f"<b>{ratio:.1f}×</b> the level random directions reach by chance ({null:.3g}).",
        figure=F.closeness_figure(cos, null, typical_neighbour_cosine(cache)),
        figure_name=f"closeness-{task}-{harmful}",
    ))
    steps.append(Step(
        "text", "The text that makes each one fire",
        "Left: the task feature on its own data. Right: the harmful neighbour on harmful requests. "
        "Hover a word to see the activation.",
        body=two_columns(F.examples_html(t_ex[:4], color=F.TASK, window=14),
                         F.examples_html(h_ex[:4], color=F.HARM, window=14),
                         f"task feature #{task}", f"harmful feature #{harmful}"),
    ))
    steps.append(Step(
        "finetune", "What fine-tuning would do",
        f"Fine-tuning on the task data pushes the model along the task feature's direction. Because the "
        f"harmful direction is only {math.degrees(math.acos(max(-1.0, min(1.0, cos)))):.0f}° away, every "
        f"step along the task also moves about <b>{cos:.0%}</b> as far along the harmful feature — the model "
        f"can grow more harmful without seeing a single harmful example (\u201cemergent misalignment\u201d, "
        f"Betley et al. 2025). Removing the training samples closest to such features reduced it "
        f"(Minegishi et al. 2026).",
        figure=F.finetune_figure(cos),
        figure_name=f"finetune-{task}-{harmful}",
    ))
    return steps


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
        parts.append(f"<section id='step-{i}'><div class='step'>Step {i} of {len(steps)}</div>"
                     f"<h2>{esc(s.title)}</h2><p class='lead'>{s.lead}</p>")
        if s.figure is not None:
            parts.append(s.figure.to_html(full_html=False, include_plotlyjs=False,
                                          config=F.plotly_config("svg", s.figure_name), div_id=f"fig-{i}"))
        if s.body:
            parts.append(f"<div style='margin-top:12px'>{s.body}</div>")
        parts.append("</section>")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts.append(f"<p class='meta'>Exported from the Feature Geometry Explorer, {stamp}.</p></main></body></html>")
    return "".join(parts)
