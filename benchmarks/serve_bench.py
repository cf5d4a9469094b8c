"""``sd35 serve`` on the demo model: requests per second and latency, batching on and off, and the server's
overhead over calling the pipeline directly.

    python benchmarks/serve_bench.py [--requests 16] [--repeats 5] [--json serve.json]

Starts two servers on the demo model (64x64, 20 steps, the model's defaults), each a subprocess with its own
data folder: one as ``sd35 serve`` starts by default (batching equal-settings jobs) and one with
``--no-batching``. Every request has its own prompt and seed (so no prompt embedding is reused and nothing
is deduplicated).

Throughput: ``--requests`` requests per measurement (at least two per client), sent by C closed-loop clients (C = 1, 4, 16), each
``POST /v1/jobs`` and then following the job's Server-Sent Events (``GET /v1/jobs/{id}/events``) until its
``done`` event; latency is from the POST to that event. Both servers are measured in every repeat, the order
of servers and concurrencies rotating between repeats so the drift of a shared machine hits both alike;
the table shows the median over repeats of each repeat's requests/s, p50 and p95.

Overhead: at concurrency 1, blocks of ``--overhead-requests`` requests alternate between a direct
``pipe.run(GenerateRequest(...))`` in this process (the demo pipeline, loaded as the server loads it) and
the same work through the batching server, followed by SSE and by polling ``GET /v1/jobs/{id}`` every 10 ms.
Per repeat the block means are compared (server / direct - 1); the median of those ratios is the overhead.
The server's own run time of each job (``finished - started``) splits it into the engine's part and the
HTTP + queue + notification part. A fourth block reads each job only after it must have ended (nothing
talks to the server while it runs): its run time is the engine's cost without a client following the job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 4, 16)
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")
POLL_S = 0.010
QUIET_WAIT_S = 1.5  # several times a job's run on the demo model

_counter = 0


def next_prompt() -> tuple[str, int]:
    """A prompt and seed used by no other request of the run."""
    global _counter
    _counter += 1
    i = _counter
    colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    return f"a {colour} {shape}, picture {i}", 1000 + i


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m sd35.cli serve`` on the demo model with its own data folder and port."""

    def __init__(self, name: str, folder: Path, threads: int, *args: str):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"{name}.log"
        command = [sys.executable, "-m", "sd35.cli", "serve", "--port", str(self.port),
                   "--data-dir", str(folder / name), "--log-level", "warning", *args]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def submit(client: httpx.AsyncClient, url: str) -> str:
    prompt, seed = next_prompt()
    r = await client.post(url + "/v1/jobs", json={"prompt": prompt, "seed": seed})
    r.raise_for_status()
    return r.json()["id"]


async def follow_events(client: httpx.AsyncClient, url: str, job_id: str) -> dict:
    """The job as its final SSE event carries it."""
    event = None
    async with client.stream("GET", f"{url}/v1/jobs/{job_id}/events") as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("done", "failed", "cancelled"):
                job = json.loads(line[6:])
                if event != "done":
                    raise RuntimeError(f"job {job_id} {event}: {job.get('error')}")
                return job
    raise RuntimeError(f"the event stream of job {job_id} ended without a final event")


async def poll(client: httpx.AsyncClient, url: str, job_id: str) -> dict:
    while True:
        job = (await client.get(f"{url}/v1/jobs/{job_id}")).json()
        if job["status"] == "done":
            return job
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        await asyncio.sleep(POLL_S)


async def fetch_later(client: httpx.AsyncClient, url: str, job_id: str) -> dict:
    """The job, read once it should be done (nothing talks to the server while it runs)."""
    await asyncio.sleep(QUIET_WAIT_S)
    while (job := (await client.get(f"{url}/v1/jobs/{job_id}")).json())["status"] != "done":
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        await asyncio.sleep(0.1)
    return job


WAITS = {"sse": follow_events, "poll": poll, "quiet": fetch_later}


async def one_request(client: httpx.AsyncClient, url: str, wait) -> tuple[float, float]:
    """(latency, the server's run time of the job) in seconds."""
    t0 = time.perf_counter()
    job = await wait(client, url, await submit(client, url))
    return time.perf_counter() - t0, job["finished"] - job["started"]


async def closed_loop(url: str, requests: int, concurrency: int, wait=follow_events) -> dict:
    """``requests`` requests from ``concurrency`` clients that each send the next one when theirs is done."""
    left = requests
    latencies: list[float] = []
    runs: list[float] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            latency, run = await one_request(client, url, wait)
            latencies.append(latency)
            runs.append(run)

    limits = httpx.Limits(max_connections=2 * concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "rps": requests / wall,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "mean": statistics.fmean(latencies),
        "server_run_mean": statistics.fmean(runs),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def direct_block(pipe, requests: int) -> dict:
    from sd35.request import GenerateRequest

    times = []
    for _ in range(requests):
        prompt, seed = next_prompt()
        t0 = time.perf_counter()
        pipe.run(GenerateRequest(prompt=prompt, seed=seed))
        times.append(time.perf_counter() - t0)
    return {"mean": statistics.fmean(times), "p50": percentile(times, 50)}


def machine() -> dict:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import torch

    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def cell_requests(args: argparse.Namespace, concurrency: int) -> int:
    """Requests of one throughput measurement: at least two per client, so every client sends twice."""
    return max(args.requests, 2 * concurrency)


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--requests", type=int, default=16, help="requests per throughput measurement (at least 2 per client)"
    )
    ap.add_argument("--repeats", type=int, default=5, help="rounds of every measurement")
    ap.add_argument("--overhead-requests", type=int, default=6, help="requests per overhead block")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the servers and of the direct pipeline (default 1: on a shared machine, two "
        "threads stall whenever another process takes a core)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(REPO))
    from sd35.demo import load_demo_pipeline

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        servers = {
            "batching": Server("batching", Path(tmp), args.threads),
            "no-batching": Server("no-batching", Path(tmp), args.threads, "--no-batching"),
        }
        try:
            pipe = load_demo_pipeline()
            for server in servers.values():
                server.wait_ready()
            # warm-up: the first runs of each process (and each batch size) are slow
            direct_block(pipe, 3)
            for server in servers.values():
                for c in CONCURRENCY:
                    asyncio.run(closed_loop(server.url, c, c))

            cells: dict[tuple[str, int], list[dict]] = {(s, c): [] for s in servers for c in CONCURRENCY}
            overhead: dict[str, list[dict]] = {"direct": [], "sse": [], "poll": [], "quiet": []}
            for r in range(args.repeats):
                concurrencies = CONCURRENCY[r % 3 :] + CONCURRENCY[: r % 3]
                names = list(servers) if r % 2 == 0 else list(reversed(servers))
                for c in concurrencies:
                    for name in names:
                        result = asyncio.run(closed_loop(servers[name].url, cell_requests(args, c), c))
                        cells[(name, c)].append(result)
                        print(f"repeat {r + 1} {name:11} c={c:2}: {result['rps']:6.2f} req/s, "
                              f"p50 {result['p50'] * 1e3:6.0f} ms, p95 {result['p95'] * 1e3:6.0f} ms", flush=True)  # fmt: skip
                kinds = list(overhead)
                for kind in kinds[r % 4 :] + kinds[: r % 4]:
                    n, url = args.overhead_requests, servers["batching"].url
                    if kind == "direct":
                        overhead[kind].append(direct_block(pipe, n))
                    else:
                        overhead[kind].append(asyncio.run(closed_loop(url, n, 1, WAITS[kind])))
                    print(
                        f"repeat {r + 1} overhead {kind:6}: mean {overhead[kind][-1]['mean'] * 1e3:6.0f} ms",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()

    throughput = [
        {"server": name, "batching": name == "batching", "concurrency": c, "requests": cell_requests(args, c),
         "rps": med(rows, "rps"),
         "p50_s": med(rows, "p50"), "p95_s": med(rows, "p95"), "repeats": rows}
        for (name, c), rows in cells.items()
    ]  # fmt: skip
    direct = overhead["direct"]
    over = {"direct_mean_s": med(direct, "mean"), "direct_p50_s": med(direct, "p50")}
    for kind in WAITS:
        rows = overhead[kind]
        ratios = [s["mean"] / d["mean"] - 1 for s, d in zip(rows, direct, strict=True)]
        engine = [s["server_run_mean"] / d["mean"] - 1 for s, d in zip(rows, direct, strict=True)]
        over[kind] = {
            "server_run_mean_s": med(rows, "server_run_mean"),
            "engine_overhead": statistics.median(engine),
        }
        if kind != "quiet":  # its latency is the wait it chose
            over[kind].update(
                mean_s=med(rows, "mean"),
                p50_s=med(rows, "p50"),
                overhead=statistics.median(ratios),
                overhead_per_repeat=ratios,
            )
    info = machine()
    elapsed = time.perf_counter() - started
    print(f"\n{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}; "
          f"demo model 64x64, 20 steps, {args.threads} torch thread(s); {args.repeats} repeats ({elapsed:.0f} s)")  # fmt: skip
    print(f"\n{'server':12} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for row in sorted(throughput, key=lambda t: (t["concurrency"], not t["batching"])):
        print(f"{row['server']:12} {row['concurrency']:7} {row['requests']:8} {row['rps']:7.2f} {row['p50_s'] * 1e3:8.0f} "
              f"{row['p95_s'] * 1e3:8.0f}")  # fmt: skip
    print(
        f"\noverhead at 1 client ({args.overhead_requests} requests a block, median of {args.repeats} paired blocks)"
    )
    print(
        f"direct pipe.run: mean {over['direct_mean_s'] * 1e3:.0f} ms, p50 {over['direct_p50_s'] * 1e3:.0f} ms"
    )
    for kind, label in (("sse", "server, SSE"), ("poll", "server, poll 10 ms")):
        o = over[kind]
        print(f"{label:19}: mean {o['mean_s'] * 1e3:.0f} ms, p50 {o['p50_s'] * 1e3:.0f} ms, overhead "
              f"{o['overhead'] * 100:+.1f}% (of which the engine's run {o['engine_overhead'] * 100:+.1f}%)")  # fmt: skip
    o = over["quiet"]
    print(f"{'server, read after':19}: the engine's run {o['server_run_mean_s'] * 1e3:.0f} ms, "
          f"{o['engine_overhead'] * 100:+.1f}% (nothing follows the job while it runs)")  # fmt: skip
    if args.json:
        config = {"threads": args.threads, "requests": args.requests, "repeats": args.repeats, "overhead_requests": args.overhead_requests,
                  "model": "demo", "size": 64, "steps": 20, "concurrency": list(CONCURRENCY)}  # fmt: skip
        result = {
            "machine": info,
            "config": config,
            "seconds": elapsed,
            "throughput": throughput,
            "overhead": over,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
