"""The map's hover text as plotly sends it: what a template can rebuild is not sent per point.

Hover text is most of the map's bytes (bench/bench_map_bytes.py), and plotly's JSON writes each '<', '>', '/'
and non-ASCII character as a 6-byte escape; numpy arrays go as base64 typed arrays ('bdata').
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

Hover = tuple[np.ndarray, np.ndarray | None, str, np.ndarray]  # text, hovertext or None, template, ids


def hover_of_rows(sub: pd.DataFrame) -> Hover:
    """The hover fields of the features `sub` (hover_fields) and their ids (narrow_ids)."""
    ids = narrow_ids(sub["feature"].to_numpy())
    return (*hover_fields(sub["hover"].to_numpy(dtype=object), ids), ids)


def narrow_ids(ids: np.ndarray) -> np.ndarray:
    """Feature ids as the smallest unsigned typed array that holds them (plotly sends numpy arrays as base64
    typed arrays, 'bdata': 2 bytes an id below 65,536 instead of 8)."""
    return ids.astype(np.uint16 if len(ids) == 0 or int(ids.max()) < 2**16 else np.uint32)


HOVER_TEMPLATE = "#%{customdata} %{text}<br>%{hovertext}<extra></extra>"


def hover_fields(hover: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The base map's hover as plotly fields (text, hovertext or None, hovertemplate) that show exactly `hover`.

    Hover text (data/load.py, escaped: '#id label<br>scores<br>top tokens') is most of the map's bytes, and
    plotly's JSON writes each '<' and '>' as a 6-byte escape: so the id comes from customdata and one line
    break from the template (HOVER_TEMPLATE), which it holds once. Text not of that form is sent as it is."""
    heads = [f"#{int(i)} " for i in ids]
    text = np.empty(len(hover), dtype=object)
    lines = np.empty(len(hover), dtype=object)
    for k, (h, head) in enumerate(zip(hover, heads, strict=True)):
        body, sep, last = str(h).rpartition("<br>")
        if not (sep and body.startswith(head)):
            return hover, None, "%{text}<extra></extra>"
        text[k], lines[k] = body[len(head) :], last
    return text, lines, HOVER_TEMPLATE


def hover_of(hover: Hover | None, rows: Any) -> dict[str, Any]:
    """The hover fields and ids of the points `rows`; none (hoverinfo 'skip') without `hover`."""
    if hover is None:
        return {"hoverinfo": "skip"}
    text, lines, template, ids = hover
    out = {"text": text[rows], "customdata": ids[rows], "hovertemplate": template}
    return out if lines is None else {**out, "hovertext": lines[rows]}
