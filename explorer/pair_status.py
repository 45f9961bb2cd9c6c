"""Why a (task, harmful) pair opened from a link is not flagged, and each feature's true colour.

Pure functions over a CacheData: the overlaps page says "not flagged" with the reasons computed here
(the same tests the overlaps step applies: task feature among the `n_task` best, harmful neighbour in
the task feature's list, cosine above the flagging null), and paints each side by what the feature
is, not by the side of the URL it came in on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from explorer import figures as F
from explorer.data import CacheData

BOTH = "both"  # accent of a feature that is both task and harmful (feature_header_html draws two stripes)


@dataclass(frozen=True)
class PairStatus:
    flagged: bool
    reversed_flagged: bool  # (harmful, task) is the flagged order of this pair
    cosine: float  # from either feature's neighbour list; NaN when in neither
    reasons: tuple[str, ...]  # why the overlaps step did not flag it (empty when flagged)


def is_flagged(cache: CacheData, t: int, h: int) -> bool:
    o = cache.overlaps
    return bool(((o["task_feature"] == t) & (o["harmful_feature"] == h)).any())


def feature_kind(row: dict[str, Any]) -> str:
    """'both', 'harmful', 'task' or 'neither' from the feature's is_task / is_harmful flags (the one rule,
    figures.style.role_of)."""
    return F.role_of(row)


def feature_accent(row: dict[str, Any]) -> str:
    """The feature's true colour by the one rule (figures/style.py): harmful red, task blue, both BOTH (two
    stripes), neither the slate every page uses for it."""
    return {BOTH: BOTH, "harmful": F.HARM, "task": F.TASK}.get(feature_kind(row), F.NEITHER_COLOR)


def pair_cosine(cache: CacheData, t: int, h: int) -> tuple[float, bool]:
    """The decoder cosine of t and h from t's neighbour list, else h's; (NaN, False) when in neither.
    The bool says whether h is in t's list (what the overlaps step reads)."""
    for a, b, own in ((t, h, True), (h, t, False)):
        nb = cache.neighbours_of(a)
        m = nb[nb["feature"] == b]
        if len(m):
            return float(m["cosine"].to_numpy()[0]), own
    return math.nan, False


def _task_rank(cache: CacheData, t: int) -> int | None:
    """1-based rank of t by task score among the task features (ties by id), as the overlaps step orders."""
    f = cache.features
    task = f[f["is_task"].astype(bool) & np.isfinite(f["task_score"].astype(float))]
    order = task.assign(_id=task.index).sort_values(["task_score", "_id"], ascending=[False, True])
    ids = order.index.to_list()
    return ids.index(t) + 1 if t in ids else None


def pair_status(cache: CacheData, t: int, h: int, n_task: int | None) -> PairStatus:
    """Flagged or not, and if not, every reason the cache gives (`n_task`: the overlaps step's scope)."""
    cos, in_task_list = pair_cosine(cache, t, h)
    if is_flagged(cache, t, h):
        return PairStatus(True, False, cos, ())
    tr, hr = cache.row(t), cache.row(h)
    reasons: list[str] = []
    if t == h:
        reasons.append(f"#{t} is paired with itself")
    if not tr.get("is_task"):
        reasons.append(f"#{t} is not a task feature (task score {float(tr['task_score']):.2f})")
    elif n_task is not None and (rank := _task_rank(cache, t)) is not None and rank > n_task:
        reasons.append(
            f"#{t} is task feature no. {rank} by task score; the overlaps step looks at the best {n_task}"
        )
    if not hr.get("is_harmful"):
        reasons.append(f"#{h} is not a harmful feature (harm score {float(hr['harm_score']):.2f})")
    k = len(cache.neighbors.indices[t])
    if not in_task_list:
        reasons.append(f"#{h} is not among the {k} nearest decoder neighbours of #{t}")
    if math.isfinite(cos) and cos <= cache.null_cosine:
        reasons.append(
            f"their decoder cosine {cos:.3f} is not above the {cache.null_label} {cache.null_cosine:.3g}"
        )
    if not reasons:
        reasons.append(
            "the overlaps step did not flag it (the cache may have been built with other settings)"
        )
    return PairStatus(False, is_flagged(cache, h, t), cos, tuple(reasons))


def num(value: Any, fmt: str) -> str:
    """A metric's text: '—' for a missing value, never 'nan'."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if not math.isfinite(v) else format(v, fmt)
