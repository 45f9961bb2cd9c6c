"""The story's explanatory charts: a pair's cosine against chance, what fine-tuning would do, and a
cache's own results (task scores, the chance levels, harmful features by category, the closeness of two
feature sets to harmful features)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go

from explorer.figures.closeness import INDUCING_NAME, NON_INDUCING_NAME, closeness_sets_figure, fmt_p
from explorer.figures.style import (
    HARM,
    HARM_LIGHT,
    INK,
    NEITHER_COLOR,
    NEUTRAL,
    TASK,
    TASK_LIGHT,
    base_layout,
    category_color,
    esc,
)


def _cosine_bars(names: list[str], vals: list[float], colors: list[str], digits: int) -> go.Figure:
    """Horizontal bars of cosines, each labelled with its value (the pair and null figures)."""
    return go.Figure(
        go.Bar(
            x=vals,
            y=names,
            orientation="h",
            marker_color=colors,
            text=[f"{v:.{digits}f}" for v in vals],
            textposition="outside",
            hovertemplate="%{y}: cosine %{x:.3f}<extra></extra>",
        )
    )


def closeness_figure(
    cosine: float,
    null_cosine: float,
    typical: float | None = None,
    height: int = 300,
    null_label: str = "chance level",
    pair_name: str = "this pair",
) -> go.Figure:
    """How close a pair is compared to chance: pair cosine vs the null threshold (and a typical pair);
    `null_label` names the null (e.g. 'covariance null'); `pair_name` (our own text, escaped here) names the pair
    by what it is shown to be, never by a role the cache does not back."""
    names = [f"random directions<br>({null_label})"]
    vals = [null_cosine]
    colors = [NEUTRAL]
    if typical is not None and np.isfinite(typical):
        names.append("a typical feature's<br>nearest neighbour")
        vals.append(typical)
        colors.append("#cbd5e1")
    names.append(esc(pair_name).replace("&lt;br&gt;", "<br>"))
    vals.append(cosine)
    colors.append(HARM)
    fig = _cosine_bars(names, vals, colors, digits=2)
    fig.add_vline(
        x=null_cosine,
        line_dash="dash",
        line_color=INK,
        annotation_text=f"chance {null_cosine:.2f}",
        annotation_position="top",
    )
    base_layout(fig, height)
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
    base_layout(fig, height, legend={"orientation": "h", "y": -0.05, "x": 0, "font": {"size": 14}})
    fig.update_xaxes(visible=False, range=[-0.15, 1.45])
    top = max(0.45, hy * 1.1 + 0.12)  # fit the angle: no empty band above a small one
    fig.update_yaxes(visible=False, range=[-0.22, top], scaleanchor="x", scaleratio=1)
    return fig


def task_scores_figure(task_scores: np.ndarray, threshold: float | None, height: int = 320) -> go.Figure:
    """How the task scores (AUROC, task vs control) spread over features, with the task test's threshold."""
    s = np.asarray(task_scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    fig = go.Figure(
        go.Histogram(
            x=s,
            xbins={"start": 0.0, "end": 1.0, "size": 0.02},
            marker_color=TASK_LIGHT,
            marker_line={"color": "white", "width": 1},
            hovertemplate="task score %{x}: %{y} features<extra></extra>",
            name="features",
        )
    )
    fig.add_vline(x=0.5, line_dash="dot", line_color=NEUTRAL, annotation_text="0.5: no difference")
    if threshold is not None and math.isfinite(threshold):
        fig.add_vline(
            x=threshold,
            line_dash="dash",
            line_color=TASK,
            annotation_text=f"task test {threshold:g}",
            annotation_position="top right",
        )
    base_layout(fig, height)
    fig.update_xaxes(range=[0, 1], title_text="task score (AUROC, task vs control text)")
    fig.update_yaxes(title_text="features", type="log")
    fig.update_layout(font={"size": 15}, bargap=0.02, margin={"l": 10, "r": 10, "t": 36, "b": 10})
    return fig


def nulls_figure(
    isotropic: float, calibrated: float, typical: float | None = None, height: int = 280
) -> go.Figure:
    """The chance levels side by side: uniform random directions, directions shaped like this decoder,
    and (for scale) a typical feature's nearest neighbour."""
    names, vals, colors = [], [], []
    for name, val, color in (
        ("uniformly random directions<br>(isotropic null)", isotropic, "#cbd5e1"),
        ("random directions shaped<br>like this decoder (calibrated)", calibrated, NEUTRAL),
        ("a typical feature's<br>nearest neighbour", typical, TASK_LIGHT),
    ):
        if val is not None and math.isfinite(val):
            names.append(name)
            vals.append(float(val))
            colors.append(color)
    fig = _cosine_bars(names, vals, colors, digits=3)
    base_layout(fig, height)
    fig.update_xaxes(range=[0, max(0.5, max(vals, default=0.0) * 1.25)], title_text="cosine")
    fig.update_yaxes(tickfont={"size": 15})
    fig.update_layout(font={"size": 16}, margin={"l": 10, "r": 10, "t": 20, "b": 10})
    return fig


def category_counts_figure(counts: list[tuple[str, int]], height: int = 320) -> go.Figure:
    """Harmful features per harm category, most first (category names are escaped)."""
    fig = go.Figure(
        go.Bar(
            x=[n for _, n in counts],
            y=[esc(c) for c, _ in counts],
            orientation="h",
            marker_color=[category_color(c) for c, _ in counts],  # the map's colour for each category
            hovertemplate="%{y}: %{x} harmful features<extra></extra>",
        )
    )
    base_layout(fig, height, title="Harmful features by category")
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="harmful features")
    return fig


def _numbers(report: dict[str, Any]) -> str:
    """'difference +0.050, 95% CI +0.020 to +0.080, two-sided p = 0.002' (the permutation p) from closeness.json's
    own fields."""
    d, ci, p = report.get("difference"), report.get("ci"), report.get("p_two_sided")
    parts = [f"difference {d:+.3f}" if isinstance(d, (int, float)) else "no difference recorded"]
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        parts.append(f"95% CI {ci[0]:+.3f} to {ci[1]:+.3f}")
    if isinstance(p, (int, float)):
        parts.append(f"two-sided p = {fmt_p(p)}")
    return ", ".join(parts)


def closeness_sets_story_figure(report: dict[str, Any], ranked: bool = False) -> tuple[go.Figure, str] | None:
    """The closeness page's two-set histogram (figures/closeness.py) for the story, and its title with the
    difference, its interval and the permutation p; None when the report holds no histogram.

    `report` is closeness.json (the sets by test: task features, drawn blue, against control features, which
    pass no role test and are drawn slate) or, `ranked`, its exploratory `ranked` part (the N most task-leaning
    features, light blue: they lean to task text without passing the test; the N most control-leaning, slate).
    Style's colour rule: only a set of task features takes the task blue."""
    if ranked:
        n = report.get("n")
        names = (f"top {n} by task score (task-leaning)", f"bottom {n} (control-leaning)")
        colors = (TASK_LIGHT, NEITHER_COLOR)
        what = f"Exploratory: closeness to harmful features, top vs bottom {n}"  # the legend says by what
    else:
        names, colors = (INDUCING_NAME, NON_INDUCING_NAME), (TASK, NEITHER_COLOR)
        what = "Closeness to harmful features, task- vs control-specific sets"
    fig = closeness_sets_figure(report, height=380, names=names, colors=colors)
    if fig is None:
        return None
    return fig, f"{what} ({_numbers(report)})"  # one line: ~130 characters fit the export's width
