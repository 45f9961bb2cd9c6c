"""Reviewer verdicts on flagged (task feature, harmful feature) pairs, kept in SQLite.

Why SQLite: embedded (no server), one file beside the cache, and safe for several Streamlit
processes or reviewers at once. WAL mode lets readers run while one writer commits; writers take
the lock up front (BEGIN IMMEDIATE) and wait up to `busy_timeout` instead of failing.

Two tables. `verdict_history` is append-only: every save (who, what, when, note) is kept.
`verdicts` holds each reviewer's latest verdict per pair (key: cache, task, harmful, reviewer), so
a second reviewer adds a verdict beside the first instead of replacing it; `summarize()` turns
them into one consensus per pair (single / agree / disagree).

Saves are optimistic: the page passes the pair's version (its newest history id) as it showed it,
and a save is refused with `StaleVerdictError` when anyone saved on that pair in between, so no
one records a verdict without having seen the others.

Pairs are undirected: a verdict on (a, b) is a verdict on (b, a) (a feature can be both task and
harmful, and an older cache could list the pair both ways). Rows are never rewritten to one order;
every read matches both orders and keeps each reviewer's newest verdict. A save stores the order the
page shows (the cache's flagged task/harmful order) and replaces the saving reviewer's own current
verdict in either order, so a reviewer keeps one current verdict per pair.

Schema 3 adds `unflagged` (0/1) to both tables: a verdict saved on a pair the cache does not flag,
which the reviewer opted in to review. Older readers ignore the column.

A database that cannot be written (read-only file, damaged pages) opens read-only with
`problem` set: verdicts that can still be read are shown, saving is refused with that message.

The store lives *beside* the cache directory by default (`<cache>.reviews.sqlite`), never inside
it: a precompute rerun swaps the whole cache directory, which would drop the reviews with it.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import pandas as pd

VERDICTS = ("confirmed", "benign", "needs-more-evidence")
UNREVIEWED = "unreviewed"
DISPUTED = "disputed"  # status of a pair whose reviewers disagree
STATUSES = (UNREVIEWED, *VERDICTS, DISPUTED)
CONSENSUS = ("single", "agree", "disagree")
SCHEMA = 3
MAX_REVIEWER = 80

T = TypeVar("T")

# Schema 1 (before per-reviewer verdicts) had the same history table and `verdicts` keyed by the
# pair alone; _migrate_v1 rebuilds `verdicts` from the history, so no row is lost.
_HISTORY_DDL = """
CREATE TABLE IF NOT EXISTS verdict_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_feature INTEGER NOT NULL,
    harmful_feature INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    cache TEXT,
    created_at TEXT NOT NULL
)"""
_VERDICTS_DDL = """
CREATE TABLE verdicts (
    cache TEXT NOT NULL DEFAULT '',
    task_feature INTEGER NOT NULL,
    harmful_feature INTEGER NOT NULL,
    reviewer TEXT NOT NULL COLLATE NOCASE,
    verdict TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    history_id INTEGER NOT NULL,
    n_changes INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (cache, task_feature, harmful_feature, reviewer)
)"""
_HISTORY_INDEX = (
    "CREATE INDEX IF NOT EXISTS verdict_history_by_pair "
    "ON verdict_history (cache, task_feature, harmful_feature, id)"
)
# each reviewer's latest history row per pair, with their number of saves (the migration's source)
_LATEST_FROM_HISTORY = """
SELECT cache, task_feature, harmful_feature, reviewer, verdict, note, created_at, id, n FROM (
    SELECT *, ROW_NUMBER() OVER by_reviewer_newest AS newest,
           COUNT(*) OVER (PARTITION BY cache, task_feature, harmful_feature, reviewer COLLATE NOCASE) AS n
    FROM verdict_history
    WINDOW by_reviewer_newest AS (PARTITION BY cache, task_feature, harmful_feature, reviewer COLLATE NOCASE
                                  ORDER BY id DESC))
WHERE newest = 1
"""
_VERDICT_COLS = (
    "cache, task_feature, harmful_feature, reviewer, verdict, note, updated_at, history_id, n_changes"
)
_HISTORY_COLS = "id, cache, task_feature, harmful_feature, reviewer, verdict, note, created_at"
# one pair in either order; params (t, h, h, t)
_EITHER_ORDER = "((task_feature = ? AND harmful_feature = ?) OR (task_feature = ? AND harmful_feature = ?))"


def _either(t: int, h: int) -> tuple[int, int, int, int]:
    return (int(t), int(h), int(h), int(t))


def _newest_per_reviewer(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (unordered pair, reviewer): the newest save; n_changes counts both orders' saves."""
    if df.empty:
        return df
    t, h = df["task_feature"].astype("int64"), df["harmful_feature"].astype("int64")
    key = pd.DataFrame({"a": t.where(t <= h, h), "b": t.where(t > h, h), "r": df["reviewer"].str.lower()})
    total = df.groupby([key["a"], key["b"], key["r"]])["n_changes"].transform("sum")
    out = df.assign(n_changes=total).sort_values("history_id", ascending=False, kind="mergesort")
    keep = ~key.loc[out.index].duplicated(keep="first")
    return out[keep.to_numpy()]


class ReviewError(ValueError):
    """A verdict that cannot be stored or read (bad verdict, empty reviewer, unusable database)."""


class StaleVerdictError(ReviewError):
    """The pair changed after the page showed it; `changes` are the history rows saved since."""

    def __init__(self, message: str, changes: pd.DataFrame):
        super().__init__(message)
        self.changes = changes


def _now() -> str:
    """UTC timestamp with milliseconds, ISO 8601 (sortable as text)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def clean_reviewer(name: str | None) -> str:
    """The reviewer's name as stored: whitespace collapsed; empty or overlong names are refused."""
    cleaned = re.sub(r"\s+", " ", name or "").strip()
    if not cleaned:
        raise ReviewError("enter your name before recording a verdict")
    if len(cleaned) > MAX_REVIEWER:
        raise ReviewError(f"a reviewer name has at most {MAX_REVIEWER} characters ({len(cleaned)} given)")
    return cleaned


def describe_changes(changes: pd.DataFrame) -> str:
    """'Ben: benign at 2026-…Z; …' (plain text, newest first) for a refusal message."""
    return "; ".join(f"{r.reviewer}: {r.verdict} at {r.created_at}" for r in changes.itertuples())


class ReviewStore:
    """Open (creating or migrating if needed) the verdict database at `path`.

    Raises ReviewError when nothing can be read (not a database, a directory, no permission); a
    database that can be read but not written opens with `read_only` set and `problem` saying why.
    """

    def __init__(self, path: str | Path, busy_timeout_ms: int = 30000):
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.read_only = False
        self.problem: str | None = None
        try:
            self._open_writable()
        except _Unwritable as why:
            self.read_only, self.problem = True, str(why)
            self._check_readable()
        except sqlite3.Error as exc:
            raise self._unusable(exc) from exc
        except OSError as exc:
            raise ReviewError(
                f"cannot create {self.path.parent} ({exc}); pass another place with --reviews PATH "
                "(or FEATUREGEOM_REVIEWS)"
            ) from exc
        # a read-only schema-2 file has no `unflagged` column: its verdicts all read as flagged
        self._uf = "unflagged" if self._has_unflagged() else "0 AS unflagged"

    # -- opening ------------------------------------------------------------------------------------
    def _unusable(self, exc: BaseException) -> ReviewError:
        return ReviewError(
            f"cannot open the review database {self.path} ({exc}); verdicts are unavailable. "
            "Move the file away (a new one is created) or pass another path with --reviews PATH "
            "(or FEATUREGEOM_REVIEWS)."
        )

    def _open_writable(self) -> None:
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise _Unwritable(
                f"The review database {self.path} is read-only: verdicts are shown, saving is off. "
                "Make it writable or pass another path with --reviews PATH."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            damage = _damage(con)
            if damage:
                raise _Unwritable(
                    f"The review database {self.path} is damaged ({damage}): the verdicts that can "
                    "still be read are shown, saving is off so nothing more is lost. Restore it from "
                    "a backup, or move it away to start a new one."
                )
            try:
                con.execute("PRAGMA journal_mode=WAL")
                if con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA:
                    self._retry(lambda: self._create_or_migrate(con))
            except sqlite3.OperationalError as exc:
                if "readonly" in str(exc) or "read-only" in str(exc):
                    raise _Unwritable(
                        f"The review database {self.path} cannot be written ({exc}): verdicts are "
                        "shown, saving is off."
                    ) from exc
                raise

    def _check_readable(self) -> None:
        """A read-only store must at least hold our tables; else it is unusable."""
        try:
            with self._connect() as con:
                names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            raise self._unusable(exc) from exc
        if not {"verdicts", "verdict_history"} <= names:
            raise self._unusable(RuntimeError("it holds no verdict tables"))

    def _has_unflagged(self) -> bool:
        try:
            with self._connect() as con:
                cols = {r[1] for r in con.execute("PRAGMA table_info(verdict_history)")}
                cols &= {r[1] for r in con.execute("PRAGMA table_info(verdicts)")}
        except sqlite3.Error:
            return False
        return "unflagged" in cols

    @staticmethod
    def _create_or_migrate(con: sqlite3.Connection) -> None:
        con.execute("BEGIN IMMEDIATE")
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version < SCHEMA:  # another process may have done it while we waited for the lock
                con.execute(_HISTORY_DDL)
                con.execute(
                    "UPDATE verdict_history SET cache = '' WHERE cache IS NULL"
                )  # schema 1 allowed NULL
                con.execute("DROP INDEX IF EXISTS verdict_history_pair")
                con.execute(_HISTORY_INDEX)
                if version < 2:
                    if "verdicts" in tables:
                        _migrate_v1(con)
                    else:
                        con.execute(_VERDICTS_DDL)
                _add_unflagged(con)  # schema 2 -> 3
                con.execute(f"PRAGMA user_version = {SCHEMA}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # a connection per operation: Streamlit runs each session in its own thread
        if self.read_only:  # never write to a damaged or read-only file, not even a checkpoint
            # On a read-only medium a WAL database cannot create its -shm file: open it as immutable
            # (no locks, no shared memory), true there since nobody can change it either.
            immutable = "&immutable=1" if not os.access(self.path.parent, os.W_OK) else ""
            con = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro{immutable}",
                uri=True,
                timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,
            )
        else:
            con = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            if not self.read_only:
                con.execute("PRAGMA synchronous = NORMAL")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

    def _retry(self, fn: Callable[[], T], attempts: int = 20) -> T:
        """Run fn, retrying on 'database is locked' beyond busy_timeout (rare, e.g. WAL recovery)."""
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or i == attempts - 1:
                    raise
                time.sleep(0.05 * (i + 1))
        raise AssertionError("unreachable")

    # -- writing ------------------------------------------------------------------------------------
    def record(
        self,
        task_feature: int,
        harmful_feature: int,
        verdict: str,
        reviewer: str,
        note: str = "",
        cache: str = "",
        expected_version: int | None = None,
        unflagged: bool = False,
    ) -> dict[str, Any]:
        """Store `reviewer`'s verdict on the pair (appended to the history; their previous one is kept there).

        expected_version: the pair's version (pair_version()) the reviewer saw; when anyone saved on
        the pair (in either order) since, nothing is written and StaleVerdictError lists those saves.
        unflagged: the cache does not flag the pair; the reviewer opted in to review it anyway.
        """
        if verdict not in VERDICTS:
            raise ReviewError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        reviewer = clean_reviewer(reviewer)
        if self.read_only:
            raise ReviewError(f"not saved: {self.problem}")
        t, h, note, cache = int(task_feature), int(harmful_feature), note or "", cache or ""

        def write() -> dict[str, Any]:
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    if expected_version is not None:
                        newer = con.execute(
                            f"SELECT {_HISTORY_COLS} FROM verdict_history WHERE cache = ? AND {_EITHER_ORDER} "
                            "AND id > ? ORDER BY id DESC",
                            (cache, *_either(t, h), int(expected_version)),
                        ).fetchall()
                        if newer:
                            changes = pd.DataFrame(
                                [tuple(r) for r in newer], columns=_HISTORY_COLS.split(", ")
                            )
                            raise StaleVerdictError(
                                f"Not saved: this pair changed after the page showed it ({describe_changes(changes)})."
                                " Read the verdicts above, then save again.",
                                changes,
                            )
                    ts = _now()
                    uf = int(bool(unflagged))
                    hid = con.execute(
                        "INSERT INTO verdict_history (task_feature, harmful_feature, verdict, reviewer, note, cache, "
                        "created_at, unflagged) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (t, h, verdict, reviewer, note, cache, ts, uf),
                    ).lastrowid
                    # this reviewer's current verdict in the other order is superseded by this save
                    # (its saves stay in the history and in n_changes)
                    earlier = 0
                    if t != h:
                        row = con.execute(
                            "DELETE FROM verdicts WHERE cache = ? AND task_feature = ? AND harmful_feature = ? "
                            "AND reviewer = ? RETURNING n_changes",
                            (cache, h, t, reviewer),
                        ).fetchone()
                        earlier = int(row[0]) if row else 0
                    con.execute(
                        f"INSERT INTO verdicts ({_VERDICT_COLS}, unflagged) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (cache, task_feature, harmful_feature, reviewer) DO UPDATE SET "
                        "reviewer = excluded.reviewer, verdict = excluded.verdict, note = excluded.note, "
                        "updated_at = excluded.updated_at, history_id = excluded.history_id, "
                        "n_changes = verdicts.n_changes + excluded.n_changes, unflagged = excluded.unflagged",
                        (cache, t, h, reviewer, verdict, note, ts, hid, 1 + earlier, uf),
                    )
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            return {
                "cache": cache,
                "task_feature": t,
                "harmful_feature": h,
                "reviewer": reviewer,
                "verdict": verdict,
                "note": note,
                "updated_at": ts,
                "history_id": hid,
                "unflagged": uf,
            }

        try:
            return self._retry(write)
        except sqlite3.Error as exc:
            hint = (
                " The file looks damaged: restore it from a backup or move it away."
                if isinstance(exc, sqlite3.DatabaseError) and "malformed" in str(exc)
                else ""
            )
            raise ReviewError(f"could not save the verdict to {self.path} ({exc}).{hint}") from exc

    # -- reading ------------------------------------------------------------------------------------
    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> pd.DataFrame:
        def run() -> tuple[list[Any], list[str]]:
            with self._connect() as con:
                cur = con.execute(sql, params)
                return cur.fetchall(), [d[0] for d in cur.description]

        try:
            rows, cols = self._retry(run)
        except sqlite3.Error as exc:
            raise ReviewError(
                f"cannot read the verdicts from {self.path} ({exc}). Restore the file from a backup "
                "or move it away to start a new one."
            ) from exc
        return pd.DataFrame([tuple(r) for r in rows], columns=cols)

    def verdicts(
        self, cache: str = "", task_feature: int | None = None, harmful_feature: int | None = None
    ) -> pd.DataFrame:
        """Each reviewer's latest verdict per unordered pair (of one pair, in either order, when given),
        newest first; a pair saved in both orders (older files) reads as one, in its newest save's order."""
        sql = f"SELECT {_VERDICT_COLS}, {self._uf} FROM verdicts WHERE cache = ?"
        params: tuple[Any, ...] = (cache or "",)
        if task_feature is not None and harmful_feature is not None:
            sql += f" AND {_EITHER_ORDER}"
            params += _either(task_feature, harmful_feature)
        df = self._query(sql + " ORDER BY updated_at DESC, history_id DESC", params)
        return _newest_per_reviewer(df).reset_index(drop=True)

    def get(
        self, task_feature: int, harmful_feature: int, reviewer: str, cache: str = ""
    ) -> dict[str, Any] | None:
        """`reviewer`'s current verdict on the pair in either order (their name in any case), or None."""
        df = self._query(
            f"SELECT {_VERDICT_COLS}, {self._uf} FROM verdicts WHERE cache = ? AND {_EITHER_ORDER} "
            "AND reviewer = ? ORDER BY history_id DESC",
            (cache or "", *_either(task_feature, harmful_feature), re.sub(r"\s+", " ", reviewer).strip()),
        )
        df = _newest_per_reviewer(df)
        return None if df.empty else cast(dict[str, Any], df.iloc[0].to_dict())  # the columns are str

    def pair_version(self, task_feature: int, harmful_feature: int, cache: str = "") -> int:
        """The newest history id of the pair (0 before its first verdict): what a save must have seen."""
        df = self._query(
            f"SELECT COALESCE(MAX(id), 0) AS v FROM verdict_history WHERE cache = ? AND {_EITHER_ORDER}",
            (cache or "", *_either(task_feature, harmful_feature)),
        )
        return int(df["v"].to_numpy()[0])

    def history(
        self, cache: str | None = "", task_feature: int | None = None, harmful_feature: int | None = None
    ) -> pd.DataFrame:
        """Every recorded save, newest first (of one cache; cache=None: all; of one pair, in either order,
        when given)."""
        sql = f"SELECT {_HISTORY_COLS}, {self._uf} FROM verdict_history"
        where: list[str] = []
        params: tuple[Any, ...] = ()
        if cache is not None:
            where.append("cache = ?")
            params += (cache,)
        if task_feature is not None and harmful_feature is not None:
            where.append(_EITHER_ORDER)
            params += _either(task_feature, harmful_feature)
        return self._query(
            sql + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC", params
        )

    def count_history(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM verdict_history")["n"].to_numpy()[0])


class _Unwritable(Exception):
    """The database can (perhaps) be read but must not be written."""


def _damage(con: sqlite3.Connection) -> str | None:
    """What `PRAGMA quick_check` finds wrong (None when fine); 'not a database' propagates as unusable."""
    try:
        rows = [r[0] for r in con.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise
        return str(exc)
    return None if rows == ["ok"] else "; ".join(map(str, rows))[:300]


def _migrate_v1(con: sqlite3.Connection) -> None:
    """Schema 1 -> 2 inside the caller's transaction: one verdict per reviewer, rebuilt from the history
    (schema 1 kept only the pair's last verdict; the others were only in the history)."""
    con.execute("ALTER TABLE verdicts RENAME TO verdicts_v1")
    con.execute(_VERDICTS_DDL)
    con.execute(f"INSERT INTO verdicts ({_VERDICT_COLS}) {_LATEST_FROM_HISTORY}")
    # a current verdict without a history row (written by hand) is kept too
    con.execute(
        f"INSERT OR IGNORE INTO verdicts ({_VERDICT_COLS}) SELECT COALESCE(cache, ''), task_feature, "
        "harmful_feature, reviewer, verdict, note, updated_at, history_id, n_changes FROM verdicts_v1"
    )
    con.execute("DROP TABLE verdicts_v1")


def _add_unflagged(con: sqlite3.Connection) -> None:
    """Schema 2 -> 3 inside the caller's transaction: an `unflagged` flag (0 for every existing row)."""
    for table in ("verdict_history", "verdicts"):
        cols = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
        if "unflagged" not in cols:
            con.execute(f"ALTER TABLE {table} ADD COLUMN unflagged INTEGER NOT NULL DEFAULT 0")
