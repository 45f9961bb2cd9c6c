"""The harm fit checked on held-out, form-matched documents (precompute.pipeline.heldout through
contrasts.contrast_scores): a style feature that separates the fit sets but not the held-out sets is
not harmful, a genuine one is; held-out AUROCs equal a brute-force Mann-Whitney count; held-out
documents never enter the fit; skipped and report-only checks say so."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from precompute.errors import CorpusError
from precompute.pipeline.contrasts import contrast_scores, contrast_scores_with_summary
from precompute.pipeline.heldout import ALL, HeldoutCriterion

# Documents (id = position): fit harmful (two violence labels, cyber, a pooled mixed-dataset label),
# fit benign, then the held-out harmful (violence and a few cyber) and held-out benign documents.
LAYOUT = (
    [("harmful", "violence_weapons", "Violence", False)] * 6
    + [("harmful", "violence_weapons", "chemical_biological", False)] * 6
    + [("harmful", "cybercrime", "cybercrime_intrusion", False)] * 10
    + [("harmful", "unspecified", "advbench", False)] * 8
    + [("benign", None, "self_instruct", False)] * 24
    + [("harmful", "violence_weapons", "contrast_homonyms", True)] * 14
    + [("harmful", "cybercrime", "Malware/Hacking", True)] * 4
    + [("benign", None, "xstest_safe", True)] * 18
)
GROUP = np.array([r[0] for r in LAYOUT], dtype=object)
CATEGORY = np.array([r[1] for r in LAYOUT], dtype=object)
SOURCE = np.array([r[2] for r in LAYOUT], dtype=object)
HELD = np.array([r[3] for r in LAYOUT])
N_DOCS, N_FEATURES = len(LAYOUT), 8


def docs(group: str, held: bool, category: str | None = None, source: str | None = None) -> np.ndarray:
    m = (GROUP == group) & (HELD == held)
    if category is not None:
        m &= CATEGORY == category
    if source is not None:
        m &= SOURCE == source
    return np.flatnonzero(m)


FIT_HARMFUL, FIT_BENIGN = docs("harmful", False), docs("benign", False)
HELD_HARMFUL, HELD_BENIGN = docs("harmful", True), docs("benign", True)


def planted_values() -> np.ndarray:
    """values[doc, feature] (0 = does not fire).

    f0 style: every fit harmful document, no fit benign one, and every held-out document alike.
    f1 violence: fit violence documents (all "Violence", half of "chemical_biological") and held-out
       violence documents, a little on 3 held-out benign ones (not a perfect separation).
    f2 cyber: fit and held-out cyber documents; only 4 held-out cyber documents, fewer than min_docs.
    f3 mixed-dataset: only the pooled `unspecified` documents.
    f4 held-out only: fires on held-out harmful documents, never in the fit.
    f5, f6 random; f7 never fires."""
    rng = np.random.default_rng(11)
    v = np.zeros((N_DOCS, N_FEATURES))
    v[FIT_HARMFUL, 0] = rng.uniform(1, 2, FIT_HARMFUL.size)
    v[np.r_[HELD_HARMFUL, HELD_BENIGN], 0] = rng.uniform(1, 2, HELD_HARMFUL.size + HELD_BENIGN.size)
    violence = np.r_[
        docs("harmful", False, source="Violence"), docs("harmful", False, source="chemical_biological")[:3]
    ]
    v[violence, 1] = rng.uniform(2, 4, violence.size)
    v[docs("harmful", True, "violence_weapons"), 1] = rng.uniform(1, 4, 14)
    v[HELD_BENIGN[:3], 1] = rng.uniform(0.5, 1.5, 3)
    v[docs("harmful", False, "cybercrime"), 2] = 3.0
    v[docs("harmful", True, "cybercrime"), 2] = 3.0
    v[docs("harmful", False, "unspecified"), 3] = 1.0
    v[HELD_HARMFUL, 4] = rng.uniform(1, 2, HELD_HARMFUL.size)
    v[:, 5] = rng.uniform(0, 1, N_DOCS) * (rng.random(N_DOCS) < 0.6)
    v[:, 6] = np.round(rng.uniform(0, 3, N_DOCS)) * (rng.random(N_DOCS) < 0.5)  # ties
    return v


def triples(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, f = np.nonzero(v)
    return d, f, v[d, f]


def brute_auroc(x: np.ndarray, y: np.ndarray) -> float:
    """P(x > y) + P(x = y) / 2 over every pair, counted one by one."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(x.tolist(), y.tolist()))
    return wins / (len(x) * len(y))


def hanley_mcneil_lo(a: float, n1: int, n0: int) -> float:
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(max(0.0, (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)))
    return min(1.0, max(0.0, a - 1.959963984540054 * se))


def score(v: np.ndarray, **kw):
    kw.setdefault("doc_heldout", HELD)
    kw.setdefault("doc_category_source", SOURCE)
    kw.setdefault("heldout", HeldoutCriterion(threshold=0.6, min_docs=10))
    return contrast_scores_with_summary(*triples(v), N_FEATURES, GROUP, CATEGORY, **kw)


def test_style_feature_fails_the_held_out_check_and_a_genuine_one_passes() -> None:
    table, summary = score(planted_values())
    # the fit alone flags the style feature: it separates the fit's harmful from its benign documents
    assert table.loc[0, "harm_score_all"] == 1.0
    # on the held-out sets it fires alike on both sides (values drawn from one distribution)
    assert table.loc[0, "harm_heldout_set"] == ALL
    assert 0.3 < table.loc[0, "harm_heldout_auroc"] < 0.7 and table.loc[0, "harm_heldout_lo"] < 0.5
    assert not table.loc[0, "is_harmful"] and table.loc[0, "harm_category"] is None
    # the genuine violence feature is harmful, checked on the held-out violence documents
    assert table.loc[1, "is_harmful"] and table.loc[1, "harm_category"] == "violence_weapons"
    assert table.loc[1, "harm_heldout_set"] == "violence_weapons"
    assert table.loc[1, "harm_heldout_auroc"] > 0.9 and table.loc[1, "harm_heldout_lo"] > 0.5
    # it separates "Violence" (all fire) better than "chemical_biological" (half fire)
    assert table.loc[1, "harm_category_source"] == "Violence"
    assert summary["status"] == "applied" and summary["n_harmful"] == int(table["is_harmful"].sum())
    assert summary["n_harmful_fit"] > summary["n_harmful"]
    assert summary["documents"] == {"harmful": 18, "benign": 18}
    assert summary["documents_by_category"] == {"cybercrime": 4, "violence_weapons": 14}
    assert summary["sets"] == {ALL: 18, "violence_weapons": 14}


def test_a_category_without_enough_held_out_documents_is_checked_on_all_of_them() -> None:
    table, _ = score(planted_values())
    # f2's fit category is cybercrime, but only 4 held-out cyber documents (< 10): all 18 are used
    assert table.loc[2, "harm_score"] == 1.0
    assert table.loc[2, "harm_heldout_set"] == ALL
    assert table.loc[2, "harm_heldout_auroc"] == pytest.approx(0.5 + 0.5 * 4 / 18)
    assert not table.loc[2, "is_harmful"]


def test_held_out_aurocs_equal_brute_force() -> None:
    v = planted_values()
    table, _ = score(v)
    fit_only = score(v, heldout=HeldoutCriterion(mode="report"))[0]
    for f in range(N_FEATURES):
        name = table.loc[f, "harm_heldout_set"]
        pos = HELD_HARMFUL if name == ALL else docs("harmful", True, name)
        expected = brute_auroc(v[pos, f], v[HELD_BENIGN, f])
        assert table.loc[f, "harm_heldout_auroc"] == pytest.approx(expected, abs=1e-12), f
        lo = hanley_mcneil_lo(expected, pos.size, HELD_BENIGN.size)
        assert table.loc[f, "harm_heldout_lo"] == pytest.approx(lo, abs=1e-12), f
        fires = int((v[pos, f] > 0).sum())
        passes = expected >= 0.6 and lo > 0.5 and fires >= 3
        assert table.loc[f, "is_harmful"] == (fit_only.loc[f, "is_harmful"] and passes), f


def test_held_out_documents_stay_out_of_the_fit() -> None:
    v = planted_values()
    table = score(v)[0]
    for f in range(N_FEATURES):
        assert table.loc[f, "harm_score_all"] == pytest.approx(
            brute_auroc(v[FIT_HARMFUL, f], v[FIT_BENIGN, f]), abs=1e-12
        ), f
    # f4 fires only on held-out documents: to the fit it never fires
    assert table.loc[4, "harm_score_all"] == 0.5 and table.loc[4, "harm_score"] == 0.5
    assert table.loc[4, "harm_heldout_auroc"] == 1.0 and not table.loc[4, "is_harmful"]


def test_the_pooled_fallback_category_never_wins_the_fit() -> None:
    table = score(planted_values())[0]
    # f3 fires on every `unspecified` document and nothing else: as a category it would score 1.0
    assert table.loc[3, "harm_score"] == table.loc[3, "harm_score_all"] == pytest.approx(0.5 + 0.5 * 8 / 30)
    assert not table.loc[3, "is_harmful"]


def test_report_mode_keeps_the_fit_flags_and_reports_the_check() -> None:
    v = planted_values()
    required, _ = score(v)
    reported, summary = score(v, heldout=HeldoutCriterion(mode="report", threshold=0.6, min_docs=10))
    assert summary["status"] == "reported"
    assert reported.loc[0, "is_harmful"] and not required.loc[0, "is_harmful"]
    assert reported["harm_heldout_auroc"].equals(required["harm_heldout_auroc"])
    assert summary["n_harmful"] == summary["n_harmful_fit"] == int(reported["is_harmful"].sum())
    assert summary["n_harmful_fit_passing"] == int(required["is_harmful"].sum())


def test_without_validation_documents_the_check_is_skipped() -> None:
    v = planted_values()
    fit = np.r_[FIT_HARMFUL, FIT_BENIGN]
    table, summary = contrast_scores_with_summary(
        *triples(v[fit]), N_FEATURES, GROUP[fit], CATEGORY[fit], doc_category_source=SOURCE[fit]
    )
    assert table[["harm_heldout_auroc", "harm_heldout_lo"]].isna().all().all()
    assert table["harm_heldout_set"].isna().all()
    assert summary["status"] == "skipped" and "validation = true" in summary["reason"]
    assert summary["n_harmful_fit_passing"] is None
    assert summary["n_harmful"] == summary["n_harmful_fit"] == int(table["is_harmful"].sum())
    assert table.loc[0, "is_harmful"]  # the style feature: nothing to check it against
    # the same scores with the held-out documents present but reported only
    reported = score(v, heldout=HeldoutCriterion(mode="report"))[0]
    cols = ["harm_score", "harm_score_lo", "harm_score_all", "is_harmful", "harm_category"]
    assert table[cols].equals(reported[cols])


def test_too_small_a_held_out_set_is_skipped_with_the_reason() -> None:
    table, summary = score(planted_values(), heldout=HeldoutCriterion(min_docs=19))
    assert summary["status"] == "skipped"
    assert (
        "18 harmful and 18 benign" in summary["reason"] and "harm_heldout_min_docs = 19" in summary["reason"]
    )
    assert table["harm_heldout_auroc"].isna().all()
    assert table.loc[0, "is_harmful"]


def test_every_harmful_document_held_out_is_a_clear_error() -> None:
    held = GROUP == "harmful"
    with pytest.raises(CorpusError, match=r"harmful.*held out \(validation = true\)"):
        contrast_scores(*triples(planted_values()), N_FEATURES, GROUP, CATEGORY, doc_heldout=held)


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="require, report"):
        HeldoutCriterion(mode="sometimes")
