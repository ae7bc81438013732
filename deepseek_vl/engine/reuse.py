"""Work kept across requests: image features by image content, and the cache of prompts already run.

Both are LRU maps bounded by the bytes they hold, guarded by a lock (the server prepares requests on several
threads while the engine thread reads and stores). Reuse never changes an answer's tokens: an image's features are
computed the same way (its tiles alone through the tower) whether or not they were cached, and a reused prefix is
exactly the cache entries the same tokens produced before.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

__all__ = ["LRUBytes", "PrefixCache", "PrefixHit", "image_key"]

V = TypeVar("V")


def image_key(tiles: torch.Tensor, crop: Sequence[int]) -> str:
    """Content hash of one processed image (its tiles' pixels and its tiling): equal images share features."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(tuple(crop)).encode())
    digest.update(tiles.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class LRUBytes(Generic[V]):
    """A least-recently-used map holding at most ``capacity`` bytes; counts hits and misses."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: collections.OrderedDict[object, tuple[V, int]] = collections.OrderedDict()
        self.size = self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: object) -> V | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return entry[0]

    def put(self, key: object, value: V, nbytes: int) -> None:
        if nbytes > self.capacity:
            return
        with self.lock:
            if key in self.entries:
                self.size -= self.entries.pop(key)[1]
            self.entries[key] = (value, nbytes)
            self.size += nbytes
            while self.size > self.capacity:
                self.size -= self.entries.popitem(last=False)[1][1]

    def values(self) -> list[tuple[object, V]]:
        with self.lock:
            return [(key, value) for key, (value, _) in self.entries.items()]

    def touch(self, key: object) -> None:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)


@dataclass
class PrefixHit:
    length: int  # cached positions reused
    entries: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (heads, positions, dim) pairs


class PrefixCache:
    """Cache entries of finished requests, found by the longest common prefix of token keys.

    A token key is the token id, except at image positions, where it is a number derived from the image's content
    hash: two prompts share a prefix only if their tokens and their images agree. Entries are whole sequences
    (prompt and answer), so the next turn of a conversation, which repeats them, skips their prefill.
    """

    def __init__(self, capacity_bytes: int, min_length: int = 16) -> None:
        self.store: LRUBytes[tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = LRUBytes(
            capacity_bytes
        )
        self.min_length = min_length
        self.lookups = self.hits = 0
        self.reused_tokens = 0

    def lookup(self, keys: Sequence[int]) -> PrefixHit | None:
        """The longest stored prefix of ``keys`` shorter than ``keys`` (one token must be left to compute logits)."""
        best_key, best_length, best_entries = None, 0, None
        limit = len(keys) - 1
        for key, (stored, entries) in self.store.values():
            length = common_prefix(stored, keys, limit)
            if length > best_length:
                best_key, best_length, best_entries = key, length, entries
        self.lookups += 1
        if best_entries is None or best_length < self.min_length:
            return None
        self.store.touch(best_key)
        self.hits += 1
        self.reused_tokens += best_length
        return PrefixHit(best_length, best_entries)

    def store_sequence(self, keys: Sequence[int], entries: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        keys = tuple(keys)
        nbytes = sum(a.nbytes + b.nbytes for a, b in entries)
        self.store.put(keys, (keys, entries), nbytes)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    left = torch.tensor(a[:n])
    right = torch.tensor(b[:n])
    differ = (left != right).nonzero()
    return int(differ[0]) if len(differ) else n
