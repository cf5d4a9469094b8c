"""A real ``sd35 serve`` process on 127.0.0.1 for the tests that talk to it over HTTP, as clients do."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def db_rows(data_dir) -> dict[str, sqlite3.Row]:
    """The job table as the database holds it (read beside the server, or after it died)."""
    db = sqlite3.connect(data_dir / "jobs.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return {row["id"]: row for row in db.execute("SELECT * FROM jobs")}
    finally:
        db.close()


class ServerProcess:
    """``python -m sd35 serve`` (the demo model unless ``args`` say otherwise) with its own data folder.

    ``start()`` waits for ``/health``; ``kill()`` is SIGKILL (a crash), ``stop()`` a clean shutdown;
    ``start()`` again reuses the port and data folder (a restart after a crash).
    """

    def __init__(
        self, data_dir: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None
    ):
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.port = port or free_port()
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sd35.cli", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                "--log-level", "warning", *self.args]  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT_S) -> ServerProcess:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sd35 serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"sd35 serve did not become healthy in {timeout} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup runs, as in a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        """A clean shutdown (SIGTERM), killed if it takes longer than ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
