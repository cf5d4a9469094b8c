"""The server starts on the demo model and answers the three API families (a first check; the real
clients' tests are beside it)."""

import json

import httpx


def test_health_and_a_job(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = httpx.post(
        server.url + "/sdapi/v1/txt2img",
        json={"prompt": "a red circle <lora:demo_style:0.8>", "width": 64, "height": 64, "steps": 4},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert 'LoRA: "demo_style:0.8"' in json.loads(r.json()["info"])["infotexts"][0]
