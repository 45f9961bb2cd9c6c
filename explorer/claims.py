"""The sentences the explorer states about a whole cache, each written from `Findings` (plain text).

Why one module: the story, the map and the overlaps page say the same things ("how many task
features", "no flagged pair", "what chance is here"), and each sentence must be computed from the
cache and fit what it found: a count of zero gets its own sentence, never the one written for a
positive result. Sentences are plain text (category names and closeness.json's reason come from the
cache): the caller escapes them for HTML (`figures.esc`) or markdown (`state.md_escape`).
The per-feature and per-pair claims below each check a flag against the number it rests on; the
story's claims and their conditions are listed in docs/story.md.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from explorer.data.findings import Findings
from explorer.figures.closeness import closeness_sentence, ranked_sentence, sensitivity_sentence


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "—"


def task_test(fd: Findings) -> str:
    """'task score ≥ 0.7, its lower 95% bound above 0.5, firing in at least 3 task windows'."""
    parts = [f"task score ≥ {fd.task_threshold:g}" if fd.task_threshold is not None else "a high task score"]
    parts.append("its lower 95% bound above 0.5")
    if fd.min_docs is not None:
        parts.append(f"firing in at least {fd.min_docs} task windows")
    return ", ".join(parts)


def harm_test(fd: Findings) -> str:
    parts = [f"harm score ≥ {fd.harm_threshold:g}" if fd.harm_threshold is not None else "a high harm score"]
    parts.append("its lower 95% bound above 0.5")
    if fd.min_docs is not None:
        parts.append(f"firing in at least {fd.min_docs} windows of the harmful documents")
    return ", ".join(parts)


def scored_sentence(fd: Findings) -> str:
    """How many features the task-vs-control contrast scored, on how many documents."""
    if fd.n_task_scored == 0:
        return "No feature has a task score: the cache has no task or control documents to compare."
    docs = (
        f", using {fd.task_documents[0]:,} task and {fd.task_documents[1]:,} control documents"
        if fd.task_documents
        else ""
    )
    return (
        f"{fd.n_task_scored:,} of {fd.n_features:,} features were scored on task versus control text{docs} "
        "(the same format with different content), one window of each document."
    )


def task_sentence(fd: Findings) -> str:
    """How many features pass the task test; with none, the highest task score there is."""
    if fd.n_task_scored == 0:
        return "So no feature can be a task feature."
    if fd.n_task:
        one = fd.n_task == 1
        return f"{fd.n_task:,} feature{'' if one else 's'} pass{'es' if one else ''} the task test ({task_test(fd)})."
    out = f"None passes the task test ({task_test(fd)}), so this cache has no task feature."
    if fd.best_task is not None:
        out += f" The highest task score is {fd.best_task[1]:.2f} (feature #{fd.best_task[0]})."
    return out


def lean_sentence(fd: Findings) -> str | None:
    """Features leaning towards task text against shuffled task/control labels; None when not recorded."""
    lean = fd.lean.get("lo_above_half")
    if lean is None:
        return None
    verdict = "more than" if lean.observed > lean.permuted_p95 else "within what"
    return (
        f"{lean.observed:,} features lean towards task text (the lower 95% bound of their task score is above "
        f"0.5); with the task and control labels shuffled {lean.n_permutations:,} times, {lean.permuted_mean:,.1f} "
        f"do on average and {lean.permuted_p95:,.0f} at the 95th percentile (p = {lean.p:.2g}): "
        f"{verdict} shuffled labels give."
    )


def harmful_sentence(fd: Findings) -> str:
    if not fd.n_harmful:
        return f"No feature passes the harm test ({harm_test(fd)}), so this cache has no harmful feature."
    top = ", ".join(f"{cat} ({n:,})" for cat, n in fd.harm_categories[:3])
    return (
        f"{fd.n_harmful:,} of {fd.n_features:,} features pass the harm test (harmful versus benign requests: "
        f"{harm_test(fd)})" + (f"; the most common categories: {top}." if top else ".")
    )


def null_sentence(fd: Findings) -> str:
    """What chance is on this decoder: the calibrated null against the isotropic one, and what each flags."""
    iso, cov, null = fd.null_isotropic, fd.null_covariance, fd.null_cosine
    rate = (
        f"a false-positive rate of {100 * fd.fpr:.3g}%"
        if math.isfinite(fd.fpr)
        else "a small false-positive rate"
    )
    shaped_higher = math.isfinite(iso) and iso > 0 and math.isfinite(cov) and cov > iso
    if fd.null_kind == "covariance" and not shaped_higher:  # the file's nulls contradict its choice of null
        return (
            f"The calibrated null, random directions with this decoder's own mean and covariance, reaches a cosine "
            f"of {cov:.3f} by chance (at {rate}), no higher than uniformly random directions ({iso:.3f}, the "
            "isotropic null): this cache does not show the decoder's directions sitting closer to each other than "
            f"uniform ones. {_pct(fd.nn_above_null)} of features have a nearest neighbour above the calibrated "
            "level, which is the level used here."
        )
    if fd.null_kind == "covariance":
        return (
            f"Random directions with this decoder's own mean and covariance reach a cosine of {cov:.3f} by "
            f"chance (the calibrated null, at {rate}); uniformly random directions reach "
            f"only {iso:.3f} (the isotropic null). The decoder is not isotropic: its directions sit closer to "
            f"each other than uniform ones, and the calibrated level is {cov / iso:.2f}× the isotropic one. "
            f"{_pct(fd.nn_above_isotropic)} of features have a nearest neighbour above the isotropic level, "
            f"{_pct(fd.nn_above_null)} above the calibrated one, which is the level used here."
        )
    if math.isfinite(cov):
        shaped = f"; directions with the decoder's own mean and covariance reach {cov:.3f}, no higher"
    else:
        shaped = ""
    return (
        f"Uniformly random directions reach a cosine of {null:.3f} by chance (the isotropic null, at {rate}){shaped}, so that is the level used here. {_pct(fd.nn_above_null)} of "
        f"features have a nearest neighbour above it."
    )


def flagged_sentence(fd: Findings, n_at_or_below_null: int = 0) -> str:
    """How many (task, harmful) pairs overlaps.parquet flags, or why it flags none. `n_at_or_below_null`: how
    many of its rows are not above the chance level (a cache whose rows contradict the null): then the count
    above chance is said instead of calling every row closer than chance."""
    if fd.n_flagged and n_at_or_below_null:
        above = fd.n_flagged - n_at_or_below_null
        return (
            f"overlaps.parquet lists {fd.n_flagged:,} (task, harmful) pair{'s' if fd.n_flagged != 1 else ''}, but "
            f"only {above:,} of them {'is' if above == 1 else 'are'} above the chance level {fd.null_cosine:.3f}: "
            f"the story calls only those closer than chance."
        )
    if fd.n_flagged:
        return (
            f"{fd.n_flagged:,} (task, harmful) pair{'s are' if fd.n_flagged != 1 else ' is'} flagged: a task "
            f"feature and a harmful feature whose decoder directions are above the chance level "
            f"{fd.null_cosine:.3f} ({fd.n_flagged_task:,} task feature{'s' if fd.n_flagged_task != 1 else ''})."
        )
    if not fd.n_task:
        return "No (task, harmful) pair is flagged: without a task feature there is none to flag."
    scope = fd.n_task if fd.flag_scope is None else min(fd.n_task, fd.flag_scope)
    which = (
        f"the {scope:,} task features with the highest task scores"
        if scope < fd.n_task
        else f"the {fd.n_task:,} task feature{'s' if fd.n_task != 1 else ''}"
    )
    return (
        f"No (task, harmful) pair is flagged: none of {which} has a harmful neighbour above the chance "
        f"level {fd.null_cosine:.3f}."
    )


def closeness_text(fd: Findings) -> str:
    """The set-level closeness test's result as far as its verdict goes, or why there is none."""
    if fd.closeness is None:
        if fd.closeness_problem:
            return f"The set-level closeness test cannot be read: {fd.closeness_problem}"
        return "The set-level closeness test has not run on this cache (`featuregeom closeness`)."
    backed = verdict_problem(fd.closeness)
    if backed is not None:
        return backed
    said = closeness_sentence(fd.closeness)
    if said is not None:
        return said
    reason = str(fd.closeness.get("reason") or "no reason recorded")
    sets = fd.closeness.get("set_definitions") or {}
    named = (
        f" (inducing: {sets['inducing']}; non-inducing: {sets['non_inducing']})"
        if isinstance(sets, dict) and sets.get("inducing") and sets.get("non_inducing")
        else ""
    )
    return (
        "Whether task-specific features sit closer to harmful features than control-specific ones is not "
        f"testable on this cache: {reason}{named}."
    )


PAPER_COMPARISON = (
    "The paper's comparison is of whole sets: whether features of misalignment-inducing (task) data sit closer to "
    "harmful features than features of non-inducing (control) data (Minegishi et al. 2026)."
)


def ranked_text(fd: Findings) -> str | None:
    """closeness.json's exploratory ranked comparison (the most task-leaning features against the most
    control-leaning ones), labelled exploratory, as far as its verdict and its own numbers go; None without one."""
    report = fd.closeness or {}
    ranked = report.get("ranked")
    if not isinstance(ranked, dict) or ranked.get("verdict") in (None, "not_testable"):
        return None
    ranked = {**ranked, "alpha": ranked.get("alpha") or report.get("alpha", 0.05)}
    problem = verdict_problem(ranked)
    if problem is not None:
        return f"Exploratory, sets by rank rather than by significance: {problem}"
    sentence = ranked_sentence(ranked)
    rows = report.get("ranked_sensitivity")
    other_n = sensitivity_sentence(rows, str(ranked["verdict"])) if isinstance(rows, list) and rows else None
    return f"{sentence} {other_n}" if sentence and other_n else sentence


def _nums(v: Any, n: int) -> list[float] | None:
    """`v` as n finite numbers, or None."""
    if not isinstance(v, (list, tuple)) or len(v) != n:
        return None
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    return [float(x) for x in v] if ok else None


def verdict_problem(report: dict[str, Any]) -> str | None:
    """Why closeness.json's verdict is not repeated: a directional verdict its own interval and permutation p
    do not back (the rule precompute applies: p < alpha and the 95% CI off 0 on that side); None when backed."""
    verdict = report.get("verdict")
    if verdict not in ("inducing_closer", "non_inducing_closer"):
        return None
    ci = _nums(report.get("ci"), 2)
    alpha = report.get("alpha", 0.05)
    key = "p_permutation" if verdict == "inducing_closer" else "p_non_inducing_closer"
    p = _nums([report.get(key), alpha], 2)
    side = (ci[0] > 0) if verdict == "inducing_closer" and ci else (ci is not None and ci[1] < 0)
    if ci is not None and p is not None and p[0] < p[1] and side:
        return None
    closer = "task-specific" if verdict == "inducing_closer" else "control-specific"
    shown = f"95% CI {ci[0]:+.3f} to {ci[1]:+.3f}" if ci else "no interval"
    return (
        f"closeness.json says {closer} features sit closer to harmful features, but its own numbers do not "
        f"back that ({shown}, p = {p[0]:.2g} against alpha {p[1]:g})"
        if p
        else f"closeness.json says {closer} features sit closer to harmful features, but its own numbers do "
        f"not back that ({shown}, no permutation p)"
    ) + ", so the story does not repeat the claim: this cache does not show a difference."


def withheld_sentence(fd: Findings) -> str:
    """Why a cache without a flagged pair gets no mechanism story."""
    have = (
        "no task feature"
        if not fd.n_task
        else f"{fd.n_task:,} task feature{'s' if fd.n_task != 1 else ''} but no flagged pair"
    )
    return (
        "The mechanism this explorer was built to show, fine-tuning on task data moving the model along task "
        "features whose decoder directions lie close to harmful ones, needs a task feature with a harmful "
        f"neighbour above chance. This cache has {have}, so the story does not illustrate the mechanism with "
        "a feature that did not pass the test. A negative result is a result."
    )


# --- one feature, one pair: what the story may say about the features it presents -----------------------
# The cache's flags (is_task, is_harmful, overlaps.parquet) are each checked against the numbers they rest on,
# so that a cache whose flags and numbers disagree gets the honest sentence, never the flag's claim.

CHANCE = 0.5  # a score of 0.5: the feature fires alike on the two kinds of text


def _bound(row: dict[str, Any], col: str) -> float:
    """The column's value as a float (numpy scalars included); NaN when missing or not a number."""
    v = row.get(col)
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return float("nan")
    return float(v)


def fires_on_task(row: dict[str, Any]) -> bool:
    """'Fires more on the narrow (task) data': the feature passes the task test and its task score's lower
    95% bound excludes chance (0.5)."""
    return bool(row.get("is_task")) and _bound(row, "task_score_lo") > CHANCE


def fires_on_harm(row: dict[str, Any]) -> bool:
    """'Fires more on harmful requests': the feature passes the harm test and its harm score's lower 95%
    bound excludes chance (0.5)."""
    return bool(row.get("is_harmful")) and _bound(row, "harm_score_lo") > CHANCE


def closer_than_chance(cosine: float, null: float) -> bool:
    """'Closer than chance': the pair's cosine is above the calibrated null (both finite)."""
    return math.isfinite(cosine) and math.isfinite(null) and cosine > null


def _lo(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else "not recorded"


def task_claim(row: dict[str, Any], feature: int) -> str:
    """Whether feature `feature` fires more on the task text than on its control text, and why (plain text)."""
    lo = _bound(row, "task_score_lo")
    if fires_on_task(row):
        return (
            f"It fires more on the task text, the narrow data, than on its control text: the lower 95% bound "
            f"of its task score, {lo:.2f}, is above 0.5 (chance), and it passes the task test."
        )
    if row.get("is_task"):
        return (
            f"The cache marks feature #{feature} a task feature, but the lower 95% bound of its task score "
            f"({_lo(lo)}) does not exclude 0.5 (chance), so this cache does not show that it fires more on the "
            "task text than on its control text, and the story does not call it a task feature."
        )
    if lo > CHANCE:
        return (
            f"The lower 95% bound of its task score ({lo:.2f}) is above 0.5, but it does not pass the task "
            "test, so the story does not call it a task feature."
        )
    return (
        f"It does not pass the task test: the lower 95% bound of its task score ({_lo(lo)}) does not exclude "
        "0.5 (chance), so this cache does not show that it fires more on the task text than on its control text."
    )


def harm_claim(row: dict[str, Any]) -> str:
    """'fires more on harmful requests than on benign ones (category; scores)', or why the story does not
    say so (plain text, to follow 'Feature #N — label —')."""
    score, lo = _bound(row, "harm_score"), _bound(row, "harm_score_lo")
    cat = str(row.get("harm_category") or "") or "no single category"
    if fires_on_harm(row):
        return (
            f"fires more on harmful requests than on benign ones ({cat}; harm score {score:.2f}, its lower 95% "
            f"bound {lo:.2f} above 0.5)"
        )
    flag = "the cache marks it harmful, but" if row.get("is_harmful") else "it does not pass the harm test:"
    return (
        f"has harm score {_lo(score)}; {flag} the lower 95% bound ({_lo(lo)}) does not exclude 0.5 (chance)"
        if not lo > CHANCE
        else f"has harm score {_lo(score)} (lower 95% bound {lo:.2f}) but does not pass the harm test"
    ) + ", so the story does not call it harmful"


def closer_claim(cosine: float, null: float, null_label: str, flagged: int) -> str:
    """The pair's cosine against the calibrated null, and its place among the flagged pairs (plain text)."""
    pairs = f"{flagged:,} (task, harmful) pair{'s' if flagged != 1 else ''}"
    if closer_than_chance(cosine, null):
        return (
            f"Its cosine {cosine:.2f} is above the chance level {null:.3g} (the {null_label}): the pair is closer "
            f"than chance, one of the {pairs} this cache flags."
        )
    return (
        f"Its cosine {cosine:.2f} is not above the chance level {null:.3g} (the {null_label}), so this cache "
        f"does not show the pair closer than chance, although overlaps.parquet lists it among its {pairs}."
    )
