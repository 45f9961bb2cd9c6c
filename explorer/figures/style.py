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
CATEGORY_COLORS = [
    "#b91c1c",
    "#ea580c",
    "#be185d",
    "#7c2d12",
    "#9f1239",
    "#c2410c",
    "#e11d48",
    "#92400e",
    "#dc2626",
    "#f97316",
]
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
        "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"],
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


def titled(fig: go.Figure, title: str, keep_subtitle: bool = False) -> go.Figure:
    """Give `fig` a title stating what it shows (plain text, escaped here), with room above the plot: the
    camera button's PNG/SVG is the figure as drawn, so a downloaded chart says what it is on its own.
    `keep_subtitle`: a title the builder gave (e.g. how many points are drawn) stays below, else it is replaced."""
    top = fig.layout.margin.t if fig.layout.margin and fig.layout.margin.t is not None else 10
    before = fig.layout.title.text if keep_subtitle and fig.layout.title and fig.layout.title.text else ""
    # a title the builder gave (already escaped, e.g. how many points are drawn) stays, as a subtitle
    text = esc(title) + (f"<br><span style='font-size:12px'>{before}</span>" if before else "")
    fig.update_layout(
        title={"text": text, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        margin={"t": max(int(top), 66 if before else 48)},
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
