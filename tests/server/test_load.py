"""Many clients at once against a small queue: each is accepted or told to come back (429 with
Retry-After), never an error or a dropped connection, and every accepted job runs to the end once."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest

from tests.server.http_helpers import FINAL, open_png
from tests.server.server_helpers import ServerProcess

QUEUE_LIMIT = 16
CLIENTS = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("load") / "data", "--queue-limit", str(QUEUE_LIMIT)) as proc:
        yield proc


def assert_busy(r: httpx.Response, family: str) -> None:
    """A 429 as each API family's clients expect it, with when to retry."""
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) > 0
    body = r.json()
    if family == "native":
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
        assert "queue is full" in body["error"]["message"]
    else:
        assert body["error"] == "Busy" and "queue is full" in body["detail"]


async def poll_until_final(client: httpx.AsyncClient, job_id: str, timeout: float = 90.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        r = await client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] in FINAL:
            return r.json()
        assert loop.time() < deadline, f"job {job_id} did not end in {timeout} s"
        await asyncio.sleep(0.1)


def test_a_burst_of_jobs_is_accepted_or_refused_and_nothing_is_lost(server):
    async def burst():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            posts = [
                client.post("/v1/jobs", json={"prompt": f"client {i}", "steps": 2, "seed": i})
                for i in range(CLIENTS)
            ]
            responses = await asyncio.gather(*posts)  # a connection error fails the test here
            accepted = {r.json()["id"]: i for i, r in enumerate(responses) if r.status_code == 202}
            jobs = await asyncio.gather(*(poll_until_final(client, job_id) for job_id in accepted))
            listing = (await client.get("/v1/jobs", params={"limit": 500})).json()["jobs"]
            return responses, accepted, jobs, listing

    responses, accepted, jobs, listing = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {202, 429}, sorted(set(codes))
    for r in responses:
        if r.status_code == 429:
            assert_busy(r, "native")
    assert len(accepted) == codes.count(202)  # no id was handed out twice
    assert QUEUE_LIMIT <= len(accepted) < CLIENTS, len(accepted)  # the queue filled, then refused

    for job in jobs:
        assert job["status"] == "done", job
        assert job["seeds"] == [accepted[job["id"]]] and len(job["images"]) == 1
    # exactly the accepted jobs exist, once each: a refused request left nothing behind
    assert sorted(j["id"] for j in listing) == sorted(accepted)
    pngs = sorted(p.name for p in (server.data_dir / "images").glob("*.png"))
    assert pngs == sorted(f"{job_id}-0.png" for job_id in accepted)


def test_a1111_txt2img_under_concurrency(server):
    requests = 16

    async def run():
        limits = httpx.Limits(max_connections=8)  # eight clients waiting at once
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            body = {"prompt": "a crowd", "width": 64, "height": 64, "steps": 2}
            return await asyncio.gather(
                *(client.post("/sdapi/v1/txt2img", json={**body, "seed": 100 + i}) for i in range(requests))
            )

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, sorted(set(codes))
    assert codes.count(200) >= 8, codes
    for i, r in enumerate(responses):
        if r.status_code == 429:
            assert_busy(r, "a1111")
            continue
        (image,) = r.json()["images"]
        png = open_png(base64.b64decode(image))
        assert png.size == (64, 64) and f"Seed: {100 + i}," in png.text["parameters"]
        assert json.loads(r.json()["info"])["seed"] == 100 + i
