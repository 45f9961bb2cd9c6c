"""The overlaps table with its reviewers' consensus, the history of saves beside it, and their exports.

Pure pandas over what `explorer.reviews.ReviewStore` returns: one row per flagged pair with its status
(the agreed verdict, 'disputed' or 'unreviewed'), consensus and reviewers; CSV exports are safe to open
in a spreadsheet (cells starting with = + - @ are quoted). `verdicts_html` lays out one pair's verdicts.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd

from explorer import figures as F
from explorer.reviews import DISPUTED, UNREVIEWED

VERDICT_COLORS = {"confirmed": F.HARM, "benign": "#059669"}


def summarize(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Per pair: status (the agreed verdict, 'disputed' or —), consensus (single / agree / disagree),
    n_reviewers, reviewers ('ana: confirmed · ben: benign'), reviewed_at (the latest save)."""
    cols = [
        "task_feature",
        "harmful_feature",
        "status",
        "consensus",
        "n_reviewers",
        "reviewers",
        "reviewed_at",
    ]
    if verdicts.empty:
        return pd.DataFrame(
            {c: pd.Series(dtype="int64" if c in cols[:2] + ["n_reviewers"] else "string") for c in cols}
        )
    rows = []
    for _, g in verdicts.sort_values("reviewer", key=lambda s: s.str.lower()).groupby(
        ["task_feature", "harmful_feature"], sort=False
    ):
        kinds = set(g["verdict"])
        consensus = "single" if len(g) == 1 else "agree" if len(kinds) == 1 else "disagree"
        rows.append(
            {
                "task_feature": int(g["task_feature"].to_numpy()[0]),
                "harmful_feature": int(g["harmful_feature"].to_numpy()[0]),
                "status": g["verdict"].iat[0] if len(kinds) == 1 else DISPUTED,
                "consensus": consensus,
                "n_reviewers": len(g),
                "reviewers": " · ".join(
                    f"{r}: {v}" for r, v in zip(g["reviewer"], g["verdict"], strict=True)
                ),
                "reviewed_at": str(g["updated_at"].max()),
            }
        )
    return pd.DataFrame(rows, columns=cols)


def orient_like(rows: pd.DataFrame, overlaps: pd.DataFrame) -> pd.DataFrame:
    """`rows` (verdicts or history) with task/harmful swapped where only the reverse order is a flagged
    pair: pairs are undirected, so a verdict saved on (b, a) counts for the flagged (a, b)."""
    if rows.empty or overlaps.empty:
        return rows
    flagged = set(
        zip(overlaps["task_feature"].astype(int), overlaps["harmful_feature"].astype(int), strict=True)
    )
    t, h = rows["task_feature"].astype("int64"), rows["harmful_feature"].astype("int64")
    swap = [(b, a) in flagged and (a, b) not in flagged for a, b in zip(t, h, strict=True)]
    out = rows.copy()
    out["task_feature"], out["harmful_feature"] = (
        t.where(~pd.Series(swap, index=t.index), h),
        h.where(~pd.Series(swap, index=t.index), t),
    )
    return out


def merge_reviews(overlaps: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """Overlaps joined with the consensus of their verdicts (saved in either order); unreviewed pairs
    get status 'unreviewed'."""
    summary = summarize(orient_like(verdicts, overlaps)).astype(
        {"task_feature": "int64", "harmful_feature": "int64"}
    )
    out = overlaps.merge(summary, on=["task_feature", "harmful_feature"], how="left")
    out["status"] = out["status"].astype("string").fillna(UNREVIEWED)
    out["n_reviewers"] = out["n_reviewers"].fillna(0).astype("int64")
    for c in ("consensus", "reviewers", "reviewed_at"):
        out[c] = out[c].astype("string").fillna("")
    return out


def history_table(history: pd.DataFrame, overlaps: pd.DataFrame) -> pd.DataFrame:
    """Every saved verdict (oldest first) with the pair's geometry and labels beside it, for export."""
    keep = [
        c
        for c in ("risk", "cosine", "cosine_percentile", "harm_category", "task_label", "harmful_label")
        if c in overlaps
    ]
    pairs = overlaps[["task_feature", "harmful_feature", *keep]].drop_duplicates(
        ["task_feature", "harmful_feature"]
    )
    out = (
        orient_like(history, overlaps)
        .sort_values("id")
        .merge(pairs, on=["task_feature", "harmful_feature"], how="left")
    )
    return out.rename(columns={"id": "history_id"}).reset_index(drop=True)


def _spreadsheet_safe(table: pd.DataFrame) -> pd.DataFrame:
    safe = table.copy()
    for c in safe.columns:
        if safe[c].dtype == object or str(safe[c].dtype).startswith("string") or str(safe[c].dtype) == "str":
            safe[c] = safe[c].map(
                lambda v: "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@") else v
            )
    return safe


def export_csv(table: pd.DataFrame) -> bytes:
    """A table as UTF-8 CSV (spreadsheet-safe: cells starting with = + - @ are quoted)."""
    buf = io.StringIO()
    _spreadsheet_safe(table).to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.to_json(orient="records", force_ascii=False))  # NaN -> null


def export_json(pairs: pd.DataFrame, history: pd.DataFrame) -> bytes:
    """{"pairs": the reviewed table, "history": every saved verdict} as JSON (NaN -> null)."""
    doc = {"pairs": _records(pairs), "history": _records(history)}
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")


def verdicts_html(verdicts: pd.DataFrame) -> str:
    """One line per reviewer (their latest verdict), then the consensus; all text escaped."""
    lines = []
    for r in verdicts.sort_values("reviewer", key=lambda c: c.str.lower()).to_dict("records"):
        n = int(r["n_changes"])
        note = f" — <i>{F.esc(r['note'])}</i>" if r["note"] else ""
        color = VERDICT_COLORS.get(str(r["verdict"]), "#d97706")
        uf = F.badge("unflagged pair", F.NEUTRAL) if r.get("unflagged") else ""
        lines.append(
            f'<div style="font-size:15px;margin:2px 0">{F.badge(r["verdict"], color, True)}{uf}'
            f" <b>{F.esc(r['reviewer'])}</b> at {F.esc(r['updated_at'])} ({n} change{'s' if n != 1 else ''})"
            f"{note}</div>"
        )
    kinds = set(verdicts["verdict"])
    consensus = (
        "single reviewer"
        if len(verdicts) == 1
        else f"{len(verdicts)} reviewers agree"
        if len(kinds) == 1
        else f"{len(verdicts)} reviewers disagree"
    )
    return f'<div style="margin-bottom:6px">Consensus: <b>{F.esc(consensus)}</b></div>' + "".join(lines)
