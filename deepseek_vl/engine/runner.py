"""Turns scheduled sequences into tensors and runs the model: prompt embedding, prefill chunks, decode steps.

The runner drives the language model's parts directly (embeddings, rotary tables, decoder layers, norm, head) so
that each row of a decode step has its own position and its own number of cached keys; the layers themselves are
the model's, unchanged. It never decides who runs: it runs what the scheduler hands it.
"""

from __future__ import annotations

import torch

from deepseek_vl.engine.cache import SlotCache
from deepseek_vl.engine.reuse import LRUBytes, PrefixCache, image_key
from deepseek_vl.engine.sequence import Sequence
from deepseek_vl.models import DeepseekVLV2ForCausalLM
from deepseek_vl.models.language import causal_padding_mask, decode_kernels

__all__ = ["ModelRunner"]


class ModelRunner:
    def __init__(
        self,
        model: DeepseekVLV2ForCausalLM,
        rows: int,
        vision_cache_bytes: int,
        prefix_cache_bytes: int,
    ) -> None:
        self.model = model
        self.language = model.language
        self.device = model.device
        dtype = self.language.model.embed_tokens.weight.dtype
        self.cache = SlotCache(model.config.language_config, rows, dtype, self.device)
        self.vision_cache: LRUBytes[torch.Tensor] | None = LRUBytes(vision_cache_bytes) if vision_cache_bytes else None
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None

    # ---------------------------------------------------------------------------------------------- admission

    @torch.inference_mode()
    def embed_prompt(self, seq: Sequence) -> None:
        """Prompt embeddings with every image's features in its ``<image>`` positions; sets the prefix keys.

        Each image goes through the vision tower alone (its global view and tiles together), cached or not, so its
        features are the same numbers either way.
        """
        sample = seq.sample
        ids = sample.input_ids.to(self.device)
        embeds = self.language.model.embed_tokens(ids)  # (T, D)
        keys = ids.tolist()
        crops = [(w, h) for w, h in sample.images_spatial_crop.tolist() if w and h]
        positions = sample.images_seq_mask.nonzero().flatten().tolist()
        start_tile = start_position = 0
        for w, h in crops:
            tiles = sample.images[start_tile : start_tile + 1 + w * h]
            start_tile += 1 + w * h
            key = image_key(tiles, (w, h))
            features = self.vision_cache.get(key) if self.vision_cache is not None else None
            if features is None:
                encoded = self.model.encode_tiles(tiles.to(self.device))
                features = self.model.tile_layout(encoded, w, h).to(embeds.dtype)
                if self.vision_cache is not None:
                    self.vision_cache.put(key, features, features.nbytes)
            where = positions[start_position : start_position + features.shape[0]]
            if len(where) != features.shape[0]:
                raise ValueError("the prompt's <image> positions do not match its images; pass the processor output")
            embeds[where] = features
            image_token = -1 - int(key[:15], 16)  # negative: never a token id
            for position in where:
                keys[position] = image_token
            start_position += features.shape[0]
        seq.embeds, seq.prompt_keys = embeds, keys

    def reuse_prefix(self, seq: Sequence) -> None:
        """Copy the longest cached prefix of the prompt into the sequence's slot."""
        if self.prefix_cache is None:
            return
        hit = self.prefix_cache.lookup(seq.prompt_keys)
        if hit is not None:
            self.cache.reserve(hit.length + 1)
            self.cache.write(seq.slot, hit.entries, hit.length)
            seq.cached = hit.length

    def keep_prefix(self, seq: Sequence) -> None:
        """Store a finishing sequence's cache (prompt and answer) for the conversation's next turn."""
        if self.prefix_cache is None or seq.cached < self.prefix_cache.min_length:
            return
        keys = (seq.prompt_keys + seq.output)[: seq.cached]
        self.prefix_cache.store_sequence(keys, self.cache.read(seq.slot, seq.cached))

    # ------------------------------------------------------------------------------------------------ forward

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        model = self.language.model
        rope = model.rotary_emb(positions, x.dtype)
        for layer in model.layers:
            x = layer(x, rope, mask, self.cache)
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language.lm_head(self.language.model.norm(hidden)).float()

    @torch.inference_mode()
    def prefill(self, seq: Sequence, count: int) -> torch.Tensor | None:
        """Run ``count`` more prompt tokens of one sequence; the (V,) logits of its next token once all are run."""
        start = seq.cached
        self.cache.reserve(start + count)
        self.cache.plan_prefill(seq.slot, start, count)
        x = seq.embeds[start : start + count][None]  # (1, T, D)
        positions = torch.arange(start, start + count, device=self.device)[None]
        mask = causal_padding_mask(None, start, count, self.device)
        hidden = self._layers(x, positions, mask)
        seq.cached += count
        if seq.cached < seq.prompt_length:
            return None
        return self._logits(hidden[:, -1:])[0, -1]

    @torch.inference_mode()
    def decode(self, rows: list[Sequence]) -> torch.Tensor:
        """One token for each decoding row (slots 0..N-1, in order); returns (N, V) logits."""
        cached = [seq.cached for seq in rows]  # lengths known on the host: no step waits on the device for them
        longest = max(cached)
        self.cache.reserve(longest + 1)
        lengths = torch.tensor(cached, device=self.device)
        self.cache.plan_decode(lengths, longest)
        tokens = torch.tensor([seq.output[-1] for seq in rows], device=self.device)
        x = self.language.model.embed_tokens(tokens)[:, None]  # (N, 1, D)
        mask = None  # rows of equal length attend to everything cached
        if min(cached) != longest:
            keys = torch.arange(longest + 1, device=self.device)
            mask = (keys[None, :] <= lengths[:, None])[:, None, None]  # (N, 1, 1, S)
        with decode_kernels(x, x.dtype):
            logits = self._logits(self._layers(x, lengths[:, None], mask))[:, -1]
        for seq in rows:
            seq.cached += 1
        return logits
