"""The generation workers behind the HTTP API: the continuous-batching engine, and the window batcher it replaced.

`EngineWorker` (the default) hands every request to `deepseek_vl.engine.Engine`: it joins the running batch at the
next step and leaves it when it finishes or its client goes away. `GenerationWorker` (``--scheduler window``) is
kept only to measure the engine against (benchmarks/serve_load.py): one thread serves jobs in arrival order;
non-streaming jobs with the same options that wait together run as one `VLChat.chat_batch` call, everything else
alone, and a finished row waits for the longest row of its batch.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepseek_vl.chat import ChatResult, VLChat
    from deepseek_vl.engine.metrics import EngineMetrics

__all__ = ["ClientGone", "EngineWorker", "GenerationWorker", "Job", "WorkerClosed"]

POLL_S = 0.2  # how often a waiting request checks that its client is still connected


class ClientGone(Exception):
    """The client disconnected while its request waited; the job has been cancelled."""


class WorkerClosed(Exception):
    """The worker is shutting down and takes no more jobs."""


@dataclass(eq=False)
class Job:
    """One request on its way through the worker; results come back as events on the request's event loop."""

    messages: list[dict[str, Any]]
    options: dict[str, Any]
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys may share one `chat_batch`; None means the job runs alone."""
        seeded_sampling = self.options["seed"] is not None and self.options["temperature"] > 0
        if self.stream or seeded_sampling:
            return None
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(self.options.items()))

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: server shutting down, nobody is listening
            self.cancelled.set()

    async def next_event(self, disconnected: Callable[[], Awaitable[bool]]) -> tuple[str, Any]:
        """The next ("piece" | "done" | "error", value); cancels the job if the client went away meanwhile."""
        getter = asyncio.ensure_future(self.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=POLL_S)
                if done:
                    return getter.result()
                if await disconnected():
                    self.cancelled.set()
                    raise ClientGone
        finally:
            getter.cancel()


class GenerationWorker:
    """The single generation thread: FIFO queue, batching of compatible waiting jobs, prompt cancellation."""

    def __init__(self, chat: VLChat, batch_window_s: float, max_batch_size: int) -> None:
        self.chat, self.batch_window_s, self.max_batch_size = chat, batch_window_s, max_batch_size
        self.queue: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.busy = False
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="deepseek-vl2-generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.closed = True
            for job in self.queue:
                job.cancelled.set()
            self.cond.notify_all()
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise WorkerClosed("the server is shutting down")
            self.queue.append(job)
            self.cond.notify_all()

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                if len(batch) > 1:
                    self._run_batch(batch)
                elif batch:
                    self._run_one(batch[0])
            finally:
                with self.cond:
                    self.busy = False

    def _next_batch(self) -> list[Job] | None:
        """Block for the oldest live job, then wait up to the batch window for compatible jobs queued behind it."""
        with self.cond:
            while True:
                while self.queue and self.queue[0].cancelled.is_set():
                    self.queue.popleft()
                if self.closed:
                    return None
                if self.queue:
                    break
                self.cond.wait()
            batch = [self.queue.popleft()]
            key = batch[0].batch_key()
            deadline = time.monotonic() + self.batch_window_s
            while key is not None and len(batch) < self.max_batch_size:
                while self.queue and len(batch) < self.max_batch_size and self.queue[0].batch_key() == key:
                    batch.append(self.queue.popleft())
                remaining = deadline - time.monotonic()
                if self.queue or remaining <= 0 or len(batch) == self.max_batch_size:
                    break  # an incompatible job is next in line, the window is over, or the batch is full
                self.cond.wait(remaining)
            self.busy = True
            return [job for job in batch if not job.cancelled.is_set()]

    def _run_one(self, job: Job) -> None:
        if job.options.get("response_format") is not None:
            job.emit("error", ValueError("response_format needs the engine scheduler (--scheduler engine)"))
            return
        job.options.pop("response_format", None)
        self._run_streamed(job)

    def _run_streamed(self, job: Job) -> None:
        """Streamed generation even for plain requests, so that a disconnect can stop it between tokens."""
        try:
            stream = self.chat.chat(job.messages, stream=True, **job.options)
            try:
                for piece in stream:
                    if job.cancelled.is_set():
                        return
                    if job.stream:
                        job.emit("piece", piece)
            finally:
                if stream.result is None:
                    stream.close()
            job.emit("done", stream.result)
        except Exception as error:  # noqa: BLE001 - every failure must reach the waiting request
            job.emit("error", error)

    def _run_batch(self, batch: list[Job]) -> None:
        if any(job.options.get("response_format") is not None for job in batch):
            for job in batch:
                self._run_one(job)
            return
        for job in batch:
            job.options.pop("response_format", None)
        try:
            results = self.chat.chat_batch([job.messages for job in batch], **batch[0].options)
        except ValueError:  # one bad conversation; run each alone so the error reaches only its sender
            for job in batch:
                self._run_one(job)
            return
        except Exception as error:  # noqa: BLE001
            for job in batch:
                job.emit("error", error)
            return
        for job, result in zip(batch, results):
            job.emit("done", result)


class EngineWorker:
    """Every request joins the continuous batch of one `Engine`; requests are prepared (images tiled) on 2 threads."""

    def __init__(
        self,
        chat: VLChat,
        *,
        max_rows: int,
        prefill_budget: int,
        vision_cache_bytes: int,
        prefix_cache_bytes: int,
        metrics: EngineMetrics | None = None,
    ) -> None:
        from deepseek_vl.engine import Engine

        self.engine = Engine(
            chat, max_rows=max_rows, prefill_budget=prefill_budget, vision_cache_bytes=vision_cache_bytes,
            prefix_cache_bytes=prefix_cache_bytes, metrics=metrics,
        )  # fmt: skip
        self.preparing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deepseek-vl2-prepare")
        self.unprepared: set[Job] = set()  # submitted, not yet handed to the engine
        self.lock = threading.Lock()
        self.closed = False

    @property
    def queue(self) -> list:
        """The requests waiting for a row (only their number is used)."""
        return list(self.engine.scheduler.waiting) + self.engine.incoming

    @property
    def busy(self) -> bool:
        return self.engine.busy

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        """Refuse new jobs; jobs not yet prepared and those in the engine end with WorkerClosed (a 503)."""
        with self.lock:
            self.closed = True
        self.preparing.shutdown(wait=True, cancel_futures=True)
        for job in self.unprepared:
            self._count_unrun("error")
            job.emit("error", WorkerClosed("the server is shutting down"))
        self.engine.stop()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.closed:
                raise WorkerClosed("the server is shutting down")
            self.unprepared.add(job)
            self.preparing.submit(self._admit, job)  # under the lock: stop() cannot shut the pool down in between

    def _admit(self, job: Job) -> None:
        from deepseek_vl.engine import EngineClosed

        with self.lock:
            self.unprepared.discard(job)
        if job.cancelled.is_set():
            self._count_unrun("cancelled")
            return

        def done(outcome: ChatResult | BaseException) -> None:
            if isinstance(outcome, EngineClosed):
                outcome = WorkerClosed("the server is shutting down")
            job.emit("error" if isinstance(outcome, BaseException) else "done", outcome)

        on_piece = (lambda piece: job.emit("piece", piece)) if job.stream else None
        try:
            self.engine.submit(job.messages, cancel=job.cancelled, on_piece=on_piece, on_done=done, **job.options)
        except EngineClosed:
            self._count_unrun("error")
            job.emit("error", WorkerClosed("the server is shutting down"))
        except Exception as error:  # noqa: BLE001 - a bad conversation is this request's error
            self._count_unrun("error")
            job.emit("error", error)

    def _count_unrun(self, reason: str) -> None:
        """Count a job the engine never took as the engine counts its own ends: every job submitted here is counted
        once in ``requests_finished``, whether its client left first, it was refused, or the server stopped."""
        if self.engine.metrics is not None:
            self.engine.metrics.finished.labels(reason).inc()
