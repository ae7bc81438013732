"""Collator: conversations -> a right-padded training batch whose labels cover only the assistant turns.

The processor does the tokens (training mode: every turn, the final eos kept), so a row's ids are exactly the ids
inference builds for the same conversation up to each answer. This module only picks the labels and pads.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch

from deepseek_vl.models.processing import DeepseekVLV2Processor, VLChatProcessorOutput
from deepseek_vl.train.data import Example
from deepseek_vl.utils.io import load_image

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "images", "images_seq_mask", "images_spatial_crop")


class TooLongError(ValueError):
    pass


def context_length(model_folder: str | os.PathLike) -> int:
    """The language model's context (max_position_embeddings): a longer row cannot be trained on."""
    from deepseek_vl.models import DeepseekVLV2Config

    return DeepseekVLV2Config.from_pretrained(model_folder).language_config.max_position_embeddings


class Collator:
    """Callable on a list of Examples; returns the model's keyword arguments (labels included) as tensors.

    Labels: the assistant answers and their closing eos; the prompt, system message, image tokens and padding are
    -100. Rows longer than ``max_length`` (the user's limit) or ``context`` (the model's max_position_embeddings)
    are refused, the row's file and line named.
    """

    def __init__(
        self, processor: DeepseekVLV2Processor, max_length: int | None = None, context: int | None = None
    ) -> None:
        # mask_prompt makes the processor label user/system turns -100 (the released processor_config has it off).
        self.processor = processor if processor.mask_prompt else copy.copy(processor)
        self.processor.mask_prompt = True
        self.max_length = max_length
        self.context = context

    def sample(self, example: Example) -> VLChatProcessorOutput:
        where = f"{example.source}:{example.line}"
        try:
            images = [load_image(path) for path in example.images]
            sample = self.processor.process_one(conversations=example.messages, images=images, inference_mode=False)
        except ValueError as error:  # an image that does not decode (truncated, not an image), ...
            raise ValueError(f"{where}: {error}") from error
        limits = [(self.max_length, "--max-length"), (self.context, "the model's context, max_position_embeddings")]
        limit, name = min(((n, name) for n, name in limits if n is not None), default=(None, ""))
        if limit is not None and len(sample) > limit:
            raise TooLongError(
                f"{where}: the conversation is {len(sample)} tokens, over the limit of {limit} ({name}); "
                "shorten it, use fewer or smaller images, or split it"
            )
        return sample

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        batch = self.processor.batchify([self.sample(example) for example in examples], padding="right")
        batch.labels[:, 0] = self.processor.ignore_id  # never a target (nothing precedes it); keeps counts exact
        return {key: batch[key] for key in MODEL_KEYS}


def check_rows(
    collator: Collator, examples: Sequence[Example], progress: bool = False
) -> tuple[list[tuple[int, int, int]], list[str]]:
    """Tokenise every row as training will (images fully decoded, lengths against the limits) before any training.

    Returns (tokens, label tokens, images) of each good row and a "file:line: problem" for each bad one: a bad row found
    mid-run would stop training with nothing saved. ``progress`` shows a bar: a large file takes minutes (a few ms a
    text row, up to a few hundred ms a large photo).
    """
    from tqdm import tqdm

    sizes, problems = [], []
    for example in tqdm(examples, desc="checking rows", unit="row", disable=not progress, leave=False):
        try:
            sample = collator.sample(example)
        except ValueError as error:
            problems.append(str(error))
            continue
        labels = int((sample.target_ids[1:] != collator.processor.ignore_id).sum())
        sizes.append((len(sample), labels, len(example.images)))
    return sizes, problems


def num_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken over (the next-token targets that are not -100)."""
    return int((batch["labels"][:, 1:] != -100).sum())
