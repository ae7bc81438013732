"""Who runs next: admission into cache slots, a prefill-token budget per step, joins and leaves of the decode batch.

Every step runs up to ``prefill_budget`` prompt tokens of the sequences being prefilled (oldest first, a long
prompt over several steps) and then one decode token for every decoding row, so a newcomer's prompt never stalls
the running streams for more than one budget. A row leaves the moment it finishes. The scheduler only keeps
numbers (slots, lengths, statuses); it tells the runner which cache rows to move and never touches a tensor.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from deepseek_vl.engine.sequence import Sequence, Status

__all__ = ["Move", "Scheduler", "Step"]


@dataclass(frozen=True)
class Move:
    """Exchange the cache rows of two slots (their first ``length_*`` positions); ``length_b`` 0 is a plain move."""

    slot_a: int
    length_a: int
    slot_b: int
    length_b: int


@dataclass
class Step:
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens to run now)
    decode: list[Sequence] = field(default_factory=list)  # the decoding rows, slot i at index i
    admitted: list[Sequence] = field(default_factory=list)  # got a slot this step (their prompts are not embedded)


class Scheduler:
    """Decoding rows hold slots 0..d-1 (the decode batch is one cache slice); prefills take slots from the top."""

    def __init__(self, max_rows: int, prefill_budget: int) -> None:
        if max_rows < 1 or prefill_budget < 1:
            raise ValueError(f"max_rows and prefill_budget must be >= 1, got {max_rows} and {prefill_budget}")
        self.max_rows, self.prefill_budget = max_rows, prefill_budget
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []
        self.slots: list[Sequence | None] = [None] * max_rows

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> Step:
        step = Step()
        while self.waiting and self.running < self.max_rows:
            seq = self.waiting.popleft()
            seq.slot = max(i for i, holder in enumerate(self.slots) if holder is None)
            self.slots[seq.slot] = seq
            seq.status = Status.PREFILLING
            self.prefilling.append(seq)
            step.admitted.append(seq)
        budget = self.prefill_budget
        for seq in self.prefilling:
            if budget == 0:
                break
            count = min(seq.remaining_prompt, budget)
            step.prefill.append((seq, count))
            budget -= count
        step.decode = list(self.decoding)
        return step

    def drop_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def leave(self, seq: Sequence) -> list[Move]:
        """Free a finished or cancelled sequence's slot; the last decoding row fills a gap among the decoders."""
        moves: list[Move] = []
        self.slots[seq.slot] = None
        if seq.status is Status.PREFILLING:
            self.prefilling.remove(seq)
        elif seq.status is Status.DECODING:
            last = self.decoding.pop()
            if last is not seq:
                moves.append(Move(seq.slot, 0, last.slot, last.cached))
                self.slots[last.slot], self.slots[seq.slot] = None, last
                self.decoding[seq.slot] = last
                last.slot = seq.slot
        seq.status, seq.slot = Status.FINISHED, -1
        return moves

    def join(self, seq: Sequence) -> list[Move]:
        """A sequence whose prompt is done takes slot d, exchanging with whatever prefill held it."""
        target = len(self.decoding)
        moves: list[Move] = []
        if seq.slot != target:
            other = self.slots[target]
            moves.append(Move(target, other.cached if other else 0, seq.slot, seq.cached))
            if other is not None:
                other.slot = seq.slot
            self.slots[seq.slot] = other
            self.slots[target] = seq
            seq.slot = target
        self.prefilling.remove(seq)
        self.decoding.append(seq)
        seq.status = Status.DECODING
        return moves
