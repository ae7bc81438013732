"""The OpenAI request schema of the HTTP API and every check a request passes before it costs anything.

Each check answers with an `APIError` (an OpenAI error object with its HTTP status) that says what to fix:
strict JSON types (`"stream": "yes"` is an error, not True), bounded stop strings and seeds, the library's own
decoding rules, the body's size and read time, `Content-Type: application/json` (so no web page can post a form
cross-site) and a `Host` that is an IP address or a known name (DNS rebinding), prompt characters before
tokenizing, images per request and pixels per image and per request, read from the image headers: images stay the
encoded bytes the client sent until the job runs. Remote images come only from public addresses, and every failed
download gets the same message, so the server cannot be used to scan ports.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.requests import ClientDisconnect

from deepseek_vl.options import GenerationOptions
from deepseek_vl.utils.io import ImageLoadError, RemotePolicy, fetch_image_bytes, image_size

if TYPE_CHECKING:
    from deepseek_vl.chat import VLChat

__all__ = [
    "MAX_SEED", "MAX_STOP_CHARS", "APIError", "ChatCompletionRequest", "ChatMessage", "Limits", "bad_request",
    "check_json_content_type", "check_model", "check_options", "check_prompt_chars", "generation_budget",
    "host_allowed", "max_prompt_chars", "parse_request", "read_body", "to_chat_messages",
]  # fmt: skip

_log = logging.getLogger("deepseek_vl.serve")

MAX_STOP_CHARS = 1000  # per stop string
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


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


def bad_request(message: str, code: str, param: str | None = None) -> APIError:
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


# -------------------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Limits:
    """The bounds `create_app` was given (and the ones derived from the model)."""

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


def check_model(requested: str, served: str) -> None:
    if requested != served:
        message = f"The model {requested!r} does not exist; this server serves {served!r}."
        raise APIError(404, message, "model_not_found", "model")


def host_allowed(host: str, names: set[str]) -> bool:
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


def check_json_content_type(request: Request) -> None:
    """Browsers send cross-site form and text/plain POSTs without asking; a JSON API needs application/json."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        message = f"Content-Type must be application/json, got {media_type or 'none'!r}."
        raise APIError(415, message, "unsupported_media_type")


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """Read at most `limit` bytes within `timeout` seconds, refusing larger or slower bodies before buffering them."""
    message = f"Request body exceeds the limit of {limit} bytes (--max-body-bytes); send smaller or fewer images."
    too_large = APIError(413, message, "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)  # not asyncio.timeout: Python 3.10 is supported
    except (TimeoutError, asyncio.TimeoutError) as error:
        message = f"The request body did not arrive within {timeout:g} s (--request-timeout)."
        raise APIError(408, message, "request_timeout") from error
    except ClientDisconnect as error:  # the client gave up mid-upload: nothing to answer, nothing to log
        raise APIError(499, "Client disconnected.", "client_disconnected") from error
    return b"".join(chunks)


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except RecursionError as error:
        raise bad_request("The request body is nested too deeply.", "invalid_json") from error
    except ValueError as error:  # JSONDecodeError, invalid UTF-8, an integer of more than 4300 digits
        raise bad_request(f"The request body is not valid JSON: {str(error)[:200]}.", "invalid_json") from error
    try:
        return ChatCompletionRequest.model_validate(payload)
    except RecursionError as error:
        raise bad_request("The request body is nested too deeply.", "invalid_request") from error
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"] if first["type"] != "extra_forbidden" else "unsupported parameter"
        # 400, as OpenAI answers an invalid parameter (FastAPI's own default would be 422).
        raise APIError(400, f"Invalid request: {where or 'body'}: {message}.", "invalid_request", where or None)


def check_options(req: ChatCompletionRequest) -> None:
    """The library's own rules (e.g. temperature 0 or at least 1e-3), so no value can fail later inside torch."""
    try:
        GenerationOptions(
            temperature=req.temperature, top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed
        )
    except ValueError as error:
        raise bad_request(str(error), "invalid_request") from error


def max_prompt_chars(chat: VLChat) -> int:
    """A prompt longer than this cannot fit the context whatever it says: the longest token times the context.

    A token's vocabulary string has at least as many characters as its text (byte-level BPE: one per byte).
    """
    longest = max(len(token) for token in chat.tokenizer.get_vocab())
    return int(chat.model.config.language_config.max_position_embeddings) * max(longest, 1)


def check_prompt_chars(messages: Sequence[ChatMessage], limit: int) -> None:
    """Refuse hopeless prompts before tokenizing them (30 MB of text took minutes and gigabytes to tokenize)."""
    total = 0
    for message in messages:
        parts = [message.content] if isinstance(message.content, str) else message.content
        total += sum(len(part) if isinstance(part, str) else len(getattr(part, "text", "")) for part in parts)
    if total > limit:
        message = f"The messages have {total} characters, more than this model's context can hold ({limit})."
        raise bad_request(message, "context_length_exceeded", "messages")


def to_chat_messages(
    messages: Sequence[ChatMessage], limits: Limits
) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """OpenAI messages to `VLChat` messages and image sizes; images stay encoded bytes until the job runs."""
    count = sum(isinstance(p, ImagePart) for m in messages if not isinstance(m.content, str) for p in m.content)
    if count > limits.max_images:
        message = f"The request has {count} images; at most {limits.max_images} are allowed."
        raise bad_request(message, "too_many_images", "messages")
    converted, sizes = [], []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = [message.content] if isinstance(message.content, str) else message.content
        texts = [p if isinstance(p, str) else p.text for p in parts if not isinstance(p, ImagePart)]
        urls = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        param = f"messages.{index}.content"
        if urls and role != "user":
            raise bad_request(f"messages[{index}]: only user messages may contain images.", "invalid_image", param)
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
        raise bad_request(message, "too_many_pixels", "messages")
    return converted, sizes


def _image_size(data: bytes, limits: Limits, param: str) -> tuple[int, int]:
    try:
        return image_size(data, max_pixels=limits.max_image_pixels)
    except ImageLoadError as error:
        raise bad_request(str(error), "invalid_image", param) from error


def _image_bytes(url: str, limits: Limits, param: str) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    inline = "send the image inline as a base64 data URL (data:image/png;base64,...)"
    if scheme in ("http", "https") and not limits.allow_remote_images:
        message = f"Image URLs are disabled on this server: {inline}, or start it with --allow-remote-images."
        raise bad_request(message, "remote_images_disabled", param)
    if scheme not in ("http", "https", "data"):
        raise bad_request(
            f"Unsupported image_url.url {url[:40]!r}: {inline} or an http(s) URL.", "invalid_image", param
        )
    if scheme == "data":
        try:
            return fetch_image_bytes(url, max_bytes=limits.max_body_bytes)
        except ImageLoadError as error:
            raise bad_request(str(error), "invalid_image", param) from error
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
        raise bad_request(message, "invalid_image", param) from error


def _prompt_tokens(chat: VLChat, messages: list[dict], sizes: list[tuple[int, int]]) -> int:
    """The prompt's exact token count without decoding its images: 1x1 stand-ins, corrected by the tiling formula."""
    stand_in = Image.new("RGB", (1, 1))
    light = [{**m, "images": [stand_in] * len(m["images"])} if m.get("images") else m for m in messages]
    cropping = len(sizes) <= 2  # the processor's rule, per conversation
    count = chat.processor.image_token_count
    return chat.count_prompt_tokens(light) + sum(count(size, cropping) - count((1, 1), cropping) for size in sizes)


def generation_budget(
    chat: VLChat,
    req: ChatCompletionRequest,
    messages: list[dict],
    sizes: list[tuple[int, int]],
    context: int,
    limits: Limits,
) -> int:
    """The generation budget: the requested one if prompt + budget fits the context, else a clear 400."""
    try:
        prompt_tokens = _prompt_tokens(chat, messages, sizes)
    except ValueError as error:
        raise bad_request(str(error), "invalid_request", "messages") from error
    requested = req.max_completion_tokens or req.max_tokens
    room = context - prompt_tokens
    if room < 1 or (requested is not None and requested > room):
        asked = f" + max_tokens {requested}" if requested is not None else ""
        message = (
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} tokens"
            f"{asked}. Shorten the messages or lower max_tokens."
        )
        raise bad_request(message, "context_length_exceeded", "messages")
    return requested if requested is not None else min(limits.default_max_tokens, room)
