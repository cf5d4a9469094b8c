"""The two databases a :class:`~sd35.server.jobs.JobStore` keeps its jobs in, behind one small interface.

SQLite (WAL) is the embedded default: one file in the data folder, shared by the processes of one machine.
PostgreSQL (``postgresql://...``, through psycopg 3) is for a cluster: servers on several machines see one
queue. The store writes its SQL once, with ``?`` placeholders; a backend runs it in its own dialect and
supplies the few parts that differ: the table's types, how a transaction takes the write lock, and the row
lock that makes a claim skip rows another worker is claiming (``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from sd35.errors import SD35Error

COLUMNS = """
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    api TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created {real} NOT NULL,
    started {real},
    finished {real},
    error TEXT,
    result TEXT,
    worker TEXT,
    lease {real},
    front {real}
"""
# worker: the server running the job (or, while queued, the one whose synchronous request waits for it);
# lease: the Unix time until which that server vouches for it (renewed while it lives);
# front: set (to the job's seq) for a job queued at the front (ComfyUI's ``front``): see QUEUE_ORDER.
ADDED_COLUMNS = (("worker", "TEXT"), ("lease", "REAL"), ("front", "REAL"))
"""Columns later than the first job table, added to a database made before them."""
QUEUE_ORDER = "(front IS NULL), front DESC, seq"
"""The order queued jobs run in: those queued at the front first, the latest of them first (as ComfyUI's
queue), then the rest first come first served."""
COLUMN_TYPES = {"worker": "TEXT", "lease": "DOUBLE PRECISION", "front": "DOUBLE PRECISION"}  # PostgreSQL's
ADMISSION_LOCK = 0x5D35  # PostgreSQL advisory lock id that serializes admissions (count + insert)


class Database(Protocol):
    """What the store needs of a database: statements, transactions, and the claim's row lock."""

    skip_locked: str  # appended to a SELECT that picks rows to claim

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any: ...

    def transaction(self, serialized: bool = False) -> Any: ...

    def close(self) -> None: ...


class SQLiteDatabase:
    """``jobs.sqlite3`` in WAL mode; a transaction is ``BEGIN IMMEDIATE`` (the whole file's write lock,
    across processes), so every transaction is serialized and claims need no row lock."""

    skip_locked = ""

    def __init__(self, path: Path):
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed job survives a power cut, not only a crash
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            + COLUMNS.format(real="REAL")
            + ");\nCREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);"
        )
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, kind in ADDED_COLUMNS:  # a database made before these columns existed
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    @contextmanager
    def transaction(self, serialized: bool = False) -> Iterator[SQLiteDatabase]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Cursor:
    """A psycopg cursor whose rows were fetched at once (so the connection is free for the next one)."""

    def __init__(self, cursor):
        self.rowcount = cursor.rowcount
        self._rows = cursor.fetchall() if cursor.description else []

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self):
        return self._rows


class PostgresDatabase:
    """A PostgreSQL database (``postgresql://user:pass@host/db``). Statements run in autocommit unless in
    :meth:`transaction`; admissions are serialized by an advisory lock (so the queue limit holds across
    servers), and claims lock the rows they take with ``FOR UPDATE SKIP LOCKED``."""

    skip_locked = " FOR UPDATE SKIP LOCKED"
    _closing = False

    def __init__(self, url: str):
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise SD35Error(
                "a PostgreSQL job store needs psycopg 3: pip install 'psycopg[binary]'.", param="jobs_db"
            ) from None
        self._lock = threading.RLock()
        self._connect = lambda: psycopg.connect(
            url, autocommit=True, row_factory=dict_row, connect_timeout=10
        )
        try:
            self._db = self._connect()
        except psycopg.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SD35Error(
                f"cannot connect to the job database {_redact(url)} ({first}); check --jobs-db.",
                param="jobs_db",
            ) from None
        with self.transaction(serialized=True):  # two servers starting together create the table once
            self.execute(
                "CREATE TABLE IF NOT EXISTS jobs (seq BIGSERIAL PRIMARY KEY,"
                + COLUMNS.format(real="DOUBLE PRECISION")
                + ")"
            )
            for name, _ in ADDED_COLUMNS:  # a database made before these columns existed
                self.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {name} {COLUMN_TYPES[name]}")
            self.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq)")

    def _live(self):
        """The connection, made again if the last one broke (the database restarted, a network blip): the
        statement that found it broken failed, the next one works."""
        if self._db.broken or self._db.closed and not self._closing:
            self._db = self._connect()
        return self._db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> _Cursor:
        with self._lock:
            return _Cursor(self._live().execute(sql.replace("?", "%s"), tuple(args)))

    @contextmanager
    def transaction(self, serialized: bool = False) -> Iterator[PostgresDatabase]:
        with self._lock, self._live().transaction():
            if serialized:
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (ADMISSION_LOCK,))
            yield self

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._db.close()


def _redact(url: str) -> str:
    """The URL without its password (it goes into messages and logs)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not (sep and at):
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def is_postgres(url: str | None) -> bool:
    return bool(url) and url.startswith(("postgresql://", "postgres://"))


def open_database(data_dir: Path, url: str | None = None) -> Database:
    """The jobs database: ``url`` (a PostgreSQL URL) when given, else ``data_dir/jobs.sqlite3``."""
    if url is None:
        return SQLiteDatabase(Path(data_dir) / "jobs.sqlite3")
    if not is_postgres(url):
        raise SD35Error(
            f"--jobs-db takes a PostgreSQL URL (postgresql://user:password@host:port/database), got "
            f"{_redact(url)!r}; leave it out for the SQLite database in the data folder.",
            param="jobs_db",
        )
    return PostgresDatabase(url)
