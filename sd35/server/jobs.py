"""The durable job queue: every accepted job is a row in SQLite (WAL) before its client hears "accepted".

A job goes ``queued -> running -> done | failed | cancelled``. Its request is stored as the native wire
JSON (:class:`~sd35.server.schemas.native.JobCreate`, images inline) with the seed already drawn, so a job
run again after a crash makes the same images. Outputs are written whole under ``images/`` (temporary
file, fsync, rename) under names derived from the job id, and only then is the job marked done, with the
names, in one transaction: a crash before the commit leaves the job to run again and its files to be
rewritten under the same names, never a second copy. On open, jobs found ``running`` (their process died)
go back to ``queued``; a job that was running at three crashes in a row fails instead, so one poisonous
request cannot take the server down forever.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35.errors import Busy, Conflict, NotFound, SD35Error
from sd35.files import check_writable_folder

MAX_ATTEMPTS = 3
FINAL = ("done", "failed", "cancelled")
CANCELLED = {"type": "Cancelled", "message": "the job was cancelled.", "param": None}
IMAGE_NAME = re.compile(r"[0-9a-f]{1,64}-[0-9]{1,6}\.png")  # image_path's names (a longer name fails stat)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    api TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
"""


@dataclass
class Job:
    """One row of the job table, decoded."""

    id: str
    api: str
    model: str
    status: str
    request: dict[str, Any]
    attempts: int
    created: float
    started: float | None = None
    finished: float | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    idempotency_key: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        api=row["api"],
        model=row["model"],
        status=row["status"],
        request=json.loads(row["request"]),
        attempts=row["attempts"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        error=json.loads(row["error"]) if row["error"] else None,
        result=json.loads(row["result"]) if row["result"] else {},
        seq=row["seq"],
        idempotency_key=row["idempotency_key"],
    )


def error_record(e: BaseException) -> dict[str, Any]:
    """How a failure is stored: the error kind (the HTTP status follows from it), message and field."""
    if isinstance(e, SD35Error):
        return {"type": type(e).__name__, "message": e.message, "param": e.param}
    return {
        "type": "InternalError",
        "message": "the server failed to run this job (see its log).",
        "param": None,
    }


def lock_data_dir(data_dir: Path) -> object:
    """Hold ``data_dir`` for this process (two servers on one queue would run every job twice); the lock
    goes when the returned file is closed or the process ends, crashes included."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks through fcntl; one server per folder is on the user
        return None
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(data_dir) / "server.lock", "a")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SD35Error(
            f"another sd35 server is using {data_dir}; give each server its own data folder.",
            param="data_dir",
        ) from None
    return handle


class JobStore:
    """Jobs in ``data_dir/jobs.sqlite3`` and their images in ``data_dir/images/``. Thread-safe."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SD35Error(
                f"{self.data_dir}: cannot create the data folder ({e.strerror}).", param="data_dir"
            ) from None
        check_writable_folder(self.images_dir)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed job survives a power cut, not only a crash
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    # ------------------------------------------------------------------------------ admission

    def enqueue(
        self,
        api: str,
        model: str,
        request: dict[str, Any],
        limit: int,
        idempotency_key: str | None = None,
        seed_drawn: bool = False,
    ) -> tuple[Job, bool]:
        """Store a new queued job, or return the job already stored under ``idempotency_key``.

        Returns ``(job, created)``. Raises :class:`Busy` when ``limit`` jobs are already waiting or running,
        and :class:`Conflict` when the key was used for a different request. ``seed_drawn`` says the server
        drew ``request``'s seed (the client left it random): a retry then draws another, so the seeds are
        not compared. The count and the insert are one transaction, so concurrent admissions never
        overshoot the limit.
        """
        text = json.dumps(request, sort_keys=True)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if idempotency_key is not None:
                    row = self._db.execute(
                        "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                    ).fetchone()
                    if row is not None:
                        self._db.execute("COMMIT")
                        if seed_drawn:
                            stored_seed = json.loads(row["request"]).get("seed")
                            text = json.dumps({**request, "seed": stored_seed}, sort_keys=True)
                        if row["request"] != text or row["api"] != api or row["model"] != model:
                            raise Conflict(
                                "this Idempotency-Key was already used for a different request; "
                                "use a new key for a new request.",
                                param="Idempotency-Key",
                            )
                        return _job(row), False
                (waiting,) = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
                ).fetchone()
                if waiting >= limit:
                    raise Busy(f"the queue is full ({waiting} jobs waiting); try again shortly.")
                job_id = secrets.token_hex(12)
                self._db.execute(
                    "INSERT INTO jobs (id, idempotency_key, api, model, status, request, created) "
                    "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                    (job_id, idempotency_key, api, model, text, time.time()),
                )
                row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
                self._db.execute("COMMIT")
                return _job(row), True
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------------------ reading

    def get(self, job_id: str) -> Job:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for a limited time).", param="id")
        return _job(row)

    def recent(self, limit: int = 50) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def queued(self, limit: int = 64) -> list[Job]:
        """The oldest waiting jobs, first come first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [_job(r) for r in rows]

    def position(self, job: Job) -> int:
        """How many waiting jobs are ahead of a queued one."""
        row = self._one("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?", (job.seq,))
        return int(row[0]) if row else 0

    def waiting(self) -> int:
        row = self._one("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')")
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------------------ the worker's side

    def recover(self) -> list[str]:
        """After a crash: requeue jobs that were running, or fail those that have crashed too often, and
        delete the temporary files of images whose writing the crash cut short."""
        for leftover in self.images_dir.glob(".*.partial"):
            leftover.unlink(missing_ok=True)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, error = ? "
                "WHERE status = 'running' AND attempts >= ?",
                (
                    time.time(),
                    json.dumps(
                        {
                            "type": "InternalError",
                            "message": f"the server stopped {MAX_ATTEMPTS} times while running this job; "
                            "it is not tried again.",
                            "param": None,
                        }
                    ),
                    MAX_ATTEMPTS,
                ),
            )
            rows = self._db.execute("SELECT id FROM jobs WHERE status = 'running'").fetchall()
            self._db.execute("UPDATE jobs SET status = 'queued', started = NULL WHERE status = 'running'")
            self._db.execute("COMMIT")
        return [r["id"] for r in rows]

    def start(self, job_ids: Sequence[str]) -> list[str]:
        """Mark queued jobs running (one more attempt); returns those that were still queued."""
        started = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for job_id in job_ids:
                cur = self._db.execute(
                    "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1 "
                    "WHERE id = ? AND status = 'queued'",
                    (time.time(), job_id),
                )
                if cur.rowcount:
                    started.append(job_id)
            self._db.execute("COMMIT")
        return started

    def requeue(self, job_id: str) -> None:
        """Put a running job back in the queue (a clean shutdown stopped it); the attempt does not count."""
        self._write(
            "UPDATE jobs SET status = 'queued', started = NULL, attempts = attempts - 1 "
            "WHERE id = ? AND status = 'running'",
            (job_id,),
        )

    def image_path(self, job_id: str, index: int) -> Path:
        return self.images_dir / f"{job_id}-{index}.png"

    def image_file(self, name: str) -> Path:
        """The file of an output name as a job lists it; anything else (a path, ``..``) is not found."""
        path = self.images_dir / name
        if not IMAGE_NAME.fullmatch(name) or not path.is_file():
            raise NotFound(f"no image {name!r}.", param="name")
        return path

    def finish(self, job_id: str, result: dict[str, Any]) -> bool:
        """Record a running job as done with its (already written) images; False if it was not running."""
        cur = self._write(
            "UPDATE jobs SET status = 'done', finished = ?, result = ? WHERE id = ? AND status = 'running'",
            (time.time(), json.dumps(result), job_id),
        )
        return bool(cur.rowcount)

    def fail(self, job_id: str, error: dict[str, Any], status: str = "failed") -> bool:
        """Record a job as failed (or cancelled) unless it already ended."""
        cur = self._write(
            "UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ? AND status IN ('queued', 'running')",
            (status, time.time(), json.dumps(error), job_id),
        )
        return bool(cur.rowcount)

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it is running or over."""
        cur = self._write(
            "UPDATE jobs SET status = 'cancelled', finished = ?, error = ? WHERE id = ? AND status = 'queued'",
            (time.time(), json.dumps(CANCELLED), job_id),
        )
        return bool(cur.rowcount)

    def purge(self, older_than: float) -> int:
        """Delete finished jobs (and their images) that ended before ``older_than`` (a Unix time)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, result FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND finished < ?",
                (older_than,),
            ).fetchall()
            for row in rows:
                for name in json.loads(row["result"] or "{}").get("images", []):
                    (self.images_dir / name).unlink(missing_ok=True)
                self._db.execute("DELETE FROM jobs WHERE id = ?", (row["id"],))
        return len(rows)
