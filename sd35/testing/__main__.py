"""``python -m sd35.testing OUT_DIR``: write tiny random checkpoints in every layout (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd35.testing import write_tiny_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd35.testing", description=__doc__)
    parser.add_argument(
        "out_dir", type=Path, help="folder to write into (created; must not already hold files)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        print(
            f"error: {args.out_dir} is not empty; choose a new folder (nothing is overwritten).",
            file=sys.stderr,
        )
        return 2
    for name, path in write_tiny_set(args.out_dir, args.seed).items():
        print(f"{name:14} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
