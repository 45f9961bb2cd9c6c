"""A story step, the helpers every step uses, and the standalone HTML export."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from explorer import figures as F
from explorer.data.evidence import merge_repeats

esc = F.esc


@dataclass
class Step:
    """One slide: title (plain text), lead (safe HTML), an optional figure and optional safe HTML.

    `figure_title` (plain text) is drawn on the figure, so its PNG/SVG download says what it shows on its own;
    `figure_name` is the download's file name, naming the feature(s) it shows (`feature-12-map`)."""

    key: str
    title: str
    lead: str
    figure: go.Figure | None = None
    body: str | None = None
    figure_name: str = "figure"
    figure_title: str = ""

    def __post_init__(self) -> None:
        if self.figure is not None and self.figure_title:
            F.titled(self.figure, self.figure_title)


def joined(*sentences: str | None) -> str:
    """Plain-text sentences (None: left out) joined and escaped for a lead."""
    return esc(" ".join(s for s in sentences if s))


def examples_list(examples: list[dict[str, Any]], n: int, color: str, window: int) -> str:
    """A story's list of examples (safe HTML): the first `n` of `examples` with each passage of a document once
    (data.evidence.merge_repeats at the window shown: the stronger example stays and says how many more show
    it), numbered as shown, 1. to n., since the lead says what the list holds and a feature's own ranks would skip
    the examples a filter or a merge leaves out ("#1, #4" read as if examples were missing)."""
    kept = merge_repeats(examples, window).examples
    return F.examples_html(kept[:n], color=color, window=window, ranks="shown")


def label_of(row: dict[str, Any]) -> str:
    """The feature's label, escaped, or 'an unlabelled feature'."""
    return esc(row.get("label")) or "an unlabelled feature"


def model_name(manifest: dict[str, Any]) -> str:
    """The model's real name, escaped: the manifest's `name` if any, a hub id as given, else the SAE's
    `model_name` when the model file or directory is that model (the spec may be an alias such as
    'smollm2'), else the spec."""
    m = manifest.get("model") or {}
    spec = str(m.get("spec") or "")
    name = str(m.get("name") or "")
    trained_on = str((manifest.get("sae") or {}).get("model_name") or "")
    short = trained_on.rsplit("/", 1)[-1].lower()
    if not name and m.get("kind") == "hub":
        name = spec
    if not name and short and PurePath(str(m.get("path") or spec)).name.lower().startswith(short):
        name = trained_on
    name = name or spec or "the model"
    return esc(f"{name} (with a fine-tuned adapter)" if m.get("adapter") else name)


def two_columns(
    left: str,
    right: str,
    left_title: str,
    right_title: str,
    left_row: Any = "task",
    right_row: Any = "harmful",
) -> str:
    """Side-by-side HTML (titles are escaped by the caller's helpers: they are our own text + escaped labels);
    each column's title is coloured and striped by what its feature is (style's one colour rule)."""
    col = "flex:1 1 420px;min-width:320px"

    def head(row: Any, title: str) -> str:
        return (
            f'<div style="font-weight:650;color:{F.role_color(row)};margin-bottom:4px;padding-left:8px;'
            f'{F.role_stripe(row)}">{title}</div>'
        )

    return (
        f'<div style="display:flex;gap:28px;flex-wrap:wrap">'
        f'<div style="{col}">{head(left_row, left_title)}{left}</div>'
        f'<div style="{col}">{head(right_row, right_title)}{right}</div></div>'
    )


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
                    config=F.plotly_config("png", s.figure_name),
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
