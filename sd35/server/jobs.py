"""The durable job queue: every accepted job is a database row before its client hears "accepted".

A job goes ``queued -> running -> done | failed | cancelled``. Its request is stored as the native wire
JSON (:class:`~sd35.server.schemas.native.JobCreate`, images inline) with the seed already drawn, so a job
run again after a crash makes the same images. Outputs are written whole under ``images/`` (temporary
file, fsync, rename) under names derived from the job id, and only then is the job marked done, with the
names, in one transaction: a crash before the commit leaves the job to run again and its files to be
rewritten under the same names, never a second copy.

The database is SQLite (WAL) in the data folder, or PostgreSQL for servers on several machines
(:mod:`sd35.server.job_db`). A running job belongs to one worker (a server's id) until a lease time that
the worker renews while it lives. The only server on a queue requeues every ``running`` job when it
starts (:meth:`JobStore.recover`: their process died); servers that share a queue requeue only jobs whose
lease ran out (:meth:`JobStore.reap`), since the others are being run. Either way a job that was running
at three crashes fails instead, so one poisonous request cannot take the servers down forever.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35.errors import Busy, Conflict, NotFound, SD35Error
from sd35.files import check_writable_folder
from sd35.server.job_db import QUEUE_ORDER, Database, open_database

MAX_ATTEMPTS = 3
FINAL = ("done", "failed", "cancelled")
CANCELLED = {"type": "Cancelled", "message": "the job was cancelled.", "param": None}
LEASE_S = 30.0  # how long a server vouches for a job it runs (renewed every third of it while it lives)
CRASHED = {
    "type": "InternalError",
    "message": f"the server stopped {MAX_ATTEMPTS} times while running this job; it is not tried again.",
    "param": None,
}
IMAGE_NAME = re.compile(r"[0-9a-f]{1,64}-[0-9]{1,6}\.png")  # image_path's names (a longer name fails stat)


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
    worker: str | None = None
    lease: float | None = None
    front: bool = False

    @property
    def is_final(self) -> bool:
        return self.status in FINAL


def _job(row: Any) -> Job:
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
        worker=row["worker"],
        lease=row["lease"],
        front=row["front"] is not None,
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
    """Jobs in a database (``data_dir/jobs.sqlite3``, or PostgreSQL at ``db_url``) and their images in
    ``data_dir/images/``. Thread-safe, and safe for several servers on one database (see :meth:`start`
    and :meth:`reap`)."""

    def __init__(self, data_dir: Path, db_url: str | None = None):
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SD35Error(
                f"{self.data_dir}: cannot create the data folder ({e.strerror}).", param="data_dir"
            ) from None
        check_writable_folder(self.images_dir)
        self._db = open_database(self.data_dir, db_url)

    def close(self) -> None:
        self._db.close()

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
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
        worker: str | None = None,
        job_id: str | None = None,
        front: bool = False,
    ) -> tuple[Job, bool]:
        """Store a new queued job, or return the job already stored under ``idempotency_key``.

        Returns ``(job, created)``. Raises :class:`Busy` when ``limit`` jobs are already waiting or running,
        and :class:`Conflict` when the key was used for a different request. ``seed_drawn`` says the server
        drew ``request``'s seed (the client left it random): a retry then draws another, so the seeds are
        not compared. ``job_id`` is the client's own id for the job (ComfyUI's ``prompt_id``; Conflict if
        taken), else one is drawn. ``worker`` reserves the job for that server (a synchronous request runs where its
        client waits; :meth:`reap` frees it if that server dies). The count and the insert are one
        serialized transaction, so concurrent admissions never overshoot the limit, from any server.
        ``front``: the job goes before every waiting job (ComfyUI's ``front``; :data:`QUEUE_ORDER`).
        """
        text = json.dumps(request, sort_keys=True)
        with self._db.transaction(serialized=True) as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
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
            waiting = db.execute(
                "SELECT COUNT(*) AS n FROM jobs WHERE status IN ('queued', 'running')"
            ).fetchone()["n"]
            if waiting >= limit:
                raise Busy(f"the queue is full ({waiting} jobs waiting); try again shortly.")
            if job_id is not None and db.execute("SELECT id FROM jobs WHERE id = ?", (job_id,)).fetchone():
                raise Conflict(
                    f"the id {job_id!r} is taken by another job; use a new one.", param="prompt_id"
                )
            job_id = job_id or secrets.token_hex(12)
            now = time.time()
            db.execute(
                "INSERT INTO jobs (id, idempotency_key, api, model, status, request, created, worker, lease) "
                "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, idempotency_key, api, model, text, now, worker, now + LEASE_S if worker else None),
            )
            if front:
                db.execute("UPDATE jobs SET front = seq WHERE id = ?", (job_id,))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _job(row), True

    # ------------------------------------------------------------------------------ reading

    def get(self, job_id: str) -> Job:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for a limited time).", param="id")
        return _job(row)

    def recent(self, limit: int = 50) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def queued(self, limit: int = 64, worker: str | None = None) -> list[Job]:
        """The waiting jobs in the order they run (:data:`QUEUE_ORDER`: first come first, those queued at
        the front before them); with ``worker``, only those it may take (free ones and those reserved for
        it)."""
        mine = " AND (worker IS NULL OR worker = ?)" if worker is not None else ""
        args = (worker, limit) if worker is not None else (limit,)
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE status = 'queued'{mine} ORDER BY {QUEUE_ORDER} LIMIT ?", args
        ).fetchall()
        return [_job(r) for r in rows]

    def position(self, job: Job) -> int:
        """How many waiting jobs are ahead of a queued one (:data:`QUEUE_ORDER`)."""
        if job.front:
            ahead, args = "front > ?", (job.seq,)
        else:
            ahead, args = "(front IS NOT NULL OR seq < ?)", (job.seq,)
        row = self._one(f"SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued' AND {ahead}", args)
        return int(row["n"]) if row else 0

    def waiting(self) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM jobs WHERE status IN ('queued', 'running')")
        return int(row["n"]) if row else 0

    def of_api(
        self, api: str, statuses: Sequence[str], limit: int = 10_000, queue_order: bool = False
    ) -> list[Job]:
        """The jobs of one API in these statuses, oldest first, or (``queue_order``) in the order they run
        (:data:`QUEUE_ORDER`): ComfyUI's queue and history lists."""
        marks = ", ".join("?" for _ in statuses)
        order = QUEUE_ORDER if queue_order else "seq"
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE api = ? AND status IN ({marks}) ORDER BY {order} LIMIT ?",
            (api, *statuses, limit),
        ).fetchall()
        return [_job(r) for r in rows]

    def forget(self, api: str, job_ids: Sequence[str] | None = None) -> int:
        """Delete ended jobs of one API (these, or all): ComfyUI's history delete and clear. Their
        images stay (ComfyUI's history does not own its output files)."""
        condition, args = "", ()
        if job_ids is not None:
            if not job_ids:
                return 0
            condition = f" AND id IN ({', '.join('?' for _ in job_ids)})"
            args = tuple(job_ids)
        cur = self._db.execute(
            f"DELETE FROM jobs WHERE api = ? AND status IN ('done', 'failed', 'cancelled'){condition}",
            (api, *args),
        )
        return cur.rowcount

    # ------------------------------------------------------------------------------ the worker's side

    def _requeue_where(self, db: Database, condition: str, args: Sequence[Any]) -> list[str]:
        """Requeue the running jobs that match ``condition`` (fail those that have run out of attempts)."""
        db.execute(
            f"UPDATE jobs SET status = 'failed', finished = ?, error = ? "
            f"WHERE status = 'running' AND attempts >= ? AND ({condition})",
            (time.time(), json.dumps(CRASHED), MAX_ATTEMPTS, *args),
        )
        rows = db.execute(
            f"SELECT id FROM jobs WHERE status = 'running' AND ({condition}) ORDER BY seq{db.skip_locked}",
            args,
        ).fetchall()
        ids = [r["id"] for r in rows]
        for job_id in ids:
            db.execute(
                "UPDATE jobs SET status = 'queued', started = NULL, worker = NULL, lease = NULL WHERE id = ?",
                (job_id,),
            )
        return ids

    def _clear_partials(self, job_ids: Sequence[str] | None) -> None:
        """Delete the temporary files of images whose writing a crash cut short (of these jobs, or all)."""
        patterns = [".*.partial"] if job_ids is None else [f".{job_id}-*.partial" for job_id in job_ids]
        for pattern in patterns:
            for leftover in self.images_dir.glob(pattern):
                leftover.unlink(missing_ok=True)

    def recover(self) -> list[str]:
        """At the start of the only server on this queue (after a crash): requeue every job that was
        running, or fail those that have crashed too often, free every reserved job, and delete the
        temporary files that interrupted writes left."""
        self._clear_partials(None)
        with self._db.transaction() as db:
            ids = self._requeue_where(db, "1 = 1", ())
            db.execute("UPDATE jobs SET worker = NULL, lease = NULL WHERE status = 'queued'")
        return ids

    def reap(self, worker: str | None = None) -> list[str]:
        """On a queue several servers share: requeue the running jobs whose server stopped renewing their
        lease (it died), and ``worker``'s own (it starts again under that name), failing those that have
        crashed too often; free queued jobs reserved for a dead server. Returns the requeued ids."""
        now = time.time()
        with self._db.transaction() as db:
            ids = self._requeue_where(db, "lease < ? OR worker = ?", (now, worker))
            db.execute(
                "UPDATE jobs SET worker = NULL, lease = NULL "
                "WHERE status = 'queued' AND worker IS NOT NULL AND (lease < ? OR worker = ?)",
                (now, worker),
            )
        self._clear_partials(ids)
        return ids

    def renew(self, worker: str, lease_s: float = LEASE_S) -> int:
        """``worker`` is alive: extend the lease of its running and reserved jobs; returns how many."""
        cur = self._db.execute(
            "UPDATE jobs SET lease = ? WHERE worker = ? AND status IN ('queued', 'running')",
            (time.time() + lease_s, worker),
        )
        return cur.rowcount

    def start(self, job_ids: Sequence[str], worker: str | None = None, lease_s: float = LEASE_S) -> list[str]:
        """Claim queued jobs for ``worker`` and mark them running (one more attempt); returns those it got.

        A job is claimed once: on PostgreSQL the rows are locked (``FOR UPDATE SKIP LOCKED``, so two
        workers claiming at once never wait on each other nor take the same job), on SQLite the
        transaction holds the database's write lock.
        """
        if not job_ids:
            return []
        marks = ", ".join("?" for _ in job_ids)
        now = time.time()
        with self._db.transaction() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE id IN ({marks}) AND status = 'queued' "
                f"AND (worker IS NULL OR worker = ?){db.skip_locked}",
                (*job_ids, worker),
            ).fetchall()
            free = {r["id"] for r in rows}
            started = [job_id for job_id in dict.fromkeys(job_ids) if job_id in free]
            for job_id in started:
                db.execute(
                    "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, worker = ?, "
                    "lease = ? WHERE id = ?",
                    (now, worker, now + lease_s, job_id),
                )
        return started

    def requeue(self, job_id: str) -> None:
        """Put a running job back in the queue (a clean shutdown stopped it); the attempt does not count."""
        self._db.execute(
            "UPDATE jobs SET status = 'queued', started = NULL, attempts = attempts - 1, worker = NULL, "
            "lease = NULL WHERE id = ? AND status = 'running'",
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

    def finish(self, job_id: str, result: dict[str, Any], worker: str | None = None) -> bool:
        """Record a running job as done with its (already written) images; False if it was not running
        (or, with ``worker``, not running there any more: its lease ran out and another server took it)."""
        mine, args = (" AND worker = ?", (worker,)) if worker is not None else ("", ())
        cur = self._db.execute(
            f"UPDATE jobs SET status = 'done', finished = ?, result = ? WHERE id = ? AND status = 'running'{mine}",
            (time.time(), json.dumps(result), job_id, *args),
        )
        return bool(cur.rowcount)

    def fail(self, job_id: str, error: dict[str, Any], status: str = "failed") -> bool:
        """Record a job as failed (or cancelled) unless it already ended."""
        cur = self._db.execute(
            "UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ? AND status IN ('queued', 'running')",
            (status, time.time(), json.dumps(error), job_id),
        )
        return bool(cur.rowcount)

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it is running or over."""
        cur = self._db.execute(
            "UPDATE jobs SET status = 'cancelled', finished = ?, error = ? WHERE id = ? AND status = 'queued'",
            (time.time(), json.dumps(CANCELLED), job_id),
        )
        return bool(cur.rowcount)

    def purge(self, older_than: float) -> int:
        """Delete finished jobs (and their images) that ended before ``older_than`` (a Unix time)."""
        with self._db.transaction() as db:
            rows = db.execute(
                "SELECT id, result FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND finished < ?",
                (older_than,),
            ).fetchall()
            for row in rows:
                for name in json.loads(row["result"] or "{}").get("images", []):
                    (self.images_dir / name).unlink(missing_ok=True)
                db.execute("DELETE FROM jobs WHERE id = ?", (row["id"],))
        return len(rows)
