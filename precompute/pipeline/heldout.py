"""The harm score checked on held-out, form-matched documents (docs/science.md "Held-out harm").

The harm fit compares harmful benchmark prompts with benign instructions, which differ in more than
harm: phrasing, length, source. A feature that fires on "how do I ... ?" phrasing passes that fit.
Corpus sources marked `validation = true` are left out of the fit and give a second contrast,
chosen so that both sides share their form: XSTest's unsafe prompts against its safe ones (same
words, "kill a Python process" vs "kill a person") and JailbreakBench's harmful behaviours against
their topic-matched benign twins. A feature is harmful only if it also separates these.

The held-out contrast tests the claim the fit made: a feature whose fit set was one harm category is
checked on the held-out documents of that (unified) category, when there are `min_docs` of them,
else on all held-out harmful documents; the negatives are always all held-out benign documents.
One pre-chosen set per feature, so its Hanley-McNeil bound needs no multiplicity correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from precompute.pipeline.auroc import aurocs_prepared

# How the held-out contrast enters `is_harmful` (RunConfig.harm_heldout).
REQUIRE, REPORT = "require", "report"
MODES = (REQUIRE, REPORT)
ALL = "all"  # the held-out set of every held-out harmful document


@dataclass(frozen=True)
class HeldoutCriterion:
    """What a feature must do on the held-out documents; see RunConfig's harm_heldout* options."""

    mode: str = REQUIRE
    threshold: float = 0.6  # held-out AUROC to reach (its lower bound must also exceed 0.5)
    min_docs: int = 10  # held-out documents a set needs (harmful; benign for the whole contrast)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"harm_heldout must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass
class HeldoutResult:
    auroc: np.ndarray  # [n_features] float64, NaN where the contrast was skipped
    lo: np.ndarray  # its lower 95% bound (Hanley-McNeil)
    set_name: np.ndarray  # [n_features] object: ALL or the unified category checked; None when skipped
    passes: np.ndarray  # [n_features] bool: meets the criterion (all True when it was skipped)
    summary: dict[str, Any] = field(default_factory=dict)  # the scores sidecar's `harm_heldout_check`


def _skipped(n_features: int, summary: dict[str, Any], reason: str) -> HeldoutResult:
    summary |= {"status": "skipped", "reason": reason}
    nan = np.full(n_features, np.nan)
    return HeldoutResult(
        nan, nan.copy(), np.full(n_features, None, dtype=object), np.ones(n_features, bool), summary
    )


def heldout_contrast(
    triples: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_features: int,
    harmful: np.ndarray,
    harmful_category: Sequence[str | None],
    benign: np.ndarray,
    fit_set: np.ndarray,
    criterion: HeldoutCriterion,
    min_fires: int,
) -> HeldoutResult:
    """AUROC of held-out harmful vs held-out benign documents for every feature.

    `triples` are prepared (`auroc.prepare_triples`) per-document values; `harmful` / `benign` the
    held-out document ids, `harmful_category[i]` the unified category of `harmful[i]`; `fit_set[f]`
    the harm category feature f's fit chose (None: all harmful documents). A feature passes with
    AUROC >= `criterion.threshold`, lower bound > 0.5 and firing in >= `min_fires` documents of its
    held-out harmful set. Without `criterion.min_docs` held-out harmful and benign documents the
    contrast is skipped: NaN columns, every feature passes, and the summary says why."""
    harmful = np.asarray(harmful, np.int64)
    benign = np.asarray(benign, np.int64)
    by_cat: dict[str, list[int]] = {}
    for d, c in zip(harmful.tolist(), list(harmful_category), strict=True):
        if c is not None:
            by_cat.setdefault(str(c), []).append(d)
    summary: dict[str, Any] = {
        "mode": criterion.mode,
        "threshold": criterion.threshold,
        "min_docs": criterion.min_docs,
        "documents": {"harmful": int(harmful.size), "benign": int(benign.size)},
        "documents_by_category": {c: len(v) for c, v in sorted(by_cat.items())},
    }
    if harmful.size == 0 and benign.size == 0:
        return _skipped(n_features, summary, "no corpus source is marked validation = true")
    if harmful.size < criterion.min_docs or benign.size < criterion.min_docs:
        return _skipped(
            n_features,
            summary,
            f"the held-out set has {harmful.size} harmful and {benign.size} benign scored documents, fewer "
            f"than harm_heldout_min_docs = {criterion.min_docs}",
        )
    sets = {ALL: harmful} | {
        c: np.asarray(v, np.int64) for c, v in sorted(by_cat.items()) if len(v) >= criterion.min_docs
    }
    summary["sets"] = {name: int(docs.size) for name, docs in sets.items()}
    chosen = np.array(
        [s if s in sets else ALL for s in np.asarray(fit_set, dtype=object).tolist()], dtype=object
    )
    auroc, lo = np.full(n_features, np.nan), np.full(n_features, np.nan)
    fires = np.zeros(n_features, np.int64)
    for name in sorted(set(chosen.tolist())):
        use = chosen == name
        r = aurocs_prepared(*triples, n_features, sets[name], benign)
        auroc[use], lo[use], fires[use] = r["auroc"][use], r["lo"][use], r["pos_fires"][use]
    passes = (auroc >= criterion.threshold) & (lo > 0.5) & (fires >= min_fires)
    summary["status"] = "applied" if criterion.mode == REQUIRE else "reported"
    summary["reason"] = None
    return HeldoutResult(auroc, lo, chosen, passes, summary)
