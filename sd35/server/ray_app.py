"""Scale-out serving on Ray Serve: the same app on replicas, one model (and one GPU) each.

Ray Serve places the replicas on the cluster's GPUs (``num_gpus`` per replica; CPU replicas where there
are none), balances requests over them, refuses requests past ``max_queued_requests`` with our 429 and
``Retry-After``, and restarts a replica whose process died. Each replica is a whole sd35 server: it loads
its model once, builds the FastAPI app of :func:`~sd35.server.app.create_app` (``serve.ingress``) and runs
its own worker thread. They share one job store: SQLite in ``--data-dir`` on one machine, PostgreSQL
(``--jobs-db``) on several. A synchronous request (OpenAI, A1111) runs on the replica Ray sent it to (its
job is reserved for that replica's worker), so Ray's count of requests per replica is its count of work;
native jobs (``/v1/jobs``) are taken by whichever replica is free. A replica that dies stops renewing its
jobs' leases, and another requeues them (:meth:`~sd35.server.jobs.JobStore.reap`).

Two ways in: ``sd35 serve --ray`` (:func:`serve_on_ray`), or ``serve run sd35.server.ray_app:app`` with a
Serve config whose ``args`` are ``sd35 serve``'s flags (:func:`app`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from ray import serve
from ray.serve import Application

from sd35.cli.serve_setup import build_engine, check_port, parse_serve_args, settings_from_args
from sd35.errors import SD35Error
from sd35.server.app import create_app
from sd35.server.errors import RETRY_AFTER_S
from sd35.server.jobs import JobStore
from sd35.server.settings import check_bind

APP_NAME = "sd35"
DEPLOYMENT = "sd35"
REPLICA_HEADER = "X-SD35-Replica"
SHUTDOWN_S = 40.0  # a stop waits this long for the replicas to go (Serve's graceful timeout is 20 s)


def deployment_options(args: argparse.Namespace, cluster_gpus: float = 0.0) -> dict[str, Any]:
    """Ray Serve's options for the replicas that ``args`` ask for."""
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if cluster_gpus > 0 else 0.0)
    ongoing = args.max_ongoing_requests or args.batch_rows
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": args.cpus_per_replica},
        "max_ongoing_requests": ongoing,
        "max_queued_requests": args.max_queued_requests or args.queue_limit,
        "backpressure_config": {"status_code": 429, "retry_after_s": RETRY_AFTER_S},
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": 20.0,
    }
    if args.min_replicas is not None or args.max_replicas is not None:
        low = args.min_replicas if args.min_replicas is not None else 1
        high = args.max_replicas if args.max_replicas is not None else max(low, args.replicas)
        if not 0 <= low <= high or high < 1:
            raise SD35Error(
                f"--min-replicas {low} and --max-replicas {high}: need 0 <= min <= max and max >= 1.",
                param="max_replicas",
            )
        # a replica is busy when it holds a sampling batch's worth of requests
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": min(max(args.replicas, low), high),
            "target_ongoing_requests": max(1, ongoing // 2),
        }
    else:
        if args.replicas < 1:
            raise SD35Error("--replicas must be at least 1.", param="replicas")
        options["num_replicas"] = args.replicas
    return options


def _replica_states() -> dict[str, int] | None:
    """How many of this deployment's replicas are in each state, as Ray Serve's controller sees them."""
    try:
        context = serve.get_replica_context()
        app = serve.status().applications[context.app_name]
        states = app.deployments[context.deployment].replica_states
    except Exception:  # the controller is away (restarting): /health still answers for this replica
        return None
    return {str(state): count for state, count in states.items()}


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class SD35Replica:
    """One sd35 server inside Ray Serve: its own model, worker thread and app, on a shared job store."""

    def __init__(self, args: argparse.Namespace):
        self.settings = settings_from_args(args, shared_queue=True)
        self.replica = serve.get_replica_context().replica_tag
        self.engine = build_engine(args, self.settings)  # the model, loaded once per replica
        self.started = time.time()

    def __serve_build_asgi_app__(self):
        app = create_app(self.settings, self.engine, describe=self.describe)
        replica = self.replica

        @app.middleware("http")
        async def tag(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    def describe(self) -> dict[str, Any]:
        """``/health`` on a replica: which one answered, its worker and work, and every replica's state."""
        return {
            "replica": self.replica,
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "worker": self.engine.worker_id,
            "jobs_run": self.engine.jobs_run,
            "running": [job_id for job_id, _ in self.engine.running()],
            "up_s": round(time.time() - self.started, 1),
            "replicas": _replica_states(),
        }

    def check_health(self) -> None:
        """Ray Serve's periodic check: a replica whose worker thread died is restarted."""
        if not self.engine.ready:
            raise RuntimeError("the sd35 worker thread is not running")


def application(args: argparse.Namespace, cluster_gpus: float = 0.0) -> Application:
    """The Serve application for ``sd35 serve`` flags ``args``."""
    return SD35Replica.options(**deployment_options(args, cluster_gpus)).bind(args)


def _argv(args: dict[str, Any]) -> list[str]:
    """A Serve config's ``args`` mapping as ``sd35 serve`` flags (``true``: a bare flag; a list: repeated)."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is True:
                argv.append(flag)
            elif v is not False and v is not None:
                argv += [flag, str(v)]
    return argv


def app(args: dict[str, Any]) -> Application:
    """``serve run sd35.server.ray_app:app [key=value ...]`` or a Serve config's ``import_path``: ``args``
    are ``sd35 serve``'s flags without the dashes (``data_dir``, ``jobs_db``, ``model``, ...)."""
    import ray

    parsed = parse_serve_args(_argv(args))
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    return application(parsed, gpus)


def serve_on_ray(args: argparse.Namespace) -> int:
    """``sd35 serve --ray``: start Ray here (or join ``--ray-address``), deploy the replicas behind one
    HTTP port, and serve until SIGTERM or Ctrl-C; then remove the application (and the Ray started here)."""
    import ray

    settings = settings_from_args(args, shared_queue=True)
    check_bind(settings)
    deployment_options(args)  # bad replica counts are refused before Ray starts
    local = args.ray_address is None
    if local:
        check_port(settings.host, settings.port)
    JobStore(settings.data_dir, settings.jobs_db).close()  # a bad data folder or database, before Ray
    ray.init(address=args.ray_address, include_dashboard=False, logging_level="warning")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and settings.jobs_db is None:
            raise SD35Error(
                f"this Ray cluster has {len(nodes)} machines: their replicas need one job queue. Give "
                "--jobs-db postgresql://... and a --data-dir that every machine mounts.",
                param="jobs_db",
            )
        gpus = ray.cluster_resources().get("GPU", 0.0)
        deployment = application(args, gpus)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        serve.run(deployment, name=APP_NAME, route_prefix="/", blocking=False)
        count = f"{args.min_replicas}..{args.max_replicas}" if args.max_replicas else str(args.replicas)
        print(
            f"sd35: serving on http://{settings.host}:{settings.port} with {count} Ray Serve replica(s) "
            f"({'GPU' if (args.gpus_per_replica or gpus) else 'CPU'}); jobs in "
            f"{'PostgreSQL' if settings.jobs_db else settings.data_dir}",
            file=sys.stderr,
        )
        stop.wait()
        # the replicas finish their step and requeue their jobs; bounded, should Ray itself be going away
        closing = threading.Thread(target=_close, args=(local,), daemon=True)
        closing.start()
        closing.join(SHUTDOWN_S)
    finally:
        ray.shutdown()
    return 0


def _close(local: bool) -> None:
    serve.delete(APP_NAME)
    if local:
        serve.shutdown()
