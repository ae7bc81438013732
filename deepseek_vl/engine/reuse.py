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
from collections.abc import Callable, Sequence
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

    def __init__(self, capacity: int, on_evict: Callable[[object], None] | None = None) -> None:
        self.capacity, self.on_evict = capacity, on_evict
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
                evicted, (_, size) = self.entries.popitem(last=False)
                self.size -= size
                if self.on_evict is not None:
                    self.on_evict(evicted)

    def peek(self, key: object) -> V | None:
        """The value without counting a lookup or refreshing it."""
        with self.lock:
            entry = self.entries.get(key)
            return None if entry is None else entry[0]

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
    (prompt and answer), so the next turn of a conversation, which repeats them, skips their prefill. Only entries
    that agree on the first ``min_length`` keys are compared (a dict of buckets), each in a few slice comparisons.
    """

    def __init__(self, capacity_bytes: int, min_length: int = 32) -> None:
        self.store: LRUBytes[list[tuple[torch.Tensor, torch.Tensor]]] = LRUBytes(capacity_bytes, self._forget)
        self.buckets: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        self.min_length = min_length
        self.lookups = self.hits = 0
        self.reused_tokens = 0

    def _forget(self, keys: object) -> None:
        bucket = self.buckets.get(keys[: self.min_length])  # type: ignore[index]
        if bucket is not None:
            bucket.discard(keys)  # type: ignore[arg-type]
            if not bucket:
                del self.buckets[keys[: self.min_length]]  # type: ignore[index]

    def lookup(self, keys: Sequence[int]) -> PrefixHit | None:
        """The longest stored prefix of ``keys`` shorter than ``keys`` (one token must be left to compute logits)."""
        best_key, best_length, best_entries = None, 0, None
        keys = tuple(keys)  # the stored keys' type: a tuple slice never equals a list slice
        limit = len(keys) - 1
        with self.store.lock:
            candidates = list(self.buckets.get(keys[: self.min_length], ()))
        for stored in candidates:
            length = common_prefix(stored, keys, limit)
            entries = self.store.peek(stored) if length > best_length else None
            if entries is not None:
                best_key, best_length, best_entries = stored, length, entries
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
        if nbytes > self.store.capacity:
            return
        with self.store.lock:
            self.buckets.setdefault(keys[: self.min_length], set()).add(keys)
        self.store.put(keys, entries, nbytes)


def common_prefix(a: tuple[int, ...], b: tuple[int, ...], limit: int) -> int:
    """Length of the common start of two key tuples, at most ``limit``: a bisection of slice comparisons, which run
    in C (a lookup compares every entry of its bucket; tensors made of the keys took 40x longer)."""
    low, high = 0, max(min(len(a), len(b), limit), 0)  # a[:low] == b[:low]; the common start is at most high
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low
