"""The continuous-batching engine on the golden Tiny (MHA) and Small (MLA) checkpoints.

Expected answers come from `VLChat.chat` alone (plain `generate`): the engine must give the same greedy tokens
while requests join and leave its batch at every step, prompts are prefilled in chunks, caches are reused.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import time

import jsonschema
import pytest

from deepseek_vl.chat import VLChat
from deepseek_vl.engine import Engine, EngineClosed
from golden import GOLDEN, checkpoint

IMAGES = GOLDEN / "images"
PICTURE = str(IMAGES / "rgba_500x400.png")

# (conversation, max_new_tokens): short and long prompts, none, one and two images, different answer lengths
REQUESTS = [
    ([{"role": "user", "content": "Hello!"}], 9),
    ([{"role": "user", "content": "Describe this.", "images": [PICTURE]}], 4),
    ([{"role": "user", "content": "Tell me a story about a fox. " * 12}], 6),
    ([{"role": "user", "content": "Compare.", "images": [str(IMAGES / "tiny_8x8.png"), PICTURE]}], 11),
    ([{"role": "user", "content": "What is two plus two?"}], 2),
    ([{"role": "user", "content": "A", "images": [str(IMAGES / "tiny_8x8.png")]}], 7),
]


def run_until_done(engine: Engine, handles: list) -> None:
    while not all(handle.done.is_set() for handle in handles):
        engine.step()


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_mixed_load_matches_single_answers(pipe_for, variant: str):
    """One request joins per step, rows leave as they finish, the row limit queues some, prompts are chunked."""
    chat = pipe_for(variant)
    expected = [chat.chat(messages, max_new_tokens=n).token_ids for messages, n in REQUESTS]
    engine = Engine(chat, max_rows=4, prefill_budget=48, prefix_cache_bytes=0)
    handles = []
    for messages, n in REQUESTS:
        handles.append(engine.submit(messages, max_new_tokens=n))
        engine.step()
    run_until_done(engine, handles)
    assert [handle.wait().token_ids for handle in handles] == expected
    assert engine.max_batch > 1
    assert not engine.scheduler.has_work() and all(slot is None for slot in engine.scheduler.slots)
    assert engine.runner.cache.capacity == 0  # the cache memory is given back when no row is left


def test_sampling_options_and_stream(tiny: VLChat):
    """A streamed row with a stop string and a penalised row next to greedy ones give their single answers."""
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    options = {"max_new_tokens": 12, "repetition_penalty": 1.3}
    expected = tiny.chat(messages, **options)
    text = expected.text
    stop = text[len(text) // 2 : len(text) // 2 + 2].strip() or text[:1]
    expected_stop = tiny.chat(messages, max_new_tokens=12, stop=[stop])
    engine = Engine(tiny, max_rows=4)
    pieces: list[str] = []
    handles = [
        engine.submit(messages, **options),
        engine.submit(messages, max_new_tokens=12, stop=[stop], on_piece=pieces.append),
        engine.submit(REQUESTS[0][0], max_new_tokens=5),
    ]
    run_until_done(engine, handles)
    assert handles[0].wait().token_ids == expected.token_ids
    stopped = handles[1].wait()
    assert (stopped.text, stopped.finish_reason) == (expected_stop.text, expected_stop.finish_reason)
    assert "".join(pieces) == stopped.text


def test_seeded_sampling_does_not_depend_on_neighbours(tiny: VLChat):
    messages = [{"role": "user", "content": "Say something."}]
    sampled = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    alone = Engine(tiny).generate([messages], **sampled)[0]
    engine = Engine(tiny, max_rows=5)
    handles = [engine.submit(REQUESTS[i][0], max_new_tokens=6, temperature=0.8, seed=i) for i in range(3)]
    engine.step()
    handles.append(engine.submit(messages, **sampled))
    handles.append(engine.submit(messages, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=8))
    run_until_done(engine, handles)
    assert handles[3].wait().token_ids == alone.token_ids
    assert handles[4].wait().token_ids != alone.token_ids  # another seed, another answer


def test_cancel_mid_batch_frees_slot_and_cache(tiny: VLChat):
    engine = Engine(tiny, max_rows=3, prefix_cache_bytes=0)
    long = engine.submit([{"role": "user", "content": "Count forever."}], max_new_tokens=200)
    others = [engine.submit(messages, max_new_tokens=n) for messages, n in REQUESTS[:2]]
    for _ in range(4):
        engine.step()
    assert long.seq.slot >= 0 and len(engine.scheduler.decoding) == 3
    long.cancel()
    engine.step()
    result = long.wait(timeout=0)
    assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 200
    assert long.seq.slot == -1 and long.seq not in engine.scheduler.decoding
    assert long.seq.embeds is None  # its prompt embeddings are released with its slot
    run_until_done(engine, others)
    expected = [tiny.chat(messages, max_new_tokens=n).token_ids for messages, n in REQUESTS[:2]]
    assert [h.wait().token_ids for h in others] == expected
    assert all(slot is None for slot in engine.scheduler.slots)


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_caches_on_and_off_give_the_same_answers(pipe_for, variant: str):
    """A second turn about the same image reuses its features and the first turn's cache, with the same tokens."""
    chat = pipe_for(variant)
    first = [{"role": "user", "content": "What is in this image?", "images": [PICTURE]}]
    cached = Engine(chat, max_rows=2)
    plain = Engine(chat, max_rows=2, vision_cache_bytes=0, prefix_cache_bytes=0)
    answers = {}
    for name, engine in (("cached", cached), ("plain", plain)):
        one = engine.generate([first], max_new_tokens=6)[0]
        second = [*first, {"role": "assistant", "content": one.text}, {"role": "user", "content": "And the colours?"}]
        two = engine.generate([second], max_new_tokens=6)[0]
        answers[name] = (one.token_ids, two.token_ids)
    assert answers["cached"] == answers["plain"]
    assert cached.runner.vision_cache.hits == 1 and cached.tile_cache.hits == 1  # the image's features, its tiles
    assert cached.runner.prefix_cache.hits == 1 and cached.runner.prefix_cache.reused_tokens > 100


def test_json_schema_output_parses_and_validates(tiny: VLChat):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    engine = Engine(tiny, max_rows=3)
    handles = [
        engine.submit([{"role": "user", "content": "A person as JSON."}], max_new_tokens=120,
                      response_format=response_format),
        engine.submit([{"role": "user", "content": "Another."}], max_new_tokens=8),
    ]
    run_until_done(engine, handles)
    answer = handles[0].wait()
    assert answer.finish_reason == "stop"
    jsonschema.validate(json.loads(answer.text), schema)
    with pytest.raises(ValueError, match="not a usable JSON schema: Type should be a string"):
        bad = {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}
        engine.submit([{"role": "user", "content": "x"}], response_format=bad)
    question = [{"role": "user", "content": "A person as JSON."}]
    alone = tiny.chat(question, max_new_tokens=120, response_format=response_format)
    assert alone.token_ids == answer.token_ids  # VLChat (generate + xgrammar's logits processor) agrees


def test_cli_json_schema(tmp_path, capsys):
    from deepseek_vl.serve.cli import main

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    args = ["generate", "Give a number.", "--model", str(checkpoint("tiny")), "--max-new-tokens", "20", "--json"]
    assert main([*args, "--json-schema", str(tmp_path / "schema.json")]) == 0
    jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["text"]), schema)
    (tmp_path / "bad.json").write_text("{not json")
    assert main([*args, "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_prefix_cache_is_bounded_and_finds_the_longest_prefix():
    import torch

    from deepseek_vl.engine.reuse import PrefixCache

    def entries(length: int) -> list:
        return [(torch.full((1, length, 2), float(length)), torch.zeros(1, length, 2))]  # 16 bytes per position

    cache = PrefixCache(capacity_bytes=16 * 100, min_length=4)
    cache.store_sequence(list(range(40)), entries(40))
    cache.store_sequence(list(range(50)), entries(50))
    hit = cache.lookup(list(range(45)) + [-7, -8])
    assert hit.length == 45 and float(hit.entries[0][0][0, 0, 0]) == 50  # the longer entry, cut to what matches
    assert cache.lookup([9, 9, 9, 9, 9, 9]) is None  # no entry starts this way
    cache.store_sequence(list(range(30)), entries(30))  # 40 + 50 + 30 > 100 positions: the least recent goes
    assert cache.store.size <= cache.store.capacity and tuple(range(40)) not in cache.store.entries
    assert sum(map(len, cache.buckets.values())) == len(cache.store.entries) == 2


def test_a_failing_step_fails_its_requests_not_the_engine(tiny: VLChat, monkeypatch):
    """Several rows in flight: each ends with the step's error (or `EngineClosed` at stop), none hangs."""
    engine = Engine(tiny, max_rows=4)
    engine.start()
    messages = [{"role": "user", "content": "Hi"}]
    try:
        with pytest.raises(ValueError, match="context"):
            engine.submit(messages, max_new_tokens=5000)
        healthy = engine.runner.decode
        calls = itertools.count()

        def breaks_on_the_fourth_step(rows):
            if next(calls) == 3:
                raise RuntimeError("device lost")
            return healthy(rows)

        monkeypatch.setattr(engine.runner, "decode", breaks_on_the_fourth_step)
        broken = [engine.submit(messages, max_new_tokens=50) for _ in range(3)]
        for handle in broken:
            with pytest.raises(RuntimeError, match="device lost"):
                handle.wait(timeout=30)
        monkeypatch.undo()
        assert engine.submit(messages, max_new_tokens=3).wait(timeout=30).completion_tokens == 3
        running = [engine.submit(messages, max_new_tokens=2000) for _ in range(3)]
        while not all(handle.seq.output for handle in running):
            time.sleep(0.01)
    finally:
        engine.stop()
    assert not engine.thread.is_alive()
    for handle in running:
        with pytest.raises(EngineClosed):
            handle.wait(timeout=1)


def test_exit_with_generation_in_flight_ends_cleanly():
    """A script may end while the engine thread and a `VLChat` stream thread (both daemons) are mid-answer:
    the interpreter waits for the step in flight instead of aborting inside torch ("terminate called without
    an active exception", the README's engine example failed this way one run in six), and the engine's
    unfinished request ends with `EngineClosed`."""
    script = textwrap.dedent(f"""
        import threading
        from deepseek_vl.chat import VLChat
        from deepseek_vl.engine import Engine
        chat = VLChat.from_pretrained({str(checkpoint("tiny"))!r})
        for piece in chat.chat([{{"role": "user", "content": "Tell me a story."}}], max_new_tokens=500, stream=True):
            break  # the stream keeps generating in its thread
        engine = Engine(chat, max_rows=2)
        engine.start()
        first = threading.Event()
        engine.submit([{{"role": "user", "content": "Tell me a story."}}], max_new_tokens=500,
                      on_piece=lambda _: first.set(), on_done=lambda outcome: print(type(outcome).__name__))
        first.wait()
        print("exiting", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["exiting", "EngineClosed"]
