"""``sd35 serve --ray --replicas 2`` on a local Ray (CPU replicas, the demo model): requests are spread over
both replicas and make the single-process server's images; Ray Serve's back-pressure is our 429 with
Retry-After; a replica killed (SIGKILL) in the middle of requests is restarted by Ray, its in-flight
requests fail with a 5xx that a retry with the same Idempotency-Key answers, and no job runs to the end
twice. Slow (Ray and two replicas take ~30 s to start on 2 cores): `make test` runs these in their own
step with a time limit."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.server.http_helpers import open_png, pixels, wait_until
from tests.server.server_helpers import ServerProcess, db_rows

pytestmark = pytest.mark.ray

ONGOING = 4  # requests a replica takes at once
QUEUED = 8  # requests waiting for a replica before 429 (a burst of 8 fits)
LEASE_S = 3.0
# Concurrent requests of equal settings share a replica's sampling batch, while the single-process server
# below runs each alone: the images then agree up to the rounding of batched matrix products (a few
# levels of 8-bit PNG values; see test_durability). A request that runs alone agrees exactly.
BATCH_TOLERANCE = 3


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The Ray server (2 replicas) and a single-process server to compare with, started together. Ray
    gives each CPU replica one thread (OMP_NUM_THREADS=1); the single-process server gets the same."""
    root = tmp_path_factory.mktemp("ray")
    ray = ServerProcess(
        root / "data",
        "--ray", "--replicas", "2", "--max-ongoing-requests", str(ONGOING), "--max-queued-requests", str(QUEUED),
        "--job-lease", str(LEASE_S),
        env={"RAY_DEDUP_LOGS": "0"},
    )  # fmt: skip
    plain = ServerProcess(root / "plain", env={"OMP_NUM_THREADS": "1"})
    with ThreadPoolExecutor(2) as pool:
        for started in [pool.submit(ray.start, 300), pool.submit(plain.start)]:
            started.result()
    wait_until(lambda: replica_states(ray) == {"RUNNING": 2}, timeout=120, interval=0.5, what="2 replicas")
    yield ray, plain
    plain.stop()
    ray.stop(timeout=90)
    assert ray.proc.returncode == 0, ray.output()[-3000:]


def replica_states(server: ServerProcess) -> dict | None:
    try:
        r = httpx.get(server.url + "/health", timeout=10)
    except httpx.HTTPError:
        return None
    return r.json().get("replicas") if r.status_code == 200 else None


def txt2img(url: str, seed: int, steps: int = 6, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    body = {"prompt": f"a red circle, seed {seed}", "steps": steps, "width": 64, "height": 64, "seed": seed}
    return httpx.post(url + "/sdapi/v1/txt2img", json=body, headers=headers, timeout=300)


def image_of(response: httpx.Response) -> np.ndarray:
    import base64

    return pixels(open_png(base64.b64decode(response.json()["images"][0])))


def test_requests_are_spread_over_replicas_and_make_the_single_process_images(servers):
    ray, plain = servers
    seeds = list(range(100, 108))
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda s: txt2img(ray.url, s), seeds))
    assert [r.status_code for r in responses] == [200] * 8, [r.text[:200] for r in responses]
    served_by = [r.headers.get("x-sd35-replica") for r in responses]
    assert len(set(served_by)) == 2 and None not in served_by, served_by
    for seed, response in zip(seeds, responses, strict=True):
        expected = image_of(txt2img(plain.url, seed))
        diff = np.abs(image_of(response) - expected).max()
        assert diff <= BATCH_TOLERANCE, (seed, diff)
        assert response.json()["parameters"]["seed"] == seed

    # a request on its own: the same image exactly, through OpenAI's route too
    body = {"prompt": "a blue square", "size": "64x64", "seed": 7, "response_format": "b64_json"}
    alone = [httpx.post(s.url + "/v1/images/generations", json=body, timeout=300) for s in (ray, plain)]
    assert [r.status_code for r in alone] == [200, 200]
    assert "x-sd35-replica" in alone[0].headers and "x-sd35-replica" not in alone[1].headers
    assert alone[0].json()["data"][0]["b64_json"] == alone[1].json()["data"][0]["b64_json"]

    # a native job is accepted by one replica, run by any, and read back through any
    r = httpx.post(ray.url + "/v1/jobs", json={"prompt": "a job", "steps": 4, "seed": 3}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = wait_until(
        lambda: (j := httpx.get(f"{ray.url}/v1/jobs/{job_id}", timeout=30).json())["status"] == "done" and j,
        timeout=60,
        interval=0.1,
        what="the job done",
    )
    assert httpx.get(job["images"][0], timeout=30).status_code == 200


def test_health_reports_the_replica_that_answered_and_all_replicas(servers):
    ray, _ = servers
    seen = {}
    for _ in range(40):
        body = httpx.get(ray.url + "/health", timeout=10).json()
        assert body["status"] == "ok" and body["model"] == "sd35_demo"
        assert body["replicas"] == {"RUNNING": 2}
        seen[body["replica"]] = body["pid"]
        if len(seen) == 2:
            break
    assert len(seen) == 2 and len(set(seen.values())) == 2, seen
    assert os.getpid() not in seen.values()


def test_past_the_queue_limit_ray_answers_429_with_retry_after(servers):
    ray, _ = servers
    burst = 2 * (2 * ONGOING + QUEUED)
    with ThreadPoolExecutor(burst) as pool:
        responses = list(pool.map(lambda s: txt2img(ray.url, s, steps=10), range(burst)))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= 2 * ONGOING  # what the replicas hold is never refused
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) > 0


def test_a_killed_replica_is_restarted_and_no_job_runs_twice(servers):
    ray, _ = servers
    pids = {}
    wait_until(
        lambda: (
            pids.update({(b := httpx.get(ray.url + "/health", timeout=10).json())["replica"]: b["pid"]})
            or len(pids) == 2
        ),
        timeout=30,
        interval=0.05,
        what="both replicas answering /health",
    )
    victim = sorted(pids.values())[0]
    before = set(db_rows(ray.data_dir))
    keys = [f"kill-{i}-{time.time()}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(txt2img, ray.url, 200 + i, 20, key) for i, key in enumerate(keys)]

        def victim_running():
            rows = db_rows(ray.data_dir).values()
            return any(r["status"] == "running" and f":{victim}:" in (r["worker"] or "") for r in rows)

        wait_until(victim_running, timeout=60, interval=0.02, what="the victim replica running a job")
        os.kill(victim, signal.SIGKILL)
        first = [f.result() for f in futures]
    codes = [r.status_code for r in first]
    assert all(c == 200 or 500 <= c < 600 for c in codes), codes
    assert any(c >= 500 for c in codes), f"the kill hit no request in flight: {codes}"

    # Ray starts a new replica; meanwhile the other one serves
    wait_until(
        lambda: replica_states(ray) == {"RUNNING": 2} and victim not in alive_pids(ray),
        timeout=180,
        interval=0.5,
        what="the killed replica replaced",
    )
    # the failed requests, retried with their keys: their jobs were requeued and run once, elsewhere
    retried = {i: txt2img(ray.url, 200 + i, 20, keys[i]) for i, c in enumerate(codes) if c != 200}
    assert {i: r.status_code for i, r in retried.items()} == dict.fromkeys(retried, 200)
    after = [txt2img(ray.url, 300 + i, 6) for i in range(4)]
    assert [r.status_code for r in after] == [200] * 4

    rows = {k: v for k, v in db_rows(ray.data_dir).items() if k not in before}
    assert len(rows) == 8 + 4, "a retry with its Idempotency-Key made a new job"
    assert all(r["status"] == "done" for r in rows.values()), {k: r["status"] for k, r in rows.items()}
    killed = [k for k, r in rows.items() if r["attempts"] == 2]
    assert killed and all(r["attempts"] in (1, 2) for r in rows.values())
    assert all(f":{victim}:" not in r["worker"] for k, r in rows.items() if k in killed)
    images = ray.data_dir / "images"
    names = sorted(
        p.name for p in images.iterdir() if p.name.split("-")[0] in rows or p.name.endswith(".partial")
    )
    assert names == sorted(f"{job_id}-0.png" for job_id in rows), "an image written twice, or half"


def alive_pids(server: ServerProcess) -> set[int]:
    pids = set()
    for _ in range(10):
        body = httpx.get(server.url + "/health", timeout=10).json()
        pids.add(body["pid"])
    return pids
