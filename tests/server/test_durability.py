"""A server killed (SIGKILL, as a crash or an OOM kill) with jobs queued and running loses none and repeats
none: after a restart on the same data folder every accepted job ends ``done`` exactly once, with one
whole PNG each, and a job that was running at the kill makes the image its request makes anywhere (its seed
was drawn at admission, not at run time)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.server.http_helpers import open_png, pixels, wait_final, wait_until
from tests.server.server_helpers import ServerProcess, db_rows

JOBS = 12
STEPS = 6
# A job run after the restart may share a sampling batch with another (--batch-rows 2) while the fresh
# server runs it alone: the images then agree up to the rounding of batched matrix products, which 8-bit
# PNG values show as at most a few levels.
BATCH_TOLERANCE = 3


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The server to crash (jobs run two to a batch) and a fresh one to compare with, started together."""
    root = tmp_path_factory.mktemp("durable")
    crashing = ServerProcess(root / "data", "--batch-rows", "2")
    fresh = ServerProcess(root / "fresh")
    with ThreadPoolExecutor(2) as pool:
        for started in [pool.submit(crashing.start), pool.submit(fresh.start)]:
            started.result()
    yield crashing, fresh
    crashing.stop()
    fresh.stop()


def test_a_killed_server_finishes_every_job_once_after_a_restart(servers):
    server, fresh = servers
    images = server.data_dir / "images"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ids = []
        for i in range(JOBS):  # no seed: each is drawn when the job is accepted
            r = client.post("/v1/jobs", json={"prompt": f"durable job {i}", "steps": STEPS})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        def mid_queue():
            jobs = client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
            status = [j["status"] for j in jobs]
            # kill early in a job's run (at most half its steps done), so it is surely running at the kill
            midway = any(j["status"] == "running" and 0 < j["progress"] <= 0.5 for j in jobs)
            return midway and "done" in status and "queued" in status

        wait_until(mid_queue, timeout=60, interval=0.01, what="a job done, one running and one queued")
        server.kill()

    # what the crash left behind
    at_kill = db_rows(server.data_dir)
    assert set(at_kill) == set(ids)
    statuses = {job_id: row["status"] for job_id, row in at_kill.items()}
    running = [job_id for job_id in ids if statuses[job_id] == "running"]
    queued = [job_id for job_id in ids if statuses[job_id] == "queued"]
    finished = [job_id for job_id in ids if statuses[job_id] == "done"]
    assert running and queued and finished, statuses
    assert len(running) + len(queued) + len(finished) == JOBS
    before = {job_id: (images / f"{job_id}-0.png").read_bytes() for job_id in finished}
    partial_at_kill = sorted(p.name for p in images.iterdir() if p.name.endswith(".partial"))
    # as a kill in the middle of writing an image leaves it (the next start clears these)
    (images / f".{running[0]}-0.png.x1y2z3.partial").write_bytes(b"\x89PNG\r\n\x1a\n half a file")

    server.start()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        jobs = {job_id: wait_final(client, job_id, timeout=60) for job_id in ids}
        listing = client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]
        downloaded = {job_id: client.get(job["images"][0]).content for job_id, job in jobs.items()}
    after = db_rows(server.data_dir)

    assert all(job["status"] == "done" for job in jobs.values()), {k: j["status"] for k, j in jobs.items()}
    assert sorted(j["id"] for j in listing) == sorted(ids), "the listing lost or repeated a job"
    # each job ran to the end once: those done before the kill were not run again, the others ran once more
    for job_id in finished:
        assert after[job_id]["attempts"] == 1 and after[job_id]["finished"] == at_kill[job_id]["finished"]
        assert (images / f"{job_id}-0.png").read_bytes() == before[job_id]
    for job_id in running:
        assert after[job_id]["attempts"] == 2, "a job running at the kill must run again, once"
    for job_id in queued:
        assert after[job_id]["attempts"] == 1

    # one whole PNG per job, and nothing else left in the folder
    pngs = sorted(p.name for p in images.glob("*.png"))
    assert pngs == sorted(f"{job_id}-0.png" for job_id in ids)
    for job_id in ids:
        data = (images / f"{job_id}-0.png").read_bytes()
        assert downloaded[job_id] == data
        image = open_png(data)
        assert image.size == (64, 64)
        assert image.text["parameters"] == jobs[job_id]["infotexts"][0]
    leftovers = sorted(p.name for p in images.iterdir() if p.name.endswith(".partial"))
    assert leftovers == [], (
        f"temporary files left after the restart: {leftovers} (at the kill: {partial_at_kill})"
    )

    # the seed was fixed at admission: a fresh server given it makes the same image
    with httpx.Client(base_url=fresh.url, timeout=30) as client:
        for job_id in [running[0], queued[-1]]:
            job = jobs[job_id]
            r = client.post("/v1/jobs", json={**job["settings"]})
            assert r.status_code == 202, r.text
            again = wait_final(client, r.json()["id"])
            assert again["status"] == "done" and again["seeds"] == job["seeds"]
            assert again["infotexts"] == job["infotexts"]
            expected = pixels(open_png(client.get(again["images"][0]).content))
            got = pixels(open_png(downloaded[job_id]))
            assert np.abs(expected - got).max() <= BATCH_TOLERANCE, np.abs(expected - got).max()
