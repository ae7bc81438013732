"""The engine loop: schedule, run, sample, report; continuous (iteration-level) batching of every request.

Requests join the running batch between two decode steps and leave it the moment they finish; streaming and not,
greedy and sampled, each with its own settings, share one batch. Requests are prepared (conversation template,
image loading and tiling) on the caller's thread; the engine thread owns the model and the cache.

    engine = Engine(VLChat.from_pretrained(...), max_rows=16)
    engine.start()
    handle = engine.submit([{"role": "user", "content": "Hi"}], max_new_tokens=64, on_piece=print)
    handle.wait().text
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from deepseek_vl.chat import GenerationOptions, _PieceStreamer
from deepseek_vl.engine.runner import ModelRunner
from deepseek_vl.engine.sampling import new_generator, sample
from deepseek_vl.engine.scheduler import Scheduler
from deepseek_vl.engine.sequence import Sequence, Status

if TYPE_CHECKING:
    from deepseek_vl.chat import ChatResult, VLChat
    from deepseek_vl.engine.metrics import EngineMetrics

__all__ = ["Engine", "Handle"]

MiB = 1024 * 1024


class Handle:
    """A submitted request: wait for its `ChatResult`, or cancel it (its slot and cache are freed next step)."""

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq
        self.done = threading.Event()
        self.result: ChatResult | None = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        self.seq.cancel.set()

    def wait(self, timeout: float | None = None) -> ChatResult:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class _Sink:
    """The streamer's queue stand-in: pieces go straight to the request's callback."""

    def __init__(self, callback: Callable[[str], None]) -> None:
        self.put = callback


class Engine:
    """Continuous batching over one `VLChat`'s model: at most ``max_rows`` requests generate together.

    ``prefill_budget`` bounds the prompt tokens run per step; the vision cache (image features by image content) and
    the prefix cache (the cache of finished turns, for the next turn of the conversation) are bounded in bytes and
    are off at 0.
    """

    def __init__(
        self,
        chat: VLChat,
        *,
        max_rows: int = 16,
        prefill_budget: int = 512,
        vision_cache_bytes: int = 256 * MiB,
        prefix_cache_bytes: int = 1024 * MiB,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.chat = chat
        self.scheduler = Scheduler(max_rows, prefill_budget)
        self.runner = ModelRunner(chat.model, max_rows, vision_cache_bytes, prefix_cache_bytes)
        self.metrics = metrics
        self.eos = chat.tokenizer.eos_token_id
        self.cond = threading.Condition()
        self.incoming: list[tuple[Sequence, Handle]] = []
        self.handles: dict[int, Handle] = {}
        self.closed = False
        self.thread: threading.Thread | None = None
        self.steps = 0
        self.max_batch = 0  # the most rows that ever decoded together

    # ------------------------------------------------------------------------------------------------ requests

    def submit(
        self,
        messages: list[dict[str, Any]],
        images: list | None = None,
        *,
        system_prompt: str | None = None,
        response_format: dict[str, Any] | None = None,
        exif_transpose: bool = False,
        on_piece: Callable[[str], None] | None = None,
        on_done: Callable[[ChatResult | BaseException], None] | None = None,
        **options: Any,
    ) -> Handle:
        """Queue one conversation (the `VLChat.chat` arguments); raises ValueError for a bad one, here and now."""
        options.pop("chunk_size", None)  # prefill is always chunked here, by the engine's budget
        settings = GenerationOptions(**options)
        sample_, last_size = self.chat._prepare(messages, images, system_prompt, exif_transpose)
        grammar = None
        if response_format is not None:
            from deepseek_vl.engine.grammar import grammar_for

            grammar = grammar_for(self.chat.tokenizer, self.chat.model.config.language_config.vocab_size, response_format)
        seq = Sequence(sample_, settings, last_size, grammar, on_piece, on_done)
        seq.generator = new_generator(settings.seed, self.runner.device) if settings.temperature > 0 else None
        if on_piece is not None:
            seq.streamer = _PieceStreamer(self.chat._decode, settings.stop, _Sink(on_piece))
            seq.streamer.put(None)  # its first call is the prompt
        handle = Handle(seq)
        with self.cond:
            if self.closed:
                raise RuntimeError("the engine is stopped")
            self.incoming.append((seq, handle))
            self.cond.notify_all()
        return handle

    def generate(self, conversations: list[list[dict[str, Any]]], **kwargs: Any) -> list[ChatResult]:
        """Answer several conversations continuously (inline when the engine thread is not running)."""
        handles = [self.submit(messages, **kwargs) for messages in conversations]
        if self.thread is None:
            while not all(h.done.is_set() for h in handles):
                self.step()
        return [handle.wait() for handle in handles]

    @property
    def queued(self) -> int:
        return len(self.incoming) + len(self.scheduler.waiting)

    @property
    def busy(self) -> bool:
        return bool(self.incoming) or self.scheduler.has_work()

    # ---------------------------------------------------------------------------------------------- the loop

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="deepseek-vl2-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.incoming and not self.scheduler.has_work():
                    self.cond.wait()
                if self.closed:
                    break
            self.step()
        for seq in [*self.scheduler.waiting, *self.scheduler.prefilling, *self.scheduler.decoding]:
            seq.cancel.set()
        self._retire_cancelled()

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: take new requests, retire cancelled ones, run a prefill budget and a decode step."""
        with self.cond:
            for seq, handle in self.incoming:
                self.handles[seq.id] = handle
                self.scheduler.add(seq)
            self.incoming.clear()
        self._retire_cancelled()
        plan = self.scheduler.schedule()
        for seq in plan.admitted:
            try:
                self.runner.embed_prompt(seq)
            except Exception as error:  # noqa: BLE001 - the error belongs to this request only
                self._finish(seq, error)
                continue
            self.runner.reuse_prefix(seq)
        finished_prefill = []
        for seq, count in plan.prefill:
            if seq.status is not Status.PREFILLING:
                continue
            count = min(count, seq.remaining_prompt)
            logits = self.runner.prefill(seq, count) if count else None
            if logits is not None:
                self._accept(seq, sample(logits[None], [seq])[0])
                finished_prefill.append(seq)
        if plan.decode:
            logits = self.runner.decode(plan.decode)
            for seq, token in zip(plan.decode, sample(logits, plan.decode)):
                self._accept(seq, token)
            self.max_batch = max(self.max_batch, len(plan.decode))
        for seq in plan.decode + finished_prefill:
            if seq.finish_reason is not None:
                self._finish(seq)
            elif seq.status is Status.PREFILLING:
                self._move(self.scheduler.join(seq))
        self.steps += 1
        if self.metrics is not None:
            self.metrics.observe_step(self)

    def _accept(self, seq: Sequence, token: int) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.observe_token(seq, now)
        seq.first_token_at = seq.first_token_at or now
        seq.last_token_at = now
        seq.output.append(token)
        if seq.grammar is not None:
            seq.grammar.accept(token)
        if seq.streamer is not None:
            seq.streamer.put(torch.tensor([token]))
        stops = seq.options.stop
        if stops and seq.stopped_after is None:
            window = 4 * max(len(s) for s in stops) + 2
            if any(s in self.chat._decode(seq.output[-window:]) for s in stops):
                seq.stopped_after = len(seq.output)
        if token == self.eos or seq.stopped_after is not None or (seq.grammar and seq.grammar.finished()):
            seq.finish_reason = "stop"
        elif len(seq.output) >= seq.options.max_new_tokens:
            seq.finish_reason = "length"

    def _retire_cancelled(self) -> None:
        for seq in [s for s in self.scheduler.waiting if s.cancel.is_set()]:
            self.scheduler.drop_waiting(seq)
            self._report(seq, None)
        for seq in [s for s in self.scheduler.prefilling + self.scheduler.decoding if s.cancel.is_set()]:
            self._finish(seq)

    def _finish(self, seq: Sequence, error: BaseException | None = None) -> None:
        if error is None and not seq.cancel.is_set():
            self.runner.keep_prefix(seq)
        self._move(self.scheduler.leave(seq))
        self._report(seq, error)

    def _move(self, moves: list) -> None:
        for move in moves:
            self.runner.cache.exchange(move.slot_a, move.length_a, move.slot_b, move.length_b)

    def _report(self, seq: Sequence, error: BaseException | None) -> None:
        handle = self.handles.pop(seq.id)
        seq.embeds = None
        if error is None:
            result = self.chat._result(
                seq.output, seq.stopped_after, seq.prompt_length, seq.last_image_size, seq.options.stop, seq.cancel
            )
            if seq.streamer is not None and not seq.cancel.is_set():
                seq.streamer.emit(result.text)
            handle.result = result
        else:
            handle.error = error
        if self.metrics is not None:
            self.metrics.observe_finish(seq, error)
        handle.done.set()
        if seq.on_done is not None:
            seq.on_done(handle.result if error is None else error)
