"""Attention cache written in place: a decode step stores its new entry instead of copying the whole cache.

transformers' ``DynamicCache`` concatenates every step, so step t copies all t cached entries of every
layer (about 62 MB per step on Tiny shapes at 1,500 tokens of context). Here each layer keeps one buffer
with room for ``block`` more tokens; a step writes its entry into the next free row and returns a view
of the filled part, so the attention layers see exactly what ``DynamicCache`` would give them. The
buffer grows (one copy) only when full, once every ``block`` steps.

The contract with the attention layers is transformers' ``Cache.update(a, b, layer_idx) -> (a_all, b_all)``
with (B, heads, T, dim) tensors: (key, value) for MHA, (rope key, latent) for MLA. ``InPlaceCache`` is a
``DynamicCache``, so everything that accepts one (``generate``, ``crop``, beam reordering) accepts it. One
difference: ``keys``/``values`` are views of the buffers, and an update after ``crop`` overwrites the entries
past the cropped length in place; ``.clone()`` them to keep them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class InPlaceLayer(DynamicLayer):
    """One layer's (a, b) entries: ``keys``/``values`` are views of the first ``length`` rows of two buffers."""

    block = 256  # tokens of room added when a buffer is full

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._key_buffer = self._value_buffer = None
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._writable(key_states, value_states, end):
            self._grow(key_states, value_states, end)
        self._key_buffer[:, :, length:end] = key_states
        self._value_buffer[:, :, length:end] = value_states
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _writable(self, key_states: torch.Tensor, value_states: torch.Tensor, end: int) -> bool:
        """The buffers exist, have room, and still hold ``keys``/``values`` (crop keeps them; batch reordering does not)."""
        buffers = (self._key_buffer, self._value_buffer)
        if buffers[0] is None or end > buffers[0].shape[2]:
            return False
        for buffer, cached, new in zip(buffers, (self.keys, self.values), (key_states, value_states)):
            if buffer.shape[:2] != new.shape[:2] or buffer.shape[3] != new.shape[3] or buffer.dtype != new.dtype:
                return False
            if cached.numel() and (cached.data_ptr() != buffer.data_ptr() or cached.stride() != buffer.stride()):
                return False
        return True

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, end: int) -> None:
        capacity = (end // self.block + 1) * self.block
        buffers = []
        for cached, new in ((self.keys, key_states), (self.values, value_states)):
            b, h, _, d = new.shape
            buffer = torch.empty(b, h, capacity, d, dtype=new.dtype, device=new.device)
            if cached.numel():
                buffer[:, :, : cached.shape[2]] = cached
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class InPlaceCache(DynamicCache):
    """A ``DynamicCache`` whose layers write in place (``InPlaceLayer``); the default cache of these models."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=InPlaceLayer)
