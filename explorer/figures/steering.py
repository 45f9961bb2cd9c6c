"""What the overlaps page's "Steering check" section needs of a `featuregeom steer` result: read it and
fit it (`precompute.lab.steering_results`, torch-free) and draw it (`steering_figure`: observed vs
first-order predicted Δ activation per α)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from precompute.lab.steering_results import fit_slope, load_steering, summarize

__all__ = ["load_steering", "steering_figure", "summarize"]

_ALPHA_COLORS = ["#93c5fd", "#60a5fa", "#3b82f6", "#1d4ed8", "#1e3a8a", "#172554"]
_TASK, _HARM, _INK = "#1d4ed8", "#c81e1e", "#111827"


def steering_figure(
    df: pd.DataFrame,
    task_feature: int,
    harmful_feature: int | None = None,
    x: str = "predicted_gated",
    show_task: bool = True,
) -> go.Figure:
    """Observed vs first-order predicted Δa per α, the y = x line, the task feature and the selected
    harmful feature highlighted. `x` is `predicted_gated` (first-order Taylor of the mean activation,
    default) or `predicted` (α·s·I_tj, the pre-activation shift). The steered feature itself moves
    by far the most at large α; `show_task=False` leaves it out so the other features fill the axes.
    Legend slopes/R² are fits over the plotted points."""
    if x not in ("predicted_gated", "predicted"):
        raise ValueError("x must be 'predicted_gated' or 'predicted'")
    if not show_task:
        df = df[df["feature"] != int(task_feature)]
    fig = go.Figure()
    meta = df.attrs.get("meta", {}) if hasattr(df, "attrs") else {}
    unit = {"norm": "·mean‖h‖", "rms": "·rms", "abs": ""}.get(meta.get("alpha_unit", "abs"), "")
    alphas = sorted(df["alpha"].unique()) if len(df) else []
    lo, hi = 0.0, 0.0
    for i, alpha in enumerate(alphas):
        part = df[df["alpha"] == alpha]
        y_col = "observed"
        slope, r2, _ = fit_slope(part[y_col], part[x])
        lo = min(lo, float(part[x].min()), float(part[y_col].min()))
        hi = max(hi, float(part[x].max()), float(part[y_col].max()))
        fig.add_trace(
            go.Scattergl(
                x=part[x],
                y=part[y_col],
                mode="markers",
                name=f"α={alpha:g}{unit} (slope {slope:.2f}, R² {r2:.2f})",
                marker={"size": 4, "color": _ALPHA_COLORS[i % len(_ALPHA_COLORS)], "opacity": 0.6},
                customdata=np.stack([part["feature"], part["active_frac"], part["predicted"]], axis=-1),
                hovertemplate="feature %{customdata[0]}<br>observed Δa %{y:.4g}<br>predicted %{x:.4g}"
                "<br>α·s·I %{customdata[2]:.4g}<br>active on %{customdata[1]:.1%} of tokens<extra></extra>",
            )
        )
    for feature, color, symbol, label in (
        (task_feature if show_task else None, _TASK, "diamond", "task"),
        (harmful_feature, _HARM, "star", "harmful"),
    ):
        if feature is None:
            continue
        sel = df[df["feature"] == int(feature)].sort_values("alpha")
        if sel.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=sel[x],
                y=sel["observed"],
                mode="markers+lines+text",
                name=f"{label} feature {int(feature)}",
                text=[f"α={a:g}" for a in sel["alpha"]],
                textposition="top center",
                marker={
                    "size": 13 if label == "harmful" else 11,
                    "color": color,
                    "symbol": symbol,
                    "line": {"width": 1, "color": "white"},
                },
                line={"color": color, "width": 1, "dash": "dot"},
            )
        )
    pad = 0.05 * (hi - lo or 1.0)
    fig.add_trace(
        go.Scatter(
            x=[lo - pad, hi + pad],
            y=[lo - pad, hi + pad],
            mode="lines",
            name="y = x",
            line={"color": _INK, "width": 1, "dash": "dash"},
            hoverinfo="skip",
        )
    )
    x_title = (
        "first-order predicted Δa (active features only)"
        if x == "predicted_gated"
        else "α·s·(W_enc[:,j]·d̂_t)"
    )
    fig.update_layout(
        title=f"Steering along feature {int(task_feature)}: observed vs predicted Δ activation",
        xaxis_title=x_title,
        yaxis_title="observed mean Δa_j",
        template="plotly_white",
        legend={"orientation": "v"},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig
