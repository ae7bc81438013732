"""Per-row attention cache of the engine: one pre-allocated slot per running request, each with its own length.

Why slots: every layer keeps two tensors of shape (rows, heads, capacity, dim), for Tiny's multi-head attention the
keys and values (heads = kv heads), for Small/Base's latent attention the rope key and the normalised latent
(heads = 1), so one class serves both. A decode step writes one entry per row at that row's own length and attends
over a slice ``[:rows, :, :longest]``: a view, nothing is gathered or copied per step. Rows that decode are kept
contiguous at the bottom (slots 0..d-1); a request being prefilled takes a slot from the top and moves down once it
is ready, and a leaving row is replaced by the last decoding row: one row is copied per join or leave, never the
batch. The capacity (positions) grows by doubling when a row needs it and is given back when no row is left, so
memory follows the longest live request, not the context length. Paged blocks would share memory better but need a paged attention kernel this package does
not have; padded per-row caches would copy the batch every step.

The attention layers see the ``Cache`` contract of ``models/language.py``: ``update(a, b, layer_idx)`` stores the
new entries and returns everything cached so far for the rows being run.
"""

from __future__ import annotations

import torch

from deepseek_vl.models.configuration import DeepseekV2Config

__all__ = ["SlotCache"]

GROWTH_QUANTUM = 256  # positions: capacity grows in whole multiples of this


def cache_shapes(config: DeepseekV2Config) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, dim) of the two cached tensors per layer: MLA (rope key, latent), MHA (key, value)."""
    if config.use_mla:
        return (1, config.qk_rope_head_dim), (1, config.kv_lora_rank)
    head_dim = config.hidden_size // config.num_attention_heads
    return (config.num_key_value_heads, head_dim), (config.num_key_value_heads, head_dim)


class SlotCache:
    """``rows`` slots of cached entries per layer; ``plan_decode``/``plan_prefill`` say what the next forward writes."""

    def __init__(self, config: DeepseekV2Config, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.dtype, self.device = rows, dtype, device
        self.max_positions = config.max_position_embeddings
        self.shapes = cache_shapes(config)
        self.layers = config.num_hidden_layers
        self.capacity = 0
        self.a: list[torch.Tensor] = []
        self.b: list[torch.Tensor] = []
        self._rows: slice = slice(0, 0)
        self._write: torch.Tensor | int = 0  # decode: (rows,) positions; prefill: the first position
        self._row_index = torch.arange(0)  # decode: 0..rows-1, the rows written
        self._end = 0  # keys returned per row: positions [0, end)

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` entries per slot (doubling, whole quanta), keeping what is cached."""
        if positions <= self.capacity:
            return
        if positions > self.max_positions:
            raise ValueError(f"{positions} positions exceed the model's context of {self.max_positions}")
        grown = max(positions, 2 * self.capacity)
        grown = min(-(-grown // GROWTH_QUANTUM) * GROWTH_QUANTUM, self.max_positions)
        (ha, da), (hb, db) = self.shapes
        options = {"dtype": self.dtype, "device": self.device}
        new_a = [torch.zeros(self.rows, ha, grown, da, **options) for _ in range(self.layers)]
        new_b = [torch.zeros(self.rows, hb, grown, db, **options) for _ in range(self.layers)]
        for old, new in zip(self.a + self.b, new_a + new_b):
            new[:, :, : self.capacity] = old
        self.a, self.b, self.capacity = new_a, new_b, grown

    def release(self) -> None:
        """Give the memory back (no row is live); the next ``reserve`` allocates again."""
        self.a, self.b, self.capacity = [], [], 0

    def plan_decode(self, lengths: torch.Tensor, longest: int) -> None:
        """The next forward is one new token for each of slots 0..rows-1, written at ``lengths`` (rows,);
        ``longest`` is their maximum, passed from the host so that no step waits on the device for it."""
        rows = lengths.shape[0]
        self._rows, self._write, self._end = slice(0, rows), lengths, longest + 1
        self._row_index = torch.arange(rows, device=lengths.device)  # once per step, not per layer

    def plan_prefill(self, slot: int, start: int, count: int) -> None:
        """The next forward is ``count`` prompt tokens of ``slot``, written at positions ``start``.."""
        self._rows, self._write, self._end = slice(slot, slot + 1), start, start + count

    def update(
        self, a: torch.Tensor, b: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache_a, cache_b = self.a[layer_idx], self.b[layer_idx]
        if isinstance(self._write, torch.Tensor):  # decode: one entry per row at its own length
            cache_a[self._row_index, :, self._write] = a[:, :, 0].to(self.dtype)
            cache_b[self._row_index, :, self._write] = b[:, :, 0].to(self.dtype)
        else:
            cache_a[self._rows, :, self._write : self._end] = a
            cache_b[self._rows, :, self._write : self._end] = b
        return cache_a[self._rows, :, : self._end], cache_b[self._rows, :, : self._end]

    def exchange(self, slot_a: int, length_a: int, slot_b: int, length_b: int) -> None:
        """Swap two slots' first entries (``length_a`` of a, ``length_b`` of b); a length of 0 moves one way."""
        for tensor in self.a + self.b:
            kept = tensor[slot_a, :, :length_a].clone() if length_a else None
            if length_b:
                tensor[slot_a, :, :length_b] = tensor[slot_b, :, :length_b]
            if kept is not None:
                tensor[slot_b, :, :length_a] = kept

    def read(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of a slot's first ``length`` entries per layer (for the prefix cache)."""
        return [(a[slot, :, :length].clone(), b[slot, :, :length].clone()) for a, b in zip(self.a, self.b)]

    def write(self, slot: int, entries: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Put the first ``length`` entries of a stored prefix into a slot."""
        for (a, b), (cache_a, cache_b) in zip(entries, zip(self.a, self.b)):
            cache_a[slot, :, :length] = a[:, :length]
            cache_b[slot, :, :length] = b[:, :length]
