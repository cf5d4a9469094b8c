"""The ``sd35 bench`` command line shared by the bench tests (they run it with :func:`tests.helpers.run_cli`)."""

from __future__ import annotations


def small(*extra: str) -> list[str]:
    """The smallest useful step run: scaled config, one size, a few calls."""
    return ["bench", "--device", "cpu", "--scaled", "--sizes", "64", "--iters", "2", "--warmup", "1", *extra]
