"""OpenAI-compatible HTTP API for DeepSeek-VL2: `deepseek-vl2 serve --model ... --port 8000`.

`POST /v1/chat/completions` (plain and server-sent events), `GET /v1/models`, `GET /health`. The model is loaded
once; requests are validated and their images decoded here, then queued for the single generation thread of
`worker.py` (first come first served, compatible waiting requests batched, disconnected clients cancelled).

Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}` so OpenAI clients raise
their usual exceptions, unexpected failures included (500). FastAPI is imported here only, never by
`import deepseek_vl`.

Hostile or careless clients meet bounds, each answered with a 4xx/503 before any work is wasted: body size and
read time, strict JSON types, prompt characters (checked before tokenizing), images per request, pixels per image and
per request (read from the image headers; images wait as their encoded bytes and are decoded when the job runs),
requests and decoded pixels in flight (`admission.py`: 503 with Retry-After), stop strings; remote images only from
public addresses; `Content-Type: application/json` required (no cross-site form posts) and the `Host` header checked
(no DNS rebinding).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import json
import sys
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from PIL import Image
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from deepseek_vl.chat import GenerationOptions
from deepseek_vl.serve.admission import Admission, Overloaded, Ticket

from deepseek_vl.serve.commands import API_KEY_ENV, SERVE_TUNING, check_port
from deepseek_vl.engine.grammar import compile_response_format
from deepseek_vl.engine.metrics import EngineMetrics
from deepseek_vl.serve.worker import ClientGone, EngineWorker, GenerationWorker, Job, WorkerClosed
from deepseek_vl.utils.io import ImageLoadError, RemotePolicy, fetch_image_bytes, image_size

if TYPE_CHECKING:
    from deepseek_vl.chat import ChatResult, VLChat

__all__ = ["API_KEY_ENV", "create_app", "run", "served_name"]

MiB = 1024 * 1024
MAX_STOP_CHARS = 1000  # per stop string
MAX_SEED = 2**64 - 1  # torch.manual_seed's range
_log = logging.getLogger("deepseek_vl.serve")


class APIError(Exception):
    """An error answered as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return _ErrorJSON(self.body(), status_code=self.status, headers=headers)


class _ErrorJSON(JSONResponse):
    """ASCII JSON: an error may quote client input, which can hold lone surrogates that UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _bad_request(message: str, code: str, param: str | None = None) -> APIError:
    return APIError(400, message, code, param)


# ----------------------------------------------------------------------------------------------- request schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "stream": "yes" is an error, not True


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """The OpenAI parameters this model can honour; any other parameter is refused rather than ignored."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send several requests for several answers")
        return n

    @field_validator("frequency_penalty", "presence_penalty", "logprobs")
    @classmethod
    def _only_off(cls, value: float | bool, info: ValidationInfo) -> float | bool:
        """Accepted so that clients sending their defaults work; any other value would be silently wrong."""
        if value:
            hint = "; use repetition_penalty" if info.field_name.endswith("penalty") else ""
            raise ValueError(f"{info.field_name} is not supported by this server{hint}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops)):
            raise ValueError(f"stop takes up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops or None


# ------------------------------------------------------------------------------------------------ application


@dataclass(frozen=True)
class _Limits:
    max_body_bytes: int
    max_images: int
    max_image_pixels: int
    allow_remote_images: bool
    remote_image_timeout: float
    remote_image_max_bytes: int
    default_max_tokens: int
    max_request_pixels: int
    max_prompt_chars: int
    request_timeout: float
    remote: RemotePolicy


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
    limits = _Limits(
        max_body_bytes=max_body_bytes,
        max_images=max_images,
        max_image_pixels=max_image_pixels,
        allow_remote_images=allow_remote_images,
        remote_image_timeout=remote_image_timeout,
        remote_image_max_bytes=remote_image_max_bytes,
        default_max_tokens=default_max_tokens,
        max_request_pixels=max_request_pixels,
        max_prompt_chars=_max_prompt_chars(chat),
        request_timeout=request_timeout,
        remote=RemotePolicy(public_only=True, allowed=tuple(allow_image_hosts)),
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
        if host is not None and "*" not in hosts and not _is_ip_or_listed(host, hosts):
            raise APIError(400, "Unknown Host header; start the server with --allowed-hosts NAME.", "invalid_host")

    authorized = [Depends(check_host), Depends(check_key)]

    @app.get("/health", dependencies=[Depends(check_host)])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "busy": worker.busy, "queued": len(worker.queue)}

    @app.get("/metrics", dependencies=authorized)
    async def prometheus_metrics() -> Response:
        metrics.queue_length.set(len(worker.queue))
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name)]}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def get_model(name: str) -> dict[str, Any]:
        _check_model(name, model_name)
        return _model_card(model_name)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Response:
        _check_json_content_type(request)
        body = await _read_body(request, limits.max_body_bytes, limits.request_timeout)
        req = _parse_request(body)
        _check_model(req.model, model_name)
        _check_options(req)
        _check_prompt_chars(req.messages, limits.max_prompt_chars)
        ticket = admission.admit()
        try:
            messages, sizes = await run_in_threadpool(_to_chat_messages, req.messages, limits)
            ticket.add_pixels(sum(width * height for width, height in sizes))
            max_tokens = await run_in_threadpool(_max_new_tokens, chat, req, messages, sizes, context, limits)
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
        options = req.model_dump(include={"temperature", "top_p", "repetition_penalty", "stop", "seed"})
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
        if first[0] == "error":
            raise _as_api_error(first[1])
        if not req.stream:
            return JSONResponse(reply.completion(first[1]))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            reply.events(first, ticket), media_type="text/event-stream", headers=headers,
            background=BackgroundTask(ticket.release),
        )  # fmt: skip

    return app


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "deepseek-vl2"}


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        message = f"The model {requested!r} does not exist; this server serves {served!r}."
        raise APIError(404, message, "model_not_found", "model")


def _is_ip_or_listed(host: str, names: set[str]) -> bool:
    """An IP address (with or without port) or one of `names`: what a browser sends when no DNS name was used."""
    if host.startswith("["):  # [IPv6]:port
        name = host[1:].split("]", 1)[0]
    else:
        name = host.split(":", 1)[0] if host.count(":") == 1 else host
    name = name.lower()
    if name in names:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _check_json_content_type(request: Request) -> None:
    """Browsers send cross-site form and text/plain POSTs without asking; a JSON API needs application/json."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        message = f"Content-Type must be application/json, got {media_type or 'none'!r}."
        raise APIError(415, message, "unsupported_media_type")


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """Read at most `limit` bytes within `timeout` seconds, refusing larger or slower bodies before buffering them."""
    message = f"Request body exceeds the limit of {limit} bytes (--max-body-bytes); send smaller or fewer images."
    too_large = APIError(413, message, "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError as error:
        message = f"The request body did not arrive within {timeout:g} s (--request-timeout)."
        raise APIError(408, message, "request_timeout") from error
    except ClientDisconnect as error:  # the client gave up mid-upload: nothing to answer, nothing to log
        raise APIError(499, "Client disconnected.", "client_disconnected") from error
    return b"".join(chunks)


def _parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except RecursionError as error:
        raise _bad_request("The request body is nested too deeply.", "invalid_json") from error
    except ValueError as error:  # JSONDecodeError, invalid UTF-8, an integer of more than 4300 digits
        raise _bad_request(f"The request body is not valid JSON: {str(error)[:200]}.", "invalid_json") from error
    try:
        return ChatCompletionRequest.model_validate(payload)
    except RecursionError as error:
        raise _bad_request("The request body is nested too deeply.", "invalid_request") from error
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"] if first["type"] != "extra_forbidden" else "unsupported parameter"
        raise APIError(422, f"Invalid request: {where or 'body'}: {message}.", "invalid_request", where or None)


def _check_options(req: ChatCompletionRequest) -> None:
    """The library's own rules (e.g. temperature 0 or at least 1e-3), so no value can fail later inside torch."""
    try:
        GenerationOptions(
            temperature=req.temperature, top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed
        )
    except ValueError as error:
        raise _bad_request(str(error), "invalid_request") from error


def _max_prompt_chars(chat: VLChat) -> int:
    """A prompt longer than this cannot fit the context whatever it says: the longest token times the context.

    A token's vocabulary string has at least as many characters as its text (byte-level BPE: one per byte).
    """
    longest = max(len(token) for token in chat.tokenizer.get_vocab())
    return int(chat.model.config.language_config.max_position_embeddings) * max(longest, 1)


def _check_prompt_chars(messages: Sequence[ChatMessage], limit: int) -> None:
    """Refuse hopeless prompts before tokenizing them (30 MB of text took minutes and gigabytes to tokenize)."""
    total = 0
    for message in messages:
        parts = [message.content] if isinstance(message.content, str) else message.content
        total += sum(len(part) if isinstance(part, str) else len(getattr(part, "text", "")) for part in parts)
    if total > limit:
        message = f"The messages have {total} characters, more than this model's context can hold ({limit})."
        raise _bad_request(message, "context_length_exceeded", "messages")


def _to_chat_messages(
    messages: Sequence[ChatMessage], limits: _Limits
) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """OpenAI messages to `VLChat` messages and image sizes; images stay encoded bytes until the job runs."""
    count = sum(isinstance(p, ImagePart) for m in messages if not isinstance(m.content, str) for p in m.content)
    if count > limits.max_images:
        message = f"The request has {count} images; at most {limits.max_images} are allowed."
        raise _bad_request(message, "too_many_images", "messages")
    converted, sizes = [], []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = [message.content] if isinstance(message.content, str) else message.content
        texts = [p if isinstance(p, str) else p.text for p in parts if not isinstance(p, ImagePart)]
        urls = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        param = f"messages.{index}.content"
        if urls and role != "user":
            raise _bad_request(f"messages[{index}]: only user messages may contain images.", "invalid_image", param)
        images = [_image_bytes(url, limits, param) for url in urls]
        for data in images:
            sizes.append(_image_size(data, limits, param))
        converted.append({"role": role, "content": "\n".join(texts), **({"images": images} if images else {})})
    pixels = sum(width * height for width, height in sizes)
    if pixels > limits.max_request_pixels:
        message = (
            f"The request's images have {pixels} pixels in all, more than the limit of {limits.max_request_pixels} "
            "(--max-request-pixels); send smaller or fewer images."
        )
        raise _bad_request(message, "too_many_pixels", "messages")
    return converted, sizes


def _image_size(data: bytes, limits: _Limits, param: str) -> tuple[int, int]:
    try:
        return image_size(data, max_pixels=limits.max_image_pixels)
    except ImageLoadError as error:
        raise _bad_request(str(error), "invalid_image", param) from error


def _image_bytes(url: str, limits: _Limits, param: str) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    inline = "send the image inline as a base64 data URL (data:image/png;base64,...)"
    if scheme in ("http", "https") and not limits.allow_remote_images:
        message = f"Image URLs are disabled on this server: {inline}, or start it with --allow-remote-images."
        raise _bad_request(message, "remote_images_disabled", param)
    if scheme not in ("http", "https", "data"):
        raise _bad_request(
            f"Unsupported image_url.url {url[:40]!r}: {inline} or an http(s) URL.", "invalid_image", param
        )
    if scheme == "data":
        try:
            return fetch_image_bytes(url, max_bytes=limits.max_body_bytes)
        except ImageLoadError as error:
            raise _bad_request(str(error), "invalid_image", param) from error
    try:
        timeout, max_bytes = limits.remote_image_timeout, limits.remote_image_max_bytes
        data = fetch_image_bytes(url, timeout=timeout, max_bytes=max_bytes, remote=limits.remote)
        image_size(data, max_pixels=None)
        return data
    except ImageLoadError as error:  # one message for every failure, so the server cannot be used as a port scanner
        _log.info("remote image %s refused: %s", url[:200], error)
        message = (
            "Could not load the image URL: it is not reachable from this server, not a public address, or not an "
            "image within the server's limits; send the image inline as a base64 data URL instead."
        )
        raise _bad_request(message, "invalid_image", param) from error


def _prompt_tokens(chat: VLChat, messages: list[dict], sizes: list[tuple[int, int]]) -> int:
    """The prompt's exact token count without decoding its images: 1x1 stand-ins, corrected by the tiling formula."""
    stand_in = Image.new("RGB", (1, 1))
    light = [{**m, "images": [stand_in] * len(m["images"])} if m.get("images") else m for m in messages]
    cropping = len(sizes) <= 2  # the processor's rule, per conversation
    count = chat.processor.image_token_count
    return chat.count_prompt_tokens(light) + sum(count(size, cropping) - count((1, 1), cropping) for size in sizes)


def _max_new_tokens(
    chat: VLChat,
    req: ChatCompletionRequest,
    messages: list[dict],
    sizes: list[tuple[int, int]],
    context: int,
    limits: _Limits,
) -> int:
    """The generation budget: the requested one if prompt + budget fits the context, else a clear 400."""
    try:
        prompt_tokens = _prompt_tokens(chat, messages, sizes)
    except ValueError as error:
        raise _bad_request(str(error), "invalid_request", "messages") from error
    requested = req.max_completion_tokens or req.max_tokens
    room = context - prompt_tokens
    if room < 1 or (requested is not None and requested > room):
        asked = f" + max_tokens {requested}" if requested is not None else ""
        message = (
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} tokens"
            f"{asked}. Shorten the messages or lower max_tokens."
        )
        raise _bad_request(message, "context_length_exceeded", "messages")
    return requested if requested is not None else min(limits.default_max_tokens, room)


def _check_response_format(chat: VLChat, response_format: dict[str, Any]) -> None:
    """Compile the grammar now (compiled grammars are cached) so that a bad schema is a 400, not a failed job."""
    try:
        compile_response_format(chat.tokenizer, chat.model.config.language_config.vocab_size, response_format)
    except ValueError as error:
        raise _bad_request(str(error), "invalid_response_format", "response_format") from error


def _as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, WorkerClosed):
        return APIError(503, "The server is shutting down.", "server_shutting_down")
    if isinstance(error, ValueError):
        return _bad_request(str(error), "invalid_request")
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
        return _sse({**self._head("chat.completion.chunk"), "choices": [choice]})


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
    import threading

    import uvicorn

    from deepseek_vl.serve.cli import load_chat

    check_port(args.host, args.port)
    chat = load_chat(args)
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
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down
        pass
    print("deepseek-vl2: server stopped", file=sys.stderr)
    return 130 if server.force_exit else 0
