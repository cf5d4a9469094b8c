"""ComfyUI's HTTP API and websocket on a real ``sd35 serve`` over tiny random weights: a ComfyUI client
library from PyPI (comfy-api-simplified) queues ComfyUI's SD3 example workflow unchanged and gets the very
file ``sd35 run`` writes for it; the websocket speaks ComfyUI's messages in ComfyUI's order to the client
that queued; bad graphs are 400s in ComfyUI's shape with nothing queued; /view keeps to its folders;
uploads round-trip; a key guards the websocket; /interrupt stops a run; a queued workflow survives a crash.
"""

from __future__ import annotations

import io
import json
import struct
import time
import uuid

import httpx
import numpy as np
import pytest
from comfy_api_simplified import ComfyApiWrapper
from PIL import Image
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.helpers import run_cli
from tests.server.http_helpers import wait_until
from tests.server.server_helpers import ServerProcess, db_rows
from tests.workflows.test_image_nodes import img2img
from tests.workflows.test_workflows import STEPS, TE_NAMES, sd35_example

KEY = "comfy-key-123"
ALL_IN_ONE = "sd3.5_medium_incl_clips.safetensors"
LORA = "style.safetensors"
LONG_STEPS = 150  # a run long enough to interrupt or kill in the middle (a few seconds on tiny weights)


@pytest.fixture(scope="module")
def models(tiny, tiny_pipe, tmp_path_factory):
    """ComfyUI's models folder over the tiny set (links, not copies), with a LoRA for it."""
    from sd35.lora import save_lora
    from tests.lora.lora_helpers import lora_models, mixed_lora

    root = tmp_path_factory.mktemp("comfy-models")
    for folder in ("checkpoints", "text_encoders", "loras"):
        (root / folder).mkdir()
    save_lora(root / "loras" / LORA, mixed_lora(lora_models(tiny_pipe), seed=3, scale=0.5))
    (root / "checkpoints" / "sd3.5_medium.safetensors").symlink_to(tiny["official"])
    (root / "checkpoints" / ALL_IN_ONE).symlink_to(tiny["all_in_one"])
    for name in TE_NAMES:
        (root / "text_encoders" / name).symlink_to(tiny["text_encoders"] / name)
    return root


def serve_args(tiny, models) -> list[str]:
    """The server's model: the files the example workflow names, as ComfyUI's folder has them (so the
    example reuses the server's pipeline)."""
    te = [str(models / "text_encoders" / n) for n in TE_NAMES]
    return ["--model", str(models / "checkpoints" / "sd3.5_medium.safetensors"), "--text-encoders", *te,
            "--tokenizers", str(tiny["diffusers"]), "--device", "cpu", "--dtype", "fp32",
            "--models-dir", str(models)]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny, models, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("comfy") / "data", *serve_args(tiny, models)) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def example(**sampler) -> dict:
    """The SD3 example as a ComfyUI front end posts it (node titles in ``_meta``)."""
    workflow = sd35_example()
    workflow["3"]["inputs"].update(sampler)
    for node in workflow.values():
        node["_meta"] = {"title": node["class_type"]}
    workflow["9"]["_meta"] = {"title": "Save Image"}
    return workflow


def all_in_one() -> dict:
    """The example on the all-in-one checkpoint (its own text encoders): files the server has not loaded."""
    workflow = example()
    del workflow["11"]
    workflow["4"]["inputs"]["ckpt_name"] = ALL_IN_ONE
    for node in ("6", "71"):
        workflow[node]["inputs"]["clip"] = ["4", 1]
    return workflow


def with_lora() -> dict:
    """The example with a LoraLoader on the model and the text encoders."""
    workflow = example()
    workflow["20"] = {
        "class_type": "LoraLoader",
        "inputs": {"model": ["4", 0], "clip": ["11", 0], "lora_name": LORA, "strength_model": 0.8,
                   "strength_clip": 0.8},
        "_meta": {"title": "Load LoRA"},
    }  # fmt: skip
    workflow["13"]["inputs"]["model"] = ["20", 0]
    for node in ("6", "71"):
        workflow[node]["inputs"]["clip"] = ["20", 1]
    return workflow


def ws_url(server, client_id: str, **query: str) -> str:
    more = "".join(f"&{k}={v}" for k, v in query.items())
    return f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}{more}"


def messages_until_done(ws, prompt_id: str, timeout: float = 60) -> list:
    """Every message (JSON decoded; binary frames as bytes) up to ``executing`` with ``node: null``."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        raw = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        item = raw if isinstance(raw, bytes) else json.loads(raw)
        got.append(item)
        if isinstance(item, dict) and item["type"] == "executing":
            data = item["data"]
            if data["node"] is None and data["prompt_id"] == prompt_id:
                return got


def history(client, prompt_id: str, timeout: float = 60) -> dict:
    return wait_until(
        lambda: client.get(f"/history/{prompt_id}").json().get(prompt_id),
        timeout,
        0.05,
        "the prompt's history",
    )


def test_a_comfyui_client_gets_the_file_sd35_run_writes(server, client, tiny, models, tmp_path, capsys):
    """The example reuses the server's pipeline (with a LoRA too); the all-in-one workflow loads its file
    (and the server's model comes back for the next job that needs it)."""
    api = ComfyApiWrapper(server.url)
    made = []
    for number, workflow in enumerate([example(), with_lora(), all_in_one(), example()], start=1):
        name = f"ComfyUI_{number:05}_.png"
        images = api.queue_and_wait_images(workflow, "Save Image")
        assert list(images) == [name]
        made.append(np.asarray(Image.open(io.BytesIO(images[name]))))
        path = tmp_path / f"{number}.json"
        path.write_text(json.dumps(workflow))
        code, _, err = run_cli(
            capsys, "run", str(path), "--models-dir", str(models), "--tokenizers", str(tiny["diffusers"]),
            "--device", "cpu", "--dtype", "fp32", "-o", str(tmp_path / str(number)),
        )  # fmt: skip
        assert code == 0, err
        assert images[name] == (tmp_path / str(number) / "ComfyUI_00001_.png").read_bytes(), workflow["4"]
    assert not np.array_equal(made[0], made[1])  # the LoRA took effect
    assert np.array_equal(made[0], made[3])  # and is gone again

    # the history names the files, and the queue is empty again
    entry = list(client.get("/history").json().values())[0]
    assert entry["outputs"] == {
        "9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}
    }
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    assert entry["prompt"][2]["3"]["inputs"]["seed"] == example()["3"]["inputs"]["seed"]
    assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_websocket_messages_come_in_comfyuis_order_to_the_client_that_queued(server, client):
    mine, other = uuid.uuid4().hex, uuid.uuid4().hex
    with connect(ws_url(server, mine)) as ws, connect(ws_url(server, other)) as bystander:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "status" and hello["data"]["sid"] == mine
        assert hello["data"]["status"]["exec_info"]["queue_remaining"] == 0
        json.loads(bystander.recv(timeout=10))
        prompt_id = str(uuid.uuid4())  # a client may name its prompt
        body = {
            "prompt": example(),
            "client_id": mine,
            "extra_data": {"preview_method": "auto"},
            "prompt_id": prompt_id,
        }
        r = client.post("/api/prompt", json=body)  # ComfyUI's newer front ends call /api/...
        assert r.status_code == 200, r.text
        assert r.json()["prompt_id"] == prompt_id
        assert r.json()["node_errors"] == {} and isinstance(r.json()["number"], int)
        got = messages_until_done(ws, prompt_id)
        got.append(json.loads(ws.recv(timeout=10)))  # then the queue's new length, as ComfyUI sends it
        seen_by_other = []
        while True:
            try:
                seen_by_other.append(json.loads(bystander.recv(timeout=1)))
            except TimeoutError:
                break

    frames = [m for m in got if isinstance(m, bytes)]
    events = [m for m in got if isinstance(m, dict)]
    kinds = [m["type"] for m in events if m["type"] != "status"]
    assert kinds == ["execution_start", "execution_cached", "executing", *["progress"] * STEPS,
                     "executing", "executed", "execution_success", "executing"]  # fmt: skip
    assert events[-1]["type"] == "status"
    by_kind = {}
    for m in events:
        by_kind.setdefault(m["type"], []).append(m["data"])
    assert all(d["prompt_id"] == prompt_id for k, ds in by_kind.items() if k != "status" for d in ds)
    assert [d["node"] for d in by_kind["executing"]] == ["3", "9", None]
    assert [(d["value"], d["max"], d["node"]) for d in by_kind["progress"]] == [
        (i, STEPS, "3") for i in range(1, STEPS + 1)
    ]
    (executed,) = by_kind["executed"]
    assert executed["node"] == "9" and executed["output"]["images"][0]["type"] == "output"
    # the first status after queueing counts this prompt; the last (after it ended) is empty again
    statuses = [d["status"]["exec_info"]["queue_remaining"] for d in by_kind["status"]]
    assert statuses[0] == 1 and statuses[-1] == 0
    # one preview per step: ComfyUI's binary frame (PREVIEW_IMAGE, JPEG) of a readable JPEG
    assert len(frames) == STEPS
    for frame in frames:
        assert struct.unpack(">II", frame[:8]) == (1, 1)
        assert Image.open(io.BytesIO(frame[8:])).format == "JPEG"
    # the bystander heard only queue statuses
    assert seen_by_other and {m["type"] for m in seen_by_other} == {"status"}
    # a prompt_id is used once
    again = client.post("/prompt", json=body)
    assert again.status_code == 400 and "taken" in again.json()["error"]["message"]


def _queued_jobs(data_dir) -> int:
    return len(db_rows(data_dir))


BAD = [
    ("3", "cfg", lambda w: w["3"]["inputs"].pop("cfg"), "required_input_missing"),
    ("3", "sampler_name", lambda w: w["3"]["inputs"].update(sampler_name="nope"), "value_not_in_list"),
    ("4", "ckpt_name", lambda w: w["4"]["inputs"].update(ckpt_name="../../etc/passwd"), "invalid_model_name"),
    (
        "3",
        "steps",
        lambda w: w["3"]["inputs"].update(steps=5000),
        "value_bigger_than_max",
    ),  # the server's limit
    ("181", "steps", lambda w: _hires(w, steps=5000), "value_bigger_than_max"),  # on a second pass too
]


def _hires(workflow: dict, **second) -> None:
    """A second KSampler over the first one's latent upscaled 1.5x (ComfyUI's hires fix), saved."""
    workflow["180"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 1.5},
    }
    workflow["181"] = {
        "class_type": "KSampler",
        "inputs": workflow["3"]["inputs"] | {"latent_image": ["180", 0]},
    }
    workflow["181"]["inputs"].update(denoise=0.5, **second)
    workflow["182"] = {"class_type": "VAEDecode", "inputs": {"samples": ["181", 0], "vae": ["4", 2]}}
    workflow["183"] = {"class_type": "SaveImage", "inputs": {"images": ["182", 0], "filename_prefix": "hi"}}


@pytest.mark.parametrize(("node", "name", "change", "kind"), BAD, ids=[f"{b[0]}.{b[1]}" for b in BAD])
def test_a_bad_graph_is_comfyuis_400_naming_the_node_and_nothing_is_queued(
    server, client, node, name, change, kind
):
    before = _queued_jobs(server.data_dir)
    workflow = example()
    change(workflow)
    r = client.post("/prompt", json={"prompt": workflow, "client_id": "x"})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["error"]["message"] == "Prompt outputs failed validation"
    assert f"node {node}" in body["error"]["details"]
    entry = body["node_errors"][node]
    assert entry["class_type"] == workflow[node]["class_type"]
    assert [(e["type"], e["extra_info"].get("input_name")) for e in entry["errors"]] == [(kind, name)]
    assert _queued_jobs(server.data_dir) == before


def test_what_is_not_a_graph_is_refused_in_comfyuis_shape(server, client):
    before = _queued_jobs(server.data_dir)
    for body, kind in [
        ({}, "no_prompt"),
        ({"prompt": [1, 2]}, "invalid_prompt"),
        ({"prompt": {"1": {"inputs": {}}}}, "invalid_prompt"),
        ({"prompt": {"1": {"class_type": "VAEDecode", "inputs": {}}}}, "prompt_no_outputs"),
    ]:
        r = client.post("/prompt", json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == kind, r.text
        assert set(r.json()) == {"error", "node_errors"}
    r = client.post("/prompt", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert _queued_jobs(server.data_dir) == before


def test_view_keeps_to_comfyuis_folders(server, client):
    root = server.data_dir / "comfyui"
    (root / "output").mkdir(parents=True, exist_ok=True)
    secret = server.data_dir / "jobs.sqlite3"
    (root / "output" / "escape.png").symlink_to(secret)
    (root / "output" / "up").symlink_to(server.data_dir, target_is_directory=True)
    attacks = [
        ({"filename": "../jobs.sqlite3"}, 400),
        ({"filename": "jobs.sqlite3", "subfolder": ".."}, 400),
        ({"filename": "jobs.sqlite3", "subfolder": "../.."}, 400),
        ({"filename": str(secret)}, 400),
        ({"filename": "jobs.sqlite3", "subfolder": str(server.data_dir)}, 400),
        ({"filename": "..\\jobs.sqlite3"}, 400),
        ({"filename": "escape.png"}, 404),  # a link out of the folder
        ({"filename": "jobs.sqlite3", "subfolder": "up"}, 404),
        ({"filename": "missing.png"}, 404),
        ({"filename": "x.png", "type": "models"}, 400),
        ({"filename": ""}, 400),
    ]
    for params, status in attacks:
        r = client.get("/view", params=params)
        assert r.status_code == status, (params, r.status_code, r.text)
        assert b"SQLite" not in r.content


def _png(color, size=(8, 8), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def test_uploads_round_trip_through_view(client):
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))

    def upload(data, **form):
        r = client.post("/upload/image", files={"image": ("pic.png", data, "image/png")}, data=form)
        assert r.status_code == 200, r.text
        return r.json()

    first = upload(red, subfolder="tests")
    assert first == {"name": "pic.png", "subfolder": "tests", "type": "input"}
    assert upload(blue, subfolder="tests")["name"] == "pic (1).png"  # a taken name: ComfyUI's next name
    assert upload(red, subfolder="tests")["name"] == "pic.png"  # the same bytes: the same file
    assert upload(blue, subfolder="tests", overwrite="true")["name"] == "pic.png"
    got = client.get("/view", params={"filename": "pic.png", "subfolder": "tests", "type": "input"})
    assert got.status_code == 200 and got.content == blue
    assert (
        client.get(
            "/api/view", params={"filename": "pic (1).png", "subfolder": "tests", "type": "input"}
        ).content
        == blue
    )

    # the mask editor's upload: the original's colours with the mask's alpha
    mask = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    mask.paste((0, 0, 0, 255), (0, 0, 4, 8))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    ref = json.dumps({"filename": "pic.png", "subfolder": "tests", "type": "input"})
    r = client.post(
        "/upload/mask",
        files={"image": ("clipspace-mask.png", buffer.getvalue(), "image/png")},
        data={"original_ref": ref, "subfolder": "clipspace", "type": "input"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
    masked = Image.open(
        io.BytesIO(client.get("/view", params={**r.json(), "filename": "clipspace-mask.png"}).content)
    )
    values = np.asarray(masked.convert("RGBA"))
    assert (values[..., :3] == (0, 0, 255)).all()
    assert (values[:, :4, 3] == 255).all() and (values[:, 4:, 3] == 0).all()

    # what is not an image, and a name that climbs out, are refused
    r = client.post("/upload/image", files={"image": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 400 and "image" in r.json()["error"]["message"]
    r = client.post(
        "/upload/image", files={"image": ("pic.png", red, "image/png")}, data={"subfolder": "../.."}
    )
    assert r.status_code == 400


def test_an_uploaded_image_runs_img2img_as_sd35_run_runs_it(server, client, tiny, models, tmp_path, capsys):
    """A front end's img2img: upload the picture, queue LoadImage -> VAEEncode -> KSampler (denoise 0.6)
    naming it, and get the file ``sd35 run --input-dir`` writes for the same graph; /object_info lists
    the upload as LoadImage's choice."""
    rng = np.random.default_rng(4)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    r = client.post("/upload/image", files={"image": ("photo.png", buffer.getvalue(), "image/png")},
                    data={"subfolder": "img2img"})  # fmt: skip
    assert r.status_code == 200, r.text
    load = client.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"]
    assert "img2img/photo.png" in load[0] and load[1] == {"image_upload": True}
    workflow = img2img(image="img2img/photo.png")
    r = client.post("/prompt", json={"prompt": workflow, "client_id": "img2img"})
    assert r.status_code == 200, r.text
    entry = history(client, r.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image,) = entry["outputs"]["9"]["images"]
    served = client.get("/view", params=image).content
    path = tmp_path / "img2img.json"
    path.write_text(json.dumps(workflow))
    inputs = tmp_path / "input"
    (inputs / "img2img").mkdir(parents=True)
    (inputs / "img2img" / "photo.png").write_bytes(buffer.getvalue())
    code, _, err = run_cli(
        capsys, "run", str(path), "--models-dir", str(models), "--input-dir", str(inputs), "--tokenizers",
        str(tiny["diffusers"]), "--device", "cpu", "--dtype", "fp32", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, err
    assert served == (tmp_path / "out" / "ComfyUI_00001_.png").read_bytes()


def test_object_info_and_the_other_listings(client):
    info = client.get("/object_info").json()
    assert {"CheckpointLoaderSimple", "KSampler", "SaveImage", "TripleCLIPLoader"} <= set(info)
    ckpt = client.get("/api/object_info/CheckpointLoaderSimple").json()["CheckpointLoaderSimple"]
    assert ckpt["input"]["required"]["ckpt_name"][0][:2] == sorted([ALL_IN_ONE, "sd3.5_medium.safetensors"])
    assert ckpt["output"] == ["MODEL", "CLIP", "VAE"] and ckpt["output_node"] is False
    sampler = info["KSampler"]["input"]["required"]
    assert "euler" in sampler["sampler_name"][0] and sampler["steps"][0] == "INT"
    assert info["SaveImage"]["output_node"] is True
    assert client.get("/object_info/NoSuchNode").json() == {}
    assert client.get("/models/text_encoders").json() == sorted(TE_NAMES)
    assert "checkpoints" in client.get("/models").json()
    assert client.get("/models/nope").status_code == 404
    assert client.get("/embeddings").json() == [] and client.get("/api/extensions").json() == []
    stats = client.get("/system_stats").json()
    assert stats["devices"][0]["type"] == "cpu" and stats["system"]["ram_total"] > 0


def test_a_prompt_that_fails_while_running_is_comfyuis_execution_error(server, client, models):
    """A checkpoint that passes the name check but is not weights fails at load: the client hears
    execution_error for it, the history keeps the message, and the server's model serves the next prompt."""
    broken = models / "checkpoints" / "broken.safetensors"
    broken.write_bytes(b"not weights at all")
    try:
        workflow = example()
        workflow["4"]["inputs"]["ckpt_name"] = broken.name
        client_id = uuid.uuid4().hex
        with connect(ws_url(server, client_id)) as ws:
            r = client.post("/prompt", json={"prompt": workflow, "client_id": client_id})
            assert r.status_code == 200, r.text
            prompt_id = r.json()["prompt_id"]
            got = messages_until_done(ws, prompt_id)
    finally:
        broken.unlink()
    (error,) = [m["data"] for m in got if isinstance(m, dict) and m["type"] == "execution_error"]
    assert error["prompt_id"] == prompt_id and error["node_id"] == "3" and error["node_type"] == "KSampler"
    assert "broken.safetensors" in error["exception_message"]
    entry = history(client, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert "broken.safetensors" in entry["status"]["messages"][-1][1]["exception_message"]
    api = ComfyApiWrapper(server.url)
    assert len(api.queue_and_wait_images(example(seed=99), "Save Image")) == 1


def test_interrupt_stops_the_running_prompt(server, client):
    client_id = uuid.uuid4().hex
    with connect(ws_url(server, client_id)) as ws:
        r = client.post("/prompt", json={"prompt": example(steps=LONG_STEPS), "client_id": client_id})
        prompt_id = r.json()["prompt_id"]
        wait_until(lambda: client.get("/queue").json()["queue_running"], 30, 0.02, "the prompt running")
        running = client.get("/queue").json()["queue_running"]
        assert [item[1] for item in running] == [prompt_id] and running[0][4] == ["9"]
        assert client.post("/interrupt").status_code == 200
        got = messages_until_done(ws, prompt_id)
    kinds = [m["type"] for m in got if isinstance(m, dict)]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds
    entry = history(client, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert sum(1 for m in got if isinstance(m, dict) and m["type"] == "progress") < LONG_STEPS

    # history can forget it
    assert client.post("/history", json={"delete": [prompt_id]}).status_code == 200
    assert client.get(f"/history/{prompt_id}").json() == {}


def test_queue_delete_and_clear_drop_pending_prompts(server, client):
    ids = [
        client.post("/prompt", json={"prompt": example(steps=LONG_STEPS, seed=s)}).json()["prompt_id"]
        for s in range(3)
    ]
    wait_until(lambda: client.get("/queue").json()["queue_running"], 30, 0.02, "the first prompt running")
    pending = [item[1] for item in client.get("/queue").json()["queue_pending"]]
    assert pending == ids[1:]
    client.post("/queue", json={"delete": [ids[1]]})
    assert [item[1] for item in client.get("/queue").json()["queue_pending"]] == [ids[2]]
    client.post("/queue", json={"clear": True})
    assert client.get("/queue").json()["queue_pending"] == []
    client.post("/interrupt", json={"prompt_id": ids[0]})
    history(client, ids[0])
    assert client.get(f"/history/{ids[1]}").json() == {}  # deleted before it ran: never in the history


def test_a_prompt_queued_at_the_front_runs_next(server, client):
    """``front: true`` goes before the waiting prompts, with ComfyUI's negative number; it runs next."""
    first = client.post("/prompt", json={"prompt": example(steps=LONG_STEPS, seed=20)}).json()["prompt_id"]
    wait_until(lambda: client.get("/queue").json()["queue_running"], 30, 0.02, "the first prompt running")
    later = client.post("/prompt", json={"prompt": example(seed=21)}).json()
    front = client.post("/prompt", json={"prompt": example(seed=22), "front": True}).json()
    assert front["number"] < 0 < later["number"]
    pending = client.get("/queue").json()["queue_pending"]
    assert [item[1] for item in pending] == [front["prompt_id"], later["prompt_id"]]
    assert pending[0][0] == front["number"]
    client.post("/interrupt", json={"prompt_id": first})
    done = [history(client, p) for p in (front["prompt_id"], later["prompt_id"])]
    assert all(entry["status"]["status_str"] == "success" for entry in done)
    started = [entry["status"]["messages"][0][1]["timestamp"] for entry in done]
    assert started[0] < started[1]  # the front prompt ran first


@pytest.fixture(scope="module")
def keyed(tiny, models, tmp_path_factory):
    proc = ServerProcess(
        tmp_path_factory.mktemp("comfy-keyed") / "data", *serve_args(tiny, models), "--api-key", KEY
    )
    with proc:
        yield proc


def test_the_websocket_needs_the_key_when_the_server_has_one(keyed):
    for url, headers in [(ws_url(keyed, "a"), {}), (ws_url(keyed, "a", token="wrong-key-000"), {})]:
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers)
        assert refused.value.response.status_code == 403
    for url, headers in [
        (ws_url(keyed, "a", token=KEY), {}),
        (ws_url(keyed, "a"), {"Authorization": f"Bearer {KEY}"}),
        (ws_url(keyed, "a"), {"X-API-Key": KEY}),
    ]:
        with connect(url, additional_headers=headers) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "status"
    assert httpx.get(keyed.url + "/queue").status_code == 401
    assert httpx.get(keyed.url + "/api/object_info", headers={"X-API-Key": KEY}).status_code == 200


def test_a_queued_workflow_survives_a_crash(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed.url, timeout=30, headers=headers) as client:
        ids = [
            client.post("/prompt", json={"prompt": example(steps=LONG_STEPS, seed=s)}).json()["prompt_id"]
            for s in (1, 2)
        ]
        wait_until(lambda: client.get("/queue").json()["queue_running"], 30, 0.02, "the first prompt running")
        keyed.kill()
    rows = db_rows(keyed.data_dir)
    assert [rows[i]["status"] for i in ids] == ["running", "queued"]

    keyed.start()
    with httpx.Client(base_url=keyed.url, timeout=30, headers=headers) as client:
        entries = [history(client, i, timeout=120) for i in ids]
        assert [e["status"]["status_str"] for e in entries] == ["success", "success"]
        for entry in entries:
            (image,) = entry["outputs"]["9"]["images"]
            png = client.get("/view", params=image)
            assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (32, 32)
    assert db_rows(keyed.data_dir)[ids[0]]["attempts"] == 2
