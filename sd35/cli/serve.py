"""``sd35 serve``: load a model once, then serve the native job, OpenAI Images and A1111 APIs over HTTP.

Everything that can be refused without the model (an open address without a key, a taken port, an
unwritable data folder) is refused before a weight is read.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from sd35.errors import InvalidRequest, SD35Error


def add_parser(sub) -> None:
    from sd35.cli.generate import add_model_arguments
    from sd35.server.settings import API_KEY_ENV, Limits, default_data_dir

    limits = Limits()
    g = sub.add_parser(
        "serve",
        help="an HTTP server: native jobs (/v1/jobs), OpenAI Images (/v1/images) and A1111 (/sdapi/v1) APIs",
        description="Serve a model over HTTP. Without --model it serves the built-in demo model. Jobs are "
        "kept in a SQLite database under --data-dir and survive a crash or restart.",
    )
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
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from sd35.server.settings import API_KEY_ENV, Limits, ServerSettings, default_data_dir

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
    )


def _check_port(host: str, port: int) -> None:
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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from sd35.cli.generate import load_from_args
    from sd35.cli.options import parse_lora
    from sd35.loading.assemble import load_pipeline
    from sd35.server.app import create_app
    from sd35.server.catalog import ModelCatalog
    from sd35.server.engine import Engine
    from sd35.server.jobs import JobStore, lock_data_dir
    from sd35.server.settings import check_bind

    settings = settings_from_args(args)
    check_bind(settings)
    _check_port(settings.host, settings.port)
    store = JobStore(settings.data_dir)  # a bad data folder is refused before loading
    lock = lock_data_dir(settings.data_dir)  # noqa: F841 (held while serving)
    loras = [parse_lora(v) for v in args.lora]
    for ref in loras:
        if not Path(ref.name).is_file():
            raise SD35Error(f"{ref.name}: no such LoRA file.", param="loras")

    def prepare(pipe):
        pipe.lora_source = catalog.lora  # requests name LoRAs; only the catalog turns a name into a file
        for ref in loras:
            pipe.load_lora(ref.name, ref.strength)
        return pipe

    pipe = load_from_args(args)
    catalog = ModelCatalog(pipe.model_name, args.model, settings.models_dir)
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

    engine = Engine(settings, catalog, pipe, pipe.model_name, load, store)
    app = create_app(settings, engine)
    guarded = "an API key is required" if settings.protected else "no API key"
    print(
        f"sd35: serving {pipe.model_name} on http://{settings.host}:{settings.port} ({guarded}); "
        f"jobs in {settings.data_dir}",
        file=sys.stderr,
    )
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=args.log_level, timeout_graceful_shutdown=10
    )
    return 0
