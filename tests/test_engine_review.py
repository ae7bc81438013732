"""Regressions of the continuous-batching engine found in review: sampling as `VLChat.chat` samples, a caller's
failing callback or one request's failing prefill ending only that request, an engine used without its thread,
metrics of an idle engine, and the memory held by compiled grammars.
"""

from __future__ import annotations

import threading
import time

import pytest

from deepseek_vl.chat import VLChat
from deepseek_vl.engine import Engine, EngineClosed

MESSAGES = [{"role": "user", "content": "Say something nice."}]
OTHERS = [[{"role": "user", "content": "Hello!"}], [{"role": "user", "content": "What is two plus two?"}]]


def step_until_done(engine: Engine, handles: list, steps: int = 200) -> None:
    """Step inline, a bounded number of times: a request that never finishes fails the test instead of hanging it."""
    for _ in range(steps):
        if all(handle.done.is_set() for handle in handles):
            return
        engine.step()
    raise AssertionError(f"requests still unfinished after {steps} steps: {[h.done.is_set() for h in handles]}")


@pytest.mark.parametrize(
    "options",
    [{"temperature": 1.0, "seed": 3}, {"temperature": 0.7, "top_p": 0.9, "seed": 5, "repetition_penalty": 1.3}],
)
def test_seeded_sampling_equals_chat(tiny: VLChat, options: dict):
    """The README's promise: a seeded engine row equals `chat(seed=...)`, which samples as the official `generate`
    call does (transformers' default top-k of 50 included), whatever its neighbours."""
    expected = tiny.chat(MESSAGES, max_new_tokens=12, **options).token_ids
    engine = Engine(tiny, max_rows=4)
    neighbours = [engine.submit(m, max_new_tokens=5, temperature=0.9, seed=1) for m in OTHERS]
    engine.step()
    handle = engine.submit(MESSAGES, max_new_tokens=12, **options)
    step_until_done(engine, [*neighbours, handle])
    assert handle.wait().token_ids == expected


def test_a_raising_callback_fails_only_its_own_request(tiny: VLChat):
    """A caller's on_piece or on_done that raises ends that request with the error (or is only logged once the
    request is reported); the other rows of the batch still give their answers, and no handle is left waiting."""
    expected = [tiny.chat(m, max_new_tokens=8).token_ids for m in OTHERS]

    def broken_stream(piece: str) -> None:
        raise RuntimeError("client went away")

    def broken_done(outcome: object) -> None:
        raise RuntimeError("on_done broke")

    engine = Engine(tiny, max_rows=6)
    healthy = [engine.submit(m, max_new_tokens=8) for m in OTHERS]
    streamed = [engine.submit(MESSAGES, max_new_tokens=n, on_piece=broken_stream) for n in (1, 2, 8)]
    reported = engine.submit(MESSAGES, max_new_tokens=3, on_done=broken_done)
    step_until_done(engine, [*healthy, *streamed, reported])
    assert [handle.wait().token_ids for handle in healthy] == expected
    for handle in streamed:
        with pytest.raises(RuntimeError, match="client went away"):
            handle.wait(timeout=0)
    assert reported.wait(timeout=0).completion_tokens == 3
    assert not engine.scheduler.has_work() and not engine.handles


def test_a_raising_callback_does_not_stop_the_engine_thread(tiny: VLChat):
    engine = Engine(tiny, max_rows=4)
    engine.start()
    try:
        long = engine.submit(MESSAGES, max_new_tokens=40)
        broken = engine.submit(OTHERS[0], max_new_tokens=2, on_done=lambda outcome: 1 / 0)
        assert broken.wait(timeout=60).completion_tokens == 2
        assert long.wait(timeout=60).completion_tokens == 40
        assert engine.submit(OTHERS[1], max_new_tokens=3).wait(timeout=60).completion_tokens == 3
    finally:
        engine.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_refuses_requests_instead_of_hanging_them(tiny: VLChat):
    """Whatever ends the loop (here a BaseException from a caller's callback), its requests end and new ones are
    refused: nothing waits forever on a thread that is gone."""
    engine = Engine(tiny, max_rows=4)
    engine.start()
    try:

        def interrupts(piece: str) -> None:
            raise KeyboardInterrupt

        running = engine.submit(MESSAGES, max_new_tokens=200)
        engine.submit(OTHERS[0], max_new_tokens=50, on_piece=interrupts)
        engine.thread.join(timeout=60)
        assert not engine.thread.is_alive()
        with pytest.raises(EngineClosed):
            running.wait(timeout=5)
        with pytest.raises(EngineClosed):
            engine.submit(OTHERS[1], max_new_tokens=3)
    finally:
        engine.stop()


def test_a_failing_prefill_fails_only_its_request(tiny: VLChat, monkeypatch):
    """An error while one prompt is prefilled (say, out of memory for a long one) touches only its own slot: the
    decoding rows go on with their answers."""
    expected = [tiny.chat(m, max_new_tokens=8).token_ids for m in OTHERS]
    engine = Engine(tiny, max_rows=4, prefix_cache_bytes=0)
    healthy = [engine.submit(m, max_new_tokens=8) for m in OTHERS]
    engine.step()
    engine.step()
    prefill = engine.runner.prefill
    victim = engine.submit([{"role": "user", "content": "A very long prompt. " * 20}], max_new_tokens=8)

    def fails_for_the_victim(seq, count):
        if seq is victim.seq:
            raise RuntimeError("out of memory")
        return prefill(seq, count)

    monkeypatch.setattr(engine.runner, "prefill", fails_for_the_victim)
    step_until_done(engine, [*healthy, victim])
    with pytest.raises(RuntimeError, match="out of memory"):
        victim.wait(timeout=0)
    assert [handle.wait().token_ids for handle in healthy] == expected
    assert all(slot is None for slot in engine.scheduler.slots)


def test_without_the_thread_stream_runs_inline_and_stop_ends_requests(tiny: VLChat):
    """`generate` runs inline when the thread is not started; so do `stream` and `close`, and `stop` ends what is
    still queued with `EngineClosed` rather than leaving its waiters blocked forever."""
    engine = Engine(tiny, max_rows=2)
    expected = tiny.chat(MESSAGES, max_new_tokens=6)
    outcome: dict = {}

    def use_the_engine() -> None:  # in a thread of its own: a hang fails the test instead of blocking it
        stream = engine.stream(MESSAGES, max_new_tokens=6)
        outcome["text"] = "".join(stream)
        outcome["tokens"] = stream.result.token_ids
        closed = engine.stream(MESSAGES, max_new_tokens=50)
        next(iter(closed), None)
        closed.close()
        outcome["closed"] = closed.result.finish_reason
        queued = engine.submit(MESSAGES, max_new_tokens=6)
        engine.stop()
        outcome["queued"] = queued.done.is_set() and queued.error

    user = threading.Thread(target=use_the_engine, daemon=True)
    user.start()
    user.join(timeout=60)
    assert (outcome.get("text"), outcome.get("tokens")) == (expected.text, expected.token_ids)
    assert outcome.get("closed") == "cancelled"
    assert isinstance(outcome.get("queued"), EngineClosed)


def test_tokens_per_second_falls_to_zero_when_idle(tiny: VLChat, monkeypatch):
    from deepseek_vl.engine import metrics as metrics_module
    from deepseek_vl.engine.metrics import RATE_WINDOW_S, EngineMetrics

    metrics = EngineMetrics()
    Engine(tiny, metrics=metrics).generate([MESSAGES], max_new_tokens=8)

    def rate() -> float:
        return metrics.registry.get_sample_value("deepseek_vl2_generated_tokens_per_second")

    assert rate() > 0
    later = time.monotonic() + RATE_WINDOW_S + 1
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: later)
    assert rate() == 0.0  # nothing was generated in the last 10 s
    assert b"deepseek_vl2_generated_tokens_per_second 0.0" in metrics.exposition()


def test_compiled_grammars_are_bounded_in_memory(tiny: VLChat, monkeypatch):
    """Every distinct schema a client sends is compiled and cached (about 130 kB each here); the cache has a byte
    limit, so a server answering varied schemas does not grow without bound."""
    from deepseek_vl.engine import grammar

    limit = 512 * 1024
    monkeypatch.setattr(grammar, "_compilers", {})
    monkeypatch.setattr(grammar, "GRAMMAR_CACHE_BYTES", limit, raising=False)
    vocab_size = tiny.model.config.language_config.vocab_size
    for index in range(12):
        schema = {"type": "object", "properties": {f"field{index}": {"type": "integer"}}, "required": [f"field{index}"]}
        response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        assert grammar.compile_response_format(tiny.tokenizer, vocab_size, response_format) is not None
    compiler = grammar._compiler(tiny.tokenizer, vocab_size)
    assert compiler.get_cache_size_bytes() <= limit
    state = grammar.grammar_for(tiny.tokenizer, vocab_size, response_format)
    assert state is not None and not state.finished()


def test_concurrent_clients_with_cancels_all_finish(tiny: VLChat):
    """Many threads submit, stream, cancel and close at random moments: every request ends, the engine is left
    empty with its cache given back, and streamed text equals the result's text."""
    import random

    engine = Engine(tiny, max_rows=3, prefill_budget=24)
    engine.start()
    failures: list[str] = []

    def client(index: int) -> None:
        rng = random.Random(index)
        for _ in range(4):
            options = {"max_new_tokens": rng.randint(1, 12), "stop": ["the"] if rng.random() < 0.3 else None}
            if rng.random() < 0.5:
                stream = engine.stream(MESSAGES, **options)
                pieces = []
                for piece in stream:
                    pieces.append(piece)
                    if rng.random() < 0.2:
                        stream.close()
                        break
                result = stream.result
                if result is None or (result.finish_reason != "cancelled" and "".join(pieces) != result.text):
                    failures.append(f"stream {index}: {pieces} {result}")
            else:
                handle = engine.submit(OTHERS[index % 2], **options)
                if rng.random() < 0.3:
                    time.sleep(rng.random() * 0.02)
                    handle.cancel()
                handle.wait(timeout=120)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(5)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in threads) and not failures
        deadline = time.monotonic() + 10
        while (engine.busy or engine.runner.cache.capacity) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.busy and not engine.handles and engine.runner.cache.capacity == 0
    finally:
        engine.stop()


def test_streamed_pieces_join_to_the_result_also_after_cancel(tiny: VLChat, monkeypatch):
    """The streamer holds back a possible start of a stop string; a cancelled request never sent that tail, so the
    demo showed less than the answer it kept (as `VLChat`'s stream did)."""
    import torch

    from deepseek_vl.engine import engine as engine_module

    script = iter(tiny.tokenizer.encode("abc EN", add_special_tokens=False))
    monkeypatch.setattr(engine_module, "sample", lambda logits, seqs: torch.tensor([next(script)] * len(seqs)))
    pieces: list[str] = []
    engine = Engine(tiny, max_rows=2)
    handle = engine.submit(MESSAGES, max_new_tokens=50, stop="END", on_piece=pieces.append)
    for _ in range(len(tiny.tokenizer.encode("abc EN", add_special_tokens=False))):
        engine.step()
    assert "".join(pieces) == "abc"  # " EN" may begin "END": held back
    handle.cancel()
    step_until_done(engine, [handle])
    result = handle.wait()
    assert (result.finish_reason, result.text, "".join(pieces)) == ("cancelled", "abc EN", "abc EN")


def test_start_twice_or_after_stop_is_an_error(tiny: VLChat):
    engine = Engine(tiny, max_rows=1)
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            engine.start()
        assert engine.generate([MESSAGES], max_new_tokens=2)[0].completion_tokens == 2
    finally:
        engine.stop()
    with pytest.raises(EngineClosed, match="make a new Engine"):
        engine.start()
