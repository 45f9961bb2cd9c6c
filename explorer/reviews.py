"""Reviewer verdicts on flagged (task feature, harmful feature) pairs, kept in SQLite.

Why SQLite: embedded (no server), one file beside the cache, and safe for several Streamlit
processes or reviewers at once. WAL mode lets readers run while one writer commits; writers take
the lock up front (BEGIN IMMEDIATE) and wait up to `busy_timeout` instead of failing. Two tables:
`verdicts` holds the current verdict per pair, `verdict_history` is append-only, so every change
(who, what, when, note) is kept.

The store lives *beside* the cache directory by default (`<cache>.reviews.sqlite`), never inside
it: a precompute rerun swaps the whole cache directory, which would drop the reviews with it.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

VERDICTS = ("confirmed", "benign", "needs-more-evidence")
UNREVIEWED = "unreviewed"
SCHEMA = 1

_DDL = """
CREATE TABLE IF NOT EXISTS verdict_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_feature INTEGER NOT NULL,
    harmful_feature INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    cache TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS verdict_history_pair ON verdict_history (task_feature, harmful_feature);
CREATE TABLE IF NOT EXISTS verdicts (
    task_feature INTEGER NOT NULL,
    harmful_feature INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    cache TEXT,
    updated_at TEXT NOT NULL,
    history_id INTEGER NOT NULL,
    n_changes INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (task_feature, harmful_feature)
);
"""


class ReviewError(ValueError):
    """A verdict that cannot be stored (bad verdict, empty reviewer, unwritable database)."""


def _now() -> str:
    """UTC timestamp with milliseconds, ISO 8601 (sortable as text)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class ReviewStore:
    """Open (creating if needed) the verdict database at `path`."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 30000):
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                if con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA:
                    self._retry(lambda: self._create(con))
        except sqlite3.Error as exc:
            raise ReviewError(f"cannot open the review database {self.path} ({exc}); pass another path with "
                              "--reviews PATH (or FEATUREGEOM_REVIEWS)") from exc
        except OSError as exc:
            raise ReviewError(f"cannot create {self.path.parent} ({exc}); pass --reviews PATH") from exc

    @staticmethod
    def _create(con: sqlite3.Connection) -> None:
        con.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _DDL.strip().split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.execute(f"PRAGMA user_version = {SCHEMA}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # a connection per operation: Streamlit runs each session in its own thread
        con = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            con.execute("PRAGMA synchronous = NORMAL")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

    def _retry(self, fn: Any, attempts: int = 20) -> Any:
        """Run fn, retrying on 'database is locked' beyond busy_timeout (rare, e.g. WAL recovery)."""
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or i == attempts - 1:
                    raise
                time.sleep(0.05 * (i + 1))
        return None

    def record(self, task_feature: int, harmful_feature: int, verdict: str, reviewer: str, note: str = "",
               cache: str | None = None) -> dict[str, Any]:
        """Store a verdict: append to the history and make it the pair's current verdict."""
        if verdict not in VERDICTS:
            raise ReviewError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        reviewer = (reviewer or "").strip()
        if not reviewer:
            raise ReviewError("enter your name before recording a verdict")
        t, h = int(task_feature), int(harmful_feature)
        note = note or ""

        def write() -> dict[str, Any]:
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    ts = _now()
                    cur = con.execute(
                        "INSERT INTO verdict_history (task_feature, harmful_feature, verdict, reviewer, note, "
                        "cache, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", (t, h, verdict, reviewer, note, cache, ts))
                    hid = cur.lastrowid
                    con.execute(
                        "INSERT INTO verdicts (task_feature, harmful_feature, verdict, reviewer, note, cache, "
                        "updated_at, history_id, n_changes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1) "
                        "ON CONFLICT (task_feature, harmful_feature) DO UPDATE SET verdict = excluded.verdict, "
                        "reviewer = excluded.reviewer, note = excluded.note, cache = excluded.cache, "
                        "updated_at = excluded.updated_at, history_id = excluded.history_id, "
                        "n_changes = verdicts.n_changes + 1",
                        (t, h, verdict, reviewer, note, cache, ts, hid))
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            return {"task_feature": t, "harmful_feature": h, "verdict": verdict, "reviewer": reviewer,
                    "note": note, "cache": cache, "updated_at": ts, "history_id": hid}

        try:
            return self._retry(write)
        except sqlite3.Error as exc:
            raise ReviewError(f"could not save the verdict to {self.path} ({exc})") from exc

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> pd.DataFrame:
        def run() -> tuple[list[Any], list[str]]:
            with self._connect() as con:
                cur = con.execute(sql, params)
                return cur.fetchall(), [d[0] for d in cur.description]

        rows, cols = self._retry(run)
        return pd.DataFrame([tuple(r) for r in rows], columns=cols)

    def current(self) -> pd.DataFrame:
        """Current verdict per reviewed pair."""
        return self._query("SELECT task_feature, harmful_feature, verdict, reviewer, note, cache, updated_at, "
                           "n_changes FROM verdicts ORDER BY updated_at DESC")

    def get(self, task_feature: int, harmful_feature: int) -> dict[str, Any] | None:
        df = self._query("SELECT * FROM verdicts WHERE task_feature = ? AND harmful_feature = ?",
                         (int(task_feature), int(harmful_feature)))
        return None if df.empty else df.iloc[0].to_dict()

    def history(self, task_feature: int | None = None, harmful_feature: int | None = None) -> pd.DataFrame:
        """Every recorded change, newest first (of one pair when given)."""
        sql = "SELECT id, task_feature, harmful_feature, verdict, reviewer, note, cache, created_at FROM verdict_history"
        params: tuple[Any, ...] = ()
        if task_feature is not None and harmful_feature is not None:
            sql += " WHERE task_feature = ? AND harmful_feature = ?"
            params = (int(task_feature), int(harmful_feature))
        return self._query(sql + " ORDER BY id DESC", params)

    def count_history(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM verdict_history").fetchone()[0])


def merge_reviews(overlaps: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """Overlaps joined with the current verdicts; unreviewed pairs get status 'unreviewed'."""
    cur = current.rename(columns={"verdict": "status", "note": "review_note", "updated_at": "reviewed_at"})
    keep = ["task_feature", "harmful_feature", "status", "reviewer", "review_note", "reviewed_at"]
    cur = cur[[c for c in keep if c in cur]] if len(cur) else pd.DataFrame(columns=keep)
    cur = cur.astype({"task_feature": "int64", "harmful_feature": "int64"})
    out = overlaps.merge(cur, on=["task_feature", "harmful_feature"], how="left")
    out["status"] = out["status"].astype("string").fillna(UNREVIEWED)
    for c in ("reviewer", "review_note", "reviewed_at"):
        out[c] = out[c].astype("string").fillna("")
    return out


def export_csv(table: pd.DataFrame) -> bytes:
    """The reviewed table as UTF-8 CSV (spreadsheet-safe: cells starting with = + - @ are quoted)."""
    safe = table.copy()
    for c in safe.columns:
        if safe[c].dtype == object or str(safe[c].dtype).startswith("string") or str(safe[c].dtype) == "str":
            safe[c] = safe[c].map(lambda v: "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@") else v)
    buf = io.StringIO()
    safe.to_csv(buf, index=False)
    return buf.getvalue().encode("utf-8")


def export_json(table: pd.DataFrame) -> bytes:
    """The reviewed table as a JSON list of records (NaN -> null)."""
    recs = json.loads(table.to_json(orient="records", force_ascii=False))
    return json.dumps(recs, indent=2, ensure_ascii=False).encode("utf-8")
