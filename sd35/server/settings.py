"""What a server is allowed to do: where it listens, who may call it, and how much one request may ask.

Everything here is decided at start and read-only afterwards. :func:`check_bind` refuses to listen on a
non-loopback address without a key (a GPU on an open port is a free image service for anyone), unless the
operator says ``insecure`` explicitly.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sd35.errors import InvalidRequest, SD35Error

API_KEY_ENV = "SD35_API_KEY"


@dataclass(frozen=True)
class Limits:
    """Per-request limits a deployment sets (the model's own limits are checked by ``pipe.check``)."""

    max_size: int = 2048  # pixels per side, of every pass (the hires pass included)
    max_steps: int = 150  # per pass
    max_batch: int = 8  # images per request
    max_prompt_chars: int = 20_000  # per prompt (T5 reads 256 tokens; more is a mistake or an attack)
    max_body_bytes: int = 50 * 2**20  # one HTTP body (uploads are base64 or multipart inside it)


def default_data_dir() -> Path:
    """The per-user data folder: ``$XDG_DATA_HOME/sd35`` (``~/.local/share/sd35``), or ``%LOCALAPPDATA%``."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "sd35"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "sd35"


@dataclass(frozen=True)
class ServerSettings:
    """A server's settings (``sd35 serve`` builds them from its flags)."""

    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = field(default_factory=default_data_dir)
    api_key: str | None = None
    api_auth: tuple[str, str] | None = None  # A1111's --api-auth user:pass (HTTP basic)
    insecure: bool = False
    queue_limit: int = 64  # queued + running jobs
    limits: Limits = field(default_factory=Limits)
    models_dir: Path | None = None
    batching: bool = True  # run waiting requests of equal settings as one sampling batch
    max_batch_rows: int = 8  # images per sampling batch when batching
    keep_days: float = 7.0  # finished jobs and their images are deleted after this long
    jobs_db: str | None = None  # a PostgreSQL URL; None: SQLite in data_dir
    shared_queue: bool = False  # other servers take jobs from the same store (Ray replicas, --jobs-db)
    lease_s: float = 30.0  # a shared queue's job lease: a dead server's job is requeued this long after

    def __post_init__(self) -> None:
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise InvalidRequest(f"port must be 0..65535, got {self.port!r}.", param="port")
        if self.queue_limit < 1:
            raise InvalidRequest(
                f"the queue limit must be at least 1, got {self.queue_limit}.", param="queue_limit"
            )
        if not self.lease_s > 0:
            raise InvalidRequest(f"the job lease must be positive, got {self.lease_s}.", param="lease_s")
        if self.api_key is not None and len(self.api_key) < 8:
            raise InvalidRequest("the API key must be at least 8 characters long.", param="api_key")
        if self.models_dir is not None and not Path(self.models_dir).is_dir():
            raise SD35Error(f"{self.models_dir}: no such folder (models_dir).", param="models_dir")

    @property
    def protected(self) -> bool:
        """Whether calls need credentials."""
        return self.api_key is not None or self.api_auth is not None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: ServerSettings) -> None:
    """Refuse an open listening address without credentials (``insecure`` allows it)."""
    if is_loopback(settings.host) or settings.protected or settings.insecure:
        return
    raise SD35Error(
        f"refusing to listen on {settings.host} without an API key: anyone who can reach this machine could "
        f"use it. Give --api-key KEY (or set {API_KEY_ENV}), or --insecure if the network is yours alone.",
        param="host",
    )
