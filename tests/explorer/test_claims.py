"""The explorer claims only what the cache shows: a cache without task features gets a story and pages that
say so (never "task feature #N", never a flagged pair it does not hold), a cache with them gets the claims,
and lab results computed with features the cache no longer flags are withheld with the reason."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from explorer import claims as C
from explorer import figures as F
from explorer.data import Findings, basis_problem, cache_findings, load_cache, read_diff_basis
from explorer.figures import esc
from explorer.story import build_result_story, build_story, story_html, story_steps, story_title
from precompute.cache import stage
from tests.explorer.test_apptest import html_text, plain, run_page

RESULT_KEYS = ["feature", "map", "harmful", "task", "null", "pairs", "withheld"]
PAIR_KEYS = ["feature", "map", "task", "neighbour", "text", "sets", "finetune"]
NAMED_TASK_FEATURE = re.compile(r"task feature:?\s*#\d", re.IGNORECASE)
NO_TASK_REASON = (
    "this cache has no task feature now (none passes the task test), so the predicted risk the diff was "
    "computed with, closeness to task features, does not describe it"
)


def raw(cache: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """features.parquet and neighbors.npz as the files hold them (the expectations are computed from these)."""
    with np.load(cache / "neighbors.npz") as z:
        return pd.read_parquet(cache / "features.parquet"), {k: z[k] for k in z.files}


def story_text(steps: list) -> str:
    return "\n".join(f"{s.title}\n{s.lead}\n{s.body or ''}" for s in steps)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


# --- a cache without task features ------------------------------------------------------------------


def test_findings_without_task_features(notask_cache: Path) -> None:
    f, nb = raw(notask_cache)
    fd = cache_findings(load_cache(notask_cache))
    task = f["task_score"].to_numpy()
    nearest = nb["cosine"][:, 0].astype(np.float64)
    assert (fd.n_features, fd.n_task, fd.n_control, fd.n_flagged) == (400, 0, 0, 0)
    assert int(f["is_task"].sum()) == 0 and fd.n_harmful == int(f["is_harmful"].sum()) > 0
    assert fd.n_task_scored == int(np.isfinite(task).sum()) == 400
    assert fd.best_task == (int(np.argmax(task)), float(task.max())) and task.max() < 0.8
    assert fd.task_threshold == 0.8 and fd.harm_threshold == 0.68 and fd.min_docs is None
    assert fd.lean == {} and fd.task_documents is None  # the synthetic sidecar records neither
    assert fd.null_kind == "covariance" and fd.null_cosine == float(nb["null_cosine"])
    assert fd.nn_above_isotropic == pytest.approx((nearest > float(nb["null_isotropic"])).mean())
    assert fd.nn_above_null == pytest.approx((nearest > float(nb["null_cosine"])).mean())
    assert fd.closeness_verdict == "not_testable" and fd.closeness_problem is None


def test_result_story_says_what_the_cache_found(notask_cache: Path) -> None:
    c = load_cache(notask_cache)
    f, nb = raw(notask_cache)
    assert c.default_pair() is None
    steps = story_steps(c, c.default_pair())
    assert [s.key for s in steps] == RESULT_KEYS
    text = story_text(steps)
    assert not NAMED_TASK_FEATURE.search(text) and "A task feature" not in text
    assert "closer than chance" not in text and "flagged pair" not in text.replace("No flagged pair", "")
    task = f["task_score"].to_numpy()
    n_harm = int(f["is_harmful"].sum())
    by_key = {s.key: s for s in steps}
    assert [s.title for s in steps[2:]] == [
        f"{n_harm} harmful features",
        "No task feature",
        "What counts as close",
        "No flagged pair",
        "What this cache does not show",
    ]
    assert by_key["task"].lead == esc(
        "400 of 400 features were scored on task versus control text (the same format with different "
        "content), one window of each document. None passes the task test (task score ≥ 0.8, its lower 95% "
        f"bound above 0.5), so this cache has no task feature. The highest task score is {task.max():.2f} "
        f"(feature #{int(np.argmax(task))})."
    )
    iso, cov = float(nb["null_isotropic"]), float(nb["null_covariance"])
    nearest = nb["cosine"][:, 0].astype(np.float64)
    assert (
        esc(
            f"Random directions with this decoder's own mean and covariance reach a cosine of {cov:.3f} by chance "
            f"(the calibrated null, at a false-positive rate of 0.1%); uniformly random directions reach only "
            f"{iso:.3f} (the isotropic null). The decoder is not isotropic: its directions sit closer to each other "
            f"than uniform ones, and the calibrated level is 1.25× the isotropic one. "
            f"{_pct((nearest > iso).mean())} of features have a nearest neighbour above the isotropic level, "
            f"{_pct((nearest > cov).mean())} above the calibrated one, which is the level used here."
        )
        in by_key["null"].lead
    )
    report = json.loads((notask_cache / "closeness.json").read_text())
    sets = report["set_definitions"]
    ranked = F.ranked_sentence({**report["ranked"], "alpha": report["alpha"]})
    assert report["ranked"]["verdict"] == "no_difference" and ranked.startswith("Exploratory, sets by rank")
    assert by_key["pairs"].lead == esc(
        "No (task, harmful) pair is flagged: without a task feature there is none to flag. The paper's "
        "comparison is of whole sets: whether features of misalignment-inducing (task) data sit closer to harmful "
        "features than features of non-inducing (control) data (Minegishi et al. 2026). Whether "
        "task-specific features sit closer to harmful features than control-specific ones is not testable on "
        f"this cache: {report['reason']} (inducing: {sets['inducing']}; non-inducing: {sets['non_inducing']}). "
        + ranked
        # the step's chart, drawn from the ranked sets' histogram in closeness.json, says which comparison it is
        + " The chart is that exploratory ranked comparison: the comparison by test is not testable here."
    )
    assert report["ranked"].get("histogram") is not None and by_key["pairs"].figure is not None
    assert by_key["withheld"].lead.startswith("The mechanism this explorer was built to show")
    assert (
        "This cache has no task feature, so the story does not illustrate the mechanism"
        in by_key["withheld"].lead
    )
    assert [sh.x0 for sh in by_key["task"].figure.layout.shapes] == [0.5, 0.8]  # no difference; the task test
    assert sorted(by_key["task"].figure.data[0].x) == sorted(task.tolist())
    bars = by_key["null"].figure.data[0]
    live = nearest[~f["dead"].to_numpy()]
    assert list(bars.x) == pytest.approx([iso, cov, float(np.median(live))])
    # the followed feature: the harmful feature with the most neighbours above chance (ties: harm score)
    above = (nb["cosine"] >= float(nb["null_cosine"])).sum(axis=1)
    harmful = f["is_harmful"].to_numpy()
    best = max(np.flatnonzero(harmful), key=lambda i: (above[i], f["harm_score"].iat[i]))
    assert (
        f"feature #{best} lights up" in steps[0].lead
        and f"red star</b> is feature #{best}, the harmful feature with the most neighbours" in steps[1].lead
    )
    page = story_html(steps, story_title(c, None))
    assert "Step 7 of 7" in page and not NAMED_TASK_FEATURE.search(page)
    assert story_title(c, None) == "Feature geometry: what the cache notask shows"


def test_result_story_quotes_the_task_permutation(notask_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "notask"
    shutil.copytree(notask_cache, cache)

    def record(observed: int) -> None:
        with stage(cache) as staged:
            params = {
                **staged.manifest["params"]["scores"],
                "documents_scored_task_window": {"task": 40, "control": 41},
            }
            perm = {"observed": observed, "permuted_mean": 30.29, "permuted_p95": 76.0, "p": 0.0846}
            staged.record_step(
                "scores",
                params,
                1.0,
                extra={"task_permutation": {"n_permutations": 200, "lo_above_half": perm}},
            )
            staged.commit()

    record(62)
    lead = {s.key: s.lead for s in build_result_story(load_cache(cache))}["task"]
    assert lead.startswith(
        esc("400 of 400 features were scored on task versus control text, using 40 task and 41 control")
    )
    assert lead.endswith(
        esc(
            "62 features lean towards task text (the lower 95% bound of their task score is above 0.5); with the "
            "task and control labels shuffled 200 times, 30.3 do on average and 76 at the 95th percentile "
            "(p = 0.085): within what shuffled labels give."
        )
    )
    record(90)
    assert {s.key: s.lead for s in build_result_story(load_cache(cache))}["task"].endswith(
        esc("(p = 0.085): more than shuffled labels give.")
    )
    # a damaged sidecar is not quoted: the sentence goes, the reason is kept
    side = cache / "params" / "scores.json"
    side.write_text(side.read_text().replace('"observed": 90', '"observed": 91'))
    fd = cache_findings(load_cache(cache))
    assert fd.lean == {} and fd.task_documents is None and "checksum" in fd.notes[0]
    assert C.lean_sentence(fd) is None


def test_default_feature_without_task_features(notask_cache: Path) -> None:
    c = load_cache(notask_cache)
    f, _ = raw(notask_cache)
    harm = f["harm_score"].where(f["is_harmful"], -np.inf)
    assert c.default_pair() is None and c.default_feature() == int(harm.to_numpy().argmax())


# --- a cache with task features and flagged pairs -----------------------------------------------------


def test_pair_story_makes_the_claims_the_cache_backs(synth_cache: Path) -> None:
    c = load_cache(synth_cache)
    f, nb = raw(synth_cache)
    ov = pd.read_parquet(synth_cache / "overlaps.parquet")
    t, h = c.default_pair()
    steps = build_story(c, t, h)
    assert [s.key for s in steps][:7] == PAIR_KEYS
    by_key = {s.key: s for s in steps}
    assert by_key["task"].title == f"A task feature: #{t}" and f["is_task"].iat[t]
    assert (
        f"It is one of the {int(f['is_task'].sum())} features that pass the task test." in by_key["task"].lead
    )
    cos = float(ov.loc[(ov["task_feature"] == t) & (ov["harmful_feature"] == h), "cosine"].iloc[0])
    assert (
        cos > float(nb["null_cosine"])
        and by_key["neighbour"].title == "Its harmful neighbour is closer than chance"
    )
    assert (
        f"the pair is closer than chance, one of the {len(ov)} (task, harmful) pairs this cache flags."
        in (by_key["neighbour"].lead)
    )
    assert by_key["finetune"].title == "What fine-tuning could do: a hypothesis" and by_key[
        "finetune"
    ].lead.startswith("A hypothesis, not a finding")
    assert story_steps(c, (t, h))[3].title == by_key["neighbour"].title
    # a pair the cache does not flag is never presented as one
    unflagged = next(
        (int(a), int(b))
        for a in np.flatnonzero(f["is_task"])
        for b in np.flatnonzero(f["is_harmful"])
        if not ((ov["task_feature"] == a) & (ov["harmful_feature"] == b)).any()
    )
    with pytest.raises(ValueError, match="not a flagged pair"):
        build_story(c, *unflagged)
    other = story_steps(c, unflagged)
    assert [s.key for s in other][:7] == RESULT_KEYS
    n_task = int(f["is_task"].sum())
    assert [s.title for s in other][3:6] == [
        f"{n_task} task features",
        "What counts as close",
        f"{len(ov)} flagged pairs",
    ]
    assert (
        esc(f"{n_task} features pass the task test (task score ≥ 0.8, its lower 95% bound above 0.5).")
        in other[3].lead
    )
    assert (
        esc(
            f"{len(ov)} (task, harmful) pairs are flagged: a task feature and a harmful feature whose decoder directions "
            f"are above the chance level {float(nb['null_cosine']):.3f} ({ov['task_feature'].nunique()} task features)."
        )
        in other[5].lead
    )


def test_sentences_with_task_features_but_no_flagged_pair() -> None:
    """Findings built by hand: the overlaps step looks at the best `flag_scope` task features only."""
    base = dict(
        n_features=10,
        n_dead=0,
        n_task_scored=10,
        n_control=0,
        n_harmful=2,
        n_flagged=0,
        n_flagged_task=0,
        best_task=(3, 0.9),
        task_threshold=0.7,
        harm_threshold=0.7,
        min_docs=3,
        task_documents=None,
        lean={},
        harm_categories=[],
        null_cosine=0.25,
        null_kind="covariance",
        null_isotropic=0.2,
        null_covariance=0.25,
        fpr=0.01,
        nn_above_isotropic=0.5,
        nn_above_null=0.1,
        typical_nn_cosine=0.2,
        closeness=None,
    )
    few = Findings(n_task=3, flag_scope=50, **base)
    many = Findings(n_task=80, flag_scope=50, **base)
    assert C.flagged_sentence(few) == (
        "No (task, harmful) pair is flagged: none of the 3 task features has a harmful neighbour above the chance "
        "level 0.250."
    )
    assert "none of the 50 task features with the highest task scores has" in C.flagged_sentence(many)
    assert C.task_sentence(few) == (
        "3 features pass the task test (task score ≥ 0.7, its lower 95% bound above 0.5, firing in at least 3 "
        "task windows)."
    )
    assert (
        C.closeness_text(few)
        == "The set-level closeness test has not run on this cache (`featuregeom closeness`)."
    )


# --- lab results computed with features the cache no longer flags ----------------------------------------


def _point_risk_at(cache: Path, run: str, feature: int) -> None:
    p = cache / "finetune" / run / "diff.parquet"
    d = pd.read_parquet(p)
    d.loc[d["is_harmful"], "risk_task_feature"] = float(feature)
    d.to_parquet(p, index=False)


def test_stale_finetune_diff_is_withheld_from_the_story(cache_copy: Path) -> None:
    f, _ = raw(cache_copy)
    not_task = int(np.flatnonzero(~f["is_task"].to_numpy())[0])
    assert basis_problem(f, read_diff_basis(cache_copy / "finetune" / "insecure")) is None
    _point_risk_at(cache_copy, "insecure", not_task)
    reason = "1 of the 1 task features its predicted risk points at is not a task feature in this cache now"
    assert basis_problem(f, read_diff_basis(cache_copy / "finetune" / "insecure")) == reason
    c = load_cache(cache_copy)
    steps = build_story(c, *c.default_pair())
    assert [s.key for s in steps] == PAIR_KEYS
    assert steps[-1].lead.endswith(f" This cache's measured fine-tune is not shown: {reason}.")


def test_finetune_page_withholds_a_stale_risk(cache_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f, _ = raw(cache_copy)
    _point_risk_at(cache_copy, "insecure", int(np.flatnonzero(~f["is_task"].to_numpy())[0]))
    at = run_page("views/finetune.py", cache_copy, monkeypatch)
    assert not at.exception and not at.error
    warning = plain(at.warning[0].value)
    assert warning.startswith(
        "Run insecure was computed with features this cache no longer flags: 1 of the 1 task features its "
        "predicted risk points at is not a task feature in this cache now."
    )
    assert len(at.get("plotly_chart")) == 1  # compare runs only: no risk-vs-change charts
    assert not [m for m in at.metric if "top-risk decile" in m.label]
    table = next(d.value for d in at.dataframe if "Δ task - control" in d.value.columns)
    assert "risk (max cos)" not in table.columns and "nearest task feature" not in table.columns


def test_lab_results_on_a_cache_without_task_features(
    notask_cache: Path, synth_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "notask"
    shutil.copytree(notask_cache, cache)
    for folder in ("finetune", "triage"):  # lab outputs written when the cache still had task features
        shutil.copytree(synth_cache / folder, cache / folder)
    steps = story_steps(load_cache(cache), None)
    assert [s.key for s in steps] == RESULT_KEYS
    assert steps[-1].lead.endswith(
        esc(f"The fine-tune diff in this cache (finetune/insecure) is not quoted either: {NO_TASK_REASON}.")
    )
    at = run_page("views/finetune.py", cache, monkeypatch)
    assert not at.exception and NO_TASK_REASON in plain(at.warning[0].value)
    assert len(at.get("plotly_chart")) == 1
    synth_f, _ = raw(synth_cache)
    f, _ = raw(cache)
    at = run_page("views/triage.py", cache, monkeypatch)
    assert not at.exception and len(at.warning) == 1
    synth_task = int((synth_f["is_task"] & ~synth_f["is_harmful"]).sum())
    assert plain(at.warning[0].value).startswith(
        f"This triage was computed with features this cache no longer flags as it did: it weighted "
        f"{int(synth_f['is_harmful'].sum())} harmful features, the cache flags {int(f['is_harmful'].sum())} now; "
        f"it weighted {synth_task} task features, the cache flags 0 now."
    )


# --- the pages, through AppTest -------------------------------------------------------------------------


def page_text(at) -> str:
    parts = [e.value for e in (*at.title, *at.subheader, *at.markdown, *at.caption, *at.info, *at.warning)]
    return "\n".join(map(str, parts)) + html_text(at)


def test_pages_without_task_features(notask_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = run_page("views/story.py", notask_cache, monkeypatch)
    assert not at.exception and not at.error
    assert "Step 1 of 7" in html_text(at) and "What is a feature?" in html_text(at)
    seen = []
    for n in range(2, 8):  # Next walks every step, each with its own URL
        at.button(key="story_next").click().run()
        assert not at.exception and f"Step {n} of 7" in html_text(at)
        assert at.query_params["step"] in (str(n), [str(n)])
        seen.append(page_text(at))
    assert at.button(key="story_next").disabled
    at.button(key="story_back").click().run()
    assert "Step 6 of 7" in html_text(at) and "No flagged pair" in html_text(at)
    assert "No task feature" in seen[2] and "What this cache does not show" in seen[5]
    assert not any(NAMED_TASK_FEATURE.search(t) for t in seen)
    # a pair in the URL that the cache does not flag: said so, and the cache's story instead
    at = run_page("views/story.py", notask_cache, monkeypatch, task="5", harmful="7", step="4")
    assert not at.exception and "#5 ↔ #7 is not a flagged pair of this cache" in at.info[0].value
    assert "Step 4 of 7" in html_text(at) and "No task feature" in html_text(at)
    assert "task" not in at.query_params and "harmful" not in at.query_params
    # map, feature and overlaps: no task-feature badge, no story or review link, the negative result said
    m = run_page("views/map.py", notask_cache, monkeypatch)
    links = [str(e.proto.label) for e in m.get("page_link")]
    assert not m.exception and not any("story" in x or "Review" in x for x in links), links
    assert "task feature" not in html_text(m) and not NAMED_TASK_FEATURE.search(page_text(m))
    ov = run_page("views/overlaps.py", notask_cache, monkeypatch)
    assert plain(ov.info[0].value).startswith(
        "No (task, harmful) pair is flagged: without a task feature there is none to flag."
    )
    ov = run_page("views/overlaps.py", notask_cache, monkeypatch, task="5", harmful="7")
    assert not ov.exception and [s.value for s in ov.subheader][0] == "#5 ↔ #7: not a flagged pair"
    assert "this cache does not flag the pair" in page_text(ov) and "Task #5" not in page_text(ov)
