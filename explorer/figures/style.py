"""The explorer's one look: palette, plotly template, escaping, and the small pieces every page uses.

Safety: every string that comes from a cache (labels, tokens, categories, document text) is passed
through `esc` (html.escape) before it reaches HTML or a plotly label (plotly renders a subset of HTML
in hover text and titles). The HTML builders emit only <div>/<span>/<table> elements with inline
styles, never links or attributes taken from the cache.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

import pandas as pd
import plotly.graph_objects as go

# one palette everywhere: task = blue family, harmful = red family
TASK = "#1d4ed8"
TASK_LIGHT = "#93c5fd"
HARM = "#c81e1e"
HARM_LIGHT = "#fca5a5"
NEUTRAL = "#9ca3af"
INK = "#111827"
GROUP_COLORS = {
    "task": TASK,
    "control": "#60a5fa",
    "harmful": HARM,
    "benign": "#059669",
    "general": "#6b7280",
}

# --- the one colour rule: what a feature is decides how it is drawn, on every page ----------------------------
# harmful red, task blue; a feature that is both is drawn red (the safety-relevant flag) with a blue edge: a
# blue-edged diamond on a chart, a red and a blue stripe beside its name, both badges. Pages ask `role_of` and
# the helpers below instead of choosing from the side of a pair or the page they are on.
BOTH, NEITHER = "both", "neither"
ROLES = ("task", "harmful", BOTH, NEITHER)
NEITHER_COLOR = "#64748b"  # slate: a feature that passes neither test (no claim, no role colour)
ROLE_COLORS = {"task": TASK, "harmful": HARM, BOTH: HARM, NEITHER: NEITHER_COLOR}
ROLE_WORDS = {"task": "blue", "harmful": "red", BOTH: "red, blue-edged", NEITHER: "grey"}
ROLE_NAMES = {
    "task": "task feature",
    "harmful": "harmful feature",
    BOTH: "task and harmful feature",
    NEITHER: "feature",
}


def role_of(row: Any) -> str:
    """'both', 'harmful', 'task' or 'neither' from a feature's is_task / is_harmful flags (a row dict, or a
    role already)."""
    if isinstance(row, str):
        return row if row in ROLES else NEITHER
    task, harm = bool(row.get("is_task")), bool(row.get("is_harmful"))
    return BOTH if task and harm else "harmful" if harm else "task" if task else NEITHER


def role_color(row: Any) -> str:
    """The colour a feature's text, examples and bars take: red if harmful (both included), blue if task."""
    return ROLE_COLORS[role_of(row)]


def role_marker(row: Any, size: float = 12) -> dict[str, Any]:
    """A plotly marker for a feature drawn by its role: a both-feature is a red diamond with a blue edge."""
    role = role_of(row)
    if role == BOTH:
        return {"size": size + 2, "symbol": "diamond", "color": HARM, "line": {"width": 3, "color": TASK}}
    fill = {"task": TASK, "harmful": HARM}.get(role, "white")
    return {
        "size": size,
        "symbol": "circle",
        "color": fill,
        "line": {"width": 2, "color": INK if role != NEITHER else "#475569"},
    }


def role_stripe(row: Any) -> str:
    """CSS for the stripe beside a feature's name: one colour, or a red and a blue stripe for a both-feature."""
    role = role_of(row)
    if role == BOTH:
        return f"border-left:5px solid {HARM};box-shadow:-5px 0 0 {TASK}"
    return f"border-left:5px solid {ROLE_COLORS[role]}"


# --- canonical harm categories (precompute/data/taxonomy.py): one fixed, distinguishable colour each ---------
# chosen for pairwise CIEDE2000 >= 20 (tests/explorer/test_colours.py), none near the task blue; a label the
# taxonomy does not know is drawn as `unspecified`, as precompute counts it.
CATEGORY_PALETTE: dict[str, str] = {
    "violence_weapons": "#7f1d1d",
    "cybercrime": "#0d9488",
    "fraud_deception": "#ea580c",
    "illegal_goods": "#65a30d",
    "hate_harassment": "#d946ef",
    "sexual": "#fda4af",
    "self_harm": "#111827",
    "misinformation": "#0284c7",
    "privacy_surveillance": "#6ee7b7",
    "illegal_other": "#fdba74",
    "unspecified": "#9ca3af",
}
NO_CATEGORY_COLOR = "#e5e7eb"  # features without a harm category, behind the coloured ones
CATEGORY_COLORS = list(CATEGORY_PALETTE.values())  # in the taxonomy's order


def canonical_category(label: Any) -> str:
    """The taxonomy's category of a label: itself when canonical or mapped, else 'unspecified' (no log)."""
    from precompute.data import taxonomy

    text = "" if label is None or (isinstance(label, float) and math.isnan(label)) else str(label)
    return taxonomy.unify(text) if text and taxonomy.known(text) else taxonomy.UNSPECIFIED


def category_color(label: Any) -> str:
    """A harm category's colour (by its canonical category), the same on every page and every cache."""
    return CATEGORY_PALETTE[canonical_category(label)]


FONT = "Inter, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"
_AXIS = {
    "gridcolor": "#eef0f3",
    "zerolinecolor": "#e5e7eb",
    "linecolor": "#e5e7eb",
    "ticks": "",
    "automargin": True,
    "title": {"standoff": 8},
}
# a small light template: plotly deep-copies the template into every figure, and plotly_white's
# size made that the slowest part of a map rerun
TEMPLATE = go.layout.Template(
    layout={
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "colorway": [TASK, HARM, "#059669", "#d97706", NEUTRAL],
        "xaxis": _AXIS,
        "yaxis": _AXIS,
        "hovermode": "closest",
    }
)


def esc(text: Any) -> str:
    """html.escape for anything (None -> '')."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or text is pd.NA:
        return ""
    return html.escape(str(text), quote=True)


def show_token(tok: Any) -> str:
    """A token as it should read on screen (newlines and tabs made visible), escaped."""
    s = "" if tok is None else str(tok)
    return esc(s.replace("\n", "↵").replace("\t", "⇥").replace("\r", ""))


def export_filename(name: Any) -> str:
    """A download's file name, safe on every system: letters, digits, '-', '_' and '.' only (others become
    '-'), at most 120 characters; 'feature-geometry' when nothing is left."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.")[:120]
    return out or "feature-geometry"


def plotly_config(fmt: str = "png", filename: str = "feature-geometry") -> dict[str, Any]:
    """Chart toolbar: the camera button downloads `fmt` (png or svg) at 2x scale, under `filename` (made
    safe). The image carries the figure's own title (`titled`): plotly draws the layout as it is."""
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": fmt, "filename": export_filename(filename), "scale": 2},
        "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d", "sendChartToCloud"],
        # no "Share chart..." button: it would upload the chart (corpus text in its hovers) to Plotly Cloud
        "showSendToCloud": False,
    }


def base_layout(fig: go.Figure, height: int, title: str | None = None, **kw: Any) -> go.Figure:
    fig.update_layout(
        height=height,
        template=TEMPLATE,
        font={"family": FONT, "size": 13, "color": INK},
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10},
        title={"text": esc(title), "x": 0.01, "font": {"size": 15}} if title else None,
        hoverlabel={"font": {"family": FONT, "size": 12}, "bgcolor": "white"},
        **kw,
    )
    return fig


def titled(fig: go.Figure, title: str) -> go.Figure:
    """Give `fig` a title stating what it shows (plain text, escaped here; it replaces the builder's), with
    room above the plot: the camera button's PNG/SVG is the figure as drawn, so a downloaded chart says what
    it is on its own."""
    top = fig.layout.margin.t if fig.layout.margin and fig.layout.margin.t is not None else 10
    fig.update_layout(
        title={"text": esc(title), "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        margin={"t": max(int(top), 48)},
    )
    return fig


def rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    return f"rgba({r},{g},{b},{alpha:.3f})"


def badge(text: Any, color: str, filled: bool = False) -> str:
    style = f"background:{color};color:white;" if filled else f"color:{color};border:1px solid {color};"
    return (
        f'<span style="{style}display:inline-block;padding:0 7px;margin-right:4px;border-radius:9px;'
        f'font-size:11.5px;line-height:18px">{esc(text)}</span>'
    )
