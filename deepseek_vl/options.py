"""Settings of a generation and the default model: plain Python, so the command line validates them instantly.

`deepseek_vl.chat` uses them with the model; the `deepseek-vl2` command checks its options with the same rules
before it imports torch, so a typo is reported in milliseconds and the CLI and the API agree on every rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MODEL", "GenerationOptions", "ModelLoadError", "is_hub_id", "model_reference"]

DEFAULT_MODEL = "deepseek-ai/deepseek-vl2-tiny"


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether ``source``, no existing path, can name a Hub repo ("owner/name"), as opposed to a local path."""
    text = os.fspath(source)
    return not Path(text).expanduser().exists() and not text.startswith((".", "/", "~")) and text.count("/") == 1


def model_reference(model: str) -> str:
    """How a run names its model (adapters and batch records keep it): an absolute path for a local folder (symbolic
    links kept as given), else the Hub id."""
    path = Path(model).expanduser()
    return os.path.abspath(path) if path.is_dir() else model


class ModelLoadError(OSError):
    """The model could not be found or downloaded; the message says what to pass instead."""


@dataclass(frozen=True)
class GenerationOptions:
    """Validated decoding settings (hashable, so batch jobs can group requests that share them).

    temperature 0 is greedy decoding, the model card's default; when sampling it recommends temperature <= 0.7.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        # bounds away from 0 so that logits / temperature and logits / penalty stay finite in float32
        greedy_or_sampling = "0 (greedy) or in [0.001, 2]"
        _check_number("temperature", self.temperature, lambda t: t == 0 or 1e-3 <= t <= 2, greedy_or_sampling)
        _check_number("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        penalty_range = "in [0.001, 1000] (1 = off)"
        _check_number("repetition_penalty", self.repetition_penalty, lambda r: 1e-3 <= r <= 1e3, penalty_range)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed > 2**64 - 1:
                raise ValueError(f"seed must be below 2**64, got {self.seed}")
        if self.chunk_size is not None:
            _check_int("chunk_size", self.chunk_size, minimum=1)
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, valid: Callable[[float], bool], rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}")
