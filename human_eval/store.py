"""The annotation store: every human answer, committed the moment it is given, in one SQLite file.

`<workspace>/human/annotations.sqlite` (WAL mode, so two annotators can label at once and a reader never
blocks a writer) holds
  annotators   one row per annotator id, with when it was first seen
  sessions     one row per labelling session (annotator, hard set, ui, start, clean end or NULL)
  plans        per (hard set, annotator): whether the session asks for a considered answer (`--think`)
               and how many control images were mixed in
  items        per (hard set, annotator): the shuffled item order, fixed once, so a resumed session shows
               the same sequence and starts at the first unanswered item
  answers      append-only: hard set, test index, annotator, phase (quick / considered), answer (0-9 or
               NULL = cannot tell), reason, shown_at and answered_at (Unix seconds), is_control, the
               session it came from and, for imports, an origin key that makes re-importing a no-op
  corrections  undo never deletes an answer; it adds a row here that retires it
  crowd_items  the opaque id under which an item was exported to a crowd tool (Label Studio), so the tool
               never shows the test index (which looks up the label) or the hard set's name
The final answer of an annotator for an item and phase is the latest answer without a correction;
`load_answers` returns exactly those rows, the one table every analysis reads.

Durability: each answer is its own transaction (autocommit). With WAL and synchronous=NORMAL a committed
answer survives the process being killed (Ctrl-C, kill -9); only an operating-system crash or power loss
could lose the last few, which is the usual WAL trade for not fsyncing on every key press.
"""

from __future__ import annotations

import math
import secrets
import sqlite3
import time
from pathlib import Path

import pandas as pd

from benchmark.errors import BenchError

PHASES = ("quick", "considered")
ANSWER_COLUMNS = ["hardset", "test_index", "annotator", "phase", "answer", "reason", "seconds", "is_control"]
BUSY_TIMEOUT_MS = 10_000  # a second annotator's commit holds the write lock for milliseconds; wait, never fail

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
    id          TEXT PRIMARY KEY,
    first_seen  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id          INTEGER PRIMARY KEY,
    annotator   TEXT NOT NULL REFERENCES annotators(id),
    hardset     TEXT NOT NULL,
    ui          TEXT NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL
);
CREATE TABLE IF NOT EXISTS plans (
    hardset     TEXT NOT NULL,
    annotator   TEXT NOT NULL REFERENCES annotators(id),
    think       INTEGER NOT NULL,
    controls    INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (hardset, annotator)
);
CREATE TABLE IF NOT EXISTS items (
    hardset     TEXT NOT NULL,
    annotator   TEXT NOT NULL,
    position    INTEGER NOT NULL,
    test_index  INTEGER NOT NULL,
    is_control  INTEGER NOT NULL,
    PRIMARY KEY (hardset, annotator, position),
    UNIQUE (hardset, annotator, test_index),
    FOREIGN KEY (hardset, annotator) REFERENCES plans(hardset, annotator)
);
CREATE TABLE IF NOT EXISTS answers (
    id          INTEGER PRIMARY KEY,
    hardset     TEXT NOT NULL,
    test_index  INTEGER NOT NULL,
    annotator   TEXT NOT NULL REFERENCES annotators(id),
    phase       TEXT NOT NULL CHECK (phase IN ('quick', 'considered')),
    answer      INTEGER CHECK (answer BETWEEN 0 AND 9),
    reason      TEXT NOT NULL DEFAULT '',
    shown_at    REAL,
    answered_at REAL NOT NULL,
    is_control  INTEGER NOT NULL,
    session_id  INTEGER REFERENCES sessions(id),
    origin      TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS answers_by_item ON answers (hardset, annotator, test_index, phase);
CREATE TABLE IF NOT EXISTS crowd_items (
    item        TEXT PRIMARY KEY,
    hardset     TEXT NOT NULL,
    test_index  INTEGER NOT NULL,
    UNIQUE (hardset, test_index)
);
CREATE TABLE IF NOT EXISTS corrections (
    id          INTEGER PRIMARY KEY,
    answer_id   INTEGER NOT NULL UNIQUE REFERENCES answers(id),
    session_id  INTEGER REFERENCES sessions(id),
    made_at     REAL NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'undo'
);
"""

# The final answers: per (hard set, annotator, test index, phase) the latest answer no correction retired.
# "Latest" is the insertion order (the id), which is the order in which the answers were given.
FINAL_ANSWERS_SQL = """
SELECT a.id, a.hardset, a.test_index, a.annotator, a.phase, a.answer, a.reason,
       a.answered_at - a.shown_at AS seconds, a.is_control, a.shown_at, a.answered_at
FROM answers a
WHERE a.id IN (SELECT MAX(b.id) FROM answers b
               WHERE NOT EXISTS (SELECT 1 FROM corrections c WHERE c.answer_id = b.id)
               GROUP BY b.hardset, b.annotator, b.test_index, b.phase)
"""


def default_db_path(workspace: Path) -> Path:
    return Path(workspace) / "human" / "annotations.sqlite"


def connect(db_path: Path) -> sqlite3.Connection:
    """An autocommit connection in WAL mode that waits for, rather than fails on, a concurrent writer.
    BenchError if `db_path` is a folder or a file that is not an SQLite database (it is left as it is)."""
    if Path(db_path).is_dir():
        raise BenchError(f"the annotation store {db_path} cannot be opened (it is a folder): move it aside, or give "
                         f"another --workspace")
    try:
        conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:  # not SQLite, or unreadable; OperationalError is one too
        raise BenchError(f"the annotation store {db_path} cannot be opened ({exc}): move it aside, or give another "
                         f"--workspace") from None
    return conn


class AnnotationStore:
    """Read and append annotations. Every write method commits before it returns."""

    def __init__(self, db_path: Path):
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = connect(self.path)
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "AnnotationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_annotator(self, annotator: str) -> None:
        self.conn.execute("INSERT OR IGNORE INTO annotators (id, first_seen) VALUES (?, ?)", (annotator, time.time()))

    def add_answer(self, hardset: str, test_index: int, annotator: str, phase: str, answer: int | None,
                   reason: str = "", shown_at: float | None = None, answered_at: float | None = None,
                   is_control: bool = False, *, session_id: int | None = None, origin: str | None = None) -> int:
        """Append one answer and commit it; returns its id.

        answer: 0-9, or None for "cannot tell". phase: "quick" or "considered". shown_at / answered_at: Unix
        seconds when the item was shown and answered (shown_at may be NaN when unknown, e.g. an import
        without a lead time). origin: a unique key for imported answers (re-importing skips them).
        """
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}: expected one of {PHASES}")
        if answer is not None and not (isinstance(answer, int) and 0 <= answer <= 9):
            raise ValueError(f"answer {answer!r}: expected a digit 0-9 or None (cannot tell)")
        if shown_at is None or answered_at is None:
            raise ValueError("shown_at and answered_at (Unix seconds) are both required")
        shown = None if math.isnan(shown_at) else float(shown_at)
        with self.conn:  # one transaction: the annotator row and the answer land together
            self.conn.execute("BEGIN")
            self._ensure_annotator(annotator)
            cursor = self.conn.execute(
                "INSERT INTO answers (hardset, test_index, annotator, phase, answer, reason, shown_at, answered_at,"
                " is_control, session_id, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (hardset, int(test_index), annotator, phase, answer, reason, shown, float(answered_at),
                 int(bool(is_control)), session_id, origin))
        return cursor.lastrowid

    def retire(self, answer_id: int, session_id: int | None = None, kind: str = "undo") -> None:
        """Record a correction that retires answer `answer_id` (the answer itself stays in the table)."""
        self.conn.execute("INSERT INTO corrections (answer_id, session_id, made_at, kind) VALUES (?, ?, ?, ?)",
                          (answer_id, session_id, time.time(), kind))

    def final_answers(self, hardset: str, annotator: str) -> dict[tuple[int, str], tuple[int, int | None]]:
        """The live answers of one annotator on one hard set: {(test_index, phase): (answer id, answer)}."""
        rows = self.conn.execute(FINAL_ANSWERS_SQL + " AND a.hardset = ? AND a.annotator = ?", (hardset, annotator))
        return {(r[2], r[4]): (r[0], r[5]) for r in rows}

    def origins(self) -> set[str]:
        """The origin keys of imported answers already in the store."""
        return {r[0] for r in self.conn.execute("SELECT origin FROM answers WHERE origin IS NOT NULL")}

    def crowd_items(self, hardset: str, test_indices: list[int]) -> list[str]:
        """The opaque id (random hex) of each item of `hardset`, made on its first export and kept after, so an
        item exported twice is the same task."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            known = dict(self.conn.execute("SELECT test_index, item FROM crowd_items WHERE hardset = ?", (hardset,)))
            new = {int(t): secrets.token_hex(8) for t in test_indices if int(t) not in known}
            self.conn.executemany("INSERT INTO crowd_items (item, hardset, test_index) VALUES (?, ?, ?)",
                                  [(item, hardset, t) for t, item in new.items()])
        ids = {**known, **new}
        return [ids[int(t)] for t in test_indices]

    def crowd_item(self, item: str) -> tuple[str, int] | None:
        """(hard set, test index) of an exported item's opaque id, or None if this store never exported it."""
        row = self.conn.execute("SELECT hardset, test_index FROM crowd_items WHERE item = ?", (item,)).fetchone()
        return None if row is None else (row[0], int(row[1]))

    # Sessions and plans ------------------------------------------------------------------------------------

    def start_session(self, annotator: str, hardset: str, ui: str) -> int:
        with self.conn:
            self.conn.execute("BEGIN")
            self._ensure_annotator(annotator)
            cursor = self.conn.execute("INSERT INTO sessions (annotator, hardset, ui, started_at) VALUES (?, ?, ?, ?)",
                                       (annotator, hardset, ui, time.time()))
        return cursor.lastrowid

    def end_session(self, session_id: int) -> None:
        self.conn.execute("UPDATE sessions SET ended_at = ? WHERE id = ?", (time.time(), session_id))

    def plan(self, hardset: str, annotator: str) -> tuple[bool, int, list[tuple[int, bool]]] | None:
        """(think, control count, [(test_index, is_control)] in showing order), or None if never started."""
        row = self.conn.execute("SELECT think, controls FROM plans WHERE hardset = ? AND annotator = ?",
                                (hardset, annotator)).fetchone()
        if row is None:
            return None
        items = self.conn.execute("SELECT test_index, is_control FROM items WHERE hardset = ? AND annotator = ? "
                                  "ORDER BY position", (hardset, annotator)).fetchall()
        return bool(row[0]), int(row[1]), [(int(t), bool(c)) for t, c in items]

    def create_plan(self, hardset: str, annotator: str, think: bool, controls: int,
                    items: list[tuple[int, bool]]) -> tuple[bool, int, list[tuple[int, bool]]]:
        """Fix the item order for (hard set, annotator) unless another process just did; returns the plan."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")  # take the write lock first: two racing starts make one plan
            if self.conn.execute("SELECT 1 FROM plans WHERE hardset = ? AND annotator = ?",
                                 (hardset, annotator)).fetchone() is None:
                self._ensure_annotator(annotator)
                self.conn.execute("INSERT INTO plans (hardset, annotator, think, controls, created_at) "
                                  "VALUES (?, ?, ?, ?, ?)", (hardset, annotator, int(think), controls, time.time()))
                self.conn.executemany(
                    "INSERT INTO items (hardset, annotator, position, test_index, is_control) VALUES (?, ?, ?, ?, ?)",
                    [(hardset, annotator, pos, int(t), int(c)) for pos, (t, c) in enumerate(items)])
        return self.plan(hardset, annotator)

    def plans(self) -> pd.DataFrame:
        """All plans with their item counts: hardset, annotator, think, controls, items."""
        return pd.read_sql_query(
            "SELECT p.hardset, p.annotator, p.think, p.controls, COUNT(i.position) AS items FROM plans p "
            "LEFT JOIN items i ON i.hardset = p.hardset AND i.annotator = p.annotator "
            "GROUP BY p.hardset, p.annotator ORDER BY p.hardset, p.annotator", self.conn)


def load_answers(db_path: Path) -> pd.DataFrame:
    """One row per final answer (latest uncorrected per hard set, annotator, test index and phase).

    Columns: hardset (str), test_index (int), annotator (str), phase ("quick" / "considered"),
    answer (Int64: 0-9, <NA> = cannot tell), reason (str), seconds (float: answered_at - shown_at),
    is_control (bool). Rows in the order the answers were given. Empty (same columns) if there are none.
    """
    db_path = Path(db_path)
    if not db_path.exists():
        frame = pd.DataFrame({col: [] for col in ANSWER_COLUMNS})
    else:
        conn = connect(db_path)
        try:
            conn.executescript(SCHEMA)  # an empty or older file still reads as "no answers"
            frame = pd.read_sql_query(FINAL_ANSWERS_SQL + " ORDER BY a.id", conn)[ANSWER_COLUMNS]
        finally:
            conn.close()
    return frame.astype({"hardset": str, "test_index": "int64", "annotator": str, "phase": str, "answer": "Int64",
                         "reason": str, "seconds": "float64", "is_control": bool}).reset_index(drop=True)
