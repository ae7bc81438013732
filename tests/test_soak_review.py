"""Long-run behaviour of the engine and the HTTP API: bounded caches, nothing left behind per request, counters that
add up, the same answer after a load as before it.

The fast tests run in the normal suite; `test_soak_*` (slow) drive a few hundred mixed requests and compare
the process after N and 2N requests.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from golden import GOLDEN, checkpoint
from PIL import Image
from test_server import MODEL, data_url, free_port, serve, tiny_chat, user

from deepseek_vl.engine.metrics import EngineMetrics
from deepseek_vl.serve.server import create_app
from deepseek_vl.serve.worker import EngineWorker, Job
from deepseek_vl.utils.memory import malloc_trim

HI = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}
TRANSIENT_THREADS = ("AnyIO worker thread", "deepseek-vl2-trim")  # a pool bounded by anyio; a memory trim when idle


def counts(text: str, series: str) -> dict[str, float]:
    """{reason: value} of one labelled counter of a Prometheus exposition."""
    pattern = rf'^deepseek_vl2_{series}_total{{reason="([^"]+)"}} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def test_a_failed_generation_is_counted_once():
    """A job that fails in the engine is one finished{error}; it was counted a second time as rejected."""
    app = create_app(tiny_chat(), model_name="m")
    engine = app.state.worker.engine

    def broken(seq):
        raise RuntimeError("vision tower failed")

    engine.runner.embed_prompt = broken
    with serve(app) as url:
        body = {"model": "m", "messages": HI, "max_tokens": 3}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30, trust_env=False)
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "generation_failed"
        text = httpx.get(f"{url}/metrics", trust_env=False).text
    assert counts(text, "requests_finished") == {"error": 1} and counts(text, "requests_rejected") == {}


def test_a_job_cancelled_before_the_engine_took_it_is_counted():
    """A client that leaves while its request waits to be prepared is counted as cancelled (it was in no series)."""
    metrics = EngineMetrics()
    worker = EngineWorker(
        tiny_chat(), max_rows=2, prefill_budget=64, vision_cache_bytes=0, prefix_cache_bytes=0, metrics=metrics
    )
    loop = asyncio.new_event_loop()
    try:
        job = Job(HI, {"max_new_tokens": 3}, False, loop)
        job.cancelled.set()
        worker.submit(job)
        worker.preparing.shutdown(wait=True)
    finally:
        loop.close()
        worker.engine.stop()
    assert counts(metrics.exposition().decode(), "requests_finished") == {"cancelled": 1}


def test_a_request_submitted_while_the_server_stops_ends_with_shutting_down():
    """stop() landing between submit's check and its hand-off to the preparing pool: the job still gets the 503 error
    (WorkerClosed), never the pool's "cannot schedule new futures after shutdown" (a 500)."""
    worker = EngineWorker(tiny_chat(), max_rows=2, prefill_budget=64, vision_cache_bytes=0, prefix_cache_bytes=0)
    hand_off = worker.preparing.submit
    stopping = threading.Thread(target=worker.stop)

    def submit_while_stopping(*args):
        stopping.start()
        stopping.join(0.3)  # stop() runs now, unless submit holds the lock it needs
        return hand_off(*args)

    worker.preparing.submit = submit_while_stopping
    loop = asyncio.new_event_loop()
    try:
        job = Job(HI, {"max_new_tokens": 3}, False, loop)
        worker.submit(job)
        stopping.join()
        loop.run_until_complete(asyncio.sleep(0))
        kind, value = job.events.get_nowait()
    finally:
        loop.close()
        worker.engine.stop()
    assert kind == "error" and "shutting down" in str(value)


def test_a_prefix_lookup_stays_fast_when_many_entries_share_a_start():
    """Prompts that begin alike (a system prompt, the same image first) share one bucket, which every lookup scans:
    2000 entries took 0.5 s per request (comparisons through tensors), on the engine thread, between decode steps."""
    from deepseek_vl.engine.reuse import PrefixCache

    cache = PrefixCache(capacity_bytes=1 << 30)
    shared = list(range(1000))  # one long system prompt
    nothing = [(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))]
    for index in range(2000):
        cache.store_sequence([*shared, 5000 + index, 7], nothing)
    start = time.perf_counter()
    hit = cache.lookup([*shared, 5000 + 1234, 7, 8])
    assert time.perf_counter() - start < 0.2
    assert hit.length == 1002 and cache.store.peek((*shared, 5000 + 1234, 7)) is hit.entries


def test_sigterm_during_a_stream_ends_the_server_with_status_0(tmp_path):
    """SIGTERM (what systemd, Docker and Kubernetes send) stops like Ctrl-C: the open stream gets the shutdown error
    and [DONE], the process exits 0. uvicorn raises the signal again after its shutdown, which killed it (-15)."""
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "deepseek_vl", "serve", "--model", str(checkpoint("tiny")), "--port", str(port)]
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/health", trust_env=False, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "vl2-tiny-random", "messages": HI, "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, trust_env=False, timeout=60) as reply:
            lines = reply.iter_lines()
            next(line for line in lines if '"content"' in line)  # generating
            server.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert "server_shutting_down" in rest[-2] and rest[-1] == "data: [DONE]"
        assert server.wait(timeout=30) == 0, log.read_text()
        assert "server stopped" in log.read_text()
    finally:
        server.kill()
        server.wait()


# ------------------------------------------------------------------------------------------------------ the soak


def _rss() -> int:
    """Resident bytes after freed heap pages went back to the system (what the process really holds)."""
    gc.collect()
    if (trim := malloc_trim()) is not None:
        trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensor_bytes() -> int:
    """Bytes of every live tensor storage (the model's, the caches', and any left behind by a request)."""
    sizes = {}
    for thing in gc.get_objects():  # type(), not isinstance: ABC checks of unrelated classes add weakrefs each scan
        if type(thing) in (torch.Tensor, torch.nn.Parameter) and thing._base is None and thing.device.type != "meta":
            sizes[thing.data_ptr()] = thing.nbytes
    return sum(sizes.values())


def _random_png(seed: int) -> str:
    rng = random.Random(seed)
    width, height = rng.choice([(64, 64), (400, 300), (800, 200), (200, 800)])
    return data_url(Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)))


def _request(index: int, images: list[str]) -> tuple[dict, str]:
    """A seeded mix: prompt length, images (repeated, distinct, two), options, stream, cancel, disconnect, errors."""
    rng = random.Random(index)
    text = " ".join(rng.choice(("fox", "dog", "sheep", "meadow", "counting")) for _ in range(rng.choice([3, 60, 400])))
    urls = rng.choice([[], [], [rng.choice(images)], [_random_png(index)], [rng.choice(images), _random_png(index)]])
    messages = [user(text, *urls)]
    if rng.random() < 0.15:  # a later turn after a long first one: the prefix cache
        messages = [user("Remember: " + "fox dog " * 40), {"role": "assistant", "content": "OK."}, *messages]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": rng.choice([1, 5, 20, 60]),
        "stream": rng.random() < 0.4,
    }
    if rng.random() < 0.3:
        body |= {"temperature": 0.8, "top_p": 0.9, "seed": rng.randrange(100)}
    if rng.random() < 0.1:
        body["stop"] = ["e"]
    if rng.random() < 0.05:
        body["response_format"] = {"type": "json_object"}
    kind = rng.choices(["answer", "cancel", "disconnect", "partial", "bad"], [70, 10, 8, 4, 8])[0]
    if kind == "bad":
        body |= rng.choice([{"model": "nope"}, {"n": 2}, {"max_tokens": 5000}, {"messages": [user("<|User|>")]}])
    return body, kind


def _send(http: httpx.Client, url: str, body: dict, kind: str) -> None:
    data = json.dumps(body).encode()
    if kind in ("disconnect", "partial"):  # a raw client that leaves while waiting, or in the middle of its body
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(head + (data[: len(data) // 2] if kind == "partial" else data))
            time.sleep(0.05 if kind == "partial" else 0.3)
        return
    if body["stream"]:
        with http.stream("POST", f"{url}/v1/chat/completions", content=data, headers=JSON) as reply:
            for count, _ in enumerate(reply.iter_lines()):
                if kind == "cancel" and count == 2:
                    break  # closing the response mid-stream
    else:
        http.post(f"{url}/v1/chat/completions", content=data, headers=JSON)


def _state(app, http: httpx.Client, url: str) -> dict:
    """What must not grow: memory, threads, files, per-request state, caches, metric series."""
    worker = app.state.worker
    engine, scheduler, runner = worker.engine, worker.engine.scheduler, worker.engine.runner
    exposition = http.get(f"{url}/metrics").text
    caches = (runner.vision_cache, engine.tile_cache, runner.prefix_cache.store)
    return {
        "rss": _rss(),
        "tensors outside the caches": _tensor_bytes() - sum(lru.size for lru in caches),
        "objects": len(gc.get_objects()),
        "threads": sorted(t.name for t in threading.enumerate() if t.name not in TRANSIENT_THREADS),
        "files": len(os.listdir("/proc/self/fd")),
        "in flight": [
            len(engine.handles),
            len(engine.incoming),
            len(scheduler.waiting),
            scheduler.running,
            sum(slot is not None for slot in scheduler.slots),
            len(worker.unprepared),
            runner.cache.capacity,
            app.state.admission.jobs,
            app.state.admission.pixels,
        ],
        "caches": [(lru.size, lru.capacity) for lru in caches],
        "prefix index": (sum(map(len, runner.prefix_cache.buckets.values())), len(runner.prefix_cache.store.entries)),
        "series": {line.rsplit(" ", 1)[0] for line in exposition.splitlines() if not line.startswith("#")},
        "requests": sum(counts(exposition, "requests_finished").values())
        + sum(counts(exposition, "requests_rejected").values()),
    }


@pytest.mark.slow
def test_soak_server_stays_bounded():
    """2 x 150 mixed requests, 8 at a time: after the first half the caches are full; the second half must leave the
    server as it found it (no memory, thread, file, per-request state or metric series more), every request counted
    once, and the same answer to a known prompt."""
    app = create_app(
        tiny_chat(), model_name=MODEL, max_queue=12, max_batch_size=6, prefill_budget=256, vision_cache_mb=8,
        prefix_cache_mb=1, max_images=3,
    )  # fmt: skip
    images = [data_url(path.read_bytes()) for path in sorted((GOLDEN / "images").glob("*.png"))]
    known = {"model": MODEL, "messages": [user("Describe.", images[0])], "max_tokens": 24}
    half = 150
    # one client: each new httpx client leaves ~1000 objects of its TLS context in this process
    with serve(app) as url, ThreadPoolExecutor(8) as clients, httpx.Client(trust_env=False, timeout=120) as http:
        before = http.post(f"{url}/v1/chat/completions", json=known).json()
        _state(app, http, url), _state(app, http, url)  # the first scans of all objects import lazy modules

        def load(start: int) -> dict:
            list(clients.map(lambda index: _send(http, url, *_request(index, images)), range(start, start + half)))
            deadline = time.monotonic() + 30
            while (state := _state(app, http, url))["in flight"] != [0] * 9:
                assert time.monotonic() < deadline, f"requests left behind: {state['in flight']}"
                time.sleep(0.2)
            return state

        first, second = load(0), load(half)
        after = http.post(f"{url}/v1/chat/completions", json=known).json()
    assert after["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
    assert second["requests"] == 1 + 2 * half  # rejected (bad, overloaded, cut-off bodies) or finished, once each
    assert all(size <= capacity for size, capacity in second["caches"]), second["caches"]
    assert second["prefix index"][0] == second["prefix index"][1]
    assert second["threads"] == first["threads"] and second["files"] <= first["files"] + 16
    assert second["series"] == first["series"]
    growth = {key: second[key] - first[key] for key in ("rss", "objects", "tensors outside the caches")}
    print(f"soak: after {half} requests {first['rss'] / 2**20:.0f} MiB; after {2 * half}: {growth}")
    assert growth["tensors outside the caches"] < 2**20 and growth["objects"] < 2000, growth
    assert growth["rss"] < 200 * 2**20, growth  # the allocator's own swings reach 100 MiB; one image's tiles: 2 MB
