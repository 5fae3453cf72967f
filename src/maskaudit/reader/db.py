"""The study's SQLite store: cases, readers, per-reader order, sessions and every answer ever given.

Durability: WAL journal, ``synchronous=FULL``, one connection per request and one transaction per
submission (``BEGIN IMMEDIATE`` … ``COMMIT`` before the response is sent), so an answer the reader saw
saved survives a killed server. Answers are upserted into ``answers`` (the current answer per reader,
case and class) and appended to ``history`` (every submission, never rewritten).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from maskaudit.errors import DiskError, disk_error, disk_message

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


#: primary SQLite result codes of a write the file system may have refused
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 3, 8, 10, 13, 14


def write_error(exc: sqlite3.Error, path: Path) -> DiskError | None:
    """The one-line :class:`~maskaudit.errors.DiskError` of a refused write of the database ``path``, else None.

    ``SQLITE_FULL`` is a full disk; ``SQLITE_READONLY``, ``SQLITE_CANTOPEN``, ``SQLITE_IOERR`` and ``SQLITE_PERM``
    count when the file system is read-only, the folder is not writable, or the disk is (nearly) full.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    if primary not in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN):
        return None
    path = Path(path)
    if primary == _SQLITE_FULL:
        return DiskError(disk_message(errno.ENOSPC, path, hint=_HINT), path, errno.ENOSPC)
    error = disk_error(RuntimeError(str(exc)), path, hint=_HINT)  # read-only, or nearly full
    if error is not None:
        return error
    if primary == _SQLITE_READONLY or not os.access(path.parent, os.W_OK):
        return DiskError(disk_message(errno.EACCES, path, hint=_HINT), path, errno.EACCES)
    return None


_HINT = "move the run directory to another disk"


@contextlib.contextmanager
def opened(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to ``path`` (see :func:`connect`), closed after the block; a write the file system refuses
    (full, read-only, not writable) raises a one-line :class:`~maskaudit.errors.DiskError` naming ``path``."""
    try:
        conn = connect(path)
    except sqlite3.Error as exc:
        raise (write_error(exc, path) or exc) from exc
    try:
        yield conn
    except sqlite3.Error as exc:
        error = write_error(exc, path)
        if error is None:
            raise
        raise error from exc
    finally:
        conn.close()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on any error, a failed ``COMMIT`` included): committed before
    the caller goes on. SQLite may already have rolled back (a full disk): the original error is what is raised."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def init(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)


# ------------------------------------------------------------------------------------------ CSV export

#: What a spreadsheet (Excel, LibreOffice, Google Sheets) reads as the start of a formula (OWASP, "CSV Injection"):
#: ``=``, ``+``, ``-``, ``@``, tab and carriage return, and the full-width ``＝ ＋ － ＠`` some of them also take.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
EXPORT_COLUMNS = ("reader", "case_id", "strategy", "image_id", "class", "answer", "confidence", "comment",
                  "updated_at")


def csv_cell(value: object) -> object:
    """A cell of the admin's CSV export: a text that begins like a formula gets a leading ``'`` (OWASP), so a
    spreadsheet shows it as text instead of running it; numbers and other text are written as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def answers_csv(conn: sqlite3.Connection) -> str:
    """Every current answer, one row per reader, case and class, as CSV text (:data:`EXPORT_COLUMNS`); every
    text cell through :func:`csv_cell` (a reader's comment is free text; image ids and strategies may come
    from a user's cases CSV)."""
    import csv
    import io

    rows = conn.execute(
        "SELECT r.name AS reader, a.case_id, c.strategy, c.image_id, a.class, a.answer, a.confidence, "
        "m.comment, a.updated_at FROM answers a JOIN readers r ON r.id = a.reader_id JOIN cases c "
        "ON c.id = a.case_id LEFT JOIN comments m ON m.reader_id = a.reader_id AND m.case_id = a.case_id "
        "ORDER BY r.name, a.case_id, a.class").fetchall()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(EXPORT_COLUMNS)
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return out.getvalue()
