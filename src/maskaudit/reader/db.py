"""The study's SQLite store: cases, readers, per-reader order, sessions and every answer ever given.

Durability: WAL journal, ``synchronous=FULL``, one connection per request and one transaction per
submission (``BEGIN IMMEDIATE`` … ``COMMIT`` before the response is sent), so an answer the reader saw
saved survives a killed server. Answers are upserted into ``answers`` (the current answer per reader,
case and class) and appended to ``history`` (every submission, never rewritten).
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY,
    strategy TEXT NOT NULL,
    image_id TEXT NOT NULL,
    path TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('gray', 'rgb')),
    labels TEXT NOT NULL,          -- JSON {class: 0/1/null}
    files TEXT NOT NULL,           -- JSON list of the selection's blinded files for this case
    UNIQUE (strategy, image_id)
);
CREATE TABLE IF NOT EXISTS readers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    reader_id INTEGER NOT NULL REFERENCES readers(id),
    position INTEGER NOT NULL,
    case_id INTEGER NOT NULL REFERENCES cases(id),
    opaque TEXT NOT NULL UNIQUE,
    PRIMARY KEY (reader_id, position),
    UNIQUE (reader_id, case_id)
);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    reader_id INTEGER REFERENCES readers(id),   -- NULL: the admin
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    reader_id INTEGER NOT NULL REFERENCES readers(id),
    case_id INTEGER NOT NULL REFERENCES cases(id),
    class TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('present', 'absent', 'cannot_tell')),
    confidence INTEGER CHECK (confidence BETWEEN 1 AND 5),
    updated_at TEXT NOT NULL,
    PRIMARY KEY (reader_id, case_id, class),
    FOREIGN KEY (reader_id, case_id) REFERENCES assignments(reader_id, case_id)
);
CREATE TABLE IF NOT EXISTS comments (
    reader_id INTEGER NOT NULL REFERENCES readers(id),
    case_id INTEGER NOT NULL REFERENCES cases(id),
    comment TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (reader_id, case_id),
    FOREIGN KEY (reader_id, case_id) REFERENCES assignments(reader_id, case_id)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reader_id INTEGER NOT NULL REFERENCES readers(id),
    case_id INTEGER NOT NULL REFERENCES cases(id),
    submission TEXT NOT NULL,      -- JSON of the whole submission, as saved
    at TEXT NOT NULL
);
"""

ANSWERS = ("present", "absent", "cannot_tell")
CONFIDENCE = (1, 5)
COMMENT_MAX = 2000


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def digest(secret: str) -> str:
    """What the database keeps of a token or session id: its SHA-256, never the secret itself."""
    return hashlib.sha256(secret.encode()).hexdigest()


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with WAL, full sync and foreign keys."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@contextlib.contextmanager
def opened(path: Path) -> Iterator[sqlite3.Connection]:
    conn = connect(path)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on any error): committed before the caller goes on."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def init(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
