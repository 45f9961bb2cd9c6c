"""The SQLite review store: verdicts, history, exports, and no lost writes under concurrent processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from explorer.reviews import (
    UNREVIEWED,
    VERDICTS,
    ReviewError,
    ReviewStore,
    export_csv,
    export_json,
    merge_reviews,
)


def test_record_current_history(tmp_path: Path) -> None:
    s = ReviewStore(tmp_path / "r.sqlite")
    assert s.get(1, 2) is None and s.current().empty and s.history().empty
    s.record(1, 2, "needs-more-evidence", "ana", "first look", cache="c")
    s.record(1, 2, "confirmed", "ben", "same examples fire", cache="c")
    s.record(3, 4, "benign", "ana")
    cur = s.get(1, 2)
    assert cur["verdict"] == "confirmed" and cur["reviewer"] == "ben" and cur["n_changes"] == 2
    assert len(s.current()) == 2
    h = s.history(1, 2)
    assert list(h["verdict"]) == ["confirmed", "needs-more-evidence"]  # newest first, nothing overwritten
    assert list(h["note"]) == ["same examples fire", "first look"]
    assert s.count_history() == 3
    with sqlite3.connect(s.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopen_persists(tmp_path: Path) -> None:
    ReviewStore(tmp_path / "r.sqlite").record(5, 6, "benign", "cy", "ok")
    assert ReviewStore(tmp_path / "r.sqlite").get(5, 6)["note"] == "ok"


@pytest.mark.parametrize("verdict,reviewer", [("maybe", "ana"), ("benign", ""), ("benign", "   ")])
def test_invalid_verdicts(tmp_path: Path, verdict: str, reviewer: str) -> None:
    s = ReviewStore(tmp_path / "r.sqlite")
    with pytest.raises(ReviewError):
        s.record(1, 2, verdict, reviewer)
    assert s.count_history() == 0


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReviewError, match="--reviews"):
        ReviewStore(blocker / "sub" / "r.sqlite")


def test_merge_and_export(tmp_path: Path) -> None:
    ov = pd.DataFrame({"task_feature": [1, 3, 7], "harmful_feature": [2, 4, 8], "cosine": [0.5, 0.4, 0.3],
                       "risk": [0.3, 0.2, 0.1], "task_label": ["=cmd|' /C calc'!A0", "<b>x</b>", None]})
    s = ReviewStore(tmp_path / "r.sqlite")
    s.record(1, 2, "confirmed", "ana", 'note with "quotes", commas\nand a newline')
    s.record(3, 4, "benign", "ben")
    t = merge_reviews(ov, s.current())
    assert list(t["status"]) == ["confirmed", "benign", UNREVIEWED]
    assert t.loc[2, "reviewer"] == ""
    csv = export_csv(t).decode()
    back = pd.read_csv(__import__("io").StringIO(csv))
    assert len(back) == 3 and back.loc[0, "review_note"].startswith("note with")
    assert "'=cmd" in csv  # spreadsheet formula injection defused
    js = json.loads(export_json(t))
    assert js[0]["status"] == "confirmed" and js[2]["status"] == UNREVIEWED and js[2]["task_label"] is None


def _writer(path: str, proc: int, n: int) -> None:
    s = ReviewStore(path)
    for i in range(n):
        # each process owns 10 pairs and revisits them (updates) plus writes the full history
        s.record(proc * 1000 + i % 10, 1, VERDICTS[i % 3], f"reviewer-{proc}", f"p{proc}-i{i}")


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
    h = s.history()
    assert len(h) == 800
    assert set(h["note"]) == {f"p{p}-i{i}" for p in range(8) for i in range(100)}
    cur = s.current()
    assert len(cur) == 80 and (cur["n_changes"] == 10).all()
    # the current verdict of each pair is its last write
    for p in range(8):
        for k in range(10):
            assert s.get(p * 1000 + k, 1)["note"] == f"p{p}-i{90 + k}"
