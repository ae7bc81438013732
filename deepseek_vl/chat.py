"""High-level chat with DeepSeek-VL2: messages and images in; text, token counts and parsed boxes out.

`VLChat` wraps the processor and the model so that a caller never handles tensors, templates or special tokens:

    pipe = VLChat.from_pretrained("deepseek-ai/deepseek-vl2-tiny")
    result = pipe.chat([{"role": "user", "content": "<|ref|>The giraffe at the back<|/ref|>.", "images": ["a.jpg"]}])
    result.text, result.grounding.boxes

It adds nothing that changes the model's tokens: the prompt goes through the official processor unchanged and
generation is the official web demo's `model.generate(input_ids=..., images=..., ...)` call, so greedy answers are
the official ones, alone or in a left-padded batch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from deepseek_vl.grounding import GroundingResult, parse_grounding
from deepseek_vl.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl.models.modeling import quant_method, saved_config
from deepseek_vl.models.processing import VLChatProcessorOutput
from deepseek_vl.options import DEFAULT_MODEL, GenerationOptions, ModelLoadError, is_hub_id
from deepseek_vl.utils.io import DEFAULT_MAX_PIXELS, load_image

__all__ = ["DEFAULT_MODEL", "ChatResult", "ChatStream", "GenerationOptions", "ModelLoadError", "VLChat"]

USER, ASSISTANT, SYSTEM = "<|User|>", "<|Assistant|>", "system"
IMAGE_TAG = "<image>"
BOX_MARKUP = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>")
_ROLES = {"user": USER, "<|user|>": USER, "assistant": ASSISTANT, "<|assistant|>": ASSISTANT, "system": SYSTEM}
_MODEL_INPUTS = ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")
_HUB_FILES = ["*.json", "*.safetensors"]  # config, processor and tokenizer files, weights (and their index)
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


@dataclass
class ChatResult:
    """One answer. `text` keeps the grounding markup (`<|ref|>`, `<|det|>`) so boxes can be parsed from it."""

    text: str  # special tokens removed but for the box markup
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string), "length" (max_new_tokens), "cancelled" (ChatStream.close)
    grounding: GroundingResult
    token_ids: list[int] = field(default_factory=list)  # the generated ids, a final eos included

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "boxes": [box.to_dict() for box in self.grounding.boxes],
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
        }


class VLChat:
    """Chat, batch and streaming generation over a DeepSeek-VL2 model and its processor.

    One generation runs at a time per instance (a lock serialises callers), so seeds stay reproducible when
    several threads share it. `max_image_pixels` caps width * height of every image it loads (None: no cap).
    """

    max_image_pixels: int | None = DEFAULT_MAX_PIXELS

    def __init__(self, model: DeepseekVLV2ForCausalLM, processor: DeepseekVLV2Processor) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._lock = threading.Lock()
        # every special token but the box markup, which the answer needs (skip_special_tokens would drop it too)
        markup = set(self.tokenizer.convert_tokens_to_ids(list(BOX_MARKUP)))
        special = {index for index, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        self._hidden_ids = special - markup

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        progress: bool = True,
        adapter: str | os.PathLike | None = None,
        quantize: str | None = None,
    ) -> VLChat:
        """Load a local checkpoint folder or a Hub repo id (downloaded once, then read from the cache).

        device "auto" is cuda when available, else cpu; dtype "auto" is bfloat16 on cuda, float32 on cpu.
        Loading is strict: a missing or mis-shaped weight is an error naming it. ``adapter``: a LoRA adapter
        folder from ``deepseek-vl2 finetune`` (needs peft), merged into the weights once, so it costs no speed.
        ``quantize``: "int8" | "int4" or "nf4" (bitsandbytes; all on CPU and CUDA) weights for the language model,
        quantized while loading (see deepseek_vl/quantization.py); dtype "auto" is then bfloat16, as for a folder
        quantized by auto-round.
        """
        if quantize is not None and adapter is not None:
            raise ValueError("adapter and quantize together: merge the adapter first (deepseek-vl2 merge), then quantize")
        torch_device = resolve_device(device)
        folder = resolve_model_folder(model)
        if adapter is not None and (saved := saved_quantization(folder)) is not None:
            raise ValueError(
                f"{folder} holds {saved} weights, which an adapter cannot be merged into: merge the adapter into the "
                "full-precision model (deepseek-vl2 merge), then quantize"
            )
        torch_dtype = load_dtype(folder, dtype, torch_device, quantize)
        if adapter is not None:
            from deepseek_vl.train.merge import check_adapter_folder

            check_adapter_folder(adapter)  # now, not after minutes of loading the model
        with _progress_bars(progress):
            with _warnings_off():  # the released tokenizer_config names a class transformers swaps, with a warning
                processor = DeepseekVLV2Processor.from_pretrained(folder)
            placement = {} if torch_device.type == "cpu" else {"device_map": str(torch_device)}
            if quantize is not None:
                placement["quantize"] = quantize
            network = DeepseekVLV2ForCausalLM.from_pretrained(folder, dtype=torch_dtype, **placement)
        if adapter is not None:
            from deepseek_vl.train.merge import merge_adapter

            network = merge_adapter(network, adapter)
        return cls(network.to(torch_device).eval(), processor)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def chat(
        self,
        messages: list[dict[str, Any]],
        images: list | None = None,
        *,
        system_prompt: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        chunk_size: int | None = None,
        stream: bool = False,
        exif_transpose: bool = False,
        response_format: dict[str, Any] | None = None,
    ) -> ChatResult | ChatStream:
        """Answer the last user message of a conversation.

        messages: `{"role": "user" | "assistant" | "system" (or "<|User|>", "<|Assistant|>"), "content": str,
        "images": [sources]}`; a source is anything `load_image` accepts (path, file://, http(s) URL, data URL,
        PIL image, numpy array). A user message with images but no `<image>` tag gets one `<image>\\n` per image
        prepended, so plain questions work. `images=` is the alternative to per-message images: a flat list for
        the `<image>` tags in order, or, if there are no tags, the images of the last user message.
        A trailing assistant message is continued (an answer prefix); otherwise an empty one is appended.
        `system_prompt` becomes a leading system message, which the model sees (the processor's own
        `system_prompt=` argument only changes `sft_format`). `chunk_size` prefills long prompts that many
        tokens at a time. `stream=True` returns a `ChatStream` of text pieces. `response_format` (OpenAI's
        `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"schema": {...}}}`) constrains the
        answer to JSON with xgrammar; an unusable schema is a ValueError.
        """
        options = GenerationOptions(max_new_tokens, temperature, top_p, repetition_penalty, stop, seed, chunk_size)
        sample, image_sizes = self._prepare(messages, images, system_prompt, exif_transpose)
        grammar = self._grammar(response_format)
        if not stream:
            return self._generate([sample], [image_sizes], options, grammar=grammar)[0]

        def run(streamer: BaseStreamer, cancel: threading.Event) -> ChatResult:
            return self._generate([sample], [image_sizes], options, streamer=streamer, cancel=cancel, grammar=grammar)[0]

        return ChatStream(run, self._decode, options.stop)

    def chat_batch(
        self,
        conversations: list[list[dict[str, Any]]],
        *,
        images: list[list | None] | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        chunk_size: int | None = None,
        exif_transpose: bool = False,
    ) -> list[ChatResult]:
        """Answer several conversations with one left-padded forward per step; greedy tokens equal `chat`'s.

        `images`, if given, holds one `chat(images=...)` list (or None) per conversation.
        """
        if not conversations:
            return []
        if isinstance(conversations[0], dict):
            raise ValueError(
                "chat_batch takes a list of conversations, each a list of messages, but got messages: pass "
                "[messages] (or call chat(messages))"
            )
        if images is not None and len(images) != len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(images)} image lists")
        options = GenerationOptions(max_new_tokens, temperature, top_p, repetition_penalty, stop, seed, chunk_size)
        prepared = [
            self._prepare(messages, conversation_images, system_prompt, exif_transpose)
            for messages, conversation_images in zip(conversations, images or [None] * len(conversations))
        ]
        return self._generate([p[0] for p in prepared], [p[1] for p in prepared], options)

    def count_prompt_tokens(
        self, messages: list[dict[str, Any]], images: list | None = None, *, system_prompt: str | None = None
    ) -> int:
        """Prompt length in tokens, image tokens included (images are loaded: their size sets the tiling)."""
        return len(self._prepare(messages, images, system_prompt, exif_transpose=False)[0].input_ids)

    def _prepare(
        self, messages: list[dict[str, Any]], images: list | None, system_prompt: str | None, exif_transpose: bool
    ) -> tuple[VLChatProcessorOutput, list[tuple[int, int]]]:
        """Official-role conversation + loaded images -> one processor sample, and the images' sizes (for boxes)."""
        conversation, pil_images = build_conversation(
            messages, images, system_prompt, exif_transpose, max_pixels=self.max_image_pixels
        )
        sample = self.processor.process_one(conversations=conversation, images=pil_images, inference_mode=True)
        return sample, [image.size for image in pil_images]

    def _generate(
        self,
        samples: list[VLChatProcessorOutput],
        image_sizes: list[list[tuple[int, int]]],
        options: GenerationOptions,
        streamer: BaseStreamer | None = None,
        cancel: threading.Event | None = None,
        grammar: Any = None,
    ) -> list[ChatResult]:
        self._check_context(samples, options.max_new_tokens)
        batch = self.processor.batchify(samples).to(self.device)
        prompt_length = batch.input_ids.shape[1]
        stopper = _StopCriteria(self._decode, options.stop, prompt_length, cancel)
        inputs = {key: batch[key] for key in _MODEL_INPUTS}
        with self._lock, torch.inference_mode():
            if options.chunk_size is not None:
                embeds, cache = self.model.incremental_prefilling(**inputs, chunk_size=options.chunk_size)
                inputs.update(inputs_embeds=embeds, past_key_values=cache)
            if options.seed is not None:
                torch.manual_seed(options.seed)
            output = self.model.generate(
                **inputs,
                pad_token_id=self.tokenizer.eos_token_id,  # as the model card: finished rows are filled with eos
                bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                use_cache=True,
                stopping_criteria=StoppingCriteriaList([stopper]),
                logits_processor=LogitsProcessorList([grammar] if grammar is not None else []),
                streamer=streamer,
                **options.generate_kwargs(),
            )
        rows = output[:, prompt_length:].tolist()
        return [
            self._result(row, stopper.stopped.get(index), len(sample.input_ids), sizes, options.stop, cancel)
            for index, (row, sample, sizes) in enumerate(zip(rows, samples, image_sizes))
        ]

    def _grammar(self, response_format: dict[str, Any] | None) -> Any:
        """A fresh xgrammar logits processor for one generation (it keeps the row's parse state), or None."""
        if response_format is None:
            return None
        from deepseek_vl.engine.grammar import logits_processor

        return logits_processor(self.tokenizer, self.model.config.language_config.vocab_size, response_format)

    def _check_context(self, samples: list[VLChatProcessorOutput], max_new_tokens: int) -> None:
        """Refuse, as the API does, a prompt + max_new_tokens beyond the context, instead of running for minutes."""
        context = int(self.model.config.language_config.max_position_embeddings)
        prompt = max(len(sample.input_ids) for sample in samples)
        if prompt + max_new_tokens > context:
            room = f"lower max_new_tokens to {context - prompt} or less" if prompt < context else "shorten the prompt"
            raise ValueError(
                f"context length exceeded: the prompt has {prompt} tokens (images included) + max_new_tokens "
                f"{max_new_tokens}, more than the model's context of {context} tokens (max_position_embeddings); {room}"
            )

    def _result(
        self,
        tokens: list[int],
        stopped_after: int | None,
        prompt_tokens: int,
        image_sizes: list[tuple[int, int]],
        stops: tuple[str, ...],
        cancel: threading.Event | None,
    ) -> ChatResult:
        """Trim a row of generated ids (padding follows a finished row) and turn it into a ChatResult."""
        eos = self.tokenizer.eos_token_id
        if stopped_after is not None:
            tokens = tokens[:stopped_after]
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        raw = self._decode(tokens)
        text = final_text(raw, stops)
        if eos in tokens or any(s in raw for s in stops):
            reason = "stop"
        elif cancel is not None and cancel.is_set():
            reason = "cancelled"
        else:
            reason = "length"
        grounding = parse_grounding(text, image_sizes or None, image_index=max(len(image_sizes) - 1, 0))
        return ChatResult(text, prompt_tokens, len(tokens), reason, grounding, tokens)

    def _decode(self, tokens: Sequence[int]) -> str:
        """Decode without special tokens except the box markup."""
        kept = [t for t in tokens if t not in self._hidden_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=False)


def build_conversation(
    messages: list[dict[str, Any]],
    images: list | None,
    system_prompt: str | None,
    exif_transpose: bool,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """Normalise roles, attach and load images, add the system message and the open assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
    conversation: list[dict[str, str]] = []
    per_message: list[list] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} must be a dict with a 'role' and a string 'content', got {message!r}")
        role = _ROLES.get(str(message["role"]).lower())
        if role is None:
            raise ValueError(f"message {index} has unknown role {message['role']!r}; use user, assistant or system")
        unknown = sorted(set(message) - {"role", "content", "images"})
        if unknown:  # a typo such as "image" would otherwise drop the image silently
            raise ValueError(f"message {index} has unknown key {unknown[0]!r}; a message has role, content and images")
        sources = message.get("images")
        sources = [] if sources is None else sources
        if not isinstance(sources, (list, tuple)):
            raise ValueError(f"message {index}: 'images' must be a list, got {type(sources).__name__}")
        if sources and role != USER:
            raise ValueError(f"message {index} ({message['role']}) has images; only user messages can have images")
        conversation.append({"role": role, "content": message["content"]})
        per_message.append(list(sources))

    if images is not None:
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list, got {type(images).__name__}; wrap a single image: [image]")
        if any(per_message):
            raise ValueError("pass images either inside the messages or as images=, not both")
        per_message = _distribute(conversation, list(images))
    for index, (message, sources) in enumerate(zip(conversation, per_message)):
        tags = message["content"].count(IMAGE_TAG)
        if sources and not tags:
            message["content"] = f"{IMAGE_TAG}\n" * len(sources) + message["content"]
        elif tags != len(sources):
            raise ValueError(
                f"message {index} has {tags} {IMAGE_TAG} tags but {len(sources)} images; give one image per tag"
            )

    if not any(message["role"] == USER for message in conversation):
        raise ValueError("the messages need a user message: the model answers the last user message")
    if system_prompt:
        if conversation[0]["role"] == SYSTEM:
            raise ValueError("the messages already start with a system message; do not also pass system_prompt")
        conversation.insert(0, {"role": SYSTEM, "content": system_prompt})
    if conversation[-1]["role"] != ASSISTANT:
        conversation.append({"role": ASSISTANT, "content": ""})
    pil_images = [
        load_image(source, exif_transpose=exif_transpose, max_pixels=max_pixels)
        for sources in per_message
        for source in sources
    ]
    return conversation, pil_images


def _distribute(conversation: list[dict[str, str]], images: list) -> list[list]:
    """Split a flat image list over the user messages by their `<image>` tags (all to the last one if untagged)."""
    users = [i for i, message in enumerate(conversation) if message["role"] == USER]
    tags = [conversation[i]["content"].count(IMAGE_TAG) if i in users else 0 for i in range(len(conversation))]
    per_message: list[list] = [[] for _ in conversation]
    if images and not sum(tags):
        if not users:
            raise ValueError("images were given but there is no user message to attach them to")
        per_message[users[-1]] = images
        return per_message
    if sum(tags) != len(images):
        raise ValueError(f"the messages have {sum(tags)} {IMAGE_TAG} tags but {len(images)} images were given")
    start = 0
    for index, count in enumerate(tags):
        per_message[index], start = images[start : start + count], start + count
    return per_message


def final_text(raw: str, stops: Sequence[str]) -> str:
    """The answer: cut before the first stop string, surrounding whitespace removed."""
    cut = min((raw.find(s) for s in stops if s in raw), default=len(raw))
    return raw[:cut].strip()


class ChatStream:
    """Text pieces of one answer as they are generated (generation runs in a background thread).

    Iterating yields the pieces; their concatenation equals `result.text`, which is set when the stream is
    exhausted. `close()` stops the generation after the current token (the result then has finish_reason
    "cancelled" unless it had already finished). Also a context manager that closes on exit.
    """

    _DONE = object()

    def __init__(
        self, run: Callable[[BaseStreamer, threading.Event], ChatResult], decode: Callable[[Sequence[int]], str],
        stops: Sequence[str],
    ) -> None:  # fmt: skip
        self.result: ChatResult | None = None
        self._run = run
        self._pieces: queue.Queue = queue.Queue()
        self._streamer = _PieceStreamer(decode, stops, self._pieces)
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._work, name="deepseek-vl2-generate", daemon=True)
        atexit.register(self.close)  # a daemon inside a torch op at interpreter teardown aborts the process
        self._thread.start()

    def _work(self) -> None:
        try:
            result = self._run(self._streamer, self._cancel)
            self._streamer.emit(result.text)  # what was held back is final now, after close() too
            self.result = result
        except BaseException as error:  # re-raised in the consumer's thread by __iter__
            self._error = error
        finally:
            atexit.unregister(self.close)
            self._pieces.put(self._DONE)

    def __iter__(self) -> Iterator[str]:
        while not self._finished and (piece := self._pieces.get()) is not self._DONE:
            yield piece
        self._finished = True
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Ask the generation to stop after the current token, without waiting (safe in a signal handler)."""
        self._cancel.set()

    def close(self) -> None:
        self.cancel()
        self._thread.join()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _PieceStreamer(BaseStreamer):
    """transformers streamer that turns the growing answer into text pieces that never have to be taken back.

    Held back until they are certain: a possible beginning of a stop string, an incomplete UTF-8 character
    (decoded as U+FFFD) and trailing whitespace (the final text is stripped). The first `put` is the prompt.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str], pieces: queue.Queue) -> None:
        self._decode = decode
        self._stops = stops
        self._pieces = pieces
        self._tokens: list[int] | None = None
        self._emitted = ""
        self._partial = _StopPrefixes(stops)

    def put(self, value: torch.Tensor) -> None:
        if self._tokens is None:
            self._tokens = []
            return
        self._tokens.extend(value.reshape(-1).tolist())
        raw = self._decode(self._tokens)
        if not any(s in raw for s in self._stops):
            raw = raw.rstrip("\ufffd")
            raw = raw[: len(raw) - self._partial.longest(raw)]
        self.emit(final_text(raw, self._stops))

    def end(self) -> None:
        """The last piece is emitted by ChatStream once the result's text is known."""

    def emit(self, stable: str) -> None:
        """Queue what `stable` adds to the text emitted so far."""
        if len(stable) > len(self._emitted) and stable.startswith(self._emitted):
            self._pieces.put(stable[len(self._emitted) :])
            self._emitted = stable


class _StopPrefixes:
    """The longest end of a growing text that begins a stop string, in time linear in the text added (KMP).

    Per stop string, the state is how many of its first characters the text ends with; each new character advances
    it along the Knuth-Morris-Pratt failure links. Comparing every end with every prefix instead costs len(stop)^2
    per token, which let a client stall the server with a few long stop strings.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = list(stops)
        self._failure = [_failure_links(stop) for stop in self._stops]
        self._text = ""
        self._states = [0] * len(self._stops)

    def longest(self, text: str) -> int:
        if not text.startswith(self._text):  # the decoded text changed before its end: start over
            self._text, self._states = "", [0] * len(self._stops)
        for char in text[len(self._text) :]:
            for index, stop in enumerate(self._stops):
                state, failure = self._states[index], self._failure[index]
                if state == len(stop):
                    state = failure[state - 1]
                while state and stop[state] != char:
                    state = failure[state - 1]
                self._states[index] = state + (stop[state] == char)
        self._text = text
        return max((state for state, stop in zip(self._states, self._stops) if state < len(stop)), default=0)


def _failure_links(pattern: str) -> list[int]:
    """failure[i]: length of the longest proper prefix of pattern[: i + 1] that is also its suffix."""
    failure, state = [0] * len(pattern), 0
    for index in range(1, len(pattern)):
        while state and pattern[index] != pattern[state]:
            state = failure[state - 1]
        state += pattern[index] == pattern[state]
        failure[index] = state
    return failure


class _StopCriteria(StoppingCriteria):
    """Stops a row when its answer contains a stop string, and every row once `cancel` is set.

    Only the last few tokens are decoded each step: a stop string of n characters spans at most 4n byte tokens.
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stops: Sequence[str],
        prompt_length: int,
        cancel: threading.Event | None,
    ) -> None:
        self._decode = decode
        self._stops = stops
        self._prompt_length = prompt_length
        self._cancel = cancel
        self._window = 4 * max((len(s) for s in stops), default=0) + 2
        self.stopped: dict[int, int] = {}  # row -> number of generated tokens when its stop string appeared

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self._cancel is not None and self._cancel.is_set():
            return done.fill_(True)
        if not self._stops:
            return done
        generated = input_ids.shape[1] - self._prompt_length
        start = max(self._prompt_length, input_ids.shape[1] - self._window)
        for row, tail in enumerate(input_ids[:, start:].tolist()):
            if row not in self.stopped and any(s in self._decode(tail) for s in self._stops):
                self.stopped[row] = generated
            done[row] = row in self.stopped
        return done


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was asked for but MPS (Apple GPU) is not available; use --device cpu")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def saved_quantization(model: str | os.PathLike) -> str | None:
    """How a checkpoint's weights are saved quantized: this package's mode ("int8", "int4", "nf4") or transformers'
    ``quant_method`` ("auto-round", ...); None for full-precision weights."""
    from deepseek_vl.utils.hub import hub_unreachable

    hub = {} if Path(model).is_dir() else {"local_files_only": hub_unreachable()}
    config = saved_config(model, **hub) or {}
    return (config.get("quantization") or {}).get("mode") or quant_method(config)


def load_dtype(
    model: str | os.PathLike, dtype: str | torch.dtype, device: torch.device, quantize: str | None = None
) -> torch.dtype:
    """The dtype `VLChat.from_pretrained` loads ``model`` in: "auto" is bfloat16 for quantized weights (``quantize``,
    or a checkpoint saved quantized), as their kernels and sizes assume; otherwise see `resolve_dtype`."""
    quantized = dtype == "auto" and (quantize is not None or saved_quantization(model) is not None)
    return resolve_dtype("bfloat16" if quantized else dtype, device)


def resolve_model_folder(model: str | os.PathLike) -> Path:
    """A local checkpoint folder as is; a Hub repo id downloaded to (or found in) the Hugging Face cache."""
    source = os.fspath(model)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(source):
        raise ModelLoadError(f"model {source!r} is neither a checkpoint folder nor a Hub repo id like {DEFAULT_MODEL}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from deepseek_vl.utils.hub import hub_unreachable

    advice = "use a local folder holding the checkpoint instead (--model /path/to/folder on the command line)"
    try:
        return Path(snapshot_download(source, allow_patterns=_HUB_FILES, local_files_only=hub_unreachable()))
    except RepositoryNotFoundError as error:
        raise ModelLoadError(f"no Hub repo {source!r} (or it is private: log in with `hf auth login`)") from error
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(
            f"could not download {source!r} (offline, or the Hub is unreachable) and it is not in the cache; {advice}"
        ) from error
    except (HfHubHTTPError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"could not download {source!r} ({reason}); {advice}") from error


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def _warnings_off() -> Iterator[None]:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
