"""Handing freed heap memory back to the system, where the allocator would otherwise keep it."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache


@cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, which returns the heap's free pages to the system; None without glibc (musl, macOS,
    Windows), where there is nothing to call."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
