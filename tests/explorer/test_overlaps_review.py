"""The overlaps review's pairs are undirected and an unflagged pair says so (AppTest, real caches).

`bidir_cache` plants a pair listed both ways (tests/explorer/conftest.py); an unflagged pair is any pair
of the synthetic cache that overlaps.parquet does not hold, chosen here by the features' own flags.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from explorer import figures as F
from explorer.data import load_cache
from explorer.pair_status import pair_status
from explorer.reviews import ReviewStore
from tests.explorer.test_apptest import all_text, html_text, run_page


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEATUREGEOM_CACHE", raising=False)
    monkeypatch.setenv("FEATUREGEOM_REVIEWS", str(tmp_path / "reviews"))


def unflagged_pair(cache_dir: Path) -> tuple[int, int]:
    """(t, h): t neither task nor harmful, h harmful, the pair not in overlaps.parquet."""
    c = load_cache(cache_dir)
    f = c.features
    plain = f[~f["is_task"].astype(bool) & ~f["is_harmful"].astype(bool)].index
    harmful = f[f["is_harmful"].astype(bool)].index
    return int(plain[0]), int(harmful[0])


def header_html(at: object, feature: int) -> str:
    return next(b for b in html_text(at).split("\n") if f"Feature #{feature}</div>" in b)  # type: ignore[arg-type]


def test_unflagged_pair_says_why_in_true_colours_and_takes_no_verdict_unless_opted_in(
    synth_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    t, h = unflagged_pair(synth_cache)
    c = load_cache(synth_cache)
    status = pair_status(c, t, h, 50)
    assert not status.flagged and any("is not a task feature" in r for r in status.reasons)
    # reversed in the URL: the harmful feature on the task side, a plain feature on the harmful side
    at = run_page("views/overlaps.py", synth_cache, monkeypatch, task=str(h), harmful=str(t))
    assert not at.exception
    assert any(s.value == f"#{h} ↔ #{t}: not a flagged pair" for s in at.subheader)
    # the picker does not call #h the task side of a pair the cache never flagged
    assert at.selectbox(key=f"ov_pick:{h}:{t}").options[0] == f"#{h} ↔ #{t} (not flagged)"
    warning = " ".join(w.value for w in at.warning).replace("\\", "")
    assert (
        warning.startswith("Not flagged: this cache does not flag")
        and f"#{t} is not a harmful feature" in warning
    )
    assert f"#{h} is not a task feature" in warning
    assert not re.search(r"\bnan\b", all_text(at), re.IGNORECASE)  # no 'nan' anywhere
    assert all("nan" not in str(m.value).lower() for m in at.metric)
    # true colours: the harmful feature red on the task side, the plain one neutral (not red) on the harmful side
    assert f"solid {F.HARM}" in header_html(at, h)
    assert f"solid {F.NEITHER_COLOR}" in header_html(at, t) and f"solid {F.HARM}" not in header_html(at, t)
    # no verdict without the opt-in
    assert not [b for b in at.button if b.label == "Save verdict"]
    at.checkbox(key=f"ov_optin:{h}:{t}").check().run()
    at.text_input(key=f"rev_name:{h}:{t}").input("Ana")
    at.radio(key=f"rev_v:{h}:{t}").set_value("benign")
    next(b for b in at.button if b.label == "Save verdict").click().run()
    assert not at.exception and not at.error
    store = ReviewStore(tmp_path / "reviews" / f"{synth_cache.name}.reviews.sqlite")
    cur = store.get(h, t, "Ana", cache=synth_cache.name)
    assert cur is not None and cur["verdict"] == "benign" and cur["unflagged"] == 1
    assert "unflagged pair" in html_text(at)


def test_both_features_task_and_harmful_get_the_both_stripe(
    bidir_cache: tuple[Path, tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, (t, h) = bidir_cache
    c = load_cache(path)
    other = int(
        c.features[~c.features["is_task"].astype(bool) & ~c.features["is_harmful"].astype(bool)].index[0]
    )
    at = run_page("views/overlaps.py", path, monkeypatch, task=str(t), harmful=str(other))
    assert not at.exception and any("not a flagged pair" in s.value for s in at.subheader)
    assert f"box-shadow:-5px 0 0 {F.TASK}" in header_html(at, t)  # both task and harmful: two stripes


def test_bidirectional_pair_listed_once_and_verdicts_count_both_ways(
    bidir_cache: tuple[Path, tuple[int, int]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path, (t, h) = bidir_cache
    raw = pd.read_parquet(path / "overlaps.parquet")
    assert len(raw[raw["task_feature"].isin([t, h]) & raw["harmful_feature"].isin([t, h])]) == 2  # planted
    # an old verdict saved on the reverse order (h, t)
    store = ReviewStore(tmp_path / "reviews" / f"{path.name}.reviews.sqlite")
    store.record(h, t, "confirmed", "Old Reviewer", "saved the other way round", cache=path.name)
    at = run_page("views/overlaps.py", path, monkeypatch, task=str(h), harmful=str(t))
    assert not at.exception
    assert any("Pairs are undirected" in i.value for i in at.info)  # opened in the flagged order
    assert any(s.value == f"Task #{t} ↔ harmful #{h}" for s in at.subheader)
    table = at.dataframe[0].value
    mine = table[table["task_feature"].isin([t, h]) & table["harmful_feature"].isin([t, h])]
    assert len(mine) == 1 and (int(mine["task_feature"].iat[0]), int(mine["harmful_feature"].iat[0])) == (
        t,
        h,
    )
    assert bool(mine["both_ways"].iat[0]) and mine["status"].iat[0] == "confirmed"
    assert mine["risk"].iat[0] == pytest.approx(
        float(raw[(raw.task_feature == t) & (raw.harmful_feature == h)].risk.iat[0])
    )
    assert "<b>Old Reviewer</b>" in html_text(at)
    # a second save by the same reviewer on (t, h) replaces their current verdict; both saves in the history
    store.record(t, h, "benign", "old reviewer", cache=path.name)
    v = store.verdicts(path.name, t, h)
    assert len(v) == 1 and v["verdict"].iat[0] == "benign" and int(v["n_changes"].iat[0]) == 2
    assert len(store.history(path.name, h, t)) == 2 and store.pair_version(
        h, t, path.name
    ) == store.pair_version(t, h, path.name)


def test_no_table_legend_without_flagged_pairs(notask_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = run_page("views/overlaps.py", notask_cache, monkeypatch)
    captions = " ".join(c.value for c in at.caption)
    assert (
        "Each row is a flagged pair" not in captions and "A flagged pair would be a task feature" in captions
    )
