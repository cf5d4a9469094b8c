"""What Ray Serve adds to one request: p50 latency of the same request through ``sd35 serve`` and through
``sd35 serve --ray --replicas 1`` on this machine (the demo model, one thread each).

    python benchmarks/ray_overhead.py [--requests 30] [--repeats 3] [--json ray.json]

Both servers run at once, each with its own data folder; requests are sequential (one client), so the
difference is the per-request cost of Ray's HTTP proxy, its router and the hop to the replica process, not
of queueing. Blocks of ``--requests`` requests alternate between the servers, ``--repeats`` times. The
requests: ``GET /sdapi/v1/samplers`` (no model work: the proxy's cost alone), ``GET /health`` (on Ray it
also asks Serve's controller for every replica's state), A1111 ``txt2img`` with 2 steps (a short job) and
with 20 steps (the model's default run on the demo model). Also reported: the time from starting
each server to its first healthy ``/health``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import Server  # noqa: E402 (the benchmark folder is not a package)

REQUESTS = {
    "GET /sdapi/v1/samplers": ("GET", "/sdapi/v1/samplers", None),
    "GET /health": ("GET", "/health", None),
    "txt2img, 2 steps": ("POST", "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 2, "seed": 1}),
    "txt2img, 20 steps": ("POST", "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 20, "seed": 1}),
}


def block(client: httpx.Client, url: str, request: tuple, n: int) -> list[float]:
    method, path, body = request
    times = []
    for _ in range(n):
        start = time.perf_counter()
        r = client.request(method, url + path, json=body)
        times.append(time.perf_counter() - start)
        r.raise_for_status()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="sd35-ray-bench-"))
    started = time.monotonic()
    plain = Server("plain", folder, 1)
    plain.wait_ready()
    plain_start = time.monotonic() - started
    started = time.monotonic()
    ray = Server("ray", folder, 1, "--ray", "--replicas", "1")
    ray.wait_ready(timeout=300)
    ray_start = time.monotonic() - started
    samples: dict[str, dict[str, list[float]]] = {name: {"plain": [], "ray": []} for name in REQUESTS}
    try:
        with httpx.Client(timeout=120) as client:
            for server in (plain, ray):  # warm-up: the first runs of a process are slower
                for request in REQUESTS.values():
                    block(client, server.url, request, 3)
            for repeat in range(args.repeats):
                for name, request in REQUESTS.items():
                    order = (plain, ray) if repeat % 2 == 0 else (ray, plain)
                    for server in order:
                        samples[name][server.name] += block(client, server.url, request, args.requests)
    finally:
        ray.stop()
        plain.stop()

    rows = {}
    print(
        f"{platform.node()}: {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    print(f"start to healthy: plain {plain_start:.1f} s, ray (Ray + 1 replica) {ray_start:.1f} s")
    print(f"{'request':<24} {'plain p50 ms':>13} {'ray p50 ms':>11} {'overhead ms':>12}")
    for name, by in samples.items():
        a, b = statistics.median(by["plain"]) * 1e3, statistics.median(by["ray"]) * 1e3
        rows[name] = {"plain_p50_ms": a, "ray_p50_ms": b, "overhead_ms": b - a, "n": len(by["ray"])}
        print(f"{name:<24} {a:>13.1f} {b:>11.1f} {b - a:>12.1f}")
    if args.json:
        args.json.write_text(
            json.dumps({"start_s": {"plain": plain_start, "ray": ray_start}, "p50": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
