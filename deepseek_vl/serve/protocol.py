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
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from starlette.requests import ClientDisconnect

from deepseek_vl.chat import BOX_MARKUP, IMAGE_TAG
from deepseek_vl.options import GenerationOptions
from deepseek_vl.utils.io import ImageLoadError, RemotePolicy, fetch_image_bytes, image_size

if TYPE_CHECKING:
    from deepseek_vl.chat import VLChat

__all__ = [
    "MAX_SEED", "MAX_STOP_CHARS", "APIError", "ChatCompletionRequest", "ChatMessage", "Limits", "bad_request",
    "check_json_content_type", "check_model", "check_options", "check_prompt_chars", "control_tokens",
    "generation_budget", "host_allowed", "max_prompt_chars", "parse_request", "read_body", "to_chat_messages",
]  # fmt: skip

_log = logging.getLogger("deepseek_vl.serve")

MAX_STOP_CHARS = 1000  # per stop string
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1  # torch.manual_seed's range (a negative seed wraps modulo 2**64)


class APIError(Exception):
    """An error answered as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"  # OpenAI's type for every 4xx
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
    """Strict types ("stream": "yes" is an error, not True), no unknown fields, and null meaning "not given"."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """OpenAI's parameters are nullable: `"temperature": null` is the default, `"tools": null` asks for nothing."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high", "original"] = "auto"  # the model always tiles at its own resolution


class TextPart(_Strict):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a cache hint: prefixes are cached here anyway


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL
    prompt_cache_breakpoint: dict[str, Any] | None = None


class RefusalPart(_Strict):
    """What an earlier answer refused, sent back as the assistant's text."""

    type: Literal["refusal"]
    refusal: str


def _tag(value: Any, tags: tuple[str, ...]) -> str | None:
    """The union member a value is validated as, so that an error names the member's own field, not every member's."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"<{kind}>" if kind in tags else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("<text>")]
    | Annotated[ImagePart, Tag("<image_url>")]
    | Annotated[RefusalPart, Tag("<refusal>")],
    Discriminator(
        lambda value: _tag(value, ("text", "image_url", "refusal")),
        custom_error_type="invalid_content_part",
        custom_error_message="a content part needs type 'text' or 'image_url' ('refusal' in assistant messages)",
    ),
]
Content = Annotated[
    Annotated[str, Tag("<str>")] | Annotated[list[ContentPart], Tag("<parts>")],
    Discriminator(
        lambda value: "<str>" if isinstance(value, str) else "<parts>" if isinstance(value, list) else None,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]


class ChatMessage(_Strict):
    """A message; an assistant message may be an earlier answer sent back as it came (`response.choices[0].message`)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Content | None = None
    name: str | None = None
    # The fields of an earlier answer: this server's own grounding (recomputed from the text), an empty refusal,
    # no tool calls and no citations. Non-empty tool calls are refused: this model cannot have made them.
    refusal: str | None = None
    grounding: dict[str, Any] | None = None
    tool_calls: list[Any] = Field(default_factory=list, max_length=0)
    annotations: list[Any] = Field(default_factory=list)

    @model_validator(mode="after")
    def _content_fits_role(self) -> ChatMessage:
        if self.role != "assistant":
            if self.content is None:
                raise ValueError(f"a {self.role} message needs content")
            if any(isinstance(part, RefusalPart) for part in self.content if not isinstance(self.content, str)):
                raise ValueError("a refusal part can only be in an assistant message")
        return self

    def text_and_urls(self) -> tuple[str, list[str]]:
        """The message's text (parts joined by newlines) and its image URLs in order."""
        content = self.content if self.content is not None else self.refusal or ""
        if isinstance(content, str):
            return content, []
        texts, urls = [], []
        for part in content:
            if isinstance(part, ImagePart):
                urls.append(part.image_url.url)
            else:
                texts.append(part.refusal if isinstance(part, RefusalPart) else part.text)
        return "\n".join(texts), urls


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool = True  # padding against length side channels; nothing to pad here


class ChatCompletionRequest(_Strict):
    """The OpenAI parameters this model can honour; any other parameter is refused rather than ignored."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0: only the most likely token, i.e. greedy
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    # Accepted only when they ask for nothing this model does: no tools, no token biases.
    tools: list[Any] = Field(default_factory=list, max_length=0)
    tool_choice: Literal["none", "auto"] = "none"
    parallel_tool_calls: bool = True
    logit_bias: dict[str, float] = Field(default_factory=dict, max_length=0)
    modalities: list[Literal["text"]] = ["text"]
    # Accepted and ignored: they do not change the answer (user ids, storage, routing and cache hints).
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    store: bool = False
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send several requests for several answers")
        return n

    @field_validator("frequency_penalty", "presence_penalty", "logprobs", "top_logprobs")
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

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    def decoding(self) -> dict[str, Any]:
        """The library's settings: top_p 0 keeps the most likely token (greedy); a negative seed wraps as in torch."""
        greedy = self.top_p == 0
        return {
            "temperature": 0.0 if greedy else self.temperature,
            "top_p": 1.0 if greedy else self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "seed": None if self.seed is None else self.seed % 2**64,
        }


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
    control_tokens: frozenset[str] = frozenset()


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


_MUST_BE_EMPTY = {
    "tools": "this model cannot call tools; leave tools empty",
    "tool_calls": "this model makes no tool calls; send earlier answers without tool_calls",
    "logit_bias": "logit_bias is not supported by this server; leave it empty",
}


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
        where = ".".join(str(part) for part in first["loc"] if not str(part).startswith("<"))  # not union tags
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unsupported parameter"
        elif first["type"] == "too_long" and first["loc"][-1] in _MUST_BE_EMPTY:
            message = _MUST_BE_EMPTY[first["loc"][-1]]
        # 400, as OpenAI answers an invalid parameter (FastAPI's own default would be 422).
        raise APIError(400, f"Invalid request: {where or 'body'}: {message}.", "invalid_request", where or None)


def check_options(req: ChatCompletionRequest) -> None:
    """The library's own rules (e.g. temperature 0 or at least 1e-3), so no value can fail later inside torch."""
    try:
        GenerationOptions(**req.decoding())
    except ValueError as error:  # the library's message starts with the parameter's name
        raise bad_request(str(error), "invalid_request", str(error).split(" ", 1)[0]) from error


def control_tokens(chat: VLChat) -> frozenset[str]:
    """The tokenizer's special tokens that only the chat template writes (roles, end of sentence, tool calls...).

    Written in a message they would be tokenized as the real control tokens, so a client could forge turns; the
    markup clients do write (`<image>`, `<|grounding|>`, `<|ref|>`, `<|det|>` and their ends) stays allowed.
    """
    allowed = {IMAGE_TAG, "<|grounding|>", *BOX_MARKUP}
    specials = (token.content for token in chat.tokenizer.added_tokens_decoder.values() if token.special)
    return frozenset(token for token in specials if token not in allowed)


def max_prompt_chars(chat: VLChat) -> int:
    """A prompt longer than this cannot fit the context whatever it says: the longest token times the context.

    A token's vocabulary string has at least as many characters as its text (byte-level BPE: one per byte).
    """
    longest = max(len(token) for token in chat.tokenizer.get_vocab())
    return int(chat.model.config.language_config.max_position_embeddings) * max(longest, 1)


def check_prompt_chars(messages: Sequence[ChatMessage], limit: int, context: int) -> None:
    """Refuse hopeless prompts before tokenizing them (30 MB of text took minutes and gigabytes to tokenize).

    Every user or assistant turn takes at least one token of the template, whatever its text: 100k empty messages
    (3 MB) took 15 s to tokenize.
    """
    turns = sum(message.role in ("user", "assistant") for message in messages)
    if turns > context:
        message = (
            f"The request has {turns} user and assistant messages; each takes at least one token, and this model's "
            f"context holds {context} tokens."
        )
        raise bad_request(message, "context_length_exceeded", "messages")
    total = 0
    for message in messages:
        total += len(message.text_and_urls()[0])
    if total > limit:
        message = f"The messages have {total} characters, more than this model's context can hold ({limit})."
        raise bad_request(message, "context_length_exceeded", "messages")


def to_chat_messages(
    messages: Sequence[ChatMessage], limits: Limits
) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """OpenAI messages to `VLChat` messages and image sizes; images stay encoded bytes until the job runs.

    OpenAI takes system messages anywhere; DeepSeek-VL2's template has one system prompt, before the first turn.
    As DeepSeek-V3's and R1's chat templates do, every system message goes there in order, separated by a blank line.
    """
    count = sum(len(message.text_and_urls()[1]) for message in messages)
    if count > limits.max_images:
        message = f"The request has {count} images; at most {limits.max_images} are allowed."
        raise bad_request(message, "too_many_images", "messages")
    converted, sizes, system = [], [], []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        text, urls = message.text_and_urls()
        param = f"messages.{index}.content"
        forged = next((token for token in limits.control_tokens if token in text), None)
        if forged is not None:
            message = f"messages[{index}] contains {forged!r}, a control token only the chat template may write."
            raise bad_request(message, "invalid_request", param)
        if urls and role != "user":
            raise bad_request(f"messages[{index}]: only user messages may contain images.", "invalid_image", param)
        if role == "system":
            system.append(text)
            continue
        images = [_image_bytes(url, limits, param) for url in urls]
        for data in images:
            sizes.append(_image_size(data, limits, param))
        converted.append({"role": role, "content": text, **({"images": images} if images else {})})
    if system:
        converted.insert(0, {"role": "system", "content": "\n\n".join(text for text in system if text)})
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
