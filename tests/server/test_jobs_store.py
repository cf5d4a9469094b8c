"""The durable job queue on its own (no model, no HTTP): admission, idempotency, the state rules, recovery
after a crash, leases on a shared queue, image names and purging; each on SQLite and on a real PostgreSQL
server."""

from __future__ import annotations

import threading
import time

import pytest

from sd35.errors import Busy, Conflict, NotFound
from sd35.server.jobs import CANCELLED, MAX_ATTEMPTS, JobStore


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """``open_store(data_dir)``: a store on this test's database (each call a new connection to it, as
    another process or a restart would open)."""
    url = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    opened = []

    def open_(data_dir):
        s = JobStore(data_dir, url)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store, tmp_path):
    return open_store(tmp_path / "data")


def body(prompt: str = "a cat", **more) -> dict:
    return {"prompt": prompt, "steps": 2, "seed": 1, **more}


def statuses(store: JobStore, ids) -> list[str]:
    return [store.get(i).status for i in ids]


# ---------------------------------------------------------------------------------------------- admission


def test_enqueue_get_and_queue_order(store):
    before = time.time()
    made = [store.enqueue("native", "sd35_demo", body(f"p{i}"), limit=10) for i in range(3)]
    assert all(created for _, created in made)
    jobs = [job for job, _ in made]
    assert len({job.id for job in jobs}) == 3
    for i, job in enumerate(jobs):
        got = store.get(job.id)
        assert got == job
        assert got.status == "queued" and not got.is_final
        assert got.request == body(f"p{i}") and got.api == "native" and got.model == "sd35_demo"
        assert got.attempts == 0 and got.started is None and got.finished is None and got.error is None
        assert before <= got.created <= time.time()
        assert store.position(got) == i
    assert [job.id for job in store.queued()] == [job.id for job in jobs]
    assert [job.id for job in store.queued(limit=2)] == [job.id for job in jobs[:2]]
    assert [job.id for job in store.recent()] == [job.id for job in reversed(jobs)]
    # a started job leaves the queue but still counts as waiting
    assert store.start([jobs[0].id]) == [jobs[0].id]
    assert [job.id for job in store.queued()] == [jobs[1].id, jobs[2].id]
    assert store.position(store.get(jobs[2].id)) == 1
    assert store.waiting() == 3


def test_a_job_queued_at_the_front_runs_before_the_waiting_ones(store):
    """ComfyUI's ``front``: before every waiting job, the latest such first; the rest first come first."""
    a, b = (store.enqueue("native", "m", body(p), limit=10)[0] for p in ("a", "b"))
    f1 = store.enqueue("comfyui", "workflow", body("f1"), limit=10, front=True)[0]
    c = store.enqueue("native", "m", body("c"), limit=10)[0]
    f2 = store.enqueue("comfyui", "workflow", body("f2"), limit=10, front=True)[0]
    order = [f2, f1, a, b, c]
    assert [job.id for job in store.queued()] == [job.id for job in order]
    assert [store.position(store.get(job.id)) for job in order] == [0, 1, 2, 3, 4]
    assert f1.front and f2.front and not a.front and store.get(f2.id).front
    assert [j.id for j in store.of_api("comfyui", ("queued",), queue_order=True)] == [f2.id, f1.id]
    assert [j.id for j in store.of_api("comfyui", ("queued",))] == [f1.id, f2.id]  # oldest first
    assert store.start([f2.id]) == [f2.id]
    assert [job.id for job in store.queued(limit=2)] == [f1.id, a.id]
    assert store.position(store.get(c.id)) == 3


def test_unknown_job_is_not_found(store):
    with pytest.raises(NotFound) as info:
        store.get("0123456789abcdef01234567")
    assert info.value.param == "id"


def test_jobs_survive_reopening(open_store, tmp_path):
    first = open_store(tmp_path)
    job, _ = first.enqueue("openai", "m", body(), limit=5)
    first.close()
    again = open_store(tmp_path)
    assert again.get(job.id) == job


def test_queue_limit_is_busy_until_a_job_ends(store):
    a, _ = store.enqueue("native", "m", body("a"), limit=2)
    store.enqueue("native", "m", body("b"), limit=2)
    with pytest.raises(Busy):
        store.enqueue("native", "m", body("c"), limit=2)
    assert store.waiting() == 2
    store.start([a.id])
    with pytest.raises(Busy):  # running jobs count too
        store.enqueue("native", "m", body("c"), limit=2)
    assert store.finish(a.id, {"images": []})
    c, created = store.enqueue("native", "m", body("c"), limit=2)
    assert created and c.status == "queued"
    assert len(store.recent()) == 3  # the refused ones left no row


def test_concurrent_admission_never_overshoots_the_limit(open_store, tmp_path):
    """8 threads (on two connections, as two processes would be) enqueue 50 jobs each against a limit of
    100: exactly 100 are admitted, the rest are Busy."""
    stores = [open_store(tmp_path), open_store(tmp_path)]
    admitted: list[str] = []
    busy = []
    other: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def client(n: int) -> None:
        s = stores[n % 2]
        start.wait()
        for i in range(50):
            try:
                job, created = s.enqueue("native", "m", body(f"{n}-{i}"), limit=100)
                assert created
                with lock:
                    admitted.append(job.id)
            except Busy:
                with lock:
                    busy.append((n, i))
            except BaseException as e:  # noqa: BLE001 - reported below
                with lock:
                    other.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not other, other
    assert len(admitted) == 100 and len(set(admitted)) == 100
    assert len(busy) == 300
    assert stores[0].waiting() == 100
    assert len(stores[1].queued(limit=1000)) == 100


# ---------------------------------------------------------------------------------------------- idempotency


def test_idempotency_key_returns_the_same_job(store):
    job, created = store.enqueue("native", "m", {"prompt": "x", "steps": 2}, limit=5, idempotency_key="k1")
    assert created and job.idempotency_key == "k1"
    again, created = store.enqueue("native", "m", {"steps": 2, "prompt": "x"}, limit=5, idempotency_key="k1")
    assert not created and again.id == job.id
    assert len(store.recent()) == 1
    # a retry is answered even when the queue is full meanwhile, and even after the job ended
    store.enqueue("native", "m", body("fill"), limit=5)
    same, created = store.enqueue("native", "m", {"prompt": "x", "steps": 2}, limit=2, idempotency_key="k1")
    assert not created and same.id == job.id
    store.start([job.id])
    store.finish(job.id, {"images": ["a-0.png"]})
    done, created = store.enqueue("native", "m", {"prompt": "x", "steps": 2}, limit=5, idempotency_key="k1")
    assert not created and done.status == "done" and done.result == {"images": ["a-0.png"]}
    # another key is another job
    other, created = store.enqueue("native", "m", {"prompt": "x", "steps": 2}, limit=5, idempotency_key="k2")
    assert created and other.id != job.id


@pytest.mark.parametrize(
    "api, model, request_body",
    [
        ("native", "m", {"prompt": "y", "steps": 2}),
        ("native", "m", {"prompt": "x", "steps": 3}),
        ("openai", "m", {"prompt": "x", "steps": 2}),
        ("native", "other", {"prompt": "x", "steps": 2}),
    ],
)
def test_idempotency_key_with_another_request_is_a_conflict(store, api, model, request_body):
    job, _ = store.enqueue("native", "m", {"prompt": "x", "steps": 2}, limit=5, idempotency_key="key")
    with pytest.raises(Conflict) as info:
        store.enqueue(api, model, request_body, limit=5, idempotency_key="key")
    assert info.value.param == "Idempotency-Key"
    assert [j.id for j in store.recent()] == [job.id]


# ---------------------------------------------------------------------------------------------- states


def test_state_rules(store):
    ids = [store.enqueue("native", "m", body(f"{i}"), limit=10)[0].id for i in range(5)]
    a, b, c, d, e = ids

    # start: queued only, one attempt each time
    assert store.start([a, b, a]) == [a, b]
    assert store.start([a]) == []
    assert store.get(a).attempts == 1 and store.get(a).started is not None

    # finish: running only
    assert not store.finish(c, {"images": []})  # queued
    assert store.finish(a, {"images": ["x-0.png"], "seeds": [1]})
    assert store.get(a).status == "done" and store.get(a).result["seeds"] == [1]
    assert not store.finish(a, {"images": []})  # already done
    assert store.get(a).finished is not None

    # fail: queued or running, never after the end
    error = {"type": "InvalidRequest", "message": "bad", "param": "width"}
    assert not store.fail(a, error)  # a done job cannot be failed
    assert store.get(a).status == "done" and store.get(a).error is None
    assert store.fail(b, error)  # running
    assert store.get(b).status == "failed" and store.get(b).error == error
    assert not store.fail(b, error)
    assert store.fail(c, error)  # queued
    assert not store.start([c])  # a failed job never runs

    # cancel_queued: queued only
    assert store.start([d]) == [d]
    assert not store.cancel_queued(d)  # running: the engine cancels it at a step
    assert store.get(d).status == "running"
    assert store.cancel_queued(e)
    assert store.get(e).status == "cancelled" and store.get(e).error == CANCELLED
    assert not store.cancel_queued(e) and not store.cancel_queued(a)
    assert not store.finish(e, {"images": []})
    assert store.fail(d, CANCELLED, "cancelled")
    assert statuses(store, ids) == ["done", "failed", "failed", "cancelled", "cancelled"]
    assert all(store.get(i).is_final for i in ids)
    assert store.waiting() == 0


def test_requeue_puts_a_running_job_back_without_counting_the_attempt(store):
    job, _ = store.enqueue("native", "m", body(), limit=5)
    store.start([job.id])
    store.requeue(job.id)
    back = store.get(job.id)
    assert back.status == "queued" and back.attempts == 0 and back.started is None
    store.requeue(job.id)  # not running: nothing happens
    assert store.get(job.id).attempts == 0
    store.start([job.id])
    store.finish(job.id, {"images": []})
    store.requeue(job.id)
    assert store.get(job.id).status == "done"


def test_recover_requeues_running_jobs_and_fails_a_job_that_keeps_crashing(open_store, tmp_path):
    s = open_store(tmp_path)
    poison, _ = s.enqueue("native", "m", body("poison"), limit=10)
    waiting, _ = s.enqueue("native", "m", body("waiting"), limit=10)
    done, _ = s.enqueue("native", "m", body("done"), limit=10)
    s.start([done.id])
    s.finish(done.id, {"images": []})
    for crash in range(1, MAX_ATTEMPTS + 1):
        assert s.start([poison.id]) == [poison.id]
        s.close()  # the process dies while the job runs
        s = open_store(tmp_path)
        recovered = s.recover()
        job = s.get(poison.id)
        assert job.attempts == crash
        if crash < MAX_ATTEMPTS:
            assert recovered == [poison.id]
            assert job.status == "queued" and job.started is None
            assert [j.id for j in s.queued()] == [poison.id, waiting.id]  # it keeps its place
        else:
            assert recovered == []
            assert job.status == "failed"
            assert job.error["type"] == "InternalError" and str(MAX_ATTEMPTS) in job.error["message"]
    assert s.get(waiting.id).status == "queued" and s.get(waiting.id).attempts == 0
    assert s.get(done.id).status == "done"
    assert s.recover() == []


# ---------------------------------------------------------------------------------------------- shared queues


def test_a_job_is_claimed_by_exactly_one_of_many_concurrent_workers(open_store, tmp_path):
    """4 workers on their own connections (as 4 servers) race to claim the same 60 jobs, each trying the
    whole queue in its own order: every job is claimed once, by the worker the row names."""
    stores = [open_store(tmp_path) for _ in range(4)]
    ids = [stores[0].enqueue("native", "m", body(f"{i}"), limit=100)[0].id for i in range(60)]
    claimed: dict[str, list[str]] = {f"w{n}": [] for n in range(4)}
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        order = ids[n::4] + ids  # each starts in its own part of the queue, then tries all of it
        start.wait()
        try:
            for i in range(0, len(order), 3):
                claimed[f"w{n}"] += stores[n].start(order[i : i + 3], f"w{n}", lease_s=60)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    every = [job_id for got in claimed.values() for job_id in got]
    assert sorted(every) == sorted(ids), "a job was claimed twice or never"
    for name, got in claimed.items():
        for job_id in got:
            job = stores[0].get(job_id)
            assert job.status == "running" and job.worker == name and job.attempts == 1
    assert stores[0].queued() == []


def test_reap_requeues_only_jobs_whose_lease_ran_out(open_store, tmp_path):
    a, b = open_store(tmp_path), open_store(tmp_path)
    dead, _ = a.enqueue("native", "m", body("dead"), limit=10)
    alive, _ = a.enqueue("native", "m", body("alive"), limit=10)
    assert a.start([dead.id], "A", lease_s=0.3) == [dead.id]
    assert b.start([alive.id], "B", lease_s=0.3) == [alive.id]
    assert b.reap() == []  # both leases run
    time.sleep(0.15)
    assert b.renew("B", lease_s=60) == 1  # B lives; A stopped renewing
    time.sleep(0.3)
    assert b.reap() == [dead.id]
    back = b.get(dead.id)
    assert back.status == "queued" and back.worker is None and back.lease is None and back.attempts == 1
    assert b.get(alive.id).status == "running" and b.get(alive.id).worker == "B"
    assert b.get(alive.id).lease > time.time() + 50
    # a worker starting again under its own name takes back its jobs at once, lease or not
    assert b.reap("B") == [alive.id]
    assert b.get(alive.id).status == "queued"


def test_a_job_whose_worker_keeps_dying_fails_on_a_shared_queue(store):
    job, _ = store.enqueue("native", "m", body("poison"), limit=10)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert store.start([job.id], f"w{attempt}", lease_s=0.01) == [job.id]
        time.sleep(0.02)
        reaped = store.reap()
        assert reaped == ([job.id] if attempt < MAX_ATTEMPTS else [])
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.attempts == MAX_ATTEMPTS
    assert failed.error["type"] == "InternalError" and str(MAX_ATTEMPTS) in failed.error["message"]


def test_a_reserved_job_waits_for_its_worker_until_that_worker_dies(open_store, tmp_path):
    a, b = open_store(tmp_path), open_store(tmp_path)
    mine, _ = a.enqueue("openai", "m", body("sync"), limit=10, worker="A")
    free, _ = a.enqueue("native", "m", body("async"), limit=10)
    assert [j.id for j in b.queued(worker="B")] == [free.id]
    assert [j.id for j in b.queued(worker="A")] == [mine.id, free.id]
    assert [j.id for j in b.queued()] == [mine.id, free.id]  # a listing shows all
    assert b.start([mine.id], "B") == []
    assert b.reap() == [] and b.get(mine.id).worker == "A"  # A's lease runs: still A's
    a._db.execute("UPDATE jobs SET lease = ? WHERE id = ?", (time.time() - 1, mine.id))  # A died long ago
    b.reap()
    assert b.get(mine.id).worker is None and b.get(mine.id).status == "queued"
    assert b.start([mine.id], "B") == [mine.id]


def test_a_worker_that_lost_its_job_cannot_finish_it(store):
    job, _ = store.enqueue("native", "m", body(), limit=10)
    store.start([job.id], "A", lease_s=0.01)
    time.sleep(0.02)
    assert store.reap() == [job.id]
    assert store.start([job.id], "B") == [job.id]
    assert not store.finish(job.id, {"images": ["late-0.png"]}, worker="A")  # A was only slow
    assert store.finish(job.id, {"images": ["x-0.png"]}, worker="B")
    done = store.get(job.id)
    assert done.status == "done" and done.result == {"images": ["x-0.png"]} and done.attempts == 2


def test_reap_deletes_only_the_temporary_files_of_the_jobs_it_requeues(store):
    dead, _ = store.enqueue("native", "m", body("dead"), limit=10)
    busy, _ = store.enqueue("native", "m", body("busy"), limit=10)
    store.start([dead.id], "A", lease_s=0.01)
    store.start([busy.id], "B", lease_s=60)
    cut = store.images_dir / f".{dead.id}-0.png.abc123.partial"
    writing = store.images_dir / f".{busy.id}-0.png.def456.partial"  # B writes it right now
    cut.write_bytes(b"half")
    writing.write_bytes(b"half")
    time.sleep(0.02)
    assert store.reap() == [dead.id]
    assert not cut.exists() and writing.exists()


# ---------------------------------------------------------------------------------------------- files


def test_image_file_serves_only_our_names(store):
    job, _ = store.enqueue("native", "m", body(), limit=5)
    path = store.image_path(job.id, 0)
    assert path.parent == store.images_dir and path.name == f"{job.id}-0.png"
    path.write_bytes(b"\x89PNG fake")
    assert store.image_file(path.name) == path
    (store.images_dir / f"{job.id}-1.jpg").write_bytes(b"x")
    (store.images_dir / "sub-0.png").mkdir()
    (store.data_dir / "secret-0.png").write_bytes(b"x")
    for name in [
        "../jobs.sqlite3",
        "../secret-0.png",
        f"../images/{job.id}-0.png",
        f"./{job.id}-0.png",
        f"/{store.images_dir}/{job.id}-0.png",
        str(path),
        f"{job.id}-1.jpg",
        f"{job.id}-0.png.txt",
        f"{job.id}-0.PNG",
        f"{job.id}-0",
        f"{job.id}_0.png",
        "..png",
        ".png",
        "",
        "sub-0.png",  # a folder
        f"{job.id}-9.png",  # ours, but not there
        "jobs.sqlite3",
    ]:
        with pytest.raises(NotFound) as info:
            store.image_file(name)
        assert info.value.param == "name", name


def test_purge_deletes_old_finished_jobs_and_their_files_only(store):
    def finished(prompt: str, status: str) -> str:
        job, _ = store.enqueue("native", "m", body(prompt), limit=20)
        store.start([job.id])
        names = []
        if status == "done":
            for i in range(2):
                store.image_path(job.id, i).write_bytes(b"png")
                names.append(store.image_path(job.id, i).name)
            store.finish(job.id, {"images": names})
        else:
            store.fail(
                job.id,
                CANCELLED if status == "cancelled" else {"type": "X", "message": "", "param": None},
                status,
            )
        return job.id

    old = [
        finished("old done", "done"),
        finished("old failed", "failed"),
        finished("old cancelled", "cancelled"),
    ]
    still_running, _ = store.enqueue("native", "m", body("running"), limit=20)
    store.start([still_running.id])
    still_queued, _ = store.enqueue("native", "m", body("queued"), limit=20)
    stray = store.images_dir / "0123abcd-0.png"  # a file no purged job lists
    stray.write_bytes(b"png")
    time.sleep(0.02)
    cutoff = time.time()
    time.sleep(0.02)
    new = finished("new done", "done")

    assert store.purge(cutoff) == 3
    for job_id in old:
        with pytest.raises(NotFound):
            store.get(job_id)
    assert not store.image_path(old[0], 0).exists() and not store.image_path(old[0], 1).exists()
    assert store.get(new).status == "done"
    assert store.image_path(new, 0).exists() and store.image_path(new, 1).exists()
    assert store.get(still_running.id).status == "running"
    assert store.get(still_queued.id).status == "queued"
    assert stray.exists()
    assert store.purge(cutoff) == 0
    # unfinished jobs are never purged, however old
    assert store.purge(time.time() + 3600) == 1
    assert {j.id for j in store.recent()} == {still_running.id, still_queued.id}


def test_a_database_from_before_leases_gains_their_columns(tmp_path):
    """A SQLite queue made by an earlier version (no worker, lease or front columns) opens, keeps its jobs,
    and runs them under leases."""
    import sqlite3

    old = sqlite3.connect(tmp_path / "jobs.sqlite3")
    old.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, idempotency_key "
        "TEXT UNIQUE, api TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL, "
        "attempts INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, started REAL, finished REAL, error TEXT, "
        "result TEXT);"
        "INSERT INTO jobs (id, api, model, status, request, created) "
        "VALUES ('0123456789abcdef01234567', 'native', 'm', 'queued', '{\"prompt\": \"old\"}', 1.0);"
    )
    old.close()
    s = JobStore(tmp_path)
    try:
        job = s.get("0123456789abcdef01234567")
        assert job.request == {"prompt": "old"} and job.worker is None and job.lease is None
        assert s.start([job.id], "w1", lease_s=60) == [job.id]
        assert s.get(job.id).worker == "w1" and not s.get(job.id).front
        front = s.enqueue("comfyui", "workflow", body("f"), limit=10, front=True)[0]
        assert s.get(front.id).front  # the front column was added too
    finally:
        s.close()


def test_a_postgresql_store_reconnects_after_its_connection_dies(postgres, tmp_path):
    """The database restarted or a network blip cut the connection: the statement that finds it broken
    fails, and the store connects again for the next one."""
    import psycopg

    url = postgres.new_database()
    s = JobStore(tmp_path, url)
    try:
        job, _ = s.enqueue("native", "m", body(), limit=5)
        with psycopg.connect(url, autocommit=True) as admin:
            (pid,) = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND pid <> pg_backend_pid()").fetchone()  # fmt: skip
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            s.get(job.id)
        assert s.get(job.id) == job
        assert s.start([job.id], "w") == [job.id]
    finally:
        s.close()
