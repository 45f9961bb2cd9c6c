"""The SQLite review store: per-reviewer verdicts, consensus, stale-save refusal, history, exports,
schema migration, damaged or unusable files, and no lost writes under concurrent processes."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from explorer.review_table import (
    export_csv,
    export_json,
    history_table,
    merge_reviews,
    summarize,
)
from explorer.reviews import (
    DISPUTED,
    SCHEMA,
    UNREVIEWED,
    VERDICTS,
    ReviewError,
    ReviewStore,
    StaleVerdictError,
)
from tests.explorer.helpers import write_damaged_reviews


def test_record_keeps_a_verdict_per_reviewer(tmp_path: Path) -> None:
    s = ReviewStore(tmp_path / "r.sqlite")
    assert s.verdicts("c").empty and s.history("c").empty and s.pair_version(1, 2, "c") == 0
    s.record(1, 2, "needs-more-evidence", "ana", "first look", cache="c")
    s.record(1, 2, "confirmed", "ben", "same examples fire", cache="c")
    s.record(1, 2, "confirmed", "  Ana  ", "changed my mind", cache="c")  # same reviewer, any case or spacing
    s.record(3, 4, "benign", "ana", cache="c")
    pair = s.verdicts("c", 1, 2)
    assert sorted(zip(pair["reviewer"], pair["verdict"], pair["n_changes"], strict=True)) == [
        ("Ana", "confirmed", 2),
        ("ben", "confirmed", 1),
    ]
    assert s.get(1, 2, "ANA", cache="c")["note"] == "changed my mind"
    assert s.get(1, 2, "cy", cache="c") is None
    h = s.history("c", 1, 2)
    assert list(h["verdict"]) == ["confirmed", "confirmed", "needs-more-evidence"]  # newest first, all kept
    assert list(h["reviewer"]) == ["Ana", "ben", "ana"]
    assert s.pair_version(1, 2, "c") == int(h["id"].max()) == 3
    assert s.count_history() == 4 and len(s.verdicts("c")) == 3
    with sqlite3.connect(s.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA


def test_caches_sharing_one_file_stay_apart(tmp_path: Path) -> None:
    s = ReviewStore(tmp_path / "shared.sqlite")
    s.record(1, 2, "confirmed", "ana", cache="before-ft")
    s.record(1, 2, "benign", "ana", cache="after-ft")
    assert list(s.verdicts("before-ft")["verdict"]) == ["confirmed"]
    assert list(s.verdicts("after-ft")["verdict"]) == ["benign"]
    assert s.pair_version(1, 2, "before-ft") == 1 and s.pair_version(1, 2, "after-ft") == 2
    assert len(s.history(None)) == 2 and len(s.history("after-ft")) == 1


def test_stale_save_is_refused_and_names_the_other_verdict(tmp_path: Path) -> None:
    s = ReviewStore(tmp_path / "r.sqlite")
    loaded = s.pair_version(1, 2, "c")  # both reviewers open the pair
    s.record(1, 2, "confirmed", "Ana", "shell + threats", cache="c", expected_version=loaded)
    with pytest.raises(StaleVerdictError, match=r"Ana: confirmed at 20\d\d-") as info:
        s.record(1, 2, "benign", "Ben", "harmless", cache="c", expected_version=loaded)
    assert list(info.value.changes["reviewer"]) == ["Ana"]
    assert s.count_history() == 1 and list(s.verdicts("c")["reviewer"]) == ["Ana"]  # nothing written
    # having seen Ana's verdict, Ben saves beside it
    seen = s.pair_version(1, 2, "c")
    s.record(1, 2, "benign", "Ben", "harmless", cache="c", expected_version=seen)
    assert sorted(s.verdicts("c")["reviewer"]) == ["Ana", "Ben"]
    # the same reviewer in two tabs: the older tab cannot overwrite the newer save
    tab1 = tab2 = s.pair_version(1, 2, "c")
    s.record(1, 2, "needs-more-evidence", "Ben", "tab 1", cache="c", expected_version=tab1)
    with pytest.raises(StaleVerdictError, match="Ben: needs-more-evidence"):
        s.record(1, 2, "confirmed", "Ben", "tab 2", cache="c", expected_version=tab2)
    assert s.get(1, 2, "Ben", cache="c")["note"] == "tab 1"
    # another pair's saves do not make this one stale
    assert s.record(5, 6, "benign", "Ana", cache="c")["history_id"] == 4
    assert s.pair_version(1, 2, "c") == 3
    s.record(1, 2, "confirmed", "Ben", "tab 2 again", cache="c", expected_version=3)
    assert s.count_history() == 5 and s.get(1, 2, "Ben", cache="c")["verdict"] == "confirmed"


def test_reopen_persists(tmp_path: Path) -> None:
    ReviewStore(tmp_path / "r.sqlite").record(5, 6, "benign", "cy", "ok", cache="c")
    assert ReviewStore(tmp_path / "r.sqlite").get(5, 6, "cy", cache="c")["note"] == "ok"


@pytest.mark.parametrize(
    "verdict,reviewer,message",
    [
        ("maybe", "ana", "verdict must be one of"),
        ("benign", "", "enter your name"),
        ("benign", "  \t ", "enter your name"),
        ("benign", "x" * 81, "at most 80 characters"),
    ],
)
def test_invalid_verdicts(tmp_path: Path, verdict: str, reviewer: str, message: str) -> None:
    s = ReviewStore(tmp_path / "r.sqlite")
    with pytest.raises(ReviewError, match=message):
        s.record(1, 2, verdict, reviewer)
    assert s.count_history() == 0


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReviewError, match="--reviews"):
        ReviewStore(blocker / "sub" / "r.sqlite")


@pytest.mark.parametrize("kind", ["garbage", "directory"])
def test_unreadable_database_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "r.sqlite"
    if kind == "garbage":
        p.write_bytes(b"not sqlite at all " * 500)
    else:
        p.mkdir()
    with pytest.raises(
        ReviewError, match=r"cannot open the review database .*verdicts are unavailable.*--reviews"
    ):
        ReviewStore(p)
    assert (
        (p.read_bytes() == b"not sqlite at all " * 500) if kind == "garbage" else p.is_dir()
    )  # left as it was


@pytest.mark.parametrize("table", ["verdict_history", "verdicts"])
def test_damaged_pages_open_read_only(tmp_path: Path, table: str) -> None:
    p = write_damaged_reviews(
        tmp_path / "r.sqlite", [(1, 2, "confirmed", "ana"), (1, 2, "benign", "ben")], cache="c", table=table
    )
    before = p.read_bytes()
    s = ReviewStore(p)
    assert s.read_only and s.problem is not None
    assert f"The review database {p} is damaged" in s.problem and "saving is off" in s.problem
    with pytest.raises(ReviewError, match="not saved: The review database .* is damaged"):
        s.record(1, 2, "confirmed", "cy", cache="c")
    # what is intact is read; what is damaged is a ReviewError saying what to do, never a raw sqlite3 error
    intact, damaged = (s.verdicts, s.history) if table == "verdict_history" else (s.history, s.verdicts)
    assert len(intact("c")) == 302  # 2 + 300 filler verdicts, or 302 saves
    assert sorted(intact("c", 1, 2)["reviewer"]) == ["ana", "ben"]
    with pytest.raises(ReviewError, match="cannot read the verdicts from .* Restore the file from a backup"):
        damaged("c")
    assert p.read_bytes() == before  # a read-only store never writes to the file


def test_read_only_file_opens_read_only(tmp_path: Path) -> None:
    from tests.readonly import read_only_directory

    def fill(d: Path) -> None:
        ReviewStore(d / "r.sqlite").record(1, 2, "benign", "ana", cache="c")
        with sqlite3.connect(d / "r.sqlite") as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    with read_only_directory(tmp_path / "ro", fill) as d:
        check_read_only_store(d / "r.sqlite")


def check_read_only_store(p: Path) -> None:
    s = ReviewStore(p)
    assert s.read_only and "read-only" in str(s.problem)
    assert list(s.verdicts("c")["verdict"]) == ["benign"]
    with pytest.raises(ReviewError, match="not saved"):
        s.record(1, 2, "confirmed", "ana", cache="c")


# the schema before per-reviewer verdicts, verbatim
V1_DDL = """
CREATE TABLE verdict_history (id INTEGER PRIMARY KEY AUTOINCREMENT, task_feature INTEGER NOT NULL,
    harmful_feature INTEGER NOT NULL, verdict TEXT NOT NULL, reviewer TEXT NOT NULL, note TEXT NOT NULL DEFAULT '',
    cache TEXT, created_at TEXT NOT NULL);
CREATE INDEX verdict_history_pair ON verdict_history (task_feature, harmful_feature);
CREATE TABLE verdicts (task_feature INTEGER NOT NULL, harmful_feature INTEGER NOT NULL, verdict TEXT NOT NULL,
    reviewer TEXT NOT NULL, note TEXT NOT NULL DEFAULT '', cache TEXT, updated_at TEXT NOT NULL,
    history_id INTEGER NOT NULL, n_changes INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (task_feature, harmful_feature));
PRAGMA user_version = 1;
"""


def test_schema_1_database_is_migrated_without_losing_rows(tmp_path: Path) -> None:
    p = tmp_path / "old.sqlite"
    with sqlite3.connect(p) as con:
        con.executescript(V1_DDL)
        history = [
            (1, 1, 2, "confirmed", "ana", "first", "demo", "2026-01-01T00:00:00.000Z"),
            (2, 1, 2, "benign", "ben", "overwrote ana", "demo", "2026-01-01T00:00:01.000Z"),
            (3, 1, 2, "needs-more-evidence", "ben", "again", "demo", "2026-01-01T00:00:02.000Z"),
            (4, 3, 4, "benign", "ana", "", None, "2026-01-01T00:00:03.000Z"),
        ]
        con.executemany("INSERT INTO verdict_history VALUES (?, ?, ?, ?, ?, ?, ?, ?)", history)
        # schema 1 kept only the last verdict per pair; (7, 8) has no history row at all
        con.executemany(
            "INSERT INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (1, 2, "needs-more-evidence", "ben", "again", "demo", "2026-01-01T00:00:02.000Z", 3, 3),
                (3, 4, "benign", "ana", "", None, "2026-01-01T00:00:03.000Z", 4, 1),
                (7, 8, "confirmed", "cy", "by hand", "demo", "2026-01-01T00:00:05.000Z", 99, 1),
            ],
        )
    s = ReviewStore(p)
    assert not s.read_only
    with sqlite3.connect(p) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA
    h = s.history(None).sort_values("id")
    assert list(h["id"]) == [1, 2, 3, 4] and list(h["note"]) == ["first", "overwrote ana", "again", ""]
    assert list(h["cache"]) == ["demo", "demo", "demo", ""]
    demo = s.verdicts("demo")
    got = sorted(zip(demo["task_feature"], demo["reviewer"], demo["verdict"], demo["n_changes"], strict=True))
    # ana's verdict on (1, 2), overwritten under schema 1, is back as hers
    assert got == [
        (1, "ana", "confirmed", 1),
        (1, "ben", "needs-more-evidence", 2),
        (7, "cy", "confirmed", 1),
    ]
    assert s.get(3, 4, "ana")["verdict"] == "benign"
    # and the migrated store works as a new one: ids continue after the old ones
    assert s.record(1, 2, "benign", "ana", cache="demo", expected_version=3)["history_id"] == 5
    assert ReviewStore(p).count_history() == 5  # reopening does not migrate twice


def test_summarize_consensus() -> None:
    v = pd.DataFrame(
        {
            "task_feature": [1, 1, 3, 3, 5],
            "harmful_feature": [2, 2, 4, 4, 6],
            "reviewer": ["ben", "Ana", "ana", "cy", "ana"],
            "verdict": ["benign", "confirmed", "benign", "benign", "needs-more-evidence"],
            "updated_at": ["2026-01-02", "2026-01-01", "2026-01-03", "2026-01-04", "2026-01-05"],
        }
    )
    s = summarize(v).set_index("task_feature")
    assert s.loc[1, "consensus"] == "disagree" and s.loc[1, "status"] == DISPUTED
    assert s.loc[1, "reviewers"] == "Ana: confirmed · ben: benign" and s.loc[1, "reviewed_at"] == "2026-01-02"
    assert (
        s.loc[3, "consensus"] == "agree" and s.loc[3, "status"] == "benign" and s.loc[3, "n_reviewers"] == 2
    )
    assert s.loc[5, "consensus"] == "single" and s.loc[5, "status"] == "needs-more-evidence"


def test_merge_and_export(tmp_path: Path) -> None:
    ov = pd.DataFrame(
        {
            "task_feature": [1, 3, 7],
            "harmful_feature": [2, 4, 8],
            "cosine": [0.5, 0.4, 0.3],
            "risk": [0.3, 0.2, 0.1],
            "task_label": ["=cmd|' /C calc'!A0", "<b>x</b>", None],
        }
    )
    s = ReviewStore(tmp_path / "r.sqlite")
    s.record(1, 2, "confirmed", "ana", 'note with "quotes", commas\nand a newline', cache="c")
    s.record(1, 2, "benign", "ben", "-1 looks harmless", cache="c")
    s.record(3, 4, "benign", "ben", cache="c")
    s.record(3, 4, "confirmed", "ben", "second look", cache="c")
    t = merge_reviews(ov, s.verdicts("c"))
    assert list(t["status"]) == [DISPUTED, "confirmed", UNREVIEWED]
    assert list(t["consensus"]) == ["disagree", "single", ""] and list(t["n_reviewers"]) == [2, 1, 0]
    assert t.loc[2, "reviewers"] == ""
    csv = export_csv(t).decode()
    back = pd.read_csv(io.StringIO(csv))
    assert len(back) == 3 and back.loc[0, "reviewers"] == "ana: confirmed · ben: benign"
    assert "'=cmd" in csv  # spreadsheet formula injection defused
    # the history export: every save, oldest first, with the pair's geometry
    hist = history_table(s.history("c"), ov)
    assert list(hist["history_id"]) == [1, 2, 3, 4]
    assert list(hist["verdict"]) == ["confirmed", "benign", "benign", "confirmed"]
    assert list(hist["cosine"]) == [0.5, 0.5, 0.4, 0.4]
    hcsv = pd.read_csv(io.StringIO(export_csv(hist).decode()))
    assert list(hcsv["reviewer"]) == ["ana", "ben", "ben", "ben"]
    assert (
        hcsv.loc[0, "note"] == 'note with "quotes", commas\nand a newline'
        and hcsv.loc[1, "note"] == "'-1 looks harmless"
    )
    js = json.loads(export_json(t, hist))
    assert [p["status"] for p in js["pairs"]] == [DISPUTED, "confirmed", UNREVIEWED]
    assert js["pairs"][2]["task_label"] is None
    assert [(r["history_id"], r["reviewer"], r["verdict"]) for r in js["history"]] == [
        (1, "ana", "confirmed"),
        (2, "ben", "benign"),
        (3, "ben", "benign"),
        (4, "ben", "confirmed"),
    ]


def _writer(path: str, proc: int, n: int) -> None:
    s = ReviewStore(path)
    for i in range(n):
        # each process owns 10 pairs, revisits them (updates its own verdict) and writes the full history;
        # every process also writes on the shared pair (0, 0) under its own name
        s.record(proc * 1000 + i % 10 + 1, 1, VERDICTS[i % 3], f"reviewer-{proc}", f"p{proc}-i{i}", cache="c")
        if i % 25 == 0:
            s.record(0, 0, VERDICTS[proc % 3], f"reviewer-{proc}", f"p{proc}-shared{i}", cache="c")


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite")
    ReviewStore(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p, 100)) for p in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    s = ReviewStore(path)
    h = s.history("c")
    assert len(h) == 800 + 8 * 4
    assert set(h["note"]) == (
        {f"p{p}-i{i}" for p in range(8) for i in range(100)}
        | {f"p{p}-shared{i}" for p in range(8) for i in (0, 25, 50, 75)}
    )
    cur = s.verdicts("c")
    assert (
        len(cur) == 80 + 8
        and (cur["n_changes"] == cur["task_feature"].map(lambda t: 4 if t == 0 else 10)).all()
    )
    # each reviewer's current verdict of each pair is their last write
    for p in range(8):
        assert s.get(0, 0, f"reviewer-{p}", cache="c")["note"] == f"p{p}-shared75"
        for k in range(10):
            assert s.get(p * 1000 + k + 1, 1, f"reviewer-{p}", cache="c")["note"] == f"p{p}-i{90 + k}"


def make_schema_2(p: Path) -> None:
    """A schema-2 file (before `unflagged`) holding verdicts on the pair {1, 2} in both orders."""
    from explorer.reviews import _HISTORY_DDL, _VERDICTS_DDL

    with sqlite3.connect(p) as con:
        con.execute(_HISTORY_DDL)
        con.execute(_VERDICTS_DDL)
        hist = [
            (1, 1, 2, "confirmed", "ana", "a on (1,2)", "c", "2026-01-01T00:00:01.000Z"),
            (2, 2, 1, "benign", "Ana", "a on (2,1)", "c", "2026-01-01T00:00:02.000Z"),
            (3, 2, 1, "confirmed", "ben", "", "c", "2026-01-01T00:00:03.000Z"),
        ]
        con.executemany(
            "INSERT INTO verdict_history (id, task_feature, harmful_feature, verdict, reviewer, note, cache, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            hist,
        )
        con.executemany(
            "INSERT INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [("c", t, h, r, v, n, ts, i, 1) for i, t, h, v, r, n, _, ts in hist],
        )
        con.execute("PRAGMA user_version = 2")


def test_verdicts_in_either_order_read_as_one_pair_and_rows_are_not_rewritten(tmp_path: Path) -> None:
    p = tmp_path / "v2.sqlite"
    make_schema_2(p)
    s = ReviewStore(p)
    with sqlite3.connect(p) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA
        # normalised on read only: the stored orders are as they were saved
        rows = sorted(con.execute("SELECT task_feature, harmful_feature, reviewer, unflagged FROM verdicts"))
    assert rows == [(1, 2, "ana", 0), (2, 1, "Ana", 0), (2, 1, "ben", 0)]
    for t, h in ((1, 2), (2, 1)):
        v = s.verdicts("c", t, h).sort_values("reviewer", key=lambda c: c.str.lower())
        # ana's newest (benign, on (2, 1)) wins, her two saves counted once each
        assert list(zip(v["reviewer"], v["verdict"], v["n_changes"], strict=True)) == [
            ("Ana", "benign", 2),
            ("ben", "confirmed", 1),
        ]
        assert s.get(t, h, "ANA", cache="c")["verdict"] == "benign"
        assert s.pair_version(t, h, "c") == 3 and len(s.history("c", t, h)) == 3
    assert len(s.verdicts("c")) == 2
    # a save in the flagged order (1, 2) replaces ana's current verdict in the other order
    s.record(1, 2, "needs-more-evidence", "ana", cache="c", expected_version=3)
    v = s.verdicts("c", 2, 1)
    ana = v[v["reviewer"].str.lower() == "ana"]
    assert len(ana) == 1 and ana["verdict"].iat[0] == "needs-more-evidence" and ana["n_changes"].iat[0] == 3
    # a save refused as stale sees saves made in the other order
    with pytest.raises(StaleVerdictError):
        s.record(2, 1, "benign", "ben", cache="c", expected_version=3)
    # the table: both reviewers' verdicts count for the flagged (1, 2), whichever order they were saved in
    ov = pd.DataFrame({"task_feature": [1], "harmful_feature": [2], "risk": [0.5]})
    merged = merge_reviews(ov, s.verdicts("c"))
    assert len(merged) == 1 and merged["status"].iat[0] == "disputed" and merged["n_reviewers"].iat[0] == 2


def test_read_only_schema_2_file_reads_every_verdict_as_flagged(tmp_path: Path) -> None:
    from tests.readonly import read_only_directory

    with read_only_directory(tmp_path / "ro", lambda d: make_schema_2(d / "r.sqlite")) as d:
        s = ReviewStore(d / "r.sqlite")
        assert s.read_only
        assert list(s.verdicts("c", 1, 2)["unflagged"]) == [0, 0]
        assert list(s.history("c")["unflagged"]) == [0, 0, 0]
