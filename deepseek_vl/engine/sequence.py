"""One request inside the engine: its prompt, its sampling settings, its progress and how to report back."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from deepseek_vl.chat import ChatResult, GenerationOptions
    from deepseek_vl.engine.grammar import GrammarState
    from deepseek_vl.models.processing import VLChatProcessorOutput

__all__ = ["Sequence", "Status"]

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no slot yet
    PREFILLING = "prefilling"  # has a slot, its prompt is being run chunk by chunk
    DECODING = "decoding"  # in the decode batch
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request's state. The scheduler reads lengths and statuses; the runner turns it into tensors."""

    sample: VLChatProcessorOutput  # the processor's output for the prompt
    options: GenerationOptions
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # boxes are parsed for the last one
    grammar: GrammarState | None = None
    on_piece: Callable[[str], None] | None = None
    on_done: Callable[[ChatResult | BaseException], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    prompt_ids: list[int] = field(default_factory=list)
    prompt_keys: list[int] = field(default_factory=list)  # prefix-cache keys: ids, image positions by image content
    embeds: torch.Tensor | None = None  # (T, D) prompt embeddings with the image features, set at admission
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    slot: int = -1
    cached: int = 0  # positions in the slot cache (prompt prefix, then answer tokens fed back)
    output: list[int] = field(default_factory=list)
    stopped_after: int | None = None  # generated tokens when a stop string appeared
    generator: torch.Generator | None = None
    seen_tokens: torch.Tensor | None = None  # (V,) bool: prompt and answer tokens, for the repetition penalty
    seen_outputs: int = 0  # answer tokens already marked in seen_tokens
    streamer: Any = None
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    error: BaseException | None = None  # its own failure (its caller's on_piece raised): it ends with this error

    def __post_init__(self) -> None:
        self.prompt_ids = self.sample.input_ids.tolist()

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def remaining_prompt(self) -> int:
        return self.prompt_length - self.cached
