"""Load test of the HTTP server: the continuous-batching engine against the window scheduler it replaced.

Each scheduler runs in its own process (so peak memory is its own): the server on 127.0.0.1, then a bounded
open-loop load from local client threads (Poisson arrivals, at most --concurrency requests in flight), a mix of
short and long prompts, with and without images, streamed and not, different max_tokens. Reported: completed
requests/s, generated tokens/s, p50/p99 time to first token (streamed requests) and end-to-end latency, peak RSS,
and the time to first token of a conversation's second turn with an image against its first turn.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/serve_load.py --requests 96 --concurrency 32
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
LONG_TEXT = "The quick brown fox jumps over the lazy dog while the sea keeps rolling onto the shore. " * 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def png_data_url(size: tuple[int, int], seed: int) -> str:
    from PIL import Image

    image = Image.effect_noise(size, 40 + seed).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def workload(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    images = [png_data_url((96, 96), i) for i in range(4)]
    requests = []
    for index in range(count):
        kind = rng.choice(["short", "long", "image"])
        text = {"short": f"Question {index}: what is {index} plus two?", "long": LONG_TEXT + f" ({index})"}.get(
            kind, f"Describe picture {index}."
        )
        content: str | list = text
        if kind == "image":
            content = [{"type": "image_url", "image_url": {"url": rng.choice(images)}}, {"type": "text", "text": text}]
        requests.append({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": rng.choice([16, 32, 64, 128]),
            "stream": rng.random() < 0.5,
        })  # fmt: skip
    return requests


def send(http, url: str, body: dict) -> tuple[float | None, float, int]:
    """(time to first token or None when not streamed, latency, completion tokens) of one request."""
    start = time.perf_counter()
    body = {"model": "bench", **body}
    if not body["stream"]:
        response = http.post(url, json=body)
        response.raise_for_status()
        return None, time.perf_counter() - start, response.json()["usage"]["completion_tokens"]
    first, tokens = None, 0
    body["stream_options"] = {"include_usage": True}
    with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first, time.perf_counter() - start, tokens


def run_load(base: str, requests: list[dict], concurrency: int, rate: float, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in requests:
        arrivals.append(t)
        t += rng.expovariate(rate)
    slots = threading.Semaphore(concurrency)
    results: list[tuple[float | None, float, int]] = []
    lock = threading.Lock()

    def one(body: dict) -> None:
        try:
            with httpx.Client(trust_env=False, timeout=600) as http:
                outcome = send(http, f"{base}/v1/chat/completions", body)
            with lock:
                results.append(outcome)
        finally:
            slots.release()

    threads = []
    start = time.perf_counter()
    for at, body in zip(arrivals, requests):
        time.sleep(max(0.0, at - (time.perf_counter() - start)))
        slots.acquire()  # bounded: at most `concurrency` in flight, later arrivals wait their turn
        thread = threading.Thread(target=one, args=(body,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results if r[0] is not None]
    latency = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall, "tokens": tokens,
        "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "latency_p50_s": percentile(latency, 0.5), "latency_p99_s": percentile(latency, 0.99),
    }  # fmt: skip


def second_turn(base: str, repeats: int) -> dict:
    """Time to first token of turn 1 (a new image) and turn 2 (same image, turn 1 repeated) of conversations."""
    import httpx

    firsts, seconds = [], []
    with httpx.Client(trust_env=False, timeout=600) as http:
        for index in range(repeats):
            image = {"type": "image_url", "image_url": {"url": png_data_url((640, 480), 100 + index)}}
            turn = [{"role": "user", "content": [image, {"type": "text", "text": "What is in this image?"}]}]
            body = {"messages": turn, "max_tokens": 24, "stream": True}
            first, _, _ = send(http, f"{base}/v1/chat/completions", body)
            answer = http.post(f"{base}/v1/chat/completions", json={"model": "bench", **body, "stream": False})
            text = answer.json()["choices"][0]["message"]["content"]
            turn = [*turn, {"role": "assistant", "content": text}, {"role": "user", "content": "And the colours?"}]
            second, _, _ = send(http, f"{base}/v1/chat/completions", {**body, "messages": turn})
            firsts.append(first)
            seconds.append(second)
    return {"first_turn_ttft_s": statistics.median(firsts), "second_turn_ttft_s": statistics.median(seconds)}


def child(args: argparse.Namespace) -> None:
    """One scheduler: serve, load, measure; prints one JSON line."""
    import torch
    import uvicorn

    from deepseek_vl.chat import VLChat
    from deepseek_vl.serve.server import create_app

    torch.set_num_threads(args.threads)
    if args.real_tiny_layers:  # the released Tiny's shapes, random weights, fewer layers (bench.py's builder)
        sys.path.insert(0, str(Path(__file__).parent))
        from bench import build_model

        from deepseek_vl.models import DeepseekVLV2Processor

        dtype = getattr(torch, args.dtype)
        model = build_model("tiny", args.real_tiny_layers, args.vision_layers, dtype, args.device)
        chat = VLChat(model, DeepseekVLV2Processor.from_pretrained(args.model))
    else:
        chat = VLChat.from_pretrained(args.model, device=args.device, dtype=args.dtype, progress=False)
    app = create_app(
        chat, model_name="bench", max_batch_size=args.concurrency, scheduler=args.scheduler,
        max_queue=4 * args.requests,
    )  # fmt: skip
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    run_load(base, workload(8, args.seed + 1), 4, 100.0, args.seed)  # warm-up
    report = {"scheduler": args.scheduler, **run_load(base, workload(args.requests, args.seed), args.concurrency,
                                                        args.rate, args.seed)}  # fmt: skip
    report.update(second_turn(base, args.turn_repeats))
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    server.should_exit = True
    print(json.dumps(report), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(GOLDEN / "checkpoints" / "vl2-tiny-random"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=16.0, help="mean arrivals per second (Poisson)")
    parser.add_argument("--turn-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real-tiny-layers", type=int, default=0,
                        help="serve the real Tiny shapes (random weights) with this many language layers")
    parser.add_argument("--vision-layers", type=int, default=27, help="SigLIP layers with --real-tiny-layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", choices=["engine", "window"], help="run one scheduler (the child process)")
    parser.add_argument("--out", type=Path, help="also write the reports as JSON here")
    args = parser.parse_args()
    if args.scheduler:
        child(args)
        return
    reports = {}
    for scheduler in ("window", "engine"):
        command = [sys.executable, __file__, *sys.argv[1:], "--scheduler", scheduler]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        reports[scheduler] = json.loads(output.strip().splitlines()[-1])
    window, engine = reports["window"], reports["engine"]
    model = f"real Tiny shapes, {args.real_tiny_layers} language + {args.vision_layers} vision layers" if (
        args.real_tiny_layers) else args.model
    print(f"model {model}, {args.dtype}, {args.requests} requests, <= {args.concurrency} in flight, "
          f"{args.rate}/s arrivals")
    print(f"{'':24}{'window':>12}{'engine':>12}{'engine/window':>15}")
    for key in ("requests_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s",
                "first_turn_ttft_s", "second_turn_ttft_s", "peak_rss_gib"):  # fmt: skip
        print(f"{key:24}{window[key]:12.3f}{engine[key]:12.3f}{engine[key] / window[key]:15.2f}")
    for name, report in reports.items():
        ratio = report["second_turn_ttft_s"] / report["first_turn_ttft_s"]
        print(f"{name}: second turn / first turn time to first token = {ratio:.2f}")
    if args.out:
        args.out.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
