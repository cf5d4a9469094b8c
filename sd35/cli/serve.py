"""``sd35 serve``: load a model once, then serve the native job, OpenAI Images and A1111 APIs over HTTP.

Everything that can be refused without the model (an open address without a key, a taken port, an
unwritable data folder) is refused before a weight is read. With ``--ray`` the same app runs on Ray Serve
replicas instead (:mod:`sd35.server.ray_app`).
"""

from __future__ import annotations

import argparse
import sys

from sd35.errors import SD35Error


def add_parser(sub) -> None:
    from sd35.cli.serve_setup import add_serve_arguments
    from sd35.server.settings import default_data_dir

    g = sub.add_parser(
        "serve",
        help="an HTTP server: native jobs (/v1/jobs), OpenAI Images (/v1/images) and A1111 (/sdapi/v1) APIs",
        description="Serve a model over HTTP. Without --model it serves the built-in demo model. Jobs are "
        f"kept in a SQLite database under --data-dir (default {default_data_dir()}), or in PostgreSQL "
        "with --jobs-db, and survive a crash or restart. With --ray, Ray Serve runs replicas of the server.",
    )
    add_serve_arguments(g)
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from sd35.cli.serve_setup import build_engine, check_port, settings_from_args
    from sd35.server.app import create_app
    from sd35.server.jobs import JobStore, lock_data_dir
    from sd35.server.settings import check_bind

    if args.ray:
        try:
            from sd35.server.ray_app import serve_on_ray
        except ImportError as e:
            raise SD35Error(f"--ray needs Ray Serve ({e}): pip install 'ray[serve]'.", param="ray") from None
        return serve_on_ray(args)
    settings = settings_from_args(args)
    check_bind(settings)
    check_port(settings.host, settings.port)
    store = JobStore(settings.data_dir, settings.jobs_db)  # a bad data folder or database is refused first
    # one server per SQLite queue (two would run every job twice); a PostgreSQL queue is shared by leases
    lock = None if settings.shared_queue else lock_data_dir(settings.data_dir)  # noqa: F841 (held)
    engine = build_engine(args, settings, store)
    app = create_app(settings, engine)
    guarded = "an API key is required" if settings.protected else "no API key"
    print(
        f"sd35: serving {engine.model} on http://{settings.host}:{settings.port} ({guarded}); "
        f"jobs in {settings.jobs_db and 'PostgreSQL' or settings.data_dir}",
        file=sys.stderr,
    )
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=args.log_level, timeout_graceful_shutdown=10
    )
    return 0
