"""The ``sd35`` command line: one dispatcher for every subcommand (``inspect``, ``generate``, ``train``,
``bench``, ``convert``, ``serve``, ``run``), each run through one error report (:mod:`sd35.cli.errors`)."""

from __future__ import annotations

import argparse
import sys
import typing

from sd35 import cpu_threads
from sd35._version import __version__
from sd35.cli.errors import run_reporting_errors


class Parser(argparse.ArgumentParser):
    """argparse with sd35's one-line errors: ``sd35: error: argument --width: ...`` and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"sd35: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from sd35.cli import bench, convert, generate, inspect, run, serve

    parser = Parser(prog="sd35", description="Stable Diffusion 3.5 Medium engine.")
    parser.add_argument("--version", action="version", version=f"sd35 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect.add_parser(sub)
    generate.add_parser(sub)
    convert.add_parser(sub)
    bench.add_parser(sub)
    serve.add_parser(sub)
    run.add_parser(sub)
    sub.add_parser(
        "train",
        help="fine-tune (LoRA, DoRA or full) on a folder of captioned images; see `sd35 train --help`",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; None: this process's own command line, which also sets the CPU
    thread settings (:mod:`sd35.cpu_threads`) before anything imports torch. A caller passing ``argv``
    (a test, another program) keeps its own environment."""
    if argv is None:
        cpu_threads.configure()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the trainer has its own parser (every config key is a flag)
        from sd35.cli.train import main_train

        return main_train(argv[1:])

    def command() -> int:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error already reported in one line
            return e.code if isinstance(e.code, int) else 2
        return args.func(args)

    return run_reporting_errors(command)
