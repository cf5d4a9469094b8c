"""Running ``sd35 bench`` through the CLI, as a user does, for the bench tests."""

from __future__ import annotations

from sd35.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``sd35 ARGS``: (exit code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def small(*extra: str) -> list[str]:
    """The smallest useful step run: scaled config, one size, a few calls."""
    return ["bench", "--device", "cpu", "--scaled", "--sizes", "64", "--iters", "2", "--warmup", "1", *extra]
