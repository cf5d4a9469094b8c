"""The native job API over HTTP against a real ``sd35 serve``: submit, poll, download, stream (SSE), cancel,
idempotent retries, the job list, and image names that try to leave the images folder."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from tests.server.http_helpers import open_png, pixels, sse_frames, wait_final, wait_until

LONG_STEPS = 150  # a job that runs for seconds on the demo model (the server's default --max-steps)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def submit(client: httpx.Client, body: dict, **headers: str) -> str:
    r = client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def assert_native_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def wait_running(client: httpx.Client, job_id: str) -> dict:
    """The job's view once it runs and has done a step (so a cancel lands mid-run)."""

    def running():
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        return job if job["status"] == "running" and job["progress"] > 0 else None

    return wait_until(running, timeout=30, what=f"job {job_id} running")


def test_a_job_from_submit_to_images(client):
    body = {"prompt": "a red circle", "steps": 3, "seed": 1234, "num_images": 2, "cfg": 3.5}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "queued" and accepted["id"]
    assert r.headers["location"] == accepted["url"]
    assert accepted["url"].endswith(f"/v1/jobs/{accepted['id']}")

    job = wait_final(client, accepted["id"])
    assert job["status"] == "done", job
    assert job["progress"] == 1.0 and job["error"] is None
    assert job["seeds"] == [1234, 1235]  # image i uses seed + i
    assert len(job["images"]) == 2 and len(job["infotexts"]) == 2
    for url, seed, infotext in zip(job["images"], job["seeds"], job["infotexts"], strict=True):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        image = open_png(r.content)
        assert image.size == (64, 64)
        assert image.text["parameters"] == infotext
        assert infotext.startswith("a red circle\n")
        assert f"Seed: {seed}," in infotext and "Steps: 3," in infotext and "CFG scale: 3.5," in infotext

    # settings: the resolved request, every default filled in
    settings = job["settings"]
    assert {k: settings[k] for k in body} == body
    assert settings["width"] == settings["height"] == 64  # the demo model's size
    for name in ("negative_prompt", "sampler", "scheduler", "shift", "text"):
        assert settings.get(name) is not None, f"settings lack {name}: {settings}"
    assert settings["seed"] != -1

    # ... so sending it back as a request makes the same images
    again = wait_final(client, submit(client, settings))
    assert again["settings"] == settings and again["seeds"] == job["seeds"]
    for first, second in zip(job["images"], again["images"], strict=True):
        assert (
            pixels(open_png(client.get(first).content)) == pixels(open_png(client.get(second).content))
        ).all()


def test_a_random_seed_is_drawn_once_and_reported(client):
    job = wait_final(client, submit(client, {"prompt": "a blue square", "steps": 2}))
    assert job["status"] == "done", job
    (seed,) = job["seeds"]
    assert 0 <= seed < 2**32 and job["settings"]["seed"] == seed
    assert f"Seed: {seed}," in job["infotexts"][0]


def test_unknown_job_is_404(client):
    assert_native_error(client.get("/v1/jobs/0123456789abcdef01234567"), 404)
    assert_native_error(client.delete("/v1/jobs/0123456789abcdef01234567"), 404)
    assert_native_error(client.get("/v1/jobs/0123456789abcdef01234567/events"), 404)
    assert_native_error(client.get("/v1/images/0123456789abcdef01234567-0.png"), 404)


def test_events_stream_in_order(client, server):
    blocker = submit(client, {"prompt": "a long job", "steps": LONG_STEPS})
    steps = 4  # another step count: never batched with the blocker
    job_id = submit(client, {"prompt": "a green triangle", "steps": steps, "seed": 7})
    frames = []
    with (
        httpx.Client(base_url=server.url, timeout=30) as stream_client,
        stream_client.stream("GET", f"/v1/jobs/{job_id}/events") as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for frame in sse_frames(r.iter_lines()):
            frames.append(frame)
            if len(frames) == 1:
                # the job is still waiting behind the blocker: let it run now, so every event is seen
                time.sleep(0.2)
                assert client.delete(f"/v1/jobs/{blocker}").status_code == 200
            assert len(frames) < 100, [f.event for f in frames]
    # the server ended the stream after the final event
    names = [f.event for f in frames]
    assert names == ["status", "running"] + ["progress"] * steps + ["done"], names
    assert [int(f.id) for f in frames] == list(range(len(frames)))

    status = json.loads(frames[0].data)
    assert status["id"] == job_id and status["status"] == "queued"

    progress = [json.loads(f.data) for f in frames if f.event == "progress"]
    assert [p["step"] for p in progress] == list(range(1, steps + 1))
    fractions = [p["progress"] for p in progress]
    assert (
        fractions == sorted(fractions) and fractions[0] > 0 and fractions[-1] == pytest.approx(1.0, abs=1e-6)
    )
    for p in progress:
        assert p["steps"] == steps
        preview = Image.open(io.BytesIO(base64.b64decode(p["preview"], validate=True)))
        preview.verify()
        assert 0 < max(preview.size) <= 256

    done = json.loads(frames[-1].data)
    assert done["status"] == "done" and done["id"] == job_id and done["seeds"] == [7]
    assert done == client.get(f"/v1/jobs/{job_id}").json()
    assert wait_final(client, blocker)["status"] == "cancelled"


def test_events_of_a_finished_job_end_at_once(client):
    job_id = submit(client, {"prompt": "a small dot", "steps": 2})
    job = wait_final(client, job_id)
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        frames = list(sse_frames(r.iter_lines()))
    assert [f.event for f in frames] == ["status", "done"]
    assert json.loads(frames[-1].data) == job


def test_cancel_queued_running_and_finished_jobs(client, server):
    running = submit(client, {"prompt": "a long job", "steps": LONG_STEPS})
    queued = submit(client, {"prompt": "waits behind it", "steps": 3})

    # a queued job is cancelled at once
    r = client.delete(f"/v1/jobs/{queued}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["error"]["type"] == "Cancelled"

    # a running job stops at its next step, long before its last
    wait_running(client, running)
    cancelled_at = time.monotonic()
    r = client.delete(f"/v1/jobs/{running}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("running", "cancelled")
    job = wait_final(client, running, timeout=10)
    assert job["status"] == "cancelled" and job["images"] == [] and job["seeds"] == []
    assert time.monotonic() - cancelled_at < 3.0
    assert job["progress"] < 1.0
    assert not list((server.data_dir / "images").glob(f"{running}-*")), "a cancelled job left images"

    # a finished job (done or cancelled) cannot be cancelled
    for job_id in (queued, running):
        assert assert_native_error(client.delete(f"/v1/jobs/{job_id}"), 409)["code"] == "conflict"
    done = submit(client, {"prompt": "a quick one", "steps": 2})
    assert wait_final(client, done)["status"] == "done"
    assert_native_error(client.delete(f"/v1/jobs/{done}"), 409)
    assert client.get(f"/v1/jobs/{done}").json()["status"] == "done"


def test_idempotency_key(client):
    before = {j["id"] for j in client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
    body = {"prompt": "asked twice", "steps": 2}  # no seed: the server draws it, once
    first = submit(client, body, **{"Idempotency-Key": "retry-me-1"})
    second = submit(client, body, **{"Idempotency-Key": "retry-me-1"})
    assert first == second
    jobs = client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]
    new = [j["id"] for j in jobs if j["id"] not in before]
    assert new == [first]

    # the key of another request: refused, and no job made
    error = assert_native_error(
        client.post("/v1/jobs", json={**body, "steps": 3}, headers={"Idempotency-Key": "retry-me-1"}), 409
    )
    assert error["param"] == "Idempotency-Key"
    # with an explicit seed too
    body = {"prompt": "asked twice", "steps": 2, "seed": 5}
    third = submit(client, body, **{"Idempotency-Key": "retry-me-2"})
    assert submit(client, body, **{"Idempotency-Key": "retry-me-2"}) == third
    assert_native_error(
        client.post("/v1/jobs", json={**body, "seed": 6}, headers={"Idempotency-Key": "retry-me-2"}), 409
    )
    jobs = client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]
    assert sorted(j["id"] for j in jobs if j["id"] not in before) == sorted([first, third])
    assert wait_final(client, first)["status"] == "done"
    assert wait_final(client, third)["seeds"] == [5]


def test_list_recent_jobs(client):
    ids = [submit(client, {"prompt": f"listed {i}", "steps": 2}) for i in range(3)]
    for job_id in ids:
        wait_final(client, job_id)
    listing = client.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in listing[:3]] == ids[::-1]  # newest first
    assert all(j["status"] == "done" and len(j["images"]) == 1 for j in listing[:3])
    assert listing[0] == client.get(f"/v1/jobs/{ids[-1]}").json()
    assert len({j["id"] for j in listing}) == len(listing)
    assert [j["id"] for j in client.get("/v1/jobs", params={"limit": 2}).json()["jobs"]] == ids[:0:-1]
    assert_native_error(client.get("/v1/jobs", params={"limit": 0}), 400)


def test_image_names_cannot_leave_the_images_folder(client, server):
    job = wait_final(client, submit(client, {"prompt": "a kept image", "steps": 2}))
    name = job["images"][0].rsplit("/", 1)[1]

    def get_raw(target: str) -> httpx.Response:
        """GET ``target`` as written (a client would normalise dot segments away)."""
        return client.send(
            client.build_request("GET", "/v1/images/x", extensions={"target": target.encode()})
        )

    assert get_raw(f"/v1/images/{name}").status_code == 200
    data_dir = server.data_dir.resolve()
    (data_dir / "outside.png").write_bytes(client.get(f"/v1/images/{name}").content)  # a PNG beside images/
    targets = [
        "/v1/images/..%2F..%2Fetc%2Fpasswd",
        "/v1/images/../../etc/passwd",
        "/v1/images/../jobs.sqlite3",
        "/v1/images/..%2Fjobs.sqlite3",
        "/v1/images/%2E%2E%2Fjobs.sqlite3",
        "/v1/images/..%2Foutside.png",
        "/v1/images/..%5Coutside.png",
        "/v1/images/jobs.sqlite3",
        "/v1/images/..",
        "/v1/images/%2E%2E",
        "/v1/images/%2Fetc%2Fpasswd",
        "/v1/images//etc/passwd",
        "/v1/images/" + str(data_dir / "jobs.sqlite3"),
        "/v1/images/" + str(data_dir / "outside.png").replace("/", "%2F"),
        f"/v1/images/{name}%00.txt",
        f"/v1/images/{name}%2F..%2F..%2Foutside.png",
    ]
    for target in targets:
        r = get_raw(target)
        assert r.status_code == 404, (target, r.status_code, r.content[:100])
        assert b"root:" not in r.content and b"SQLite format" not in r.content and b"PNG" not in r.content
        assert_native_error(r, 404)
