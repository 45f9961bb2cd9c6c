"""The map: every feature at its UMAP position, the selected one joined to its neighbours."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from explorer.figures.map_hover import Hover, hover_of, hover_of_rows
from explorer.figures.style import (
    BOTH,
    CATEGORY_PALETTE,
    NO_CATEGORY_COLOR,
    TASK,
    base_layout,
    canonical_category,
    esc,
    role_color,
    role_marker,
    role_of,
    titled,
)

HARM_SCALE = [[0.0, "#e5e7eb"], [0.5, "#e5e7eb"], [0.7, "#fca5a5"], [0.85, "#ef4444"], [1.0, "#7f1d1d"]]
TASK_SCALE = [[0.0, "#e5e7eb"], [0.5, "#e5e7eb"], [0.7, "#93c5fd"], [0.85, "#3b82f6"], [1.0, "#1e3a8a"]]
COLOR_MODES = {
    "harm score": "harm_score",
    "task score": "task_score",
    "harm category": "harm_category",
    "firing rate": "frequency",
}


@dataclass(frozen=True)
class Selection:
    """The highlighted feature and its neighbours on the map (ids, cosines, harmful flags); drawn by role
    (style.role_of) when the frame has is_task / is_harmful."""

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
        z=z.astype(np.float32),  # a 4-byte typed array: half float64's bytes, the same greys
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
    title: str | None = None,
) -> go.Figure:
    """The UMAP of all features as a WebGL scatter, with the selection and its neighbours on top.

    `features` needs feature, umap_x, umap_y, hover and the colour column. Above `max_points`
    points, far points are decimated to a fixed sample and a grey density layer shows them all.
    Neighbours are joined to the selection by lines whose width grows with cosine; only those
    at or above `selection.threshold` are drawn.
    """
    _check_mode(color_by)
    x = features["umap_x"].to_numpy(dtype=np.float64)
    y = features["umap_y"].to_numpy(dtype=np.float64)
    keep: list[int] = []
    focus = None
    if selection is not None:
        keep = [selection.feature, *selection.neighbours]
        focus = (x[selection.feature], y[selection.feature])
    idx = decimate(x, y, max_points, keep=keep, focus=focus, seed=seed)
    fade = 0.55 if selection is not None else 0.85  # the selection stands out against a muted map
    fig = _base_traces(features, color_by, idx, fade)
    if selection is not None:
        _add_selection(fig, features, selection)
    # the title says what the map shows, so a downloaded PNG does too (plain text; `titled` escapes it)
    if title is None:
        title = f"Feature map coloured by {color_by}" + (
            f", feature #{selection.feature} selected with its neighbours above chance" if selection else ""
        )
    return _map_layout(fig, color_by, height, title, len(idx), len(x))


def _check_mode(color_by: str) -> None:
    if color_by not in COLOR_MODES:
        raise ValueError(f"color_by must be one of {list(COLOR_MODES)}")


def _map_layout(
    fig: go.Figure,
    color_by: str,
    height: int,
    title: str,
    drawn: int,
    n: int,
    detail: str = "full detail near the selection",
) -> go.Figure:
    """Layout shared by the map and its two layers: size, title (with the decimation note), fixed axes."""
    base_layout(fig, height, dragmode="pan", legend={"orientation": "h", "y": -0.02, "x": 0})
    titled(fig, title)
    if drawn < n:
        note = f"{drawn:,} of {n:,} features drawn ({detail}; grey = density of all)"
        fig.update_layout(title_text=f"{fig.layout.title.text}<br><span style='font-size:12px'>{note}</span>")
        fig.update_layout(margin={"t": 66})
    fig.update_xaxes(visible=False, range=[-1.08, 1.08])
    fig.update_yaxes(visible=False, range=[-1.08, 1.08])
    fig.update_layout(uirevision=f"map-{color_by}")
    return fig


def _base_traces(
    features: pd.DataFrame, color_by: str, idx: np.ndarray, fade: float, hover: bool = True
) -> go.Figure:
    """A figure with the points `idx` coloured by `color_by` (and the density of all when decimated); without
    `hover`, the points carry no hover text nor ids (map_layers' colour layer: the points layer hovers)."""
    fig = go.Figure()
    if len(idx) < len(features):
        fig.add_trace(_density(features["umap_x"].to_numpy(float), features["umap_y"].to_numpy(float)))
    sub = features.iloc[idx]
    tips = hover_of_rows(sub) if hover else None
    col = COLOR_MODES[color_by]
    marker_size = _marker_size(len(idx))
    if col == "harm_category":
        _category_traces(fig, sub, tips, marker_size, fade)
        return fig
    vals = sub[col].to_numpy(dtype=np.float32)
    if col == "frequency":
        vals = np.log10(np.clip(vals, 1e-7, 1), dtype=np.float32)
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
            x=sub["umap_x"].to_numpy(dtype=np.float32)[order],
            y=sub["umap_y"].to_numpy(dtype=np.float32)[order],
            **hover_of(tips, order),
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
            mode="markers",
        )
    )
    return fig


def _marker_size(n: int) -> float:
    return 5 if n <= 5000 else 3.5 if n <= 50000 else 2.5


def _category_traces(
    fig: go.Figure,
    sub: pd.DataFrame,
    hover: Hover | None,
    marker_size: float,
    fade: float,
) -> None:
    """One trace per canonical harm category (precompute/data/taxonomy.py), in the taxonomy's order, each in
    its fixed colour (style.CATEGORY_PALETTE) with the count in the legend; features without one lie below."""
    raw = sub["harm_category"].astype("string").fillna("").to_numpy(dtype=object)
    none = raw == ""
    cats = np.array([canonical_category(c) if c else "" for c in raw], dtype=object)
    ux, uy = sub["umap_x"].to_numpy(dtype=np.float32), sub["umap_y"].to_numpy(dtype=np.float32)
    fig.add_trace(
        go.Scattergl(
            x=ux[none],
            y=uy[none],
            **hover_of(hover, none),
            name="no harm category",
            marker={"size": marker_size, "color": NO_CATEGORY_COLOR, "opacity": fade * 0.8},
            mode="markers",
        )
    )
    for cat, color in CATEGORY_PALETTE.items():
        m = cats == cat
        if not m.any():
            continue
        fig.add_trace(
            go.Scattergl(
                x=ux[m],
                y=uy[m],
                **hover_of(hover, m),
                name=f"{esc(cat)} ({int(m.sum()):,})",
                marker={"size": marker_size + 1, "color": color, "opacity": max(fade, 0.85)},
                mode="markers",
            )
        )


def line_width(cos: float, threshold: float, lo: float = 1.0, hi: float = 9.0) -> float:
    """Line width for a neighbour edge: `lo` at the null threshold, `hi` at cosine 1."""
    t = (cos - threshold) / max(1e-9, 1.0 - threshold)
    return float(lo + (hi - lo) * min(1.0, max(0.0, t)))


def _add_selection(fig: go.Figure, features: pd.DataFrame, sel: Selection, trace: Any = go.Scattergl) -> None:
    """The star, the neighbours above the threshold and the lines to them, as `trace`s (WebGL on the one-figure
    map, where they must lie above the WebGL points; SVG on the overlay, which then needs no WebGL context)."""
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
            trace(
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
    roles = _roles(features, sel)
    kinds = (
        ("harmful neighbour", "harmful"),
        ("task and harmful neighbour", BOTH),
        ("other neighbour", None),
    )
    for name, kind in kinds:
        # harmful as the selection says; a harmful neighbour that is also a task feature gets the both-marker
        grp = [
            (j, c)
            for j, c, h in shown
            if ((BOTH if roles.get(j) == BOTH else "harmful") if h else None) == kind
        ]
        if not grp:
            continue
        ids = np.array([j for j, _ in grp])
        cs = np.array([c for _, c in grp])
        text = [f"{hover[j]}<br><b>cosine {c:.3f}</b> to #{sel.feature}" for j, c in grp]
        size = 10 + 10 * np.clip((cs - sel.threshold) / max(1e-9, 1 - sel.threshold), 0, 1)
        marker = (
            {**role_marker(kind), "size": size}
            if kind
            else {"size": size, "color": "white", "line": {"width": 2, "color": "#475569"}}
        )
        fig.add_trace(
            trace(
                x=x[ids],
                y=y[ids],
                mode="markers",
                text=text,
                customdata=ids,
                hovertemplate="%{text}<extra></extra>",
                name=name,
                marker=marker,
            )
        )
    me = roles.get(sel.feature, "task")
    color = role_color(me)
    edge = {"width": 3, "color": TASK} if me == BOTH else {"width": 2, "color": "white"}
    fig.add_trace(
        trace(
            x=[x0],
            y=[y0],
            mode="markers",
            text=[hover[sel.feature]],
            customdata=[sel.feature],
            hovertemplate="%{text}<extra>selected</extra>",
            name=f"selected #{sel.feature}",
            marker={"size": 24, "symbol": "star", "color": color, "line": edge},
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
        font={"color": color, "size": 14},
        bgcolor="rgba(255,255,255,0.85)",
        bordercolor=color,
        borderwidth=1,
        borderpad=3,
    )


def _roles(features: pd.DataFrame, sel: Selection) -> dict[int, str]:
    """The role (style.role_of) of the selected feature and of its harmful neighbours, from is_task /
    is_harmful when the frame has them. Without them the selection is drawn as a task feature (the map's
    first meaning) and a neighbour as `sel.harmful` says."""
    if "is_task" not in features or "is_harmful" not in features:
        return {}
    task = features["is_task"].to_numpy(dtype=bool)
    harm = features["is_harmful"].to_numpy(dtype=bool)
    ids = [sel.feature, *map(int, sel.neighbours)]
    return {j: role_of({"is_task": task[j], "is_harmful": harm[j]}) for j in ids}
