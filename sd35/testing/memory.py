"""Anonymous memory of this process, and its peak over a stretch of code: what loading a model really costs.

RSS counts memory-mapped file pages, which the kernel can drop and reread at will; a model loaded over mmap
would look as large as its file. ``RssAnon`` (Linux ``/proc/self/status``) is the memory a machine must really
provide. :class:`PeakAnonMemory` samples it from a thread every few milliseconds, since torch frees
temporaries as it goes and the peak lasts only a moment. Used by the loading benchmarks and the memory tests.
"""

from __future__ import annotations

import threading
import time


def anon_mb() -> float:
    """This process's anonymous resident memory in MiB (Linux only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise OSError("no RssAnon in /proc/self/status: anonymous memory is measured on Linux only")


class PeakAnonMemory:
    """``with PeakAnonMemory() as m: ...``; then ``m.peak_mb`` is the highest anonymous memory above the
    start, and ``m.end_mb`` what was still held at the end."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.base_mb = self.peak_mb = self.end_mb = 0.0
        self._top = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._top = max(self._top, anon_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakAnonMemory:
        self.base_mb = self._top = anon_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = anon_mb()
        self.peak_mb = max(self._top, now) - self.base_mb
        self.end_mb = now - self.base_mb
