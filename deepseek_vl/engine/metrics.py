"""Prometheus series of the engine and the server (prometheus-client), one registry per app."""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from deepseek_vl.engine.engine import Engine
    from deepseek_vl.engine.sequence import Sequence

__all__ = ["EngineMetrics"]

PREFIX = "deepseek_vl2_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge(PREFIX + "queue_length", "Requests waiting for a batch row", registry=r)
        self.running_rows = Gauge(PREFIX + "running_rows", "Requests in the batch (prefilling or decoding)", registry=r)
        self.tokens = Counter(PREFIX + "generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.tokens_per_second = Gauge(
            PREFIX + "generated_tokens_per_second", f"Tokens generated per second over the last {RATE_WINDOW_S:g} s",
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "From arrival to the first token", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.per_token = Histogram(
            PREFIX + "time_per_output_token_seconds", "Between two tokens of one request", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            PREFIX + "request_latency_seconds", "From arrival to the last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.finished = Counter(PREFIX + "requests_finished", "Finished requests", ["reason"], registry=r)
        self.rejected = Counter(PREFIX + "requests_rejected", "Requests refused, by error code", ["reason"], registry=r)
        self.cache_hit_rate = Gauge(
            PREFIX + "cache_hit_rate", "Share of lookups answered from the cache", ["cache"], registry=r
        )
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (step end, tokens)
        self._recent_lock = threading.Lock()  # steps append on the engine thread, scrapes read on the server's
        self.tokens_per_second.set_function(self._rate)

    def observe_token(self, seq: Sequence, now: float) -> None:
        if seq.first_token_at is None:
            self.ttft.observe(now - seq.arrived)
        elif seq.last_token_at is not None:
            self.per_token.observe(now - seq.last_token_at)
        self.tokens.inc()

    def _forget_old_steps(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def _rate(self) -> float:
        """Tokens per second over the last ``RATE_WINDOW_S``, as of the scrape: an idle engine falls to 0."""
        now = time.monotonic()
        with self._recent_lock:
            self._forget_old_steps(now)
            span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else RATE_WINDOW_S
            return sum(count for _, count in self._recent) / span

    def observe_step(self, engine: Engine) -> None:
        now = time.monotonic()
        with self._recent_lock:
            self._recent.append((now, engine.step_tokens))
            self._forget_old_steps(now)  # also without scrapes, the window holds 10 s of steps, no more
        self.queue_length.set(engine.queued)
        self.running_rows.set(engine.scheduler.running)
        runner = engine.runner
        for name, cache in (("vision", runner.vision_cache), ("tiles", engine.tile_cache)):
            if cache is not None:
                lookups = cache.hits + cache.misses
                self.cache_hit_rate.labels(name).set(cache.hits / lookups if lookups else 0.0)
        if runner.prefix_cache is not None:
            prefix = runner.prefix_cache
            self.cache_hit_rate.labels("prefix").set(prefix.hits / prefix.lookups if prefix.lookups else 0.0)

    def observe_finish(self, seq: Sequence, error: BaseException | None) -> None:
        reason = "error" if error is not None else ("cancelled" if seq.cancel.is_set() else seq.finish_reason)
        self.finished.labels(reason or "cancelled").inc()
        self.prompt_tokens.inc(seq.prompt_length)
        if seq.last_token_at is not None:
            self.latency.observe(seq.last_token_at - seq.arrived)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
