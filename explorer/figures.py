"""Pure figure and HTML builders: data in, plotly figure (or an HTML string) out.

Why pure: the pages only wire these to widgets, so every visual decision is unit-testable without
Streamlit and the story export reuses exactly the figures the pages show.

Safety: every string that comes from a cache (labels, tokens, categories, document text) is passed
through `html.escape` before it reaches HTML or a plotly label (plotly renders a subset of HTML in
hover text and titles). The HTML builders emit only <div>/<span>/<table> elements with inline
styles, never links or attributes taken from the cache.
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from explorer.data import MEASURES

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
HARM_SCALE = [[0.0, "#e5e7eb"], [0.5, "#e5e7eb"], [0.7, "#fca5a5"], [0.85, "#ef4444"], [1.0, "#7f1d1d"]]
TASK_SCALE = [[0.0, "#e5e7eb"], [0.5, "#e5e7eb"], [0.7, "#93c5fd"], [0.85, "#3b82f6"], [1.0, "#1e3a8a"]]
COLOR_MODES = {
    "harm score": "harm_score",
    "task score": "task_score",
    "harm category": "harm_category",
    "firing rate": "frequency",
}
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


def plotly_config(fmt: str = "png", filename: str = "feature-geometry") -> dict[str, Any]:
    """Chart toolbar: the camera button downloads `fmt` (png or svg) at 2x scale."""
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": fmt, "filename": filename, "scale": 2},
        "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"],
    }


def _base_layout(fig: go.Figure, height: int, title: str | None = None, **kw: Any) -> go.Figure:
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


# --------------------------------------------------------------------------------------------------
# the map


@dataclass(frozen=True)
class Selection:
    """The highlighted task feature and its neighbours on the map (ids, cosines, harmful flags)."""

    feature: int
    neighbours: Sequence[int]
    cosines: Sequence[float]
    harmful: Sequence[bool]
    threshold: float


def decimate(
    x: np.ndarray,
    y: np.ndarray,
    max_points: int,
    keep: Iterable[int] = (),
    focus: tuple[float, float] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices of the points to draw: everything when n <= max_points; otherwise `keep`, the points
    nearest `focus` (a quarter of the budget: full detail around the selection) and a fixed random
    sample of the rest (stable between reruns, so the map does not flicker)."""
    n = len(x)
    if n <= max_points:
        return np.arange(n)
    chosen = np.zeros(n, dtype=bool)
    keep_arr = np.fromiter(keep, dtype=np.int64)
    keep_arr = keep_arr[(keep_arr >= 0) & (keep_arr < n)]
    chosen[keep_arr] = True
    if focus is not None:
        near = max_points // 4
        d2 = (x - focus[0]) ** 2 + (y - focus[1]) ** 2
        chosen[np.argpartition(d2, near)[:near]] = True
    budget = max_points - int(chosen.sum())
    if budget > 0:
        perm = _fixed_permutation(n, seed)  # the same shuffle every rerun
        rest = perm[~chosen[perm]]
        chosen[rest[:budget]] = True
    return np.flatnonzero(chosen)


@functools.lru_cache(maxsize=8)
def _fixed_permutation(n: int, seed: int) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(n)
    perm.setflags(write=False)
    return perm


def _density(x: np.ndarray, y: np.ndarray, bins: int = 140) -> go.Heatmap:
    h, xe, ye = np.histogram2d(x, y, bins=bins, range=[[-1.05, 1.05], [-1.05, 1.05]])
    z = np.log1p(h.T)
    z[z == 0] = np.nan
    return go.Heatmap(
        z=z,
        x=(xe[:-1] + xe[1:]) / 2,
        y=(ye[:-1] + ye[1:]) / 2,
        showscale=False,
        hoverinfo="skip",
        colorscale=[[0, "#f3f4f6"], [1, "#9ca3af"]],
        opacity=0.55,
        name="all features (density)",
    )


def map_figure(
    features: pd.DataFrame,
    color_by: str = "harm score",
    selection: Selection | None = None,
    max_points: int = 40000,
    height: int = 640,
    seed: int = 0,
) -> go.Figure:
    """The UMAP of all features as a WebGL scatter, with the selection and its neighbours on top.

    `features` needs feature, umap_x, umap_y, hover and the colour column. Above `max_points`
    points, far points are decimated to a fixed sample and a grey density layer shows them all.
    Neighbours are joined to the selection by lines whose width grows with cosine; only those
    at or above `selection.threshold` are drawn.
    """
    if color_by not in COLOR_MODES:
        raise ValueError(f"color_by must be one of {list(COLOR_MODES)}")
    x = features["umap_x"].to_numpy(dtype=np.float64)
    y = features["umap_y"].to_numpy(dtype=np.float64)
    fig = go.Figure()
    keep: list[int] = []
    focus = None
    if selection is not None:
        keep = [selection.feature, *selection.neighbours]
        focus = (x[selection.feature], y[selection.feature])
    idx = decimate(x, y, max_points, keep=keep, focus=focus, seed=seed)
    decimated = len(idx) < len(x)
    if decimated:
        fig.add_trace(_density(x, y))
    sub = features.iloc[idx]
    hover = sub["hover"].to_numpy(dtype=object)
    ids = sub["feature"].to_numpy()
    col = COLOR_MODES[color_by]
    marker_size = 5 if len(idx) <= 5000 else 3.5 if len(idx) <= 50000 else 2.5
    fade = 0.55 if selection is not None else 0.85  # the selection stands out against a muted map
    common = {"mode": "markers", "hovertemplate": "%{text}<extra></extra>"}
    if col == "harm_category":
        cats = sub["harm_category"].astype("string").fillna("").to_numpy(dtype=object)
        none = cats == ""
        fig.add_trace(
            go.Scattergl(
                x=sub["umap_x"].to_numpy()[none],
                y=sub["umap_y"].to_numpy()[none],
                text=hover[none],
                customdata=ids[none],
                name="no harm category",
                marker={"size": marker_size, "color": "#d1d5db", "opacity": fade * 0.8},
                **common,
            )
        )
        for i, cat in enumerate(sorted(set(cats[~none]))):
            m = cats == cat
            fig.add_trace(
                go.Scattergl(
                    x=sub["umap_x"].to_numpy()[m],
                    y=sub["umap_y"].to_numpy()[m],
                    text=hover[m],
                    customdata=ids[m],
                    name=esc(cat),
                    marker={
                        "size": marker_size + 1,
                        "color": CATEGORY_COLORS[i % len(CATEGORY_COLORS)],
                        "opacity": fade,
                    },
                    **common,
                )
            )
    else:
        vals = sub[col].to_numpy(dtype=np.float64)
        if col == "frequency":
            vals = np.log10(np.clip(vals, 1e-7, 1))
            cbar = {"title": {"text": "log₁₀ rate"}, "thickness": 12, "len": 0.6}
            scale: Any = "Viridis"
            cmin, cmax = -6.0, 0.0
        else:
            cbar = {"title": {"text": color_by}, "thickness": 12, "len": 0.6}
            scale = HARM_SCALE if col == "harm_score" else TASK_SCALE
            cmin, cmax = 0.0, 1.0
        order = np.argsort(np.nan_to_num(vals, nan=-np.inf), kind="stable")  # strongest drawn on top
        fig.add_trace(
            go.Scattergl(
                x=sub["umap_x"].to_numpy()[order],
                y=sub["umap_y"].to_numpy()[order],
                text=hover[order],
                customdata=ids[order],
                name=color_by,
                showlegend=False,
                marker={
                    "size": marker_size,
                    "color": vals[order],
                    "colorscale": scale,
                    "cmin": cmin,
                    "cmax": cmax,
                    "colorbar": cbar,
                    "opacity": fade,
                },
                **common,
            )
        )
    if selection is not None:
        _add_selection(fig, features, selection)
    title = None
    if decimated:
        title = f"{len(idx):,} of {len(x):,} features drawn (full detail near the selection; grey = density of all)"
    _base_layout(fig, height, title=title, dragmode="pan", legend={"orientation": "h", "y": -0.02, "x": 0})
    fig.update_xaxes(visible=False, range=[-1.08, 1.08])
    fig.update_yaxes(visible=False, range=[-1.08, 1.08])
    fig.update_layout(uirevision=f"map-{color_by}")
    return fig


def line_width(cos: float, threshold: float, lo: float = 1.0, hi: float = 9.0) -> float:
    """Line width for a neighbour edge: `lo` at the null threshold, `hi` at cosine 1."""
    t = (cos - threshold) / max(1e-9, 1.0 - threshold)
    return float(lo + (hi - lo) * min(1.0, max(0.0, t)))


def _add_selection(fig: go.Figure, features: pd.DataFrame, sel: Selection) -> None:
    x = features["umap_x"].to_numpy()
    y = features["umap_y"].to_numpy()
    hover = features["hover"].to_numpy(dtype=object)
    x0, y0 = float(x[sel.feature]), float(y[sel.feature])
    shown = [
        (int(j), float(c), bool(h))
        for j, c, h in zip(sel.neighbours, sel.cosines, sel.harmful, strict=False)
        if c >= sel.threshold
    ]
    # edges: one trace per (harmful?, width class) with None breaks — few traces keep reruns fast;
    # customdata holds the neighbour id at both ends of each segment
    classes: dict[tuple[bool, float], list[int]] = {}
    for j, c, h in shown:
        w = round(line_width(c, sel.threshold) * 2) / 2
        classes.setdefault((h, w), []).append(j)
    for (h, w), js in sorted(classes.items(), key=lambda kv: kv[0][1]):
        xs: list[float | None] = []
        ys: list[float | None] = []
        cd: list[int | None] = []
        for j in js:
            xs += [x0, float(x[j]), None]
            ys += [y0, float(y[j]), None]
            cd += [j, j, None]
        fig.add_trace(
            go.Scattergl(
                x=xs,
                y=ys,
                customdata=cd,
                mode="lines",
                hoverinfo="skip",
                showlegend=False,
                line={"width": w, "color": "rgba(200,30,30,0.75)" if h else "rgba(71,85,105,0.55)"},
                name=f"edges {'harmful' if h else 'other'} w{w:g}",
            )
        )
    for harmful in (True, False):
        grp = [(j, c) for j, c, h in shown if h == harmful]
        if not grp:
            continue
        js = np.array([j for j, _ in grp])
        cs = np.array([c for _, c in grp])
        text = [f"{hover[j]}<br><b>cosine {c:.3f}</b> to #{sel.feature}" for j, c in grp]
        fig.add_trace(
            go.Scattergl(
                x=x[js],
                y=y[js],
                mode="markers",
                text=text,
                customdata=js,
                hovertemplate="%{text}<extra></extra>",
                name="harmful neighbour" if harmful else "other neighbour",
                marker={
                    "size": 10 + 10 * np.clip((cs - sel.threshold) / max(1e-9, 1 - sel.threshold), 0, 1),
                    "color": HARM if harmful else "white",
                    "line": {"width": 2, "color": INK if harmful else "#475569"},
                },
            )
        )
    fig.add_trace(
        go.Scattergl(
            x=[x0],
            y=[y0],
            mode="markers",
            text=[hover[sel.feature]],
            customdata=[sel.feature],
            hovertemplate="%{text}<extra>selected</extra>",
            name=f"selected #{sel.feature}",
            marker={"size": 24, "symbol": "star", "color": TASK, "line": {"width": 2, "color": "white"}},
        )
    )
    fig.add_annotation(
        x=x0,
        y=y0,
        text=f"<b>#{sel.feature}</b>",
        showarrow=True,
        arrowhead=0,
        ax=-38,
        ay=-34,
        font={"color": TASK, "size": 14},
        bgcolor="rgba(255,255,255,0.85)",
        bordercolor=TASK,
        borderwidth=1,
        borderpad=3,
    )


# --------------------------------------------------------------------------------------------------
# small charts


def group_rates_figure(
    rates: dict[str, float], categories: pd.DataFrame | None = None, height: int = 260
) -> go.Figure:
    """Firing rate per corpus group (and per harm category inside 'harmful', when known)."""
    names: list[str] = []
    vals: list[float] = []
    colors: list[str] = []
    for g, v in rates.items():
        names.append(esc(g))
        vals.append(float(v) * 100)
        colors.append(GROUP_COLORS.get(g, NEUTRAL))
    if categories is not None and len(categories):
        harm = categories[(categories["group"] == "harmful") & categories["category"].notna()]
        for i, (cat, v) in enumerate(zip(harm["category"], harm["frequency"], strict=False)):
            names.append(f"harmful · {esc(cat)}")
            vals.append(float(v) * 100)
            colors.append(CATEGORY_COLORS[i % len(CATEGORY_COLORS)])
    fig = go.Figure(
        go.Bar(
            x=vals,
            y=names,
            orientation="h",
            marker_color=colors,
            hovertemplate="%{y}: %{x:.3g}% of tokens<extra></extra>",
        )
    )
    _base_layout(fig, height, title="Firing rate by text group (% of tokens)")
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="% of tokens where it fires", ticksuffix="%")
    return fig


def histogram_figure(
    edges: np.ndarray, counts: np.ndarray, color: str = TASK, height: int = 230
) -> go.Figure:
    """Distribution of the feature's activation where it fires (log count axis)."""
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(
        go.Bar(
            x=centres,
            y=counts,
            marker_color=color,
            width=(edges[1] - edges[0]) * 0.95,
            hovertemplate="activation %{x:.2f}: %{y:,} tokens<extra></extra>",
        )
    )
    _base_layout(fig, height, title="Activation histogram (tokens where it fires)")
    fig.update_yaxes(type="log", dtick=1, title_text="tokens")
    fig.update_xaxes(title_text="activation")
    return fig


def closeness_figure(
    cosine: float, null_cosine: float, typical: float | None = None, height: int = 300
) -> go.Figure:
    """How close a pair is compared to chance: pair cosine vs the null threshold (and a typical pair)."""
    names = ["random directions<br>(chance level)"]
    vals = [null_cosine]
    colors = [NEUTRAL]
    if typical is not None and np.isfinite(typical):
        names.append("a typical feature's<br>nearest neighbour")
        vals.append(typical)
        colors.append("#cbd5e1")
    names.append("this task feature ↔<br>its harmful neighbour")
    vals.append(cosine)
    colors.append(HARM)
    fig = go.Figure(
        go.Bar(
            x=vals,
            y=names,
            orientation="h",
            marker_color=colors,
            text=[f"{v:.2f}" for v in vals],
            textposition="outside",
            hovertemplate="%{y}: cosine %{x:.3f}<extra></extra>",
        )
    )
    fig.add_vline(
        x=null_cosine,
        line_dash="dash",
        line_color=INK,
        annotation_text=f"chance {null_cosine:.2f}",
        annotation_position="top",
    )
    _base_layout(fig, height)
    fig.update_xaxes(
        range=[0, max(1.0, max(vals) * 1.15)], title_text="cosine similarity of decoder directions"
    )
    fig.update_yaxes(tickfont={"size": 15})
    fig.update_layout(font={"size": 16}, margin={"l": 10, "r": 10, "t": 44, "b": 10})
    return fig


def finetune_figure(cosine: float, step: float = 0.6, height: int = 420) -> go.Figure:
    """Why closeness matters: a step along the task direction moves `cos x step` along the harmful one."""
    cosine = float(np.clip(cosine, -1, 1))
    th = math.acos(cosine)
    hx, hy = math.cos(th), math.sin(th)
    fig = go.Figure()
    proj = step * cosine

    def arrow(
        x1: float, y1: float, x0: float, y0: float, color: str, width: int = 4, dash: bool = False
    ) -> None:
        fig.add_annotation(
            x=x1,
            y=y1,
            ax=x0,
            ay=y0,
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            showarrow=True,
            arrowhead=3,
            arrowsize=1.2,
            arrowwidth=width,
            arrowcolor=color,
            text="",
        )

    arrow(1.0, 0.0, 0.0, 0.0, TASK)
    arrow(hx, hy, 0.0, 0.0, HARM)
    fig.add_trace(
        go.Scatter(
            x=[0, step],
            y=[-0.08, -0.08],
            mode="lines",
            line={"color": TASK_LIGHT, "width": 10},
            hoverinfo="skip",
            name="fine-tuning step along the task feature",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[step, proj * hx],
            y=[-0.08, proj * hy],
            mode="lines",
            line={"color": HARM_LIGHT, "width": 2, "dash": "dot"},
            hoverinfo="skip",
            showlegend=False,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[0, proj * hx],
            y=[0, proj * hy],
            mode="lines",
            line={"color": HARM, "width": 10},
            opacity=0.35,
            hoverinfo="skip",
            name=f"side effect along the harmful feature ({cosine:.0%} of the step)",
        )
    )
    fig.add_annotation(
        x=1.02,
        y=0.0,
        text="<b>task feature</b>",
        showarrow=False,
        xanchor="left",
        font={"color": TASK, "size": 16},
    )
    fig.add_annotation(
        x=hx * 1.04,
        y=hy * 1.04,
        text="<b>harmful feature</b>",
        showarrow=False,
        xanchor="left",
        font={"color": HARM, "size": 16},
    )
    fig.add_annotation(
        x=0.18 * math.cos(th / 2),
        y=0.18 * math.sin(th / 2),
        showarrow=False,
        text=f"{math.degrees(th):.0f}°",
        font={"size": 14},
    )
    _base_layout(fig, height, legend={"orientation": "h", "y": -0.05, "x": 0, "font": {"size": 14}})
    fig.update_xaxes(visible=False, range=[-0.15, 1.45])
    top = max(0.45, hy * 1.1 + 0.12)  # fit the angle: no empty band above a small one
    fig.update_yaxes(visible=False, range=[-0.22, top], scaleanchor="x", scaleratio=1)
    return fig


# --------------------------------------------------------------------------------------------------
# HTML builders (everything escaped, inline styles only)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    return f"rgba({r},{g},{b},{alpha:.3f})"


def tokens_html(
    tokens: Sequence[Any],
    activations: Sequence[float],
    scale: float,
    color: str = TASK,
    center: int | None = None,
    window: int | None = None,
    muted: Sequence[bool] | None = None,
    titles: Sequence[str] | None = None,
) -> str:
    """One context as inline spans: background opacity = activation / scale; hover shows the value.

    `muted[i]` greys token i (text and highlight), e.g. prompt tokens a fine-tune does not train on;
    `titles[i]` replaces its hover text (escaped)."""
    n = len(tokens)
    lo, hi = 0, n
    if window is not None and center is not None and n > 2 * window + 1:
        lo, hi = max(0, center - window), min(n, center + window + 1)
    scale = scale if scale and scale > 0 else 1.0
    out = [
        '<span style="font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;'
        'line-height:1.9;white-space:pre-wrap;word-break:break-word">'
    ]
    if lo > 0:
        out.append('<span style="color:#9ca3af">… </span>')
    for i in range(lo, hi):
        a = float(activations[i]) if i < len(activations) and activations[i] is not None else 0.0
        alpha = min(1.0, max(0.0, a / scale))
        style = "padding:1px 0;border-radius:3px;"
        grey = muted is not None and i < len(muted) and bool(muted[i])
        if grey:
            style += "color:#9ca3af;"
            if a > 0:
                style += f"background:{_rgba(NEUTRAL, 0.08 + 0.3 * alpha)};"
        elif a > 0:
            style += f"background:{_rgba(color, 0.12 + 0.78 * alpha)};"
            if alpha > 0.6:
                style += "color:white;"
        if i == center:
            style += f"outline:2px solid {color};"
        title = esc(titles[i]) if titles is not None and i < len(titles) else f"activation {a:.3f}"
        out.append(f'<span title="{title}" style="{style}">{show_token(tokens[i])}</span>')
    if hi < n:
        out.append('<span style="color:#9ca3af"> …</span>')
    out.append("</span>")
    return "".join(out)


def badge(text: Any, color: str, filled: bool = False) -> str:
    style = f"background:{color};color:white;" if filled else f"color:{color};border:1px solid {color};"
    return (
        f'<span style="{style}display:inline-block;padding:0 7px;margin-right:4px;border-radius:9px;'
        f'font-size:11.5px;line-height:18px">{esc(text)}</span>'
    )


def examples_html(
    examples: Sequence[dict[str, Any]],
    scale: float | None = None,
    color: str = TASK,
    window: int | None = 24,
    limit: int | None = None,
    documents: pd.DataFrame | None = None,
) -> str:
    """A list of examples: metadata line (rank, group, category, document) + highlighted tokens."""
    if not examples:
        return (
            '<div style="color:#6b7280;font-style:italic;padding:6px 0">No examples in this cache '
            "(the feature never fired on the corpus).</div>"
        )
    if scale is None:
        scale = max((float(e.get("max_activation") or 0) for e in examples), default=1.0) or 1.0
    rows = []
    for e in examples[:limit] if limit else examples:
        group = e.get("group") or ""
        kind = e.get("kind") or "top"
        if kind == "top":
            head = f'<b style="color:{INK}">#{int(e.get("rank") or 0) + 1}</b>'
        else:
            q = e.get("quantile")
            head = f'<b style="color:#6b7280">quantile {float(q):.2f}</b>' if q is not None else "sample"
        meta = [head, badge(group, GROUP_COLORS.get(str(group), NEUTRAL), filled=True)]
        if e.get("category"):
            meta.append(badge(e["category"], HARM))
        meta.append(
            f'<span style="color:#6b7280;font-size:12px">max {float(e.get("max_activation") or 0):.2f}'
            f" · doc {esc(e.get('doc_id'))}</span>"
        )
        src = _doc_source(documents, e.get("doc_id"))
        if src:
            meta.append(f'<span style="color:#9ca3af;font-size:12px">{esc(src)}</span>')
        body = tokens_html(
            e.get("tokens") or [],
            e.get("activations") or [],
            scale,
            color=color,
            center=e.get("max_position"),
            window=window,
        )
        rows.append(
            f'<div style="padding:6px 0 8px;border-bottom:1px solid #f1f5f9">'
            f'<div style="margin-bottom:2px">{" ".join(meta)}</div>{body}</div>'
        )
    return "<div>" + "".join(rows) + "</div>"


def _doc_source(documents: pd.DataFrame | None, doc_id: Any) -> str | None:
    """The file a document came from (basename of source_path, else a string source), or None."""
    if documents is None or doc_id is None or doc_id not in documents.index:
        return None
    for col in ("source_path", "source"):
        if col in documents:
            v = documents.at[doc_id, col]
            if isinstance(v, str) and v:
                return v.replace("\\", "/").rsplit("/", 1)[-1]
    return None


def token_chips_html(tokens: Sequence[Any], color: str, title: str) -> str:
    """Logit-lens tokens as chips."""
    chips = "".join(
        f'<span style="display:inline-block;margin:2px 4px 2px 0;padding:1px 8px;border-radius:6px;'
        f"background:{_rgba(color, 0.1)};border:1px solid {_rgba(color, 0.4)};font-family:ui-monospace,Menlo,"
        f'monospace;font-size:13px;white-space:pre">{show_token(t)}</span>'
        for t in tokens
    )
    if not chips:
        chips = '<span style="color:#6b7280">—</span>'
    return f'<div style="margin:2px 0 8px"><div style="font-size:12px;color:#6b7280">{esc(title)}</div>{chips}</div>'


def feature_header_html(row: dict[str, Any], role: str | None = None) -> str:
    """Title block of a feature: id, label, role/flags, explanation."""
    color = HARM if role == "harmful" or (role is None and row.get("is_harmful")) else TASK
    flags = []
    if row.get("is_task"):
        flags.append(badge("task feature", TASK, filled=True))
    if row.get("is_harmful"):
        flags.append(badge("harmful", HARM, filled=True))
    if row.get("harm_category"):
        flags.append(badge(row["harm_category"], HARM))
    if row.get("dead"):
        flags.append(badge("dead", NEUTRAL, filled=True))
    label = esc(row.get("label")) or '<span style="color:#9ca3af">(no label)</span>'
    expl = esc(row.get("explanation"))
    return (
        f'<div style="border-left:5px solid {color};padding:2px 0 2px 12px;margin:4px 0 10px">'
        f'<div style="font-size:13px;color:#6b7280">Feature #{int(row["feature"])}</div>'
        f'<div style="font-size:22px;font-weight:650;color:{INK};line-height:1.3">{label}</div>'
        f'<div style="margin-top:4px">{"".join(flags)}</div>'
        + (f'<div style="color:#4b5563;font-size:14px;margin-top:4px">{expl}</div>' if expl else "")
        + "</div>"
    )


def closeness_caption(cosine: float, null_cosine: float) -> str:
    """'cosine 0.41 — 4.3× the chance level 0.095' (plain text, no cache strings)."""
    if not np.isfinite(cosine):
        return "not in the neighbour list"
    if null_cosine and null_cosine > 0:
        return f"cosine {cosine:.2f} — {cosine / null_cosine:.1f}× the chance level {null_cosine:.3g}"
    return f"cosine {cosine:.2f}"


def neighbour_table(
    nbrs: pd.DataFrame, null_cosine: float, link_base: str = "feature", extra_query: str = ""
) -> pd.DataFrame:
    """Display table of neighbours (pure): id, link, label, cosine, × chance, z, harm, category.

    `extra_query` (e.g. "&cache=after") is appended to each link so links keep the chosen cache."""
    df = pd.DataFrame(
        {
            "feature": nbrs["feature"].astype(int),
            "open": [f"{link_base}?feature={int(f)}{extra_query}" for f in nbrs["feature"]],
            "label": nbrs["label"].astype("string").fillna(""),
            "cosine": nbrs["cosine"].round(3),
            "× chance": (nbrs["cosine"] / null_cosine).round(2) if null_cosine > 0 else np.nan,
            "z": nbrs["z"].round(1),
            "harm score": nbrs["harm_score"].round(3),
            "harmful": nbrs["is_harmful"].astype(bool),
            "category": nbrs["harm_category"].astype("string").fillna(""),
            "above chance": nbrs["cosine"] >= null_cosine,
        }
    )
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# fine-tune diff and dataset triage

# comparison kind -> colour: the fine-tuned run (after) in the task blue, its control grey, the direct
# difference purple (every point is a harmful feature, so red would say nothing)
COMPARISON_COLORS = {"after": TASK, "control": NEUTRAL, "direct": "#7c3aed"}
MEASURE_NAMES = {"mean": "mean activation", "rate": "firing rate"}


def _ci_arrays(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error-bar lengths (plus, minus) from a CI; missing bounds draw no bar."""
    return np.nan_to_num(np.clip(hi - y, 0, None)), np.nan_to_num(np.clip(y - lo, 0, None))


def change_scatter(
    series: Sequence[tuple[str, str, pd.DataFrame, str]],
    measure: str = "mean",
    null_cosine: float | None = None,
    height: int = 460,
) -> go.Figure:
    """Observed change vs predicted risk of harmful features, error bars = 95% CI over prompts.

    `series`: (comparison, legend name, diff rows of that comparison, colour), one trace each; x =
    risk_max_cos, y = the measure's change. Names and categories come from files: escaped."""
    col, lo_c, hi_c = MEASURES[measure]
    fig = go.Figure()
    for comparison, legend, df, color in series:
        y = df[col].to_numpy(dtype=np.float64)
        lo, hi = df[lo_c].to_numpy(dtype=np.float64), df[hi_c].to_numpy(dtype=np.float64)
        plus, minus = _ci_arrays(y, lo, hi)
        cats = [esc(c) or "no category" for c in df["harm_category"]]
        task = [f"#{int(t)}" if t == t and t is not None else "?" for t in df["risk_task_feature"]]
        cd = [
            [int(f), float(a), float(b), c, t]
            for f, a, b, c, t in zip(df["feature"], lo, hi, cats, task, strict=True)
        ]
        fig.add_trace(
            go.Scatter(
                x=df["risk_max_cos"].to_numpy(dtype=np.float64),
                y=y,
                mode="markers",
                name=esc(legend),
                legendgroup=esc(comparison),
                customdata=cd,
                error_y={
                    "type": "data",
                    "array": plus,
                    "arrayminus": minus,
                    "thickness": 1,
                    "width": 0,
                    "color": _rgba(color, 0.35),
                },
                marker={"size": 7, "color": color, "opacity": 0.85, "line": {"width": 0.5, "color": "white"}},
                hovertemplate=(
                    "<b>harmful #%{customdata[0]}</b> · %{customdata[3]}<br>predicted risk: cosine %{x:.3f}"
                    " with task %{customdata[4]}<br>change %{y:+.4g} (95% CI %{customdata[1]:+.4g} to "
                    f"%{{customdata[2]:+.4g}})<extra>{esc(comparison)}</extra>"
                ),
            )
        )
    fig.add_hline(y=0, line_color="#9ca3af", line_width=1)
    if null_cosine is not None and np.isfinite(null_cosine):
        fig.add_vline(
            x=float(null_cosine),
            line_dash="dash",
            line_color=INK,
            line_width=1,
            annotation_text=f"chance {null_cosine:.2f}",
            annotation_position="top left",
        )
    _base_layout(fig, height, legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0})
    fig.update_xaxes(title_text="predicted risk: max cosine of the decoder direction to a task feature's")
    fig.update_yaxes(title_text=f"change in {MEASURE_NAMES[measure]}", zeroline=False)
    return fig


def _ci_bars(sub: pd.DataFrame, x: list[str], name: str, color: str, first: pd.Series, hover: str) -> go.Bar:
    """Bars of `sub` (columns est, lo, hi, heldout_loss, comparison) with 95% CI error bars; customdata is
    [escaped `first`, lo, hi, held-out loss text, escaped comparison] for the hover template."""
    y = sub["est"].to_numpy(dtype=np.float64)
    plus, minus = _ci_arrays(y, sub["lo"].to_numpy(dtype=np.float64), sub["hi"].to_numpy(dtype=np.float64))
    loss = ["—" if v is None or v != v else f"{float(v):.4f}" for v in sub["heldout_loss"]]
    cd = [
        [esc(f), float(a), float(b), ls, esc(c)]
        for f, a, b, ls, c in zip(first, sub["lo"], sub["hi"], loss, sub["comparison"], strict=True)
    ]
    return go.Bar(
        x=x,
        y=y,
        name=name,
        marker_color=color,
        customdata=cd,
        hovertemplate=hover,
        error_y={"type": "data", "array": plus, "arrayminus": minus, "thickness": 1.2, "color": INK},
    )


def compare_runs_figure(table: pd.DataFrame, height: int = 360) -> go.Figure:
    """Pooled change of all harmful features vs the shared `before`, per run: its fine-tune and its control.

    `table` is data.compare_runs_table(); error bars = 95% CI over prompts; hover adds held-out loss."""
    fig = go.Figure()
    for kind, name in (("after", "fine-tuned run − before"), ("control", "its control − before")):
        sub = table[table["kind"] == kind]
        if not len(sub):
            continue
        fig.add_trace(
            _ci_bars(
                sub,
                [esc(r) for r in sub["run"]],
                name,
                COMPARISON_COLORS[kind],
                sub["label"],
                "<b>%{x}</b>: %{customdata[4]}<br>harmful features' mean change %{y:+.4g}"
                "<br>95% CI %{customdata[1]:+.4g} to %{customdata[2]:+.4g}"
                "<br>held-out task loss of %{customdata[0]}: %{customdata[3]}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line_color="#9ca3af", line_width=1)
    _base_layout(
        fig, height, barmode="group", legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0}
    )
    fig.update_xaxes(type="category")  # run names, even ones that look like numbers
    fig.update_yaxes(title_text="mean change, all harmful features")
    return fig


CHANGE_BAR_COLORS = {**COMPARISON_COLORS, "patch": "#0f766e", "random": "#99f6e4"}


def change_bars_figure(
    bars: pd.DataFrame, legend: dict[str, str], y_title: str, height: int = 380
) -> go.Figure:
    """One bar per comparison with its 95% CI, coloured (and named in the legend) by `kind`.

    `bars` has columns name (the x label), kind, comparison (as in the file), est, lo, hi and
    heldout_loss (None when unknown); the bars keep their row order. Every string is escaped."""
    fig = go.Figure()
    for kind, title in legend.items():
        sub = bars[bars["kind"] == kind]
        if not len(sub):
            continue
        fig.add_trace(
            _ci_bars(
                sub,
                [esc(n) for n in sub["name"]],
                esc(title),
                CHANGE_BAR_COLORS.get(kind, NEUTRAL),
                sub["comparison"],
                "<b>%{x}</b> (%{customdata[0]})<br>change %{y:+.4g}"
                "<br>95% CI %{customdata[1]:+.4g} to %{customdata[2]:+.4g}"
                "<br>held-out task loss: %{customdata[3]}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line_color="#9ca3af", line_width=1)
    _base_layout(
        fig, height, legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0}, showlegend=True
    )
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=[esc(n) for n in bars["name"]])
    fig.update_yaxes(title_text=esc(y_title))
    return fig


def triage_histogram(
    scores: Sequence[float],
    removed: Sequence[bool],
    threshold: float | None = None,
    bins: int = 40,
    height: int = 300,
) -> go.Figure:
    """Sample scores, stacked kept (grey) / removed (red) on shared bins, the removal threshold marked."""
    s = np.asarray(scores, dtype=np.float64)
    rm = np.asarray(removed, dtype=bool)
    ok = np.isfinite(s)
    edges = np.histogram_bin_edges(s[ok], bins=bins) if ok.any() else np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    rng = [[float(a), float(b)] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig = go.Figure()
    for name, mask, color in (("kept", ok & ~rm, NEUTRAL), ("removed", ok & rm, HARM)):
        counts, _ = np.histogram(s[mask], bins=edges)
        fig.add_trace(
            go.Bar(
                x=centres,
                y=counts,
                name=name,
                marker_color=color,
                width=(edges[1] - edges[0]) * 0.95,
                customdata=rng,
                hovertemplate=f"score %{{customdata[0]:.3g}}–%{{customdata[1]:.3g}}: "
                f"%{{y}} samples {name}<extra></extra>",
            )
        )
    if threshold is not None and np.isfinite(threshold):
        fig.add_vline(
            x=float(threshold),
            line_dash="dash",
            line_color=INK,
            line_width=1,
            annotation_text=f"removed: score ≥ {threshold:.3g}",
            annotation_position="top left",
        )
    _base_layout(
        fig, height, barmode="stack", legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0}
    )
    fig.update_xaxes(title_text="sample score (push per trained token)")
    fig.update_yaxes(title_text="samples")
    return fig


TRIAGE_PARTS = {
    "total": "direct + via overlap",
    "direct": "direct (harmful features)",
    "via_overlap": "via overlap (task features)",
}


def triage_token_scores(sample: dict[str, Any], part: str = "total") -> np.ndarray:
    """Per-token score of a triage sample: direct, via_overlap, or their sum ('total')."""
    d = np.asarray(sample["direct"], dtype=np.float64)
    v = np.asarray(sample["via_overlap"], dtype=np.float64)
    return d + v if part == "total" else d if part == "direct" else v


def triage_tokens_html(sample: dict[str, Any], part: str = "total", color: str = HARM) -> tuple[str, float]:
    """(HTML, scale): the sample's tokens highlighted by score, prompt (untrained) tokens greyed.

    The scale is the highest score over trained tokens, so a large score on the shared system
    prompt does not wash the answer out."""
    toks, trained = list(sample["tokens"]), np.asarray(sample["trained"], dtype=bool)
    d = np.asarray(sample["direct"], dtype=np.float64)
    v = np.asarray(sample["via_overlap"], dtype=np.float64)
    n = min(len(toks), len(trained), len(d), len(v))
    toks, trained, d, v = toks[:n], trained[:n], d[:n], v[:n]
    score = triage_token_scores({"direct": d, "via_overlap": v}, part)
    top = score[trained] if trained.any() else score
    scale = float(np.nanmax(top)) if len(top) and np.nanmax(top) > 0 else 1.0
    titles = [
        f"score {a + b:.3f} = direct {a:.3f} + via overlap {b:.3f}" + ("" if t else " · prompt, not trained")
        for a, b, t in zip(d, v, trained, strict=True)
    ]
    return tokens_html(toks, score, scale, color=color, muted=~trained, titles=titles), scale


def score_legend_html(scale: float, color: str = HARM, what: str = "score") -> str:
    """Legend of the token highlighting: four shades with their values, and a greyed prompt token."""
    cells = []
    for frac in (0.25, 0.5, 0.75, 1.0):
        fg = "color:white;" if frac > 0.6 else ""
        cells.append(
            f'<span style="background:{_rgba(color, 0.12 + 0.78 * frac)};{fg}padding:1px 6px;'
            f'border-radius:3px;margin-right:3px">{frac * scale:.3g}</span>'
        )
    return (
        f'<div style="font-size:12.5px;color:#4b5563;margin:2px 0 8px">{esc(what)} per trained token: '
        + "".join(cells)
        + ' <span style="margin-left:10px;color:#9ca3af;background:'
        f'{_rgba(NEUTRAL, 0.2)};padding:1px 6px;border-radius:3px">prompt token (not trained)</span></div>'
    )


def finetune_table(
    main: pd.DataFrame,
    comparison: str,
    others: dict[str, pd.DataFrame] | None = None,
    measure: str = "mean",
    labels: Sequence[Any] | None = None,
    extra_query: str = "",
    link_base: str = "feature",
) -> pd.DataFrame:
    """Display table of harmful features, largest change of `comparison` first (pure).

    `main` holds that comparison's rows; `others` adds the change of more comparisons by feature;
    `labels[i]` is feature i's label (None: no label column). Links keep the chosen cache."""
    col, lo_c, hi_c = MEASURES[measure]
    m = main.sort_values([col, "feature"], ascending=[False, True], na_position="last").reset_index(drop=True)
    feats = m["feature"].astype(int).to_numpy()
    lo, hi = m[lo_c].to_numpy(dtype=np.float64), m[hi_c].to_numpy(dtype=np.float64)
    task = pd.array(
        [int(t) if t == t and t is not None else None for t in m["risk_task_feature"]], dtype="Int64"
    )
    df = pd.DataFrame(
        {
            "feature": feats,
            "open": [f"{link_base}?feature={int(f)}{extra_query}" for f in feats],
            f"Δ {comparison}": m[col].to_numpy(dtype=np.float64),
            "CI low": lo,
            "CI high": hi,
            "CI excludes 0": (lo > 0) | (hi < 0),
            "risk (max cos)": m["risk_max_cos"].to_numpy(dtype=np.float64),
            "nearest task feature": task,
            "category": m["harm_category"].astype("string").fillna("").to_numpy(dtype=object),
        }
    )
    for name, other in (others or {}).items():
        by = other.drop_duplicates("feature").set_index("feature")[col]
        df[f"Δ {name}"] = by.reindex(feats).to_numpy(dtype=np.float64)
    if labels is not None:
        df["label"] = [
            ("" if labels[f] is None or labels[f] is pd.NA else str(labels[f]))
            if 0 <= f < len(labels)
            else ""
            for f in feats
        ]
    return df


def triage_table(ranked: pd.DataFrame) -> pd.DataFrame:
    """Display table of a triage ranking (pure): previews stay plain text (newlines shown as ↵) for st.dataframe."""
    return pd.DataFrame(
        {
            "rank": ranked["rank"].astype(int).to_numpy(),
            "key": ranked["key"].astype(str).to_numpy(dtype=object),
            "score": ranked["score"].to_numpy(dtype=np.float64),
            "direct": ranked["direct"].to_numpy(dtype=np.float64),
            "via overlap": ranked["via_overlap"].to_numpy(dtype=np.float64),
            "removed": ranked["removed"].astype(bool).to_numpy(),
            "random removed": ranked["random_removed"].astype(bool).to_numpy(),
            "trained tokens": ranked["n_tokens"].astype(int).to_numpy(),
            "top features": [", ".join(f"#{int(f)}" for f in fs) for fs in ranked["top_features"]],
            "preview": [
                ("" if p is None or p is pd.NA else str(p)).replace("\r", "").replace("\n", "↵ ")
                for p in ranked["preview"]
            ],
        }
    )
