"""Figures and HTML of a feature's evidence by group: the histogram split by group, logit-lens chips
with their logits, and a whole document with an example's context marked. Everything from the cache
is escaped (`esc`, `show_token`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from explorer.data.evidence import DocumentView, GroupHistogram
from explorer.figures.style import GROUP_COLORS, HARM, INK, NEUTRAL, badge, base_layout, esc, rgba, show_token


def group_histogram_figure(h: GroupHistogram, height: int = 260) -> go.Figure:
    """One step line per group over the same bins (log count axis); the legend gives each group's
    share of the feature's firing tokens and its firing rate on the group's own tokens."""
    centres = (h.edges[:-1] + h.edges[1:]) / 2
    fig = go.Figure()
    for g, counts in h.counts.items():
        if not counts.any():
            continue
        y = np.where(counts > 0, counts, np.nan)  # log axis: an empty bin is a gap, not a cliff to 0
        fig.add_trace(
            go.Scatter(
                x=centres,
                y=y,
                mode="lines+markers",
                line_shape="hvh",
                marker_size=4,
                line_color=GROUP_COLORS.get(g, NEUTRAL),
                name=f"{esc(g)} · {h.share[g] * 100:.1f}% of firings",
                hovertemplate=f"{esc(g)}: activation %{{x:.2f}}, %{{y:,}} tokens<extra></extra>",
            )
        )
    base_layout(fig, height, title="Activation histogram by text group (tokens where it fires)")
    fig.update_yaxes(type="log", dtick=1, title_text="tokens")
    fig.update_xaxes(title_text="activation")
    fig.update_layout(showlegend=True, legend={"orientation": "h", "y": -0.35, "font": {"size": 11}})
    return fig


def group_share_rows(h: GroupHistogram) -> list[dict[str, Any]]:
    """Table rows: group, its share of the feature's firing tokens, its firing rate on its own tokens."""
    return [
        {
            "group": g,
            "share of firings": round(h.share[g] * 100, 2),
            "fires on (% of its tokens)": round(h.rate.get(g, float("nan")) * 100, 3),
            "firing tokens": int(h.counts[g].sum()),
        }
        for g in h.counts
    ]


def logit_chips_html(tokens: Sequence[Any], values: Sequence[float] | None, color: str, title: str) -> str:
    """Logit-lens tokens as chips, each with its logit when the cache holds the values."""
    have = values is not None and len(values) == len(tokens)
    chips = []
    for i, t in enumerate(tokens):
        value = (
            f' <span style="color:#6b7280;font-size:11px">{float(values[i]):+.2f}</span>'  # type: ignore[index]
            if have
            else ""
        )
        chips.append(
            f'<span style="display:inline-block;margin:2px 4px 2px 0;padding:1px 8px;border-radius:6px;'
            f"background:{rgba(color, 0.1)};border:1px solid {rgba(color, 0.4)};font-family:ui-monospace,"
            f'Menlo,monospace;font-size:13px;white-space:pre">{show_token(t)}{value}</span>'
        )
    body = "".join(chips) or '<span style="color:#6b7280">—</span>'
    return f'<div style="margin:2px 0 8px"><div style="font-size:12px;color:#6b7280">{esc(title)}</div>{body}</div>'


def document_html(doc: DocumentView, span: tuple[int, int] | None, color: str = HARM) -> str:
    """A whole document, escaped, with the example's context (`span`, characters) marked."""
    meta = [
        f'<b style="color:{INK}">Document {doc.doc_id}</b>',
        badge(doc.group, GROUP_COLORS.get(doc.group, NEUTRAL), filled=True),
    ]
    if doc.category:
        meta.append(badge(doc.category, HARM))
    meta.append(
        f'<span style="color:#6b7280;font-size:12px">{doc.n_tokens:,} tokens read'
        + (f" · {esc(doc.source)}" if doc.source else "")
        + "</span>"
    )
    if doc.text is None:
        body = (
            f"{esc(doc.preview)}"
            '<div style="color:#6b7280;font-style:italic;margin-top:6px">Only the first 300 characters: this '
            "cache was harvested before it kept whole documents (rebuild it to read them).</div>"
        )
    elif span is None:
        body = esc(doc.text)
    else:
        a, b = span
        body = (
            esc(doc.text[:a])
            + f'<mark data-example-window="1" style="background:{rgba(color, 0.18)};outline:1px solid '
            f'{rgba(color, 0.6)};border-radius:3px">{esc(doc.text[a:b])}</mark>' + esc(doc.text[b:])
        )
    return (
        f'<div data-document="{doc.doc_id}" style="border:1px solid #e5e7eb;border-radius:8px;padding:8px 12px;'
        f'margin:6px 0 12px;max-height:420px;overflow:auto">'
        f'<div style="margin-bottom:6px">{" ".join(meta)}</div>'
        f'<div style="white-space:pre-wrap;word-break:break-word;font-size:14px;line-height:1.55">{body}</div>'
        "</div>"
    )
