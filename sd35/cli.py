"""The ``sd35`` command line.

Every user mistake surfaces as one line ``sd35: error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from sd35.errors import SD35Error


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sd35.inspect import report

    print(report(args.paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd35", description="Stable Diffusion 3.5 Medium engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "inspect",
        help="say what weight files/folders are and what a complete pipeline still lacks",
        description="For each file or folder: which model it holds (SD3 Medium, SD3.5 Medium, SD3.5 Large, CLIP-L, "
        "CLIP-G, T5-XXL, VAE), its layout, dtype and parameter count; then what a complete pipeline lacks. "
        "Reads only file headers.",
    )
    p.add_argument("paths", nargs="+", help=".safetensors files or diffusers/text-encoder folders")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SD35Error as e:
        print(f"sd35: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sd35: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
