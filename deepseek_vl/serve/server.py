"""OpenAI-compatible HTTP API for DeepSeek-VL2: `deepseek-vl2 serve --model ... --port 8000`.

`POST /v1/chat/completions` (plain and server-sent events), `GET /v1/models`, `GET /health`. The model is loaded
once; requests are validated and their images decoded here, then queued for the single generation thread of
`worker.py` (first come first served, compatible waiting requests batched, disconnected clients cancelled).

Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}` so OpenAI clients raise
their usual exceptions, unexpected failures included (500). FastAPI is imported here only, never by
`import deepseek_vl`.

Hostile or careless clients meet bounds before any work is wasted: the request checks of `protocol.py` (4xx), then
`admission.py` (requests and decoded image pixels in flight: 503 with Retry-After).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepseek_vl.engine.grammar import compile_response_format
from deepseek_vl.engine.metrics import EngineMetrics
from deepseek_vl.serve.admission import Admission, Overloaded, Ticket
from deepseek_vl.serve.commands import API_KEY_ENV, SERVE_TUNING
from deepseek_vl.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    Limits,
    bad_request,
    check_json_content_type,
    check_model,
    check_options,
    check_prompt_chars,
    control_tokens,
    generation_budget,
    host_allowed,
    max_prompt_chars,
    parse_request,
    read_body,
    to_chat_messages,
)
from deepseek_vl.serve.worker import ClientGone, EngineWorker, GenerationWorker, Job, WorkerClosed
from deepseek_vl.utils.io import ImageLoadError, RemotePolicy

if TYPE_CHECKING:
    from deepseek_vl.chat import ChatResult, VLChat

__all__ = ["API_KEY_ENV", "create_app", "run", "served_name"]

MiB = 1024 * 1024
_log = logging.getLogger("deepseek_vl.serve")


# ------------------------------------------------------------------------------------------------ application


def create_app(
    chat: VLChat,
    *,
    model_name: str,
    api_key: str | None = None,
    allow_remote_images: bool = False,
    max_body_bytes: int = 32 * MiB,
    max_images: int = 8,
    max_image_pixels: int = 4096 * 4096,
    remote_image_timeout: float = 10.0,
    remote_image_max_bytes: int = 16 * MiB,
    default_max_tokens: int = 512,
    batch_window_ms: float = 20.0,
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_request_pixels: int = 2 * 4096 * 4096,
    max_inflight_pixels: int = 8 * 4096 * 4096,
    request_timeout: float = 30.0,
    allowed_hosts: Sequence[str] = (),
    allow_image_hosts: Sequence[str] = (),
    scheduler: str = "engine",
    prefill_budget: int = 512,
    vision_cache_mb: int = 256,
    prefix_cache_mb: int = 1024,
) -> FastAPI:
    """Build the API around an already loaded `VLChat`; the generation thread lives as long as the app runs.

    `scheduler` "engine" batches continuously (`deepseek_vl.engine`, at most `max_batch_size` rows, prompts run
    `prefill_budget` tokens per step); "window" is the older window batcher, kept for comparison. The engine's
    caches (`vision_cache_mb`, `prefix_cache_mb`) are off at 0.

    `allowed_hosts`: host names accepted in the `Host` header besides IP addresses and localhost ("*": any).
    `allow_image_hosts`: hosts or networks (CIDR) that remote images may come from although they are not public.
    """
    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_images=max_images,
        max_image_pixels=max_image_pixels,
        allow_remote_images=allow_remote_images,
        remote_image_timeout=remote_image_timeout,
        remote_image_max_bytes=remote_image_max_bytes,
        default_max_tokens=default_max_tokens,
        max_request_pixels=max_request_pixels,
        max_prompt_chars=max_prompt_chars(chat),
        request_timeout=request_timeout,
        remote=RemotePolicy(public_only=True, allowed=tuple(allow_image_hosts)),
        control_tokens=control_tokens(chat),
    )
    context = int(chat.model.config.language_config.max_position_embeddings)
    admission = Admission(max_queue, max_inflight_pixels)
    hosts = {host.lower() for host in allowed_hosts} | {"localhost"}
    metrics = EngineMetrics()
    if scheduler == "engine":
        worker: EngineWorker | GenerationWorker = EngineWorker(
            chat, max_rows=max_batch_size, prefill_budget=prefill_budget, vision_cache_bytes=vision_cache_mb * MiB,
            prefix_cache_bytes=prefix_cache_mb * MiB, metrics=metrics,
        )  # fmt: skip
    elif scheduler == "window":
        worker = GenerationWorker(chat, batch_window_ms / 1000, max_batch_size)
    else:
        raise ValueError(f"scheduler must be 'engine' or 'window', got {scheduler!r}")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="DeepSeek-VL2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.admission = admission

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        metrics.rejected.labels(error.code).inc()
        return error.response()

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, error: Overloaded) -> JSONResponse:
        body = APIError(503, str(error), "server_overloaded")
        metrics.rejected.labels(body.code).inc()
        return body.response(headers={"Retry-After": str(error.retry_after)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        _log.exception("unexpected error in %s %s", request.method, request.url.path)
        return APIError(500, f"Internal server error ({type(error).__name__}).", "internal_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return APIError(error.status_code, str(error.detail), code).response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.", "missing_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "invalid_api_key")

    def check_host(request: Request) -> None:
        """A browser sends the name it resolved: refuse names this server was not told about (DNS rebinding)."""
        host = request.headers.get("host")
        if host is not None and "*" not in hosts and not host_allowed(host, hosts):
            raise APIError(400, "Unknown Host header; start the server with --allowed-hosts NAME.", "invalid_host")

    authorized = [Depends(check_host), Depends(check_key)]

    @app.get("/health", dependencies=[Depends(check_host)])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "busy": worker.busy, "queued": len(worker.queue)}

    @app.get("/metrics", dependencies=authorized)
    async def prometheus_metrics() -> Response:
        metrics.queue_length.set(len(worker.queue))
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    model_card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "deepseek-vl2"}

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name, model_name)
        return model_card

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Response:
        check_json_content_type(request)
        body = await read_body(request, limits.max_body_bytes, limits.request_timeout)
        req = parse_request(body)
        check_model(req.model, model_name)
        check_options(req)
        check_prompt_chars(req.messages, limits.max_prompt_chars, context)
        ticket = admission.admit()
        try:
            messages, sizes = await run_in_threadpool(to_chat_messages, req.messages, limits)
            ticket.add_pixels(sum(width * height for width, height in sizes))
            max_tokens = await run_in_threadpool(generation_budget, chat, req, messages, sizes, context, limits)
            response = await _answer(request, req, messages, max_tokens, ticket)
        except BaseException:
            ticket.release()
            raise
        if not isinstance(response, StreamingResponse):
            ticket.release()  # a stream releases its ticket when it ends
        return response

    async def _answer(
        request: Request, req: ChatCompletionRequest, messages: list[dict], max_tokens: int, ticket: Ticket
    ) -> Response:
        options = req.decoding()
        if req.response_format is not None:
            await run_in_threadpool(_check_response_format, chat, req.response_format)
            options["response_format"] = req.response_format
        job = Job(messages, {**options, "max_new_tokens": max_tokens}, req.stream, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except WorkerClosed as error:
            raise APIError(503, "The server is shutting down.", "server_shutting_down") from error
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        reply = _Reply(model_name, request, job, include_usage)
        try:
            first = await job.next_event(request.is_disconnected)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the job is cancelled
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if first[0] == "error":  # not raised: the worker or engine counted this job in requests_finished
            return _as_api_error(first[1]).response()
        if not req.stream:
            return JSONResponse(reply.completion(first[1]))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            reply.events(first, ticket), media_type="text/event-stream", headers=headers,
            background=BackgroundTask(ticket.release),
        )  # fmt: skip

    return app


def _check_response_format(chat: VLChat, response_format: dict[str, Any]) -> None:
    """Compile the grammar now (compiled grammars are cached) so that a bad schema is a 400, not a failed job."""
    try:
        compile_response_format(chat.tokenizer, chat.model.config.language_config.vocab_size, response_format)
    except ValueError as error:
        raise bad_request(str(error), "invalid_response_format", "response_format") from error


def _as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, WorkerClosed):
        return APIError(503, "The server is shutting down.", "server_shutting_down")
    if isinstance(error, ImageLoadError):  # a header that read fine but a body that does not decode
        return bad_request(str(error), "invalid_image", "messages")
    if isinstance(error, ValueError):
        return bad_request(str(error), "invalid_request")
    return APIError(500, f"Generation failed: {type(error).__name__}: {error}", "generation_failed")


class _Reply:
    """Shapes one job's results as an OpenAI `chat.completion` or a stream of `chat.completion.chunk` events."""

    def __init__(self, model: str, request: Request, job: Job, include_usage: bool) -> None:
        self.model, self.request, self.job, self.include_usage = model, request, job, include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def completion(self, result: ChatResult) -> dict[str, Any]:
        message = {"role": "assistant", "content": result.text, "grounding": result.grounding.to_dict()}
        choice = {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
        return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(result)}

    async def events(self, first: tuple[str, Any], ticket: Ticket) -> AsyncIterator[str]:
        """SSE: a role chunk, content chunks, a finish chunk (with grounding), optional usage chunk, [DONE]."""
        event = first
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while event[0] == "piece":
                if event[1]:
                    yield self._chunk({"content": event[1]})
                event = await self.job.next_event(self.request.is_disconnected)
            if event[0] == "error":
                yield _sse(_as_api_error(event[1]).body())
            else:
                result: ChatResult = event[1]
                yield self._chunk({"grounding": result.grounding.to_dict()}, result.finish_reason)
                if self.include_usage:
                    yield _sse({**self._head("chat.completion.chunk"), "choices": [], "usage": _usage(result)})
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            self.job.cancelled.set()  # no-op when finished; stops generation when the client went away
            ticket.release()

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        usage = {"usage": None} if self.include_usage else {}  # as OpenAI: null until the usage chunk
        return _sse({**self._head("chat.completion.chunk"), "choices": [choice], **usage})


def _usage(result: ChatResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# -------------------------------------------------------------------------------------------------------- CLI

SHUTDOWN_GRACE_S = 5.0  # after Ctrl-C, how long open responses get to end before their connections are closed


def served_name(model: str) -> str:
    """The model name clients see by default: a checkpoint folder's own name (never its path), or the Hub id."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def run(args: argparse.Namespace) -> int:
    """`deepseek-vl2 serve` (options in commands.py): load the model once, then serve until Ctrl-C or SIGTERM.

    The first signal stops taking requests and stops the generations (open streams end with an error event), then
    the process exits with status 0; a second signal exits at once.
    """
    import signal
    import threading

    import uvicorn

    from deepseek_vl.serve.cli import load_chat

    chat = load_chat(args)  # the port was checked by commands.run_serve, before the heavy imports
    tuning = {name: getattr(args, name) for name in SERVE_TUNING}
    app = create_app(
        chat,
        model_name=args.model_name or served_name(args.model),
        api_key=args.api_key or None,
        allow_remote_images=args.allow_remote_images,
        allowed_hosts=args.allowed_hosts,
        allow_image_hosts=args.allow_image_hosts,
        **tuning,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:  # the signal handler must not block: the worker stops in its own thread
                print("\ndeepseek-vl2: stopping (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
                threading.Thread(target=app.state.worker.stop, name="deepseek-vl2-shutdown", daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        limit_concurrency=args.limit_concurrency, timeout_keep_alive=args.timeout_keep_alive,
        h11_max_incomplete_event_size=64 * 1024,
    )  # fmt: skip: connections beyond the limit get 503; idle keep-alive connections are closed
    server = Server(config)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # else its re-raise below kills the process (-15)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down
        pass
    print("deepseek-vl2: server stopped", file=sys.stderr)
    return 130 if server.force_exit else 0
