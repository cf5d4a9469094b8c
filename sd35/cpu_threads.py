"""How many CPU threads a run uses, and how they wait: counted from the cores this process may use.

torch's default is one OpenMP thread per core of the machine, each spinning for a while after every
parallel region. On a shared machine (other processes busy, a container's CPU quota, a ``taskset``) that
is the worst case: the spinning workers take turns with everyone else's, and every op waits at a barrier
for the one that was descheduled. Measured on 2 cores under a load of about 3, one 20-step demo image
took anywhere from 3 s to 20 s that way, and 0.35-0.5 s with the settings below; quiet, the two agree.

So the command line, before torch is imported (OpenMP reads its settings once, when torch loads it):

- ``OMP_NUM_THREADS`` = :func:`usable_cores`: the CPUs this process may run on (its affinity mask) capped
  by the cgroup CPU quota (``cpu.max``; v1's ``cpu.cfs_quota_us``), never the machine's core count;
- ``OMP_WAIT_POLICY=PASSIVE``: idle workers sleep instead of spinning, so they never take a core from
  a thread with work to do.

A value the user set wins. This module imports nothing (not even torch): it must run first.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path) -> float | None:
    """The CPU quota in cores (``max`` / unlimited / unreadable: None), cgroup v2 or v1."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may use: its affinity mask, capped by the cgroup quota (rounded up), >= 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows: no affinity masks
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def thread_settings(environ: MutableMapping[str, str], cores: int) -> dict[str, str]:
    """The OpenMP settings to add to ``environ`` for ``cores`` usable cores: those the user did not set."""
    wanted = {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"}
    return {k: v for k, v in wanted.items() if not environ.get(k)}


def configure(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put :func:`thread_settings` into ``environ`` (default ``os.environ``, inherited by the server's
    workers); returns what it set. Call before ``import torch``."""
    environ = os.environ if environ is None else environ
    added = thread_settings(environ, usable_cores())
    environ.update(added)
    return added
