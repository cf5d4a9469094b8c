"""The engine in-process on the real demo model (no HTTP): admission checks, the worker, batching of
equal-settings jobs, cancel, failures, progress events and a clean stop."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
from PIL import Image

from sd35.errors import Conflict, InvalidRequest, NotFound
from sd35.request import Edit, GenerateRequest, HiresFix, LoraRef
from sd35.server.catalog import ModelCatalog
from sd35.server.engine import Engine, check_limits
from sd35.server.jobs import JobStore
from sd35.server.settings import Limits, ServerSettings
from tests.helpers import noise_image, pixel_diff

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "sd35_demo"
TOLERANCE = (2, 0.1)  # (max, mean) |batched - alone| per pixel value of 255, as tests/test_pipeline_batch.py
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def pipe():
    from sd35.demo import load_demo_pipeline

    return load_demo_pipeline()


@pytest.fixture
def make_engine(pipe, models_dir, tmp_path):
    """``make_engine(**settings)``: an engine on the demo model with its own data folder (not started)."""
    engines = []

    def make(data_dir=None, **settings) -> Engine:
        catalog = ModelCatalog(MODEL, None, models_dir)
        pipe.lora_source = catalog.lora  # as sd35 serve does: requests name LoRAs, the catalog finds them
        config = ServerSettings(
            data_dir=data_dir or tmp_path / f"data{len(engines)}", models_dir=models_dir, **settings
        )
        engine = Engine(config, catalog, pipe, MODEL, load=lambda name: pipe)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout=TIMEOUT_S)


def wait(engine: Engine, job_id: str, timeout: float = TIMEOUT_S):
    """The job once it ended (polling the store)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = engine.store.get(job_id)
        if job.is_final:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not end in {timeout} s: {engine.store.get(job_id)}")


def wait_all(engine: Engine, jobs) -> list:
    return [wait(engine, job.id) for job in jobs]


def record_calls(monkeypatch, pipe) -> list[tuple[str, list[GenerateRequest]]]:
    """Wrap ``pipe.run`` and ``pipe.run_batch`` to record each call: ("run" | "batch", requests)."""
    calls: list[tuple[str, list[GenerateRequest]]] = []
    run, run_batch = pipe.run, pipe.run_batch

    def recording_run(request, *args, **kwargs):
        calls.append(("run", [request]))
        return run(request, *args, **kwargs)

    def recording_batch(requests, *args, **kwargs):
        calls.append(("batch", list(requests)))
        return run_batch(requests, *args, **kwargs)

    monkeypatch.setattr(pipe, "run", recording_run)
    monkeypatch.setattr(pipe, "run_batch", recording_batch)
    return calls


def close(a: Image.Image, b: Image.Image) -> bool:
    diff = pixel_diff(a, b)
    return diff.max() <= TOLERANCE[0] and diff.mean() < TOLERANCE[1]


# ---------------------------------------------------------------------------------------------- a job


def test_a_job_writes_its_images_and_result(make_engine, pipe):
    engine = make_engine()
    request = GenerateRequest(prompt="a red circle", steps=3, seed=11, num_images=2)
    job = engine.submit(request, "native")
    assert job.status == "queued" and job.api == "native" and job.model == MODEL
    assert job.request["seed"] == 11
    engine.start()
    done = wait(engine, job.id)
    assert done.status == "done", done.error
    result = done.result
    assert result["images"] == [f"{job.id}-0.png", f"{job.id}-1.png"]
    assert result["seeds"] == [11, 12]
    settings = result["settings"]
    assert (settings["width"], settings["height"], settings["steps"], settings["seed"]) == (64, 64, 3, 11)
    assert settings["sampler"] == pipe.defaults.sampler and settings["cfg"] == pipe.defaults.cfg
    alone = pipe.run(request)
    for i, name in enumerate(result["images"]):
        path = engine.store.image_file(name)
        with Image.open(path) as im:
            assert im.size == (64, 64)
            assert im.info["parameters"] == result["infotexts"][i]
            assert f"Seed: {11 + i}," in im.info["parameters"]
            # the same request through the same code path (pipe.run): the same pixels
            assert pixel_diff(im.convert("RGB"), alone.images[i]).max() == 0
    assert result["infotexts"] == alone.infotexts
    assert engine.jobs_run == 1
    # written whole: the two images and no temporary file beside them
    assert sorted(p.name for p in engine.store.images_dir.iterdir()) == result["images"]


def test_a_random_seed_is_drawn_once_at_submit(make_engine):
    engine = make_engine()
    jobs = [engine.submit(GenerateRequest(prompt="x", steps=2, seed=seed), "native") for seed in (None, -1)]
    seeds = [job.request["seed"] for job in jobs]
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds)
    engine.start()
    for job, seed in zip(wait_all(engine, jobs), seeds, strict=True):
        assert job.status == "done" and job.result["seeds"] == [seed]


# ---------------------------------------------------------------------------------------------- admission


@pytest.mark.parametrize(
    "request_fields, param",
    [
        ({"width": 80}, "width"),
        ({"height": 96}, "height"),
        ({"hires": HiresFix(scale=1.5)}, "hires.scale"),  # 64 -> 96 px
        ({"steps": 6}, "steps"),
        ({"steps": 4, "hires": HiresFix(scale=1.25, steps=6)}, "hires.steps"),
        ({"num_images": 3}, "num_images"),
        ({"prompt": "x" * 11}, "prompt"),
        ({"negative_prompt": "y" * 11}, "negative_prompt"),
    ],
)
def test_check_limits_names_the_param(request_fields, param):
    limits = Limits(max_size=80, max_steps=5, max_batch=2, max_prompt_chars=10)
    fields = {"prompt": "x", "width": 64, "height": 64, "steps": 2, **request_fields}
    if param in ("width", "height"):
        limits = replace(limits, max_size=64)
    with pytest.raises(InvalidRequest) as info:
        check_limits(GenerateRequest(**fields), limits)
    assert info.value.param == param
    # at the limits is allowed
    at_limits = Limits(max_size=80, max_steps=5, max_batch=2, max_prompt_chars=10)
    check_limits(
        GenerateRequest(
            prompt="x" * 10, width=64, height=64, steps=5, num_images=2, hires=HiresFix(scale=1.25, steps=5)
        ),
        at_limits,
    )


@pytest.mark.parametrize(
    "request_fields, model, error, param",
    [
        ({"steps": 6}, None, InvalidRequest, "steps"),  # the deployment's limit
        ({"num_images": 3}, None, InvalidRequest, "num_images"),
        ({"width": 512}, None, InvalidRequest, "width"),  # past the demo model's position grid (256 px)
        ({"width": 1024, "height": 64}, None, InvalidRequest, "width"),
        ({"loras": (LoraRef("nope"),)}, None, NotFound, "loras"),
        ({}, "no_such_model", NotFound, "model"),
    ],
)
def test_submit_refuses_before_storing(make_engine, request_fields, model, error, param):
    engine = make_engine(limits=Limits(max_steps=5, max_batch=2))
    with pytest.raises(error) as info:
        engine.submit(GenerateRequest(**{"prompt": "x", "steps": 2, **request_fields}), "native", model)
    assert info.value.param == param
    assert engine.store.recent() == []


# ---------------------------------------------------------------------------------------------- batching


def test_equal_settings_jobs_run_as_one_batch_and_others_alone(make_engine, pipe, monkeypatch):
    engine = make_engine(max_batch_rows=8)
    settings = dict(steps=3, width=64, height=64)
    txt2img = [
        GenerateRequest(prompt="a red circle", seed=1, **settings),
        GenerateRequest(prompt="a blue square", seed=22, **settings),
        GenerateRequest(prompt="a green triangle", seed=333, **settings),
        GenerateRequest(prompt="two yellow circles", seed=4444, **settings),
    ]
    edit = GenerateRequest(prompt="a red circle", seed=5, edit=Edit(image=noise_image(64, 64, 1)), **settings)
    hires = GenerateRequest(prompt="a red circle", seed=6, hires=HiresFix(scale=1.25, steps=2), **settings)
    other = GenerateRequest(prompt="a red circle", seed=7, steps=4)
    order = [txt2img[0], edit, txt2img[1], hires, txt2img[2], other, txt2img[3]]
    jobs = [engine.submit(req, "native") for req in order]  # all queued before the worker starts
    calls = record_calls(monkeypatch, pipe)
    engine.start()
    ended = wait_all(engine, jobs)
    assert [job.status for job in ended] == ["done"] * len(order), [job.error for job in ended]

    kinds = [(kind, [r.prompt for r in reqs]) for kind, reqs in calls]
    assert kinds == [
        ("batch", [r.prompt for r in txt2img]),  # the first job and the waiting jobs of its settings
        ("run", [edit.prompt]),
        ("run", [hires.prompt]),
        ("run", [other.prompt]),
    ]
    assert [r.seed for r in calls[0][1]] == [1, 22, 333, 4444]
    assert calls[1][1][0].edit is not None and calls[2][1][0].hires is not None
    assert engine.jobs_run == len(order)

    monkeypatch.undo()
    by_id = {job.id: job for job in ended}
    alone = [pipe.run(req) for req in txt2img]
    for job, req, want in zip(jobs[::2], txt2img, alone, strict=True):
        done = by_id[job.id]
        assert done.result["seeds"] == want.seeds and done.result["infotexts"] == want.infotexts
        with Image.open(engine.store.image_file(done.result["images"][0])) as im:
            got = im.convert("RGB")
        diff = pixel_diff(got, want.images[0])
        assert close(got, want.images[0]), f"{req.prompt}: max {diff.max()}, mean {diff.mean():.3f}"
    assert not close(alone[0].images[0], alone[1].images[0])  # the tolerance tells the images apart


def test_without_batching_each_job_runs_alone(make_engine, pipe, monkeypatch):
    engine = make_engine(batching=False)
    jobs = [engine.submit(GenerateRequest(prompt=f"circle {i}", steps=2, seed=i), "native") for i in range(3)]
    calls = record_calls(monkeypatch, pipe)
    engine.start()
    assert [job.status for job in wait_all(engine, jobs)] == ["done"] * 3
    assert [(kind, reqs[0].seed) for kind, reqs in calls] == [("run", 0), ("run", 1), ("run", 2)]


def test_a_batch_holds_at_most_max_batch_rows_images(make_engine, pipe, monkeypatch):
    engine = make_engine(max_batch_rows=5)
    jobs = [
        engine.submit(GenerateRequest(prompt=f"circle {i}", steps=2, seed=10 * i, num_images=2), "native")
        for i in range(4)
    ]
    calls = record_calls(monkeypatch, pipe)
    engine.start()
    assert [job.status for job in wait_all(engine, jobs)] == ["done"] * 4
    assert [(kind, [r.seed for r in reqs]) for kind, reqs in calls] == [
        ("batch", [0, 10]),
        ("batch", [20, 30]),
    ]
    assert [len(job.result["images"]) for job in wait_all(engine, jobs)] == [2] * 4


# ---------------------------------------------------------------------------------------------- cancel, failures


def test_cancel_a_queued_job(make_engine):
    engine = make_engine()
    keep = engine.submit(GenerateRequest(prompt="keep", steps=2, seed=1), "native")
    drop = engine.submit(GenerateRequest(prompt="drop", steps=2, seed=2), "native")
    events = []
    engine.listen(drop.id, lambda e: events.append(e["event"]))
    cancelled = engine.cancel(drop.id)
    assert cancelled.status == "cancelled" and cancelled.error["type"] == "Cancelled"
    assert events == ["cancelled"]
    engine.start()
    assert wait(engine, keep.id).status == "done"
    after = engine.store.get(drop.id)
    assert after.status == "cancelled" and after.result == {} and after.started is None
    assert not engine.store.image_path(drop.id, 0).exists()
    assert events == ["cancelled"]
    with pytest.raises(Conflict) as info:
        engine.cancel(keep.id)
    assert info.value.param == "id"
    with pytest.raises(Conflict):
        engine.cancel(drop.id)
    with pytest.raises(NotFound):
        engine.cancel("ffffffffffffffffffffffff")


def test_cancel_a_running_job_at_its_next_step(make_engine):
    engine = make_engine()
    job = engine.submit(GenerateRequest(prompt="x", steps=6, seed=1), "native")
    events = []

    def listener(event):
        events.append(event["event"])
        if event["event"] == "progress" and event["progress"].step == 1:
            engine.cancel(job.id)

    engine.listen(job.id, listener)
    engine.start()
    ended = wait(engine, job.id)
    assert ended.status == "cancelled" and ended.error["type"] == "Cancelled"
    assert events == ["running", "progress", "progress", "cancelled"]
    assert not engine.store.image_path(job.id, 0).exists()


def test_an_unexpected_error_fails_the_job_and_the_worker_goes_on(make_engine, pipe, monkeypatch):
    engine = make_engine(batching=False)
    run = pipe.run

    def failing_run(request, *args, **kwargs):
        if request.prompt == "boom":
            raise RuntimeError("CUDA error: an illegal memory access (secret detail)")
        return run(request, *args, **kwargs)

    monkeypatch.setattr(pipe, "run", failing_run)
    boom = engine.submit(GenerateRequest(prompt="boom", steps=2, seed=1), "native")
    fine = engine.submit(GenerateRequest(prompt="fine", steps=2, seed=2), "native")
    events = []
    engine.listen(boom.id, lambda e: events.append(e["event"]))
    engine.start()
    failed, done = wait(engine, boom.id), wait(engine, fine.id)
    assert failed.status == "failed"
    assert failed.error["type"] == "InternalError" and failed.error["param"] is None
    assert "secret detail" not in failed.error["message"]  # internals go to the log, not to clients
    assert failed.result == {}
    assert events == ["running", "failed"]
    assert done.status == "done" and len(done.result["images"]) == 1
    assert engine.ready
    # and it still takes jobs afterwards
    later = engine.submit(GenerateRequest(prompt="later", steps=2, seed=3), "native")
    assert wait(engine, later.id).status == "done"


def test_progress_listeners_get_running_progress_done_in_order(make_engine):
    engine = make_engine()
    job = engine.submit(GenerateRequest(prompt="x", steps=4, seed=1), "native")
    events = []
    engine.listen(job.id, events.append)

    def broken(event):
        raise ValueError("a listener that fails")

    engine.listen(job.id, broken)  # its failure is its own: the job and the other listener go on
    stopped = []
    stop = engine.listen(job.id, stopped.append)
    stop()
    engine.start()
    assert wait(engine, job.id).status == "done"
    names = [e["event"] for e in events]
    assert names == ["running"] + ["progress"] * 4 + ["done"]
    fractions = [e["progress"].fraction for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[0] > 0 and fractions[-1] == pytest.approx(1.0)
    assert [e["progress"].step for e in events[1:-1]] == [0, 1, 2, 3]
    assert stopped == []
    assert engine.live(job.id) is None  # no live state once it ended


def test_stop_during_a_running_job_requeues_it(make_engine, tmp_path):
    data_dir = tmp_path / "shared"
    engine = make_engine(data_dir=data_dir)
    job = engine.submit(GenerateRequest(prompt="x", steps=8, seed=1), "native")
    in_step = threading.Event()
    events = []

    def listener(event):
        events.append(event["event"])
        if event["event"] == "progress" and not in_step.is_set():
            in_step.set()
            # hold the worker inside its first step until stop() has begun, so the stop lands mid-job
            deadline = time.monotonic() + TIMEOUT_S
            while not engine._stopping.is_set() and time.monotonic() < deadline:
                time.sleep(0.005)

    engine.listen(job.id, listener)
    engine.start()
    assert in_step.wait(TIMEOUT_S)
    live = engine.live(job.id)
    assert live is not None and live.steps == 8
    engine.stop(timeout=TIMEOUT_S)
    assert not engine.ready
    assert "cancelled" not in events and "failed" not in events and "done" not in events

    store = JobStore(data_dir)
    try:
        stored = store.get(job.id)
        assert stored.status == "queued" and stored.error is None and stored.attempts == 0
        assert not store.image_path(job.id, 0).exists()
    finally:
        store.close()

    # the next start runs it to the end
    again = make_engine(data_dir=data_dir)
    again.start()
    done = wait(again, job.id)
    assert done.status == "done" and done.attempts == 1 and done.result["seeds"] == [1]
