"""The map as three layers drawn one over the other (map_layers): what a click changes (the overlay) apart from
what it does not (the colours, the points), so a page can keep the two that do not change."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from explorer.figures.map import (
    COLOR_MODES,
    Selection,
    _add_selection,
    _base_traces,
    _check_mode,
    _map_layout,
    _marker_size,
    decimate,
)
from explorer.figures.map_hover import hover_of, hover_of_rows
from explorer.figures.style import INK

POINTS_NAME = "features"  # the points layer's trace (what a click and a hover find)
CLEAR = "rgba(0,0,0,0)"
# the layers' right margin, the same for every colouring: room for the colour bar (plotly's automatic margin
# gave it 125 px; the category legend lies inside the plot instead). Fixed, so the three layers share one
# plot area without being redrawn, and the map does not move when the colouring changes.
LAYERS_RIGHT = 125


def map_layers(
    features: pd.DataFrame,
    color_by: str,
    selection: Selection,
    max_points: int = 40000,
    height: int = 640,
    seed: int = 0,
) -> tuple[go.Figure, go.Figure, go.Figure]:
    """map_figure split in three for a page that redraws only what a click or a colour changes, drawn one over
    the other at the same size, margins and axes (views/map.py keeps them aligned):

    * colours, at the bottom: every drawn point in its colour (and the density of all when decimated), its
      colour bar or category legend and the title; no hover text, no ids. It depends on the colouring only.
    * overlay: the selection, its neighbours and lines (SVG traces: a click starts no WebGL context), on a
      transparent figure; its clear title names the selection, for the page's saved image.
    * points, on top: the same points, invisible, with their hover text and ids: what the reader hovers and
      clicks. It depends on neither the selection nor the colouring.

    Streamlit's message cache sends a reference instead of a chart whose spec is byte-identical to one the
    browser holds, so a click sends the overlay alone and a colour change the colours and the overlay: the
    hover text (most of the bytes: bench/bench_map_bytes.py) only with the page. Above `max_points` the
    layers draw the fixed sample alone: the overlay draws the neighbours, so no per-selection detail is
    needed there. The points ignore plotly's own selection styling (a clicked dot would dim the others)."""
    return (
        colour_layer(features, color_by, max_points, height, seed),
        points_layer(features, max_points, height, seed),
        overlay_layer(features, color_by, selection, max_points, height),
    )


DETAIL = "a fixed sample, and every neighbour of the selection"  # the layers' decimation note


def colour_layer(
    features: pd.DataFrame, color_by: str, max_points: int = 40000, height: int = 640, seed: int = 0
) -> go.Figure:
    """map_layers' colours: it depends on the features and the colouring alone (a page may keep it)."""
    _check_mode(color_by)
    x = features["umap_x"].to_numpy(dtype=np.float64)
    idx = decimate(x, features["umap_y"].to_numpy(dtype=np.float64), max_points, seed=seed)
    colours = _base_traces(features, color_by, idx, 0.55, hover=False)
    _map_layout(colours, color_by, height, f"Feature map coloured by {color_by}", len(idx), len(x), DETAIL)
    # the category legend (inside, bottom left) says which colour is which; a click on it would hide points
    # the reader still hovers and clicks
    colours.update_layout(
        margin={"r": LAYERS_RIGHT, "autoexpand": False},
        legend={
            "itemclick": False,
            "itemdoubleclick": False,
            "x": 0.01,
            "y": 0.01,
            "xanchor": "left",
            "yanchor": "bottom",
            "bgcolor": "rgba(255,255,255,0.8)",
        },
    )
    return colours


def points_layer(
    features: pd.DataFrame, max_points: int = 40000, height: int = 640, seed: int = 0
) -> go.Figure:
    """map_layers' points: it depends on the features alone (a page may keep it)."""
    x = features["umap_x"].to_numpy(dtype=np.float64)
    y = features["umap_y"].to_numpy(dtype=np.float64)
    idx = decimate(x, y, max_points, seed=seed)
    points = go.Figure(
        go.Scattergl(
            x=x[idx].astype(np.float32),
            y=y[idx].astype(np.float32),
            **hover_of(hover_of_rows(features.iloc[idx]), slice(None)),
            name=POINTS_NAME,
            mode="markers",
            showlegend=False,
            marker={"size": _marker_size(len(idx)), "color": CLEAR},
            # plotly draws a hover label in its point's colour: these points have none
            hoverlabel={"bgcolor": "white", "bordercolor": "#9ca3af", "font": {"color": INK}},
            selected={"marker": {"opacity": 1}},
            unselected={"marker": {"opacity": 1}},
        )
    )
    # the points' uirevision is their own (below), so the colouring given here does not show
    _map_layout(points, next(iter(COLOR_MODES)), height, "Feature map", len(idx), len(x), DETAIL)
    _clear(points)
    points.update_layout(uirevision="map")  # the reader's pan and zoom outlive a colour change
    return points


def overlay_layer(
    features: pd.DataFrame, color_by: str, selection: Selection, max_points: int = 40000, height: int = 640
) -> go.Figure:
    """map_layers' overlay: the selection (the only layer a click changes)."""
    _check_mode(color_by)
    n = len(features)
    drawn = min(n, max_points)  # what decimate draws without a selection to keep
    overlay = go.Figure()
    _add_selection(overlay, features, selection, trace=go.Scatter)
    picked = (
        f"Feature map coloured by {color_by}, feature #{selection.feature} selected with its neighbours at "
        f"cosine ≥ {selection.threshold:.3f}"
    )
    _map_layout(overlay, color_by, height, picked, drawn, n, DETAIL)
    _clear(overlay)
    overlay.update_layout(
        # the selection's legend inside the plot, top left: the colours' own (categories) lies below it
        showlegend=True,
        legend={"orientation": "h", "x": 0.01, "y": 0.99, "xanchor": "left", "yanchor": "top"},
        legend_bgcolor="rgba(255,255,255,0.8)",
        hovermode=False,
    )
    return overlay


def _clear(fig: go.Figure) -> None:
    """A layer over the colours: transparent, its title (which only reserves the colours' title room) clear, and
    the colours' fixed margins."""
    fig.update_layout(
        paper_bgcolor=CLEAR,
        plot_bgcolor=CLEAR,
        title_font_color=CLEAR,
        margin={"r": LAYERS_RIGHT, "autoexpand": False},
    )


class KeptFigure(go.Figure):
    """A finished figure that a page keeps and only reads afterwards (keep). st.plotly_chart asks for its dict on
    every run, and plotly's to_dict deep-copies every array (the points' 20,000 hover texts): this one makes it
    once and hands out a new outer dict and new trace dicts (plotly.io.to_json drops their uids) over the same
    read-only arrays. Changing the figure after its first to_dict would not show: it is never changed."""

    _kept: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self._kept is None:
            kept = super().to_dict()
            for trace in kept["data"]:
                for v in trace.values():
                    if isinstance(v, np.ndarray):
                        v.setflags(write=False)
            self._kept = kept
        return {**self._kept, "data": [dict(t) for t in self._kept["data"]]}


def keep(fig: go.Figure) -> KeptFigure:
    """`fig`, finished, as a KeptFigure: the same object and properties (no copy, no new validation)."""
    fig.__class__ = KeptFigure
    return cast(KeptFigure, fig)
