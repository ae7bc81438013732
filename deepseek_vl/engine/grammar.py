"""Structured output: OpenAI ``response_format`` (json_object, json_schema) as a per-row mask on the logits.

xgrammar compiles the schema once into a grammar over this tokenizer's vocabulary and gives each row a matcher
that yields the bitmask of allowed next tokens in microseconds, its compiled grammars cached (bounded). It is the
structured-output backend of vLLM and SGLang, ships wheels for CPU and CUDA, and has a ``transformers`` logits
processor, so the engine and `VLChat` (plain ``generate``) use the same grammars. Outlines is slower to compile and
llguidance has no ``transformers`` processor. Whitespace between JSON tokens is the compact one: free whitespace
lets a weak model pad forever instead of closing the object.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import torch

__all__ = ["GrammarState", "check_response_format", "compile_response_format", "grammar_for", "logits_processor"]

GRAMMAR_CACHE_BYTES = 256 * 1024 * 1024  # compiled grammars kept (LRU); each distinct schema is ~100 kB and up
_compilers: dict[int, Any] = {}
_lock = threading.Lock()


def _compiler(tokenizer: Any, vocab_size: int) -> Any:
    import xgrammar as xgr

    with _lock:
        key = id(tokenizer)
        if key not in _compilers:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
            _compilers[key] = xgr.GrammarCompiler(info, cache_limit_bytes=GRAMMAR_CACHE_BYTES)  # clients' schemas vary
        return _compilers[key]


def _json_schema(response_format: dict[str, Any]) -> tuple[str, bool] | None:
    """(schema text, strict) of a response_format, None for plain text; ValueError says what is wrong with it."""
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError('response_format must be an object like {"type": "json_object"}')
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type": "object"}', True
    if kind != "json_schema":
        raise ValueError(f"response_format type {kind!r} is not supported; use text, json_object or json_schema")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
    return json.dumps(spec["schema"]), bool(spec.get("strict", True))


def _unusable(error: Exception) -> ValueError:
    reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", reason)  # xgrammar's "[time] file.cc:line: " prefix
    return ValueError(f"response_format json_schema is not a usable JSON schema: {reason}")


def check_response_format(response_format: dict[str, Any]) -> None:
    """`compile_response_format`'s errors without a tokenizer: a command checks its schema before the model loads."""
    import xgrammar as xgr

    if (schema := _json_schema(response_format)) is not None:
        try:
            xgr.Grammar.from_json_schema(schema[0], any_whitespace=False, strict_mode=schema[1])
        except (RuntimeError, ValueError, TypeError) as error:
            raise _unusable(error) from error


def compile_response_format(tokenizer: Any, vocab_size: int, response_format: dict[str, Any]) -> Any | None:
    """The compiled grammar of a response_format, None for plain text; ValueError says what is wrong with it."""
    if (schema := _json_schema(response_format)) is None:
        return None
    compiler = _compiler(tokenizer, vocab_size)
    try:
        return compiler.compile_json_schema(schema[0], any_whitespace=False, strict_mode=schema[1])
    except (RuntimeError, ValueError, TypeError) as error:
        raise _unusable(error) from error


class GrammarState:
    """One row's matcher: masks the logits to the tokens the grammar allows, follows the tokens chosen."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of forbidden tokens to -inf in place ((V,) fp32)."""
        import xgrammar as xgr

        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits[None]
        xgr.apply_token_bitmask_inplace(row, self.bitmask.to(logits.device), vocab_size=self.vocab_size)

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    def finished(self) -> bool:
        return self.matcher.is_terminated()


def grammar_for(tokenizer: Any, vocab_size: int, response_format: dict[str, Any]) -> GrammarState | None:
    compiled = compile_response_format(tokenizer, vocab_size, response_format)
    return None if compiled is None else GrammarState(compiled, vocab_size)


def logits_processor(tokenizer: Any, vocab_size: int, response_format: dict[str, Any]) -> Any | None:
    """A ``transformers`` logits processor enforcing the response_format in ``generate`` (one row)."""
    import xgrammar as xgr

    compiled = compile_response_format(tokenizer, vocab_size, response_format)
    return None if compiled is None else xgr.contrib.hf.LogitsProcessor(compiled)
