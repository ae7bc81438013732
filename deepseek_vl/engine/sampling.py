"""Next tokens for a batch of rows that each have their own settings: penalty, grammar, greedy or seeded sampling.

The order is the one of ``transformers`` ``generate`` for these settings (repetition penalty, then temperature,
then top-k, then top-p), so a greedy row picks the token ``generate`` picks and a seeded row draws the token
``VLChat.chat(seed=...)`` draws. Every sampled row draws from its own ``torch.Generator``: with a seed, its answer
does not depend on which requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from deepseek_vl.engine.sequence import Sequence

__all__ = ["TOP_K", "new_generator", "sample"]

TOP_K = 50  # generate's default top-k, which the official demo and `VLChat` sample with (they never set one)


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, rows: Seq[Sequence]) -> list[int]:
    """One token per row of (N, V) fp32 logits (modified in place)."""
    for index, seq in enumerate(rows):
        if seq.options.repetition_penalty != 1.0:
            penalise(logits[index], seq)
        if seq.grammar is not None:
            seq.grammar.mask(logits[index])
    tokens = logits.argmax(dim=-1).tolist()
    for index, seq in enumerate(rows):
        if seq.options.temperature > 0:
            tokens[index] = draw(logits[index], seq.options.temperature, seq.options.top_p, seq.generator)
    return tokens


def penalise(scores: torch.Tensor, seq: Sequence) -> None:
    """CTRL's repetition penalty over every token seen (prompt and answer): positive scores divided, negative
    multiplied.

    The tokens seen are a (V,) mask kept with the sequence on the logits' device; each step adds only the answer
    tokens new since the last one, so the history is not sent to the device again and nothing waits on it.
    """
    if seq.seen_tokens is None or seq.seen_tokens.device != scores.device:
        seq.seen_tokens = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
        seq.seen_outputs = 0
        seq.seen_tokens[torch.tensor(seq.prompt_ids, dtype=torch.long, device=scores.device)] = True
    if len(seq.output) > seq.seen_outputs:
        seq.seen_tokens[torch.tensor(seq.output[seq.seen_outputs :], device=scores.device)] = True
        seq.seen_outputs = len(seq.output)
    penalty = seq.options.repetition_penalty
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    scores.copy_(torch.where(seq.seen_tokens, penalised, scores))


def draw(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """transformers' temperature, top-k and top-p warpers, then one multinomial draw: the same numbers, same token."""
    scores = scores / temperature
    kth = scores.topk(min(TOP_K, scores.shape[-1])).values[-1]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scores.sort()  # ascending: the tail to drop comes first
        tail = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        tail[-1] = False  # the most likely token always stays
        scores = scores.masked_fill(tail.scatter(0, order, tail), float("-inf"))
    probabilities = scores.softmax(dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))
