"""What ``sd35 serve`` and its Ray Serve replicas share: the flags, the settings they make, and an engine
built from them (the model loaded once, the catalog, the job store).

A Ray replica is given the parsed flags and builds its engine here, as the plain server does, so the two
serve the same model the same way.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from sd35.errors import InvalidRequest, SD35Error
from sd35.server.settings import API_KEY_ENV, Limits, ServerSettings, default_data_dir


def add_serve_arguments(g: argparse.ArgumentParser) -> None:
    """``sd35 serve``'s arguments (the model's, the server's, and Ray's)."""
    from sd35.cli.generate import add_model_arguments

    limits = Limits()
    add_model_arguments(g)
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA to the model for every request (repeatable); clients add their own by name",
    )
    s = g.add_argument_group("server")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    s.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    s.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"job database and output images (default {default_data_dir()})",
    )
    s.add_argument(
        "--api-key",
        default=None,
        help=f"require Authorization: Bearer KEY on every route but /health (or ${API_KEY_ENV})",
    )
    s.add_argument(
        "--api-auth", default=None, metavar="USER:PASS", help="also accept HTTP basic credentials (A1111's)"
    )
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a key")
    s.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="checkpoints (*.safetensors) and loras/ that clients may pick by name",
    )
    s.add_argument(
        "--queue-limit", type=int, default=64, help="jobs waiting or running before 429 (default 64)"
    )
    s.add_argument(
        "--max-size", type=int, default=limits.max_size, help=f"pixels per side (default {limits.max_size})"
    )
    s.add_argument(
        "--max-steps", type=int, default=limits.max_steps, help=f"steps per pass (default {limits.max_steps})"
    )
    s.add_argument(
        "--max-batch",
        type=int,
        default=limits.max_batch,
        help=f"images per request (default {limits.max_batch})",
    )
    s.add_argument(
        "--max-upload-mb",
        type=float,
        default=limits.max_body_bytes / 2**20,
        help="largest request body in MiB (default 50)",
    )
    s.add_argument("--no-batching", action="store_true", help="run each request on its own")
    s.add_argument(
        "--batch-rows", type=int, default=8, help="images per sampling batch when batching (default 8)"
    )
    s.add_argument(
        "--keep-days", type=float, default=7.0, help="delete finished jobs and images after this (default 7)"
    )
    s.add_argument(
        "--jobs-db",
        default=None,
        metavar="URL",
        help="keep the job queue in PostgreSQL (postgresql://user:pass@host/db) so that several servers share "
        "it; images still go to --data-dir, which those servers must then share (default: SQLite in --data-dir)",
    )
    s.add_argument(
        "--job-lease",
        type=float,
        default=30.0,
        metavar="S",
        help="on a shared queue, a dead server's running job is requeued this long after it stopped (default 30)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    r = g.add_argument_group("scale-out on Ray Serve (pip install 'ray[serve]')")
    r.add_argument(
        "--ray", action="store_true", help="serve with Ray Serve: replicas, each with its own model, one port"
    )
    r.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join this Ray cluster (e.g. auto, or HOST:6379) instead of starting one on this machine",
    )
    r.add_argument("--replicas", type=int, default=1, help="replicas with --ray (default 1)")
    r.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs each replica holds (default 1 when the cluster has GPUs, else 0: CPU replicas)",
    )
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica holds (default 1)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscale down to this many replicas")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    r.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests one replica takes at once (default --batch-rows: what one sampling batch can hold)",
    )
    r.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="requests waiting for a free replica before 429 with Retry-After (default --queue-limit)",
    )


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise InvalidRequest(f"sd35 serve: {message}", param="args")


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """``sd35 serve``'s flags parsed from ``argv`` (a bad one raises, naming it)."""
    parser = _RaisingParser(prog="sd35 serve", add_help=False)
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace, shared_queue: bool = False) -> ServerSettings:
    api_auth = None
    if args.api_auth is not None:
        user, sep, password = args.api_auth.partition(":")
        if not (sep and user and password):
            raise InvalidRequest("--api-auth takes USER:PASS.", param="api_auth")
        api_auth = (user, password)
    for name in ("queue_limit", "max_size", "max_steps", "max_batch", "batch_rows"):
        if getattr(args, name) < 1:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be at least 1.", param=name)
    limits = Limits(
        max_size=args.max_size,
        max_steps=args.max_steps,
        max_batch=args.max_batch,
        max_body_bytes=int(args.max_upload_mb * 2**20),
    )
    return ServerSettings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir or default_data_dir(),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        api_auth=api_auth,
        insecure=args.insecure,
        queue_limit=args.queue_limit,
        limits=limits,
        models_dir=args.models_dir,
        batching=not args.no_batching,
        max_batch_rows=args.batch_rows,
        keep_days=args.keep_days,
        jobs_db=args.jobs_db,
        shared_queue=shared_queue or args.jobs_db is not None,
        lease_s=args.job_lease,
    )


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before anything slow happens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise SD35Error(
                f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or stop what uses it.",
                param="port",
            ) from None


def build_engine(args: argparse.Namespace, settings: ServerSettings, store=None):
    """Load the model of ``args`` (and its LoRAs) and make the engine that serves it; ``store`` is the
    job store already opened (the plain server opens it first, to refuse a bad data folder early)."""
    from sd35.cli.generate import load_from_args
    from sd35.cli.options import parse_lora
    from sd35.loading.assemble import load_pipeline
    from sd35.server.catalog import ModelCatalog
    from sd35.server.engine import Engine

    loras = [parse_lora(v) for v in args.lora]
    for ref in loras:
        if not Path(ref.name).is_file():
            raise SD35Error(f"{ref.name}: no such LoRA file.", param="loras")

    def prepare(pipe):
        pipe.lora_source = lora_source  # requests name LoRAs; only the catalog turns a name into a file
        pipe.control_source = catalog.controlnet  # and ControlNets likewise
        for ref in loras:
            pipe.load_lora(ref.name, ref.strength)
        return pipe

    pipe = load_from_args(args)
    catalog = ModelCatalog(pipe.model_name, args.model, settings.models_dir)
    lora_source = catalog_loras(catalog, settings.models_dir)
    prepare(pipe)

    def load(name: str):
        if name == catalog.default_name:
            return prepare(load_from_args(args))
        path = catalog.checkpoint(name)
        pipe = load_pipeline(
            path, args.text_encoders, args.tokenizers, device=args.device, dtype=args.dtype, memory=args.memory,
            vae_tiling=args.vae_tiling, vae=args.vae,
        )  # fmt: skip
        pipe.accelerate(fp8=args.fp8, compile=args.compile, cuda_graphs=args.cuda_graphs)
        return prepare(pipe)

    return Engine(
        settings, catalog, pipe, pipe.model_name, load, store, workflow_runner(args, settings, pipe)
    )


def catalog_loras(catalog, models_dir: Path | None):
    """A server pipeline's LoRA source: the catalog's names, and the files a ComfyUI workflow's LoraLoader
    resolved (paths inside ``models_dir``, which :mod:`sd35.workflows.models` already checked: no ``..``)."""
    from sd35.errors import NotFound

    def source(name: str) -> Path:
        try:
            return catalog.lora(name)
        except NotFound:
            inside = models_dir is not None and Path(os.path.abspath(name)).is_relative_to(
                os.path.abspath(models_dir)
            )
            if not (inside and ".." not in Path(name).parts and Path(name).is_file()):
                raise
            return Path(name)

    return source


def workflow_runner(args: argparse.Namespace, settings: ServerSettings, pipe):
    """How the server runs ComfyUI workflows: names resolve in --models-dir, other files load as
    ``sd35 run`` loads them (this server's device, dtype and tokenizers), and a workflow naming the
    server's own files reuses its pipeline."""
    from sd35.server.workflow_jobs import WorkflowRunner, comfy_root
    from sd35.workflows.evaluate import LoadSpec
    from sd35.workflows.models import ModelsDir
    from sd35.workflows.run import default_loader

    model = args.model
    if model is None:
        from sd35.demo import demo_files

        model = demo_files()[0]
    own = LoadSpec(Path(model), tuple(args.text_encoders or ()) or None, args.vae)
    return WorkflowRunner(
        ModelsDir(settings.models_dir),
        comfy_root(settings.data_dir),
        default_loader(args.device, args.dtype, args.tokenizers),
        (own, pipe.model_name),
    )
