"""What the HTTP tests of the native job API share: polling a job to its end, reading a Server-Sent Events
stream frame by frame, and opening a PNG the server sent."""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

FINAL = ("done", "failed", "cancelled")


def wait_final(client: httpx.Client, job_id: str, timeout: float = 60.0, interval: float = 0.05) -> dict:
    """GET /v1/jobs/{id} until the job has ended; its view then."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in FINAL:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout} s"
        time.sleep(interval)


def wait_until(check, timeout: float, interval: float = 0.02, what: str = "a condition"):
    """``check()`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(interval)


@dataclass
class Frame:
    """One SSE event: its ``id:``, ``event:`` and the ``data:`` lines joined."""

    id: str | None
    event: str
    data: str


def sse_frames(lines: Iterable[str]) -> Iterator[Frame]:
    """The events of an SSE stream (``:`` comment lines, such as keep-alives, are skipped)."""
    fields: dict[str, list[str]] = {}
    for line in lines:
        if line == "":
            if fields:
                yield Frame(
                    id=fields["id"][-1] if "id" in fields else None,
                    event=fields.get("event", ["message"])[-1],
                    data="\n".join(fields.get("data", [])),
                )
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
    assert not fields, f"the stream ended inside an event: {fields}"


def open_png(data: bytes) -> Image.Image:
    """A whole, valid PNG (verified, then opened again to read it); fails the test otherwise."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    Image.open(io.BytesIO(data)).verify()  # every chunk's CRC and the end of the file
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)
