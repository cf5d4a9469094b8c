"""Two ``sd35 serve`` processes on one PostgreSQL queue (``--jobs-db``) and one shared data folder: both
take jobs, and when one is killed (SIGKILL) in the middle of a job, the other requeues that job once its
lease runs out and runs it: every accepted job ends ``done`` exactly once, with one whole PNG each."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.server.http_helpers import open_png, wait_final, wait_until
from tests.server.server_helpers import ServerProcess, free_port
from tests.server.test_security import assert_one_line_error, refused_start

JOBS = 12
STEPS = 100  # a job of about a second on a quiet machine: the kill, a few ms after b is seen running one, lands in it
LEASE_S = 3.0


@pytest.fixture
def pair(tmp_path, postgres):
    """Two servers on a fresh PostgreSQL database and one data folder."""
    url = postgres.new_database()
    args = ("--jobs-db", url, "--job-lease", str(LEASE_S), "--no-batching")
    servers = [ServerProcess(tmp_path / "shared", *args), ServerProcess(tmp_path / "shared", *args)]
    for s, name in zip(servers, "ab", strict=True):
        s.log = tmp_path / f"{name}-server.log"
    with ThreadPoolExecutor(2) as pool:
        for started in [pool.submit(s.start) for s in servers]:
            started.result()
    yield url, servers
    for s in servers:
        s.stop()


def db_rows(url: str) -> dict[str, dict]:
    with psycopg.connect(url, row_factory=dict_row) as db:
        return {row["id"]: row for row in db.execute("SELECT * FROM jobs")}


def worker_of(server: ServerProcess) -> str:
    """The prefix of the worker ids a server's engine writes (host:pid:...)."""
    return f":{server.proc.pid}:"


def test_two_servers_share_a_queue_and_survive_a_kill(pair):
    url, (a, b) = pair
    images = a.data_dir / "images"
    with httpx.Client(base_url=a.url, timeout=30) as client:
        ids = []
        for i in range(JOBS):  # no seed: each is drawn when the job is accepted
            r = client.post("/v1/jobs", json={"prompt": f"shared job {i}", "steps": STEPS})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

    def run_by_b(rows) -> list[str]:
        return [
            k for k, r in rows.items() if r["status"] == "running" and worker_of(b) in (r["worker"] or "")
        ]

    def b_busy():
        rows = db_rows(url)
        b_done = any(r["status"] == "done" and worker_of(b) in r["worker"] for r in rows.values())
        return b_done and run_by_b(rows) and any(r["status"] == "queued" for r in rows.values())

    wait_until(b_busy, timeout=60, interval=0.02, what="server b done with a job, running one, others queued")
    b.kill()
    at_kill = db_rows(url)  # b is dead: this is what it left
    killed = run_by_b(at_kill)
    assert len(killed) == 1, at_kill  # (b's job would have to end in the few ms before the kill)
    killed_job = killed[0]

    with httpx.Client(base_url=a.url, timeout=30) as client:
        jobs = {job_id: wait_final(client, job_id, timeout=120) for job_id in ids}
        downloaded = {job_id: client.get(job["images"][0]).content for job_id, job in jobs.items()}
    after = db_rows(url)

    assert all(job["status"] == "done" for job in jobs.values()), {k: j["status"] for k, j in jobs.items()}
    assert sorted(after) == sorted(ids), "the queue lost or repeated a job"
    # both servers finished jobs; the killed job was run to the end by a, after b's lease ran out
    finishers = {row["worker"].split(":")[1] for row in after.values()}
    assert finishers == {str(a.proc.pid), str(b.proc.pid)}, finishers
    assert worker_of(a) in after[killed_job]["worker"]
    assert after[killed_job]["attempts"] == 2, "the job running at the kill must run again, once"
    assert after[killed_job]["started"] >= at_kill[killed_job]["started"] + LEASE_S * 0.9
    for job_id in ids:
        if job_id != killed_job:
            assert after[job_id]["attempts"] == 1, (job_id, after[job_id]["attempts"])
        if at_kill[job_id]["status"] == "done":  # done before the kill: never touched again
            assert after[job_id]["finished"] == at_kill[job_id]["finished"]

    # one whole PNG per job in the shared folder, nothing else
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{job_id}-0.png" for job_id in ids)
    for job_id in ids:
        data = (images / f"{job_id}-0.png").read_bytes()
        assert downloaded[job_id] == data
        image = open_png(data)
        assert image.size == (64, 64) and image.text["parameters"] == jobs[job_id]["infotexts"][0]

    # either server serves any job and image
    with httpx.Client(base_url=b.start().url, timeout=30) as client:
        for job_id in ids:
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "done"
            assert client.get(job["images"][0]).content == downloaded[job_id]


def test_a_bad_job_database_is_refused_at_start_in_one_line(tmp_path):
    """Not a PostgreSQL URL, and a server that is not there (its password never printed): one line each,
    before the model is read."""
    line = assert_one_line_error(refused_start(tmp_path / "a", "--jobs-db", "mysql://u:hunter2@h/db"))
    assert "--jobs-db" in line and "postgresql://" in line and "hunter2" not in line
    url = f"postgresql://sd35:hunter2@127.0.0.1:{free_port()}/jobs"
    line = assert_one_line_error(refused_start(tmp_path / "b", "--jobs-db", url))
    assert "cannot connect" in line and "--jobs-db" in line and "hunter2" not in line, line
