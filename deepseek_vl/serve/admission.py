"""Admission control for the HTTP API: how much work the server accepts before it answers 503.

A request is admitted when it holds a ticket: one of `max_jobs` slots (waiting or generating) and its share of a
budget of decoded image pixels in flight. Beyond either bound the request is refused at once with 503 and a
`Retry-After`, instead of queueing without end (1000 queued requests, or a few requests of eight 16-megapixel
images, used to grow the server by gigabytes). The generation engine underneath never sees refused work.

A ticket is released exactly once, whoever gets there first (the request handler, the end of a stream, a
disconnect). When the server falls idle after image work, freed memory is handed back to the system
(`gc.collect` and glibc's `malloc_trim`), so one peak does not leave the process large for good.

    admission = Admission(max_jobs=64, max_pixels=128 * 2**20)
    ticket = admission.admit()           # raises Overloaded
    ticket.add_pixels(width * height)    # raises Overloaded; the job's images count until it ends
    ...                                  # submit the job; release when it has finished
    ticket.release()
"""

from __future__ import annotations

import gc
import threading

from deepseek_vl.utils.memory import malloc_trim

__all__ = ["Admission", "Overloaded", "Ticket", "release_memory"]


class Overloaded(Exception):
    """The server is at one of its bounds; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Admission:
    """Counts admitted jobs and their decoded pixels; thread-safe."""

    def __init__(self, max_jobs: int, max_pixels: int, retry_after_s: int = 2) -> None:
        if max_jobs < 1 or max_pixels < 1:
            raise ValueError(f"max_jobs and max_pixels must be >= 1, got {max_jobs} and {max_pixels}")
        self.max_jobs, self.max_pixels, self.retry_after_s = max_jobs, max_pixels, retry_after_s
        self.jobs = 0
        self.pixels = 0
        self.refused = 0
        self._pixels_since_trim = 0
        self._lock = threading.Lock()

    def admit(self) -> Ticket:
        with self._lock:
            if self.jobs >= self.max_jobs:
                self.refused += 1
                raise Overloaded(
                    f"The server is at its limit of {self.max_jobs} requests in progress (--max-queue); retry later.",
                    self.retry_after_s,
                )
            self.jobs += 1
        return Ticket(self)

    def _add_pixels(self, pixels: int) -> None:
        with self._lock:
            if self.pixels + pixels > self.max_pixels:
                self.refused += 1
                raise Overloaded(
                    f"The server is decoding its limit of {self.max_pixels} image pixels for requests in progress "
                    "(--max-inflight-pixels); retry later or send smaller images.",
                    self.retry_after_s,
                )
            self.pixels += pixels
            self._pixels_since_trim += pixels

    def _release(self, pixels: int) -> None:
        with self._lock:
            self.jobs -= 1
            self.pixels -= pixels
            trim = self.jobs == 0 and self._pixels_since_trim > 0
            if trim:
                self._pixels_since_trim = 0
        if trim:
            threading.Thread(target=release_memory, name="deepseek-vl2-trim", daemon=True).start()


class Ticket:
    """One admitted request's hold on the server's capacity."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._pixels = 0
        self._released = False
        self._lock = threading.Lock()

    def add_pixels(self, pixels: int) -> None:
        if pixels > 0:
            self._admission._add_pixels(pixels)
            self._pixels += pixels

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._release(self._pixels)


def release_memory() -> None:
    """Collect garbage and return free heap pages to the system (glibc only; elsewhere a collection)."""
    gc.collect()
    trim = malloc_trim()
    if trim is not None:
        trim(0)
